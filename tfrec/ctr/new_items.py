"""New items in a trained lifelong CTR ranker's tables, without retraining (issue 22 item 5, ranker side).

A trained CTR model (R2LED, a baseline or a reference) reads per-item tables,
one row per item id: the ID embedding (`item_encoder`), the wide part's item bias
and genres, R2LED's semantic IDs, SIM-hard's genres, SIM-soft's frozen text
vectors. Everything `CTRModel.materialize()` precomputes for serving (fused and
projected item tables, packed SIDs, genre bit masks, SimHash signatures, the
normalised retrieval table) is computed row by row from those tables, so
extending them extends the served model. For new items (rows of ``new.tsv``:
``item_id`` plus the item table's columns, e.g. MovieLens ``title`` and
``genres``):

1. **semantic IDs** with the run's *frozen* quantizer: the item's text in the
   store's view (`tfrec.semantics.new_items.StoreTextEncoder`: the columns and
   join ``tfrec ctr encode`` used, "Title (Year). Genres: A, B", and the store's
   MiniLM), then the nearest codeword of the residual level by level
   (`tfrec.semantics.sids.new_item_sids`, the function the retrieval delta uses
   too);
2. **genres** through the training genre vocabulary (unknown genres dropped, at
   most the table's width kept), **text vectors** = the pooled view (SIM-soft);
3. **ID embedding row and item bias** (ours; the paper has nothing about new
   items), option ``init``:

   - ``"sid_neighbours"`` (default): the mean over the trained items sharing the
     longest SID prefix (levels ``L``, ``L - 1``, ..., 1) that has at least one
     trained item; without one (or without SIDs: baselines, an item whose text
     gives no code) the catalogue mean of the ID rows and the global prior
     logit ``log(r / (1 - r))`` of the training click rate ``r`` for the bias;
   - ``"zero"``: a zero ID row and the global prior logit.

   `NewItemRows.init_level` records, per item, the prefix length averaged over
   (0 = catalogue mean / prior, -1 = ``zero``).

`extend_ctr_model` then builds the model again from its config with ``V + n``
ids and copies every weight: trained rows unchanged, the new rows appended (ids
``V .. V + n - 1``, in the order of the rows); a weight it does not know how to
extend is an error, never silently left out. `RankerRun` reads a ``tfrec ctr
train`` run folder (``model.keras``, ``item_vocab.txt``, ``results.json``, the
fitted SIDs in ``sids/``) and refuses tokens the ranker already has. Exporting the
extended model as a new ranker version (TF Serving picks it up by its version
policy) is ``export.ranker_items`` (``tfrec items add --ranker RUN --ranker_out
BASE``).

Example (a tiny untrained R2LED; the rows of a real run come from `RankerRun.new_item_rows`):
>>> import numpy as np
>>> from tfrec.models.r2led import R2LED
>>> sids = np.array([[-1, -1], [-1, -1], [0, 1], [0, 2], [1, 0]])
>>> model = R2LED(vocab_size=5, item_sids=sids, sid_codebook_sizes=[2, 3], embedding_dim=4, top_k=2)
>>> x = {"history_ids": np.array([[2, 3]]), "target_id": np.array([4])}
>>> before = model.predict(x, verbose=0)
>>> codes = np.array([[0, 2]])                     # a new item's SID: shares (0, 2) with item 3
>>> embedding, bias, level = initial_rows(model, sids, codes)
>>> level.tolist(), bool(np.allclose(embedding[0], model.item_encoder.all_items()[3]))
([2], True)
>>> rows = NewItemRows(["new"], embedding, bias, codes, np.zeros((1, 0), "int32"),
...                    np.zeros((1, 0), "float32"), level)
>>> bigger = extend_ctr_model(model, rows)
>>> bigger.vocab_size, bool(np.allclose(bigger.predict(x, verbose=0), before, atol=1e-6))
(6, True)
>>> np.asarray(bigger.item_sids)[5].tolist()
[0, 2]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np

from tfrec.data.vocab import NUM_RESERVED

INITS = ("sid_neighbours", "zero")
NEW_ITEMS_FILE = "new_items.npz"
# (weight path suffix, NewItemRows field): the per-item tables of the CTR models
ITEM_TABLES = (("item_embedding/embeddings", "embedding"), ("item_bias", "bias"), ("item_sids", "sids"),
               ("item_genres", "genres"), ("item_semantic", "semantic"))


@dataclasses.dataclass
class NewItemRows:
    """The rows new items get in a CTR model's per-item tables; row ``i`` is ``tokens[i]``.

    Attributes:
        tokens: list of str, the new item tokens (ids ``V + i`` in the extended model).
        embedding: `(n, d)` float32 ID embedding rows.
        bias: `(n,)` float32 wide item bias (a logit; unused without a wide part).
        sids: `(n, L)` int32 semantic IDs (`NO_SID` = none), `(n, 0)` without SIDs.
        genres: `(n, G)` int32 genre ids (0 = none), `(n, 0)` when the model reads none.
        semantic: `(n, ds)` float32 pooled text vectors, `(n, 0)` when the model reads none.
        init_level: `(n,)` int32 SID prefix length the ID row and bias were averaged over
            (0 = catalogue mean / global prior, -1 = the ``zero`` init).
        base: sha256 of the trained ``model.keras`` the rows extend ("" = unknown).
        init: the init option that gave `embedding` and `bias`.
    """

    tokens: list
    embedding: np.ndarray
    bias: np.ndarray
    sids: np.ndarray
    genres: np.ndarray
    semantic: np.ndarray
    init_level: np.ndarray
    base: str = ""
    init: str = "sid_neighbours"

    ARRAYS = ("embedding", "bias", "sids", "genres", "semantic", "init_level")

    def __post_init__(self):
        self.tokens = [str(t) for t in self.tokens]
        n = len(self.tokens)
        for name in self.ARRAYS:
            value = np.asarray(getattr(self, name))
            if len(value) != n:
                raise ValueError(f"new item rows: {name} has {len(value)} rows for {n} tokens")
            setattr(self, name, value)

    def __len__(self) -> int:
        return len(self.tokens)

    def concat(self, other: "NewItemRows") -> "NewItemRows":
        """These rows, then `other`'s (same base model, same table widths)."""
        if other.base != self.base:
            raise ValueError("new item rows of two different trained models cannot be joined")
        arrays = {}
        for name in self.ARRAYS:
            a, b = getattr(self, name), getattr(other, name)
            if a.shape[1:] != b.shape[1:]:
                raise ValueError(f"new item rows: {name} widths differ ({a.shape[1:]} vs {b.shape[1:]})")
            arrays[name] = np.concatenate([a, b])
        return NewItemRows(self.tokens + other.tokens, base=self.base, init=other.init, **arrays)

    def save(self, path) -> None:
        np.savez(path, tokens=np.array(self.tokens, dtype=str), base=np.array(self.base), init=np.array(self.init),
                 **{name: getattr(self, name) for name in self.ARRAYS})

    @classmethod
    def load(cls, path) -> "NewItemRows":
        with np.load(path, allow_pickle=False) as data:
            return cls(data["tokens"].tolist(), base=str(data["base"]), init=str(data["init"]),
                       **{name: data[name] for name in cls.ARRAYS})

    def describe(self) -> dict:
        """What ``export_metadata.json`` records of the rows (JSON-able)."""
        levels, counts = np.unique(self.init_level, return_counts=True)
        return {"items": len(self), "base_model_sha256": self.base, "init": self.init,
                "init_levels": {str(int(level)): int(count) for level, count in zip(levels, counts)},
                "with_sids": int((self.sids[:, 0] >= 0).sum()) if self.sids.shape[1] else 0,
                "file": f"assets.extra/{NEW_ITEMS_FILE}"}


def initial_rows(model, trained_codes, new_codes, init: str = "sid_neighbours", levels: Optional[int] = None):
    """`(embedding (n, d), bias (n,), init_level (n,))` of new items (see the module doc, ours).

    Args:
        model: the trained CTR model (its ``item_encoder`` table and ``wide`` part, when it has them).
        trained_codes: `(V, L')` int SIDs of its items (row = id; negative = none), or None.
        new_codes: `(n, L')` int SIDs of the new items (`NO_SID` = none).
        init: ``"sid_neighbours"`` (default) or ``"zero"``.
        levels: SID levels the neighbours may share (default all; a de-duplication level is left out
            by passing the quantizer's level count).
    """
    if init not in INITS:
        raise ValueError(f"new item init must be one of {list(INITS)}, got {init!r}")
    from keras import ops

    new_codes = np.asarray(new_codes)
    n = len(new_codes)
    encoder = getattr(model, "item_encoder", None)
    table = (np.asarray(ops.convert_to_numpy(encoder.all_items()), np.float32) if encoder is not None
             else np.zeros((model.vocab_size, 0), np.float32))[NUM_RESERVED:]
    wide = getattr(model, "wide", None)
    biases = np.asarray(ops.convert_to_numpy(wide.item_bias), np.float32)[NUM_RESERVED:] if wide is not None else None
    prior = float(np.log(wide.global_rate / (1.0 - wide.global_rate))) if wide is not None else 0.0
    if init == "zero":
        return (np.zeros((n, table.shape[1]), np.float32), np.full(n, prior, np.float32),
                np.full(n, -1, np.int32))
    embedding = np.repeat(table.mean(axis=0, keepdims=True), n, axis=0)
    bias = np.full(n, prior, np.float32)
    level = np.zeros(n, np.int32)
    if trained_codes is not None and new_codes.ndim == 2 and new_codes.shape[1]:
        known = np.asarray(trained_codes)[NUM_RESERVED:]
        depth = min(levels or new_codes.shape[1], new_codes.shape[1])
        for i, code in enumerate(new_codes):
            for prefix in range(depth, 0, -1):
                if (code[:prefix] < 0).any():
                    continue
                match = (known[:, :prefix] == code[:prefix]).all(axis=1)
                if match.any():
                    embedding[i] = table[match].mean(axis=0)
                    if biases is not None:
                        bias[i] = biases[match].mean()
                    level[i] = prefix
                    break
    return embedding.astype(np.float32), bias.astype(np.float32), level


def _resized(value, old: int, new: int):
    """A model config with every per-item size `old` -> `new` (``vocab_size`` and ``{"shape": [old, ...]}``)."""
    if isinstance(value, dict):
        if set(value) == {"shape"} and list(value["shape"])[:1] == [old]:
            return {"shape": [new, *list(value["shape"])[1:]]}
        return {k: (new if k == "vocab_size" and v == old else _resized(v, old, new)) for k, v in value.items()}
    if isinstance(value, list):
        return [_resized(v, old, new) for v in value]
    return value


def extend_ctr_model(model, rows: NewItemRows):
    """A copy of the trained CTR `model` with ``len(rows)`` more item ids: every weight copied, the
    per-item tables (`ITEM_TABLES`) extended with `rows` (ids ``V ..``). ``ValueError`` naming a weight
    it cannot extend or rows of the wrong width. The trained model is left as it was."""
    import keras

    old_size, size = int(model.vocab_size), int(model.vocab_size) + len(rows)
    if not len(rows):
        raise ValueError("no new items")
    fresh = type(model).from_config(_resized(model.get_config(), old_size, size))
    fresh({"history_ids": np.full((1, 1), NUM_RESERVED, "int32"), "target_id": np.full((1,), NUM_RESERVED, "int32")})
    old_weights, new_weights = list(model.weights), list(fresh.weights)
    if [w.name for w in old_weights] != [w.name for w in new_weights]:
        raise ValueError(f"cannot extend the {type(model).__name__}: rebuilt with more ids it has other weights "
                         f"({len(new_weights)} against {len(old_weights)})")
    for old, new in zip(old_weights, new_weights):
        value = np.asarray(keras.ops.convert_to_numpy(old))
        if tuple(old.shape) == tuple(new.shape):
            new.assign(value)
            continue
        field = next((f for suffix, f in ITEM_TABLES if old.path.endswith(suffix)), None)
        if field is None or old.shape[0] != old_size or tuple(new.shape) != (size, *old.shape[1:]):
            raise ValueError(f"cannot extend weight {old.path} {tuple(old.shape)}: not a per-item table tfrec knows")
        extra = np.asarray(getattr(rows, field))
        if extra.shape != (len(rows), *old.shape[1:]):
            raise ValueError(f"the new items' {field} rows are {extra.shape}; {old.path} needs "
                             f"{(len(rows), *old.shape[1:])}")
        new.assign(np.concatenate([value, extra.astype(value.dtype)]))
    return fresh


def file_sha256(path) -> str:
    """sha256 of a file's bytes (hex): which trained model new item rows extend."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RankerRun:
    """A trained ``tfrec ctr train`` run, read to give new items rows in its ranker (see the module doc).

    Args:
        run: the run folder (``model.keras``, ``item_vocab.txt``, ``results.json``; ``sids/`` for R2LED)
            or its ``model.keras``.
        store: optional semantic store (version folder or versions root); default the one the run
            recorded (``results.json`` ``semantics.store``), else its config's ``sids.store_path``.
        data: optional `LifelongData` of the run's config (loaded when needed: the genre vocabulary,
            the users a wide part reads).

    Attributes:
        model, item_vocab, config (`CTRConfig`), sids / quantizer (or None), store (or None),
        fingerprint (sha256 of ``model.keras``), data_fingerprint.

    Example (a run of ``tfrec ctr train``):
    >>> run = RankerRun("runs/r2led-ml1m")  # doctest: +SKIP
    >>> new = [{"item_id": "4000", "title": "Heat (1995)", "genres": "Action|Crime|Thriller"}]
    >>> rows = run.new_item_rows(new, init="sid_neighbours")  # doctest: +SKIP
    >>> model, vocab = run.extended(rows)  # doctest: +SKIP
    """

    def __init__(self, run, store=None, data=None):
        import keras

        from tfrec.ctr.config import ctr_config_from_dict
        from tfrec.ctr.models import load_ctr_model
        from tfrec.data.preprocess import ITEM_VOCAB_FILE
        from tfrec.data.vocab import Vocabulary
        from tfrec.runs import recorded_data_fingerprint
        from tfrec.semantics.sids import SIDS_FOLDER, load_sids

        path = Path(run)
        model_path = path / "model.keras" if path.is_dir() else path
        if not model_path.is_file():
            raise FileNotFoundError(f"no trained CTR model at {model_path} (give a `tfrec ctr train` run folder "
                                    "or its model.keras)")
        folder = model_path.parent
        try:
            results = json.loads((folder / "results.json").read_text())
            recorded = results["config"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"{folder / 'results.json'} is missing or records no config: the ranker run's config "
                             "is needed (a `tfrec ctr train` run folder)") from None
        self.config = ctr_config_from_dict(recorded)
        self.model, _ = load_ctr_model(self.config, model_path)
        if not hasattr(self.model, "vocab_size"):
            raise ValueError(f"{model_path} is not a CTR model")
        vocab_path = folder / ITEM_VOCAB_FILE
        if not vocab_path.is_file():
            raise FileNotFoundError(f"{vocab_path} is missing: the ranker's item vocabulary is needed")
        self.item_vocab = Vocabulary.load(vocab_path)
        if self.item_vocab.size != self.model.vocab_size:
            raise ValueError(f"{vocab_path} has {self.item_vocab.size} ids, the model {self.model.vocab_size}")
        self.fingerprint = file_sha256(model_path)
        self.data_fingerprint = recorded_data_fingerprint(folder)
        self._data = data
        sids_table = getattr(self.model, "item_sids", None)
        self.model_sids = None if sids_table is None else np.asarray(keras.ops.convert_to_numpy(sids_table))
        self.reads_semantic = getattr(self.model, "item_semantic", None) is not None
        wide = getattr(self.model, "wide", None)
        self.genre_width = next((int(t.shape[1]) for t in (getattr(wide, "item_genres", None),
                                                             getattr(self.model, "item_genres", None))
                                 if t is not None), 0)
        sids_dir = folder / SIDS_FOLDER
        if self.model_sids is not None and not sids_dir.is_dir():
            raise FileNotFoundError(f"{sids_dir} is missing: the run's fitted quantizer gives new items their "
                                    "semantic IDs")
        self.store = self.sids = self.quantizer = None
        if sids_dir.is_dir() or self.reads_semantic:
            from tfrec.ctr.semantics import load_store_for

            where = store or (results.get("semantics") or {}).get("store") or self.config.sids.store_path
            self.store = load_store_for(where, self.item_vocab)
        if sids_dir.is_dir():
            self.sids = load_sids(sids_dir, expected_fingerprint=self.store.fingerprint)
            if self.model_sids is not None and not np.array_equal(self.sids.codes, self.model_sids):
                raise ValueError(f"{sids_dir} holds other codes than the model's item_sids: not this run's SIDs")
            self.quantizer = self.sids.load_quantizer()

    @property
    def data(self):
        """The run's `LifelongData` (`load_ctr_data` of its config), loaded on first use."""
        if self._data is None:
            from tfrec.ctr.data import load_ctr_data

            self._data = load_ctr_data(self.config.data)
        return self._data

    def users(self):
        """`(users, user_profiles)` the ranker export needs (`tfrec.ctr.models.model_users`)."""
        from tfrec.ctr.models import model_users

        return model_users(self.model, lambda: self.data)

    def new_item_rows(self, rows, init: str = "sid_neighbours") -> NewItemRows:
        """`NewItemRows` of ``rows`` (dicts of str with ``item_id`` and the item table's columns).

        ``ValueError`` naming the problem: a token the ranker already has, a column the model reads
        missing, no text for the SIDs' store view, an unknown ``init``."""
        from tfrec.semantics.sids import new_item_sids, sids_view

        if init not in INITS:
            raise ValueError(f"new item init must be one of {list(INITS)}, got {init!r}")
        rows = list(rows)
        if not rows:
            raise ValueError("no new items")
        tokens = [str(row["item_id"]) for row in rows]
        known = [t for t in tokens if int(self.item_vocab.lookup(t)) >= NUM_RESERVED]
        if known:
            raise ValueError(f"{len(known)} item(s) already in the ranker's vocabulary, e.g. {known[:3]}: a trained "
                             "item's rows are never changed by adding items")
        n = len(rows)
        pooled = np.zeros((n, 0), np.float32)
        codes = np.zeros((n, 0), np.int32)
        if self.store is not None:
            from tfrec.semantics.new_items import StoreTextEncoder

            view = sids_view(self.sids) if self.sids is not None else self.config.sids.view
            text = StoreTextEncoder(self.store)
            pooled, valid = text.pooled(rows, view)
            if not valid.all():
                empty = [tokens[i] for i in np.flatnonzero(~valid)]
                raise ValueError(f"{len(empty)} new item(s) have no text for the store view {view!r} (columns "
                                 f"{text.columns(view)}), e.g. {empty[:3]}: the ranker places new items by their "
                                 "text")
            if self.sids is not None:
                codes = new_item_sids(self.sids, self.quantizer, pooled, valid)
        levels = int(self.sids.metadata["num_levels"]) if self.sids is not None else None
        trained = self.sids.codes if self.sids is not None else None
        embedding, bias, level = initial_rows(self.model, trained, codes, init, levels)
        return NewItemRows(tokens, embedding, bias, codes if self.model_sids is not None else codes[:, :0],
                           self.genre_ids(rows), pooled if self.reads_semantic else pooled[:, :0], level,
                           base=self.fingerprint, init=init)

    def genre_ids(self, rows) -> np.ndarray:
        """`(n, G)` int32 genre ids of ``rows`` in the training genre vocabulary (`(n, 0)` when the model
        reads none): unknown genres dropped, the first ``G`` kept (ours)."""
        import pandas as pd

        from tfrec.data.lifelong import GENRE_COLUMNS, item_genre_lists

        ids = np.zeros((len(rows), self.genre_width), np.int32)
        if not self.genre_width:
            return ids
        frame = pd.DataFrame(list(rows)).fillna("")
        if not any(column in frame.columns for column, _ in GENRE_COLUMNS):
            raise ValueError(f"the model reads item genres: the new items need a column "
                             f"{' or '.join(c for c, _ in GENRE_COLUMNS)} (columns: {list(frame.columns)})")
        vocab = self.data.genre_vocab
        for row, genres in enumerate(item_genre_lists(frame)):
            known = [int(i) for i in (vocab.lookup(genres).tolist() if genres else []) if i >= NUM_RESERVED]
            ids[row, :len(known[:self.genre_width])] = known[:self.genre_width]
        return ids

    def extended(self, rows: NewItemRows):
        """`(model, item_vocab)` with `rows` after the trained items (`extend_ctr_model`)."""
        from tfrec.data.vocab import Vocabulary

        if rows.base and rows.base != self.fingerprint:
            raise ValueError("these new item rows were computed for another trained model")
        return extend_ctr_model(self.model, rows), Vocabulary(list(self.item_vocab.tokens) + rows.tokens)

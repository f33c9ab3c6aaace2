"""Lifelong-sequence CTR models: one shared skeleton, baselines that differ only in
which behaviours reach the target attention.

`CTRModel` is the skeleton every CTR model here shares (R2LED included): item ID
embedding -> user interest from the history (the part subclasses define) ->
MLP over `[target, interest, target * interest]` -> sigmoid, trained with log
loss (`compile()` defaults to `binary_crossentropy`).

Inputs: `{"history_ids": (batch, seq) int, "target_id": (batch,) int}`,
right-padded with 0 (0 = padding, 1 = OOV), plus the optional feedback of every
behaviour (`history_labels`, `history_ratings`, `history_gaps`, `(batch, seq)`)
and the user (`user_id (batch,)`, `user_profile (batch, P)`); the label is
`(batch,)` 0/1, as `tfrec.data.lifelong.lifelong_dataset` yields them. Each
behaviour the attention reads is its item embedding plus its feedback and
time-gap embeddings (`feedback=True`); the optional wide part
(`tfrec.models.ctr_wide.WidePart`) adds a logistic-regression logit. `predict`
returns click probabilities `(batch,)`. `score(history_ids, candidate_ids,
**feedback)` scores several candidates per history at once: the inference
function export wraps.

`TargetAttentionCTR` is the baselines' model; `selector` picks the behaviours
(every selector keeps `top_k`, ties -> more recent, padding never selected):

| preset | selector | behaviours kept | attention |
| --- | --- | --- | --- |
| `din` | `"recent"` | the last `top_k` behaviours | `"mlp"` (DIN activation unit) |
| `sim-hard` | `"genre"` | most recent behaviours sharing a genre with the target (`item_genres`) | `"dot"` |
| `sim-soft` | `"semantic"` | highest inner product of frozen semantic vectors (`item_semantic`) | `"dot"` |
| `eta` | `"simhash"` | fewest differing SimHash bits of the current item embeddings (fixed random hyperplanes, `simhash_bits`) | `"dot"` |
| `twin` | `"attention"` | highest logits of the model's own target attention (keys projected once for the item table, as TWIN's pre-computed projections) | `"dot"` |
| `full` | `"full"` | every behaviour (cost and quality reference) | `"dot"` |

Static item tables (`item_genres (V, G)`, `item_semantic (V, d)`, R2LED's
`item_sids (V, L)`) are non-trainable weights: they are saved with the weights
and `get_config` records only their shape (`{"shape": [V, ...]}`), which the
constructor also accepts when the values will come from a weights file.

References: DIN (Zhou et al., KDD 2018), SIM (Pi et al., CIKM 2020), ETA (Chen et
al., 2021), TWIN (Chang et al., KDD 2023).
"""

import keras
import numpy as np
from keras import ops

from tfrec.layers.item_encoder import IdItemEncoder
from tfrec.layers.multi_route_retrieval import behaviour_scores, l2_normalize, recency_top_k, take_rows
from tfrec.data.lifelong import GAP_BUCKETS
from tfrec.layers.target_attention import TargetAttention
from tfrec.metrics import auc, gauc, logloss
from tfrec.models.ctr_wide import (  # noqa: F401  (score_candidates, the feature names: re-exported)
    FEEDBACK_VOCAB, HISTORY_FEATURES, USER_FEATURES, WidePart, check_ids, feedback_tokens, score_candidates,
)

SELECTORS = ("recent", "genre", "semantic", "simhash", "attention", "full")
CTR_BASELINES = {
    "din": {"selector": "recent", "attention_form": "mlp"},
    "sim-hard": {"selector": "genre"},
    "sim-soft": {"selector": "semantic"},
    "eta": {"selector": "simhash"},
    "twin": {"selector": "attention"},
    "full": {"selector": "full"},
}


def table_argument(value, name, vocab_size, dtype, ndim=2):
    """`(values or None, shape)` of a static item table given as an array or `{"shape": [...]}`."""
    if value is None:
        return None, None
    if isinstance(value, dict):
        if set(value) != {"shape"}:
            raise ValueError(f"{name} given as a dict must be {{'shape': [...]}}, got keys {sorted(value)}.")
        shape = tuple(int(s) for s in value["shape"])
        values = None
    else:
        values = np.asarray(value)
        if values.dtype == object or not np.issubdtype(values.dtype, np.number):
            raise ValueError(f"{name} must be a numeric array, got dtype {values.dtype}.")
        values = values.astype(dtype)
        shape = values.shape
    if len(shape) != ndim or shape[0] != vocab_size:
        raise ValueError(f"{name} must have shape ({vocab_size}, ...) with {ndim} dims "
                         f"(one row per item id), got {shape}.")
    return values, shape


class ServingTables:
    """What a trained CTR model computes once for serving (`CTRModel.materialize`): named
    tensors (attributes and `in`/`[]` access); a plain object, so Keras does not track it."""

    def __init__(self, tables):
        self._tables = dict(tables)

    def __contains__(self, key):
        return key in self._tables

    def __getitem__(self, key):
        return self._tables[key]

    def names(self):
        return sorted(self._tables)


def repeat_rows(features, times):
    """Every `(B, ...)` feature repeated `times` along axis 0 (row `b` -> rows `b * times ...`)."""
    return {k: ops.repeat(v, times, axis=0) for k, v in features.items()}


@keras.saving.register_keras_serializable(package="tfrec")
class CTRModel(keras.Model):
    """Skeleton of the lifelong CTR models (see module doc); subclasses define `user_interest`.

    Args:
        vocab_size: int. Item ids including padding (0) and OOV (1).
        embedding_dim: int. Item embedding size. Defaults to 32.
        mlp_units: tuple of int. Hidden layers of the prediction MLP. Defaults to (64, 32).
        dropout: float. Dropout in the MLP. Defaults to 0.
        wide: dict or None. `tfrec.models.ctr_wide.WidePart` arguments: adds the
            wide logit and feeds its side features to the MLP; the MLP's output
            projection then starts at zero (an untrained model scores the wide
            part's item prior). None (default): no wide part.
        feedback: bool. Each behaviour enters as its item embedding plus an
            embedding of its feedback token (`ctr_wide.feedback_tokens`) and of
            its time-gap bucket (`tfrec.data.lifelong.gap_bucket`). Defaults to True.
        split_feedback: bool. Compute the interest separately over the clicked
            and the not-clicked behaviours and concatenate both (needs
            `history_labels`; without them every behaviour counts as not
            clicked). Defaults to False (ours; the paper has one sequence).
    """

    def __init__(self, vocab_size, embedding_dim=32, mlp_units=(64, 32), dropout=0.0, wide=None, feedback=True,
                 split_feedback=False, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        if any(int(u) < 1 for u in mlp_units):
            raise ValueError(f"mlp_units must be positive ints, got {mlp_units}.")
        self.vocab_size = int(vocab_size)
        self.embedding_dim = int(embedding_dim)
        self.mlp_units = tuple(int(u) for u in mlp_units)
        self.dropout = float(dropout)
        self.feedback = bool(feedback)
        self.split_feedback = bool(split_feedback)
        self.item_encoder = IdItemEncoder(self.vocab_size, self.embedding_dim, name="item_encoder")
        self.mlp = [keras.layers.Dense(u, activation="relu", name=f"mlp_{i}") for i, u in enumerate(self.mlp_units)]
        self.mlp_dropout = keras.layers.Dropout(self.dropout)
        self.wide = None
        if wide:
            self.wide = WidePart(**wide, name="wide")
            if self.wide.vocab_size != self.vocab_size:
                raise ValueError(f"wide item_prior has {self.wide.vocab_size} rows for vocab_size {self.vocab_size}.")
        self._tables = None  # ServingTables once materialised (`materialize`)
        zero = {"kernel_initializer": "zeros", "bias_initializer": "zeros"} if wide else {}
        self.logit = keras.layers.Dense(1, name="logit", **zero)
        if self.feedback:
            self.feedback_embedding = keras.layers.Embedding(FEEDBACK_VOCAB, self.embedding_dim,
                                                             name="feedback_embedding")
            self.gap_embedding = keras.layers.Embedding(GAP_BUCKETS, self.embedding_dim, name="gap_embedding")

    def _static_table(self, name, values, shape, dtype):
        weight = self.add_weight(shape=shape, dtype=dtype, initializer="zeros", trainable=False, name=name)
        if values is not None:
            weight.assign(values)
        return weight

    def compile(self, optimizer="adam", loss="binary_crossentropy", **kwargs):
        """`keras.Model.compile` with log loss as the default loss."""
        super().compile(optimizer=optimizer, loss=loss, **kwargs)

    def compile_from_config(self, config):  # what keras does for a non-overridden compile
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    # --- serving precomputation --------------------------------------------
    def materialize(self):
        """Compute once what no request changes and use it in inference calls; returns `self`.

        What is precomputed is model-specific (`precompute`): e.g. projected
        item tables of the target attention, the fused item table, the
        normalised retrieval table. Inference calls (`training=False`, `score`)
        then gather rows instead of recomputing them; outputs equal the
        training path's up to float rounding (`tests/test_ctr_materialize.py`
        checks 1e-5). Training calls never use the tables, and `fit` drops
        them (they would go stale): call `materialize()` again after training.
        Models with nothing to precompute (DIN's MLP attention) stay as they are.

        Example:
        >>> import numpy as np
        >>> model = TargetAttentionCTR(vocab_size=20, embedding_dim=8, selector="full")
        >>> x = {"history_ids": np.array([[2, 3, 4, 0]]), "target_id": np.array([5])}
        >>> before = model.predict(x, verbose=0)
        >>> bool(np.allclose(model.materialize().predict(x, verbose=0), before, atol=1e-5))
        True
        >>> model.materialized
        True
        """
        if not self.built:
            raise ValueError("materialize() needs a built model: call it on a batch (or load a trained one) first.")
        self.dematerialize()
        tables = self.precompute()
        self._tables = ServingTables(tables) if tables else None
        if self.wide is not None:
            self.wide.materialize()
        return self

    def dematerialize(self):
        """Drop the serving tables (inference recomputes everything again)."""
        self._tables = None
        if self.wide is not None:
            self.wide.dematerialize()
        return self

    @property
    def materialized(self):
        return self._tables is not None

    def precompute(self):
        """`{name: tensor}` of what no request changes (subclasses add theirs; base: the
        combined feedback x time-gap embedding table, `context (FEEDBACK_VOCAB * GAP_BUCKETS, d)`)."""
        if not self.feedback:
            return {}
        feedback = ops.convert_to_tensor(self.feedback_embedding.embeddings)  # (F, d)
        gaps = ops.convert_to_tensor(self.gap_embedding.embeddings)  # (G, d)
        combined = feedback[:, None, :] + gaps[None, :, :]  # (F, G, d); token = f * G + g
        return {"context": ops.reshape(combined, (FEEDBACK_VOCAB * GAP_BUCKETS, self.embedding_dim))}

    def serving_tables(self, training=False):
        """The `ServingTables` an inference call uses, None in training or before `materialize`."""
        return None if training else self._tables

    def fit(self, *args, **kwargs):
        self.dematerialize()  # training changes the weights the tables were computed from
        return super().fit(*args, **kwargs)

    # --- forward ---------------------------------------------------------
    def user_interest(self, history_ids, target_ids, training=False, context=None):
        """`(target_vector (B, d), interest (B, d'))` for `history_ids (B, H)`, `target_ids (B,)`;
        `context`: optional `(B, H, d)` feedback/gap embedding of each behaviour, added to
        the embeddings of the behaviours the model attends; when materialised and not
        training, the request's feature dict instead, whose `context_rows` the model reads
        for the behaviours it attends only."""
        raise NotImplementedError

    def context_rows(self, features, positions=None):
        """`(B, n)` int32 rows of the served `context` table (`behaviour_context(as_tokens=True)`)
        of the behaviours at `positions (B, n)` of the history (None: all `H`). The feedback
        features of those behaviours are gathered first, so a model attending `k` of `H`
        behaviours computes `k` tokens, not `H` (tokens are per behaviour: same rows)."""
        if positions is not None:
            features = {key: take_rows(features[key], positions) for key in ("history_ids", *HISTORY_FEATURES)
                        if features.get(key) is not None}
        return self.behaviour_context(features, as_tokens=True)

    def behaviour_context(self, features, as_tokens=False):
        """`(B, H, d)` feedback + time-gap embedding of each behaviour, or None (`feedback=False`).

        `as_tokens`: the `(B, H)` int32 row of each behaviour in the combined
        `context` table instead (`feedback token * GAP_BUCKETS + gap bucket`)."""
        if not self.feedback:
            return None
        history_ids = features["history_ids"]
        tokens = feedback_tokens(history_ids, features.get("history_labels"), features.get("history_ratings"))
        gaps = features.get("history_gaps")
        gaps = ops.zeros_like(history_ids) if gaps is None else ops.clip(ops.cast(gaps, "int32"), 0, GAP_BUCKETS - 1)
        if as_tokens:
            return tokens * GAP_BUCKETS + gaps
        return self.feedback_embedding(tokens) + self.gap_embedding(gaps)

    def _unpack(self, inputs):
        if not isinstance(inputs, dict):
            raise ValueError(f"inputs must be a dict with 'history_ids' and 'target_id', got {type(inputs).__name__}.")
        missing = [k for k in ("history_ids", "target_id") if k not in inputs]
        if missing:
            raise KeyError(f"inputs lack {missing}; got keys {sorted(inputs)}.")
        history_ids = ops.cast(inputs["history_ids"], "int32")
        target_ids = ops.cast(inputs["target_id"], "int32")
        if len(history_ids.shape) != 2:
            raise ValueError(f"history_ids must be (batch, seq), got shape {history_ids.shape}.")
        if len(target_ids.shape) == 2 and target_ids.shape[1] == 1:
            target_ids = target_ids[:, 0]
        if len(target_ids.shape) != 1:
            raise ValueError(f"target_id must be (batch,) or (batch, 1), got shape {target_ids.shape}.")
        features = {k: inputs[k] for k in HISTORY_FEATURES + USER_FEATURES if inputs.get(k) is not None}
        return {**features, "history_ids": history_ids, "target_id": target_ids}

    def call(self, inputs, training=False):
        return self._probabilities(self._unpack(inputs), training=training)

    def _probabilities(self, features, training=False, **interest_kwargs):
        """Click probabilities `(B,)` of a feature dict (int32 `history_ids (B, H)`, `target_id (B,)`, ...)."""
        history_ids, target_ids = features["history_ids"], features["target_id"]
        # served (materialised): the models read rows of the combined context table (`context_rows`)
        if self.serving_tables(training) is None:
            context = self.behaviour_context(features)
        else:
            context = features if self.feedback else None
        if self.split_feedback:
            labels = features.get("history_labels")
            liked = (ops.cast(labels, "float32") > 0.5) if labels is not None else ops.zeros_like(history_ids) > 0
            views = [ops.where(liked, history_ids, 0), ops.where(liked, 0, history_ids)]
        else:
            views = [history_ids]
        parts = []
        for ids in views:
            target, interest = self.user_interest(ids, target_ids, training=training, context=context,
                                                  **interest_kwargs)
            parts += [interest, target * interest] if interest.shape[-1] == target.shape[-1] else [interest]
        parts.insert(0, target)
        wide_logit = 0.0
        if self.wide is not None:
            wide_logit, side = self.wide(features)
            parts.append(side)
        h = ops.concatenate(parts, axis=-1)
        for dense in self.mlp:
            h = self.mlp_dropout(dense(h), training=training)
        return ops.sigmoid(self.logit(h)[:, 0] + wide_logit)  # (B,)

    def score(self, history_ids, candidate_ids, **features):
        """Click probabilities `(B, C)` of `C` candidates per history.

        Args:
            history_ids: int `(B, H)`, right-padded with 0.
            candidate_ids: int `(B, C)` (or `(B,)` for one candidate each).
            **features: optional feedback beside the history, `history_labels`,
                `history_ratings`, `history_gaps` `(B, H)`, and `user_id (B,)`,
                `user_profile (B, P)` (absent = unknown).

        Traceable (export wraps it in a `tf.function`); numpy inputs are
        checked first: ids outside `[0, vocab_size)` raise `ValueError`.
        """
        return score_candidates(self, history_ids, candidate_ids, features)

    def _candidate_probabilities(self, features, candidate_ids):
        """Probabilities `(B * C,)` of each row's candidates: every candidate with its row's history.

        Subclasses may override it to compute what depends on the history only
        once per row instead of once per candidate (see `R2LED`).
        """
        repeated = repeat_rows(features, ops.shape(candidate_ids)[1])  # (B * C, ...)
        return self._probabilities({**repeated, "target_id": ops.reshape(candidate_ids, (-1,))})

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocab_size": self.vocab_size,
                "embedding_dim": self.embedding_dim,
                "mlp_units": list(self.mlp_units),
                "dropout": self.dropout,
                "wide": ({k: v for k, v in self.wide.get_config().items() if k not in ("name", "trainable", "dtype")}
                         if self.wide is not None else None),
                "feedback": self.feedback,
                "split_feedback": self.split_feedback,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="tfrec")
class TargetAttentionCTR(CTRModel):
    """A CTR baseline: select behaviours, then target attention over them.

    Args:
        vocab_size, embedding_dim, mlp_units, dropout, wide, feedback, split_feedback: see `CTRModel`.
        selector: str. One of `SELECTORS` (see module doc). Defaults to `"recent"`.
        top_k: int. Behaviours kept by the selector (ignored by `"full"`). Defaults to 64.
        attention_form: str. `"dot"` (default) or `"mlp"` (see `TargetAttention`).
        num_heads: int. Heads of the `"dot"` attention. Defaults to 2.
        item_genres: int `(V, G)` genre ids (0 = none), needed by `"genre"`.
        item_semantic: float `(V, d_s)` frozen semantic vectors, needed by `"semantic"`.
        simhash_bits: int. Signature length of `"simhash"`. Defaults to 32.
        seed: int. Seed of the SimHash hyperplanes. Defaults to 0.

    Example:
    >>> model = TargetAttentionCTR(vocab_size=20, embedding_dim=8, selector="recent", top_k=4)
    >>> model.compile()
    >>> x = {"history_ids": np.array([[2, 3, 4, 0]]), "target_id": np.array([5])}
    >>> model.predict(x, verbose=0).shape
    (1,)
    """

    def __init__(self, vocab_size, embedding_dim=32, mlp_units=(64, 32), dropout=0.0, selector="recent", top_k=64,
                 attention_form="dot", num_heads=2, item_genres=None, item_semantic=None, simhash_bits=32, seed=0,
                 **kwargs):
        super().__init__(vocab_size, embedding_dim, mlp_units, dropout, **kwargs)
        if selector not in SELECTORS:
            raise ValueError(f"selector must be one of {SELECTORS}, got {selector!r}.")
        if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}.")
        if selector == "attention" and attention_form != "dot":
            raise ValueError("selector='attention' (TWIN) needs attention_form='dot'.")
        if int(simhash_bits) < 1:
            raise ValueError(f"simhash_bits must be positive, got {simhash_bits}.")
        self.selector = selector
        self.top_k = int(top_k)
        self.attention_form = attention_form
        self.num_heads = int(num_heads)
        self.simhash_bits = int(simhash_bits)
        self.seed = int(seed)
        genres, self.genres_shape = table_argument(item_genres, "item_genres", self.vocab_size, "int32")
        semantic, self.semantic_shape = table_argument(item_semantic, "item_semantic", self.vocab_size, "float32")
        needs = {"genre": ("item_genres", self.genres_shape), "semantic": ("item_semantic", self.semantic_shape)}
        if selector in needs and needs[selector][1] is None:
            raise ValueError(f"selector={selector!r} needs {needs[selector][0]}=.")
        self.item_genres = self._static_table("item_genres", genres, self.genres_shape, "int32") \
            if self.genres_shape else None
        self.item_semantic = self._static_table("item_semantic", semantic, self.semantic_shape, "float32") \
            if self.semantic_shape else None
        self.simhash_planes = None
        if selector == "simhash":
            planes = np.random.default_rng(self.seed).standard_normal((self.embedding_dim, self.simhash_bits))
            self.simhash_planes = self._static_table("simhash_planes", planes.astype("float32"),
                                                     planes.shape, "float32")
        self.attention = TargetAttention(form=attention_form, num_heads=num_heads, name="target_attention")

    def precompute(self):
        """Besides the context table: the target attention's projections of the item table
        (`query`, `key_value`; `"dot"` form; TWIN's selection reads the same keys, as `keys
        (V, dk)`, and scores them as R2LED its similarities, `behaviour_scores`) and ETA's
        SimHash signatures (`signs (V, bits)`). DIN (`"mlp"` form) has none."""
        tables = super().precompute()
        items = self.item_encoder.all_items()  # (V, d)
        if self.attention_form != "dot":
            return {}
        if self.selector == "simhash":
            tables["signs"] = ops.sign(ops.matmul(items, self.simhash_planes))
        contexts = tables.get("context")
        tables.update(self.attention.projection_tables(items, contexts))
        if self.selector == "attention":  # TWIN's selection: every item's keys, heads side by side (V, dk)
            tables["keys"] = ops.reshape(tables["key_value"][:, 0], (-1, self.attention.key_dim))
        if contexts is None:
            tables.pop("context", None)
        return tables

    def select(self, history_ids, target_ids, tables=None):
        """`(indices, mask)` `(B, k)` of the selected behaviours (`"full"`: all, `(B, H)`)."""
        valid = history_ids > 0  # (B, H)
        if self.selector == "full":
            return ops.broadcast_to(ops.arange(ops.shape(history_ids)[1], dtype="int32")[None],
                                    ops.shape(history_ids)), valid
        if self.selector == "recent":
            scores = ops.zeros(ops.shape(history_ids), "float32")  # ties -> most recent
        elif self.selector == "genre":
            hist = ops.take(self.item_genres, history_ids, axis=0)[..., :, None]  # (B, H, G, 1)
            target = ops.take(self.item_genres, target_ids, axis=0)[:, None, None, :]  # (B, 1, 1, G)
            shared = ops.any((hist == target) & (hist > 0), axis=(-2, -1))  # (B, H)
            valid = valid & shared
            scores = ops.zeros(ops.shape(history_ids), "float32")
        elif self.selector == "semantic":
            hist = ops.take(self.item_semantic, history_ids, axis=0)  # (B, H, ds)
            target = ops.take(self.item_semantic, target_ids, axis=0)  # (B, ds)
            scores = ops.einsum("bhd,bd->bh", hist, target)
        elif self.selector == "simhash":
            if tables is not None:
                signs = tables["signs"]
            else:
                table = ops.stop_gradient(self.item_encoder.all_items())  # (V, d)
                signs = ops.sign(ops.matmul(table, self.simhash_planes))  # (V, bits), +-1 (0 if on a plane)
            # bits agreeing - differing (integers: the same sums through the catalogue or per behaviour)
            scores = behaviour_scores(ops.take(signs, target_ids, axis=0), signs, history_ids)  # (B, H)
        elif tables is not None:  # TWIN served: the precomputed query and key tables, as R2LED's similarity
            query = ops.take(tables["query"], target_ids, axis=0)  # (B, heads, hd)
            query = ops.reshape(query, (-1, self.attention.key_dim))  # mean over heads = flat dot / heads
            scores = behaviour_scores(query, tables["keys"], history_ids) / float(self.num_heads)  # (B, H)
        else:  # "attention": TWIN's consistent target attention, keys projected per item once
            keys = self.attention.project_keys(ops.stop_gradient(self.item_encoder.all_items()))  # (V, h, hd)
            target = self.item_encoder(target_ids)
            scores = self.attention.logits(target, projected_keys=ops.take(keys, history_ids, axis=0))
            scores = ops.stop_gradient(scores)
        return recency_top_k(scores, valid, self.top_k)

    def user_interest(self, history_ids, target_ids, training=False, context=None):
        if not self.attention.built:
            self.attention.build((None, self.embedding_dim), (None, None, self.embedding_dim))
        tables = self.serving_tables(training)
        target = self.item_encoder(target_ids)  # (B, d)
        indices, mask = self.select(history_ids, target_ids, tables)
        selected = history_ids if self.selector == "full" else take_rows(history_ids, indices)
        if tables is not None:  # rows of the projected tables instead of projections per behaviour
            key_value = ops.take(tables["key_value"], selected, axis=0)  # (B, k, 2, heads, hd)
            if context is not None:
                rows = self.context_rows(context, None if self.selector == "full" else indices)  # (B, k)
                key_value = key_value + ops.take(tables["context"], rows, axis=0)
            query = ops.take(tables["query"], target_ids, axis=0)  # (B, heads, hd)
            return target, self.attention.attend_projected(query, key_value, mask)
        behaviours = self.item_encoder(selected)  # (B, k, d)
        if context is not None:
            behaviours = behaviours + (context if self.selector == "full"
                                       else ops.take_along_axis(context, indices[..., None], axis=1))
        return target, self.attention(target, behaviours, mask, training=training)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "selector": self.selector,
                "top_k": self.top_k,
                "attention_form": self.attention_form,
                "num_heads": self.num_heads,
                "item_genres": {"shape": list(self.genres_shape)} if self.genres_shape else None,
                "item_semantic": {"shape": list(self.semantic_shape)} if self.semantic_shape else None,
                "simhash_bits": self.simhash_bits,
                "seed": self.seed,
            }
        )
        return config


def build_ctr_baseline(name, vocab_size, **kwargs):
    """A `TargetAttentionCTR` from a preset name of `CTR_BASELINES` plus overrides.

    >>> build_ctr_baseline("din", vocab_size=20, embedding_dim=8).selector
    'recent'
    """
    if name not in CTR_BASELINES:
        raise ValueError(f"unknown CTR baseline {name!r}; known: {', '.join(CTR_BASELINES)}.")
    return TargetAttentionCTR(vocab_size, **{**CTR_BASELINES[name], **kwargs}, name=name.replace("-", "_"))


def evaluate_ctr(model, dataset, groups=None):
    """AUC, LogLoss (and GAUC when `groups` is given) of `model` on `dataset`.

    Args:
        model: a CTR model (`predict` -> probabilities).
        dataset: `tf.data` of `(features, label)` batches in a fixed order
            (`lifelong_dataset(..., shuffle=False)`).
        groups: optional `(n,)` group of each sample in dataset order (e.g.
            `samples.user`) for GAUC.

    Returns:
        `{"auc", "logloss", "num_samples"[, "gauc"]}`.
    """
    predictions = np.asarray(model.predict(dataset.map(lambda x, y: x), verbose=0), np.float64).reshape(-1)
    labels = np.concatenate([np.asarray(y).reshape(-1) for _, y in dataset])
    if len(labels) != len(predictions):
        raise ValueError(f"dataset gave {len(labels)} labels but {len(predictions)} predictions.")
    out = {"auc": auc(labels, predictions), "logloss": logloss(labels, predictions), "num_samples": len(labels)}
    if groups is not None:
        out["gauc"] = gauc(labels, predictions, np.asarray(groups))
    return out

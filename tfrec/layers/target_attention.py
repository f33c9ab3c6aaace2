"""Target attention: a candidate item attends over a user's behaviours.

The one attention used by every lifelong CTR model here, so that DIN, SIM, ETA,
TWIN, full-history attention and R2LED differ only in *which* behaviours reach
it. Two forms:

- `"dot"`: multi-head scaled dot-product attention, query = the target, keys and
  values = the behaviours, learned projections (the ESU of SIM / ETA / TWIN, the
  route-level cross-attention of R2LED);
- `"mlp"`: DIN's activation unit, an MLP over `[q, k, q - k, q * k]` per
  behaviour giving one logit; the output is the weighted sum of the raw keys.

Masked behaviours get no weight; a row with no valid behaviour returns zeros.
Besides the pooled output, `logits()` returns the per-behaviour attention scores
(mean over heads) so TWIN can retrieve with the very scores the attention uses
("consistent target attention"), and `project_keys()` projects behaviours (or a
whole item table) once so those scores can be computed by a gather and a dot.

References:
- Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018.
- Chang et al., "TWIN: TWo-stage Interest Network for Lifelong User Behavior
  Modeling in CTR Prediction at Kuaishou", KDD 2023.
"""

import math

import keras
from keras import ops

FORMS = ("dot", "mlp")
NORMALIZATIONS = ("softmax", "none")
_NEG = -1e9


def masked_softmax(logits, mask):
    """Softmax over the last axis, zero where `mask` is False (all-False rows -> 0)."""
    if mask is None:
        return ops.softmax(logits, axis=-1)
    logits = ops.where(mask, logits, _NEG)
    return ops.softmax(logits, axis=-1) * ops.cast(mask, logits.dtype)


@keras.saving.register_keras_serializable(package="tfrec")
class TargetAttention(keras.layers.Layer):
    """Attention of one query (the target item) over a set of behaviours.

    Args:
        form: str. `"dot"` (multi-head scaled dot-product) or `"mlp"` (DIN
            activation unit). Defaults to `"dot"`.
        num_heads: int. Heads of the `"dot"` form; the key dim must be
            divisible by it. Defaults to 2.
        hidden_units: tuple of int. Hidden layers of the `"mlp"` form.
            Defaults to `(64, 32)`.
        activation: activation of the `"mlp"` hidden layers. Defaults to
            `"relu"` (DIN used Dice/PReLU; ours).
        normalize: str. `"softmax"` (weights sum to one over valid behaviours)
            or `"none"` (DIN's raw sigmoid-free weights, `"mlp"` form only).
            Defaults to `"softmax"`.
        dropout: float. Dropout on the attention weights. Defaults to 0.

    Call args:
        query: `(..., dq)` the target representation.
        keys: `(..., n, dk)` the behaviours; leading dims equal the query's.
        mask: optional bool `(..., n)`, True = a real behaviour.

    Returns:
        `(..., dk)` pooled interest.

    Example:
    >>> import numpy as np
    >>> att = TargetAttention(form="dot", num_heads=2)
    >>> att(np.ones((3, 8), "float32"), np.ones((3, 5, 8), "float32")).shape
    TensorShape([3, 8])
    """

    def __init__(
        self,
        form="dot",
        num_heads=2,
        hidden_units=(64, 32),
        activation="relu",
        normalize="softmax",
        dropout=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}.")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}.")
        if form == "dot" and normalize != "softmax":
            raise ValueError("form='dot' needs normalize='softmax'.")
        if int(num_heads) < 1:
            raise ValueError(f"num_heads must be positive, got {num_heads}.")
        if any(int(u) < 1 for u in hidden_units):
            raise ValueError(f"hidden_units must be positive ints, got {hidden_units}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        self.form = form
        self.num_heads = int(num_heads)
        self.hidden_units = tuple(int(u) for u in hidden_units)
        self.activation = keras.activations.get(activation)
        self.normalize = normalize
        self.dropout = float(dropout)
        self.weight_dropout = keras.layers.Dropout(self.dropout)

    def build(self, query_shape, keys_shape=None, mask_shape=None):
        dq = query_shape[-1]
        dk = dq if keys_shape is None else keys_shape[-1]
        if dq is None or dk is None:
            raise ValueError(f"TargetAttention needs known last dims, got query {query_shape}, keys {keys_shape}.")
        self.key_dim = int(dk)
        if self.form == "dot":
            if dk % self.num_heads:
                raise ValueError(f"TargetAttention: key dim {dk} must be divisible by num_heads={self.num_heads}.")
            self.head_dim = dk // self.num_heads
            self.query_dense = keras.layers.Dense(dk, name="query")
            self.key_dense = keras.layers.Dense(dk, name="key")
            self.value_dense = keras.layers.Dense(dk, name="value")
            self.output_dense = keras.layers.Dense(dk, name="output")
            self.query_dense.build((None, dq))
            for dense in (self.key_dense, self.value_dense, self.output_dense):
                dense.build((None, dk))
        else:
            if dq != dk:
                raise ValueError(f"form='mlp' needs query and key dims equal, got {dq} and {dk}.")
            self.mlp = [
                keras.layers.Dense(u, activation=self.activation, name=f"hidden_{i}")
                for i, u in enumerate(self.hidden_units)
            ]
            self.mlp.append(keras.layers.Dense(1, name="logit"))
            width = 4 * dk
            for dense in self.mlp:
                dense.build((None, width))
                width = dense.units
        self.built = True

    # --- helpers ---------------------------------------------------------
    def project_keys(self, keys):
        """Key projections `(..., heads, head_dim)` of `keys (..., dk)` (`"dot"` only).

        A behaviour's key depends only on the behaviour, so a model may project
        its whole item table once and gather (TWIN's pre-computed projections)."""
        if self.form != "dot":
            raise ValueError("project_keys is defined for form='dot' only.")
        projected = self.key_dense(keys)
        return ops.reshape(projected, tuple(ops.shape(projected)[:-1]) + (self.num_heads, self.head_dim))

    def project_values(self, values):
        """Value projections `(..., heads, head_dim)` of `values (..., dk)` (`"dot"` only)."""
        if self.form != "dot":
            raise ValueError("project_values is defined for form='dot' only.")
        projected = self.value_dense(values)
        return ops.reshape(projected, tuple(ops.shape(projected)[:-1]) + (self.num_heads, self.head_dim))

    def projection_tables(self, items, context=None):
        """What a served model computes once (`"dot"` only): `{"query", "key_value"[, "context"]}`.

        `query (V, heads, hd)`: scaled query projection of every row of `items (V, dq)`;
        `key_value (V, 2, heads, hd)`: its key and value projections (with biases);
        `context (T, 2, heads, hd)`: key and value projections *without* biases of
        additive behaviour embeddings `context (T, dk)` (e.g. feedback x time gap),
        so the projection of `item + context` is `key_value[item] + context[token]`
        (projections are linear). `attend_projected` consumes gathered rows.
        """
        if self.form != "dot":
            raise ValueError("projection_tables is defined for form='dot' only.")
        heads = (self.num_heads, self.head_dim)
        out = {"query": self._project_query(items),
               "key_value": ops.stack([self.project_keys(items), self.project_values(items)], axis=-3)}
        if context is not None:
            kv = ops.stack([ops.matmul(context, self.key_dense.kernel), ops.matmul(context, self.value_dense.kernel)],
                           axis=-2)  # (T, 2, dk)
            out["context"] = ops.reshape(kv, tuple(ops.shape(kv)[:-1]) + heads)
        return out

    def attend_projected(self, query, key_value, mask=None):
        """The `"dot"` forward pass on projected inputs: `query (..., heads, hd)` (scaled, as
        `projection_tables`), `key_value (..., n, 2, heads, hd)` -> `(..., dk)`, equal to
        `call` on the unprojected inputs up to float rounding (inference: no dropout)."""
        logits = ops.einsum("...hd,...nhd->...hn", query, key_value[..., 0, :, :])  # (..., heads, n)
        return self._pool(logits, key_value[..., 1, :, :], mask, training=False)

    def _pool(self, logits, values, mask, training):
        """Masked softmax of head logits `(..., heads, n)` over values `(..., n, heads, hd)` -> `(..., dk)`."""
        weights = masked_softmax(logits, None if mask is None else ops.expand_dims(mask, -2))
        weights = self.weight_dropout(weights, training=training)  # (..., heads, n)
        pooled = ops.einsum("...hn,...nhd->...hd", weights, values)  # (..., heads, hd)
        pooled = ops.reshape(pooled, tuple(ops.shape(pooled)[:-2]) + (self.key_dim,))
        out = self.output_dense(pooled)  # (..., dk)
        if mask is not None:  # no valid behaviour -> zeros, not the output bias
            out = out * ops.cast(ops.any(mask, axis=-1, keepdims=True), out.dtype)
        return out

    def _project_query(self, query):
        q = self.query_dense(query)  # (..., dk)
        q = ops.reshape(q, tuple(ops.shape(q)[:-1]) + (self.num_heads, self.head_dim))
        return q / math.sqrt(self.head_dim)  # (..., heads, head_dim)

    def _head_logits(self, query, keys=None, projected_keys=None):
        q = self._project_query(query)  # (..., heads, hd)
        k = self.project_keys(keys) if projected_keys is None else projected_keys  # (..., n, heads, hd)
        return ops.einsum("...hd,...nhd->...nh", q, k)  # (..., n, heads)

    def _mlp_logits(self, query, keys):
        q = ops.broadcast_to(ops.expand_dims(query, -2), ops.shape(keys))  # (..., n, d)
        h = ops.concatenate([q, keys, q - keys, q * keys], axis=-1)  # (..., n, 4d)
        for dense in self.mlp:
            h = dense(h)
        return h[..., 0]  # (..., n)

    def logits(self, query, keys=None, projected_keys=None):
        """Attention logits `(..., n)` (mean over heads), before masking.

        Args:
            query: `(..., dq)`.
            keys: `(..., n, dk)`, or
            projected_keys: `(..., n, heads, head_dim)` from `project_keys`
                (`"dot"` only).
        """
        if not self.built:
            self.build(ops.shape(query), None if keys is None else ops.shape(keys))
        if self.form == "dot":
            return ops.mean(self._head_logits(query, keys, projected_keys), axis=-1)
        if keys is None:
            raise ValueError("form='mlp' needs keys (it has no key projection).")
        return self._mlp_logits(query, keys)

    # --- forward ---------------------------------------------------------
    def call(self, query, keys, mask=None, training=False):
        if mask is not None:
            mask = ops.cast(mask, "bool")
        if self.form == "mlp":
            logits = self._mlp_logits(query, keys)  # (..., n)
            if self.normalize == "softmax":
                weights = masked_softmax(logits, mask)
            else:
                weights = logits if mask is None else logits * ops.cast(mask, logits.dtype)
            weights = self.weight_dropout(weights, training=training)
            return ops.sum(ops.expand_dims(weights, -1) * keys, axis=-2)  # (..., dk)
        logits = ops.swapaxes(self._head_logits(query, keys), -1, -2)  # (..., heads, n)
        return self._pool(logits, self.project_values(keys), mask, training)

    def compute_output_shape(self, query_shape, keys_shape, mask_shape=None):
        return tuple(query_shape[:-1]) + (keys_shape[-1],)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "form": self.form,
                "num_heads": self.num_heads,
                "hidden_units": list(self.hidden_units),
                "activation": keras.activations.serialize(self.activation),
                "normalize": self.normalize,
                "dropout": self.dropout,
            }
        )
        return config

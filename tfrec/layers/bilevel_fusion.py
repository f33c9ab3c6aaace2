"""R2LED's bi-level fusion refinement of retrieved behaviours.

**SID level.** Each item (retrieved behaviours and the target) has a
collaborative ID embedding `e_id` and a semantic-ID embedding `e_sid`, the sum of
one learned code embedding per SID level (`e_sid = sum_l C_l[code_l]`, which
mirrors how a residual quantizer reconstructs a vector as a sum of codewords;
ours). A gate mixes them:

- `gate="vector"` (default): `g = sigmoid(W [e_id; e_sid] + b)` per dimension;
- `gate="scalar"`: the same with one gate value per item;
- `gate="none"` (the no-gate ablation): `e_id + e_sid`, no learned mixing;

and the item representation is `g * e_id + (1 - g) * e_sid`. Negative codes
("no SID", e.g. padding/OOV rows) contribute nothing.

**Route level.** In every route the (fused) target attends over that route's
retrieved behaviours with a masked target attention (`TargetAttention`, one set
of weights shared by all routes so the routes run as one batched call), giving
one interest vector per route. Routes are then fused by `route_fusion`:

- `"attention"` (default): a target-aware softmax over the routes
  (`score_r = (W t) . v_r / sqrt(d)`; routes with nothing retrieved are left out);
- `"mean"`: the mean over routes with something retrieved;
- `"concat"`: all route vectors side by side, `(batch, routes * dim)`.

A route (or a whole row) with no retrieved behaviour contributes zeros.
"""

import math

import keras
from keras import ops

from tfrec.layers.target_attention import TargetAttention, masked_softmax

GATES = ("vector", "scalar", "none")
ROUTE_FUSIONS = ("attention", "mean", "concat")


@keras.saving.register_keras_serializable(package="tfrec")
class BiLevelFusion(keras.layers.Layer):
    """SID-level gate + route-level target attention and route fusion.

    Args:
        sid_codebook_sizes: list of int. Codebook size of each SID level (codes
            are `0..size-1`; negative = no code).
        gate: str. `"vector"` (default), `"scalar"` or `"none"`.
        route_fusion: str. `"attention"` (default), `"mean"` or `"concat"`.
        attention_form: str. Form of the route-level `TargetAttention`
            (`"dot"` default, or `"mlp"`).
        num_heads: int. Heads of the `"dot"` attention. Defaults to 2.
        dropout: float. Attention-weight dropout. Defaults to 0.
        embeddings_initializer: initializer of the SID code tables. Defaults to
            `TruncatedNormal(stddev=0.02)`.

    Call args (a dict):
        target_embedding: `(batch, dim)` ID embedding of the target.
        target_sids: int `(batch, L)`.
        behaviour_embeddings: `(batch, routes, k, dim)` ID embeddings of the
            retrieved behaviours.
        behaviour_sids: int `(batch, routes, k, L)`.
        behaviour_mask: bool `(batch, routes, k)`.

    Returns:
        dict: `"target"` `(batch, dim)` fused target, `"routes"`
        `(batch, routes, dim)` per-route interest, `"interest"` `(batch, dim)`
        (`(batch, routes * dim)` for `"concat"`).

    Example:
    >>> import numpy as np
    >>> fusion = BiLevelFusion(sid_codebook_sizes=[4, 4])
    >>> out = fusion({"target_embedding": np.ones((2, 8), "float32"),
    ...               "target_sids": np.zeros((2, 2), "int32"),
    ...               "behaviour_embeddings": np.ones((2, 3, 5, 8), "float32"),
    ...               "behaviour_sids": np.zeros((2, 3, 5, 2), "int32"),
    ...               "behaviour_mask": np.ones((2, 3, 5), bool)})
    >>> out["interest"].shape
    TensorShape([2, 8])
    """

    def __init__(
        self,
        sid_codebook_sizes,
        gate="vector",
        route_fusion="attention",
        attention_form="dot",
        num_heads=2,
        dropout=0.0,
        embeddings_initializer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        sizes = [int(s) for s in sid_codebook_sizes]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"sid_codebook_sizes must be a non-empty list of positive ints, got {sid_codebook_sizes}.")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}.")
        if route_fusion not in ROUTE_FUSIONS:
            raise ValueError(f"route_fusion must be one of {ROUTE_FUSIONS}, got {route_fusion!r}.")
        self.sid_codebook_sizes = sizes
        self.gate = gate
        self.route_fusion = route_fusion
        self.attention_form = attention_form
        self.num_heads = int(num_heads)
        self.dropout = float(dropout)
        self.embeddings_initializer = keras.initializers.get(
            embeddings_initializer or keras.initializers.TruncatedNormal(stddev=0.02)
        )
        self.attention = TargetAttention(
            form=attention_form, num_heads=num_heads, dropout=dropout, name="route_attention"
        )

    def build(self, input_shape):
        dim = input_shape["target_embedding"][-1]
        levels = input_shape["target_sids"][-1]
        if dim is None:
            raise ValueError("BiLevelFusion needs a known embedding dim.")
        if levels is not None and levels != len(self.sid_codebook_sizes):
            raise ValueError(
                f"target_sids has {levels} levels but sid_codebook_sizes has {len(self.sid_codebook_sizes)}."
            )
        self.dim = int(dim)
        # Row 0 of each table = "no code" (kept at zero by masking); code c -> row c + 1.
        self.code_embeddings = [
            keras.layers.Embedding(size + 1, dim, embeddings_initializer=self.embeddings_initializer,
                                   name=f"sid_level_{level}")
            for level, size in enumerate(self.sid_codebook_sizes)
        ]
        for table in self.code_embeddings:
            table.build((None,))
        if self.gate != "none":
            self.gate_dense = keras.layers.Dense(dim if self.gate == "vector" else 1, name="gate")
            self.gate_dense.build((None, 2 * dim))
        self.attention.build((None, dim), (None, None, dim))
        if self.route_fusion == "attention":
            self.route_query = keras.layers.Dense(dim, use_bias=False, name="route_query")
            self.route_query.build((None, dim))
        self.built = True

    def sid_embedding(self, sids):
        """Sum of the code embeddings of `sids (..., L)` -> `(..., dim)`; negative codes add 0."""
        sids = ops.cast(sids, "int32")
        total = 0.0
        for level, table in enumerate(self.code_embeddings):
            code = sids[..., level]
            vector = table(ops.maximum(code + 1, 0))
            total = total + vector * ops.cast(ops.expand_dims(code >= 0, -1), vector.dtype)
        return total

    def fuse_items(self, id_embeddings, sids):
        """SID-level fusion of items: `(..., dim)` ID embeddings + `(..., L)` SIDs -> `(..., dim)`."""
        sid_vectors = self.sid_embedding(sids)
        if self.gate == "none":
            return id_embeddings + sid_vectors
        g = ops.sigmoid(self.gate_dense(ops.concatenate([id_embeddings, sid_vectors], axis=-1)))
        return g * id_embeddings + (1.0 - g) * sid_vectors

    def call(self, inputs, training=False):
        target = self.fuse_items(inputs["target_embedding"], inputs["target_sids"])  # (B, d)
        behaviours = self.fuse_items(inputs["behaviour_embeddings"], inputs["behaviour_sids"])  # (B, R, k, d)
        return self.fuse_routes(target, behaviours, inputs["behaviour_mask"], training=training)

    def fuse_routes(self, target, behaviours, mask, training=False):
        """Route level on already SID-fused items (e.g. rows gathered from a table fused once
        by `fuse_items`): target `(B, d)`, behaviours `(B, R, k, d)`, mask `(B, R, k)`.
        Returns the same dict as `call`."""
        mask = ops.cast(mask, "bool")  # (B, R, k)
        query = ops.broadcast_to(ops.expand_dims(target, 1), ops.shape(behaviours)[:-2] + (self.dim,))
        routes = self.attention(query, behaviours, mask, training=training)  # (B, R, d)
        return self.combine_routes(target, routes, mask)

    def projection_tables(self, id_table, item_sids, context=None):
        """What no request changes, for serving (`attention_form="dot"`): `{"fused": (V, d)
        SID-fused item table, "query", "key_value"[, "context"]}` (the route attention's
        projections of it, see `TargetAttention.projection_tables`)."""
        fused = self.fuse_items(id_table, item_sids)
        return {"fused": fused, **self.attention.projection_tables(fused, context)}

    def fuse_routes_projected(self, target, query, key_value, mask):
        """`fuse_routes` (inference) on projected rows: fused `target (B, d)`, its scaled
        query projection `(B, heads, hd)`, `key_value (B, R, k, 2, heads, hd)`, `mask (B, R, k)`."""
        mask = ops.cast(mask, "bool")
        query = ops.broadcast_to(query[:, None], (ops.shape(key_value)[0], ops.shape(key_value)[1])
                                 + tuple(query.shape[1:]))  # (B, R, heads, hd)
        return self.combine_routes(target, self.attention.attend_projected(query, key_value, mask), mask)

    def combine_routes(self, target, routes, mask):
        """Route fusion of per-route interests `routes (B, R, d)` (`mask (B, R, k)`)."""
        route_valid = ops.any(mask, axis=-1)  # (B, R)
        if routes.shape[1] == 1:  # a single route: nothing to fuse
            interest = routes[:, 0]  # (empty route -> zeros already)
        elif self.route_fusion == "concat":
            batch = ops.shape(routes)[0]
            interest = ops.reshape(routes, (batch, routes.shape[1] * self.dim))
        elif self.route_fusion == "mean":
            weights = ops.cast(route_valid, routes.dtype)
            count = ops.maximum(ops.sum(weights, axis=-1, keepdims=True), 1.0)
            interest = ops.sum(routes * weights[..., None], axis=1) / count
        else:
            q = self.route_query(target)  # (B, d)
            scores = ops.einsum("brd,bd->br", routes, q) / math.sqrt(self.dim)
            weights = masked_softmax(scores, route_valid)  # (B, R)
            interest = ops.einsum("br,brd->bd", weights, routes)
        return {"target": target, "routes": routes, "interest": interest}

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "sid_codebook_sizes": list(self.sid_codebook_sizes),
                "gate": self.gate,
                "route_fusion": self.route_fusion,
                "attention_form": self.attention_form,
                "num_heads": self.num_heads,
                "dropout": self.dropout,
                "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
            }
        )
        return config

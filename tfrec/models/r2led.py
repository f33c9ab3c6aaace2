"""R2LED: lifelong CTR with semantic IDs, multi-route mixed retrieval and bi-level fusion.

Our reading of the issue (the full paper was not available):

1. Every item has a semantic ID, `item_sids (V, L)`: L codes of a residual
   quantizer over its text embedding (`tfrec.layers.residual_quantizer`,
   `tfrec.semantics.sids`); negative codes mean "no SID" (padding/OOV rows).
2. **Retrieve** (`MultiRouteRetrieval`): one route per SID prefix length, coarse to
   fine; within a route each behaviour is scored by mixing the semantic view (SID
   prefix equals the target's) with the collaborative view (cosine of the learned
   ID embeddings); the route keeps its `top_k` behaviours.
3. **Refine** (`BiLevelFusion`): a gate mixes each item's ID embedding with its SID
   code embeddings (SID level); the fused target attends over each route's
   behaviours and the routes are fused (route level).
4. MLP over `[target, interest, target * interest]` and a sigmoid, trained with
   log loss (the `CTRModel` skeleton shared with the baselines).

Options and defaults (which are ours is stated in the layer docs): `route_levels`
= all levels, `top_k=32` per route, `mix="boost"`, `similarity="cosine"`,
`gate="vector"`, `route_fusion="attention"`, `attention_form="dot"`. The ablations
of the benchmark are `r2led_variant(name, num_levels)`.
"""

import keras
import numpy as np
from keras import ops

from tfrec.layers.bilevel_fusion import BiLevelFusion
from tfrec.layers.multi_route_retrieval import (MultiRouteRetrieval, behaviour_scores, l2_normalize, lookup,
                                                shared_prefix_length, take_rows)
from tfrec.models.ctr_baselines import CTRModel, repeat_rows, table_argument

NO_SID = 1 << 30  # packed code of an item without SID (`R2LED.precompute`)
R2LED_VARIANTS = ("r2led", "r2led-no-multiroute", "r2led-no-mixed-semantic",
                  "r2led-no-mixed-collaborative", "r2led-no-gate")


def r2led_variant(name, num_levels):
    """Constructor overrides of a benchmark variant.

    - `r2led`: defaults;
    - `r2led-no-multiroute`: one route, the finest prefix (`route_levels=[L]`);
    - `r2led-no-mixed-semantic` / `-collaborative`: `mix="semantic"` / `"collaborative"`;
    - `r2led-no-gate`: `gate="none"` (ID and SID embeddings summed).

    >>> r2led_variant("r2led-no-multiroute", 3)
    {'route_levels': [3]}
    """
    table = {
        "r2led": {},
        "r2led-no-multiroute": {"route_levels": [int(num_levels)]},
        "r2led-no-mixed-semantic": {"mix": "semantic"},
        "r2led-no-mixed-collaborative": {"mix": "collaborative"},
        "r2led-no-gate": {"gate": "none"},
    }
    if name not in table:
        raise ValueError(f"unknown R2LED variant {name!r}; known: {', '.join(R2LED_VARIANTS)}.")
    return table[name]


@keras.saving.register_keras_serializable(package="tfrec")
class R2LED(CTRModel):
    """Retrieve-then-refine lifelong CTR model over semantic IDs.

    Args:
        vocab_size: int. Item ids including padding (0) and OOV (1).
        item_sids: int `(vocab_size, L)` semantic IDs (row = item id; negative =
            no code), or `{"shape": [V, L]}` when the values come from saved weights.
        sid_codebook_sizes: int or list of int per level. Defaults to
            `max code + 1` of each level of `item_sids` (required with a shape).
        embedding_dim: int. Defaults to 32.
        mlp_units: tuple of int. Defaults to (64, 32).
        dropout: float. MLP dropout. Defaults to 0.
        route_levels: list of int or None (all levels). See `MultiRouteRetrieval`.
        top_k: int or list per route. Defaults to 32.
        mix: str. Defaults to `"boost"`.
        alpha: float. Match weight of `mix="sum"`. Defaults to 0.5.
        similarity: str. `"cosine"` (default) or `"dot"`.
        candidates: int or None. Shortlist size of the cheaper cascade
            retrieval (see `MultiRouteRetrieval`); None (default) = exact.
        gate: str. `"vector"` (default), `"scalar"`, `"none"`. See `BiLevelFusion`.
        route_fusion: str. `"attention"` (default), `"mean"`, `"concat"`.
        attention_form: str. `"dot"` (default) or `"mlp"`.
        num_heads: int. Defaults to 2.
        fuse_table: bool. SID-level fusion of the whole item table once per
            batch, then gathers (True, default: cheaper whenever the catalog is
            smaller than batch x routes x top_k, and what a served model with a
            materialised table does), or of each retrieved behaviour (False:
            for catalogs much larger than that). Same outputs either way.
        catalog_scoring: bool or None. How retrieval computes the collaborative
            similarities: True = the target against the whole catalogue (one
            dense `(V, d)` product per row), then one float gathered per
            behaviour; False = `d` floats gathered per behaviour. None
            (default) = the catalogue whenever `vocab_size <= 8 * history
            length` (dense products cost far less than gathers on CPU), decided
            per call. Same retrieval either way, up to float rounding of the
            similarities; ours, for serving cost.

    Example:
    >>> sids = np.array([[-1, -1], [-1, -1], [0, 1], [0, 2], [1, 0], [1, 1]])
    >>> model = R2LED(vocab_size=6, item_sids=sids, embedding_dim=8, top_k=2)
    >>> model.compile()
    >>> x = {"history_ids": np.array([[2, 3, 4, 0]]), "target_id": np.array([5])}
    >>> model.predict(x, verbose=0).shape
    (1,)
    """

    def __init__(self, vocab_size, item_sids, sid_codebook_sizes=None, embedding_dim=32, mlp_units=(64, 32),
                 dropout=0.0, route_levels=None, top_k=32, mix="boost", alpha=0.5, similarity="cosine",
                 candidates=None, gate="vector", route_fusion="attention", attention_form="dot", num_heads=2,
                 fuse_table=True, catalog_scoring=None, **kwargs):
        super().__init__(vocab_size, embedding_dim, mlp_units, dropout, **kwargs)
        sids, self.sids_shape = table_argument(item_sids, "item_sids", self.vocab_size, "int32")
        if self.sids_shape is None:
            raise ValueError("R2LED needs item_sids (vocab_size, L).")
        num_levels = self.sids_shape[1]
        if sid_codebook_sizes is None:
            if sids is None:
                raise ValueError("sid_codebook_sizes is required when item_sids is given as a shape.")
            sid_codebook_sizes = [max(int(sids[:, level].max()) + 1, 1) for level in range(num_levels)]
        sizes = [int(sid_codebook_sizes)] * num_levels if np.isscalar(sid_codebook_sizes) \
            else [int(s) for s in sid_codebook_sizes]
        if len(sizes) != num_levels:
            raise ValueError(f"sid_codebook_sizes has {len(sizes)} entries for {num_levels} SID levels.")
        if sids is not None:
            too_big = [(level, int(sids[:, level].max())) for level in range(num_levels)
                       if sids[:, level].max() >= sizes[level]]
            if too_big:
                raise ValueError(f"item_sids codes exceed sid_codebook_sizes {sizes}: (level, max code) {too_big}.")
        self.sid_codebook_sizes = sizes
        self.fuse_table = bool(fuse_table)
        if catalog_scoring not in (None, True, False):
            raise ValueError(f"catalog_scoring must be None, True or False, got {catalog_scoring!r}.")
        self.catalog_scoring = catalog_scoring
        self.item_sids = self._static_table("item_sids", sids, self.sids_shape, "int32")
        self.retrieval = MultiRouteRetrieval(route_levels=route_levels, top_k=top_k, mix=mix, alpha=alpha,
                                             similarity=similarity, candidates=candidates, name="retrieval")
        self.fusion = BiLevelFusion(sizes, gate=gate, route_fusion=route_fusion, attention_form=attention_form,
                                    num_heads=num_heads, name="fusion")

    def precompute(self):
        """What no request changes (see `CTRModel.materialize`): the normalised retrieval
        table `retrieval (V, d)`; the packed SID codes `packed (V,)` (one int32 per item,
        level `l`'s code in its own bit field, coarse levels in the high bits, `NO_SID`
        = no SID) and `route_thresholds (R,)`: a behaviour shares route `r`'s prefix with
        the target exactly when `packed[behaviour] ^ packed[target] < route_thresholds[r]`
        (the bits of the finer levels may differ, no other); exact when every row has all
        or none of its codes and the fields fit 28 bits, else left out and the `(V, L)`
        codes are gathered as in training); the SID-fused item table `fused (V, d)` and,
        with `attention_form="dot"`, the route attention's projections of it and of the
        context table (`query`, `key_value`, `context`)."""
        tables = super().precompute()
        tables["retrieval"] = self._retrieval_table()
        if not self.retrieval.built:
            self.retrieval.build({"target_sids": (None, self.sids_shape[1])})
        sids = np.asarray(ops.convert_to_numpy(self.item_sids)).astype(np.int64)
        widths = [max(int(size - 1).bit_length(), 1) for size in self.sid_codebook_sizes]
        shifts = [sum(widths[level + 1:]) for level in range(len(widths))]  # bits below each level's field
        valid = sids >= 0
        if (valid.all(1) | ~valid.any(1)).all() and sum(widths) <= 28:
            packed = np.where(valid.all(1), (sids << np.asarray(shifts)).sum(1), NO_SID)
            tables["packed"] = ops.convert_to_tensor(packed.astype(np.int32))
            tables["route_thresholds"] = ops.convert_to_tensor(
                np.asarray([1 << shifts[level - 1] for level in self.retrieval.levels], np.int32))
        if not self.fusion.built:
            self.fusion.build({"target_embedding": (None, self.embedding_dim),
                               "target_sids": (None, self.sids_shape[1])})
        contexts = tables.pop("context", None)
        if self.fusion.attention_form == "dot":
            tables.update(self.fusion.projection_tables(self.item_encoder.all_items(), self.item_sids, contexts))
        else:
            tables["fused"] = self.fusion.fuse_items(self.item_encoder.all_items(), self.item_sids)
            if contexts is not None:
                tables["context"] = contexts
        return tables

    def semantic_view(self, history_ids, target_ids, tables=None):
        """The semantic view `MultiRouteRetrieval` reads: `{"route_match": (B, R, H) bool}`
        from the packed codes of a materialised model (one XOR per behaviour, one
        comparison per route), else `{"history_prefix": (B, H)}`, the number of leading
        SID levels each behaviour shares with the target, from the gathered `(V, L)` codes."""
        if tables is not None and "packed" in tables:
            history = lookup(tables["packed"], history_ids)  # (B, H): one int per behaviour
            target = ops.take(tables["packed"], target_ids, axis=0)  # (B,)
            # A target without SID never matches: its code differs from every row's in bit 29 or 30.
            target = ops.where(target == NO_SID, NO_SID | (1 << 29), target)
            differ = ops.bitwise_xor(history, target[:, None])  # (B, H)
            return {"route_match": differ[:, None, :] < tables["route_thresholds"][None, :, None]}
        target_sids = ops.take(self.item_sids, target_ids, axis=0)[:, None, :]  # (B, 1, L)
        return {"history_prefix": shared_prefix_length(ops.take(self.item_sids, history_ids, axis=0), target_sids)}

    def _retrieval_table(self, tables=None):
        """`(V, d)` item vectors the collaborative view compares (no gradient; unit norm for cosine)."""
        if tables is not None:
            return tables["retrieval"]
        table = ops.stop_gradient(self.item_encoder.all_items())
        if self.retrieval.similarity == "cosine":
            table = l2_normalize(table)  # once per table, not once per behaviour
        return table

    def _similarity(self, history_ids, target_ids, tables=None):
        """`(B, H)` collaborative similarity of each behaviour to the target (see `catalog_scoring`)."""
        table = self._retrieval_table(tables)  # (V, d)
        return behaviour_scores(ops.take(table, target_ids, axis=0), table, history_ids, self.catalog_scoring)

    def retrieve(self, history_ids, target_ids, similarity=None, tables=None):
        """`(indices, mask)` `(B, R, k)`: positions of the behaviours each route keeps.

        `similarity`: optional float `(B, H)`, the collaborative view's scores
        when already computed (`score` computes them for all candidates at once).
        `tables`: the `ServingTables` of a materialised model (same result).
        """
        history_ids = ops.cast(history_ids, "int32")
        target_ids = ops.cast(target_ids, "int32")
        if similarity is None:
            similarity = self._similarity(history_ids, target_ids, tables)
        return self.retrieval({
            **self.semantic_view(history_ids, target_ids, tables),  # route_match or history_prefix
            "target_sids": ops.take(self.item_sids, target_ids, axis=0),  # (B, L)
            "similarity": similarity,  # (B, H)
            "history_mask": history_ids > 0,
        })

    def _candidate_probabilities(self, features, candidate_ids):
        # The history's item vectors are gathered once per row, not once per candidate:
        # similarities of C candidates to H behaviours are one (C, d) x (d, H) product per row.
        history_ids = features["history_ids"]
        table = self._retrieval_table(self.serving_tables())  # (V, d)
        similarity = ops.einsum("bhd,bcd->bch", ops.take(table, history_ids, axis=0),
                                ops.take(table, candidate_ids, axis=0))  # (B, C, H)
        repeated = repeat_rows(features, ops.shape(candidate_ids)[1])  # (B * C, ...)
        return self._probabilities({**repeated, "target_id": ops.reshape(candidate_ids, (-1,))},
                                   similarity=ops.reshape(similarity, (-1, ops.shape(history_ids)[1])))

    def user_interest(self, history_ids, target_ids, training=False, context=None, similarity=None):
        tables = self.serving_tables(training)
        indices, mask = self.retrieve(history_ids, target_ids, similarity=similarity, tables=tables)  # (B, R, k)
        batch = ops.shape(history_ids)[0]
        flat = ops.reshape(indices, (batch, -1))  # (B, R * k)
        selected = ops.reshape(take_rows(history_ids, flat), ops.shape(indices))  # (B, R, k)
        if tables is not None:  # served: rows of the fused, projected tables
            return self._served_interest(tables, selected, flat, indices, mask, target_ids, context)
        extra = None
        if context is not None:  # feedback + gap embedding of each retrieved behaviour
            extra = ops.take_along_axis(context, flat[..., None], axis=1)  # (B, R * k, d)
            extra = ops.reshape(extra, (batch, indices.shape[1], indices.shape[2], self.embedding_dim))
        if not self.fusion.built:
            self.fusion.build({"target_embedding": (None, self.embedding_dim),
                               "target_sids": (None, self.sids_shape[1])})
        if self.fuse_table:  # SID-level fusion once per item of the table, then gathers
            table = self.fusion.fuse_items(self.item_encoder.all_items(), self.item_sids)  # (V, d)
            target = ops.take(table, target_ids, axis=0)  # (B, d)
            behaviours = ops.take(table, selected, axis=0)  # (B, R, k, d)
        else:  # SID-level fusion of each retrieved behaviour
            target = self.fusion.fuse_items(self.item_encoder(target_ids), ops.take(self.item_sids, target_ids, axis=0))
            behaviours = self.fusion.fuse_items(self.item_encoder(selected),
                                                ops.take(self.item_sids, selected, axis=0))  # (B, R, k, d)
        if extra is not None:
            behaviours = behaviours + extra
        fused = self.fusion.fuse_routes(target, behaviours, mask, training=training)
        return fused["target"], fused["interest"]

    def _served_interest(self, tables, selected, flat, indices, mask, target_ids, context):
        target = ops.take(tables["fused"], target_ids, axis=0)  # (B, d)
        rows = None
        if context is not None:  # rows of the context table of the retrieved behaviours only
            rows = ops.reshape(self.context_rows(context, flat), ops.shape(indices))  # (B, R, k)
        if "key_value" not in tables:  # "mlp" route attention: fused rows + context, attended as in training
            behaviours = ops.take(tables["fused"], selected, axis=0)  # (B, R, k, d)
            if rows is not None:
                behaviours = behaviours + ops.take(tables["context"], rows, axis=0)
            fused = self.fusion.fuse_routes(target, behaviours, mask)
            return fused["target"], fused["interest"]
        key_value = ops.take(tables["key_value"], selected, axis=0)  # (B, R, k, 2, heads, hd)
        if rows is not None:
            key_value = key_value + ops.take(tables["context"], rows, axis=0)
        query = ops.take(tables["query"], target_ids, axis=0)  # (B, heads, hd)
        fused = self.fusion.fuse_routes_projected(target, query, key_value, mask)
        return fused["target"], fused["interest"]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "item_sids": {"shape": list(self.sids_shape)},
                "sid_codebook_sizes": list(self.sid_codebook_sizes),
                "route_levels": self.retrieval.route_levels,
                "top_k": self.retrieval.top_k,
                "mix": self.retrieval.mix,
                "alpha": self.retrieval.alpha,
                "similarity": self.retrieval.similarity,
                "candidates": self.retrieval.candidates,
                "gate": self.fusion.gate,
                "route_fusion": self.fusion.route_fusion,
                "attention_form": self.fusion.attention_form,
                "num_heads": self.fusion.num_heads,
                "fuse_table": self.fuse_table,
                "catalog_scoring": self.catalog_scoring,
            }
        )
        return config


def sid_matches(item_sids, history_ids, target_ids, levels=None):
    """Mean number of behaviours per sample sharing at least `l` leading SID codes with the
    target, for each route level `l` (what each route can retrieve semantically).

    Args:
        item_sids: int `(V, L)` (negative = no code).
        history_ids: int `(B, H)` (0 = padding); target_ids: int `(B,)`.
        levels: route levels (default `1..L`).

    Returns:
        `{level: mean count}`.

    >>> sids = np.array([[-1, -1], [-1, -1], [0, 0], [0, 1], [1, 0]])
    >>> sid_matches(sids, np.array([[2, 3, 4, 0]]), np.array([2]))
    {1: 2.0, 2: 1.0}
    """
    item_sids = np.asarray(item_sids)
    history_ids, target_ids = np.asarray(history_ids), np.asarray(target_ids)
    levels = list(levels or range(1, item_sids.shape[1] + 1))
    shared = np.asarray(shared_prefix_length(item_sids[history_ids], item_sids[target_ids][:, None, :]))
    valid = history_ids > 0
    return {int(level): float(((shared >= level) & valid).sum(1).mean()) for level in levels}


def route_overlap(model, history_ids, target_ids):
    """Mean Jaccard overlap between the behaviour sets two routes of an `R2LED` retrieve,
    per route pair `"i-j"` (route levels), over the given samples (pairs of empty sets skipped)."""
    indices, mask = model.retrieve(history_ids, target_ids)
    indices, mask = np.asarray(indices), np.asarray(mask)
    levels = model.retrieval.levels
    out = {}
    for i in range(len(levels)):
        for j in range(i + 1, len(levels)):
            scores = []
            for b in range(indices.shape[0]):
                a, c = set(indices[b, i][mask[b, i]].tolist()), set(indices[b, j][mask[b, j]].tolist())
                if a or c:
                    scores.append(len(a & c) / len(a | c))
            out[f"{levels[i]}-{levels[j]}"] = float(np.mean(scores)) if scores else None
    return out


def route_diagnostics(model, history_ids, target_ids):
    """`{"sid_matches": {level: mean}, "route_overlap": {"i-j": mean Jaccard}}` of an
    `R2LED` on a batch of requests (the benchmark reports them at history 1,024)."""
    return {"sid_matches": sid_matches(np.asarray(model.item_sids), history_ids, target_ids,
                                       model.retrieval.levels if model.retrieval.built else None),
            "route_overlap": route_overlap(model, history_ids, target_ids)}

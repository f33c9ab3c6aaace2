"""R2LED's multi-route mixed retrieval over a lifelong behaviour sequence.

Every item has a semantic ID (SID): `L` codes from a residual quantizer, coarse
to fine. Route `r` works at prefix length `l_r` (default: one route per level,
`l = 1..L`). Within a route each history behaviour gets two views:

- semantic: `match = 1` if the behaviour's SID prefix of length `l_r` equals the
  target's (a negative code means "no SID" and never matches);
- collaborative: similarity of the learned item embeddings of behaviour and
  target (`"cosine"` by default, or `"dot"`);

mixed into one retrieval score by `mix`:

- `"boost"` (default, ours): prefix matches first, ranked by collaborative
  similarity, remaining slots filled by the most similar non-matching behaviours;
- `"filter"`: only prefix matches, ranked by similarity (no filling);
- `"sum"`: `alpha * match + (1 - alpha) * similarity`, every behaviour eligible;
- `"semantic"`: only prefix matches, most recent first (ablation: semantic view only);
- `"collaborative"`: similarity only, every behaviour eligible (ablation; all
  routes then retrieve the same set).

Each route keeps its `top_k` best behaviours (one int, or one per route). Padding
is never retrieved, nor an ineligible behaviour: such slots, and slots beyond a
short history or beyond a route's own `top_k`, come back with `mask = False` and
index 0. Equal scores are broken towards the more recent behaviour (the larger
position in the right-padded history), exactly, by running `top_k` on the
reversed sequence (`top_k` puts the lower index first among equals). Everything
is vectorised over batch and routes with one `ops.top_k` (two with the optional
`candidates` shortlist, see the class doc). Retrieval has no
weights and passes no gradient (it returns indices); the embeddings learn
through the attention over what was retrieved.
"""

import keras
from keras import ops

MIXES = ("boost", "filter", "sum", "semantic", "collaborative")
SIMILARITIES = ("cosine", "dot")
_NEG = -1e9


def recency_top_k(scores, eligible, k):
    """Top-`k` positions of `scores` over the last axis, ties -> more recent.

    Args:
        scores: float `(..., n)`; position `n - 1` is the most recent.
        eligible: bool `(..., n)`; ineligible positions are never returned.
        k: int (static).

    Returns:
        `(indices, mask)`, int32 and bool `(..., k)`. Slots without an
        eligible position have `mask = False` and index 0. Works for `n < k`.

    Example:
    >>> import numpy as np
    >>> idx, mask = recency_top_k(np.array([[1., 2., 1., 0.]], "float32"),
    ...                           np.array([[True, True, True, False]]), 3)
    >>> idx.numpy().tolist(), mask.numpy().tolist()
    ([[1, 2, 0]], [[True, True, True]])
    """
    scores = ops.where(eligible, ops.cast(scores, "float32"), _NEG)
    n = ops.shape(scores)[-1]
    if scores.shape[-1] is None or scores.shape[-1] < k:  # short (or unknown) length: pad to k
        short = ops.maximum(k - n, 0)
        pad = [[0, 0]] * (len(scores.shape) - 1) + [[short, 0]]  # padding goes before position 0
        scores = ops.pad(scores, pad, constant_values=2 * _NEG)
    values, flipped = ops.top_k(ops.flip(scores, axis=-1), k=k, sorted=True)
    mask = values > _NEG / 2
    indices = ops.cast(n - 1, "int32") - ops.cast(flipped, "int32")  # back to history positions
    return ops.where(mask, indices, 0), mask


def shared_prefix_length(sids, target_sids, max_levels=None):
    """How many leading SID levels `sids` share with `target_sids` (int32).

    Args:
        sids: int `(..., n, L)`; negative = no code.
        target_sids: int, broadcastable to `sids` (e.g. `(..., 1, L)`).
        max_levels: int or None. Compare only the first this many levels.

    Returns:
        int32 `(..., n)` in `[0, max_levels]`. A level where the target has no
        code (negative) never matches, so it ends the shared prefix.

    Example:
    >>> import numpy as np
    >>> shared_prefix_length(np.array([[1, 2, 3], [1, 5, 3], [2, 2, 3]]), np.array([[1, 2, -1]])).numpy().tolist()
    [2, 1, 0]
    """
    sids, target_sids = ops.cast(sids, "int32"), ops.cast(target_sids, "int32")
    levels = sids.shape[-1] if max_levels is None else min(int(max_levels), sids.shape[-1])
    shared, prefix = None, None
    for level in range(levels):  # L is small and static: a loop of elementwise ops (cumprod is much slower)
        equal = (sids[..., level] == target_sids[..., level]) & (target_sids[..., level] >= 0)
        prefix = equal if prefix is None else prefix & equal
        shared = ops.cast(prefix, "int32") if shared is None else shared + ops.cast(prefix, "int32")
    return shared


def l2_normalize(x, epsilon=1e-12):
    return x * ops.rsqrt(ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True), epsilon))


def lookup(table, ids):
    """`table[ids]`: rows of `table (V, ...)` for int `ids (...)` in `[0, V)` -> `(..., ...)`.

    `ops.take(table, ids, axis=0)`; on the TensorFlow backend through `gather_nd`,
    which costs about a third less than `gather` on CPU for one-number rows (the
    per-behaviour lookups of serving: packed SID codes, genre bits, similarities).

    Example:
    >>> import numpy as np
    >>> lookup(np.array([5, 6, 7]), np.array([[2, 0], [1, 1]])).numpy().tolist()
    [[7, 5], [6, 6]]
    """
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        return tf.gather_nd(table, ops.expand_dims(ops.cast(ids, "int32"), -1))
    return ops.take(table, ids, axis=0)


def take_rows(x, indices):
    """`x[b, indices[b, j]]`: int `indices (B, n)` into the rows of `x (B, m, ...)` -> `(B, n, ...)`.

    `ops.take_along_axis` without its broadcasting: one `lookup` in the
    flattened rows (about half the cost on CPU). Indices must lie in `[0, m)`.

    Example:
    >>> import numpy as np
    >>> take_rows(np.array([[1., 2., 3.], [4., 5., 6.]]), np.array([[2, 0], [1, 1]])).numpy().tolist()
    [[3.0, 1.0], [5.0, 5.0]]
    """
    x = ops.convert_to_tensor(x)
    indices = ops.cast(indices, "int32")
    rows, length = ops.shape(x)[0], ops.shape(x)[1]
    flat = ops.reshape(x, (-1,) + tuple(x.shape[2:]))  # (B * m, ...)
    offsets = ops.cast(ops.arange(rows)[:, None] * length, "int32")  # (B, 1)
    return lookup(flat, indices + offsets)


def behaviour_scores(query, table, history_ids, catalogue=None):
    """Dot products `(B, H)` of each row's `query (B, d)` with the rows of `table (V, d)` its
    behaviours `history_ids (B, H)` name.

    Two ways to the same numbers (up to float rounding): through the whole
    catalogue (one dense `(B, d) x (d, V)` product, then one float gathered per
    behaviour) or per behaviour (`d` floats gathered per behaviour).
    `catalogue`: True, False, or None (default) = the catalogue whenever
    `V <= 8 * H` (dense products cost far less than gathers on CPU), decided per
    call when the history length is dynamic.

    Example:
    >>> import numpy as np
    >>> table = np.eye(4, dtype="float32")
    >>> behaviour_scores(np.array([[0., 1., 2., 3.]], "float32"), table, np.array([[3, 1, 1]])).numpy().tolist()
    [[3.0, 1.0, 1.0]]
    """

    def per_catalogue():
        return take_rows(ops.matmul(query, ops.transpose(table)), history_ids)

    def per_behaviour():
        return ops.einsum("bhd,bd->bh", ops.take(table, history_ids, axis=0), query)

    if catalogue is None:
        vocab, length = table.shape[0], history_ids.shape[1]
        if length is None:  # a graph with a dynamic history length decides per call
            return ops.cond(vocab <= 8 * ops.shape(history_ids)[1], per_catalogue, per_behaviour)
        catalogue = vocab <= 8 * length
    return per_catalogue() if catalogue else per_behaviour()


@keras.saving.register_keras_serializable(package="tfrec")
class MultiRouteRetrieval(keras.layers.Layer):
    """Select, per SID-prefix route, the behaviours relevant to the target.

    Args:
        route_levels: list of int or None. SID prefix length of each route,
            coarse to fine, each in `1..L`. None = `[1, ..., L]`.
        top_k: int or list of int (one per route). Behaviours kept per route.
            Defaults to 32.
        mix: str. How semantic and collaborative views combine (see module
            doc): `"boost"` (default), `"filter"`, `"sum"`, `"semantic"`,
            `"collaborative"`.
        alpha: float in [0, 1]. Weight of the match in `mix="sum"`. Defaults to 0.5.
        similarity: str. `"cosine"` (default) or `"dot"`.
        candidates: int or None. None (default) ranks every route over the
            whole history (exact). An int first shortlists that many
            behaviours by the coarsest route's score and ranks every route
            within the shortlist: one `top_k` over the history instead of one
            per route. Exact whenever the coarsest route has at most
            `candidates - max(top_k)` eligible prefix matches (every match is
            then shortlisted, and so are the best non-matches any route can
            need); beyond that, finer routes only see the coarse route's best
            matches (a coarse-to-fine cascade; ours, for serving cost).
            Measured (CPU, batch 256, history 1,024, 3 routes, k=32): the
            exact path is already one batched `top_k` over `(B, R, H)`
            (8 ms); the cascade costs 9 ms at `candidates=96` and 21 ms at
            192-320, while exactness needs `candidates` >= level-1 matches +
            k (~140 + 32 on average with 8 codes per level on MovieLens-1M),
            so the default stays exact (None).

    Call args (a dict):
        history_sids: int `(batch, seq, L)`; negative = no code.
        target_sids: int `(batch, L)`.
        history_prefix: optional int `(batch, seq)`, instead of
            `history_sids`: how many leading SID levels each behaviour shares
            with the target (`shared_prefix_length`; a level where the target
            has no code ends the prefix). The same routes from one int per
            behaviour instead of `L`; what `R2LED` passes when it scores the
            catalogue once per target (`target_sids` still gives `L`).
        route_match: optional bool `(batch, routes, seq)`, instead of both:
            whether each behaviour shares each route's prefix with the target
            (what a materialised `R2LED` computes from its packed codes).
        history_vectors: float `(batch, seq, dim)` collaborative embeddings.
        target_vector: float `(batch, dim)`.
        similarity: optional float `(batch, seq)`, the collaborative
            similarities already computed (then the vectors are not needed;
            with `similarity="cosine"` they must lie in [-1, 1]).
        history_mask: bool `(batch, seq)`, True = real behaviour.

    Returns:
        `(indices, mask)`: int32 / bool `(batch, routes, max(top_k))`,
        positions in the history, most relevant first.

    Example:
    >>> import numpy as np
    >>> layer = MultiRouteRetrieval(top_k=2)
    >>> idx, mask = layer({
    ...     "history_sids": np.array([[[1, 5], [1, 6], [2, 5]]]),
    ...     "target_sids": np.array([[1, 6]]),
    ...     "history_vectors": np.eye(3, 4, dtype="float32")[None],
    ...     "target_vector": np.ones((1, 4), "float32"),
    ...     "history_mask": np.array([[True, True, True]])})
    >>> idx.numpy().tolist()   # route 1: the two prefix-1 matches; route 2: [1, 6] then fill
    [[[1, 0], [1, 2]]]
    """

    def __init__(self, route_levels=None, top_k=32, mix="boost", alpha=0.5, similarity="cosine", candidates=None,
                 **kwargs):
        super().__init__(**kwargs)
        if mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {mix!r}.")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}.")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
        if route_levels is not None:
            route_levels = [int(level) for level in route_levels]
            if not route_levels or min(route_levels) < 1:
                raise ValueError(f"route_levels must be a non-empty list of prefix lengths >= 1, got {route_levels}.")
        top = [top_k] if isinstance(top_k, int) else list(top_k)
        if not top or any(isinstance(k, bool) or int(k) != k or k < 1 for k in top):
            raise ValueError(f"top_k must be a positive int or a list of them, got {top_k!r}.")
        if route_levels is not None and len(top) not in (1, len(route_levels)):
            raise ValueError(f"top_k has {len(top)} entries for {len(route_levels)} routes.")
        if candidates is not None and (isinstance(candidates, bool) or int(candidates) != candidates
                                       or candidates < max(top)):
            raise ValueError(f"candidates must be None or an int >= max(top_k) = {max(top)}, got {candidates!r}.")
        self.route_levels = route_levels
        self.candidates = None if candidates is None else int(candidates)
        self.top_k = int(top_k) if isinstance(top_k, int) else [int(k) for k in top_k]
        self.mix = mix
        self.alpha = float(alpha)
        self.similarity = similarity

    def build(self, input_shape):
        num_levels = input_shape["target_sids"][-1]
        if num_levels is None:
            raise ValueError("MultiRouteRetrieval needs a known number of SID levels (last dim of target_sids).")
        levels = self.route_levels or list(range(1, num_levels + 1))
        if max(levels) > num_levels:
            raise ValueError(f"route_levels {levels} exceed the {num_levels} SID levels of the inputs.")
        top = [self.top_k] * len(levels) if isinstance(self.top_k, int) else self.top_k
        if len(top) != len(levels):
            raise ValueError(f"top_k has {len(top)} entries for {len(levels)} routes.")
        self.levels = levels
        self.route_top_k = top
        self.built = True

    @property
    def num_routes(self):
        return len(self.levels) if self.built else (len(self.route_levels) if self.route_levels else None)

    def route_scores(self, inputs):
        """`(scores, eligible)`, float `(batch, routes, seq)` / bool broadcastable to it."""
        valid = ops.cast(inputs["history_mask"], "bool")[:, None, :]  # (B, 1, H)
        if "route_match" in inputs:
            match = ops.cast(inputs["route_match"], "bool")  # (B, R, H)
        else:
            if "history_prefix" in inputs:
                shared = ops.cast(inputs["history_prefix"], "int32")[:, None, :]  # (B, 1, H)
            else:
                shared = shared_prefix_length(inputs["history_sids"], inputs["target_sids"][:, None, :],
                                              max(self.levels))[:, None, :]
            match = shared >= ops.convert_to_tensor(self.levels, "int32")[None, :, None]  # (B, R, H)

        if "similarity" in inputs:
            sim = ops.cast(inputs["similarity"], "float32")  # (B, H)
        else:
            h = ops.cast(inputs["history_vectors"], "float32")  # (B, H, d)
            t = ops.cast(inputs["target_vector"], "float32")  # (B, d)
            if self.similarity == "cosine":
                h, t = l2_normalize(h), l2_normalize(t)
            sim = ops.einsum("bhd,bd->bh", h, t)
        sim = sim[:, None, :]  # (B, 1, H)
        if self.mix == "boost":
            if self.similarity == "cosine":  # similarities lie in [-1, 1]
                offset = 3.0
            else:  # lift matches above every non-match by the row's similarity range + 1
                hi = ops.max(ops.where(valid, sim, _NEG), axis=-1, keepdims=True)
                lo = ops.min(ops.where(valid, sim, -_NEG), axis=-1, keepdims=True)
                offset = ops.maximum(hi - lo, 0.0) + 1.0
            return ops.where(match, sim + offset, sim), valid  # one select per (route, behaviour)
        if self.mix == "filter":
            return ops.broadcast_to(sim, ops.shape(match)), valid & match
        if self.mix == "sum":
            return self.alpha * ops.cast(match, "float32") + (1.0 - self.alpha) * sim, valid
        if self.mix == "semantic":
            return ops.zeros(ops.shape(match), "float32"), valid & match
        return ops.broadcast_to(sim, ops.shape(match)), valid  # collaborative

    def call(self, inputs):
        scores, eligible = self.route_scores(inputs)  # (B, R, H), broadcastable bool
        k = max(self.route_top_k)
        if self.candidates is None:
            indices, mask = recency_top_k(scores, eligible, k)  # (B, R, k)
        else:
            # Shortlist by the coarsest route, back in chronological order, then rank every route in it.
            eligible = ops.broadcast_to(eligible, ops.shape(scores))
            coarse = self.levels.index(min(self.levels))
            short, short_mask = recency_top_k(scores[:, coarse], eligible[:, coarse], self.candidates)  # (B, C)
            short = ops.sort(ops.where(short_mask, short, -1), axis=-1)
            short_mask, short = short >= 0, ops.maximum(short, 0)
            take = ops.broadcast_to(short[:, None, :], ops.shape(scores)[:2] + (self.candidates,))
            local, mask = recency_top_k(ops.take_along_axis(scores, take, axis=-1),
                                        ops.take_along_axis(eligible, take, axis=-1) & short_mask[:, None, :], k)
            indices = ops.where(mask, ops.take_along_axis(take, local, axis=-1), 0)  # (B, R, k)
        if min(self.route_top_k) < k:  # per-route budgets: mask the slots beyond each route's k
            allowed = ops.arange(k)[None, :] < ops.convert_to_tensor(self.route_top_k)[:, None]  # (R, k)
            mask = mask & allowed[None]
            indices = ops.where(mask, indices, 0)
        return indices, mask

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape["history_mask"][:1]) + (self.num_routes, max(self.route_top_k))
        return shape, shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "route_levels": self.route_levels,
                "top_k": self.top_k,
                "mix": self.mix,
                "alpha": self.alpha,
                "similarity": self.similarity,
                "candidates": self.candidates,
            }
        )
        return config

"""Serving precomputation (`CTRModel.materialize`): precomputed and training-path scores agree.

Tolerance: 1e-5 absolute on click probabilities (float32 rounding: projections of a
sum vs sums of projections, gathers of a normalised table vs normalising gathered rows)."""

import numpy as np
import pytest

from tfrec.layers.multi_route_retrieval import behaviour_scores, take_rows
from tfrec.models.ctr_baselines import build_ctr_baseline
from tfrec.models.r2led import NO_SID, R2LED

V, H, B = 40, 24, 6
ATOL = 1e-5


def features(seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, H + 1, B)
    ids = np.where(np.arange(H)[None] < lengths[:, None], rng.integers(1, V, (B, H)), 0).astype("int32")
    return {"history_ids": ids, "target_id": rng.integers(1, V, B).astype("int32"),
            "history_labels": (rng.random((B, H)) < 0.5).astype("float32") * (ids > 0),
            "history_ratings": rng.integers(0, 6, (B, H)).astype("float32") * (ids > 0),
            "history_gaps": rng.integers(0, 32, (B, H)).astype("int32") * (ids > 0),
            "user_profile": rng.integers(0, 4, (B, 2)).astype("int32")}


def sids(rng, sizes=(3, 4, 2)):
    codes = np.stack([rng.integers(0, s, V) for s in sizes], 1)
    codes[:2] = -1  # padding and OOV rows have no SID
    codes[7] = -1  # an item without text
    return codes


def perturbed(model):
    """Random (non-initial) weights, so zero-initialised parts take part in the check."""
    rng = np.random.default_rng(1)
    for w in model.weights:
        if w.trainable:
            w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))
    return model


def r2led(**kwargs):
    rng = np.random.default_rng(0)
    return R2LED(V, sids(rng), sid_codebook_sizes=[3, 4, 2], embedding_dim=8, top_k=4, **kwargs)


def wide():
    rng = np.random.default_rng(4)
    genres = np.where(rng.random((V, 3)) < 0.7, rng.integers(2, 12, (V, 3)), 0)
    genres[:2] = 0
    return {"item_prior": rng.uniform(0.1, 0.9, V), "item_genres": genres, "global_rate": 0.4,
            "profile_sizes": [4, 5]}


MODELS = {
    "r2led-wide": lambda: r2led(wide=wide()),
    "twin-wide": lambda: build_ctr_baseline("twin", V, embedding_dim=8, top_k=5, wide=wide()),
    "r2led": lambda: r2led(),
    "r2led-mlp-attention": lambda: r2led(attention_form="mlp"),
    "r2led-split-feedback": lambda: r2led(split_feedback=True),
    "r2led-cascade": lambda: r2led(candidates=8),
    "r2led-no-feedback": lambda: r2led(feedback=False),
    "twin": lambda: build_ctr_baseline("twin", V, embedding_dim=8, top_k=5),
    "full": lambda: build_ctr_baseline("full", V, embedding_dim=8),
    "eta": lambda: build_ctr_baseline("eta", V, embedding_dim=8, top_k=5),
    "sim-soft": lambda: build_ctr_baseline("sim-soft", V, embedding_dim=8, top_k=5,
                                           item_semantic=np.random.default_rng(2).normal(size=(V, 6))),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_materialized_scores_equal_training_path(name):
    model = MODELS[name]()
    x = features()
    model(x)
    perturbed(model)
    plain = np.asarray(model(x, training=False))
    candidates = np.random.default_rng(3).integers(1, V, (B, 3)).astype("int32")
    extra = {k: x[k] for k in ("history_labels", "history_ratings", "history_gaps", "user_profile")}
    plain_scores = np.asarray(model.score(x["history_ids"], candidates, **extra))
    assert model.materialize() is model and model.materialized
    assert model.wide is None or model.wide._genre_bits is not None
    np.testing.assert_allclose(np.asarray(model(x, training=False)), plain, atol=ATOL)
    np.testing.assert_allclose(np.asarray(model.score(x["history_ids"], candidates, **extra)), plain_scores, atol=ATOL)
    np.testing.assert_allclose(np.asarray(model(x, training=True)), plain, atol=ATOL)  # training: no tables
    # the tables are a snapshot: changed weights give other served scores until re-materialised
    model.item_encoder.embedding.embeddings.assign(model.item_encoder.embedding.embeddings * 2.0)
    stale = np.asarray(model(x, training=False))  # proves inference reads the tables
    fresh = np.asarray(model.dematerialize()(x, training=False))
    assert not np.allclose(fresh, plain, atol=1e-3)
    assert not np.allclose(stale, fresh, atol=1e-4)
    np.testing.assert_allclose(np.asarray(model.materialize()(x, training=False)), fresh, atol=ATOL)


def test_r2led_materialize_packs_sids_and_retrieves_the_same():
    model = r2led()
    x = features()
    model(x)
    perturbed(model)
    plain = [np.asarray(a) for a in model.retrieve(x["history_ids"], x["target_id"])]
    model.materialize()
    tables = model.serving_tables()
    assert {"retrieval", "packed", "route_thresholds", "fused", "query", "key_value", "context"} <= set(tables.names())
    packed = np.asarray(tables["packed"])
    assert packed[0] == packed[1] == packed[7] == NO_SID and packed[2:7].max() < 1 << 5  # fields of 2 + 2 + 1 bits
    served = [np.asarray(a) for a in model.retrieve(x["history_ids"], x["target_id"], tables=tables)]
    np.testing.assert_array_equal(served[1], plain[1])
    np.testing.assert_array_equal(np.where(served[1], served[0], 0), np.where(plain[1], plain[0], 0))


def test_packed_route_match_equals_shared_prefix_of_every_item_pair():
    """The one-XOR route match of a materialised model against the shared prefix length of
    the `(V, L)` codes, for every (behaviour, target) pair of the catalogue (targets and
    behaviours without SID included)."""
    model = r2led(route_levels=[1, 2, 3, 2])  # repeated levels are allowed, any order
    model(features())
    model.materialize()
    codes = np.asarray(model.item_sids)
    history = np.tile(np.arange(V, dtype="int32"), (V, 1))  # row t: every item, target t
    targets = np.arange(V, dtype="int32")
    view = model.semantic_view(history, targets, model.serving_tables())
    shared = np.zeros((V, V), int)  # reference: leading levels equal, the target's code present
    for t, h in np.ndindex(V, V):
        while shared[t, h] < 3 and codes[t, shared[t, h]] >= 0 and codes[h, shared[t, h]] == codes[t, shared[t, h]]:
            shared[t, h] += 1
    expected = shared[:, None, :] >= np.array([1, 2, 3, 2])[None, :, None]
    np.testing.assert_array_equal(np.asarray(view["route_match"]), expected)
    assert expected[2:].any() and not expected[:2].any() and not expected[:, :, :2].any()


def reference_retrieval(similarity, shared, valid, levels, k):
    """Per-route boost retrieval, one row and one route at a time: prefix matches by
    similarity, then non-matches by similarity, ties -> the more recent behaviour."""
    batch, length = similarity.shape
    indices = np.zeros((batch, len(levels), k), int)
    mask = np.zeros((batch, len(levels), k), bool)
    for (b, r), level in ((br, levels[br[1]]) for br in np.ndindex(batch, len(levels))):
        order = sorted((h for h in range(length) if valid[b, h]),
                       key=lambda h: (shared[b, h] < level, -similarity[b, h], -h))[:k]
        indices[b, r, :len(order)], mask[b, r, :len(order)] = order, True
    return indices, mask


@pytest.mark.parametrize("served", [False, True])
def test_r2led_retrieval_equals_a_per_route_reference(served):
    """Training and served retrieval against `reference_retrieval` on long histories with
    repeated items (ties broken by recency) and every kind of SID (none, partial match)."""
    model = R2LED(V, sids(np.random.default_rng(0)), sid_codebook_sizes=[3, 4, 2], embedding_dim=8, top_k=6)
    rng = np.random.default_rng(5)
    length = 64
    lengths = rng.integers(1, length + 1, B)
    ids = np.where(np.arange(length)[None] < lengths[:, None], rng.integers(1, 12, (B, length)), 0).astype("int32")
    targets = np.array([2, 3, 7, 1, 5, 9], "int32")  # 7 and 1: targets without SID
    model({"history_ids": ids, "target_id": targets})
    perturbed(model)
    if served:
        model.materialize()
    indices, mask = (np.asarray(a) for a in model.retrieve(ids, targets, tables=model.serving_tables()))
    table = np.asarray(model.item_encoder.all_items())
    table = table / np.linalg.norm(table, axis=1, keepdims=True)
    codes = np.asarray(model.item_sids)
    shared = np.zeros(ids.shape, int)
    for b, h in np.ndindex(*ids.shape):
        t, i = codes[targets[b]], codes[ids[b, h]]
        while shared[b, h] < 3 and t[shared[b, h]] >= 0 and i[shared[b, h]] == t[shared[b, h]]:
            shared[b, h] += 1
    similarity = np.einsum("bhd,bd->bh", table[ids], table[targets])
    ref_indices, ref_mask = reference_retrieval(similarity, shared, ids > 0, [1, 2, 3], 6)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_array_equal(np.where(mask, indices, 0), ref_indices)


def test_behaviour_scores_through_the_catalogue_equal_per_behaviour():
    rng = np.random.default_rng(7)
    table, query = rng.normal(size=(V, 5)).astype("float32"), rng.normal(size=(B, 5)).astype("float32")
    ids = rng.integers(0, V, (B, H)).astype("int32")
    expected = np.einsum("bhd,bd->bh", table[ids], query)
    for catalogue in (True, False, None):
        np.testing.assert_allclose(np.asarray(behaviour_scores(query, table, ids, catalogue)), expected, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(take_rows(table[None].repeat(B, 0), ids)), table[ids])


def test_context_rows_of_positions_equal_the_gathered_tokens():
    model = r2led()
    x = features()
    model(x)
    positions = np.random.default_rng(6).integers(0, H, (B, 7)).astype("int32")
    every = np.asarray(model.context_rows(x))  # (B, H)
    np.testing.assert_array_equal(every, np.asarray(model.behaviour_context(x, as_tokens=True)))
    np.testing.assert_array_equal(np.asarray(model.context_rows(x, positions)),
                                  np.take_along_axis(every, positions, axis=1))


def test_partial_sids_are_not_packed():
    rng = np.random.default_rng(0)
    codes = sids(rng)
    codes[9, 2] = -1  # a level-2 prefix without its last code: packing would not be exact
    model = R2LED(V, codes, sid_codebook_sizes=[3, 4, 2], embedding_dim=8, top_k=4)
    x = features()
    model(x)
    plain = np.asarray(model(x))
    model.materialize()
    assert "packed" not in model.serving_tables()
    np.testing.assert_allclose(np.asarray(model(x)), plain, atol=ATOL)


def test_din_has_nothing_to_precompute_and_fit_drops_tables():
    din = build_ctr_baseline("din", V, embedding_dim=8, top_k=5)
    x = features()
    din(x)
    assert not din.materialize().materialized
    twin = build_ctr_baseline("twin", V, embedding_dim=8, top_k=5)
    twin(x)
    twin.compile()
    twin.materialize()
    twin.fit(x, np.ones(B, "float32"), epochs=1, verbose=0)
    assert not twin.materialized


def test_materialize_needs_a_built_model():
    with pytest.raises(ValueError, match="built model"):
        build_ctr_baseline("full", V, embedding_dim=8).materialize()

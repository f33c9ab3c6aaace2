"""Serving precomputation (`CTRModel.materialize`): precomputed and training-path scores agree.

Tolerance: 1e-5 absolute on click probabilities (float32 rounding: projections of a
sum vs sums of projections, gathers of a normalised table vs normalising gathered rows)."""

import numpy as np
import pytest

from tfrec.models.ctr_baselines import build_ctr_baseline
from tfrec.models.r2led import R2LED

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
    assert {"retrieval", "packed", "fused", "query", "key_value", "context"} <= set(tables.names())
    packed = np.asarray(tables["packed"])
    assert packed[0] == packed[1] == packed[7] == -1 and packed[2:7].min() >= 0
    served = [np.asarray(a) for a in model.retrieve(x["history_ids"], x["target_id"], tables=tables)]
    np.testing.assert_array_equal(served[1], plain[1])
    np.testing.assert_array_equal(np.where(served[1], served[0], 0), np.where(plain[1], plain[0], 0))


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

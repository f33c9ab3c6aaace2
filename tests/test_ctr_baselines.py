"""Tests for TargetAttention and the CTR baselines (DIN, SIM-hard, SIM-soft, ETA, TWIN, full).

Each selector picks exactly the expected behaviours of a hand-built history; padding
is never selected nor attended (outputs do not change when padding is added or a
masked behaviour changes); models round-trip through `keras.saving`; bad
arguments and inputs raise errors naming the problem. Models are tiny (dim 8).
"""

import json

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from layer_testing import assert_serialization_round_trips
from tfrec.data.lifelong import build_lifelong_data, lifelong_dataset
from tfrec.layers.target_attention import TargetAttention
from tfrec.metrics import auc
from tfrec.models.ctr_baselines import CTR_BASELINES, TargetAttentionCTR, build_ctr_baseline, evaluate_ctr

V, D = 12, 8
GENRES = np.zeros((V, 2), np.int32)  # genre ids 2 = "X", 3 = "Y", 4 = "Z"
GENRES[2:] = [[2, 0], [3, 0], [2, 3], [4, 0], [3, 4], [2, 0], [4, 0], [3, 0], [2, 4], [4, 0]]
SEMANTIC = np.random.default_rng(0).normal(size=(V, 4)).astype("float32")
HISTORY = np.array([[2, 3, 4, 5, 6, 7, 0, 0], [8, 9, 0, 0, 0, 0, 0, 0]], np.int32)
TARGETS = np.array([10, 11], np.int32)


def make(name, **kwargs):
    keras.utils.set_random_seed(0)
    return build_ctr_baseline(name, V, embedding_dim=D, mlp_units=(8,), item_genres=GENRES,
                              item_semantic=SEMANTIC, **kwargs)


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def selected(model, history=HISTORY, targets=TARGETS):
    """Selected positions per row, in the order returned, masked ones dropped."""
    indices, mask = model.select(tf.constant(history), tf.constant(targets))
    return [[int(i) for i, m in zip(row_i, row_m) if m] for row_i, row_m in zip(numpy(indices), numpy(mask))]


# ----------------------------------------------------------------- TargetAttention
@pytest.mark.parametrize("form", ["dot", "mlp"])
def test_target_attention_masking_and_round_trip(form, tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    query, keys = rng.normal(size=(3, D)).astype("float32"), rng.normal(size=(3, 5, D)).astype("float32")
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
    layer = TargetAttention(form=form, num_heads=2)
    out = numpy(layer(query, keys, mask))
    assert out.shape == (3, D) and np.isfinite(out).all()
    for w in layer.weights:  # non-zero biases must not leak into empty rows
        w.assign(w + 0.1)
    out = numpy(layer(query, keys, mask))
    np.testing.assert_array_equal(out[2], np.zeros(D))  # nothing to attend -> zeros
    changed = keys.copy()
    changed[0, 2:] = 100.0  # masked behaviours of row 0
    np.testing.assert_allclose(numpy(layer(query, changed, mask))[0], out[0], atol=1e-6)
    assert not np.allclose(numpy(layer(query, changed, None))[0], out[0], atol=1e-3)
    # Rank-3 queries (one per route) give the same as flattening the routes.
    routes = numpy(layer(np.stack([query, query], 1), np.stack([keys, keys], 1), np.stack([mask, mask], 1)))
    np.testing.assert_allclose(routes[:, 1], out, atol=1e-6)
    assert_serialization_round_trips(layer, (query, keys, mask), out, tmp_path)


def test_target_attention_logits_from_projected_keys_equal_direct():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(1)
    table, query = rng.normal(size=(V, D)).astype("float32"), rng.normal(size=(2, D)).astype("float32")
    layer = TargetAttention(num_heads=2)
    layer(query, table[HISTORY])
    direct = numpy(layer.logits(query, keys=table[HISTORY]))
    projected = numpy(layer.logits(query, projected_keys=keras.ops.take(layer.project_keys(table), HISTORY, axis=0)))
    assert direct.shape == (2, HISTORY.shape[1])
    np.testing.assert_allclose(projected, direct, atol=1e-5)


def test_target_attention_mlp_unnormalised_weights_sum_keys():
    layer = TargetAttention(form="mlp", normalize="none", hidden_units=(4,))
    keys = np.ones((1, 3, D), "float32")
    layer(np.ones((1, D), "float32"), keys)
    layer.mlp[-1].kernel.assign(np.zeros((4, 1)))
    layer.mlp[-1].bias.assign([2.0])  # every weight = 2, no softmax
    out = numpy(layer(np.ones((1, D), "float32"), keys, np.array([[1, 1, 0]], bool)))
    np.testing.assert_allclose(out, np.full((1, D), 4.0))  # 2 * 1 + 2 * 1, the masked key ignored


@pytest.mark.parametrize("kwargs, match", [
    (dict(form="conv"), "form"), (dict(normalize="sum"), "normalize"),
    (dict(form="dot", normalize="none"), "softmax"), (dict(dropout=1.0), "dropout"),
])
def test_target_attention_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TargetAttention(**kwargs)


def test_target_attention_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        TargetAttention(num_heads=3)(np.ones((1, D), "float32"), np.ones((1, 2, D), "float32"))
    with pytest.raises(ValueError, match="dims equal"):
        TargetAttention(form="mlp")(np.ones((1, 4), "float32"), np.ones((1, 2, D), "float32"))


# ----------------------------------------------------------------------- selectors
def test_din_keeps_the_most_recent_behaviours():
    model = make("din", top_k=3)
    assert selected(model) == [[5, 4, 3], [1, 0]]  # row 1 has only two behaviours


def test_sim_hard_keeps_recent_behaviours_sharing_a_genre():
    model = make("sim-hard", top_k=2)
    # Target 10 has genres {X, Z}: items 2 (X), 4 (X,Y), 5 (Z), 6 (Y,Z), 7 (X) share one, item 3 (Y)
    # does not; target 11 has {Z}: item 8 (Z) shares, item 9 (Y) does not.
    assert selected(model) == [[5, 4]] + [[0]]
    assert selected(make("sim-hard", top_k=8)) == [[5, 4, 3, 2, 0], [0]]


def test_sim_soft_ranks_by_semantic_inner_product():
    model = make("sim-soft", top_k=3)
    scores = SEMANTIC[HISTORY[0, :6]] @ SEMANTIC[10]
    assert selected(model)[0] == np.argsort(-scores)[:3].tolist()
    assert selected(model)[1] == np.argsort(-(SEMANTIC[[8, 9]] @ SEMANTIC[11]))[:2].tolist()


def test_eta_ranks_by_simhash_agreement():
    model = make("eta", top_k=2, simhash_bits=64)
    model(({"history_ids": HISTORY, "target_id": TARGETS}))
    table = np.random.default_rng(2).normal(size=(V, D)).astype("float32")
    table[4] = table[10] * 3.0  # same direction as the target: every bit agrees
    table[6] = -table[10]  # opposite: every bit differs
    table[7] = table[10] + 0.05 * table[3]  # nearly the same direction
    model.item_encoder.embedding.embeddings.assign(table)
    assert sorted(selected(model, HISTORY[:1], TARGETS[:1])[0]) == [2, 5]  # items 4 and 7
    model.top_k = 8
    everything = selected(model, HISTORY[:1], TARGETS[:1])[0]
    assert len(everything) == 6 and everything[-1] == 4  # item 6, every bit differs, ranks last


def test_twin_retrieves_with_its_own_attention_logits():
    model = make("twin", top_k=3)
    model({"history_ids": HISTORY, "target_id": TARGETS})
    logits = numpy(model.attention.logits(model.item_encoder(TARGETS), keys=model.item_encoder(HISTORY)))
    assert selected(model)[0] == np.argsort(-logits[0, :6], kind="stable")[:3].tolist()
    assert selected(model)[1] == np.argsort(-logits[1, :2], kind="stable")[:2].tolist()


def test_full_attends_to_every_behaviour():
    assert selected(make("full")) == [[0, 1, 2, 3, 4, 5], [0, 1]]


def test_ties_go_to_the_more_recent_behaviour():
    # Identical semantic vectors: every score ties, so the most recent behaviours win.
    model = TargetAttentionCTR(V, D, selector="semantic", top_k=2, item_semantic=np.ones((V, 3), "float32"))
    assert selected(model) == [[5, 4], [1, 0]]


# ----------------------------------------------------------- models: masks, saving
@pytest.mark.parametrize("name", sorted(CTR_BASELINES))
def test_padding_invariance_and_save_load(name, tmp_path):
    model = make(name, top_k=3)
    x = {"history_ids": HISTORY, "target_id": TARGETS}
    want = numpy(model(x))
    assert want.shape == (2,) and ((want > 0) & (want < 1)).all()
    wider = {"history_ids": np.pad(HISTORY, [(0, 0), (0, 5)]), "target_id": TARGETS[:, None]}
    np.testing.assert_allclose(numpy(model(wider)), want, atol=1e-6)
    scores = numpy(model.score(HISTORY, np.stack([TARGETS, TARGETS[::-1]], 1)))
    np.testing.assert_allclose(scores[:, 0], want, atol=1e-6)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is TargetAttentionCTR and loaded.get_config() == model.get_config()
    np.testing.assert_allclose(numpy(loaded(x)), want, atol=1e-6)
    json.dumps(model.get_config())


def test_static_tables_are_weights_and_config_holds_shapes():
    model = make("sim-hard")
    config = model.get_config()
    assert config["item_genres"] == {"shape": [V, 2]} and config["item_semantic"] == {"shape": [V, 4]}
    np.testing.assert_array_equal(numpy(model.item_genres), GENRES)
    clone = TargetAttentionCTR.from_config(config)  # tables come back as zeros until weights are loaded
    assert numpy(clone.item_genres).shape == (V, 2) and not numpy(clone.item_genres).any()
    assert all(w is not model.item_genres for w in model.trainable_weights)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(name="pnn"), ValueError, "unknown CTR baseline"),
    (dict(name="sim-hard", item_genres=None), ValueError, "needs item_genres"),
    (dict(name="sim-soft", item_semantic=None), ValueError, "needs item_semantic"),
    (dict(name="twin", attention_form="mlp"), ValueError, "attention_form='dot'"),
    (dict(name="din", top_k=0), ValueError, "top_k"),
    (dict(name="sim-hard", item_genres=np.zeros((V - 1, 2))), ValueError, "one row per item id"),
])
def test_bad_arguments(kwargs, error, match):
    kwargs = {"item_genres": GENRES, "item_semantic": SEMANTIC, **kwargs}
    name = kwargs.pop("name")
    with pytest.raises(error, match=match):
        build_ctr_baseline(name, V, embedding_dim=D, **kwargs)


def test_bad_inputs():
    model = make("din")
    with pytest.raises(KeyError, match="target_id"):
        model({"history_ids": HISTORY})
    with pytest.raises(ValueError, match="history_ids must be"):
        model({"history_ids": HISTORY[0], "target_id": TARGETS})
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        model.score(HISTORY, np.array([[3], [12]]))


def test_fit_and_evaluate_ctr_on_lifelong_batches():
    log = pd.DataFrame({"user_id": ["u1", "u2"] * 12, "item_id": [str(i % 7) for i in range(24)],
                        "timestamp": np.arange(24), "label": [float(i % 3 == 0) for i in range(24)]})
    data = build_lifelong_data(log, valid_fraction=0.2, test_fraction=0.25)
    model = build_ctr_baseline("full", data.item_vocab.size, embedding_dim=D, mlp_units=(8,))
    model.compile()
    history = model.fit(lifelong_dataset(data, "train", batch_size=4, max_history=8), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    test = lifelong_dataset(data, "test", batch_size=8, max_history=8)
    result = evaluate_ctr(model, test, groups=data.splits["test"].user)
    predictions = np.concatenate([numpy(model(x)) for x, _ in test])
    assert result["num_samples"] == len(data.splits["test"]) == len(predictions)
    assert result["auc"] == pytest.approx(auc(data.splits["test"].label, predictions), abs=1e-6)
    assert set(result) == {"auc", "logloss", "gauc", "num_samples"}

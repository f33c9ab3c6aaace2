"""Tests for the DMESR layers: InfoNCE / `ContrastiveAligner`, `CrossAttentionFuser`,
`DMESRItemEncoder`.

Hand-computed InfoNCE, the folded cross-attention against a textbook
(per-token projection) reference in numpy, masking (masked views and padded
tokens get exactly zero weight and cannot change an output), the ID fallback
for items without semantics, config round trips, the ablation switches, and the
synthetic alignment test of the issue (two noisy views of shared latent item
factors). Tables are tiny (vocab 12-202, dims <= 16): the file runs in seconds.
"""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfrec.layers.contrastive import ContrastiveAligner, info_nce
from tfrec.layers.cross_attention_fusion import CoAttentionFuser, CrossAttentionFuser
from layer_testing import assert_keras_file_round_trip, assert_serialization_round_trips, run_layer_test
from tfrec.config import DMESRConfig
from tfrec.layers.dmesr_encoder import DMESRItemEncoder, content_groups

V = 12  # ids 0..11, items 2..11
DIM = 8


def np_(x):
    return keras.ops.convert_to_numpy(x)


def make_features(seed=0, coarse_dim=DIM, num_tokens=4, token_dim=5):
    """Random features; item 5 has no semantics at all, item 3 lacks view 0, item 4 has no tokens."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(V, 2, coarse_dim)).astype("float32")
    coarse_mask = np.ones((V, 2), bool)
    coarse_mask[3, 0] = False
    tokens = rng.normal(size=(V, num_tokens, token_dim)).astype("float32")
    token_mask = np.arange(num_tokens)[None, :] < rng.integers(1, num_tokens + 1, V)[:, None]
    token_mask[4] = False
    attributes = rng.integers(1, 6, size=(V, 3)) * (rng.random((V, 3)) < 0.7)
    attributes[:, 0] = np.maximum(attributes[:, 0], 1)
    coarse_mask[5] = False
    token_mask[5] = False
    attributes[5] = 0
    return dict(coarse=coarse, coarse_mask=coarse_mask, tokens=tokens, token_mask=token_mask,
                attributes=attributes)


def make_encoder(seed=0, features=None, view_names=("title", "generated"), **config):
    keras.utils.set_random_seed(seed)
    config = DMESRConfig(**{"dropout": 0.0, **config})
    encoder = DMESRItemEncoder(V, DIM, config=config, features=make_features() if features is None else features,
                               view_names=view_names, name="enc")
    encoder.build()  # weights drawn right after the seed is set
    return encoder


def copy_weights(src, dst):
    """Copy weights between two layers by weight path (they may hold different sets)."""
    dst.all_items()  # build
    values = {w.path: w for w in src.weights}
    for w in dst.weights:
        if w.path in values:
            w.assign(values[w.path])


# ------------------------------------------------------------------------- InfoNCE
def test_info_nce_hand_computed_2x2():
    a = np.array([[1.0, 0.0], [0.0, 1.0]], "float32")
    b = np.array([[1.0, 0.0], [0.6, 0.8]], "float32")
    # logits = a b^T / 0.5 = [[2, 1.2], [0, 1.6]]
    a_to_b = math.log1p(math.exp(-0.8)) + math.log1p(math.exp(-1.6))  # rows
    b_to_a = math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-0.4))  # columns
    expected = 0.5 * (a_to_b + b_to_a) / 2
    assert float(info_nce(a, b, 0.5)) == pytest.approx(expected, rel=1e-6)
    # A masked third row is neither anchor nor negative.
    a3 = np.concatenate([a, [[5.0, -3.0]]]).astype("float32")
    b3 = np.concatenate([b, [[-2.0, 7.0]]]).astype("float32")
    assert float(info_nce(a3, b3, 0.5, np.array([True, True, False]))) == pytest.approx(expected, rel=1e-6)
    # One valid row: nothing to contrast with -> 0; no valid row -> 0 (not NaN).
    assert float(info_nce(a, b, 0.5, np.array([True, False]))) == pytest.approx(0.0, abs=1e-7)
    assert float(info_nce(a, b, 0.5, np.array([False, False]))) == 0.0


def test_aligner_matches_info_nce_and_ignores_masked_views():
    rng = np.random.default_rng(0)
    views = rng.normal(size=(5, 3, DIM)).astype("float32")
    mask = np.ones((5, 3), bool)
    mask[1, 2] = mask[3, 0] = False
    keras.utils.set_random_seed(0)
    aligner = ContrastiveAligner(3, head_layers=1, temperature=0.2, pairs=[(0, 2), (1, 2)])
    loss = float(aligner(views, mask))
    z = np_(aligner.project(views))
    want = np.mean([float(info_nce(z[:, i], z[:, j], 0.2, mask[:, i] & mask[:, j])) for i, j in [(0, 2), (1, 2)]])
    assert loss == pytest.approx(want, rel=1e-5)
    changed = views.copy()
    changed[1, 2] = changed[3, 0] = 100.0  # masked views
    assert float(aligner(changed, mask)) == pytest.approx(loss, rel=1e-6)
    assert len(aligner.trainable_weights) == 6  # 3 linear heads, the temperature is fixed


def test_aligner_config_round_trip_and_options(tmp_path):
    aligner = ContrastiveAligner(3, projection_dim=4, head_layers=2, shared_heads=True, temperature=0.05,
                                 learnable_temperature=True, pairs=[(0, 1)])
    views = np.random.default_rng(0).normal(size=(4, 3, DIM)).astype("float32")
    assert_serialization_round_trips(aligner, views, np_(aligner(views)), tmp_path, atol=1e-5, fixed_dims=True)
    assert len(aligner.trainable_weights) == 5  # one shared 2-layer head + log(1/temperature)
    assert float(np_(aligner.log_inverse_temperature)) == pytest.approx(math.log(20.0), rel=1e-6)
    assert ContrastiveAligner(2, head_layers=0).get_config()["pairs"] == [[0, 1]]


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_views=1), "at least 2 views"),
    (dict(num_views=2, pairs=[(0, 0)]), "two different views"),
    (dict(num_views=2, pairs=[(0, 2)]), "two different views"),
    (dict(num_views=2, head_layers=3), "head_layers must be"),
    (dict(num_views=2, temperature=0.0), "temperature must be positive"),
    (dict(num_views=2, head_layers=0, projection_dim=4), "projection_dim needs a head"),
])
def test_aligner_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ContrastiveAligner(**kwargs)


# ------------------------------------------------------------------------- fuser
def fuser_inputs(seed=0, batch=5, num_views=3, num_tokens=4, token_dim=6):
    """Row 0 complete; row 1 one masked view + padded tokens; row 2 no views; row 3 no tokens; row 4 nothing."""
    rng = np.random.default_rng(seed)
    view_mask = np.ones((batch, num_views), bool)
    token_mask = np.ones((batch, num_tokens), bool)
    view_mask[1, min(1, num_views - 1)] = num_views == 1  # (one view: keep it)
    token_mask[1, 2:] = False
    view_mask[2] = False
    token_mask[3] = False
    view_mask[4] = token_mask[4] = False
    return {
        "views": rng.normal(size=(batch, num_views, DIM)).astype("float32"),
        "view_mask": view_mask,
        "tokens": rng.normal(size=(batch, num_tokens, token_dim)).astype("float32"),
        "token_mask": token_mask,
    }


def randomize(layer, seed=1):
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.normal(scale=0.5, size=w.shape).astype("float32") for w in layer.get_weights()])


def _softmax(scores, mask):
    scores = np.where(mask, scores, -np.inf)
    top = np.max(np.where(mask, scores, -1e30), axis=-1, keepdims=True)
    e = np.where(mask, np.exp(scores - top), 0.0)
    return e / np.maximum(e.sum(-1, keepdims=True), 1e-30)


def _layer_norm(x, norm):
    gamma, beta = np_(norm.gamma), np_(norm.beta)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + norm.epsilon) * gamma + beta


def reference_fusion(f, inputs):
    """Textbook bidirectional cross-attention: every token projected to keys/queries/values."""
    w = {v.path.split("/")[-1]: np_(v).astype("float64") for v in f.weights}
    x, s = inputs["views"].astype("float64"), inputs["tokens"].astype("float64")
    vm, tm = inputs["view_mask"], inputs["token_mask"]
    scale = 1.0 / math.sqrt(w["view_query_bias"].shape[-1])
    # views -> tokens
    q = np.einsum("bvd,dhk->bhvk", x, w["view_query_kernel"]) + w["view_query_bias"][None, :, None]
    k = np.einsum("bte,ehk->bhtk", s, w["token_key_kernel"])
    v = np.einsum("bte,ehk->bhtk", s, w["token_value_kernel"]) + w["token_value_bias"][None, :, None]
    a = _softmax(np.einsum("bhvk,bhtk->bhvt", q, k) * scale, tm[:, None, None, :])
    out = np.einsum("bhvt,bhtk,hkd->bvd", a, v, w["view_output_kernel"])
    out = out + w["view_output_bias"] * tm.any(1)[:, None, None]
    h = _layer_norm(x + out, f.view_norm)
    views = (h * vm[..., None]).sum(1) / np.maximum(vm.sum(1), 1)[:, None]
    # tokens -> views
    q = np.einsum("bte,ehk->bhtk", s, w["token_query_kernel"]) + w["token_query_bias"][None, :, None]
    k = np.einsum("bvd,dhk->bhvk", x, w["view_key_kernel"])
    v = np.einsum("bvd,dhk->bhvk", x, w["view_value_kernel"]) + w["view_value_bias"][None, :, None]
    a2 = _softmax(np.einsum("bhtk,bhvk->bhtv", q, k) * scale, vm[:, None, None, :])
    out = np.einsum("bhtv,bhvk,hkd->btd", a2, v, w["text_output_kernel"])
    out = out + w["text_output_bias"] * vm.any(1)[:, None, None]
    per_token = s @ w["token_projection_kernel"] + w["token_projection_bias"] + out  # (b, t, dm)
    pooled = (per_token * tm[..., None]).sum(1) / np.maximum(tm.sum(1), 1)[:, None]
    text = _layer_norm(pooled, f.text_norm) * tm.any(1)[:, None]
    return views, text, a, a2


@pytest.mark.parametrize("num_heads, key_dim", [(1, None), (2, None), (2, 3)])
def test_fuser_equals_textbook_attention(num_heads, key_dim):
    inputs = fuser_inputs()
    keras.utils.set_random_seed(0)
    fuser = CrossAttentionFuser(num_heads=num_heads, key_dim=key_dim)
    fuser(inputs)
    randomize(fuser)
    out = fuser(inputs, return_attention=True)
    views, text, a, a2 = reference_fusion(fuser, inputs)
    np.testing.assert_allclose(np_(out["views"]), views, atol=2e-5)
    np.testing.assert_allclose(np_(out["text"]), text, atol=2e-5)
    np.testing.assert_allclose(np_(out["view_attention"]), a, atol=1e-6)
    np.testing.assert_allclose(np_(out["token_attention"]), a2, atol=1e-6)
    assert len(fuser.trainable_weights) == 20  # 16 kernels/biases + 2 LayerNorms x 2


def test_fuser_masks():
    inputs = fuser_inputs()
    keras.utils.set_random_seed(0)
    fuser = CrossAttentionFuser(num_heads=2)
    fuser(inputs)
    randomize(fuser)
    out = {k: np_(v) for k, v in fuser(inputs, return_attention=True).items()}
    tm, vm = inputs["token_mask"], inputs["view_mask"]
    # Padded tokens and masked views get exactly zero weight; real keys sum to 1.
    assert np.all(out["view_attention"][np.broadcast_to(~tm[:, None, None, :], out["view_attention"].shape)] == 0)
    assert np.all(out["token_attention"][np.broadcast_to(~vm[:, None, None, :], out["token_attention"].shape)] == 0)
    np.testing.assert_allclose(out["view_attention"][0].sum(-1), 1.0, rtol=1e-6)
    # Queries without keys attend nothing: no views / no tokens give zero vectors.
    assert np.all(out["view_attention"][[3, 4]] == 0) and np.all(out["token_attention"][[2, 4]] == 0)
    np.testing.assert_array_equal(out["views"][[2, 4]], 0.0)
    np.testing.assert_array_equal(out["text"][[3, 4]], 0.0)
    assert np.all(np.abs(out["views"][[0, 1, 3]]).sum(-1) > 0) and np.all(np.abs(out["text"][[0, 1, 2]]).sum(-1) > 0)
    # Garbage in masked views / padded tokens changes nothing.
    changed = {k: v.copy() for k, v in inputs.items()}
    changed["views"][~vm] = 1e3
    changed["tokens"][~tm] = -1e3
    again = fuser(changed)
    np.testing.assert_allclose(np_(again["views"]), out["views"], atol=1e-5)
    np.testing.assert_allclose(np_(again["text"]), out["text"], atol=1e-5)


def test_fuser_config_round_trip_and_dropout(tmp_path):
    inputs = fuser_inputs()
    fuser = CrossAttentionFuser(num_heads=2, key_dim=3, dropout=0.5, layer_norm_epsilon=1e-5)
    out = fuser(inputs)
    assert_serialization_round_trips(fuser, inputs, {k: np_(v) for k, v in out.items()}, tmp_path, atol=1e-5,
                                     fixed_dims=True)
    # Dropout acts only in training.
    assert not np.allclose(np_(fuser(inputs, training=True)["text"]), np_(out["text"]))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        CrossAttentionFuser(num_heads=3)(inputs)


# ------------------------------------------------------------------------- encoder
# ------------------------------------------------------------------------- InfoNCE content groups
def test_info_nce_excludes_items_with_identical_content_as_negatives():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 3)).astype("float32")
    b = rng.normal(size=(4, 3)).astype("float32")
    groups = np.array([1, 2, 1, 3])  # rows 0 and 2 share content
    got = float(info_nce(a, b, 0.5, groups_a=groups))
    logits = a @ b.T / 0.5
    ok = ~((groups[:, None] == groups[None, :]) & ~np.eye(4, dtype=bool))
    masked = np.where(ok, logits, -np.inf)
    lse_r = np.log(np.exp(masked).sum(1))
    lse_c = np.log(np.exp(masked).sum(0))
    want = 0.5 * np.mean(lse_r - np.diag(logits) + lse_c - np.diag(logits))
    assert got == pytest.approx(want, rel=1e-5)
    assert got != pytest.approx(float(info_nce(a, b, 0.5)), rel=1e-3)
    # Groups of either view exclude the pair; all-distinct groups change nothing.
    assert float(info_nce(a, b, 0.5, groups_b=groups)) == pytest.approx(got, rel=1e-6)
    assert float(info_nce(a, b, 0.5, groups_a=np.arange(4))) == pytest.approx(float(info_nce(a, b, 0.5)), rel=1e-6)


def test_content_groups():
    coarse = np.zeros((5, 1, 3), "float32")
    coarse[2, 0] = coarse[4, 0] = [1, 2, 3]
    coarse[3, 0] = [1, 2, 3.5]
    attributes = np.array([[0, 0], [0, 0], [7, 8], [8, 7], [9, 0]])
    groups = content_groups(coarse, None, attributes)
    assert groups.shape == (5, 2) and groups.dtype == np.int32
    assert groups[0, 0] == 0 and groups[2, 0] == groups[4, 0] != groups[3, 0]
    assert groups[2, 1] == groups[3, 1] != groups[4, 1] and groups[1, 1] == 0


# ------------------------------------------------------------------------- DMESRItemEncoder
@pytest.mark.parametrize("combine", ["add", "concat", "gate", "dual_view"])
def test_encoder_shapes_and_lookup_equals_catalog(combine):
    encoder = make_encoder(combine=combine)
    ids = np.array([[2, 3, 5, 0], [11, 2, 4, 6]])
    out = np_(encoder(ids))
    assert out.shape == (2, 4, DIM)
    table = np_(encoder.all_items())
    assert table.shape == (V, DIM)
    np.testing.assert_allclose(out, table[ids], atol=1e-5)


@pytest.mark.parametrize("combine", ["add", "gate", "dual_view"])
def test_item_without_semantics_gets_its_id_embedding(combine):
    encoder = make_encoder(combine=combine)
    id_vector = np_(encoder.id_encoder(np.array([5])))[0]
    item = np_(encoder(np.array([5])))[0]
    np.testing.assert_allclose(item[: len(id_vector)], id_vector, atol=1e-7)
    if combine == "dual_view":
        np.testing.assert_allclose(item[len(id_vector):], 0.0, atol=1e-7)


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_training_path_computes_the_catalogue_once_and_equals_materialize(mode):
    """The batch's rows and all_items() of a training step are one table; without dropout it equals
    `materialize()` and the inference path."""
    encoder = make_encoder(encoder=mode)
    ids = np.array([[2, 3, 4, 0], [9, 9, 11, 5]])
    out = np_(encoder(ids, training=True))
    table = encoder.all_items()
    served = encoder.materialize(batch_size=5)
    np.testing.assert_allclose(np_(table), served, atol=1e-5)
    np.testing.assert_allclose(out, served[ids], atol=1e-5)
    np.testing.assert_allclose(np_(encoder(ids)), out, atol=1e-5)
    assert encoder._step_table is None  # consumed by that all_items() call


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_every_catalogue_row_gets_gradient_in_one_training_step(mode):
    """No stale rows: after one traced training step (batch input + full softmax), the loss has a
    gradient with respect to every catalogue row's semantic input, not only the batch's."""
    encoder = make_encoder(dropout=0.1, encoder=mode)
    # the frozen rows the catalogue pass reads (the fast encoder keeps the fused coarse views apart)
    coarse = encoder.fused_coarse_table if encoder.fused_coarse_table is not None else encoder.coarse_table
    batch = np.array([[2, 3, 4]])
    targets = tf.constant([6, 7])
    user = tf.constant(np.random.default_rng(0).normal(size=(2, DIM)).astype("float32"))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch([coarse.value, encoder.token_table.value])
            inputs = encoder(batch, training=True)  # (1, 3, dim)
            logits = tf.matmul(user + tf.reduce_mean(inputs[0], 0), encoder.all_items(), transpose_b=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits))
        return tape.gradient(loss, [coarse.value, encoder.token_table.value] + encoder.trainable_weights)

    grads = step()
    coarse_grad = np.abs(np_(grads[0])).sum(axis=(1, 2))
    token_grad = np.abs(np_(grads[1])).sum(axis=(1, 2))
    mask = np_(encoder.coarse_mask_table)[:, encoder._fused_coarse].any(axis=1)
    assert np.all(coarse_grad[mask] > 0), coarse_grad  # every item with a view, in the batch or not
    has_tokens = np_(encoder.token_mask_table).any(axis=1)
    assert np.all(token_grad[has_tokens] > 0)
    assert all(g is not None for g in grads[2:])


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_semantic_part_norm_matches_the_id_part_at_initialisation(mode):
    for features in (make_features(), make_features(seed=3, coarse_dim=11)):
        encoder = make_encoder(features=features, encoder=mode)
        id_part, semantic = encoder.parts()
        ids = np.arange(2, V)
        ids = ids[np.linalg.norm(np_(semantic)[ids], axis=1) > 0]
        ratio = np.linalg.norm(np_(semantic)[ids], axis=1).mean() / np.linalg.norm(np_(id_part)[ids], axis=1).mean()
        assert 0.5 <= ratio <= 2.0, ratio


def test_residual_adapters_start_at_the_frozen_vector():
    encoder = make_encoder()
    views, mask, _ = encoder.view_vectors(np.array([2, 6]))
    coarse = make_features()["coarse"][[2, 6]]
    want = coarse / np.sqrt((coarse ** 2).mean(-1, keepdims=True))
    np.testing.assert_allclose(np_(views)[:, :2], want, atol=0.3)  # a near-zero correction on top
    assert np.corrcoef(np_(views)[:, :2].ravel(), want.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_encoder_masked_entries_do_not_matter(mode):
    features = make_features()
    changed = {k: v.copy() for k, v in features.items()}
    changed["coarse"][3, 0] = 100.0  # masked view
    changed["tokens"][~features["token_mask"]] = -50.0  # padded tokens
    a, b = make_encoder(features=features, encoder=mode), make_encoder(features=changed, encoder=mode)
    ids = np.arange(V)
    np.testing.assert_allclose(np_(a(ids)), np_(b(ids)), atol=1e-5)


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_encoder_config_round_trip(mode):
    encoder = make_encoder(combine="dual_view", align_pairs=("title:attributes",), encoder=mode)
    config = json.loads(json.dumps(encoder.get_config()))
    clone = DMESRItemEncoder.from_config(config)
    clone.build()
    assert clone.get_config() == encoder.get_config()
    assert sorted(w.path for w in clone.weights) == sorted(w.path for w in encoder.weights)
    for w, src in zip(clone.weights, encoder.weights):
        w.assign(src)
    ids = np.arange(V)
    np.testing.assert_allclose(np_(clone(ids)), np_(encoder(ids)), atol=1e-6)
    assert clone.aligner.pairs == [(0, 2)]


def test_alignment_loss_is_added_in_training_only_and_anchored_on_the_generated_view():
    encoder = make_encoder(alignment_weight=0.5)
    assert encoder.align_pairs == [(1, 0), (1, 2)]  # generated vs title, generated vs attributes
    ids = np.array([[2, 3, 4, 6, 7, 8]])
    encoder(ids)
    assert not encoder.losses
    encoder(ids, training=True)
    assert len(encoder.losses) == 1
    assert float(encoder.losses[0]) == pytest.approx(0.5 * float(encoder.alignment_loss(ids)), rel=1e-5)
    no_anchor = make_encoder(features={k: v for k, v in make_features().items() if k != "attributes"},
                             view_names=("title", "mllm_text"))
    assert no_anchor.align_pairs == [(0, 1)]


def test_degradation_and_active_parts():
    features = make_features()
    full = make_encoder()
    assert full.active_parts() == ["id", "title", "generated", "attributes", "text_tokens", "alignment", "fusion"]
    assert full.fused_view_indices == [1, 2]  # the title's pooled vector is aligned, not fused with its tokens
    generated_only = make_encoder(features={"coarse": features["coarse"][:, 1:], "coarse_mask": features["coarse_mask"][:, 1:]},
                                  view_names=("generated",))
    assert generated_only.active_parts() == ["id", "generated"]  # one view: no pair to align, no tokens to fuse
    assert generated_only.aligner is None and generated_only.fuser is None
    ids = np.arange(V)
    assert np_(generated_only(ids)).shape == (V, DIM)
    ids_only = DMESRItemEncoder(V, DIM, name="ids_only")
    assert ids_only.active_parts() == ["id"]
    np.testing.assert_allclose(np_(ids_only(ids)), np_(ids_only.id_encoder(ids)))


def test_semantic_init_table_is_used():
    init = np.random.default_rng(0).normal(size=(V, DIM)).astype("float32")
    encoder = make_encoder(features={**make_features(), "id_init": init})
    np.testing.assert_allclose(np_(encoder.id_encoder.all_items()), init)
    config = encoder.get_config()
    assert config["embeddings_initializer"]["class_name"] == "TruncatedNormal"  # the array is not config


@pytest.mark.parametrize("kwargs, match", [
    (dict(config=DMESRConfig(combine="mean")), "combine must be one of"),
    (dict(config=DMESRConfig(dropout=1.0)), "dropout must be in"),
    (dict(features={"coarse": np.zeros((V + 1, 1, 4))}, view_names=("title",)), "must have 3 axes and 12 rows"),
    (dict(features={"coarse": np.zeros((V, 1, 4))}), "must name each of the 1 coarse views"),
    (dict(features={"tokens": np.zeros((V, 2, 4))}, config=DMESRConfig(use_tokens=False)), "use_tokens is false"),
    (dict(features={"nope": np.zeros((V, 2))}), "unknown DMESR feature"),
    (dict(config={"colour": "red"}), "unknown DMESR option"),
    (dict(features={"coarse": np.zeros((V, 2, 4))}, view_names=("title", "generated"),
          config=DMESRConfig(align_pairs=("title:image",))), "align_pairs entry 'title:image'"),
])
def test_encoder_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DMESRItemEncoder(V, DIM, **kwargs)


def test_alignment_uses_at_most_align_max_items_distinct_items():
    encoder = make_encoder(align_max_items=3)
    ids = np.array([[6, 2, 6, 7, 8, 9, 3]])
    encoder(ids, training=True)
    assert float(encoder.losses[0]) == pytest.approx(0.1 * float(encoder.alignment_loss(np.array([6, 2, 7]))), rel=1e-5)


# ------------------------------------------------------------------------- fast encoder (CoAttentionFuser)
def reference_co_attention(f, inputs):
    """numpy reference of `CoAttentionFuser`, per item, straight from its docstring's formulas."""
    x, s = inputs["views"].astype(np.float64), inputs["tokens"].astype(np.float64)
    vm, tm = inputs["view_mask"], inputs["token_mask"]
    wq, wk = np_(f.query_kernel), np_(f.key_kernel)
    R, b = np_(f.token_projection_kernel), np_(f.token_projection_bias)
    h, r = f.num_heads, f.key_dim
    views_out, text_out = [], []
    for i in range(len(x)):
        V_, T_ = np.flatnonzero(vm[i]), np.flatnonzero(tm[i])
        w, c = np.zeros(s.shape[1]), np.zeros(x.shape[1])
        for head in range(h):
            q = x[i, V_] @ wq[:, head * r:(head + 1) * r]
            k = s[i, T_] @ wk[:, head * r:(head + 1) * r]
            a = q @ k.T / np.sqrt(r)  # (views, tokens)
            if len(V_) and len(T_):
                alpha = np.exp(a - a.max(1, keepdims=True)); alpha /= alpha.sum(1, keepdims=True)
                beta = np.exp(a - a.max(0, keepdims=True)); beta /= beta.sum(0, keepdims=True)
                w[T_] += alpha.mean(0) / h
                c[V_] += beta.mean(1) / h
        view_mean = x[i, V_].mean(0) if len(V_) else np.zeros(x.shape[2])
        token_mean = s[i, T_].mean(0) if len(T_) else np.zeros(s.shape[2])
        views_out.append(view_mean + (w @ s[i]) @ R)
        text_out.append(token_mean @ R + (b if len(T_) else 0.0) + c @ x[i])
    return np.array(views_out), np.array(text_out)


@pytest.mark.parametrize("num_heads, key_dim, num_views", [(1, 4, 3), (2, 3, 3), (2, 3, 1)])
def test_co_attention_fuser_equals_reference(num_heads, key_dim, num_views):
    inputs = fuser_inputs(num_views=num_views)
    f = CoAttentionFuser(num_heads, key_dim)
    f(inputs)
    randomize(f)
    views, text = reference_co_attention(f, inputs)
    parts = f(inputs, return_parts=True)
    np.testing.assert_allclose(np_(parts["views"]), views, atol=1e-4)
    np.testing.assert_allclose(np_(parts["text"]), text, atol=1e-4)
    np.testing.assert_allclose(np_(f(inputs)), views + text, atol=1e-4)  # the folded sum


def test_co_attention_fuser_masks_and_layer_contract(tmp_path):
    inputs = fuser_inputs()
    f = CoAttentionFuser(2, 4)
    f(inputs)
    randomize(f)
    changed = {k: v.copy() for k, v in inputs.items()}
    changed["views"][~inputs["view_mask"]] = 77.0
    changed["tokens"][~inputs["token_mask"]] = -9.0
    np.testing.assert_allclose(np_(f(changed)), np_(f(inputs)), atol=1e-5)
    empty = {k: v.copy() for k, v in inputs.items()}
    empty["view_mask"][:] = False
    empty["token_mask"][:] = False
    np.testing.assert_allclose(np_(f(empty)), 0.0, atol=1e-7)  # neither views nor tokens: zero
    run_layer_test(CoAttentionFuser, {"num_heads": 2, "key_dim": 4}, inputs, (5, 8), 4, tmp_path)
    with pytest.raises(ValueError, match="key_dim must be positive"):
        CoAttentionFuser(1, 0)


@pytest.mark.parametrize("mode", ["fast", "full"])
@pytest.mark.parametrize("combine", ["add", "gate"])
def test_encode_features_equals_the_materialized_semantic_part(mode, combine):
    """New items without retraining: an existing item's rows through `encode_features` give its
    table row with a zero ID part."""
    features = make_features()
    encoder = make_encoder(encoder=mode, combine=combine)
    ids = np.array([2, 3, 4, 5, 9])
    rows = {k: v[ids] for k, v in features.items()}
    got = encoder.encode_features(rows)
    id_part, semantic = encoder.parts(ids)
    want = np_(encoder._combine(keras.ops.zeros_like(id_part), semantic))
    np.testing.assert_allclose(got, want, atol=1e-5)
    if combine == "add":
        np.testing.assert_allclose(got, encoder.materialize()[ids] - np_(id_part), atol=1e-5)
    assert np.allclose(got[3], 0.0)  # item 5 has no semantics
    with pytest.raises(ValueError, match="needs exactly the features"):
        encoder.encode_features({"coarse": rows["coarse"]})
    with pytest.raises(ValueError, match="reduced space"):
        encoder.encode_features({**rows, "tokens": np.zeros((5, 4, 9))})
    with pytest.raises(ValueError, match="compact ids"):
        encoder.encode_features({**rows, "attributes": np.full((5, 3), 99)})


def test_fast_encoder_keras_file_round_trip(tmp_path):
    encoder = make_encoder()
    ids = np.array([[2, 3, 4], [5, 11, 0]])
    loaded = assert_keras_file_round_trip(encoder, ids, np_(encoder(ids)), tmp_path / "enc.keras", atol=1e-5)
    restored = next(layer for layer in loaded.layers if isinstance(layer, DMESRItemEncoder))
    np.testing.assert_allclose(restored.materialize(), encoder.materialize(), atol=1e-5)


def test_fast_encoder_options():
    encoder = make_encoder()
    assert isinstance(encoder.fuser, CoAttentionFuser) and encoder.config.encoder == "fast"
    assert encoder.fuser.num_heads == 1 and encoder.adapter_bias is None
    full = make_encoder(encoder="full")
    assert isinstance(full.fuser, CrossAttentionFuser) and full.fuser.num_heads == 2
    with pytest.raises(ValueError, match="dmesr.encoder must be one of"):
        make_encoder(encoder="turbo")
    with pytest.raises(ValueError, match="fusion_dropout applies to encoder='full'"):
        make_encoder(fusion_dropout=0.1)

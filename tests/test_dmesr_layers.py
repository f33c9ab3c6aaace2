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
from tfrec.layers.cross_attention_fusion import CrossAttentionFuser
from tfrec.layers.dmesr_encoder import DMESRItemEncoder

V = 12  # ids 0..11, items 2..11
DIM = 8


def np_(x):
    return keras.ops.convert_to_numpy(x)


def make_tables(seed=0, num_views=2, semantic_dim=6, num_tokens=4, token_dim=5):
    """Random tables; item 5 has no semantics at all, item 3 lacks view 0, item 4 has no tokens."""
    rng = np.random.default_rng(seed)
    views = rng.normal(size=(num_views, V, semantic_dim)).astype("float32")
    view_mask = np.ones((num_views, V), bool)
    view_mask[0, 3] = False
    tokens = rng.normal(size=(V, num_tokens, token_dim)).astype("float32")
    token_mask = np.arange(num_tokens)[None, :] < rng.integers(1, num_tokens + 1, V)[:, None]
    token_mask[4] = False
    attributes = rng.integers(1, 6, size=(V, 3)) * (rng.random((V, 3)) < 0.7)
    attributes[:, 0] = np.maximum(attributes[:, 0], 1)
    view_mask[:, 5] = False
    token_mask[5] = False
    attributes[5] = 0
    return dict(view_embeddings=views, view_mask=view_mask, token_states=tokens, token_mask=token_mask,
                attribute_ids=attributes)


def make_encoder(seed=0, tables=None, **kwargs):
    keras.utils.set_random_seed(seed)
    kwargs = {"dropout": 0.0, "name": "enc", **kwargs}
    encoder = DMESRItemEncoder(V, DIM, **(make_tables() if tables is None else tables), **kwargs)
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


def test_aligner_config_round_trip_and_options():
    aligner = ContrastiveAligner(3, projection_dim=4, head_layers=2, shared_heads=True, temperature=0.05,
                                 learnable_temperature=True, pairs=[(0, 1)])
    aligner(np.ones((2, 3, DIM), "float32"))
    config = aligner.get_config()
    json.dumps(config)
    clone = ContrastiveAligner.from_config(config)
    assert clone.get_config() == config
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
    view_mask[1, 1] = False
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


def test_fuser_config_round_trip_and_dropout():
    inputs = fuser_inputs()
    fuser = CrossAttentionFuser(num_heads=2, key_dim=3, dropout=0.5, layer_norm_epsilon=1e-5)
    out = fuser(inputs)
    config = fuser.get_config()
    json.dumps(config)
    clone = CrossAttentionFuser.from_config(config)
    assert clone.get_config() == config
    clone(inputs)
    clone.set_weights(fuser.get_weights())
    np.testing.assert_allclose(np_(clone(inputs)["views"]), np_(out["views"]), atol=1e-6)
    # Dropout acts only in training.
    assert not np.allclose(np_(fuser(inputs, training=True)["text"]), np_(out["text"]))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        CrossAttentionFuser(num_heads=3)(inputs)


# ------------------------------------------------------------------------- encoder
@pytest.mark.parametrize("combine", ["add", "concat", "gate", "dual_view"])
def test_encoder_shapes_and_lookup_equals_catalog(combine):
    enc = make_encoder(combine=combine)
    table = np_(enc.all_items())
    assert table.shape == (V, DIM) and np.all(np.isfinite(table))
    assert enc.output_dim == DIM and enc.vocab_size == V
    for ids in (np.array([2, 3, 3, 0]), np.array([[2, 3, 4], [5, 0, 11]]), np.arange(24).reshape(2, 3, 4) % V):
        out = np_(enc(ids))
        assert out.shape == ids.shape + (DIM,)
        np.testing.assert_allclose(out, table[ids], atol=1e-5)
    np.testing.assert_allclose(enc.materialize(batch_size=5), table, atol=1e-5)


@pytest.mark.parametrize("combine", ["add", "gate", "dual_view", "concat"])
def test_item_without_semantics_gets_its_id_embedding(combine):
    enc = make_encoder(combine=combine)
    table = np_(enc.all_items())
    id_table = np_(enc.id_encoder.all_items())
    for item in (0, 1, 5):  # padding, OOV, an item with no view, token or attribute
        if combine in ("add", "gate"):
            np.testing.assert_allclose(table[item], id_table[item], atol=1e-6)
        elif combine == "dual_view":
            np.testing.assert_allclose(table[item], np.concatenate([id_table[item], np.zeros(DIM // 2)]), atol=1e-6)
        else:  # concat: the projection of [e_id; 0; 0]
            kernel, bias = (np_(w) for w in enc.concat_projection.weights)
            np.testing.assert_allclose(table[item], id_table[item] @ kernel[: DIM] + bias, atol=1e-5)
    # Items with semantics differ from their ID vector.
    assert not np.allclose(table[2], (id_table[2] if combine != "dual_view" else table[2] * 0))


def test_encoder_masked_entries_do_not_matter():
    tables = make_tables()
    garbage = {k: np.array(v, copy=True) for k, v in tables.items()}
    garbage["view_embeddings"][~garbage["view_mask"]] = 50.0
    garbage["token_states"][~garbage["token_mask"]] = -50.0
    a, b = make_encoder(tables=tables), make_encoder(tables=garbage)
    np.testing.assert_allclose(np_(a.all_items()), np_(b.all_items()), atol=1e-5)
    # ... while a real token or a present view does matter.
    for key, index in (("token_states", (2, 0)), ("view_embeddings", (0, 2))):
        changed = {k: np.array(v, copy=True) for k, v in tables.items()}
        changed[key][index] += 3.0
        c = make_encoder(tables=changed)
        assert not np.allclose(np_(c.all_items())[2], np_(a.all_items())[2], atol=1e-4)


def test_encoder_config_round_trip():
    enc = make_encoder(combine="concat", align_pairs=[(0, 2)], fusion_key_dim=3, temperature=0.2)
    want = np_(enc.all_items())
    config = enc.get_config()
    json.dumps(config)  # plain JSON: shapes only, no tables
    assert config["num_views"] == 2 and config["num_tokens"] == 4 and config["attributes_per_item"] == 3
    serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(enc)))
    for restored in (DMESRItemEncoder.from_config(config), keras.saving.deserialize_keras_object(serialized)):
        assert type(restored) is DMESRItemEncoder and restored.get_config() == config
        restored.all_items()
        restored.set_weights(enc.get_weights())  # tables travel as weights
        np.testing.assert_allclose(np_(restored.all_items()), want, atol=1e-6)


def test_alignment_loss_is_added_in_training_only():
    enc = make_encoder(alignment_weight=0.5)
    ids = np.array([[2, 3, 4, 4, 0], [6, 7, 2, 0, 0]])
    enc(ids, training=False)
    assert enc.losses == []
    enc(ids, training=True)
    assert len(enc.losses) == 1
    unique = np.array([2, 3, 4, 6, 7])
    assert float(enc.losses[0]) == pytest.approx(0.5 * float(enc.alignment_loss(unique)), rel=1e-6)
    # Each item counts once: the duplicate 4 and the padding are no extra negatives.
    assert float(enc.alignment_loss(ids)) == pytest.approx(float(enc.alignment_loss(unique)), rel=1e-6)
    views, mask = enc.view_vectors(unique)
    manual = enc.aligner(views, mask)
    assert float(manual) == pytest.approx(float(enc.alignment_loss(unique)), rel=1e-6)
    assert np_(mask).shape == (5, 3)  # 2 semantic views + the attribute view


def test_ablation_switches():
    full = make_encoder()
    assert full.aligner is not None and full.fuser is not None
    table = np_(full.all_items())

    no_align = make_encoder(align=False)
    copy_weights(full, no_align)
    assert no_align.aligner is None
    no_align(np.array([[2, 3, 4]]), training=True)
    assert no_align.losses == []
    with pytest.raises(ValueError, match="align=False"):
        no_align.alignment_loss(np.array([2, 3]))
    np.testing.assert_allclose(np_(no_align.all_items()), table, atol=1e-6)  # alignment is a loss only

    no_fusion = make_encoder(fuse=False)
    copy_weights(full, no_fusion)
    assert no_fusion.fuser is None and no_fusion.token_projection is not None
    assert not np.allclose(np_(no_fusion.all_items())[2:], table[2:], atol=1e-4)
    # Without fusion the text vector is the projected mean of the real tokens.
    tables = make_tables()
    tokens, token_mask = tables["token_states"], tables["token_mask"]
    token_mask[:2] = False  # padding and OOV never have semantics
    mean = (tokens * token_mask[..., None]).sum(1) / np.maximum(token_mask.sum(1), 1)[:, None]
    kernel, bias = (np_(w) for w in no_fusion.token_projection.weights)
    text = (mean @ kernel + bias) * token_mask.any(1)[:, None]
    views, view_mask = (np_(t) for t in no_fusion.view_vectors())
    view_mean = (views * view_mask[..., None]).sum(1) / np.maximum(view_mask.sum(1), 1)[:, None]
    semantic = np.concatenate([view_mean, text], axis=1) @ np_(no_fusion.semantic_projection.kernel)
    id_table = np_(no_fusion.id_encoder.all_items())
    gate = 1 / (1 + np.exp(-(np.concatenate([id_table, semantic], 1) @ np_(no_fusion.gate.kernel)
                            + np_(no_fusion.gate.bias))))
    np.testing.assert_allclose(np_(no_fusion.all_items()), id_table + gate * semantic, atol=1e-5)

    no_tokens = make_encoder(use_tokens=False)
    assert no_tokens.fuser is None and no_tokens.token_projection is None and no_tokens.num_tokens is None
    assert not any("token" in w.path for w in no_tokens.weights)
    changed = make_tables()
    changed["token_states"] += 5.0
    other = make_encoder(tables=changed, use_tokens=False)
    np.testing.assert_allclose(np_(other.all_items()), np_(no_tokens.all_items()), atol=1e-6)


def test_trainable_semantics_and_shared_projection():
    frozen = make_encoder()
    assert not frozen.view_table.trainable and not frozen.token_table.trainable
    tuned = make_encoder(trainable_semantics=True, shared_view_projection=True)
    assert tuned.view_table.trainable and tuned.token_table.trainable
    assert tuple(tuned.view_projection_kernel.shape) == (6, DIM)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(tuned.all_items()))
    grads = tape.gradient(loss, [tuned.view_table, tuned.token_table])
    assert all(g is not None and np.any(np_(tf.convert_to_tensor(g)) != 0) for g in grads)


@pytest.mark.parametrize("kwargs, match", [
    (dict(combine="sum"), "combine must be one of"),
    (dict(view_embeddings=np.zeros((2, V + 1, 6))), r"view_embeddings must have shape \(2, 12, 6\)"),
    (dict(view_embeddings=np.zeros((V, 6))), "view_embeddings must have shape"),
    (dict(token_mask=np.ones((V, 3), bool)), r"token_mask must have shape \(12, 4\)"),
    (dict(attribute_ids=-np.ones((V, 3), int)), "attribute_ids must be >= 0"),
    (dict(num_views=3), "num_views=3 does not match"),
    (dict(view_embeddings=None, view_mask=None, attribute_ids=None), "align=True needs at least two views"),
])
def test_encoder_errors(kwargs, match):
    tables = {**make_tables(), **kwargs}
    with pytest.raises(ValueError, match=match):
        DMESRItemEncoder(V, DIM, **tables)


# ------------------------------------------------------------------------- synthetic alignment
def test_alignment_raises_cross_view_retrieval():
    """Two noisy views of shared latent item factors (different linear maps): training the
    alignment loss makes each item's view 0 retrieve its own view 1 among 200 items."""
    num_items, latent, dim = 200, 6, 16
    rng = np.random.default_rng(0)
    z = rng.normal(size=(num_items, latent))
    views = np.zeros((2, num_items + 2, dim), "float32")
    for v in range(2):
        mixing = rng.normal(size=(latent, dim))
        views[v, 2:] = z @ mixing + 0.3 * rng.normal(size=(num_items, dim))

    def retrieval_accuracy(encoder):
        x = np_(encoder.view_vectors()[0])[2:]  # (items, 2, dim)
        x = x / np.linalg.norm(x, axis=-1, keepdims=True)
        return float(np.mean(np.argmax(x[:, 0] @ x[:, 1].T, axis=1) == np.arange(num_items)))

    def encoder(align):
        keras.utils.set_random_seed(0)
        return DMESRItemEncoder(num_items + 2, dim, view_embeddings=views, align=align, alignment_weight=1.0,
                                combine="add", dropout=0.0, name="enc")

    unaligned, aligned = encoder(False), encoder(True)
    copy_weights(unaligned, aligned)
    optimizer = keras.optimizers.Adam(0.02)

    # The ID table gets no gradient from the alignment loss.
    variables = [v for v in aligned.trainable_variables if "id_encoder" not in v.path]

    @tf.function
    def step(ids):
        with tf.GradientTape() as tape:
            aligned(ids, training=True)
            loss = tf.add_n(aligned.losses)
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    losses = [float(step(rng.choice(np.arange(2, num_items + 2), 64, replace=False))) for _ in range(80)]
    before, after = retrieval_accuracy(unaligned), retrieval_accuracy(aligned)
    assert losses[-1] < 0.5 * losses[0], losses
    assert after > 0.8, (before, after)  # chance: 1/200; measured 0.98 (unaligned: 0.005)
    assert after > before + 0.4, (before, after)

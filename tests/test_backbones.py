"""Tests for tfrec.layers: item encoder, Transformer block, SASRec / BERT4Rec / GRU4Rec backbones.

Every layer goes through the shared `layer_testing.run_layer_test` (output
shape and dtype, weights, gradients, a symbolic call, and the `get_config`,
`serialize_keras_object` and `.keras` file round trips with the same outputs).
Then behavioural properties: causality, padding invariance, dropout only in
training, and error messages for bad shapes and arguments.

Models are tiny (dim 8, one layer) so the whole file runs in seconds.
"""

import keras
import numpy as np
import pytest
from layer_testing import run_layer_test
from tfrec.layers import (
    BERT4RecBackbone,
    GRU4RecBackbone,
    IdItemEncoder,
    SASRecBackbone,
    TransformerBackbone,
    TransformerBlock,
)

DIM = 8
SEQ_LEN = 5

# name -> (class, constructor kwargs, expected number of trainable weights).
# Transformer, 1 layer: position table 1 + block 16 (2 LayerNorms x 2, MHA q/k/v/o x
# kernel+bias 8, two Dense x 2) + output LayerNorm 2 = 19. GRU: kernel, recurrent
# kernel, bias + projection Dense 2 = 5.
BACKBONES = {
    "sasrec": (SASRecBackbone, dict(max_length=10, num_layers=1, num_heads=2, dropout=0.0), 19),
    "bert4rec": (BERT4RecBackbone, dict(max_length=10, num_layers=1, num_heads=2, dropout=0.0), 19),
    "gru4rec": (GRU4RecBackbone, dict(hidden_dim=6, num_layers=1, dropout=0.0), 5),
}
CAUSAL = ["sasrec", "gru4rec"]


def backbone_inputs(batch=2, seq_len=SEQ_LEN, dim=DIM, lengths=None, seed=0):
    """`{"item_embeddings", "padding_mask"}` with random vectors; rows right-padded to `lengths`."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(batch, seq_len, dim)).astype("float32")
    lengths = [seq_len] * batch if lengths is None else lengths
    mask = np.arange(seq_len)[None, :] < np.asarray(lengths)[:, None]
    return {"item_embeddings": emb, "padding_mask": mask}


# --------------------------------------------------------------------- layer tests
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_layer_basics(name, tmp_path):
    cls, kwargs, num_weights = BACKBONES[name]
    inputs = backbone_inputs(lengths=[SEQ_LEN, 3])
    run_layer_test(cls, kwargs, inputs, (2, SEQ_LEN, DIM), num_weights, tmp_path)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_num_layers_and_config_fields(name, num_layers):
    cls, kwargs, num_weights = BACKBONES[name]
    kwargs = {**kwargs, "num_layers": num_layers, "dropout": 0.25}
    keras.utils.set_random_seed(0)
    layer = cls(**kwargs)
    out = layer(backbone_inputs())
    assert tuple(out.shape) == (2, SEQ_LEN, DIM)
    per_layer = 16 if name != "gru4rec" else 3  # weights of one block / one GRU
    # A second GRU layer reads hidden_dim inputs; a second block is the same size.
    assert len(layer.trainable_weights) == num_weights + per_layer * (num_layers - 1)
    config = layer.get_config()
    for key, value in kwargs.items():
        assert config[key] == value
    if name != "gru4rec":
        assert config["causal"] is (name == "sasrec")
        assert layer.causal is (name == "sasrec")
    else:
        assert GRU4RecBackbone.causal is True


def test_sasrec_and_bert4rec_reject_a_contradicting_causal_kwarg():
    """The subclasses fix `causal`: a contradicting value is an error, never dropped;
    the same value (as their saved config holds) is accepted."""
    with pytest.raises(ValueError, match="SASRecBackbone is always causal=True"):
        SASRecBackbone(4, causal=False)
    with pytest.raises(ValueError, match="BERT4RecBackbone is always causal=False"):
        BERT4RecBackbone(4, causal=True)
    assert SASRecBackbone(4, causal=True).causal is True
    assert BERT4RecBackbone(4, causal=False).causal is False
    config = BERT4RecBackbone(4).get_config()
    assert config["causal"] is False
    assert BERT4RecBackbone.from_config(config).causal is False
    assert SASRecBackbone.from_config(SASRecBackbone(4).get_config()).causal is True


@pytest.mark.parametrize("normalize_first", [False, True])
def test_transformer_block_equals_keras_hub_transformer_encoder(normalize_first):
    """Same weights -> same outputs as keras_hub.layers.TransformerEncoder (why we
    keep our class anyway: the module docstring), and the position table equals
    keras_hub.layers.PositionEmbedding's."""
    import keras_hub

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, SEQ_LEN, DIM)).astype("float32")
    mask = np.tril(np.ones((SEQ_LEN, SEQ_LEN), bool))[None].repeat(2, 0)
    keras.utils.set_random_seed(0)
    ours = TransformerBlock(num_heads=2, ffn_dim=16, normalize_first=normalize_first,
                            layer_norm_epsilon=1e-6)
    ours.build(x.shape)
    hub = keras_hub.layers.TransformerEncoder(intermediate_dim=16, num_heads=2, activation="gelu",
                                              layer_norm_epsilon=1e-6, normalize_first=normalize_first)
    hub.build(x.shape)
    pairs = [(ours.attention, hub._self_attention_layer),
             (ours.attention_norm, hub._self_attention_layer_norm),
             (ours.ffn_norm, hub._feedforward_layer_norm),
             (ours.ffn_inner, hub._feedforward_intermediate_dense),
             (ours.ffn_outer, hub._feedforward_output_dense)]
    for a, b in pairs:  # random non-trivial weights (LayerNorm gammas/betas too)
        a.set_weights([rng.normal(size=w.shape).astype("float32") for w in a.get_weights()])
        b.set_weights(a.get_weights())
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(hub(x, attention_mask=mask)),
        keras.ops.convert_to_numpy(ours(x, attention_mask=mask)), rtol=1e-5, atol=1e-5)

    backbone = TransformerBackbone(max_length=10, num_layers=1, dropout=0.0)
    backbone(backbone_inputs())
    positions = keras_hub.layers.PositionEmbedding(sequence_length=10)
    positions.build((None, 10, DIM))
    positions.set_weights(backbone.position_embedding.get_weights())
    table = keras.ops.convert_to_numpy(backbone.position_embedding(np.arange(SEQ_LEN)))  # (seq, dim)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(positions(x)),  # (batch, seq, dim)
                                  np.broadcast_to(table, x.shape))


def test_transformer_backbone_ffn_dim_and_scaling(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = backbone_inputs()
    layer = TransformerBackbone(8, num_layers=1, ffn_dim=12, dropout=0.0, scale_embeddings=True)
    out = layer(inputs)
    assert tuple(out.shape) == (2, SEQ_LEN, DIM)
    assert tuple(layer.blocks[0].ffn_inner.kernel.shape) == (DIM, 12)
    # Default ffn_dim = 4 x dim.
    default = TransformerBackbone(8, num_layers=1, dropout=0.0)
    default(inputs)
    assert tuple(default.blocks[0].ffn_inner.kernel.shape) == (DIM, 4 * DIM)
    run_layer_test(TransformerBackbone, dict(max_length=8, num_layers=1, ffn_dim=12, dropout=0.0,
                                             scale_embeddings=True), inputs, (2, SEQ_LEN, DIM), 19, tmp_path)


def test_transformer_block_basics(tmp_path):
    x = np.random.default_rng(0).normal(size=(2, SEQ_LEN, DIM)).astype("float32")
    run_layer_test(TransformerBlock, dict(num_heads=2, ffn_dim=16, dropout=0.0), x, (2, SEQ_LEN, DIM), 16, tmp_path)
    # Non-default activation and epsilon survive the config round trip.
    block = TransformerBlock(num_heads=4, ffn_dim=8, activation="relu", layer_norm_epsilon=1e-3)
    config = TransformerBlock.from_config(block.get_config()).get_config()
    assert config["activation"] == "relu" and config["layer_norm_epsilon"] == 1e-3


def test_id_item_encoder_basics(tmp_path):
    ids = np.array([[2, 3, 0, 0, 0], [4, 5, 6, 7, 1]])
    layer, out = run_layer_test(IdItemEncoder, dict(vocab_size=10, embedding_dim=DIM), ids, (2, SEQ_LEN, DIM), 1,
                                tmp_path)
    table = keras.ops.convert_to_numpy(layer.all_items())
    assert table.shape == (10, DIM)
    np.testing.assert_array_equal(out, table[ids])  # lookup == rows of all_items, in id order
    assert layer.output_dim == DIM


def test_id_item_encoder_all_items_before_call_and_regularizer():
    keras.utils.set_random_seed(0)
    enc = IdItemEncoder(6, 4, embeddings_regularizer="l2")
    assert tuple(enc.all_items().shape) == (6, 4)  # builds on demand
    enc(np.array([[2]]))
    assert len(enc.losses) == 1
    restored = IdItemEncoder.from_config(enc.get_config())
    assert restored.get_config() == enc.get_config()
    assert restored.get_config()["embeddings_regularizer"] is not None


# --------------------------------------------------------------------- causality
def _perturb_after(inputs, t, seed):
    rng = np.random.default_rng(seed)
    changed = {k: np.array(v) for k, v in inputs.items()}
    tail = changed["item_embeddings"][:, t + 1:]
    changed["item_embeddings"][:, t + 1:] = rng.normal(size=tail.shape) * 3.0
    return changed


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_backbones_ignore_future_items(name):
    cls, kwargs, _ = BACKBONES[name]
    keras.utils.set_random_seed(0)
    layer = cls(**{**kwargs, "dropout": 0.1})
    inputs = backbone_inputs(batch=2, seq_len=6)
    base = keras.ops.convert_to_numpy(layer(inputs))
    for t in range(5):
        out = keras.ops.convert_to_numpy(layer(_perturb_after(inputs, t, seed=t + 1)))
        np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-5, err_msg=f"t={t}")
        assert not np.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-3)  # later states did change


def test_bert4rec_is_bidirectional():
    cls, kwargs, _ = BACKBONES["bert4rec"]
    keras.utils.set_random_seed(0)
    layer = cls(**kwargs)
    inputs = backbone_inputs(batch=2, seq_len=6)
    base = keras.ops.convert_to_numpy(layer(inputs))
    for t in range(5):
        out = keras.ops.convert_to_numpy(layer(_perturb_after(inputs, t, seed=t + 1)))
        for pos in range(t + 1):
            assert not np.allclose(out[:, pos], base[:, pos], atol=1e-5), f"t={t}, position {pos}"


def test_transformer_block_respects_attention_mask():
    keras.utils.set_random_seed(0)
    block = TransformerBlock(num_heads=2, ffn_dim=16)
    x = np.random.default_rng(0).normal(size=(1, 6, DIM)).astype("float32")
    causal = np.tril(np.ones((1, 6, 6), bool))
    base = keras.ops.convert_to_numpy(block(x, attention_mask=causal))
    changed = x.copy()
    changed[:, 3:] += 5.0
    out = keras.ops.convert_to_numpy(block(changed, attention_mask=causal))
    np.testing.assert_allclose(out[:, :3], base[:, :3], atol=1e-5)
    full = keras.ops.convert_to_numpy(block(changed))  # no mask: everything attends everything
    assert not np.allclose(full[:, :3], base[:, :3], atol=1e-5)


# --------------------------------------------------------------------- padding
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_padding_invariance(name):
    """Extra padded positions (mask False, garbage vectors) change nothing at real positions."""
    cls, kwargs, _ = BACKBONES[name]
    keras.utils.set_random_seed(0)
    layer = cls(**{**kwargs, "dropout": 0.3})
    lengths = [5, 3, 1]
    inputs = backbone_inputs(batch=3, seq_len=5, lengths=lengths)
    base = keras.ops.convert_to_numpy(layer(inputs))

    rng = np.random.default_rng(7)
    padded_len = 9
    emb = rng.normal(size=(3, padded_len, DIM)).astype("float32") * 100.0  # garbage everywhere ...
    mask = np.arange(padded_len)[None, :] < np.array(lengths)[:, None]
    emb[mask] = inputs["item_embeddings"][inputs["padding_mask"]]  # ... except at real positions
    padded = keras.ops.convert_to_numpy(layer({"item_embeddings": emb, "padding_mask": mask}))

    real = inputs["padding_mask"]
    np.testing.assert_allclose(padded[:, :5][real], base[real], atol=1e-5)
    assert np.all(padded[~mask] == 0.0), "padded positions must output zeros"
    assert np.all(base[~real] == 0.0)
    # Each row alone gives the same states as inside the batch.
    for row, n in enumerate(lengths):
        alone = keras.ops.convert_to_numpy(layer({"item_embeddings": emb[row:row + 1, :n],
                                                  "padding_mask": mask[row:row + 1, :n]}))
        np.testing.assert_allclose(alone[0], base[row, :n], atol=1e-5)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_fully_padded_row_is_finite_zero(name):
    cls, kwargs, _ = BACKBONES[name]
    keras.utils.set_random_seed(0)
    layer = cls(**kwargs)
    out = keras.ops.convert_to_numpy(layer(backbone_inputs(batch=2, lengths=[0, 2])))
    assert np.all(out[0] == 0.0)
    assert np.all(np.isfinite(out))


# --------------------------------------------------------------------- training mode
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_dropout_only_in_training(name):
    cls, kwargs, _ = BACKBONES[name]
    keras.utils.set_random_seed(0)
    layer = cls(**{**kwargs, "dropout": 0.5})
    inputs = backbone_inputs(lengths=[5, 3])
    real = inputs["padding_mask"]
    train_a = keras.ops.convert_to_numpy(layer(inputs, training=True))
    train_b = keras.ops.convert_to_numpy(layer(inputs, training=True))
    assert not np.allclose(train_a[real], train_b[real], atol=1e-4)
    assert np.all(train_a[~real] == 0.0)  # padding stays zero in training too
    eval_a = keras.ops.convert_to_numpy(layer(inputs, training=False))
    eval_b = keras.ops.convert_to_numpy(layer(inputs))  # default: inference
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(eval_a[real], train_a[real], atol=1e-4)


# --------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_unknown_last_dim_raises(name):
    cls, kwargs, _ = BACKBONES[name]
    layer = cls(**kwargs)
    with pytest.raises(ValueError, match="last dimension of item_embeddings must be known"):
        layer.build({"item_embeddings": (None, None, None), "padding_mask": (None, None)})


@pytest.mark.parametrize("cls", [SASRecBackbone, BERT4RecBackbone])
def test_dim_not_divisible_by_heads_raises(cls):
    layer = cls(max_length=10, num_layers=1, num_heads=3)
    with pytest.raises(ValueError, match=r"input dim 8 must be divisible by num_heads=3"):
        layer(backbone_inputs())


def test_transformer_block_dim_not_divisible_raises():
    with pytest.raises(ValueError, match=r"input dim 7 must be divisible by num_heads=2"):
        TransformerBlock(num_heads=2, ffn_dim=8)(np.zeros((1, 3, 7), "float32"))
    with pytest.raises(ValueError, match=r"input dim None"):
        TransformerBlock(num_heads=2, ffn_dim=8).build((None, None, None))


@pytest.mark.parametrize("cls, kwargs, match", [
    (SASRecBackbone, dict(max_length=0), "must be positive"),
    (SASRecBackbone, dict(max_length=5, num_layers=0), "must be positive"),
    (BERT4RecBackbone, dict(max_length=5, num_heads=0), "must be positive"),
    (TransformerBackbone, dict(max_length=-1), "must be positive"),
    (GRU4RecBackbone, dict(hidden_dim=0), "must be positive"),
    (GRU4RecBackbone, dict(hidden_dim=4, num_layers=0), "must be positive"),
    (IdItemEncoder, dict(vocab_size=2, embedding_dim=4), r"vocab_size .*>= 3"),
    (IdItemEncoder, dict(vocab_size=10, embedding_dim=0), "embedding_dim must be positive"),
])
def test_invalid_constructor_args_raise(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


# Argument validation.
def test_transformer_block_zero_heads_raises_value_error():
    with pytest.raises(ValueError):
        TransformerBlock(num_heads=0, ffn_dim=8)(np.zeros((1, 3, 8), "float32"))


@pytest.mark.parametrize("cls, kwargs", [
    (SASRecBackbone, dict(max_length=5, dropout=1.5)),
    (GRU4RecBackbone, dict(hidden_dim=4, dropout=-0.1)),
])
def test_invalid_dropout_raises_at_construction(cls, kwargs):
    with pytest.raises(ValueError):
        cls(**kwargs)


def test_sequence_longer_than_max_length_raises_value_error():
    layer = SASRecBackbone(max_length=4, num_layers=1)
    with pytest.raises(ValueError, match="max_length"):
        layer(backbone_inputs(seq_len=6))

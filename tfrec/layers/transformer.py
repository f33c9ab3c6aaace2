"""Self-attention sequential backbones: SASRec (causal) and BERT4Rec (bidirectional).

Both are the same stack of Transformer blocks over a sequence of item vectors
plus learned absolute position embeddings; they differ only in the attention
mask. Blocks are post-norm by default (`LN(x + f(x))`, as BERT and RecBole's
SASRec); `normalize_first=True` makes them pre-norm (`x + f(LN(x))`). A backbone takes item *vectors* (from any item encoder) and a
padding mask, and returns one state per position:

    inputs  {"item_embeddings": (batch, seq_len, dim), "padding_mask": (batch, seq_len) bool}
    output  (batch, seq_len, dim)

Sequences are right-padded: position 0 is the oldest item of the window, so an
item's position embedding is the same for every prefix it belongs to, which is
what training on all positions at once needs.

Why not `keras_hub.layers.TransformerEncoder` / `PositionEmbedding`:
`TransformerBlock` computes exactly what `keras_hub.layers.TransformerEncoder`
computes (same sub-layers, same order, post- or pre-norm; with the same weights
the outputs are equal, `tests/test_backbones.py` checks it), and the position
table is what `keras_hub.layers.PositionEmbedding` holds. We keep our own
classes because Keras 3 saves weights under the attribute paths of the layers
(`block_0/attention/...` here, `block_0/_self_attention_layer/...` in
keras-hub): swapping them in would change every weight path, so `.keras` files
and checkpoints saved by earlier versions would no longer load, and the
configs would change (`TransformerEncoder` adds `kernel_initializer` etc.).

References:
- Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018.
- Sun et al., "BERT4Rec", CIKM 2019.
"""

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfrec")
class TransformerBlock(keras.layers.Layer):
    """Transformer block, post-norm (`LN(x + MHA(x))`, `LN(x + FFN(x))`, as
    BERT and the RecBole SASRec) or pre-norm (`x + MHA(LN(x))`, `x + FFN(LN(x))`).

    Args:
        num_heads: int. Attention heads; `dim` must be divisible by it.
        ffn_dim: int. Inner size of the feed-forward network.
        dropout: float. Dropout on attention probabilities and on both
            residual branches (not inside the FFN, as BERT and RecBole).
        activation: FFN activation. Defaults to `"gelu"`.
        layer_norm_epsilon: float. Defaults to `1e-6`.
        normalize_first: bool. True = pre-norm. Defaults to False (post-norm).

    Call args:
        x: `(batch, seq_len, dim)`.
        attention_mask: bool `(batch, seq_len, seq_len)`; True = may attend.

    Example:
    >>> import numpy as np
    >>> block = TransformerBlock(num_heads=2, ffn_dim=32)
    >>> tuple(block(np.zeros((2, 5, 8), "float32")).shape)
    (2, 5, 8)
    """

    def __init__(
        self,
        num_heads,
        ffn_dim,
        dropout=0.0,
        activation="gelu",
        layer_norm_epsilon=1e-6,
        normalize_first=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_heads < 1 or ffn_dim < 1:
            raise ValueError(f"num_heads and ffn_dim must be positive, got {num_heads}, {ffn_dim}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        self.num_heads = int(num_heads)
        self.ffn_dim = int(ffn_dim)
        self.dropout = float(dropout)
        self.activation = keras.activations.get(activation)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.normalize_first = bool(normalize_first)

    def build(self, input_shape):
        dim = input_shape[-1]
        if dim is None or dim % self.num_heads:
            raise ValueError(
                f"TransformerBlock: input dim {dim} must be divisible by num_heads={self.num_heads}."
            )
        init = keras.initializers.TruncatedNormal(stddev=0.02)
        self.attention_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, name="attention_norm"
        )
        self.attention = keras.layers.MultiHeadAttention(
            num_heads=self.num_heads,
            key_dim=dim // self.num_heads,
            dropout=self.dropout,
            kernel_initializer=init,
            name="attention",
        )
        self.ffn_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, name="ffn_norm"
        )
        self.ffn_inner = keras.layers.Dense(
            self.ffn_dim, activation=self.activation, kernel_initializer=init, name="ffn_inner"
        )
        self.ffn_outer = keras.layers.Dense(dim, kernel_initializer=init, name="ffn_outer")
        self.residual_dropout = keras.layers.Dropout(self.dropout)
        self.attention_norm.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.ffn_norm.build(input_shape)
        self.ffn_inner.build(input_shape)
        self.ffn_outer.build(tuple(input_shape[:-1]) + (self.ffn_dim,))
        self.built = True

    def call(self, x, attention_mask=None, training=False):
        if self.normalize_first:
            h = self.attention_norm(x)
            h = self.attention(h, h, attention_mask=attention_mask, training=training)
            x = x + self.residual_dropout(h, training=training)
            h = self.ffn_outer(self.ffn_inner(self.ffn_norm(x)))
            return x + self.residual_dropout(h, training=training)
        h = self.attention(x, x, attention_mask=attention_mask, training=training)
        x = self.attention_norm(x + self.residual_dropout(h, training=training))
        h = self.ffn_outer(self.ffn_inner(x))
        return self.ffn_norm(x + self.residual_dropout(h, training=training))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "ffn_dim": self.ffn_dim,
                "dropout": self.dropout,
                "activation": keras.activations.serialize(self.activation),
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "normalize_first": self.normalize_first,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="tfrec")
class TransformerBackbone(keras.layers.Layer):
    """Item vectors + position embeddings -> LayerNorm -> dropout -> `TransformerBlock`s.

    With `normalize_first=True` (pre-norm blocks) a final LayerNorm is added.

    Packed rows: the inputs may also carry `"segment_ids"` `(batch, seq_len)` int
    (which sequence of the row each slot holds; several short sequences share
    one row) and `"positions"` `(batch, seq_len)` int (the slot's position inside
    its own sequence). Attention then stays inside each sequence and positions
    restart at 0, so every sequence's outputs equal those of its own row.

    Args:
        max_length: int. Longest window (number of positions) accepted.
        num_layers: int. Number of blocks.
        num_heads: int. Attention heads per block.
        ffn_dim: int or None. FFN inner size; None = 4 x input dim.
        dropout: float. Dropout on the input embeddings and inside blocks.
        causal: bool. True = position t attends to positions <= t only
            (SASRec); False = bidirectional (BERT4Rec).
        scale_embeddings: bool. Multiply item vectors by sqrt(dim) before
            adding positions (as in the original SASRec). Defaults to False.
        normalize_first: bool. Pre-norm blocks. Defaults to False (post-norm,
            as BERT and RecBole's SASRec).

    Example:
    >>> import numpy as np
    >>> bb = TransformerBackbone(max_length=10, num_layers=1, num_heads=2, causal=True)
    >>> out = bb({"item_embeddings": np.zeros((2, 4, 8), "float32"),
    ...           "padding_mask": np.ones((2, 4), bool)})
    >>> tuple(out.shape)
    (2, 4, 8)
    >>> packed = bb({"item_embeddings": np.ones((1, 4, 8), "float32"), "padding_mask": np.ones((1, 4), bool),
    ...              "segment_ids": np.array([[1, 1, 2, 2]]), "positions": np.array([[0, 1, 0, 1]])})
    >>> bool(np.allclose(packed[0, :2], packed[0, 2:], atol=1e-6))  # two equal sequences, one row
    True
    """

    packable = True

    def __init__(
        self,
        max_length,
        num_layers=2,
        num_heads=2,
        ffn_dim=None,
        dropout=0.2,
        causal=True,
        scale_embeddings=False,
        normalize_first=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if max_length < 1 or num_layers < 1 or num_heads < 1:
            raise ValueError(
                "max_length, num_layers and num_heads must be positive, got "
                f"{max_length}, {num_layers}, {num_heads}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        self.max_length = int(max_length)
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.ffn_dim = None if ffn_dim is None else int(ffn_dim)
        self.dropout = float(dropout)
        self.causal = bool(causal)
        self.scale_embeddings = bool(scale_embeddings)
        self.normalize_first = bool(normalize_first)

    def build(self, input_shape):
        emb_shape = input_shape["item_embeddings"] if isinstance(input_shape, dict) else input_shape
        dim = emb_shape[-1]
        if dim is None:
            raise ValueError("TransformerBackbone: the last dimension of item_embeddings must be known.")
        self.dim = int(dim)
        self.position_embedding = keras.layers.Embedding(
            self.max_length,
            self.dim,
            embeddings_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            name="position_embedding",
        )
        self.position_embedding.build((None,))
        self.input_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="input_norm")
        self.input_norm.build((None, None, self.dim))
        self.input_dropout = keras.layers.Dropout(self.dropout)
        self.blocks = []
        for i in range(self.num_layers):
            block = TransformerBlock(
                num_heads=self.num_heads,
                ffn_dim=self.ffn_dim or 4 * self.dim,
                dropout=self.dropout,
                normalize_first=self.normalize_first,
                name=f"block_{i}",
            )
            block.build((None, None, self.dim))
            self.blocks.append(block)
        self.output_norm = None
        if self.normalize_first:
            self.output_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="output_norm")
            self.output_norm.build((None, None, self.dim))
        self.built = True

    def call(self, inputs, training=False):
        x = inputs["item_embeddings"]  # (batch, seq_len, dim)
        padding_mask = ops.cast(inputs["padding_mask"], "bool")  # (batch, seq_len)
        segment_ids = inputs.get("segment_ids")  # (batch, seq_len) int or None: packed rows
        seq_len = ops.shape(x)[1]
        if isinstance(seq_len, int) and seq_len > self.max_length:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_length={self.max_length}; "
                "keep the most recent max_length items (NextItemRecommender does)."
            )
        if self.scale_embeddings:
            x = x * math.sqrt(self.dim)
        positions = ops.arange(seq_len)
        if segment_ids is None:
            x = x + ops.expand_dims(self.position_embedding(positions), 0)
        else:  # each packed sequence counts its positions from 0
            x = x + self.position_embedding(ops.cast(inputs["positions"], "int32"))
        x = self.input_dropout(self.input_norm(x), training=training)
        keep = ops.expand_dims(ops.cast(padding_mask, x.dtype), -1)  # (batch, seq_len, 1)
        x = x * keep

        # (batch, seq_len, seq_len): query i may attend key j.
        attention_mask = ops.logical_and(
            ops.expand_dims(padding_mask, 1), ops.expand_dims(padding_mask, 2)
        )
        if segment_ids is not None:  # a packed sequence never sees its row neighbours
            same = ops.equal(ops.expand_dims(segment_ids, 1), ops.expand_dims(segment_ids, 2))
            attention_mask = ops.logical_and(attention_mask, same)
        if self.causal:
            causal = ops.greater_equal(
                ops.expand_dims(positions, 1), ops.expand_dims(positions, 0)
            )  # (seq_len, seq_len), i >= j
            attention_mask = ops.logical_and(attention_mask, ops.expand_dims(causal, 0))
        # A padded query row would attend nothing (softmax of all -inf); let it see itself.
        attention_mask = ops.logical_or(
            attention_mask, ops.expand_dims(ops.eye(seq_len, dtype="bool"), 0)
        )
        for block in self.blocks:
            x = block(x, attention_mask=attention_mask, training=training) * keep
        if self.output_norm is not None:
            x = self.output_norm(x) * keep
        return x

    def compute_output_shape(self, input_shape):
        return input_shape["item_embeddings"]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "max_length": self.max_length,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "ffn_dim": self.ffn_dim,
                "dropout": self.dropout,
                "causal": self.causal,
                "scale_embeddings": self.scale_embeddings,
                "normalize_first": self.normalize_first,
            }
        )
        return config


def _fixed_causal(cls_name, fixed, kwargs):
    """`causal` of a subclass that fixes it: absent or equal (as in its own saved
    config) is accepted; any other value is an error, never silently dropped."""
    causal = kwargs.pop("causal", fixed)
    if bool(causal) is not fixed:
        raise ValueError(
            f"{cls_name} is always causal={fixed}; got causal={causal!r}. "
            "Use TransformerBackbone(causal=...) to choose the mask."
        )
    return fixed


@keras.saving.register_keras_serializable(package="tfrec")
class SASRecBackbone(TransformerBackbone):
    """SASRec: causal self-attention over the item sequence (`causal=True`).

    Args: as `TransformerBackbone`; `causal` may be omitted or True (its
    config stores it), anything else is a `ValueError`.
    """

    def __init__(self, max_length, **kwargs):
        causal = _fixed_causal("SASRecBackbone", True, kwargs)
        super().__init__(max_length, causal=causal, **kwargs)


@keras.saving.register_keras_serializable(package="tfrec")
class BERT4RecBackbone(TransformerBackbone):
    """BERT4Rec: bidirectional self-attention (`causal=False`), trained by cloze.

    Args: as `TransformerBackbone`; `causal` may be omitted or False (its
    config stores it), anything else is a `ValueError`.
    """

    def __init__(self, max_length, **kwargs):
        causal = _fixed_causal("BERT4RecBackbone", False, kwargs)
        super().__init__(max_length, causal=causal, **kwargs)

"""GRU4Rec backbone: recurrent next-item model over item vectors.

Same input/output contract as the Transformer backbones:

    inputs  {"item_embeddings": (batch, seq_len, dim), "padding_mask": (batch, seq_len) bool}
    output  (batch, seq_len, dim)   # state after reading items 0..t, padded steps zeroed

Reference: Hidasi et al., "Session-based Recommendations with Recurrent Neural
Networks", ICLR 2016; trained here with the same full/sampled softmax losses as
SASRec (Hidasi & Karatzoglou, CIKM 2018 showed the loss matters most).
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfrec")
class GRU4RecBackbone(keras.layers.Layer):
    """Stacked GRUs with a projection back to the item-vector dimension.

    Args:
        hidden_dim: int. GRU units per layer.
        num_layers: int. Stacked GRU layers. Defaults to 1.
        dropout: float. Dropout on the input vectors and between layers.
        input_norm: bool. LayerNorm on the input item vectors (ours: item
            vectors of composite encoders such as DMESR have no fixed scale,
            and a GRU takes its inputs raw). Defaults to False.

    Example:
    >>> import numpy as np
    >>> bb = GRU4RecBackbone(hidden_dim=16)
    >>> out = bb({"item_embeddings": np.zeros((2, 4, 8), "float32"),
    ...           "padding_mask": np.ones((2, 4), bool)})
    >>> tuple(out.shape)
    (2, 4, 8)
    """

    causal = True

    def __init__(self, hidden_dim, num_layers=1, dropout=0.2, input_norm=False, **kwargs):
        super().__init__(**kwargs)
        if hidden_dim < 1 or num_layers < 1:
            raise ValueError(
                f"hidden_dim and num_layers must be positive, got {hidden_dim}, {num_layers}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        self.hidden_dim = int(hidden_dim)
        self.num_layers = int(num_layers)
        self.dropout = float(dropout)
        self.input_norm = bool(input_norm)
        self.max_length = None  # any length

    def build(self, input_shape):
        emb_shape = input_shape["item_embeddings"] if isinstance(input_shape, dict) else input_shape
        dim = emb_shape[-1]
        if dim is None:
            raise ValueError("GRU4RecBackbone: the last dimension of item_embeddings must be known.")
        self.dim = int(dim)
        self.input_dropout = keras.layers.Dropout(self.dropout)
        self.input_layer_norm = None
        if self.input_norm:
            self.input_layer_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="input_norm")
            self.input_layer_norm.build((None, None, self.dim))
        self.grus = []
        in_dim = self.dim
        for i in range(self.num_layers):
            gru = keras.layers.GRU(self.hidden_dim, return_sequences=True, name=f"gru_{i}")
            gru.build((None, None, in_dim))
            self.grus.append(gru)
            in_dim = self.hidden_dim
        self.projection = keras.layers.Dense(self.dim, name="projection")
        self.projection.build((None, None, self.hidden_dim))
        self.built = True

    def call(self, inputs, training=False):
        x = inputs["item_embeddings"]  # (batch, seq_len, dim)
        padding_mask = ops.cast(inputs["padding_mask"], "bool")  # (batch, seq_len)
        if self.input_layer_norm is not None:
            x = self.input_layer_norm(x)
        h = self.input_dropout(x, training=training)
        for gru in self.grus:
            h = gru(h, mask=padding_mask, training=training)
            h = self.input_dropout(h, training=training)
        out = self.projection(h)  # (batch, seq_len, dim)
        return out * ops.expand_dims(ops.cast(padding_mask, out.dtype), -1)

    def compute_output_shape(self, input_shape):
        return input_shape["item_embeddings"]

    def get_config(self):
        config = super().get_config()
        config.update(
            {"hidden_dim": self.hidden_dim, "num_layers": self.num_layers, "dropout": self.dropout,
             "input_norm": self.input_norm}
        )
        return config

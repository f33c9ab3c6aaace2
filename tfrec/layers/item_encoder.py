"""Item encoders: map item ids to vectors, for inputs and for scoring the catalog.

A sequential backbone never sees item ids, only the vectors an item encoder
produces, so an ID embedding table (`IdItemEncoder`) and a semantic encoder
(DMESR) are interchangeable without touching backbone code. Every item encoder
implements the same two calls:

- `encoder(item_ids)` -> `(..., dim)` vectors for the given ids (any shape);
- `encoder.all_items()` -> `(vocab_size, dim)` vectors of the whole catalog, in
  id order, used to score every item at once (tied output embeddings).

Ids follow the vocabulary contract: 0 = padding, 1 = out-of-vocabulary,
2.. = items.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfrec")
class IdItemEncoder(keras.layers.Layer):
    """A plain learned embedding per item id.

    Args:
        vocab_size: int. Number of ids including the reserved padding (0) and
            OOV (1) ids, i.e. `Vocabulary.size`.
        embedding_dim: int. Output dimension.
        embeddings_initializer: initializer for the table. Defaults to
            `"truncated_normal"`-style `TruncatedNormal(stddev=0.02)` as in
            BERT-family models.
        embeddings_regularizer: optional regularizer for the table.

    Example:
    >>> import numpy as np
    >>> enc = IdItemEncoder(vocab_size=10, embedding_dim=4)
    >>> tuple(enc(np.array([[2, 3, 0]])).shape)
    (1, 3, 4)
    >>> tuple(enc.all_items().shape)
    (10, 4)
    """

    def __init__(
        self,
        vocab_size,
        embedding_dim,
        embeddings_initializer=None,
        embeddings_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if vocab_size < 3:
            raise ValueError(
                f"vocab_size must count padding, OOV and at least one item (>= 3), got {vocab_size}."
            )
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be positive, got {embedding_dim}.")
        self.vocab_size = int(vocab_size)
        self.embedding_dim = int(embedding_dim)
        self.embeddings_initializer = keras.initializers.get(
            embeddings_initializer or keras.initializers.TruncatedNormal(stddev=0.02)
        )
        self.embeddings_regularizer = keras.regularizers.get(embeddings_regularizer)
        self.embedding = keras.layers.Embedding(
            self.vocab_size,
            self.embedding_dim,
            embeddings_initializer=self.embeddings_initializer,
            embeddings_regularizer=self.embeddings_regularizer,
            name="item_embedding",
        )

    @property
    def output_dim(self):
        return self.embedding_dim

    def build(self, input_shape=None):
        self.embedding.build((None,))
        self.built = True

    def call(self, item_ids):
        return self.embedding(item_ids)  # (..., dim)

    def all_items(self):
        """All item vectors in id order. Shape `(vocab_size, dim)`."""
        if not self.built:
            self.build()
        return ops.convert_to_tensor(self.embedding.embeddings)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocab_size": self.vocab_size,
                "embedding_dim": self.embedding_dim,
                "embeddings_initializer": keras.initializers.serialize(
                    self.embeddings_initializer
                ),
                "embeddings_regularizer": keras.regularizers.serialize(
                    self.embeddings_regularizer
                ),
            }
        )
        return config

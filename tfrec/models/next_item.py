"""The next-item task: an item encoder + a sequential backbone + a retrieval loss.

`NextItemRecommender` is the one task behind SASRec, BERT4Rec and GRU4Rec. It
trains on every position of a sequence at once (no prefix replication):

- `objective="causal"` (SASRec, GRU4Rec): input `s[:-1]`, target `s[1:]`;
- `objective="cloze"` (BERT4Rec): input `s` with some items replaced by the mask
  token id (`mask_token_id == item_encoder.vocab_size`), target = the original
  item at masked positions, 0 elsewhere.

Inputs are `{"item_ids": (batch, seq_len) int}` right-padded with 0 (for a
Transformer backbone, packed rows may add `"segment_ids"` and `"positions"`,
see `tfrec.data.pipelines.pack_rows`); targets
`(batch, seq_len) int` with 0 where no loss applies. The loss is computed only
on positions with a target, gathered before the catalog-wide matmul, so padding
costs nothing in the output layer.

Losses (`loss=`):
- `"softmax"`: full softmax cross-entropy over the catalog;
- `"sampled_softmax"`: `num_negatives` candidates shared by the batch, drawn
  uniformly or by popularity, with log-Q correction and accidental-hit removal
  (as `tfrs.tasks.Retrieval`);
- `"bce"`: binary cross-entropy with one uniformly drawn negative per position
  (the original SASRec loss).

Scoring is a dot product with the tied item vectors `item_encoder.all_items()`;
padding (0), OOV (1) never rank.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tfrec.data.vocab import NUM_RESERVED

LOSSES = ("softmax", "sampled_softmax", "bce")
OBJECTIVES = ("causal", "cloze")
LOSS_REDUCTIONS = ("targets", "rows")
_NEG_INF = -1e9


def keep_last(item_ids, window):
    """Keep the last `window` items of each right-padded row.

    Args:
        item_ids: int `(batch, seq_len)`, right-padded with 0.
        window: int, output length.

    Returns:
        int `(batch, window)`, right-padded, holding each row's most recent
        `min(length, window)` items in order.
    """
    item_ids = ops.convert_to_tensor(item_ids)
    seq_len = ops.shape(item_ids)[1]
    lengths = ops.sum(ops.cast(item_ids > 0, "int32"), axis=1)  # (batch,)
    start = ops.maximum(lengths - window, 0)
    index = ops.expand_dims(start, 1) + ops.expand_dims(ops.arange(window, dtype="int32"), 0)
    valid = index < ops.expand_dims(lengths, 1)
    index = ops.minimum(index, ops.maximum(seq_len - 1, 0))
    gathered = ops.take_along_axis(item_ids, index, axis=1)
    return ops.where(valid, gathered, ops.zeros_like(gathered))


@keras.saving.register_keras_serializable(package="tfrec")
class NextItemRecommender(keras.Model):
    """Next-item recommendation task over any item encoder and backbone.

    Args:
        item_encoder: a layer with `call(item_ids)` and `all_items()` and a
            `vocab_size` attribute, e.g. `IdItemEncoder`.
        backbone: a sequential backbone (`SASRecBackbone`, `BERT4RecBackbone`,
            `GRU4RecBackbone`) taking `{"item_embeddings", "padding_mask"}`.
        max_length: int. Window of most recent items the model reads.
        objective: `"causal"` or `"cloze"` (see module doc).
        loss: `"softmax"`, `"sampled_softmax"` or `"bce"`.
        num_negatives: int. Negatives per batch for `"sampled_softmax"`.
        sampling: `"uniform"` or `"popularity"`: proposal distribution of the
            sampled softmax (popularity needs `set_item_counts`).
        temperature: float. Logits are divided by it.
        seed: int or None. Seed of the negative sampler.
        loss_reduction: `"targets"`: the loss is the mean over the batch's
            target positions (every batch weighs the same, however many
            targets it has); `"rows"`: the sum over the batch's targets divided
            by its rows (sequences), so every target weighs the same in every
            batch. The two agree when each row has one target (the `prefixes`
            scheme); with every position trained at once and batches bucketed
            by length, `"targets"` gives a short sequence's targets many times
            the weight of a long one's. Defaults to `"targets"`.
        label_smoothing: float in [0, 1) (ours; default 0 = off). With
            `loss="softmax"`, the target distribution puts `1 - label_smoothing`
            on the true item and spreads `label_smoothing` uniformly over the
            catalogue (Szegedy et al., 2016): the loss is
            `(1 - e) * CE + e * (logsumexp(logits) - mean(logits))`.

    Example:
    >>> from tfrec.layers import IdItemEncoder, SASRecBackbone
    >>> model = NextItemRecommender(IdItemEncoder(12, 8), SASRecBackbone(5, num_layers=1), max_length=5)
    >>> model.compile(optimizer="adam")
    >>> ids = np.array([[2, 3, 4, 0, 0]]); targets = np.array([[3, 4, 5, 0, 0]])
    >>> _ = model.fit({"item_ids": ids}, targets, epochs=1, verbose=0)
    >>> model.score_items(ids).shape
    TensorShape([1, 12])
    """

    def __init__(
        self,
        item_encoder,
        backbone,
        max_length,
        objective="causal",
        loss="softmax",
        num_negatives=1024,
        sampling="uniform",
        temperature=1.0,
        seed=None,
        loss_reduction="targets",
        label_smoothing=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}.")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}.")
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")
        if label_smoothing and loss != "softmax":
            raise ValueError(f"label_smoothing needs loss='softmax', got loss={loss!r}.")
        if sampling not in ("uniform", "popularity"):
            raise ValueError(f"sampling must be 'uniform' or 'popularity', got {sampling!r}.")
        if objective == "causal" and not getattr(backbone, "causal", True):
            raise ValueError("A bidirectional backbone needs objective='cloze'.")
        if objective == "cloze" and getattr(backbone, "causal", False):
            raise ValueError("objective='cloze' needs a bidirectional backbone (BERT4RecBackbone).")
        self.item_encoder = item_encoder
        self.backbone = backbone
        self.max_length = int(max_length)
        self.objective = objective
        self.loss_name = loss
        self.num_negatives = int(num_negatives)
        self.sampling = sampling
        self.temperature = float(temperature)
        self.seed = seed
        self.loss_reduction = loss_reduction
        self.label_smoothing = float(label_smoothing)
        self.vocab_size = int(item_encoder.vocab_size)
        self.mask_token_id = self.vocab_size  # only used by objective="cloze"
        self.seed_generator = keras.random.SeedGenerator(seed)
        dim = item_encoder.output_dim
        if objective == "cloze":
            self.mask_embedding = self.add_weight(
                shape=(dim,),
                initializer=keras.initializers.TruncatedNormal(stddev=0.02),
                name="mask_embedding",
            )
        # Log of the proposal probability of each id (sampled softmax).
        self.sampling_log_probs = self.add_weight(
            shape=(self.vocab_size,), initializer="zeros", trainable=False, name="sampling_log_probs"
        )
        self.set_item_counts(None)
        # Padding and OOV ids never score.
        bias = np.zeros(self.vocab_size, "float32")
        bias[:NUM_RESERVED] = _NEG_INF
        self._reserved_bias = ops.convert_to_tensor(bias)

    # --- configuration -------------------------------------------------
    def set_item_counts(self, item_counts):
        """Set the popularity used by `sampling="popularity"` (counts per id)."""
        if item_counts is None or self.sampling == "uniform":
            probs = np.ones(self.vocab_size, "float64")
        else:
            probs = np.asarray(item_counts, "float64")
            if probs.shape != (self.vocab_size,):
                raise ValueError(
                    f"item_counts must have shape ({self.vocab_size},), got {probs.shape}."
                )
            probs = probs + 1.0  # every item stays reachable
        probs[:NUM_RESERVED] = 0.0
        probs = probs / probs.sum()
        with np.errstate(divide="ignore"):
            self.sampling_log_probs.assign(np.log(probs).astype("float32"))

    def with_item_table(self):
        """An inference copy whose item encoder is the materialised catalog.

        Every item encoder maps an id to one vector that does not depend on
        the sequence, so for inference any encoder equals an `IdItemEncoder`
        holding `all_items()`. The copy shares the backbone (same weights) and
        gives the same `user_embedding` / `score_items` as this model, without
        the encoder's inputs (e.g. DMESR's semantic store and token states) or
        its per-item compute: what a serving graph needs. An `IdItemEncoder`
        model is returned as is.

        Example:
        >>> from tfrec.layers import IdItemEncoder, SASRecBackbone
        >>> model = NextItemRecommender(IdItemEncoder(12, 8), SASRecBackbone(5, num_layers=1), max_length=5)
        >>> model.with_item_table() is model
        True
        """
        from tfrec.layers.item_encoder import IdItemEncoder

        if type(self.item_encoder) is IdItemEncoder:
            return self
        materialize = getattr(self.item_encoder, "materialize", None)  # batched, if the encoder has it
        table = materialize() if materialize else np.asarray(self.item_encoder.all_items(), dtype="float32")
        encoder = IdItemEncoder(self.vocab_size, table.shape[1], name="item_table")
        encoder.build()
        encoder.embedding.embeddings.assign(table)
        copy = NextItemRecommender(
            encoder, self.backbone, self.max_length, objective=self.objective, loss=self.loss_name,
            num_negatives=self.num_negatives, sampling=self.sampling, temperature=self.temperature, seed=self.seed,
            loss_reduction=self.loss_reduction,
            name=f"{self.name}_item_table",
        )
        copy.sampling_log_probs.assign(self.sampling_log_probs)
        if self.objective == "cloze":
            copy.mask_embedding.assign(self.mask_embedding)
        return copy

    # --- forward -------------------------------------------------------
    def _embed(self, item_ids):
        item_ids = ops.cast(item_ids, "int32")
        if self.objective == "cloze":
            is_mask = ops.expand_dims(item_ids == self.mask_token_id, -1)
            vectors = self.item_encoder(ops.where(item_ids == self.mask_token_id, 0, item_ids))
            return ops.where(is_mask, ops.cast(self.mask_embedding, vectors.dtype), vectors)
        return self.item_encoder(item_ids)

    def call(self, inputs, training=False):
        item_ids = inputs["item_ids"] if isinstance(inputs, dict) else inputs  # (batch, seq_len)
        vectors = self._embed(item_ids)  # (batch, seq_len, dim)
        backbone_inputs = {"item_embeddings": vectors, "padding_mask": ops.cast(item_ids, "int32") > 0}
        if isinstance(inputs, dict) and "segment_ids" in inputs:  # packed rows (`training_dataset(pack=True)`)
            if not getattr(self.backbone, "packable", False):
                raise ValueError(f"{type(self.backbone).__name__} cannot read packed rows (several sequences "
                                 "in one row); train it with pack=False.")
            backbone_inputs["segment_ids"] = inputs["segment_ids"]
            backbone_inputs["positions"] = inputs["positions"]
        return self.backbone(backbone_inputs, training=training)

    def user_embedding(self, history_ids):
        """One vector per history, from the most recent `max_length` items.

        Args:
            history_ids: int `(batch, seq_len)`, right-padded with 0.

        Returns:
            `(batch, dim)`. For `"cloze"` a mask token is appended and its state
            is returned. Rows with no items give a meaningless vector (the
            zero vector for causal models, a lone mask token's state for
            cloze): callers reject empty histories before scoring, as
            `SequentialEvaluator` does.
        """
        history_ids = ops.cast(history_ids, "int32")
        seq_len = ops.shape(history_ids)[1]
        if self.objective == "cloze":
            width = ops.minimum(seq_len, self.max_length - 1)
            window = keep_last(history_ids, width)
            lengths = ops.sum(ops.cast(window > 0, "int32"), axis=1)
            window = ops.concatenate([window, ops.zeros_like(window[:, :1])], axis=1)
            slot = ops.one_hot(lengths, width + 1, dtype="int32")
            window = window + slot * self.mask_token_id
            read_at = lengths
        else:
            window = keep_last(history_ids, ops.minimum(seq_len, self.max_length))
            lengths = ops.sum(ops.cast(window > 0, "int32"), axis=1)
            read_at = ops.maximum(lengths - 1, 0)
        states = self(window, training=False)  # (batch, window, dim)
        return ops.take_along_axis(states, read_at[:, None, None], axis=1)[:, 0, :]

    def score_items(self, history_ids):
        """Scores of every id for each history: `(batch, vocab_size)`."""
        user = self.user_embedding(history_ids)  # (batch, dim)
        items = self.item_encoder.all_items()  # (vocab, dim)
        return ops.matmul(user, ops.transpose(items)) / self.temperature + self._reserved_bias

    # --- loss ----------------------------------------------------------
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        states = y_pred  # (batch, seq_len, dim)
        targets = tf.cast(y, tf.int32)  # (batch, seq_len)
        where = tf.where(targets > 0)  # (n, 2)
        h = tf.gather_nd(states, where)  # (n, dim)
        t = tf.gather_nd(targets, where)  # (n,)
        items = self.item_encoder.all_items()  # (vocab, dim)
        if self.loss_name == "softmax":
            # Reserved ids are left out of the softmax by slicing them off the
            # catalog (cheaper than a -inf bias over the (n, vocab) logits).
            logits = tf.matmul(h, items[NUM_RESERVED:], transpose_b=True)  # (n, vocab - 2)
            if self.temperature != 1.0:
                logits = logits / self.temperature
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=t - NUM_RESERVED, logits=logits
            )  # (n,)
            if self.label_smoothing:  # cross-entropy against the uniform distribution, mixed in
                uniform = tf.reduce_logsumexp(logits, -1) - tf.reduce_mean(logits, -1)  # (n,)
                loss = (1.0 - self.label_smoothing) * loss + self.label_smoothing * uniform
        elif self.loss_name == "sampled_softmax":
            negatives = tf.cast(
                keras.random.categorical(
                    self.sampling_log_probs[None, :], self.num_negatives, seed=self.seed_generator
                )[0],
                tf.int32,
            )  # (m,)
            pos = tf.reduce_sum(h * tf.gather(items, t), -1, keepdims=True) / self.temperature
            neg = tf.matmul(h, tf.gather(items, negatives), transpose_b=True) / self.temperature
            log_q = tf.math.log(float(self.num_negatives)) + self.sampling_log_probs
            pos = pos - tf.gather(log_q, t)[:, None]
            neg = neg - tf.gather(log_q, negatives)[None, :]
            hit = tf.equal(t[:, None], negatives[None, :])  # accidental hits
            neg = tf.where(hit, _NEG_INF, neg)
            logits = tf.concat([pos, neg], axis=1)
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.zeros_like(t), logits=logits
            )
        else:  # bce
            negatives = tf.cast(
                keras.random.randint(
                    tf.shape(t), NUM_RESERVED, self.vocab_size, seed=self.seed_generator
                ),
                tf.int32,
            )
            pos = tf.reduce_sum(h * tf.gather(items, t), -1) / self.temperature
            neg = tf.reduce_sum(h * tf.gather(items, negatives), -1) / self.temperature
            loss = tf.nn.softplus(-pos) + tf.nn.softplus(neg)
        if self.loss_reduction == "rows":
            loss = tf.reduce_sum(loss) / tf.cast(tf.shape(targets)[0], loss.dtype)
        else:
            loss = tf.reduce_mean(loss)
        if self.losses:
            loss = loss + tf.add_n(self.losses)
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return self.get_metrics_result()

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "item_encoder": keras.saving.serialize_keras_object(self.item_encoder),
                "backbone": keras.saving.serialize_keras_object(self.backbone),
                "max_length": self.max_length,
                "objective": self.objective,
                "loss": self.loss_name,
                "num_negatives": self.num_negatives,
                "sampling": self.sampling,
                "temperature": self.temperature,
                "seed": self.seed,
                "loss_reduction": self.loss_reduction,
                "label_smoothing": self.label_smoothing,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["item_encoder"] = keras.saving.deserialize_keras_object(config["item_encoder"])
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)

"""The Trainer's sequential SavedModel: the library's `SequentialServable` plus TFMA's `evaluate`.

`RecommenderServable(model, tft_output, top_k)` is `tfrec.serving.servables.SequentialServable`
(the one sequential serving graph, also written by `tfrec export`) over the
Transform's vocabulary file: TFT's `item_vocab` maps line `i` to id `i + 2` and
unknown tokens to OOV (1), exactly as `ItemLookup` reads a vocabulary file, so
the raw-token signatures (`recommend` = `serving_default`, `user_embedding`,
`recommend_examples`) answer as the `export` SavedModel of the same model does.
One signature is added for TFMA:

- `evaluate`: `examples: string (batch,)` raw pipeline examples (`history`,
  `target`, see `tfx_pipeline.data`) -> `rank: float32 (batch,)`, the 0-based
  pessimistic rank of the target among all catalog items (ties count against
  the target, as `tfrec.metrics.target_ranks`; a target outside the vocabulary
  gets the worst rank, `num_items`; history items are excluded when
  `exclude_history=True`; a history with no known token is scored from the
  empty window rather than failing the batch). TFMA calls it;
  `tfx_pipeline.tfma_metrics` turns ranks into NDCG/HR/MRR@K.
"""

import tensorflow as tf

from tfrec.data.vocab import NUM_RESERVED, Vocabulary
from tfrec.serving import EXCLUDED_SCORE, compact_known_ids, signature_variables
from tfrec.serving.servables import SequentialServable
from tfx_pipeline.data import HISTORY, TARGET
from tfx_pipeline.preprocessing import ITEM_VOCAB

EVALUATE = "evaluate"
RANK_OUTPUT = "rank"


def _dense_tokens(tokens):
    """A parsed string feature (dense, `SparseTensor` or `RaggedTensor`) as `(batch, n)` padded with `""`."""
    if isinstance(tokens, tf.SparseTensor):
        return tf.sparse.to_dense(tokens, default_value="")
    if isinstance(tokens, tf.RaggedTensor):
        return tokens.to_tensor(default_value="")
    return tf.reshape(tokens, [tf.shape(tokens)[0], -1])


class RecommenderServable(SequentialServable):
    """`SequentialServable` over the Transform's vocabulary, plus `evaluate` (see the module doc).

    Args:
        model: a trained `NextItemRecommender` whose ids come from `tft_output`.
        tft_output: `tft.TFTransformOutput` of the pipeline's Transform.
        top_k: int, items per `recommend` answer (capped at the number of items).
        exclude_history: bool, `evaluate` excludes history items from the ranking.

    Example (not run as a doctest: it needs a TFX Transform output, which only a
    pipeline run writes; `tests/test_tfx_pipeline.py` runs one and checks these
    signatures answer as `export.saved_model.export_sequential`'s):
    >>> servable = RecommenderServable(model, tft.TFTransformOutput(uri), top_k=10)  # doctest: +SKIP
    >>> tf.saved_model.save(servable, "/tmp/m", signatures=servable.signatures())  # doctest: +SKIP
    """

    def __init__(self, model, tft_output, top_k=10, exclude_history=False):
        vocab_file = tft_output.vocabulary_file_by_name(ITEM_VOCAB)
        item_vocab = Vocabulary.load(vocab_file)  # ids = line + 2, as the Transform's
        if item_vocab.size != model.vocab_size:
            raise ValueError(
                f"model has {model.vocab_size} item ids but the Transform vocabulary has {len(item_vocab.tokens)} "
                f"tokens (+{NUM_RESERVED} reserved): the model was trained on another transform graph"
            )
        super().__init__(model, item_vocab, vocab_file, k=min(int(top_k), len(item_vocab.tokens)))
        model = self._keras.model  # the served model (a semantic encoder's materialised table)
        self.num_items = len(item_vocab.tokens)
        self.top_k = self.k
        self.exclude_history = bool(exclude_history)
        self._catalog = tf.range(model.vocab_size) >= NUM_RESERVED  # (vocab,) real items
        raw_spec = tft_output.raw_feature_spec()
        self._eval_spec = {HISTORY: raw_spec[HISTORY], TARGET: raw_spec[TARGET]}

        def evaluate(examples):
            raw = tf.io.parse_example(examples, self._eval_spec)
            ids, _ = compact_known_ids(self.item_lookup.ids(_dense_tokens(raw[HISTORY])))  # (batch, seq)
            target = tf.pad(_dense_tokens(raw[TARGET]), [[0, 0], [0, 1]])[:, 0]  # (batch,), "" if absent
            target = self.item_lookup.ids(target)  # "" -> 0: not a catalog item, the worst rank
            scores = model.score_items(ids)  # (batch, vocab)
            if self.exclude_history:
                scores = self._mask_history(scores, ids, tf.fill(tf.shape(target), True), keep=target)
            target_score = tf.gather(scores, target, batch_dims=1)[:, None]  # (batch, 1)
            beats = (scores >= target_score) & self._catalog[None, :] & (scores > EXCLUDED_SCORE)
            rank = tf.reduce_sum(tf.cast(beats, tf.int32), axis=1) - 1  # minus the target itself
            rank = tf.where(target >= NUM_RESERVED, rank, self.num_items)
            return {RANK_OUTPUT: tf.cast(rank, tf.float32)}

        self.evaluate = tf.function(evaluate, input_signature=[tf.TensorSpec((None,), tf.string, name="examples")])
        self.model_variables = signature_variables(
            (self.user_embedding, self.recommend, self.recommend_examples, self.evaluate), model
        )

    @staticmethod
    def _mask_history(scores, ids, exclude, keep=None):
        """`scores` with each flagged row's history items set to EXCLUDED_SCORE (except `keep`)."""
        rows = tf.broadcast_to(tf.range(tf.shape(ids)[0])[:, None], tf.shape(ids))  # (batch, seq)
        flagged = tf.cast((ids >= NUM_RESERVED) & exclude[:, None], tf.int32)  # (batch, seq)
        counts = tf.scatter_nd(tf.stack([rows, ids], axis=-1), flagged, tf.shape(scores))  # (batch, vocab)
        mask = counts > 0
        if keep is not None:
            mask &= ~tf.one_hot(keep, tf.shape(scores)[1], on_value=True, off_value=False, dtype=tf.bool)
        return tf.where(mask, tf.cast(EXCLUDED_SCORE, scores.dtype), scores)

    def signatures(self):
        return {**super().signatures(), EVALUATE: self.evaluate}

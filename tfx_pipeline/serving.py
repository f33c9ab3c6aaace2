"""The Trainer's SavedModel: raw item tokens in, the TFT transform graph inside.

`RecommenderServable(model, tft_output, top_k)` wraps a trained
`NextItemRecommender` and the Transform output in a `tf.Module` saved with
`tf.saved_model.save`. Its signatures follow the serving contract of
`tfrec.serving` (`recommend` = `serving_default`, `user_embedding`,
`recommend_examples`), as `export.saved_model` does, so the same model server
and clients serve both, plus one for TFMA:

- `evaluate`: `examples: string (batch,)` raw pipeline examples (`history`,
  `target`, see `tfx_pipeline.data`) -> `rank: float32 (batch,)`, the 0-based
  pessimistic rank of the target among all catalog items (ties count against
  the target, as `tfrec.metrics.target_ranks`; a target outside the vocabulary
  gets the worst rank, `num_items`; history items are excluded when
  `exclude_history=True`; a history with no known token is scored from the
  empty window rather than failing the batch). TFMA calls it;
  `tfx_pipeline.tfma_metrics` turns ranks into NDCG/HR/MRR@K.

Every signature maps tokens with `tft_output.transform_features_layer()` (the
`item_vocab` of `tfx_pipeline.preprocessing`), then drops out-of-vocabulary
positions and left-aligns the known items, as the Trainer saw them.
"""

import numpy as np
import tensorflow as tf

from tfrec.data.vocab import NUM_RESERVED, OOV_TOKEN, PAD_TOKEN
from tfrec.serving import (
    EXCLUDE_SPEC,
    EXCLUDED_SCORE,
    HISTORY_SPEC,
    RECOMMEND,
    RECOMMEND_EXAMPLES,
    SERIALIZED_SPEC,
    SERVING_DEFAULT,
    USER_EMBEDDING,
    checked_exclude_flags,
    compact_known_ids,
    parse_history_examples,
    signature_variables,
)
from tfx_pipeline.data import HISTORY, TARGET
from tfx_pipeline.preprocessing import HISTORY_IDS, ITEM_VOCAB, TARGET_ID

EVALUATE = "evaluate"
RANK_OUTPUT = "rank"


def read_vocabulary(tft_output):
    """Item tokens in id order (id = position + 2) from the Transform output."""
    with tf.io.gfile.GFile(tft_output.vocabulary_file_by_name(ITEM_VOCAB), "rb") as f:
        return [line.decode("utf-8") for line in f.read().split(b"\n") if line]


class RecommenderServable(tf.Module):
    """Serving and evaluation graph of a next-item model (see the module doc).

    Args:
        model: a trained `NextItemRecommender` whose ids come from `tft_output`.
        tft_output: `tft.TFTransformOutput` of the pipeline's Transform.
        top_k: int, items per `recommend` answer.
        exclude_history: bool, `evaluate` excludes history items from the ranking.

    Example:
    >>> servable = RecommenderServable(model, tft.TFTransformOutput(uri), top_k=10)  # doctest: +SKIP
    >>> tf.saved_model.save(servable, "/tmp/m", signatures=servable.signatures())  # doctest: +SKIP
    """

    def __init__(self, model, tft_output, top_k=10, exclude_history=False):
        super().__init__(name="recommender_servable")
        model = model.with_item_table()  # a semantic encoder (DMESR) is served as its materialised table
        tokens = read_vocabulary(tft_output)
        if len(tokens) + NUM_RESERVED != model.vocab_size:
            raise ValueError(
                f"model has {model.vocab_size} item ids but the Transform vocabulary has {len(tokens)} tokens "
                f"(+{NUM_RESERVED} reserved): the model was trained on another transform graph"
            )
        self.num_items = len(tokens)
        self.top_k = int(min(top_k, self.num_items))
        self.exclude_history = bool(exclude_history)
        self.item_tokens = tf.Variable(np.array([PAD_TOKEN, OOV_TOKEN, *tokens], dtype=object), trainable=False)
        self._catalog = tf.range(model.vocab_size) >= NUM_RESERVED  # (vocab,) real items
        self.tft_layer = tft_output.transform_features_layer()
        raw_spec = tft_output.raw_feature_spec()
        self._eval_spec = {HISTORY: raw_spec[HISTORY], TARGET: raw_spec[TARGET]}

        def user_embedding(history):
            ids = self._history_ids(history, require_known=True)
            return {"embedding": model.user_embedding(ids)}  # (batch, dim)

        def recommend(history, exclude_history):
            exclude_history = checked_exclude_flags(history, exclude_history)
            ids = self._history_ids(history, require_known=True)  # (batch, seq)
            scores = model.score_items(ids)  # (batch, vocab)
            scores = tf.where(self._catalog[None, :], scores, EXCLUDED_SCORE)  # reserved ids never rank
            scores = self._mask_history(scores, ids, exclude_history)
            top_scores, top_ids = tf.math.top_k(scores, k=self.top_k)  # (batch, k)
            item_ids = tf.gather(self.item_tokens, top_ids)
            item_ids = tf.where(top_scores > EXCLUDED_SCORE, item_ids, "")
            return {"item_ids": item_ids, "scores": top_scores}

        def recommend_examples(serialized):
            return self.recommend(*parse_history_examples(serialized))

        def evaluate(examples):
            raw = tf.io.parse_example(examples, self._eval_spec)
            transformed = self.tft_layer(raw)
            ids, _ = compact_known_ids(tf.sparse.to_dense(transformed[HISTORY_IDS]))  # (batch, seq)
            target = tf.cast(transformed[TARGET_ID], tf.int32)  # (batch,)
            scores = model.score_items(ids)  # (batch, vocab)
            if self.exclude_history:
                scores = self._mask_history(scores, ids, tf.fill(tf.shape(target), True), keep=target)
            target_score = tf.gather(scores, target, batch_dims=1)[:, None]  # (batch, 1)
            beats = (scores >= target_score) & self._catalog[None, :] & (scores > EXCLUDED_SCORE)
            rank = tf.reduce_sum(tf.cast(beats, tf.int32), axis=1) - 1  # minus the target itself
            rank = tf.where(target >= NUM_RESERVED, rank, self.num_items)
            return {RANK_OUTPUT: tf.cast(rank, tf.float32)}

        self.user_embedding = tf.function(user_embedding, input_signature=[HISTORY_SPEC])
        self.recommend = tf.function(recommend, input_signature=[HISTORY_SPEC, EXCLUDE_SPEC])
        self.recommend_examples = tf.function(recommend_examples, input_signature=[SERIALIZED_SPEC])
        self.evaluate = tf.function(evaluate, input_signature=[tf.TensorSpec((None,), tf.string, name="examples")])
        # The Keras model stays out of the object graph (its optimizer state is not
        # served); the variables the signatures read are tracked here.
        self.model_variables = signature_variables(
            (self.user_embedding, self.recommend, self.recommend_examples, self.evaluate)
        )

    def _history_ids(self, history, require_known=False):
        """Dense `""`-padded tokens `(batch, seq)` -> compacted ids `(batch, seq)` int32."""
        sparse = tf.sparse.from_dense(history)  # drops "" padding
        transformed = self.tft_layer({HISTORY: sparse})
        return compact_known_ids(tf.sparse.to_dense(transformed[HISTORY_IDS]), require_known)[0]

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
        return {
            SERVING_DEFAULT: self.recommend,
            RECOMMEND: self.recommend,
            USER_EMBEDDING: self.user_embedding,
            RECOMMEND_EXAMPLES: self.recommend_examples,
            EVALUATE: self.evaluate,
        }

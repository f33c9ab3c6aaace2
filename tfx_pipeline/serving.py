"""The Trainer's SavedModel: raw item tokens in, the TFT transform graph inside.

`RecommenderServable(model, tft_output, top_k)` wraps a trained
`NextItemRecommender` and the Transform output in a `tf.Module` saved with
`tf.saved_model.save`. Its signatures follow the contract of
`export.saved_model` (so the same model server and clients serve both):

- `recommend` (also `serving_default`): `history: string (batch, None)` item
  tokens, oldest first, padded with `""`; `exclude_history: bool (batch,)` ->
  `item_ids: string (batch, top_k)`, `scores: float32 (batch, top_k)`, best
  first. Unknown tokens are dropped; a row left with no known item fails the
  request with INVALID_ARGUMENT.
- `user_embedding`: `history` -> `embedding: float32 (batch, dim)`.
- `recommend_examples`: `serialized: string (batch,)` `tf.Example`s with a bytes
  feature `history` (and an optional int `exclude_history`) -> as `recommend`.
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
from tfx_pipeline.data import HISTORY, TARGET
from tfx_pipeline.preprocessing import HISTORY_IDS, ITEM_VOCAB, TARGET_ID

RECOMMEND, USER_EMBEDDING, RECOMMEND_EXAMPLES, EVALUATE = "recommend", "user_embedding", "recommend_examples", "evaluate"
SERVING_DEFAULT = "serving_default"
RANK_OUTPUT = "rank"
EXCLUDED_SCORE = -1e9


def compact_ids(ids):
    """Known ids (>= 2) of each row first, in order, then 0 padding; OOV (1) and padding dropped.

    Args:
        ids: int `(batch, seq)`.

    Returns:
        `(ids int32 (batch, seq), lengths int32 (batch,))`.
    """
    known = ids >= NUM_RESERVED
    order = tf.argsort(tf.cast(~known, tf.int32), axis=1, stable=True)  # known positions first
    ids = tf.gather(tf.where(known, ids, tf.zeros_like(ids)), order, batch_dims=1)
    return tf.cast(ids, tf.int32), tf.reduce_sum(tf.cast(known, tf.int32), axis=1)


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
        self.tft_layer = tft_output.transform_features_layer()
        raw_spec = tft_output.raw_feature_spec()
        self._eval_spec = {HISTORY: raw_spec[HISTORY], TARGET: raw_spec[TARGET]}

        history = tf.TensorSpec((None, None), tf.string, name="history")
        exclude = tf.TensorSpec((None,), tf.bool, name="exclude_history")

        def user_embedding(history):
            ids, lengths = self._history_ids(history)
            self._assert_known(lengths)
            return {"embedding": model.user_embedding(ids)}  # (batch, dim)

        def recommend(history, exclude_history):
            tf.debugging.assert_equal(
                tf.shape(exclude_history)[0], tf.shape(history)[0],
                message="exclude_history needs one flag per history row",
            )
            ids, lengths = self._history_ids(history)  # (batch, seq)
            self._assert_known(lengths)
            scores = model.score_items(ids)  # (batch, vocab), reserved ids at -1e9
            scores = self._mask_history(scores, ids, exclude_history)
            top_scores, top_ids = tf.math.top_k(scores, k=self.top_k)  # (batch, k)
            item_ids = tf.gather(self.item_tokens, top_ids)
            item_ids = tf.where(top_scores > EXCLUDED_SCORE / 2, item_ids, "")
            return {"item_ids": item_ids, "scores": top_scores}

        def recommend_examples(serialized):
            features = tf.io.parse_example(serialized, {
                HISTORY: tf.io.VarLenFeature(tf.string),
                "exclude_history": tf.io.FixedLenFeature([], tf.int64, default_value=0),
            })
            history = tf.sparse.to_dense(features[HISTORY], default_value="")  # (batch, longest)
            return self.recommend(history, features["exclude_history"] > 0)

        def evaluate(examples):
            raw = tf.io.parse_example(examples, self._eval_spec)
            transformed = self.tft_layer(raw)
            ids, _ = compact_ids(tf.sparse.to_dense(transformed[HISTORY_IDS]))  # (batch, seq)
            target = tf.cast(transformed[TARGET_ID], tf.int32)  # (batch,)
            scores = model.score_items(ids)  # (batch, vocab)
            if self.exclude_history:
                scores = self._mask_history(scores, ids, tf.fill(tf.shape(target), True), keep=target)
            target_score = tf.gather(scores, target, batch_dims=1)[:, None]  # (batch, 1)
            catalog = tf.range(tf.shape(scores)[1]) >= NUM_RESERVED  # (vocab,)
            beats = (scores >= target_score) & catalog[None, :] & (scores > EXCLUDED_SCORE / 2)
            rank = tf.reduce_sum(tf.cast(beats, tf.int32), axis=1) - 1  # minus the target itself
            rank = tf.where(target >= NUM_RESERVED, rank, self.num_items)
            return {RANK_OUTPUT: tf.cast(rank, tf.float32)}

        self.user_embedding = tf.function(user_embedding, input_signature=[history])
        self.recommend = tf.function(recommend, input_signature=[history, exclude])
        self.recommend_examples = tf.function(
            recommend_examples, input_signature=[tf.TensorSpec((None,), tf.string, name="serialized")]
        )
        self.evaluate = tf.function(evaluate, input_signature=[tf.TensorSpec((None,), tf.string, name="examples")])
        # The Keras model stays out of the object graph (its optimizer state is not
        # served); the variables the signatures read are tracked here.
        captured = {}
        for fn in (self.user_embedding, self.recommend, self.recommend_examples, self.evaluate):
            for variable in fn.get_concrete_function().variables:
                captured.setdefault(id(variable), variable)
        self.model_variables = list(captured.values())

    def _history_ids(self, history):
        """Dense `""`-padded tokens `(batch, seq)` -> compacted ids `(batch, seq)` and lengths."""
        sparse = tf.sparse.from_dense(history)  # drops "" padding
        transformed = self.tft_layer({HISTORY: sparse})
        return compact_ids(tf.sparse.to_dense(transformed[HISTORY_IDS]))

    @staticmethod
    def _assert_known(lengths):
        tf.debugging.assert_positive(
            lengths,
            message='history has no known item token (only "" padding or tokens missing from the vocabulary)',
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
        return {
            SERVING_DEFAULT: self.recommend,
            RECOMMEND: self.recommend,
            USER_EMBEDDING: self.user_embedding,
            RECOMMEND_EXAMPLES: self.recommend_examples,
            EVALUATE: self.evaluate,
        }

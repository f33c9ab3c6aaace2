"""The serving contract of sequential recommenders, shared by every exporter.

`export.saved_model` (vocabulary as an in-graph lookup table) and
`tfx_pipeline.serving` (vocabulary from the TFT transform graph) both write
SavedModels with these signatures, so one model server and one client serve
either:

- `recommend` (also `serving_default`): `history: string (batch, None)` item
  tokens, oldest first, padded with `""`; `exclude_history: bool (batch,)` ->
  `item_ids: string (batch, k)`, `scores: float32 (batch, k)`, best first.
  Unknown tokens are dropped; a row left with no known item fails the request
  with INVALID_ARGUMENT. Slots that no item can fill (every remaining item
  excluded) hold `""` with score `EXCLUDED_SCORE`.
- `user_embedding`: `history` -> `embedding: float32 (batch, dim)`.
- `recommend_examples`: `serialized: string (batch,)` `tf.Example`s with a bytes
  feature `history` and an optional int `exclude_history` -> as `recommend`.

This module holds the pieces both graphs share: names, input specs, the
history-id compaction and checks, and the `tf.Example` parsing.
"""

import numpy as np
import tensorflow as tf

from tfrec.data.vocab import NUM_RESERVED

SERVING_DEFAULT = "serving_default"
RECOMMEND, USER_EMBEDDING, RECOMMEND_EXAMPLES = "recommend", "user_embedding", "recommend_examples"
EXCLUDED_SCORE = float(np.finfo(np.float32).min)  # score of an excluded / empty slot

HISTORY_SPEC = tf.TensorSpec((None, None), tf.string, name="history")
EXCLUDE_SPEC = tf.TensorSpec((None,), tf.bool, name="exclude_history")
SERIALIZED_SPEC = tf.TensorSpec((None,), tf.string, name="serialized")

_NO_KNOWN_ITEM = 'history has no known item token (only "" padding or tokens missing from the vocabulary)'


def compact_known_ids(ids, require_known=False):
    """Known ids (>= 2) of each row first, in order, then 0 padding.

    Padding (0) and OOV (1) positions are dropped, so the model reads exactly
    the known items, left-aligned as in training.

    Args:
        ids: int `(batch, seq)`.
        require_known: bool. Fail (INVALID_ARGUMENT) when a row has no known
            item, before anything downstream runs.

    Returns:
        `(ids int32 (batch, seq), lengths int32 (batch,))`.

    Example:
    >>> ids, lengths = compact_known_ids(tf.constant([[1, 5, 0, 7]]))
    >>> ids.numpy().tolist(), lengths.numpy().tolist()
    ([[5, 7, 0, 0]], [2])
    """
    known = ids >= NUM_RESERVED
    lengths = tf.reduce_sum(tf.cast(known, tf.int32), axis=1)  # (batch,)
    if require_known:
        check = tf.debugging.assert_positive(lengths, message=_NO_KNOWN_ITEM)
        with tf.control_dependencies([check]):
            known = tf.identity(known)
    order = tf.argsort(tf.cast(~known, tf.int32), axis=1, stable=True)  # known positions first
    ids = tf.gather(tf.where(known, ids, tf.zeros_like(ids)), order, batch_dims=1)
    return tf.cast(ids, tf.int32), lengths


def checked_exclude_flags(history, exclude_history):
    """`exclude_history` after checking it has one flag per history row."""
    check = tf.debugging.assert_equal(
        tf.shape(exclude_history)[0], tf.shape(history)[0],
        message="exclude_history needs one flag per history row",
    )
    with tf.control_dependencies([check]):
        return tf.identity(exclude_history)


def parse_history_examples(serialized):
    """`(history string (batch, longest), exclude_history bool (batch,))` from `tf.Example`s."""
    features = tf.io.parse_example(
        serialized,
        {
            "history": tf.io.VarLenFeature(tf.string),
            "exclude_history": tf.io.FixedLenFeature([], tf.int64, default_value=0),
        },
    )
    history = tf.sparse.to_dense(features["history"], default_value="")
    return history, features["exclude_history"] > 0


def signature_variables(functions, model=None):
    """The variables the traced signature `functions` read, de-duplicated.

    A servable tracks these instead of the Keras model, so optimizer state is
    not saved. With `model`, they are sorted in `model.weights` order, which
    keeps checkpoints stable across exports.
    """
    captured = {}
    for fn in functions:
        for variable in fn.get_concrete_function().variables:
            captured.setdefault(id(variable), variable)
    variables = list(captured.values())
    if model is not None:
        position = {id(weight.value): i for i, weight in enumerate(model.weights)}
        variables.sort(key=lambda v: position.get(id(v), len(position)))
    return variables

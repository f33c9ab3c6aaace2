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

CTR rankers (`export.saved_model.export_ctr`) read the same `history` input:

- `score` (also `serving_default`): `history: string (batch, None)`,
  `candidates: string (batch, None)` padded with `""` ->
  `probabilities: float32 (batch, num_candidates)`, `valid: bool (batch,
  num_candidates)` (False = a `""` padding slot, whose probability is
  `PADDING_PROBABILITY`).
- `score_examples`: `serialized` `tf.Example`s with a bytes list `history` and
  a bytes `target` -> `probabilities: float32 (batch,)`.

This module holds the pieces every graph shares: names, input specs, the
history-id compaction and checks, and the `tf.Example` parsing.
"""

import numpy as np
import tensorflow as tf

from tfrec.data.vocab import NUM_RESERVED

SERVING_DEFAULT = "serving_default"
RECOMMEND, USER_EMBEDDING, RECOMMEND_EXAMPLES = "recommend", "user_embedding", "recommend_examples"
SCORE, SCORE_EXAMPLES = "score", "score_examples"
EXCLUDED_SCORE = float(np.finfo(np.float32).min)  # score of an excluded / empty slot
PADDING_PROBABILITY = 0.0  # ranker output for a "" candidate slot

HISTORY_SPEC = tf.TensorSpec((None, None), tf.string, name="history")
CANDIDATES_SPEC = tf.TensorSpec((None, None), tf.string, name="candidates")
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


def recent_known_ids(ids, max_history=None):
    """The most recent `max_history` known ids of each row, right-padded with 0.

    The layout CTR models train on (`tfrec.data.lifelong.lifelong_dataset`):
    padding (0) and OOV (1) positions are dropped, the known ids keep their
    order (oldest first), and the width is the longest kept row (at least 1),
    so the answer does not depend on how much padding a request carries.

    Args:
        ids: int `(batch, seq)`.
        max_history: int or None (keep every known id).

    Returns:
        int32 `(batch, width)`.

    Example:
    >>> recent_known_ids(tf.constant([[1, 5, 0, 7, 8], [6, 0, 0, 0, 0]]), max_history=2).numpy().tolist()
    [[7, 8], [6, 0]]
    """
    ids, lengths = compact_known_ids(ids)
    width = tf.reduce_max(tf.concat([lengths, [1]], axis=0))  # >= 1 even for an empty batch
    if max_history is not None:
        width = tf.minimum(width, int(max_history))
    ids = tf.pad(ids, [[0, 0], [0, tf.maximum(width - tf.shape(ids)[1], 0)]])  # (batch, >= width)
    start = tf.maximum(lengths - width, 0)  # (batch,)
    cols = start[:, None] + tf.range(width)[None, :]  # (batch, width); past a row's length: 0 padding
    return tf.gather(ids, cols, batch_dims=1)


def checked_same_rows(first, second, message):
    """`second` after checking it has as many rows (dimension 0) as `first` (INVALID_ARGUMENT)."""
    check = tf.debugging.assert_equal(tf.shape(second)[0], tf.shape(first)[0], message=message)
    with tf.control_dependencies([check]):
        return tf.identity(second)


def checked_exclude_flags(history, exclude_history):
    """`exclude_history` after checking it has one flag per history row."""
    return checked_same_rows(history, exclude_history, "exclude_history needs one flag per history row")


def _parse_history_and(serialized, features):
    """`(history string (batch, longest) padded with "", {name: parsed})` of `tf.Example`s."""
    parsed = tf.io.parse_example(serialized, {"history": tf.io.VarLenFeature(tf.string), **features})
    return tf.sparse.to_dense(parsed.pop("history"), default_value=""), parsed


def parse_history_examples(serialized):
    """`(history string (batch, longest), exclude_history bool (batch,))` from `tf.Example`s."""
    history, parsed = _parse_history_and(
        serialized, {"exclude_history": tf.io.FixedLenFeature([], tf.int64, default_value=0)}
    )
    return history, parsed["exclude_history"] > 0


def parse_ctr_examples(serialized):
    """`(history string (batch, longest), target string (batch,))` from `tf.Example`s.

    Features: `history` (bytes list, oldest first; may be absent = empty) and
    `target` (one bytes value, required: parsing fails with INVALID_ARGUMENT).
    """
    history, parsed = _parse_history_and(serialized, {"target": tf.io.FixedLenFeature([], tf.string)})
    return history, parsed["target"]


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

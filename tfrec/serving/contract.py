"""The serving contract of sequential recommenders and CTR rankers, shared by every exporter.

The servables of `tfrec.serving.servables` implement it; `export.saved_model`
(`tfrec export`, `tfrec ctr export`) and the TFX Trainer (`tfx_pipeline`) both
write them, so one model server and one client serve either:

- `recommend` (also `serving_default`): `history: string (batch, None)` item
  tokens, oldest first, padded with `""`; `exclude_history: bool (batch,)` ->
  `item_ids: string (batch, k)`, `scores: float32 (batch, k)`, best first.
  Unknown tokens are dropped; a row left with no known item fails the request
  with INVALID_ARGUMENT. Slots that no item can fill (every remaining item
  excluded) hold `""` with score `EXCLUDED_SCORE`.
- `user_embedding`: `history` -> `embedding: float32 (batch, dim)`.
- `recommend_examples`: `serialized: string (batch,)` `tf.Example`s with a bytes
  feature `history` and an optional int `exclude_history` -> as `recommend`.

CTR rankers (`export.saved_model.export_ctr`) read the same `history` input plus
the feedback of every behaviour, its time and the user (`CTR_SCORE_SPECS`; TF
Serving signatures have no optional inputs, so every input is required):

- `score` (also `serving_default`): `history: string (batch, None)`,
  `candidates: string (batch, None)` padded with `""`, `history_ratings:
  float32 (batch, None)` (rating of each behaviour, 0 = none), `history_labels:
  float32 (batch, None)` (click 0/1), `history_timestamps: int64 (batch, None)`
  (Unix seconds), the three aligned with `history` (same shape; values under
  `""` padding are ignored), `timestamp: int64 (batch,)` (request time) and
  `user: string (batch,)` (user token; unknown = a new user) ->
  `probabilities: float32 (batch, num_candidates)`, `valid: bool (batch,
  num_candidates)` (False = a `""` padding slot, whose probability is
  `PADDING_PROBABILITY`). History tokens that are padding or unknown drop
  their feedback with them (`ctr_history_features`).
- `score_examples`: `serialized` `tf.Example`s with the same features
  (`parse_ctr_examples`) and a bytes `target` -> `probabilities: float32 (batch,)`.

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
# The ranker's feedback inputs beside `history` / `candidates` (`CTR_SCORE_SPECS`, signature `score`).
HISTORY_RATINGS_SPEC = tf.TensorSpec((None, None), tf.float32, name="history_ratings")
HISTORY_LABELS_SPEC = tf.TensorSpec((None, None), tf.float32, name="history_labels")
HISTORY_TIMESTAMPS_SPEC = tf.TensorSpec((None, None), tf.int64, name="history_timestamps")
TIMESTAMP_SPEC = tf.TensorSpec((None,), tf.int64, name="timestamp")
USER_SPEC = tf.TensorSpec((None,), tf.string, name="user")
CTR_SCORE_SPECS = (HISTORY_SPEC, CANDIDATES_SPEC, HISTORY_RATINGS_SPEC, HISTORY_LABELS_SPEC, HISTORY_TIMESTAMPS_SPEC,
                   TIMESTAMP_SPEC, USER_SPEC)
CTR_FEEDBACK_INPUTS = ("history_ratings", "history_labels", "history_timestamps", "timestamp", "user")

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


def recent_known_positions(ids, max_history=None):
    """Where the most recent `max_history` known ids of each row sit: `(positions, valid)`.

    The gather behind `recent_known_ids`: padding (0) and OOV (1) positions are
    dropped, the known ones keep their order (oldest first), and the width is the
    longest kept row (at least 1, capped at `max_history`), so the answer does not
    depend on how much padding a request carries. Apply it (`gather_recent`) to
    every array aligned with the ids (the feedback of each behaviour) so they stay
    aligned with the kept ids.

    Args:
        ids: int `(batch, seq)`.
        max_history: int or None (keep every known id).

    Returns:
        `(positions int32 (batch, width), valid bool (batch, width))`: column
        indexes into `ids` (0 where not `valid`) and which slots hold a kept id.

    Example:
    >>> positions, valid = recent_known_positions(tf.constant([[1, 5, 0, 7, 8], [6, 0, 0, 0, 0]]), 2)
    >>> positions.numpy().tolist(), valid.numpy().tolist()
    ([[3, 4], [0, 0]], [[True, True], [True, False]])
    """
    known = ids >= NUM_RESERVED
    lengths = tf.reduce_sum(tf.cast(known, tf.int32), axis=1)  # (batch,)
    order = tf.argsort(tf.cast(~known, tf.int32), axis=1, stable=True)  # (batch, seq): known positions first
    width = tf.reduce_max(tf.concat([lengths, [1]], axis=0))  # >= 1 even for an empty batch
    if max_history is not None:
        width = tf.minimum(width, int(max_history))
    order = tf.pad(order, [[0, 0], [0, tf.maximum(width - tf.shape(order)[1], 0)]])  # (batch, >= width)
    start = tf.maximum(lengths - width, 0)  # (batch,)
    cols = start[:, None] + tf.range(width)[None, :]  # (batch, width)
    valid = cols < lengths[:, None]
    positions = tf.gather(order, tf.where(valid, cols, 0), batch_dims=1)
    return tf.cast(tf.where(valid, positions, 0), tf.int32), valid


def gather_recent(values, positions, valid):
    """`values (batch, seq)` at `recent_known_positions`, 0 (`""`) where not `valid`: `(batch, width)`.

    Example:
    >>> ids = tf.constant([[1, 5, 0, 7]])
    >>> gather_recent(tf.constant([[0.5, 4.0, 0.0, 2.0]]), *recent_known_positions(ids)).numpy().tolist()
    [[4.0, 2.0]]
    """
    values = tf.pad(values, [[0, 0], [0, 1]])  # one column more: a zero-width row still gathers column 0
    return tf.where(valid, tf.gather(values, positions, batch_dims=1), tf.zeros_like(positions, values.dtype))


def recent_known_ids(ids, max_history=None):
    """The most recent `max_history` known ids of each row, right-padded with 0.

    The layout CTR models train on (`tfrec.data.lifelong.lifelong_dataset`):
    see `recent_known_positions`.

    Args:
        ids: int `(batch, seq)`.
        max_history: int or None (keep every known id).

    Returns:
        int32 `(batch, width)`.

    Example:
    >>> recent_known_ids(tf.constant([[1, 5, 0, 7, 8], [6, 0, 0, 0, 0]]), max_history=2).numpy().tolist()
    [[7, 8], [6, 0]]
    """
    return tf.cast(gather_recent(ids, *recent_known_positions(ids, max_history)), tf.int32)


def checked_same_shape(first, second, message):
    """`second` after checking it has the shape of `first` (INVALID_ARGUMENT `message` otherwise)."""
    check = tf.debugging.assert_equal(tf.shape(second), tf.shape(first), message=message)
    with tf.control_dependencies([check]):
        return tf.identity(second)


def ctr_history_features(history_ids, history_ratings, history_labels, history_timestamps, timestamp,
                         max_history=None):
    """The model's history features of a ranker request, aligned as in training.

    Args:
        history_ids: int `(batch, seq)` looked-up history tokens (0 padding, 1 OOV).
        history_ratings, history_labels: float32 `(batch, seq)` feedback of each
            behaviour (rating, 0 = none; click 0/1); NaN ratings count as 0.
        history_timestamps: int64 `(batch, seq)` Unix seconds of each behaviour.
        timestamp: int64 `(batch,)` request time.
        max_history: int or None.

    Returns:
        `{"history_ids", "history_ratings", "history_labels", "history_gaps"}`,
        `(batch, width)` each: padding and OOV behaviours dropped together with
        their feedback, the most recent `max_history` kept, right-padded with 0;
        gaps are `tfrec.data.lifelong.gap_bucket(timestamp - behaviour time)`,
        0 on padding (as `lifelong_dataset`). Shape mismatches fail with
        INVALID_ARGUMENT.

    Example:
    >>> out = ctr_history_features(tf.constant([[0, 5, 1, 7]]), tf.constant([[0., 4., 5., 0.]]),
    ...                            tf.constant([[0., 1., 1., 0.]]), tf.constant([[0, 0, 0, 3540]], tf.int64),
    ...                            tf.constant([3600], tf.int64))
    >>> {k: v.numpy().tolist() for k, v in sorted(out.items())}["history_gaps"]
    [[6, 2]]
    """
    from tfrec.data.lifelong import gap_bucket

    message = "history_ratings, history_labels and history_timestamps need the shape of history (one value per item)"
    history_ratings, history_labels, history_timestamps = (
        checked_same_shape(history_ids, v, message) for v in (history_ratings, history_labels, history_timestamps))
    timestamp = checked_same_rows(history_ids, timestamp, "timestamp needs one value per history row")
    positions, valid = recent_known_positions(history_ids, max_history)
    ratings = tf.where(tf.math.is_nan(history_ratings), tf.zeros_like(history_ratings), history_ratings)
    times = gather_recent(tf.cast(history_timestamps, tf.int64), positions, valid)
    gaps = tf.where(valid, gap_bucket(tf.cast(timestamp, tf.int64)[:, None] - times), 0)
    return {"history_ids": tf.cast(gather_recent(history_ids, positions, valid), tf.int32),
            "history_ratings": gather_recent(ratings, positions, valid),
            "history_labels": gather_recent(tf.cast(history_labels, tf.float32), positions, valid),
            "history_gaps": gaps}


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


CTR_EXAMPLE_USER, CTR_EXAMPLE_TIMESTAMP = "user_id", "target_timestamp"  # names the TFX CTR examples use


def parse_ctr_examples(serialized):
    """The ranker inputs of `tf.Example`s: `{"history", "history_ratings", "history_labels",
    "history_timestamps" (batch, longest), "timestamp", "user", "target" (batch,)}`.

    Features (what `tfx_pipeline.data.make_ctr_example` writes): `history` (bytes
    list, oldest first; may be absent = empty) with, one value per history item,
    `history_ratings` and `history_labels` (float lists) and `history_timestamps`
    (int64 list); `target` (bytes), `target_timestamp` (int64, the request time)
    and `user_id` (bytes). Every scalar feature is required and the lists must
    have the history's length: INVALID_ARGUMENT otherwise.
    """
    lists = {"history": tf.string, "history_ratings": tf.float32, "history_labels": tf.float32,
             "history_timestamps": tf.int64}
    parsed = tf.io.parse_example(serialized, {
        **{name: tf.io.RaggedFeature(dtype) for name, dtype in lists.items()},
        "target": tf.io.FixedLenFeature([], tf.string),
        CTR_EXAMPLE_TIMESTAMP: tf.io.FixedLenFeature([], tf.int64),
        CTR_EXAMPLE_USER: tf.io.FixedLenFeature([], tf.string),
    })
    lengths = parsed["history"].row_lengths()
    checks = [tf.debugging.assert_equal(parsed[name].row_lengths(), lengths,
                                        message=f"tf.Example feature {name} needs one value per history item")
              for name in lists if name != "history"]
    with tf.control_dependencies(checks):
        out = {name: tf.identity(parsed[name].to_tensor(default_value="" if dtype == tf.string else 0))
               for name, dtype in lists.items()}
    out.update(target=parsed["target"], timestamp=parsed[CTR_EXAMPLE_TIMESTAMP], user=parsed[CTR_EXAMPLE_USER])
    return out


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

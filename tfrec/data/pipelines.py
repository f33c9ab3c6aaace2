"""`tf.data` input pipelines for sequential models.

Sequences are right-padded with 0 (position 0 = oldest item of the window) and
windows keep each user's most recent items. Training uses every position of a
sequence at once:

- causal (SASRec, GRU4Rec): window `w = s[-(L+1):]`, inputs `w[:-1]`, targets `w[1:]`;
- cloze (BERT4Rec): window `w = s[-L:]`; each epoch masks items with probability
  `mask_prob` (at least one per sequence), inputs carry `mask_token_id` there and
  targets the original item (0 elsewhere).

Batches are formed from rows of similar length (rows are shuffled, cut into
groups of `bucket_batches` batches, sorted by length inside a group, batched,
and the batches shuffled again), and each batch is trimmed to its longest row:
padding then costs almost nothing, while every epoch still sees a new order.
"""

import numpy as np
import tensorflow as tf


def pad_right(sequences, length):
    """Most recent `length` items of each sequence, right-padded with 0.

    Args:
        sequences: iterable of 1-D int arrays.
        length: int, output width.

    Returns:
        int32 array `(len(sequences), length)`.

    Example:
    >>> pad_right([np.array([5, 6, 7]), np.array([8])], 2)
    array([[6, 7],
           [8, 0]], dtype=int32)
    """
    if length < 1:
        raise ValueError(f"length must be positive, got {length}.")
    sequences = list(sequences)
    out = np.zeros((len(sequences), length), np.int32)
    for row, seq in enumerate(sequences):
        tail = np.asarray(seq)[-length:]
        out[row, : len(tail)] = tail
    return out


def prefix_training_arrays(train_sequences, max_length):
    """One row per (prefix, next item): the RecBole/original-SASRec-style scheme.

    Row for target `s[t]` holds the last `max_length` items before it, right-
    padded, with the target only at the prefix's last position. Same targets as
    `causal_training_arrays`, but every target gets its own forward pass (own
    dropout masks, full context even in long sequences) at several times the
    backbone cost.

    Example:
    >>> inputs, targets = prefix_training_arrays([np.array([2, 3, 4])], 2)
    >>> inputs.tolist(), targets.tolist()
    ([[2, 0], [2, 3]], [[3, 0], [0, 4]])
    """
    rows, last = [], []
    for seq in train_sequences:
        seq = np.asarray(seq)
        for t in range(1, len(seq)):
            rows.append(seq[max(0, t - max_length) : t])
            last.append(seq[t])
    if not rows:
        raise ValueError("No training sequence has 2 or more items: nothing to learn from.")
    inputs = pad_right(rows, max_length)
    targets = np.zeros_like(inputs)
    lengths = np.array([len(r) for r in rows])
    targets[np.arange(len(rows)), lengths - 1] = last
    return inputs, targets


def causal_training_arrays(train_sequences, max_length, all_windows=True):
    """Inputs and per-position targets for causal training.

    Every (item, next item) pair of a sequence is a training position exactly
    once: a sequence longer than `max_length + 1` is cut, from its end, into
    windows of `max_length + 1` items overlapping by one item (with
    `all_windows=False` only the most recent window is kept). Users with fewer
    than 2 training items carry no next-item target and are skipped.

    Returns:
        `(inputs, targets)`, int32 arrays `(n_windows, max_length)`.

    Example:
    >>> inputs, targets = causal_training_arrays([np.array([2, 3, 4, 5])], 2)
    >>> inputs.tolist(), targets.tolist()
    ([[3, 4], [2, 0]], [[4, 5], [3, 0]])
    """
    windows = []
    for seq in train_sequences:
        seq = np.asarray(seq)
        end = len(seq)
        while end >= 2:
            windows.append(seq[max(0, end - max_length - 1) : end])
            end -= max_length
            if not all_windows:
                break
    if not windows:
        raise ValueError("No training sequence has 2 or more items: nothing to learn from.")
    padded = pad_right(windows, max_length + 1)
    lengths = np.array([len(w) for w in windows])
    inputs = padded[:, :-1].copy()
    short = np.flatnonzero(lengths <= max_length)
    inputs[short, lengths[short] - 1] = 0  # a window's last item is only a target
    return inputs, padded[:, 1:].copy()


OPEN_ROWS = 8  # rows still open to a new sequence while packing


def pack_rows(inputs, targets, width, seed=0):
    """Pack right-padded causal rows several to a row of `width` slots (in a seeded random order).

    Each input row (a window of `causal_training_arrays`, its items and targets at
    the front) is placed whole after the previous one when it still fits in the
    first of the last few open rows with room (first fit over `OPEN_ROWS` rows), else
    starts a new row: rows of short
    sequences then share the work of one row instead of each being padded,
    every batch mixes sequences of all lengths, and every batch has the same
    shape. A Transformer backbone keeps each sequence to itself through
    `segment_ids` and restarts its positions (`TransformerBackbone`).

    Returns:
        `({"item_ids", "segment_ids", "positions"}, targets)`, int32 arrays
        `(packed_rows, width)`; `segment_ids` counts the sequences of a row from 1
        (0 = empty slot).

    Example:
    >>> inputs = np.array([[2, 3, 0], [4, 0, 0], [5, 6, 7]]); targets = np.array([[3, 8, 0], [9, 0, 0], [6, 7, 8]])
    >>> packed, t = pack_rows(inputs, targets, 3, seed=0)
    >>> sorted(packed["item_ids"].tolist())
    [[2, 3, 4], [5, 6, 7]]
    >>> packed["segment_ids"].tolist()[packed["item_ids"][:, 0].tolist().index(2)]
    [1, 1, 2]
    """
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    lengths = (inputs > 0).sum(axis=1)
    if (lengths > width).any():
        raise ValueError(f"a row holds {int(lengths.max())} items, more than the packed width {width}.")
    order = np.random.default_rng(seed).permutation(len(inputs))
    order = order[lengths[order] > 0]
    row_of = np.empty(len(order), np.int64)
    offset_of = np.empty(len(order), np.int64)
    open_rows, fills, rows = [], [], 0  # first fit among the last `OPEN_ROWS` rows
    for k, i in enumerate(order):
        for j, row in enumerate(open_rows):
            if fills[j] + lengths[i] <= width:
                break
        else:
            open_rows.append(rows)
            fills.append(0)
            rows += 1
            if len(open_rows) > OPEN_ROWS:
                del open_rows[0], fills[0]
            j = len(open_rows) - 1
        row_of[k], offset_of[k] = open_rows[j], fills[j]
        fills[j] += lengths[i]
    shape = (rows, width)
    packed = {name: np.zeros(shape, np.int32) for name in ("item_ids", "segment_ids", "positions")}
    packed_targets = np.zeros(shape, np.int32)
    by_slot = np.lexsort((offset_of, row_of))  # sequences in row order, then slot order
    segment = np.ones(len(order), np.int64)
    for a, b in zip(by_slot[:-1], by_slot[1:]):  # the sequence's number inside its row
        if row_of[a] == row_of[b]:
            segment[b] = segment[a] + 1
    for k, i in enumerate(order):
        n, r, o = lengths[i], row_of[k], offset_of[k]
        packed["item_ids"][r, o : o + n] = inputs[i, :n]
        packed_targets[r, o : o + n] = targets[i, :n]
        packed["segment_ids"][r, o : o + n] = segment[k]
        packed["positions"][r, o : o + n] = np.arange(n)
    return packed, packed_targets


def _trim_to_longest(features, targets):
    longest = tf.reduce_max(tf.reduce_sum(tf.cast(features["item_ids"] > 0, tf.int32), axis=1))
    longest = tf.maximum(longest, 1)
    return {"item_ids": features["item_ids"][:, :longest]}, targets[:, :longest]


def cloze_masking(mask_prob, mask_token_id, seed):
    """`(ids, _) -> ({"item_ids": masked ids}, targets)`: BERT4Rec's cloze masking of a
    batch of right-padded windows (a stateful generator seeded with `seed`; map it
    sequentially). Rows where nothing was drawn get their last item masked."""
    generator = tf.random.Generator.from_seed(seed)

    def mask(ids, _):
        valid = ids > 0
        draw = generator.uniform(tf.shape(ids)) < mask_prob
        chosen = tf.logical_and(draw, valid)
        lengths = tf.reduce_sum(tf.cast(valid, tf.int32), axis=1)
        last = tf.one_hot(lengths - 1, tf.shape(ids)[1], on_value=True, off_value=False)
        none = tf.logical_not(tf.reduce_any(chosen, axis=1, keepdims=True))
        chosen = tf.logical_or(chosen, tf.logical_and(none, last))
        masked_ids = tf.where(chosen, tf.cast(mask_token_id, ids.dtype), ids)
        return {"item_ids": masked_ids}, tf.where(chosen, ids, tf.zeros_like(ids))

    return mask


def training_dataset(
    train_sequences,
    max_length,
    batch_size,
    objective="causal",
    mask_prob=0.2,
    mask_token_id=None,
    shuffle=True,
    seed=0,
    bucket_batches=32,
    scheme="positions",
    shuffle_batches="epoch",
    pack=False,
):
    """A `tf.data.Dataset` of `({"item_ids": (b, l)}, targets (b, l))` batches.

    Args:
        train_sequences: list of 1-D int arrays (chronological item ids per user).
        max_length: int, window length L.
        batch_size: int.
        objective: `"causal"` or `"cloze"`.
        mask_prob: float, cloze masking probability.
        mask_token_id: int, required for cloze (the model's `mask_token_id`).
        shuffle: bool, reshuffle every epoch (deterministic for a seed).
        seed: int.
        bucket_batches: int, batches per length-sorted group (1 = no bucketing).
        scheme: causal only: `"positions"` (every position of a sequence at
            once, `causal_training_arrays`) or `"prefixes"` (one row per
            target, `prefix_training_arrays`).
        pack: causal `positions` scheme only: pack several windows into each
            row of `max_length` slots (`pack_rows`, a new random packing every
            seed); `batch_size` then counts packed rows, and every batch has
            the same shape. Needs a Transformer backbone.
        shuffle_batches: with bucketing, how the length-sorted batches are
            reordered: `"epoch"` shuffles all the epoch's batches (consecutive
            steps are independent) or `"group"` only within a window of two
            groups (consecutive steps then see similar lengths for a while).
    """
    if pack:
        if objective != "causal" or scheme != "positions":
            raise ValueError("pack=True needs objective='causal' and scheme='positions'.")
        inputs, targets = causal_training_arrays(train_sequences, max_length)
        packed, targets = pack_rows(inputs, targets, max_length, seed=seed)
        ds = tf.data.Dataset.from_tensor_slices((packed, targets))  # rows already in a seeded random order
        return ds.batch(batch_size).prefetch(2)
    if shuffle_batches not in ("epoch", "group"):
        raise ValueError(f"shuffle_batches must be 'epoch' or 'group', got {shuffle_batches!r}.")
    if objective == "causal" and scheme == "prefixes":
        inputs, targets = prefix_training_arrays(train_sequences, max_length)
    elif objective == "causal":
        inputs, targets = causal_training_arrays(train_sequences, max_length)
    elif objective == "cloze":
        if mask_token_id is None:
            raise ValueError("objective='cloze' needs mask_token_id.")
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}.")
        inputs = pad_right([s for s in train_sequences if len(s) >= 1], max_length)
        targets = inputs
    else:
        raise ValueError(f"objective must be 'causal' or 'cloze', got {objective!r}.")

    ds = tf.data.Dataset.from_tensor_slices((inputs, targets))
    if shuffle:
        ds = ds.shuffle(len(inputs), seed=seed, reshuffle_each_iteration=True)
    if bucket_batches > 1:

        def sorted_batches(x, y):
            order = tf.argsort(tf.reduce_sum(tf.cast(x > 0, tf.int32), axis=1), stable=True)
            rows = (tf.gather(x, order), tf.gather(y, order))
            return tf.data.Dataset.from_tensor_slices(rows).batch(batch_size)

        ds = ds.batch(batch_size * bucket_batches).flat_map(sorted_batches)
        if shuffle:
            buffer = -(-len(inputs) // batch_size) if shuffle_batches == "epoch" else bucket_batches * 2
            ds = ds.shuffle(buffer, seed=seed + 1, reshuffle_each_iteration=True)
    else:
        ds = ds.batch(batch_size)
    if objective == "cloze":
        ds = ds.map(cloze_masking(mask_prob, mask_token_id, seed))  # sequential: the generator stays deterministic
    else:
        ds = ds.map(lambda x, y: ({"item_ids": x}, y))
    return ds.map(_trim_to_longest).prefetch(2)

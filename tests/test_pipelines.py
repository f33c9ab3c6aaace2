"""Tests for tfrec.data.pipelines: pad_right, causal_training_arrays, training_dataset.

Conventions checked: rows are right-padded with 0, windows keep the MOST RECENT
items, causal inputs[t] -> targets[t] is the next item, a window's last item is
only a target; every usable training row appears exactly once per epoch; batches
are trimmed to their longest row; shuffling is reproducible for a seed; cloze
masks only real items, at least one per row, with targets exactly at masks.
"""

import collections

import numpy as np
import pytest
import tensorflow as tf

from tfrec.data.pipelines import (
    causal_training_arrays, pack_rows, pad_right, prefix_training_arrays, training_dataset,
)

MASK = 999


# --------------------------------------------------------------------- pad_right
@pytest.mark.parametrize("sequences, length, expected", [
    ([[5, 6, 7], [8]], 2, [[6, 7], [8, 0]]),                  # longer row keeps the most recent
    ([[5, 6, 7], [8]], 4, [[5, 6, 7, 0], [8, 0, 0, 0]]),      # right padding
    ([[5, 6, 7]], 3, [[5, 6, 7]]),                            # exact fit
    ([[], [4]], 2, [[0, 0], [4, 0]]),                         # empty row
    ([np.array([2, 3, 4, 5, 6], np.int64)], 1, [[6]]),        # numpy input, window 1
])
def test_pad_right_hand_cases(sequences, length, expected):
    out = pad_right(sequences, length)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, np.array(expected, np.int32).reshape(len(sequences), length))


def test_pad_right_empty_list_and_generator():
    assert pad_right([], 3).shape == (0, 3)
    np.testing.assert_array_equal(pad_right((np.arange(2, 2 + n) for n in (1, 2)), 2), [[2, 0], [2, 3]])


@pytest.mark.parametrize("length", [0, -1])
def test_pad_right_bad_length(length):
    with pytest.raises(ValueError, match="length must be positive"):
        pad_right([[2, 3]], length)


# --------------------------------------------------------------------- causal arrays
@pytest.mark.parametrize("seq, max_length, inputs, targets", [
    # Short: last item is only a target.
    ([5, 6, 7], 4, [[5, 6, 0, 0]], [[6, 7, 0, 0]]),
    # Exactly max_length items: still short (window of L + 1 not full).
    ([2, 3, 4, 5], 4, [[2, 3, 4, 0]], [[3, 4, 5, 0]]),
    # Exactly L + 1 items: full window.
    ([2, 3, 4, 5, 6], 4, [[2, 3, 4, 5]], [[3, 4, 5, 6]]),
    # Longer: the most recent L + 1 items first, then the older ones (overlap of one item),
    # so every (item, next item) pair is a position exactly once.
    ([2, 3, 4, 5, 6, 7, 8, 9], 4, [[5, 6, 7, 8], [2, 3, 4, 0]], [[6, 7, 8, 9], [3, 4, 5, 0]]),
    # Two items.
    ([7, 3], 4, [[7, 0, 0, 0]], [[3, 0, 0, 0]]),
    # Window of one.
    ([2, 3, 4], 1, [[3], [2]], [[4], [3]]),
    ([2, 3], 1, [[2]], [[3]]),
    # Repeated items are kept as they are.
    ([4, 4, 4], 3, [[4, 4, 0]], [[4, 4, 0]]),
])
def test_causal_training_arrays_hand_cases(seq, max_length, inputs, targets):
    x, y = causal_training_arrays([np.array(seq)], max_length)
    assert x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(x, inputs)
    np.testing.assert_array_equal(y, targets)


def test_causal_training_arrays_most_recent_window_only():
    x, y = causal_training_arrays([np.array([2, 3, 4, 5, 6, 7, 8, 9])], 4, all_windows=False)
    np.testing.assert_array_equal(x, [[5, 6, 7, 8]])
    np.testing.assert_array_equal(y, [[6, 7, 8, 9]])


def test_causal_training_arrays_properties():
    rng = np.random.default_rng(0)
    seqs = [2 + 1000 * u + np.arange(n) for u, n in enumerate(rng.integers(0, 25, size=60))]  # unique items
    L = 6
    x, y = causal_training_arrays(seqs, L)
    assert x.shape == y.shape and x.shape[1] == L
    # Inputs and targets aligned; inputs[t] -> targets[t] is always the next item.
    np.testing.assert_array_equal(x > 0, y > 0)
    assert np.all(y[x > 0] == x[x > 0] + 1)
    # Every (item, next item) pair of every sequence exactly once; rows left-aligned.
    got = collections.Counter(zip(x[x > 0].tolist(), y[y > 0].tolist()))
    expected = collections.Counter(p for s in seqs for p in zip(s[:-1].tolist(), s[1:].tolist()))
    assert got == expected
    lengths = (x > 0).sum(axis=1)
    assert all(not x[r, n:].any() for r, n in enumerate(lengths))


def test_causal_training_arrays_skips_short_users_and_rejects_all_short():
    x, y = causal_training_arrays([np.array([2]), np.array([]), np.array([3, 4])], 3)
    np.testing.assert_array_equal(x, [[3, 0, 0]])
    np.testing.assert_array_equal(y, [[4, 0, 0]])
    with pytest.raises(ValueError, match="2 or more items"):
        causal_training_arrays([np.array([2]), np.array([], np.int64)], 3)


# --------------------------------------------------------------------- datasets
def random_sequences(n=50, low=0, high=14, seed=0, vocab=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, size=k) for k in rng.integers(low, high, size=n)]


def unique_sequences(lengths):
    """Sequences whose items are globally unique (item = 2 + 100 * user + position)."""
    return [2 + 100 * u + np.arange(k) for u, k in enumerate(lengths)]


def epoch(ds):
    return [(x["item_ids"].numpy(), y.numpy()) for x, y in ds]


def rows_of(batches):
    """Rows (inputs, targets) without trailing padding, as hashable tuples."""
    out = []
    for x, y in batches:
        for xr, yr in zip(x, y):
            out.append((tuple(xr[xr > 0]), tuple(yr[yr > 0])))
    return out


@pytest.mark.parametrize("bucket_batches", [1, 3])
@pytest.mark.parametrize("max_length", [4, 20])
def test_causal_dataset_every_pair_once_per_epoch(max_length, bucket_batches):
    seqs = random_sequences(n=50)
    ds = training_dataset(seqs, max_length, batch_size=8, seed=3, bucket_batches=bucket_batches)
    for _ in range(2):  # every epoch, not only the first
        batches = epoch(ds)
        pairs = collections.Counter()
        for x, y in batches:
            assert x.dtype == np.int32 and x.shape == y.shape and len(x) <= 8
            # inputs and targets are aligned: a target exactly where there is an input
            np.testing.assert_array_equal(x > 0, y > 0)
            pairs.update(zip(x[x > 0].tolist(), y[y > 0].tolist()))
        expected = collections.Counter()
        for s in seqs:
            expected.update(zip(s[:-1].tolist(), s[1:].tolist()))
        assert pairs == expected
        # Whole rows too: each window of causal_training_arrays exactly once.
        x, y = causal_training_arrays(seqs, max_length)
        assert collections.Counter(rows_of([(x, y)])) == collections.Counter(rows_of(batches))


@pytest.mark.parametrize("objective", ["causal", "cloze"])
def test_batches_trimmed_to_longest_row(objective):
    seqs = random_sequences(n=60, low=1, high=12, seed=1)
    ds = training_dataset(seqs, 10, batch_size=6, objective=objective, mask_token_id=MASK, seed=0,
                          bucket_batches=2)
    widths = set()
    for x, y in epoch(ds):
        longest = (x > 0).sum(axis=1).max()
        assert x.shape[1] == max(longest, 1) == y.shape[1]
        widths.add(x.shape[1])
    assert len(widths) > 1  # rows of different lengths give batches of different widths


def test_bucketing_groups_similar_lengths():
    """With bucketing, batches hold rows of similar length: less padding than without."""
    seqs = random_sequences(n=200, low=2, high=30, seed=2)

    def padding(bucket_batches):
        batches = epoch(training_dataset(seqs, 30, 10, seed=0, bucket_batches=bucket_batches))
        return sum(x.size - (x > 0).sum() for x, _ in batches)

    assert padding(20) < 0.5 * padding(1)


@pytest.mark.parametrize("objective", ["causal", "cloze"])
def test_shuffle_reproducible_for_seed(objective):
    seqs = random_sequences(n=80, low=2, high=10, seed=4)

    def two_epochs(seed):
        ds = training_dataset(seqs, 8, batch_size=4, objective=objective, mask_token_id=MASK, seed=seed,
                              bucket_batches=2)
        return epoch(ds), epoch(ds)

    a1, a2 = two_epochs(5)
    b1, b2 = two_epochs(5)  # fresh dataset, same seed
    for got, want in ((b1, a1), (b2, a2)):
        assert len(got) == len(want)
        for (gx, gy), (wx, wy) in zip(got, want):
            np.testing.assert_array_equal(gx, wx)
            np.testing.assert_array_equal(gy, wy)
    order = lambda batches: [tuple(r) for x, _ in batches for r in x]  # noqa: E731
    assert order(a1) != order(a2)  # reshuffled (and re-masked) every epoch
    assert order(two_epochs(6)[0]) != order(a1)  # another seed, another order


def test_epoch_batch_shuffle_spreads_groups():
    """`shuffle_batches="epoch"`: a group's batches do not follow one another; the same batches
    (rows) as `"group"` shuffling, only their order differs."""
    seqs = random_sequences(n=400, low=2, high=30, seed=7)

    def batches(how):
        return epoch(training_dataset(seqs, 30, 10, seed=0, bucket_batches=10, shuffle_batches=how))

    spread, grouped = batches("epoch"), batches("group")
    assert sorted(map(tuple, rows_of(spread))) == sorted(map(tuple, rows_of(grouped)))

    def first_half_groups(bs):  # which groups (of 10 batches) the first half of the epoch drew from
        width = lambda x: int((x > 0).sum(axis=1).max())  # noqa: E731
        return np.mean([width(x) for x, _ in bs[: len(bs) // 2]])

    # Global shuffling: the first half's mean width is near the epoch's mean width.
    widths = [int((x > 0).sum(axis=1).max()) for x, _ in spread]
    assert abs(first_half_groups(spread) - np.mean(widths)) < 0.25 * np.std(widths) + 1


def test_no_shuffle_keeps_row_order():
    seqs = unique_sequences([3, 5, 2, 4])
    batches = epoch(training_dataset(seqs, 6, batch_size=2, shuffle=False, bucket_batches=1))
    firsts = [int(v) for x, _ in batches for v in x[:, 0]]
    assert firsts == [int(s[0]) for s in seqs]


# --------------------------------------------------------------------- cloze
@pytest.mark.parametrize("mask_prob", [0.15, 0.5])
def test_cloze_batches(mask_prob):
    lengths = np.random.default_rng(0).integers(1, 15, size=70)
    seqs = unique_sequences(lengths)
    L = 10
    ds = training_dataset(seqs, L, batch_size=8, objective="cloze", mask_prob=mask_prob,
                          mask_token_id=MASK, seed=1, bucket_batches=2)
    windows = {tuple(s[-L:]) for s in seqs}
    masked_fraction = []
    previous = None
    for _ in range(2):
        seen = []
        masks = {}
        for x, y in epoch(ds):
            is_mask = x == MASK
            # Targets are the original item exactly where masked, 0 elsewhere.
            assert np.all(y[~is_mask] == 0)
            assert np.all(y[is_mask] >= 2)
            # Padded positions are never masked: a mask is never right of padding.
            original = np.where(is_mask, y, x)
            valid = original > 0
            assert np.all(valid == (np.arange(x.shape[1]) < valid.sum(1, keepdims=True)))
            assert not np.any(is_mask & ~valid)
            assert np.all(is_mask.sum(axis=1) >= 1)  # at least one masked item per row
            for orig, m in zip(original, is_mask):
                row = tuple(orig[orig > 0])
                seen.append(row)
                masks[row] = tuple(m[: len(row)])
            masked_fraction.append(is_mask.sum() / valid.sum())
        # Every user's most recent L items, exactly once per epoch.
        assert sorted(seen) == sorted(windows)
        if previous is not None:
            assert masks != previous  # masks are redrawn every epoch
        previous = masks
    # Rate close to mask_prob (slightly above: rows with no draw get their last item masked).
    assert mask_prob - 0.07 < np.mean(masked_fraction) < mask_prob + 0.15


def test_cloze_single_item_rows_mask_that_item():
    seqs = unique_sequences([1, 1, 1])
    (x, y), = epoch(training_dataset(seqs, 4, batch_size=3, objective="cloze", mask_prob=0.01,
                                     mask_token_id=MASK, seed=0))
    assert x.shape == (3, 1)
    np.testing.assert_array_equal(x, [[MASK]] * 3)
    assert sorted(y[:, 0].tolist()) == [2, 102, 202]


def test_cloze_skips_empty_sequences():
    seqs = [np.array([], np.int64), np.array([5, 6])]
    batches = epoch(training_dataset(seqs, 4, 4, objective="cloze", mask_token_id=MASK, seed=0))
    assert sum(len(x) for x, _ in batches) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(objective="cloze"), "needs mask_token_id"),
    (dict(objective="cloze", mask_token_id=MASK, mask_prob=0.0), r"mask_prob must be in \(0, 1\)"),
    (dict(objective="cloze", mask_token_id=MASK, mask_prob=1.0), r"mask_prob must be in \(0, 1\)"),
    (dict(objective="mlm"), "objective must be 'causal' or 'cloze'"),
    (dict(shuffle_batches="global"), "shuffle_batches must be 'epoch' or 'group'"),
])
def test_training_dataset_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        training_dataset([np.array([2, 3, 4])], 4, 2, **kwargs)


def test_dataset_element_spec():
    ds = training_dataset(random_sequences(10, low=2), 5, 4, seed=0)
    x_spec, y_spec = ds.element_spec
    assert set(x_spec) == {"item_ids"}
    assert x_spec["item_ids"].dtype == y_spec.dtype == tf.int32
    assert x_spec["item_ids"].shape.as_list() == [None, None]


def test_prefix_scheme_has_the_same_targets_one_per_row():
    seqs = [np.arange(2, 9), np.array([3, 4]), np.array([5])]
    inputs, targets = prefix_training_arrays(seqs, max_length=3)
    assert (targets > 0).sum(axis=1).tolist() == [1] * 7  # one target per row
    _, position_targets = causal_training_arrays(seqs, max_length=3)
    assert sorted(targets[targets > 0]) == sorted(position_targets[position_targets > 0])
    # the target of s[t] sees the last 3 items before it, right-padded
    assert inputs[0].tolist() == [2, 0, 0] and targets[0].tolist() == [3, 0, 0]
    assert inputs[5].tolist() == [5, 6, 7] and targets[5].tolist() == [0, 0, 8]
    batch = next(iter(training_dataset(seqs, 3, 16, scheme="prefixes", shuffle=False, bucket_batches=1)))
    assert batch[0]["item_ids"].shape[0] == 7


# --------------------------------------------------------------------- packing
def test_pack_rows_keeps_every_window_whole_and_once():
    seqs = random_sequences(n=120, low=2, high=30, seed=9)  # some longer than a row: several windows
    inputs, targets = causal_training_arrays(seqs, 12)
    short = (inputs > 0).sum(axis=1) < 6
    inputs, targets = np.concatenate([inputs, inputs[short]]), np.concatenate([targets, targets[short]])
    packed, packed_targets = pack_rows(inputs, targets, 12, seed=3)
    got = collections.Counter()
    for r in range(len(packed_targets)):
        seg = packed["segment_ids"][r]
        assert (np.diff(seg[seg > 0]) >= 0).all()  # segments are contiguous, numbered in order
        for s_id in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s_id)
            np.testing.assert_array_equal(packed["positions"][r, where], np.arange(len(where)))
            got[(tuple(packed["item_ids"][r, where]), tuple(packed_targets[r, where]))] += 1
    assert got == collections.Counter(rows_of([(inputs, targets)]))
    # Fewer rows than windows, and little left empty.
    assert len(packed_targets) < 0.8 * len(inputs)
    fill = (packed["item_ids"] > 0).mean()
    assert fill > 0.9, fill


def test_pack_rows_order_depends_on_seed_and_rejects_wide_rows():
    seqs = random_sequences(n=50, low=2, high=8, seed=1)
    inputs, targets = causal_training_arrays(seqs, 8)
    a = pack_rows(inputs, targets, 8, seed=0)[0]["item_ids"]
    assert not np.array_equal(a, pack_rows(inputs, targets, 8, seed=1)[0]["item_ids"])
    np.testing.assert_array_equal(a, pack_rows(inputs, targets, 8, seed=0)[0]["item_ids"])
    with pytest.raises(ValueError, match="more than the packed width 4"):
        pack_rows(inputs, targets, 4)


def test_packed_dataset_static_shapes_and_bad_args():
    seqs = random_sequences(n=80, low=2, high=15, seed=2)
    ds = training_dataset(seqs, 10, batch_size=4, pack=True, seed=0)
    shapes = {tuple(x.shape) for x, _ in epoch(ds)[:-1]}
    assert shapes == {(4, 10)}
    with pytest.raises(ValueError, match="pack=True needs"):
        training_dataset(seqs, 10, 4, pack=True, scheme="prefixes")

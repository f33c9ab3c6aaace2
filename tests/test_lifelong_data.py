"""Tests for tfrec.data.lifelong: CTR samples, the time split without leakage, tf.data batches.

A hand-built log pins every rule (cut-offs, same-second events, OOV for items first
seen after training, min_history, sample order); the bundled MovieLens-1M subset is
checked for leakage on every sample of every split.
"""

import numpy as np
import pandas as pd
import pytest

from tfrec.data.lifelong import (
    attach_user_profiles,
    batch_indices,
    build_lifelong_data,
    gap_bucket,
    lifelong_dataset,
    load_lifelong_dataset,
    read_user_profiles,
    time_cutoffs,
)
from tfrec.data.readers import DEFAULT_DATA_ROOT, DataFormatError

# user, item, timestamp, label -- rows in file order (u1's two events at t=20 tie).
ROWS = [("u1", "a", 10, 1), ("u2", "b", 11, 0), ("u1", "b", 20, 0), ("u1", "c", 20, 1), ("u2", "a", 30, 1),
        ("u1", "d", 40, 1), ("u2", "e", 50, 0), ("u1", "a", 60, 1), ("u2", "b", 60, 1), ("u1", "f", 70, 0)]


def hand_log(with_label=True):
    df = pd.DataFrame(ROWS, columns=["user_id", "item_id", "timestamp", "label"])
    if not with_label:
        df = df.drop(columns="label").assign(rating=[5.0, 1.0, 2.0, 4.0, 4.5, 4.0, 3.0, 5.0, 4.0, 3.9])
    return df


@pytest.fixture(scope="module")
def hand():
    return build_lifelong_data(hand_log(), valid_fraction=0.2, test_fraction=0.2)


def test_cutoffs_are_event_quantiles_and_ties_go_to_the_later_split(hand):
    # sorted times 10 11 20 20 30 40 50 60 60 70: t_valid = 7th event, t_test = 9th event.
    assert hand.cutoffs == {"valid": 50, "test": 60}
    assert time_cutoffs(np.array([5, 1, 3, 2, 4]), 0.2, 0.2) == {"valid": 4, "test": 5}
    assert hand.event_split.tolist() == [0, 0, 0, 0, 2, 2, 0, 0, 1, 2]  # u1's 6 events, then u2's 4


def test_vocabulary_from_training_events_only(hand):
    assert hand.item_vocab.tokens == ["a", "b", "c", "d"]  # e (valid) and f (test) are unseen in training
    # Flat events: u1 a b c d a f | u2 b a e b -- e and f are OOV (1) everywhere.
    assert hand.event_items.tolist() == [2, 3, 4, 5, 2, 1, 3, 2, 1, 3]
    assert hand.user_offsets.tolist() == [0, 6, 10]
    assert hand.users.tolist() == ["u1", "u2"]


def test_samples_histories_and_order(hand):
    train, valid, test = (hand.splits[s] for s in ("train", "valid", "test"))
    # Same-second events are not each other's history: b@20 and c@20 both see only a@10.
    assert [h.tolist() for h in hand.history(train)] == [[2], [2], [2, 3, 4], [3]]
    assert train.target_id.tolist() == [3, 4, 5, 2] and train.label.tolist() == [0, 1, 1, 1]
    assert train.user.tolist() == [0, 0, 0, 1]
    assert [h.tolist() for h in hand.history(valid)] == [[3, 2]]
    assert valid.target_id.tolist() == [1] and valid.label.tolist() == [0]
    assert [h.tolist() for h in hand.history(test)] == [[2, 3, 4, 5], [2, 3, 4, 5, 2], [3, 2, 1]]
    assert test.target_id.tolist() == [2, 1, 3] and test.label.tolist() == [1, 0, 1]
    assert test.timestamp.tolist() == [60, 70, 60]
    assert [h.tolist() for h in hand.history(test, max_history=2)] == [[4, 5], [5, 2], [2, 1]]
    assert hand.metadata["num_samples"] == {"train": 4, "valid": 1, "test": 3}


def test_min_history_zero_keeps_first_events_and_labels_from_ratings():
    data = build_lifelong_data(hand_log(with_label=False), valid_fraction=0.2, test_fraction=0.2,
                               click_threshold=4.0, min_history=0)
    train = data.splits["train"]
    assert len(train) == 6 and train.history_length.tolist() == [0, 1, 1, 3, 0, 1]
    assert train.label.tolist() == [1, 0, 1, 1, 0, 1]  # rating >= 4
    assert np.isnan(build_lifelong_data(hand_log(), valid_fraction=0.2, test_fraction=0.2).event_ratings).all()


def test_catalog_vocabulary_and_item_tables():
    items = pd.DataFrame({"item_id": list("abcdefg"), "title": [f"T{c}" for c in "abcdefg"],
                          "genres": ["X|Y", "Y", "", "Z", "X", "Y|Z", "X"]})
    data = build_lifelong_data(hand_log(), items, valid_fraction=0.2, test_fraction=0.2, vocabulary="catalog")
    assert data.item_vocab.tokens == ["a", "b", "c", "d", "e", "f", "g"]  # unseen ones appended by token
    assert data.splits["valid"].target_id.tolist() == [data.item_vocab.lookup("e")]
    assert data.genre_vocab.tokens == ["X", "Y", "Z"]  # ids X=2, Y=3, Z=4
    assert data.item_genres.tolist() == [[0, 0], [0, 0], [2, 3], [3, 0], [0, 0], [4, 0], [2, 0], [3, 4], [2, 0]]
    # With the default vocabulary, items unseen in training have no row of their own.
    default = build_lifelong_data(hand_log(), items, valid_fraction=0.2, test_fraction=0.2)
    assert default.item_genres.shape == (6, 2)


def test_item_click_prior_uses_training_targets_only(hand):
    prior = hand.item_click_prior(smoothing=1.0)
    rate = 3 / 4  # training targets b:0 c:1 d:1 a:1
    np.testing.assert_allclose(prior[[2, 3, 4, 5]], [(1 + rate) / 2, rate / 2, (1 + rate) / 2, (1 + rate) / 2],
                               rtol=1e-6)
    np.testing.assert_allclose(prior[1], rate, rtol=1e-6)  # never a training target -> global rate


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(valid_fraction=0.0), ValueError, "valid_fraction"),
    (dict(valid_fraction=0.5, test_fraction=0.5), ValueError, "must be < 1"),
    (dict(vocabulary="all"), ValueError, "vocabulary"),
    (dict(vocabulary="catalog"), ValueError, "item table"),
    (dict(min_history=-1), ValueError, "min_history"),
])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        build_lifelong_data(hand_log(), **kwargs)


def test_missing_or_bad_labels():
    with pytest.raises(KeyError, match="click_threshold"):
        build_lifelong_data(hand_log(with_label=False))
    bad = hand_log().assign(label=[1, 0, 2, 1, 1, 1, 0, 1, 1, 0])
    with pytest.raises(ValueError, match="0/1"):
        build_lifelong_data(bad)
    with pytest.raises(ValueError, match="no training events"):
        build_lifelong_data(hand_log().assign(timestamp=5))


# --------------------------------------------------------------------- tf.data
def test_dataset_batches_pad_right_and_keep_most_recent(hand):
    features, label = next(iter(lifelong_dataset(hand, "test", batch_size=8, max_history=3)))
    assert features["history_ids"].dtype.name == "int32" and features["history_ids"].shape == (3, 3)
    assert features["history_ids"].numpy().tolist() == [[3, 4, 5], [4, 5, 2], [3, 2, 1]]
    assert features["target_id"].numpy().tolist() == [2, 1, 3] and label.numpy().tolist() == [1, 0, 1]
    wide = next(iter(lifelong_dataset(hand, "test", batch_size=8, max_history=6, trim_to_longest=False))
                )[0]["history_ids"].numpy()
    assert wide.tolist() == [[2, 3, 4, 5, 0, 0], [2, 3, 4, 5, 2, 0], [3, 2, 1, 0, 0, 0]]
    trimmed = next(iter(lifelong_dataset(hand, "test", batch_size=2, max_history=8, trim_to_longest=True)))
    assert trimmed[0]["history_ids"].shape == (2, 5)


def test_dataset_shuffle_is_deterministic_and_complete(hand):
    def targets(seed):
        ds = lifelong_dataset(hand, "train", batch_size=3, shuffle=True, seed=seed)
        return [t for x, _ in ds for t in x["target_id"].numpy().tolist()]
    assert targets(1) == targets(1)
    assert sorted(targets(1)) == sorted(hand.splits["train"].target_id.tolist())


def test_dataset_errors(hand):
    with pytest.raises(KeyError, match="unknown split"):
        lifelong_dataset(hand, "dev")
    with pytest.raises(ValueError, match="max_history"):
        lifelong_dataset(hand, "train", max_history=0)


def test_dataset_feedback_and_gaps_of_each_behaviour(hand):
    x, _ = next(iter(lifelong_dataset(hand, "test", batch_size=8, max_history=3, trim_to_longest=False)))
    # test histories (most recent 3): u1 b c d @20 20 40 | u1 c d a @20 40 60 | u2 b a e @11 30 50
    assert x["history_labels"].numpy().tolist() == [[0, 1, 1], [1, 1, 1], [0, 1, 0]]
    assert (x["history_ratings"].numpy() == 0).all()  # the hand log has labels, no ratings
    targets = np.array([60, 70, 60])[:, None]
    times = np.array([[20, 20, 40], [20, 40, 60], [11, 30, 50]])
    assert x["history_gaps"].numpy().tolist() == gap_bucket(targets - times).numpy().tolist()
    assert x["user_id"].numpy().tolist() == [2, 2, 3]  # user index + 2 (0 padding, 1 unknown)
    padded, _ = next(iter(lifelong_dataset(hand, "test", batch_size=8, max_history=6, trim_to_longest=False)))
    assert (padded["history_gaps"].numpy()[padded["history_ids"].numpy() == 0] == 0).all()


def test_a_planted_future_event_changes_no_feature(hand):
    """Every feature of a sample comes from strictly earlier events: an event added at or
    after the target's time (even in the same second) changes none of them."""
    log = hand_log()
    planted = pd.concat([log, pd.DataFrame([("u1", "c", 60, 0), ("u1", "b", 65, 1)], columns=log.columns)],
                        ignore_index=True)
    other = build_lifelong_data(planted, valid_fraction=0.2, test_fraction=0.2)
    target = hand.splits["test"]
    # the sample of u1's target a@60 in both logs
    k_old = int(np.flatnonzero((target.user == 0) & (target.timestamp == 60))[0])
    k_new = int(np.flatnonzero((other.splits["test"].user == 0) & (other.splits["test"].timestamp == 60)
                               & (other.splits["test"].target_id == 2))[0])
    pick = lambda data, k: next(iter(lifelong_dataset(  # noqa: E731
        data, dataclasses_replace(data.splits["test"], k), batch_size=1, max_history=8)))[0]
    old, new = pick(hand, k_old), pick(other, k_new)
    assert sorted(old) == sorted(new)
    for key in old:
        assert old[key].numpy().tolist() == new[key].numpy().tolist(), key


def dataclasses_replace(samples, k):
    import dataclasses

    return type(samples)(**{f.name: getattr(samples, f.name)[k:k + 1] for f in dataclasses.fields(samples)})


def test_bucketed_batches_cover_every_sample_once_and_group_lengths():
    lengths = np.random.default_rng(0).integers(1, 1000, size=1000)
    batches = batch_indices(lengths, 10, np.random.default_rng(1), bucket_window=20)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    assert spread < 0.1 * (lengths.max() - lengths.min())  # similar lengths per batch
    # bucketed training batches are trimmed to their longest history
    data = build_lifelong_data(hand_log(), valid_fraction=0.2, test_fraction=0.2, min_history=0)
    for x, _ in lifelong_dataset(data, "train", batch_size=2, max_history=8, shuffle=True):
        widths = (x["history_ids"].numpy() > 0).sum(1)
        assert x["history_ids"].shape[1] == max(widths.max(), 1)


def test_user_profiles(tmp_path, hand):
    path = tmp_path / "users.dat"
    path.write_text("u1::F::25::3::111\nu9::M::56::4::222\n")
    profiles = read_user_profiles(path)
    data = attach_user_profiles(hand, profiles)
    # u1 known; u2 missing from the file -> unknown (1) in every field
    assert data.user_profiles[1].tolist() == [1, 1, 1] and (data.user_profiles[0] >= 2).all()
    assert data.profile_sizes == [4, 4, 4]  # padding, OOV, two values each
    x, _ = next(iter(lifelong_dataset(data, "test", batch_size=8, max_history=3)))
    assert x["user_profile"].numpy().tolist() == [data.user_profiles[0].tolist()] * 2 + [[1, 1, 1]]
    with pytest.raises(KeyError, match="zip"):
        attach_user_profiles(hand, profiles, ["gender", "zip"])
    bad = tmp_path / "bad.dat"
    bad.write_text("u1::F::25\n")
    with pytest.raises(DataFormatError, match="fields"):
        read_user_profiles(bad)
    tsv = tmp_path / "u.user"
    tsv.write_text("user_id:token\tage:token\tgender:token\nu1\t24\tM\n")
    assert read_user_profiles(tsv).columns.tolist() == ["user_id", "age", "gender"]


# ------------------------------------------------------------- MovieLens-1M subset
@pytest.fixture(scope="module")
def ml1m():
    if not (DEFAULT_DATA_ROOT / "movielens-1m-subset").is_dir():
        pytest.skip("bundled movielens-1m-subset not found")
    return load_lifelong_dataset("movielens-1m-subset")


def test_ml1m_split_has_no_leakage(ml1m):
    ts, cut = ml1m.event_timestamps, ml1m.cutoffs
    assert ml1m.metadata["num_events"] == 487515
    bounds = {"train": (-np.inf, cut["valid"]), "valid": (cut["valid"], cut["test"]), "test": (cut["test"], np.inf)}
    for name, samples in ml1m.splits.items():
        lo, hi = bounds[name]
        assert ((samples.timestamp >= lo) & (samples.timestamp < hi)).all(), name
        assert (samples.history_length >= 1).all()
        # Histories end strictly before the target's time and hold every earlier event of the user.
        assert (ts[samples.history_end - 1] < samples.timestamp).all(), name
        assert (ts[samples.history_end] == samples.timestamp).all(), name
        assert (samples.history_start == ml1m.user_offsets[samples.user]).all(), name
    share = np.bincount(ml1m.event_split, minlength=3) / len(ts)
    assert abs(share[2] - 0.1) < 0.01 and abs(share[1] - 0.1) < 0.01
    # The vocabulary is exactly the items of training events.
    train_items = ml1m.event_items[ml1m.event_split == 0]
    assert train_items.min() >= 2 and len(np.unique(train_items)) == len(ml1m.item_vocab.tokens)
    assert ml1m.splits["train"].history_length.max() > 1024  # lifelong: histories beyond 1,024


def test_ml1m_item_side(ml1m):
    toy_story = int(ml1m.item_vocab.lookup("1"))
    genres = ml1m.genre_vocab.to_tokens(ml1m.item_genres[toy_story][ml1m.item_genres[toy_story] > 0])
    assert genres == ["Animation", "Children's", "Comedy"]
    assert len(ml1m.genre_vocab.tokens) == 18 and ml1m.item_genres.shape[0] == ml1m.item_vocab.size
    x, y = next(iter(lifelong_dataset(ml1m, "test", batch_size=4, max_history=1024, trim_to_longest=False)))
    assert x["history_ids"].shape == (4, 1024) and y.shape == (4,)


def test_ml1m_user_profile(ml1m):
    assert ml1m.user_profiles.shape == (len(ml1m.users), 3)
    assert (ml1m.user_profiles >= 2).all()  # every user of the subset has a profile
    assert len(ml1m.profile_vocabs["age"].tokens) == 7 and len(ml1m.profile_vocabs["gender"].tokens) == 2

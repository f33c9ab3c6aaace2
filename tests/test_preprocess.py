"""Tests for tfrec.data.vocab and tfrec.data.preprocess (in-memory path)."""

import json
import os
import shutil
import time

import numpy as np
import pandas as pd
import pytest

from conftest import assert_prepared_equal
from tfrec.data.preprocess import (
    PrepareConfig, chronological, data_fingerprint, kcore_filter, leave_one_out,
    load_prepared, prepare, save_prepared)
from tfrec.data.vocab import NUM_RESERVED, OOV_ID, PAD_ID, Vocabulary


def frame(rows, **extra):
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    df["timestamp"] = df["timestamp"].astype(np.int64)
    for k, v in extra.items():
        df[k] = v
    return df


# ----------------------------------------------------------------------------- vocab
def test_vocab_ordering_and_reserved_ids():
    assert (PAD_ID, OOV_ID, NUM_RESERVED) == (0, 1, 2)
    v = Vocabulary.from_counts({"b": 3, "a": 3, "c": 5, "d": 1, "B": 3})
    assert v.tokens == ["c", "B", "a", "b", "d"]  # count desc, then token asc (code points)
    assert v.size == len(v) == 7
    np.testing.assert_array_equal(v.lookup(["c", "B", "d", "nope", ""]), [2, 3, 6, 1, 1])
    assert v.lookup(["c"]).dtype == np.int64
    assert v.lookup("a").shape == () and int(v.lookup("a")) == 4
    np.testing.assert_array_equal(v.lookup(np.array([["a", "x"], ["d", "c"]])), [[4, 1], [6, 2]])
    assert v.lookup([]).shape == (0,)
    assert v.to_tokens([0, 1, 2, 6]) == ["[PAD]", "[OOV]", "c", "d"]
    assert v.to_tokens(np.array([4, 4])) == ["a", "a"]
    # plain constructor keeps the given order
    assert Vocabulary(["z", "y"]).lookup(["z", "y"]).tolist() == [2, 3]


def test_vocab_errors():
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary(["a", "b", "a"])
    with pytest.raises(ValueError, match="non-empty"):
        Vocabulary(["a", ""])
    with pytest.raises(TypeError):
        Vocabulary(["a", 3])
    v = Vocabulary(["a", "b"])
    for bad in ([4], [-1], [0, 9]):
        with pytest.raises(ValueError, match="out of range"):
            v.to_tokens(bad)


def test_vocab_save_load_round_trip(tmp_path):
    tokens = ["item 1", "é-ü", "日本", " lead", "tab\tinside", "\u2028sep"]
    v = Vocabulary(tokens)
    path = tmp_path / "v.txt"
    v.save(path)
    raw = path.read_bytes().decode("utf-8")
    assert raw.split("\n")[:-1] == tokens and raw.endswith("\n")  # line k = id k + 2
    w = Vocabulary.load(str(path))
    assert w == v and w.tokens == tokens
    np.testing.assert_array_equal(w.lookup(tokens), np.arange(2, 2 + len(tokens)))
    empty = tmp_path / "empty.txt"
    Vocabulary([]).save(empty)
    assert Vocabulary.load(empty).size == 2


def test_vocab_file_errors(tmp_path):
    for bad in ("a\nb", "a\rb"):
        p = tmp_path / "nl.txt"
        with pytest.raises(ValueError, match="newline"):
            Vocabulary(["ok", bad]).save(p)
        assert not p.exists()
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        Vocabulary.load(missing)
    p = tmp_path / "blank.txt"
    p.write_text("a\n\nb\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        Vocabulary.load(p)
    p.write_text("a\nb\na\n", encoding="utf-8")
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary.load(p)


# ----------------------------------------------------------------------------- k-core
CASCADE = [  # 2-core needs 2 removal rounds: u4 -> item i3 -> u3
    ("u1", "i1", 1), ("u3", "i2", 2), ("u1", "i2", 3), ("u2", "i1", 4),
    ("u4", "i3", 5), ("u2", "i2", 6), ("u3", "i3", 7),
]


def test_kcore_cascade_over_rounds():
    df = frame(CASCADE, rating=np.arange(7.0))
    df.index = np.arange(100, 107)
    out = kcore_filter(df, 2, 2)
    assert out.index.tolist() == [100, 102, 103, 105]  # row order and index kept
    assert out.columns.tolist() == df.columns.tolist()
    assert out["rating"].tolist() == [0.0, 2.0, 3.0, 5.0]
    pd.testing.assert_frame_equal(kcore_filter(df, 2, 2, max_rounds=2), out)
    with pytest.raises(RuntimeError, match="converge"):
        kcore_filter(df, 2, 2, max_rounds=1)
    # one-sided cores
    assert kcore_filter(df, 2, 0).index.tolist() == [100, 101, 102, 103, 105, 106]
    assert kcore_filter(df, 0, 3).index.tolist() == [101, 102, 105]
    assert len(kcore_filter(df, 0, 1)) == 7 and len(kcore_filter(df, 1, 0, max_rounds=0)) == 7
    assert len(kcore_filter(df, 4, 4)) == 0
    with pytest.raises(ValueError):
        kcore_filter(df, -1, 2)


def test_chronological_ties_keep_file_order():
    df = frame([("b", "x", 5), ("a", "p", 9), ("b", "y", 3), ("b", "z", 5),
                ("a", "q", 9), ("b", "w", 5), ("a", "r", 1)])
    out = chronological(df)
    assert out["item_id"].tolist() == ["y", "x", "z", "w", "r", "p", "q"]  # users by first row
    assert out.index.tolist() == [2, 0, 3, 5, 6, 1, 4]


# ----------------------------------------------------------------------------- prepare
HAND = [
    ("u2", "b", 10), ("u1", "a", 30), ("u1", "c", 20), ("u3", "a", 5), ("u1", "b", 30),
    ("u2", "a", 10), ("u2", "c", 1), ("u1", "a", 40), ("u3", "b", 5),
]


def test_prepare_hand_case():
    df = frame(HAND, rating=np.ones(9))
    data = prepare(df, source="hand")
    # items: a=4, b=3, c=2; users: u1=4, u2=3, u3=2
    assert data.item_vocab.tokens == ["a", "b", "c"]
    assert data.user_vocab.tokens == ["u1", "u2", "u3"]
    a, b, c = 2, 3, 4
    expected = [[c, a, b, a], [c, b, a], [a, b]]  # ties (t=30, t=10, t=5) keep file order
    assert [s.tolist() for s in data.sequences] == expected
    assert [t.tolist() for t in data.timestamps] == [[20, 30, 30, 40], [1, 10, 10], [5, 5]]
    assert all(s.dtype == np.int64 for s in data.sequences + data.timestamps)
    assert data.metadata == {
        "num_users": 3, "num_items": 3, "num_interactions": 9,
        "config": {"user_core": 0, "item_core": 0, "max_core_rounds": 100, "dedupe": False},
        "fingerprint": data_fingerprint(df), "source": "hand"}
    np.testing.assert_array_equal(data.item_counts(), [0, 0, 4, 3, 2])
    assert data.item_counts().dtype == np.int64


def test_prepare_kcore_dedupe_and_types():
    df = frame(CASCADE + [("u1", "i1", 1)])  # last row repeats the first
    data = prepare(df, PrepareConfig(user_core=2, item_core=2, dedupe=True))
    assert data.user_vocab.tokens == ["u1", "u2"] and data.item_vocab.tokens == ["i1", "i2"]
    assert [s.tolist() for s in data.sequences] == [[2, 3], [2, 3]]
    assert data.metadata["num_interactions"] == 4
    assert data.metadata["config"]["dedupe"] is True
    kept = prepare(df, PrepareConfig(user_core=2, item_core=2))
    assert [s.tolist() for s in kept.sequences] == [[2, 2, 3], [2, 3]]
    with pytest.raises(RuntimeError):
        prepare(df, PrepareConfig(user_core=2, item_core=2, max_core_rounds=1))
    with pytest.raises(ValueError, match="no interactions"):
        prepare(df, PrepareConfig(user_core=9))
    with pytest.raises(ValueError):
        PrepareConfig(user_core=-1)
    with pytest.raises(ValueError, match="columns"):
        prepare(df.drop(columns="timestamp"))
    # integer ids / integral float timestamps are canonicalised to str / int64
    ints = pd.DataFrame({"user_id": [7, 7, 8], "item_id": [1, 2, 1], "timestamp": [3.0, 1.0, 2.0]})
    d = prepare(ints)
    assert d.user_vocab.tokens == ["7", "8"] and d.item_vocab.tokens == ["1", "2"]
    assert [s.tolist() for s in d.sequences] == [[3, 2], [2]]
    with pytest.raises(ValueError):
        prepare(ints.assign(timestamp=[1.5, 1.0, 2.0]))


def test_fingerprint():
    df = frame(HAND)
    fp = data_fingerprint(df)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert data_fingerprint(df.copy()) == fp
    assert data_fingerprint(df.assign(rating=1.0)) == fp  # extra columns ignored
    assert data_fingerprint(df.assign(timestamp=df["timestamp"].astype(float))) == fp
    swapped = df.iloc[[1, 0] + list(range(2, 9))]
    assert data_fingerprint(swapped) != fp  # row order matters
    changed = df.copy()
    changed.loc[4, "item_id"] = "c"
    assert data_fingerprint(changed) != fp
    assert data_fingerprint(df.iloc[:-1]) != fp


def test_save_load_round_trip(tmp_path):
    import tensorflow as tf

    data = prepare(frame(HAND), PrepareConfig(user_core=2))
    out = tmp_path / "prep"
    save_prepared(data, out)
    assert sorted(os.listdir(out)) == ["item_vocab.txt", "metadata.json", "sequences.tfrecord",
                                       "user_vocab.txt"]
    assert (out / "item_vocab.txt").read_text(encoding="utf-8") == "a\nb\nc\n"
    assert json.loads((out / "metadata.json").read_text()) == data.metadata
    records = [tf.train.Example.FromString(r.numpy())
               for r in tf.data.TFRecordDataset(str(out / "sequences.tfrecord"))]
    first = records[0].features.feature
    assert [r.features.feature["user_id"].bytes_list.value[0] for r in records] == [b"u1", b"u2", b"u3"]
    assert list(first["item_ids"].int64_list.value) == [4, 2, 3, 2]
    assert list(first["timestamps"].int64_list.value) == [20, 30, 30, 40]
    assert_prepared_equal(load_prepared(out), data)
    assert_prepared_equal(load_prepared(str(out)), data)


def test_load_prepared_errors(tmp_path):
    data = prepare(frame(HAND))
    out = tmp_path / "prep"
    save_prepared(data, out)
    (out / "sequences.tfrecord").rename(out / "sequences-00000-of-00002.tfrecord")
    assert_prepared_equal(load_prepared(out), data)  # shards are found by glob
    shutil.copy(out / "sequences-00000-of-00002.tfrecord", out / "sequences-00001-of-00002.tfrecord")
    with pytest.raises(ValueError, match="more than once"):
        load_prepared(out)
    save_prepared(data, out)  # removes the stale shards
    assert_prepared_equal(load_prepared(out), data)
    (out / "user_vocab.txt").write_text("u1\nu2\nuX\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not in the user vocabulary"):
        load_prepared(out)
    (out / "user_vocab.txt").write_text("u1\nu2\nu3\nu4\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no sequence"):
        load_prepared(out)
    (out / "user_vocab.txt").write_text("u1\nu2\nu3\n", encoding="utf-8")
    (out / "item_vocab.txt").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(ValueError, match="outside"):
        load_prepared(out)
    (out / "item_vocab.txt").write_text("a\nb\nc\n", encoding="utf-8")
    meta = json.loads((out / "metadata.json").read_text())
    (out / "metadata.json").write_text(json.dumps({**meta, "num_interactions": 3}))
    with pytest.raises(ValueError, match="disagrees"):
        load_prepared(out)
    for k, name in enumerate(["metadata.json", "sequences.tfrecord", "item_vocab.txt", "user_vocab.txt"]):
        fresh = tmp_path / f"fresh{k}"
        save_prepared(data, fresh)
        os.remove(fresh / name)
        with pytest.raises(FileNotFoundError, match=str(fresh / name.split(".")[0])):
            load_prepared(fresh)


def test_save_load_35k_users_fast(tmp_path):
    rng = np.random.default_rng(0)
    n_users, n_items = 35_000, 12_000
    items = Vocabulary([f"i{k}" for k in range(n_items)])
    users = Vocabulary([f"u{k}" for k in range(n_users)])
    lengths = rng.integers(5, 12, size=n_users)
    bounds = np.cumsum(lengths)[:-1]
    seqs = np.split(rng.integers(2, items.size, size=lengths.sum()).astype(np.int64), bounds)
    times = np.split(np.arange(lengths.sum(), dtype=np.int64), bounds)
    meta = {"num_users": n_users, "num_items": n_items, "num_interactions": int(lengths.sum()),
            "config": {}, "fingerprint": "x", "source": None}
    from tfrec.data.preprocess import PreparedData

    data = PreparedData(items, users, seqs, times, meta)
    t0 = time.perf_counter()
    save_prepared(data, tmp_path)
    t1 = time.perf_counter()
    back = load_prepared(tmp_path)
    t2 = time.perf_counter()
    assert t1 - t0 < 5 and t2 - t1 < 5, (t1 - t0, t2 - t1)
    assert_prepared_equal(back, data)


def test_prepare_movielens_100k():
    from tfrec.data import readers
    ds = readers.load_dataset("movielens-100k")
    data = prepare(ds.interactions, PrepareConfig(user_core=5, item_core=5))
    m = data.metadata
    assert m["num_users"] == 943 and 0 < m["num_items"] <= 1682
    assert m["num_interactions"] == sum(map(len, data.sequences)) <= 100_000
    assert all(np.all(np.diff(t) >= 0) for t in data.timestamps)
    assert data.item_counts()[2:].min() >= 5 and min(map(len, data.sequences)) >= 5
    split = leave_one_out(data.sequences)
    assert len(split.eval_users) == 943


# ----------------------------------------------------------------------------- splits
def test_leave_one_out_hand_case():
    seqs = [np.array([2, 3, 4, 5, 6]), np.array([7, 8]), np.array([9, 9, 2]), np.array([4])]
    sp = leave_one_out(seqs)
    assert [t.tolist() for t in sp.train] == [[2, 3, 4], [7, 8], [9], [4]]
    assert sp.eval_users.tolist() == [0, 2]
    assert [h.tolist() for h in sp.valid_history] == [[2, 3, 4], [9]]
    assert sp.valid_targets.tolist() == [5, 9]
    assert [h.tolist() for h in sp.test_history] == [[2, 3, 4, 5], [9, 9]]
    assert sp.test_targets.tolist() == [6, 2]
    for arr in (sp.eval_users, sp.valid_targets, sp.test_targets):
        assert arr.dtype == np.int64
    sp4 = leave_one_out(seqs, min_length=4)
    assert sp4.eval_users.tolist() == [0]
    assert [t.tolist() for t in sp4.train] == [[2, 3, 4], [7, 8], [9, 9, 2], [4]]


def test_leave_one_out_no_leakage():
    rng = np.random.default_rng(1)
    seqs = [rng.integers(2, 50, size=n) for n in rng.integers(1, 15, size=200)]
    sp = leave_one_out(seqs)
    assert len(sp.train) == len(seqs)
    ev = set(sp.eval_users.tolist())
    assert ev == {u for u, s in enumerate(seqs) if len(s) >= 3}
    for j, u in enumerate(sp.eval_users):
        s = seqs[u]
        np.testing.assert_array_equal(sp.train[u], s[:-2])  # last two positions never trained on
        assert len(sp.train[u]) == len(s) - 2
        np.testing.assert_array_equal(sp.valid_history[j], sp.train[u])
        np.testing.assert_array_equal(sp.test_history[j], np.append(sp.train[u], sp.valid_targets[j]))
        assert sp.valid_targets[j] == s[-2] and sp.test_targets[j] == s[-1]
    for u, s in enumerate(seqs):  # short users: whole sequence trains, never evaluated
        if u not in ev:
            np.testing.assert_array_equal(sp.train[u], s)


def test_leave_one_out_errors():
    with pytest.raises(ValueError, match="empty"):
        leave_one_out([np.array([2, 3, 4]), np.array([], dtype=np.int64)])
    with pytest.raises(ValueError, match="min_length"):
        leave_one_out([np.array([2, 3, 4])], min_length=2)
    sp = leave_one_out([])
    assert sp.eval_users.shape == (0,) and sp.train == []


# ----------------------------------------------------------------------------- issue 21: loader
def _log(tmp_path, text):
    path = tmp_path / "log.tsv"
    path.write_text("user_id\titem_id\ttimestamp\n" + text)
    return path


def test_prepare_counts_duplicates_and_cli_drops_them_on_request(tmp_path, capsys):
    from tfrec_cli import main

    path = _log(tmp_path, "u1\ti1\t1\nu1\ti1\t1\nu1\ti2\t2\nu2\ti1\t1\nu2\ti1\t1\nu2\ti1\t1\n")
    df = pd.read_csv(path, sep="\t", dtype=str).assign(timestamp=lambda d: d.timestamp.astype("int64"))
    assert prepare(df).duplicate_rows == 3 and prepare(df).metadata["num_interactions"] == 6
    assert main(["prepare", "--input", str(path), "--out", str(tmp_path / "kept")]) == 0
    assert "3 duplicate interaction rows (same user, item and timestamp) kept" in capsys.readouterr().err
    assert main(["prepare", "--input", str(path), "--out", str(tmp_path / "dropped"), "--drop-duplicates"]) == 0
    assert "3 duplicate interaction rows (same user, item and timestamp) dropped" in capsys.readouterr().err
    assert load_prepared(tmp_path / "dropped").metadata["num_interactions"] == 3


@pytest.mark.parametrize("make_out, message", [
    (lambda t: t / "a_file" / "out", "is not a folder"),
    (lambda t: t / "a_file", "is not a folder"),
    (lambda t: t / "a_file" / "deeper" / "out", "is not a folder"),
    (lambda t: "  ", "--out is empty"),
])
def test_prepare_out_path_problems_are_clean_errors(tmp_path, capsys, make_out, message):
    from tfrec_cli import main

    (tmp_path / "a_file").write_text("a regular file")
    path = _log(tmp_path, "u1\ti1\t1\nu1\ti2\t2\n")
    assert main(["prepare", "--input", str(path), "--out", str(make_out(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tfrec prepare: error: ") and message in err and "Traceback" not in err

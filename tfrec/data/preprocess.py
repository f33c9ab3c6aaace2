"""In-memory preprocessing: k-core filtering, vocabularies, per-user sequences, splits.

Input: an interactions ``DataFrame`` with columns ``user_id`` (str), ``item_id`` (str),
``timestamp`` (int64) -- extra columns (``rating``, ``label``) are ignored -- in file
order, as returned by ``tfrec.data.readers.read_interactions``. Row order matters: it
breaks timestamp ties (a user's interactions with equal timestamps keep file order).

Example::

    >>> df = pd.DataFrame({"user_id": ["u1", "u2", "u1", "u1"],
    ...                    "item_id": ["a", "a", "b", "c"],
    ...                    "timestamp": [5, 1, 5, 2]})
    >>> data = prepare(df)
    >>> data.item_vocab.tokens, data.user_vocab.tokens
    (['a', 'b', 'c'], ['u1', 'u2'])
    >>> [s.tolist() for s in data.sequences]   # u1: c(t=2), a(t=5), b(t=5, later row)
    [[4, 2, 3], [2]]
    >>> leave_one_out(data.sequences).test_targets.tolist()
    [3]

``save_prepared`` / ``load_prepared`` store vocab files, a TFRecord of ``tf.train.Example``
(one per user) and ``metadata.json``; ``tfrec.data.beam_preprocess`` writes the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from tfrec.data.vocab import NUM_RESERVED, Vocabulary

COLUMNS = ("user_id", "item_id", "timestamp")
ITEM_VOCAB_FILE = "item_vocab.txt"
USER_VOCAB_FILE = "user_vocab.txt"
SEQUENCES_PREFIX = "sequences"
SEQUENCES_FILE = "sequences.tfrecord"
SEQUENCES_GLOB = "sequences*.tfrecord*"
METADATA_FILE = "metadata.json"


@dataclasses.dataclass
class PrepareConfig:
    """Preprocessing options (stored in ``metadata["config"]``).

    Attributes:
        user_core / item_core: keep users / items with >= that many interactions (0/1 = off).
        max_core_rounds: k-core rounds (see ``kcore_filter``) before giving up with ``RuntimeError``.
        dedupe: drop exact repeats of (user_id, item_id, timestamp), keeping the first row
            (applied before k-core; ``tfrec prepare --drop-duplicates``). Off by default: repeats
            are kept and counted (``PreparedData.duplicate_rows``; ``tfrec prepare`` reports them).
    """

    user_core: int = 0
    item_core: int = 0
    max_core_rounds: int = 100
    dedupe: bool = False

    def __post_init__(self):
        for name in ("user_core", "item_core", "max_core_rounds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"PrepareConfig.{name} must be an int >= 0, got {v!r}")
            setattr(self, name, int(v))


def canonical_interactions(df: pd.DataFrame) -> pd.DataFrame:
    """Columns (user_id: str objects, item_id: str objects, timestamp: int64), RangeIndex.

    Ids are converted with ``str``; integral float timestamps are cast to int64. Missing
    columns/values or non-integral timestamps raise ``ValueError``.
    """
    if not set(COLUMNS) <= set(df.columns):
        raise ValueError(f"interactions DataFrame needs columns {COLUMNS}, has {list(df.columns)}")
    if df["user_id"].isna().any() or df["item_id"].isna().any():
        raise ValueError("columns 'user_id'/'item_id' have missing values")
    out = {c: df[c].astype(str).to_numpy(dtype=object) for c in ("user_id", "item_id")}
    ts = df["timestamp"]
    if not pd.api.types.is_integer_dtype(ts.dtype):
        f = pd.to_numeric(ts, errors="raise").to_numpy(dtype=np.float64)
        if np.isnan(f).any() or (f != np.floor(f)).any():
            raise ValueError("column 'timestamp' must hold integers (no NaN or fractions)")
        ts = f
    out["timestamp"] = np.asarray(ts, dtype=np.int64)
    return pd.DataFrame(out)


_FP_KEYS = ("tfrec-fp-key-one", "tfrec-fp-key-two")  # 16-byte siphash keys
_MASK64 = (1 << 64) - 1


def fingerprint_partial(rows, user_ids, item_ids, timestamps) -> tuple:
    """Mergeable fingerprint state ``(n, s1, s2)`` of rows given with their row indices.

    ``s_k`` = sum mod 2**64 of ``pd.util.hash_pandas_object`` row hashes (siphash key k) of
    (row index, user_id, item_id, timestamp). Partials of disjoint row sets add up, which
    lets Beam compute the same fingerprint with a distributed combine.
    """
    frame = pd.DataFrame({"row": np.asarray(rows, dtype=np.int64),
                          "user_id": np.asarray(user_ids, dtype=object),
                          "item_id": np.asarray(item_ids, dtype=object),
                          "timestamp": np.asarray(timestamps, dtype=np.int64)})
    sums = [int(pd.util.hash_pandas_object(frame, index=False, hash_key=k)
                .to_numpy(np.uint64).sum(dtype=np.uint64)) for k in _FP_KEYS]
    return (len(frame), sums[0], sums[1])


def merge_fingerprint_partials(parts) -> tuple:
    parts = list(parts)
    return (sum(p[0] for p in parts), sum(p[1] for p in parts) & _MASK64, sum(p[2] for p in parts) & _MASK64)


def fingerprint_hex(partial: tuple) -> str:
    return hashlib.sha256("tfrec-interactions-v1:{}:{:016x}:{:016x}".format(*partial).encode()).hexdigest()


def data_fingerprint(df: pd.DataFrame) -> str:
    """sha256 hex identifying the (user_id, item_id, timestamp) content of ``df`` in row order.

    Defined as sha256 of ``(n, s1, s2)`` from ``fingerprint_partial`` with row indices
    0..n-1 (two sums of per-row hashes under different siphash keys). Any changed value or
    moved row changes it; extra columns do not. Vectorised: ~0.2 s per 300k rows.
    """
    c = canonical_interactions(df)
    return fingerprint_hex(fingerprint_partial(np.arange(len(c)), c["user_id"], c["item_id"], c["timestamp"]))


def kcore_filter(df: pd.DataFrame, user_core: int, item_core: int, max_rounds: int = 100) -> pd.DataFrame:
    """Iterative k-core: rows of users with >= user_core and items with >= item_core rows.

    Each round drops users below ``user_core`` then items below ``item_core`` (counted on
    the remaining rows); rounds repeat until nothing changes. The result (the unique
    maximal k-core) keeps ``df``'s row order, index and columns. Still not a k-core after
    ``max_rounds`` rounds -> ``RuntimeError``. Cores 0/1 disable that side.

    >>> df = pd.DataFrame({"user_id": list("aab"), "item_id": list("xyx"), "timestamp": [1, 2, 3]})
    >>> kcore_filter(df, 2, 1).index.tolist()
    [0, 1]
    """
    if user_core < 0 or item_core < 0 or max_rounds < 0:
        raise ValueError("user_core, item_core and max_rounds must be >= 0")
    sides = [(pd.factorize(df[c], sort=False)[0], core)
             for c, core in (("user_id", user_core), ("item_id", item_core)) if core > 1]
    alive = np.ones(len(df), dtype=bool)

    def small_rows(codes, core):
        return alive & (np.bincount(codes[alive], minlength=len(codes))[codes] < core)

    for _ in range(max_rounds):  # one round = users, then items
        changed = False
        for codes, core in sides:
            bad = small_rows(codes, core)
            if bad.any():
                alive &= ~bad
                changed = True
        if not changed:
            return df[alive]
    if any(small_rows(codes, core).any() for codes, core in sides):
        raise RuntimeError(
            f"k-core filtering (user_core={user_core}, item_core={item_core}) did not "
            f"converge in {max_rounds} rounds; raise max_core_rounds")
    return df[alive]


def chronological(df: pd.DataFrame) -> pd.DataFrame:
    """Rows grouped by user, each user's rows sorted by timestamp; ties keep row order.

    Users appear in order of their first row in ``df`` (not sorted by id); within a user
    the sort is stable on ``timestamp``, i.e. key = (first appearance of user, timestamp,
    row position). Index and columns are kept.

    >>> df = pd.DataFrame({"user_id": ["b", "a", "b"], "item_id": ["x", "y", "z"], "timestamp": [2, 1, 2]})
    >>> chronological(df)["item_id"].tolist()
    ['x', 'z', 'y']
    """
    users = pd.factorize(df["user_id"], sort=False)[0]
    order = np.lexsort((np.arange(len(df)), df["timestamp"].to_numpy(), users))
    return df.iloc[order]


@dataclasses.dataclass(eq=False)
class PreparedData:
    """Vocabularies and per-user chronological item-id sequences.

    Attributes:
        item_vocab, user_vocab: ``Vocabulary`` (ids 0/1 reserved, real tokens from 2).
        sequences: ``list[np.ndarray]`` of length ``len(user_vocab.tokens)``; entry ``i`` is
            the user with id ``i + 2``; int64 item ids (>= 2) in chronological order.
        timestamps: same shapes, int64 timestamps (non-decreasing within a user).
        metadata: ``{"num_users", "num_items", "num_interactions", "config", "fingerprint",
            "source"}``; ``num_*`` count real tokens / rows after filtering.
    """

    item_vocab: Vocabulary
    user_vocab: Vocabulary
    sequences: list
    timestamps: list
    metadata: dict
    duplicate_rows: int = 0  # exact (user, item, timestamp) repeats in the input (dropped with dedupe)

    def item_counts(self) -> np.ndarray:
        """Interactions per item id, int64 array of shape ``(item_vocab.size,)`` (0 for 0/1)."""
        flat = np.concatenate([np.zeros(0, np.int64), *self.sequences])
        return np.bincount(flat, minlength=self.item_vocab.size).astype(np.int64)


def build_metadata(num_users: int, num_items: int, num_interactions: int,
                   config: PrepareConfig, fingerprint: str, source: Optional[str]) -> dict:
    """The ``PreparedData.metadata`` dict (shared by the in-memory and Beam paths)."""
    return {"num_users": int(num_users), "num_items": int(num_items),
            "num_interactions": int(num_interactions), "config": dataclasses.asdict(config),
            "fingerprint": fingerprint, "source": source}


def metadata_json(metadata: dict) -> str:
    """Exact ``metadata.json`` text (shared by the in-memory and Beam writers)."""
    return json.dumps(metadata, indent=2, sort_keys=True) + "\n"


def prepare(df: pd.DataFrame, config: PrepareConfig = PrepareConfig(), source: Optional[str] = None) -> PreparedData:
    """(dedupe) -> k-core -> vocabularies from post-filter counts -> chronological sequences.

    Both vocabularies use ``Vocabulary.from_counts`` (count desc, token asc). Within a
    user, items are ordered by (timestamp, row position in ``df``). ``source`` is copied
    into the metadata. Nothing left after filtering -> ``ValueError``.
    """
    data = canonical_interactions(df)
    fingerprint = fingerprint_hex(fingerprint_partial(
        np.arange(len(data)), data["user_id"], data["item_id"], data["timestamp"]))
    duplicated = data.duplicated(list(COLUMNS), keep="first")
    duplicate_rows = int(duplicated.sum())
    if config.dedupe:
        data = data[~duplicated]
    data = kcore_filter(data, config.user_core, config.item_core, config.max_core_rounds)
    if len(data) == 0:
        raise ValueError(f"no interactions left after filtering with {config}")
    user_vocab = Vocabulary.from_counts(data["user_id"].value_counts().to_dict())
    item_vocab = Vocabulary.from_counts(data["item_id"].value_counts().to_dict())
    uid = user_vocab.lookup(data["user_id"].to_numpy())
    iid = item_vocab.lookup(data["item_id"].to_numpy())
    ts = data["timestamp"].to_numpy(np.int64)
    order = np.lexsort((data.index.to_numpy(), ts, uid))
    bounds = np.cumsum(np.bincount(uid, minlength=user_vocab.size)[NUM_RESERVED:])[:-1]
    metadata = build_metadata(len(user_vocab.tokens), len(item_vocab.tokens), len(data),
                              config, fingerprint, source)
    return PreparedData(item_vocab, user_vocab, np.split(iid[order], bounds), np.split(ts[order], bounds), metadata,
                        duplicate_rows)


def check_output_dir(out_dir) -> None:
    """``ValueError`` naming the problem when ``out_dir`` cannot be (created as) a folder to write into.

    Local paths only (URLs are left to the writer): empty, an existing non-folder, a parent
    that is a file, or a folder without write permission.

    >>> check_output_dir("/dev/null/out")
    Traceback (most recent call last):
    ...
    ValueError: --out /dev/null/out: /dev/null is not a folder
    """
    text = os.fspath(out_dir)
    if not text.strip():
        raise ValueError("--out is empty")
    if "://" in text:
        return
    path = os.path.abspath(text)
    probe = path
    while not os.path.exists(probe):  # the deepest existing ancestor decides
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ValueError(f"--out {text}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--out {text}: no permission to write in {probe}")


def _join(out_dir, name: str) -> str:
    return os.path.join(os.fspath(out_dir), name)


def make_example(user_id: str, item_ids: Sequence[int], timestamps: Sequence[int]) -> bytes:
    """Serialized ``tf.train.Example``: user_id (bytes), item_ids / timestamps (int64 lists)."""
    import tensorflow as tf
    ints = lambda v: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(x) for x in v]))  # noqa: E731
    feats = {"user_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[user_id.encode("utf-8")])),
             "item_ids": ints(item_ids), "timestamps": ints(timestamps)}
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString(deterministic=True)


def remove_sequence_files(out_dir) -> None:
    """Delete ``sequences*.tfrecord*`` in ``out_dir`` (stale shards would be read back)."""
    import tensorflow as tf
    for path in tf.io.gfile.glob(_join(out_dir, SEQUENCES_GLOB)):
        tf.io.gfile.remove(path)


def write_text(path: str, text: str) -> None:
    import tensorflow as tf
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(text)


def save_prepared(data: PreparedData, out_dir) -> None:
    """Write ``item_vocab.txt``, ``user_vocab.txt``, ``sequences.tfrecord`` (one Example per
    user, in user-id order) and ``metadata.json`` into ``out_dir`` (created if needed).
    Existing ``sequences*.tfrecord*`` files in ``out_dir`` are removed first."""
    import tensorflow as tf
    if not len(data.sequences) == len(data.timestamps) == len(data.user_vocab.tokens):
        raise ValueError("sequences/timestamps must have one entry per user-vocabulary token")
    tf.io.gfile.makedirs(os.fspath(out_dir))
    remove_sequence_files(out_dir)
    data.item_vocab.save(_join(out_dir, ITEM_VOCAB_FILE))
    data.user_vocab.save(_join(out_dir, USER_VOCAB_FILE))
    with tf.io.TFRecordWriter(_join(out_dir, SEQUENCES_FILE)) as w:
        for user, items, ts in zip(data.user_vocab.tokens, data.sequences, data.timestamps):
            w.write(make_example(user, items, ts))
    write_text(_join(out_dir, METADATA_FILE), metadata_json(data.metadata))


def _read_sequence_file(path: str):
    """Yield (users, item-id arrays, timestamp arrays) per batch of Examples in ``path``."""
    import tensorflow as tf
    comp = "GZIP" if path.endswith(".gz") else ("ZLIB" if path.endswith(".zlib") else "")
    spec = {"user_id": tf.io.FixedLenFeature([], tf.string),
            "item_ids": tf.io.RaggedFeature(tf.int64), "timestamps": tf.io.RaggedFeature(tf.int64)}
    ds = tf.data.TFRecordDataset(path, compression_type=comp).batch(8192)
    for b in ds.map(lambda x: tf.io.parse_example(x, spec)):
        items, times = b["item_ids"], b["timestamps"]
        splits = items.row_splits.numpy()
        if not np.array_equal(splits, times.row_splits.numpy()):
            raise ValueError(f"{path}: item_ids and timestamps differ in length for some user")
        yield ([u.decode("utf-8") for u in b["user_id"].numpy()],
               np.split(items.values.numpy(), splits[1:-1]), np.split(times.values.numpy(), splits[1:-1]))


def load_prepared(out_dir) -> PreparedData:
    """Read a directory written by ``save_prepared`` or the Beam pipeline.

    Reads every ``sequences*.tfrecord*`` shard (``.gz`` = GZIP), orders users by user-vocab
    id and validates: unknown or repeated users, users without a sequence, item ids outside
    the item vocabulary and counts disagreeing with ``metadata.json`` raise ``ValueError``;
    missing files raise ``FileNotFoundError`` naming the path.
    """
    import tensorflow as tf
    paths = {n: _join(out_dir, n) for n in (ITEM_VOCAB_FILE, USER_VOCAB_FILE, METADATA_FILE)}
    for p in paths.values():
        if not tf.io.gfile.exists(p):
            raise FileNotFoundError(f"prepared-data file not found: {p}")
    shards = sorted(tf.io.gfile.glob(_join(out_dir, SEQUENCES_GLOB)))
    if not shards:
        raise FileNotFoundError(f"no sequence file: {_join(out_dir, SEQUENCES_GLOB)} matches nothing")
    item_vocab = Vocabulary.load(paths[ITEM_VOCAB_FILE])
    user_vocab = Vocabulary.load(paths[USER_VOCAB_FILE])
    with tf.io.gfile.GFile(paths[METADATA_FILE], "r") as f:
        metadata = json.load(f)
    n_users = len(user_vocab.tokens)
    sequences: list[Any] = [None] * n_users
    timestamps: list[Any] = list(sequences)
    for shard in shards:
        for users, items, times in _read_sequence_file(shard):
            for user, k, it, ts in zip(users, (user_vocab.lookup(users) - NUM_RESERVED).tolist(), items, times):
                problem = ("is not in the user vocabulary" if k < 0 else
                           "appears more than once (stale shards?)" if sequences[k] is not None else
                           f"has no items or item ids outside [2, {item_vocab.size})"
                           if len(it) == 0 or it.min() < NUM_RESERVED or it.max() >= item_vocab.size else None)
                if problem:
                    raise ValueError(f"{shard}: user {user!r} {problem}")
                sequences[k], timestamps[k] = it, ts
    missing = [user_vocab.tokens[k] for k in range(n_users) if sequences[k] is None]
    if missing:
        raise ValueError(f"{out_dir}: {len(missing)} users have no sequence, e.g. {missing[:3]}")
    got = {"num_users": n_users, "num_items": len(item_vocab.tokens),
           "num_interactions": int(sum(len(s) for s in sequences))}
    bad = {k: (metadata.get(k), v) for k, v in got.items() if metadata.get(k) != v}
    if bad:
        raise ValueError(f"{paths[METADATA_FILE]} disagrees with the data (metadata, actual): {bad}")
    return PreparedData(item_vocab, user_vocab, sequences, timestamps, metadata)


@dataclasses.dataclass(eq=False)
class LeaveOneOutSplit:
    """Leave-one-out split (see ``leave_one_out``). Arrays are int64.

    Attributes:
        train: per user (all users, same order as the input): training items.
        eval_users: ``(E,)`` indices into the input of evaluated users.
        valid_history: ``E`` arrays ``s[:-2]``; valid_targets: ``(E,)`` ``s[-2]``.
        test_history: ``E`` arrays ``s[:-1]``; test_targets: ``(E,)`` ``s[-1]``.
    """

    train: list
    eval_users: np.ndarray
    valid_history: list
    valid_targets: np.ndarray
    test_history: list
    test_targets: np.ndarray


def leave_one_out(sequences: Sequence[np.ndarray], min_length: int = 3) -> LeaveOneOutSplit:
    """Last item -> test, second-to-last -> validation, the rest -> training.

    Rule: a user with ``len(s) >= min_length`` is evaluated: ``train = s[:-2]``, validation
    = (history ``s[:-2]``, target ``s[-2]``), test = (history ``s[:-1]``, target ``s[-1]``).
    A shorter user is never evaluated (in validation or test) and trains on its whole
    sequence ``s``. Empty sequences raise ``ValueError``; ``min_length < 3`` raises
    ``ValueError`` (an evaluated user needs >= 1 training item).

    >>> sp = leave_one_out([np.array([2, 3, 4, 5]), np.array([6, 7])])
    >>> [t.tolist() for t in sp.train], sp.eval_users.tolist(), sp.valid_targets.tolist()
    ([[2, 3], [6, 7]], [0], [4])
    """
    if min_length < 3:
        raise ValueError(f"min_length must be >= 3, got {min_length}")
    seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
    for u, s in enumerate(seqs):
        if s.ndim != 1 or len(s) == 0:
            raise ValueError(f"sequence {u} is empty or not 1-d (shape {s.shape})")
    ev = [u for u, s in enumerate(seqs) if len(s) >= min_length]
    return LeaveOneOutSplit(
        train=[s[:-2] if len(s) >= min_length else s for s in seqs],
        eval_users=np.asarray(ev, dtype=np.int64),
        valid_history=[seqs[u][:-2] for u in ev],
        valid_targets=np.asarray([seqs[u][-2] for u in ev], dtype=np.int64),
        test_history=[seqs[u][:-1] for u in ev],
        test_targets=np.asarray([seqs[u][-1] for u in ev], dtype=np.int64))

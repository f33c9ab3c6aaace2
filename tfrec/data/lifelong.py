"""Lifelong-sequence CTR samples (R2LED and its baselines) and their `tf.data` input.

A **sample** is one rating event of a user: the *target* item, its click label and
the user's *history* = every earlier event of that user. Labels: the ``label``
column when the interactions have one (``load_dataset`` adds it for
``movielens-1m-subset``: rating >= 4 is a click), else ``rating >= click_threshold``.

**Time-based split, no leakage** (global cut-offs, not per user):

- event timestamps of the whole log give two cut-offs: ``t_test`` is the timestamp
  at the ``1 - test_fraction`` quantile of events and ``t_valid`` the one at the
  ``1 - test_fraction - valid_fraction`` quantile; an event with ``t >= t_test`` is a
  test sample, ``t_valid <= t < t_test`` a validation sample, earlier ones are
  training samples (an event at a cut-off time goes to the later split);
- a sample's history holds only the user's events with timestamps **strictly
  before** the target's timestamp (events in the same second as the target, which
  MovieLens has many of, are neither history nor future: they are left out), so a
  training history never contains a validation/test event, and a test history
  contains the user's earlier test-period events only if they happened before the
  target (what a server would know when scoring it);
- the item vocabulary is built from training events only (count descending, token
  ascending): items first seen in validation/test map to OOV = 1 wherever they
  appear (targets and histories). ``vocabulary="catalog"`` appends every other item
  of the item table after the training items (catalog order by token), so new
  items keep their own id and semantic ID; nothing about them is learnt from the
  future either way.

Within a user, events are chronological, timestamp ties keep file order
(``tfrec.data.preprocess.chronological``). Histories are item ids of *all* earlier
rated events (clicks and non-clicks); every history event enters the models with
its feedback (``history_labels``, ``history_ratings``) and its time gap to the
target (``history_gaps``, :func:`gap_bucket`), all from strictly earlier events.
Samples with fewer than ``min_history`` history events (default 1) are dropped.
User side: ``user_profiles (U, P)`` token ids of a user file (``users.dat``:
gender, age bucket, occupation; :func:`attach_user_profiles`).

**Batches** (:func:`lifelong_dataset`): every sample; training batches are
shuffled, bucketed by history length and trimmed to their longest history
(:func:`batch_indices`), which removes most padding (mean history ~170 of 1,024).

**Memory**: events are stored once, flat and grouped by user; a sample is a
reference ``(event, history_end)`` into that array, so the whole history of every
sample costs O(events), not O(events^2). :func:`lifelong_dataset` cuts the most
recent ``max_history`` events of each history on the fly and right-pads them with
0 (position 0 = oldest kept event, like ``tfrec.data.pipelines.pad_right``).

Item side: ``item_genres (V, G)`` int32 genre ids (genre vocabulary ids >= 2, 0 =
padding; rows 0/1 and items without genres are all 0) for SIM-hard. Item
semantics come from the semantic store (`tfrec encode`, text "Title (Year).
Genres: A, B", built by `tfrec.semantics.encode.item_texts`), aligned with
``item_vocab``.

Example::

    >>> df = pd.DataFrame({"user_id": ["u"] * 4, "item_id": ["a", "b", "a", "c"],
    ...                    "timestamp": [1, 2, 3, 4], "label": [1.0, 0.0, 1.0, 1.0]})
    >>> data = build_lifelong_data(df, valid_fraction=0.25, test_fraction=0.25)
    >>> {name: len(s) for name, s in data.splits.items()}
    {'train': 1, 'valid': 1, 'test': 1}
    >>> data.history(data.splits["test"])[0].tolist()   # a, b, a; "c" is the target
    [2, 3, 2]
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from tfrec.data.preprocess import canonical_interactions, chronological, data_fingerprint
from tfrec.data.readers import DATASETS, load_dataset
from tfrec.data.vocab import NUM_RESERVED, PAD_ID, Vocabulary

SPLITS = ("train", "valid", "test")
VOCABULARIES = ("train", "catalog")


@dataclasses.dataclass(eq=False)
class LifelongSamples:
    """The samples of one split, as references into :class:`LifelongData` events.

    Attributes (all ``(S,)`` arrays, in event order: users in first-appearance
    order, each user's events chronologically):
        event: int64 flat index of the target event.
        user: int64 user index (into ``LifelongData.users``).
        history_start, history_end: int64 flat range ``[start, end)`` of the history.
        target_id: int32 item id of the target; label: float32 click label.
        timestamp: int64 target timestamp.
    """

    event: np.ndarray
    user: np.ndarray
    history_start: np.ndarray
    history_end: np.ndarray
    target_id: np.ndarray
    label: np.ndarray
    timestamp: np.ndarray

    def __len__(self) -> int:
        return len(self.event)

    @property
    def history_length(self) -> np.ndarray:
        return self.history_end - self.history_start


@dataclasses.dataclass(eq=False)
class LifelongData:
    """Events grouped by user, the split samples and the item-side tables.

    Attributes:
        item_vocab: ``Vocabulary`` of items (see module doc for which items).
        users: ``(U,)`` user tokens, in first-appearance order.
        user_offsets: ``(U + 1,)`` int64; user ``u``'s events are
            ``[user_offsets[u], user_offsets[u + 1])`` of the flat arrays.
        event_items: ``(N,)`` int32 item ids (OOV = 1 for items outside the vocabulary).
        event_timestamps: ``(N,)`` int64; event_labels: ``(N,)`` float32;
        event_ratings: ``(N,)`` float32 (NaN when the log has no rating).
        event_split: ``(N,)`` int8 index into ``SPLITS`` (0 train, 1 valid, 2 test).
        splits: ``{"train" | "valid" | "test": LifelongSamples}``.
        cutoffs: ``{"valid": t_valid, "test": t_test}`` (int timestamps).
        genre_vocab: ``Vocabulary`` of genres or None; item_genres: ``(V, G)`` int32 or None.
        metadata: counts, cut-offs, options and the interactions fingerprint.
        event_tokens: ``(N,)`` object array of the raw item tokens of the events (the
            tokens behind ``event_items``, including the OOV ones), or None.
    """

    item_vocab: Vocabulary
    users: np.ndarray
    user_offsets: np.ndarray
    event_items: np.ndarray
    event_timestamps: np.ndarray
    event_labels: np.ndarray
    event_ratings: np.ndarray
    event_split: np.ndarray
    splits: dict
    cutoffs: dict
    genre_vocab: Optional[Vocabulary]
    item_genres: Optional[np.ndarray]
    metadata: dict
    event_tokens: Optional[np.ndarray] = None
    user_profiles: Optional[np.ndarray] = None
    profile_vocabs: Optional[dict] = None

    @property
    def num_user_ids(self) -> int:
        """Size of the user-id input space: users + padding (0) + unknown (1)."""
        return len(self.users) + NUM_RESERVED

    @property
    def profile_sizes(self) -> list:
        """Vocabulary size of each user-profile field (``profile_vocabs`` order), [] without profiles."""
        return [v.size for v in (self.profile_vocabs or {}).values()]

    def history(self, samples: LifelongSamples, max_history: Optional[int] = None) -> list:
        """Histories of ``samples`` as a list of int32 arrays (most recent ``max_history``)."""
        out = []
        for start, end in zip(samples.history_start.tolist(), samples.history_end.tolist()):
            if max_history is not None:
                start = max(start, end - max_history)
            out.append(self.event_items[start:end])
        return out

    def item_click_prior(self, smoothing: float = 1.0) -> np.ndarray:
        """``(V,)`` float32 smoothed click rate of each item over *training* targets:
        ``(clicks + smoothing * global_rate) / (impressions + smoothing)``. The
        popularity baseline of the CTR benchmark."""
        train = self.splits["train"]
        size = self.item_vocab.size
        shows = np.bincount(train.target_id, minlength=size).astype(np.float64)
        clicks = np.bincount(train.target_id, weights=train.label, minlength=size)
        rate = clicks.sum() / max(shows.sum(), 1.0)
        return ((clicks + smoothing * rate) / (shows + smoothing)).astype(np.float32)


def _labels(frame: pd.DataFrame, click_threshold: Optional[float]) -> np.ndarray:
    if "label" in frame.columns:
        labels = pd.to_numeric(frame["label"], errors="coerce").to_numpy(np.float64)
        bad = ~np.isin(labels, (0.0, 1.0))
        if bad.any():
            raise ValueError(f"column 'label' must hold 0/1, found {frame['label'].iloc[int(np.argmax(bad))]!r} "
                             f"at row {int(np.argmax(bad))}")
        return labels.astype(np.float32)
    if "rating" in frame.columns and click_threshold is not None:
        return (frame["rating"].to_numpy(np.float64) >= click_threshold).astype(np.float32)
    raise KeyError("interactions need a 'label' column, or a 'rating' column and click_threshold= "
                   f"(rating >= threshold is a click); found columns {list(frame.columns)}")


def time_cutoffs(timestamps: np.ndarray, valid_fraction: float, test_fraction: float) -> dict:
    """``{"valid": t_valid, "test": t_test}``: timestamps at the event quantiles
    ``1 - test_fraction - valid_fraction`` and ``1 - test_fraction``."""
    for name, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    if valid_fraction + test_fraction >= 1.0:
        raise ValueError(f"valid_fraction + test_fraction must be < 1 (training needs events), "
                         f"got {valid_fraction} + {test_fraction}")
    ts = np.sort(np.asarray(timestamps, np.int64))
    n = len(ts)
    at = lambda q: int(ts[min(n - 1, int(math.floor(n * q)))])  # noqa: E731
    return {"valid": at(1.0 - test_fraction - valid_fraction), "test": at(1.0 - test_fraction)}


# Item-table columns read as genres/categories, first present wins: (column, separator; None = whitespace).
GENRE_COLUMNS = (("genres", "|"), ("categories", "|"), ("class", None))


def item_genre_lists(items: pd.DataFrame) -> list:
    """Each row's genres (a list of str) from the first ``GENRE_COLUMNS`` column the table has (none: empty
    lists): THE genre reading of item tables, for training (`item_tables`) and new items alike.

    >>> item_genre_lists(pd.DataFrame({"item_id": ["a", "b"], "genres": ["Drama|War", ""]}))
    [['Drama', 'War'], []]
    """
    column, sep = next(((c, sep) for c, sep in GENRE_COLUMNS if c in items.columns), (None, None))
    raw = items[column].fillna("").astype(str).to_numpy() if column else np.full(len(items), "")
    return [[g.strip() for g in s.split(sep) if g.strip()] for s in raw]


def item_tables(items: Optional[pd.DataFrame], item_vocab: Vocabulary):
    """Genre vocabulary and ``(V, G)`` genre ids from an item table (``GENRE_COLUMNS``:
    ``genres`` or ``categories`` ``|``-separated, or ml-100k's ``class`` space-separated)."""
    if items is None:
        return None, None
    if "item_id" not in items.columns:
        raise KeyError(f"item table needs an 'item_id' column, found {list(items.columns)}")
    ids = item_vocab.lookup(items["item_id"].astype(str).to_numpy())
    genres = item_genre_lists(items)
    counts = pd.Series([g for gs in genres for g in gs], dtype=object).value_counts().to_dict()
    genre_vocab = Vocabulary.from_counts(counts)
    width = max([len(g) for g in genres] + [1])
    item_genres = np.zeros((item_vocab.size, width), np.int32)
    lengths = np.array([len(g) for g in genres])
    rows = np.repeat(ids, lengths)
    cols = np.concatenate([np.arange(k) for k in lengths] + [np.zeros(0, np.int64)])
    flat_ids = genre_vocab.lookup(np.array([g for gs in genres for g in gs], dtype=object))
    keep = rows >= NUM_RESERVED
    item_genres[rows[keep], cols[keep]] = flat_ids[keep]
    return genre_vocab, item_genres


def build_lifelong_data(
    interactions: pd.DataFrame,
    items: Optional[pd.DataFrame] = None,
    *,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    click_threshold: Optional[float] = None,
    min_history: int = 1,
    vocabulary: str = "train",
    source: Optional[str] = None,
) -> LifelongData:
    """Lifelong CTR samples with a global time split (see the module doc for the rules).

    Args:
        interactions: ``user_id, item_id, timestamp`` plus ``label`` (0/1) or
            ``rating`` (with ``click_threshold``), in file order.
        items: optional item table with ``item_id`` and optional ``title`` and
            ``genres`` (``|``-separated), e.g. ``read_items("movies.dat")``.
        valid_fraction: float, share of the latest events (before the test ones) for validation.
        test_fraction: float, share of the latest events for test.
        click_threshold: float or None, used only when there is no ``label`` column.
        min_history: int >= 0, samples with a shorter history are dropped.
        vocabulary: ``"train"`` (items of training events; others -> OOV) or
            ``"catalog"`` (training items, then the other items of ``items``).
        source: str, copied into the metadata.

    Returns:
        :class:`LifelongData`.
    """
    if vocabulary not in VOCABULARIES:
        raise ValueError(f"vocabulary must be one of {VOCABULARIES}, got {vocabulary!r}")
    if vocabulary == "catalog" and items is None:
        raise ValueError("vocabulary='catalog' needs the item table (items=)")
    if isinstance(min_history, bool) or not isinstance(min_history, (int, np.integer)) or min_history < 0:
        raise ValueError(f"min_history must be an int >= 0, got {min_history!r}")
    if len(interactions) == 0:
        raise ValueError("no interactions: the log is empty")
    labels = _labels(interactions, click_threshold)
    frame = canonical_interactions(interactions)
    frame["label"] = labels
    frame["rating"] = (interactions["rating"].to_numpy(np.float32) if "rating" in interactions.columns
                       else np.full(len(frame), np.nan, np.float32))
    cutoffs = time_cutoffs(frame["timestamp"].to_numpy(), valid_fraction, test_fraction)
    frame = chronological(frame)  # grouped by user (first appearance), chronological, ties in file order
    ts = frame["timestamp"].to_numpy(np.int64)
    split = np.where(ts >= cutoffs["test"], 2, np.where(ts >= cutoffs["valid"], 1, 0)).astype(np.int8)
    if not (split == 0).any():
        raise ValueError(f"no training events before the validation cut-off {cutoffs['valid']}")

    train_items = frame["item_id"].to_numpy()[split == 0]
    item_vocab = Vocabulary.from_counts(pd.Series(train_items).value_counts().to_dict())
    if vocabulary == "catalog":
        extra = sorted(set(items["item_id"].astype(str)) - set(item_vocab.tokens))
        item_vocab = Vocabulary(item_vocab.tokens + extra)
    event_items = item_vocab.lookup(frame["item_id"].to_numpy()).astype(np.int32)

    user_codes, users = pd.factorize(frame["user_id"], sort=False)
    user_offsets = np.concatenate([[0], np.cumsum(np.bincount(user_codes, minlength=len(users)))]).astype(np.int64)
    # History of event i = the user's events before the first event sharing i's (user, timestamp).
    n = len(frame)
    first_of_group = np.ones(n, bool)
    first_of_group[1:] = (user_codes[1:] != user_codes[:-1]) | (ts[1:] != ts[:-1])
    history_end = np.maximum.accumulate(np.where(first_of_group, np.arange(n), 0)).astype(np.int64)
    history_start = user_offsets[user_codes]
    keep_history = history_end - history_start >= min_history

    splits = {}
    for k, name in enumerate(SPLITS):
        event = np.flatnonzero((split == k) & keep_history).astype(np.int64)
        splits[name] = LifelongSamples(
            event=event, user=user_codes[event].astype(np.int64), history_start=history_start[event],
            history_end=history_end[event], target_id=event_items[event],
            label=frame["label"].to_numpy(np.float32)[event], timestamp=ts[event])
    genre_vocab, item_genres = item_tables(items, item_vocab)
    metadata = {
        "num_users": int(len(users)), "num_items": int(len(item_vocab.tokens)), "num_events": int(n),
        "num_samples": {name: int(len(s)) for name, s in splits.items()},
        "click_rate": {name: float(s.label.mean()) if len(s) else None for name, s in splits.items()},
        "cutoffs": cutoffs, "valid_fraction": valid_fraction, "test_fraction": test_fraction,
        "min_history": int(min_history), "vocabulary": vocabulary,
        "fingerprint": data_fingerprint(interactions), "source": source,
    }
    return LifelongData(
        item_vocab=item_vocab, users=np.asarray(users, dtype=object), user_offsets=user_offsets,
        event_items=event_items, event_timestamps=ts, event_labels=frame["label"].to_numpy(np.float32),
        event_ratings=frame["rating"].to_numpy(np.float32), event_split=split, splits=splits, cutoffs=cutoffs,
        genre_vocab=genre_vocab, item_genres=item_genres, metadata=metadata,
        event_tokens=frame["item_id"].to_numpy(dtype=object))


USER_FILES = {"movielens-1m-subset": "users.dat", "movielens-100k": "ml-100k.user"}
USER_DAT_COLUMNS = ("user_id", "gender", "age", "occupation", "zip_code")
PROFILE_FIELDS = ("gender", "age", "occupation")


def read_user_profiles(path, encoding: str = "latin-1") -> pd.DataFrame:
    """A user side file as a string table with a ``user_id`` column.

    Formats: MovieLens ``users.dat`` (``UserID::Gender::Age::Occupation::Zip``),
    RecBole atomic ``.user`` (tab-separated, ``name:type`` header) or a CSV/TSV with
    a header holding ``user_id``. Raises ``DataFormatError`` naming the file and line.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "users.dat"
    >>> _ = path.write_text("1::F::1::10::48067\\n2::M::56::16::70072\\n")
    >>> read_user_profiles(path)[["user_id", "gender", "age"]].values.tolist()
    [['1', 'F', '1'], ['2', 'M', '56']]
    """
    from tfrec.data.readers import DataFormatError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"user side file not found: {path}")
    text = path.read_bytes().decode(encoding)
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataFormatError(path, "the user file is empty")
    if path.suffix == ".dat" or "::" in lines[0]:
        rows = [line.split("::") for line in lines]
        bad = [k for k, row in enumerate(rows) if len(row) != len(USER_DAT_COLUMNS)]
        if bad:
            raise DataFormatError(path, f"expected {len(USER_DAT_COLUMNS)} '::'-separated fields "
                                        f"({', '.join(USER_DAT_COLUMNS)}), got {len(rows[bad[0]])}", bad[0] + 1)
        frame = pd.DataFrame(rows, columns=list(USER_DAT_COLUMNS))
    else:
        sep = "\t" if "\t" in lines[0] else ","
        header = [h.split(":")[0].strip() for h in lines[0].split(sep)]
        if "user_id" not in header:
            raise DataFormatError(path, f"the header needs a 'user_id' column, found {header}", 1)
        rows = [line.split(sep) for line in lines[1:]]
        bad = [k for k, row in enumerate(rows) if len(row) != len(header)]
        if bad:
            raise DataFormatError(path, f"expected {len(header)} fields, got {len(rows[bad[0]])}", bad[0] + 2)
        frame = pd.DataFrame(rows, columns=header)
    frame = frame.apply(lambda col: col.str.strip())
    if frame["user_id"].duplicated().any():
        dup = frame["user_id"][frame["user_id"].duplicated()].iloc[0]
        raise DataFormatError(path, f"user {dup!r} appears twice")
    return frame


def attach_user_profiles(data: LifelongData, profiles: pd.DataFrame, fields=PROFILE_FIELDS) -> LifelongData:
    """``data`` with ``user_profiles (U, len(fields))`` int32 token ids (0 = padding,
    1 = unknown: a user missing from the file or an empty value) and one
    ``Vocabulary`` per field (every value of the side file: a profile is not an event,
    so using all of it leaks nothing about the future).

    Raises ``KeyError`` naming a requested field the side file lacks."""
    fields = tuple(fields)
    missing = [f for f in fields if f not in profiles.columns]
    if missing:
        raise KeyError(f"user side file lacks the requested profile fields {missing}; it has "
                       f"{[c for c in profiles.columns if c != 'user_id']}")
    by_user = profiles.set_index(profiles["user_id"].astype(str))
    out = np.full((len(data.users), len(fields)), 1, np.int32)
    vocabs = {}
    known = pd.Index(by_user.index).get_indexer(pd.Index(np.asarray(data.users, dtype=str)))
    for j, field in enumerate(fields):
        values = by_user[field].astype(str)
        vocabs[field] = Vocabulary.from_counts(values[values != ""].value_counts().to_dict())
        ids = vocabs[field].lookup(values.to_numpy())
        rows = known >= 0
        out[rows, j] = ids[known[rows]]
    metadata = {**data.metadata, "user_profile": {"fields": list(fields),
                                                  "users_without_profile": int((known < 0).sum())}}
    return dataclasses.replace(data, user_profiles=out, profile_vocabs=vocabs, metadata=metadata)


# Click label of bundled datasets without their own CTR convention (ours: the ML-1M one, rating >= 4).
DEFAULT_CLICK_THRESHOLDS = {"movielens-100k": 4.0}


def load_lifelong_dataset(name: str = "movielens-1m-subset", data_root=None, user_fields=None,
                          **kwargs) -> LifelongData:
    """:func:`build_lifelong_data` on a bundled dataset (interactions + item table,
    plus the user profile ``user_fields`` when the dataset has a user file).

    The dataset's ``click_threshold`` defines the label (``movielens-1m-subset``:
    rating >= 4 is a click; ``movielens-100k``: the same, ``DEFAULT_CLICK_THRESHOLDS``).
    ``user_fields``: None = ``PROFILE_FIELDS`` when the dataset has a user file, else
    none; an explicit list for a dataset without one is an error. ``kwargs`` go to
    :func:`build_lifelong_data`."""
    if name in DEFAULT_CLICK_THRESHOLDS and "click_threshold" not in kwargs:
        kwargs["click_threshold"] = DEFAULT_CLICK_THRESHOLDS[name]
    if name in DATASETS and DATASETS[name].click_threshold is None and "click_threshold" not in kwargs:
        raise ValueError(f"dataset {name!r} has no click labels; pass click_threshold= "
                         f"(datasets with labels: {[n for n, s in DATASETS.items() if s.click_threshold]})")
    if user_fields is None:
        user_fields = PROFILE_FIELDS if name in USER_FILES else ()
    dataset = load_dataset(name, data_root)
    data = build_lifelong_data(dataset.interactions, dataset.items, source=name, **kwargs)
    if user_fields:
        if name not in USER_FILES:
            raise ValueError(f"dataset {name!r} has no user side file; set the user profile fields to [] "
                             f"(datasets with one: {sorted(USER_FILES)})")
        folder = Path(dataset.source_files[0]).parent
        data = attach_user_profiles(data, read_user_profiles(folder / USER_FILES[name]), user_fields)
    return data


def load_lifelong_files(interactions_path, items_path=None, users_path=None, user_fields=None,
                        click_threshold: Optional[float] = None, **kwargs) -> LifelongData:
    """:func:`build_lifelong_data` on a user's own files (``tfrec ctr`` with ``data.interactions_path``).

    Args:
        interactions_path: interaction log read by ``tfrec.data.readers.read_interactions``
            (as ``tfrec train``: TSV/CSV/Parquet/RecBole/MovieLens ``.dat`` with a header
            holding ``user_id``, ``item_id``, ``timestamp`` and ``label`` (0/1) or
            ``rating``; malformed rows raise ``DataFormatError`` naming file, line and column).
        items_path: optional item table (``read_items``: ``item_id`` plus text columns; genres
            or categories from ``GENRE_COLUMNS``).
        users_path: optional user side file (``read_user_profiles``: CSV/TSV with a
            ``user_id`` header, RecBole ``.user`` or MovieLens ``users.dat``).
        user_fields: profile columns to use; None = every column of the users file but
            ``user_id`` and ``zip_code`` (none without a file). Fields without a users
            file, or missing from it, are an error naming them.
        click_threshold: rating >= this is a click, needed when the log has ``rating``
            but no ``label``.
        kwargs: :func:`build_lifelong_data` options (split fractions, vocabulary, ...).

    Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "log.csv").write_text("user_id,item_id,timestamp,label\\n"
    ...     + "".join(f"u{u},i{(u + t) % 5},{t},{(u + t) % 2}\\n" for u in range(3) for t in range(10)))
    >>> _ = (folder / "users.csv").write_text("user_id,country\\nu0,fr\\nu1,de\\n")
    >>> data = load_lifelong_files(folder / "log.csv", users_path=folder / "users.csv")
    >>> data.profile_sizes, data.metadata["user_profile"]["users_without_profile"]
    ([4], 1)
    """
    from tfrec.data.readers import DataFormatError, read_interactions, read_items

    interactions = read_interactions(interactions_path)
    if "label" not in interactions.columns:
        if "rating" not in interactions.columns:
            raise DataFormatError(interactions_path, "needs a 'label' (0/1) or a 'rating' column for the click "
                                                     f"label; found {list(interactions.columns)}")
        if click_threshold is None:
            raise DataFormatError(interactions_path, "has 'rating' but no 'label' column: set data.click_threshold "
                                                     "(rating >= threshold is a click)")
    elif not np.isin(interactions["label"].to_numpy(), (0.0, 1.0)).all():
        bad = int(np.argmax(~np.isin(interactions["label"].to_numpy(), (0.0, 1.0))))
        raise DataFormatError(interactions_path, f"column 'label' must hold 0/1, found "
                                                 f"{interactions['label'].iloc[bad]!r} (data row {bad + 1})")
    items = read_items(items_path) if items_path else None
    labels = {} if click_threshold is None else {"click_threshold": float(click_threshold)}
    data = build_lifelong_data(interactions, items, source=str(interactions_path), **labels, **kwargs)
    if users_path:
        profiles = read_user_profiles(users_path)
        if user_fields is None:
            user_fields = tuple(c for c in profiles.columns if c not in ("user_id", "zip_code"))
        if not user_fields:
            raise DataFormatError(users_path, "the user file has no profile column besides user_id/zip_code")
        data = attach_user_profiles(data, profiles, user_fields)
    elif user_fields:
        raise ValueError(f"user profile fields {list(user_fields)} were asked for but there is no user side "
                         "file: set data.users_path, or data.user_fields: []")
    return data


GAP_BUCKETS = 32  # 0 = padding, 1..31 = floor(log2(1 + gap in minutes)) + 1, capped
BUCKET_WINDOW = 64  # batches whose samples are sorted by history length together


def gap_bucket(gap_seconds):
    """Bucketised log time gap (a behaviour's age at the target's time), any array
    type TF accepts: ``1 + floor(log2(1 + gap / 60))`` capped at ``GAP_BUCKETS - 1``
    (gaps < 0 count as 0). ``tf.int32`` of the input's shape.

    >>> import numpy as np
    >>> gap_bucket(np.array([0, 60, 3600, 86400 * 365])).numpy().tolist()
    [1, 2, 6, 20]
    """
    import tensorflow as tf

    minutes = tf.maximum(tf.cast(gap_seconds, tf.float64), 0.0) / 60.0
    bucket = tf.floor(tf.math.log1p(minutes) / math.log(2.0)) + 1.0
    return tf.cast(tf.minimum(bucket, GAP_BUCKETS - 1), tf.int32)


def batch_indices(lengths: np.ndarray, batch_size: int, rng: Optional[np.random.Generator] = None,
                  bucket_window: Optional[int] = BUCKET_WINDOW) -> list:
    """Sample indices of each batch.

    With ``rng`` the samples are shuffled; with ``bucket_window`` consecutive
    windows of ``bucket_window * batch_size`` samples are sorted by history length
    before being cut into batches (so a batch holds similar lengths and trimming
    it to its longest history drops most padding); with ``rng`` the batch order is
    then shuffled too. Without either, batches follow the sample order.

    >>> [b.tolist() for b in batch_indices(np.array([5, 1, 4, 2]), 2, bucket_window=4)]
    [[1, 3], [2, 0]]
    """
    n = len(lengths)
    order = rng.permutation(n) if rng is not None else np.arange(n)
    if bucket_window:
        window = int(bucket_window) * int(batch_size)
        for start in range(0, n, window):
            chunk = order[start:start + window]
            order[start:start + window] = chunk[np.argsort(lengths[chunk], kind="stable")]
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def sorted_by_history_length(samples: LifelongSamples) -> tuple:
    """``(samples sorted by history length, order)``: evaluation batches trimmed to their
    longest history waste little; ``order`` maps back (``sorted[j] = samples[order[j]]``)."""
    order = np.argsort(samples.history_length, kind="stable")
    return LifelongSamples(**{f.name: getattr(samples, f.name)[order]
                              for f in dataclasses.fields(LifelongSamples)}), order


def lifelong_dataset(data: LifelongData, split, batch_size: int = 256, max_history: int = 1024,
                     shuffle: bool = False, seed: int = 0, trim_to_longest: bool = True,
                     drop_remainder: bool = False, bucket: Optional[bool] = None):
    """A ``tf.data.Dataset`` of ``(features, label)`` batches.

    Args:
        data: :class:`LifelongData`.
        split: ``"train"``, ``"valid"``, ``"test"`` or a :class:`LifelongSamples`.
        batch_size: int.
        max_history: int, the most recent events kept per history (width ``H``).
        shuffle: bool, reshuffle the samples every epoch (deterministic for a ``seed``).
        seed: int.
        trim_to_longest: bool, cut each batch to its longest history (default; the
            padding it drops is masked by every model, so outputs are the same as
            with ``max_history`` columns) instead of ``max_history`` columns.
        drop_remainder: bool.
        bucket: bool or None, group samples of similar history length into batches
            (see :func:`batch_indices`); None (default) = only when shuffling (the
            evaluation order must stay the split's order).

    Yields:
        features: ``history_ids (B, H) int32`` right-padded with 0 (oldest kept event
        first); the feedback of each behaviour, ``history_labels (B, H) float32``
        (0/1 click) and ``history_ratings (B, H) float32`` (0 = no rating); its
        ``history_gaps (B, H) int32`` (:func:`gap_bucket` of the target's time minus
        the behaviour's; 0 = padding); ``target_id (B,) int32``, ``user_id (B,)
        int32`` (user index + 2) and, when ``data`` has profiles, ``user_profile
        (B, P) int32``. label: ``(B,) float32``. Without bucketing the order is the
        split's sample order (so predictions line up with ``samples.user`` for GAUC).
    """
    import tensorflow as tf

    samples = data.splits[split] if isinstance(split, str) and split in data.splits else split
    if not isinstance(samples, LifelongSamples):
        raise KeyError(f"unknown split {split!r}; expected one of {sorted(data.splits)} or LifelongSamples")
    if len(samples) == 0:
        raise ValueError(f"split {split!r} has no samples")
    for name, value in (("batch_size", batch_size), ("max_history", max_history)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    bucket = shuffle if bucket is None else bool(bucket)
    pad = lambda values, dtype: tf.constant(np.concatenate([[0], values]).astype(dtype))  # noqa: E731  1-based
    flat_items = pad(data.event_items, np.int32)
    flat_labels = pad(data.event_labels, np.float32)
    flat_ratings = pad(np.nan_to_num(data.event_ratings, nan=0.0), np.float32)
    flat_times = pad(data.event_timestamps, np.int64)
    columns = [samples.history_start, samples.history_end, samples.target_id.astype(np.int32),
               samples.label.astype(np.float32), samples.timestamp.astype(np.int64),
               (samples.user + NUM_RESERVED).astype(np.int32)]
    profiles = data.user_profiles
    if profiles is not None:
        columns.append(profiles[samples.user].astype(np.int32))
    columns = [tf.constant(c) for c in columns]
    width = int(max_history)

    def build(index):
        start, end, target, label, stamp, user = (tf.gather(c, index) for c in columns[:6])
        length = tf.minimum(end - start, width)  # (B,)
        cols = tf.range(width, dtype=tf.int64)[None, :]  # (1, H)
        valid = cols < length[:, None]  # (B, H)
        position = tf.where(valid, (end - length)[:, None] + cols + 1, 0)  # 1-based flat event index, 0 = pad
        if trim_to_longest:
            position = position[:, : tf.maximum(tf.reduce_max(tf.cast(length, tf.int32)), 1)]
        valid = position > 0
        gaps = tf.where(valid, gap_bucket(stamp[:, None] - tf.gather(flat_times, position)), 0)
        features = {"history_ids": tf.gather(flat_items, position), "history_labels": tf.gather(flat_labels, position),
                    "history_ratings": tf.gather(flat_ratings, position), "history_gaps": gaps,
                    "target_id": target, "user_id": user}
        if profiles is not None:
            features["user_profile"] = tf.gather(columns[6], index)
        return features, label

    lengths = np.minimum(samples.history_length, width)
    if not shuffle and not bucket:
        ds = tf.data.Dataset.range(len(samples)).batch(int(batch_size), drop_remainder=drop_remainder)
    else:
        rng = np.random.default_rng(seed) if shuffle else None

        def generate():  # a new order every pass (from_generator calls this once per iteration)
            for batch in batch_indices(lengths, int(batch_size), rng, BUCKET_WINDOW if bucket else None):
                if not drop_remainder or len(batch) == batch_size:
                    yield batch.astype(np.int64)

        ds = tf.data.Dataset.from_generator(generate, output_signature=tf.TensorSpec((None,), tf.int64))
    return ds.map(build).prefetch(2)

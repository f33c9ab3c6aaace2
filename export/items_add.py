"""New items recommendable without retraining (issue 22 item 5, serving side): a delta index.

``tfrec items add --items new.tsv --delta /srv/delta/items.npz --model runs/dmesr-sasrec-beauty``
(or ``--encoder pkg.module:function``) embeds new catalogue items with an encoder (the trained model's frozen parts)
and appends them to a **delta file**; a served ``export.delta_retrieval.DeltaRetrievalServable``
merges the delta with the retrieval servable (ScaNN or brute force) at query
time, so the items are recommendable within ``reload_seconds`` of the ``add``,
with no retraining, no restart and no failed request. The model server does the same
on ``POST /v1/items`` (``tfrec serve --items_delta PATH --items_model RUN | --items_encoder
module:function``; see **Endpoint** below and ``export.server.items``).

- **Delta file** (``.npz``): ``tokens`` (n,), ``vectors`` float32 (n, d) in the
  retrieval index's space (a query's score of an item = dot product, as the
  exported indexes), ``sids`` int32 (n, L) or (n, 0), ``generation`` (int, +1 per
  add). Written whole to a temporary file then renamed over the old one (atomic:
  a reader sees the old or the new file, never half of one). Re-adding a token
  replaces its vector (ours). At most ``MAX_DELTA_ITEMS`` items (brute force:
  rebuild the base index — ``tfrec export --scann`` — beyond that).
- **Serving**: ``export.delta_retrieval.DeltaRetrievalServable`` (python platform) answers ``retrieve``
  (``queries: float32 (batch, d)`` -> ``item_ids`` / ``scores`` (batch, k), as the
  base index) by calling the base retrieval model, scoring the delta by brute
  force (``queries @ vectors.T``), and keeping the top ``k`` of the union (a base
  item the delta re-adds counts once, with the delta's score). The delta file is
  re-read when its modification time or size changed, checked at most every
  ``reload_seconds`` (default 1); the new arrays replace the old by one reference
  swap, so requests in flight finish on the old ones (zero failed requests). A
  delta file that is missing means an empty delta; one that cannot be read keeps
  the last good delta and logs the error once per change.
- **Built-in encoder** ``--model RUN`` (a trained DMESR run folder or its
  ``model.keras``; ``--store`` overrides the semantic store the model records):
  :class:`tfrec.semantics.new_items.NewItemEncoder` embeds each view's text
  (the store's columns, e.g. ``title`` and ``generated_text``, plus an optional
  ``attributes`` column) with the store's frozen MiniLM, then the trained
  encoder's frozen parts give the item vectors in the exported retrieval
  table's space (ID part zero; SIDs when the run has them, see below). An ID-only model is
  refused (it cannot place an unseen item).
- **Encoder interface** (what ``--encoder`` names; the built-in one implements it): a function
  ``encode(rows) -> (vectors, sids)`` taking the new items' rows (``list`` of
  ``{column: str}`` dicts from ``new.tsv``, with ``item_id`` and the catalogue's
  text columns, e.g. ``title``) and returning ``vectors`` float32 ``(n, d)`` (the
  DMESR item vectors, same space as the exported retrieval table) and ``sids``
  int ``(n, L)`` or None. ``--encoder`` names it as ``module:function`` (a
  command-line choice of the operator, never a request's); see
  :func:`load_encoder`. A ``ValueError`` from the encoder means "these rows cannot be
  encoded" (e.g. a column the model reads is missing); anything else is the encoder's failure.
- **Rows** (one validator for the file and the endpoint, :func:`check_item_row` /
  :func:`check_item_rows`): each row a mapping of string values with a non-empty
  ``item_id`` (1..256 UTF-8 bytes, no control characters; no ``item_id`` twice in one add),
  every value at most ``MAX_FIELD_BYTES`` (8 KiB). All rows are checked before anything is
  encoded; errors name the row (``new.tsv line 3``, ``items[2]``) and the field.
- **One add** (:func:`add_rows`, the code path of both ``tfrec items add`` and the endpoint):
  takes an exclusive ``flock`` on ``<delta>.lock`` around the whole add (concurrent adds, from
  threads or from the CLI beside a server, take turns and lose nothing), encodes, checks the
  encoder's output and the merged file, then writes it atomically (:func:`add_items` is the same
  read-modify-write for given vectors). A failed add writes nothing.
- **Endpoint** (``export.server.items``): ``tfrec serve --items_delta /srv/delta/items.npz``
  with exactly one of ``--items_model RUN`` (``--items_store DIR`` optional) and
  ``--items_encoder module:function`` loads the encoder once at start-up (a bad combination
  or an encoder that cannot be loaded fails start-up naming the flag) and serves
  ``POST /v1/items`` ``{"items": [{"item_id": "B0NEW1", "title": "..."}, ...]}`` -> ``{"added",
  "replaced", "items", "generation", "seconds"}`` (as ``tfrec items add`` prints). At most
  ``MAX_REQUEST_ITEMS`` (1,024) items a request; a bad row is 400 naming its index and field;
  the encoder refusing the rows (``ValueError``) is 400, any other encoder failure 500; without
  ``--items_delta`` the endpoint answers 501 (UNIMPLEMENTED). Adds run one at a time (a lock:
  the encoder need not be thread-safe). Nothing in a request chooses the encoder or a file.

- **The CTR ranker** (``--ranker RUN --ranker_out BASE [--init sid_neighbours|zero] [--version V]
  [--history_store URL]``, alone or with ``--delta``; the server's ``--items_ranker RUN
  --items_ranker_out BASE``): the new items also get rows in every per-item
  table of the trained R2LED (or baseline) ranker, exported as its next version
  (``export.ranker_items``, ``tfrec.ctr.new_items``). :func:`add_rows` computes and checks everything
  first (a refused ranker add writes no delta either), publishes the ranker version, then writes the
  delta (withdrawing the version if that write fails): see its docstring.
- **SIDs in the delta**: ``--model`` with a run that has a semantic-ID artifact (its ``sids/`` folder,
  or ``--sids DIR``) fills ``sids`` with the frozen quantizer's codes
  (`tfrec.semantics.sids.new_item_sids`, the ranker's function).

Configuration::

    config { name: 'retrieval_live' model_platform: 'python'
             base_path: 'export.delta_retrieval:factory?retrieval=retrieval_scann&delta=/srv/delta/items.npz' }

served with ``--allowed_python_modules export.delta_retrieval``; add
``--items_delta /srv/delta/items.npz --items_model runs/dmesr-sasrec-beauty`` to the same
``tfrec serve`` for ``POST /v1/items``.

Example:
>>> import os, tempfile
>>> import numpy as np
>>> path = os.path.join(tempfile.mkdtemp(), "items.npz")
>>> add_items(path, ["new-1", "new-2"], np.eye(2, 4, dtype="float32"))
{'added': 2, 'replaced': 0, 'items': 2, 'generation': 1}
>>> load_delta(path).tokens.tolist()
['new-1', 'new-2']
>>> rows = check_item_rows([{"item_id": "new-3", "title": "Rose lip balm"}], lambda i: f"items[{i}]")
>>> result = add_rows(rows, path, lambda rows: (np.ones((len(rows), 4), "float32"), None))
>>> result["added"], result["items"], result["generation"]
(1, 3, 2)
>>> merge_top_k(np.array([[b"a", b"b"]], dtype=object), np.array([[3.0, 1.0]], "float32"),
...             np.array(["c"]), np.array([[2.0]], "float32"), 2)[0].tolist()
[[b'a', b'c']]
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import importlib
import logging
import os
import threading
import time
from typing import Optional

import numpy as np

from tfrec.ctr.new_items import INITS
from tfrec.history.base import MAX_TOKEN_BYTES, InvalidEvent, check_text

logger = logging.getLogger(__name__)

MAX_DELTA_ITEMS = 200_000
MAX_FIELD_BYTES = 8 << 10  # any value of a new item's row (title, generated_text, ...), UTF-8
MAX_REQUEST_ITEMS = 1024  # items in one POST /v1/items request
EXCLUDED_SCORE = float(np.finfo(np.float32).min)  # tfrec.serving.EXCLUDED_SCORE (an empty slot), without TensorFlow


@dataclasses.dataclass(frozen=True)
class Delta:
    """The new items of a delta file (empty: ``tokens`` of length 0)."""

    tokens: np.ndarray  # (n,) str
    vectors: np.ndarray  # (n, d) float32
    sids: np.ndarray  # (n, L) int32, L may be 0
    generation: int = 0

    @property
    def ids(self) -> np.ndarray:
        """``tokens`` as UTF-8 bytes, an object array (what the retrieval outputs hold); computed once."""
        if "_ids" not in self.__dict__:
            ids = np.empty(len(self.tokens), dtype=object)
            ids[:] = [t.encode("utf-8") for t in self.tokens.tolist()]
            object.__setattr__(self, "_ids", ids)
            object.__setattr__(self, "_id_set", frozenset(ids.tolist()))
        return self.__dict__["_ids"]

    @property
    def id_set(self) -> frozenset:
        self.ids  # noqa: B018 - computes both once
        return self.__dict__["_id_set"]


EMPTY = Delta(np.zeros((0,), dtype=str), np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int32), 0)


def load_delta(path: str) -> Delta:
    """The :class:`Delta` in ``path`` (``EMPTY`` if the file does not exist); ``ValueError`` when malformed."""
    if not os.path.exists(path):
        return EMPTY
    try:
        with np.load(path, allow_pickle=False) as data:
            tokens, vectors, sids = data["tokens"], data["vectors"], data["sids"]
            generation = int(data["generation"])
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"delta file {path} is not readable: {err}") from None
    if tokens.ndim != 1 or vectors.ndim != 2 or len(vectors) != len(tokens) or len(sids) != len(tokens):
        raise ValueError(f"delta file {path} is malformed: tokens {tokens.shape}, vectors {vectors.shape}, "
                         f"sids {sids.shape}")
    return Delta(tokens.astype(str), vectors.astype(np.float32), sids.astype(np.int32), generation)


def add_items(path: str, tokens, vectors, sids=None) -> dict:
    """Append (or replace, by token) items in the delta file ``path``, atomically.

    Returns ``{"added", "replaced", "items", "generation"}``. ``ValueError`` naming the problem for
    empty/duplicate/over-long tokens, vectors of another width than the file's, non-finite values,
    or more than ``MAX_DELTA_ITEMS`` items in all.
    """
    tokens = [str(t) for t in tokens]
    if not tokens:
        raise ValueError("no items to add")
    vectors, sids = item_arrays(len(tokens), vectors, sids)
    for token in tokens:
        problem = token_problem(token)
        if problem:
            raise ValueError(f"item token {token[:64]!r}: {problem}")
    if len(set(tokens)) != len(tokens):
        raise ValueError("the same item token appears twice in one add")
    with _file_lock(path):
        merged = _merged(path, tokens, vectors, sids)
        _write(path, merged)
        return merged["result"]


def item_arrays(n: int, vectors, sids=None):
    """``(vectors float32 (n, d), sids int32 (n, L))`` checked (``sids`` None -> ``(n, 0)``); ``ValueError``."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != n:
        raise ValueError(f"vectors must be (items, dim) = ({n}, d), got {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors hold NaN or infinite values")
    sids = np.zeros((n, 0), np.int32) if sids is None else np.asarray(sids, dtype=np.int32)
    if sids.ndim != 2 or len(sids) != n:
        raise ValueError(f"sids must be (items, levels), got {sids.shape}")
    return vectors, sids


def token_problem(token: str):
    """Why ``token`` cannot be an item token (``None`` if it can): the event store's rule for an
    item (`tfrec.history.base.check_text`: 1..256 UTF-8 bytes, no control characters), so every
    added item can also appear in events.

    >>> token_problem("B00X"), token_problem("x" * 300), token_problem("a\\tb")
    (None, 'is 300 bytes, more than the limit of 256', 'contains a control character (tab, newline, ...)')
    """
    try:
        check_text("item_id", token, MAX_TOKEN_BYTES)
    except InvalidEvent as err:
        return err.reason
    return None


def _utf8_size(text: str):
    """Bytes of ``text`` in UTF-8; ``None`` when it cannot be encoded (lone surrogates, which JSON allows)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return None


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive ``flock`` on ``<path>.lock``: read-modify-writes of one delta file (the server's
    ``POST /v1/items``, ``tfrec items add`` runs) take turns, across processes and threads."""
    handle = open(f"{path}.lock", "a+b")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        handle.close()  # releases the lock


def _merged(path: str, tokens: list, vectors: np.ndarray, sids: np.ndarray) -> dict:
    """The delta file's arrays with the items added (checked; nothing written): what :func:`_write` writes.
    Callers hold the file's lock from here until the write."""
    old = load_delta(path)
    if len(old.tokens):
        if old.vectors.shape[1] != vectors.shape[1]:
            raise ValueError(f"vectors have {vectors.shape[1]} dims, the delta file {old.vectors.shape[1]}")
        if old.sids.shape[1] != sids.shape[1]:
            raise ValueError(f"sids have {sids.shape[1]} levels, the delta file {old.sids.shape[1]}")
    new = set(tokens)
    keep = np.array([t not in new for t in old.tokens.tolist()], dtype=bool)
    replaced = int((~keep).sum())
    all_tokens = np.concatenate([old.tokens[keep].astype(object), np.array(tokens, dtype=object)])
    if len(all_tokens) > MAX_DELTA_ITEMS:
        raise ValueError(f"the delta would hold {len(all_tokens)} items, more than {MAX_DELTA_ITEMS}: rebuild the "
                         "retrieval index with them instead (tfrec export)")
    if len(old.tokens):
        all_vectors, all_sids = np.concatenate([old.vectors[keep], vectors]), np.concatenate([old.sids[keep], sids])
    else:
        all_vectors, all_sids = vectors, sids
    generation = old.generation + 1
    return {"arrays": {"tokens": all_tokens.astype(str), "vectors": all_vectors, "sids": all_sids,
                       "generation": np.int64(generation)},
            "result": {"added": len(tokens) - replaced, "replaced": replaced, "items": len(all_tokens),
                       "generation": generation}}


def _write(path: str, merged: dict) -> None:
    """Write :func:`_merged`'s arrays to ``path`` atomically (a temporary file, fsync, rename)."""
    tmp = f"{path}.tmp{os.getpid()}-{threading.get_ident()}.npz"
    try:
        np.savez(tmp, **merged["arrays"])
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.isfile(tmp):  # e.g. disk full: leave the old file and no half-written temporary
            os.remove(tmp)
        raise


def merge_top_k(base_ids, base_scores, delta, delta_scores, k):
    """Top ``k`` per row of the base answer ``(batch, kb)`` and the ``delta``'s scores ``(batch, n)``.

    ``delta``: a :class:`Delta` (or its tokens). A base token the delta also holds is dropped from the base
    side (the delta's score counts). Empty base slots (``b""``) never win; slots nothing fills hold ``b""``
    and ``EXCLUDED_SCORE``. Only each row's ``k`` best delta items enter the merge (``argpartition``), so the
    cost beyond scoring is ``O(n)`` per row. Ties keep base items first, then delta order.
    Returns ``(item_ids object (batch, k), scores float32 (batch, k))``.
    """
    if not isinstance(delta, Delta):
        tokens = np.asarray(delta, dtype=str)
        delta = Delta(tokens, np.zeros((len(tokens), 0), np.float32), np.zeros((len(tokens), 0), np.int32))
    base_ids = np.asarray(base_ids, dtype=object)
    base_scores = np.asarray(base_scores, np.float32)
    if not len(delta.tokens):
        return base_ids[:, :k], base_scores[:, :k]
    delta_scores = np.asarray(delta_scores, np.float32)
    n = delta_scores.shape[1]
    if n > k:  # each row's k best delta items, back in delta order (ties: earlier first)
        chosen = np.sort(np.argpartition(-delta_scores, k - 1, axis=1)[:, :k], axis=1)
    else:
        chosen = np.broadcast_to(np.arange(n), (len(delta_scores), n))
    id_set = delta.id_set
    overridden = np.array([[t in id_set or t == b"" for t in row] for row in base_ids.tolist()], dtype=bool)
    overridden = overridden.reshape(base_ids.shape)
    scores = np.concatenate([np.where(overridden, -np.inf, base_scores),
                             np.take_along_axis(delta_scores, chosen, axis=1)], axis=1)
    ids = np.concatenate([base_ids, delta.ids[chosen]], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_ids = np.take_along_axis(ids, order, axis=1)
    top_scores = np.take_along_axis(scores, order, axis=1)
    empty = ~np.isfinite(top_scores)
    return (np.where(empty, b"", top_ids).astype(object),
            np.where(empty, EXCLUDED_SCORE, top_scores).astype(np.float32))


class DeltaWatcher:
    """The current :class:`Delta` of a file, re-read when it changed (checked every ``reload_seconds``)."""

    def __init__(self, path: str, reload_seconds: float = 1.0):
        self.path, self.reload_seconds = str(path), float(reload_seconds)
        self._delta, self._stamp, self._checked = EMPTY, None, -float("inf")
        self._lock = threading.Lock()
        self.current()

    def current(self) -> Delta:
        now = time.monotonic()
        if now - self._checked < self.reload_seconds:
            return self._delta
        with self._lock:
            if now - self._checked < self.reload_seconds:
                return self._delta
            self._checked = now
            try:
                info = os.stat(self.path)
                stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
            except FileNotFoundError:
                stamp = None
            if stamp != self._stamp:
                try:
                    self._delta = load_delta(self.path) if stamp is not None else EMPTY
                except ValueError as err:  # keep serving the last good delta
                    logger.error("%s (keeping the previous %d delta items)", err, len(self._delta.tokens))
                self._stamp = stamp
            return self._delta


def check_item_row(row, where: str) -> dict:
    """One new item's row, checked: THE row rules of ``tfrec items add --items`` and ``POST /v1/items``.

    ``row``: a mapping of column names to string values with a non-empty ``item_id`` (an item token:
    1..256 UTF-8 bytes, no control characters); every value at most ``MAX_FIELD_BYTES`` (8 KiB) of UTF-8.
    ``where`` names the row in errors (``"new.tsv line 3"``, ``"items[2]"``). Returns ``row`` as a ``dict``;
    ``ValueError`` naming ``where`` and the field otherwise.

    >>> check_item_row({"item_id": "n1", "title": "Red lipstick"}, "items[0]")
    {'item_id': 'n1', 'title': 'Red lipstick'}
    >>> check_item_row({"item_id": "n1", "title": 3}, "items[4]")
    Traceback (most recent call last):
    ...
    ValueError: items[4] field 'title': must be a string, got int
    """
    if not isinstance(row, dict):
        raise ValueError(f"{where}: must be an object of string values, got {type(row).__name__}")
    for key, value in row.items():
        key_size = _utf8_size(key) if isinstance(key, str) else None
        if key_size is None or key_size > MAX_TOKEN_BYTES:
            raise ValueError(f"{where}: field names must be UTF-8 strings of at most {MAX_TOKEN_BYTES} bytes, "
                             f"got {str(key)[:64]!r}")
        if not isinstance(value, str):
            raise ValueError(f"{where} field {key[:64]!r}: must be a string, got {type(value).__name__}")
        size = _utf8_size(value)
        if size is None:
            raise ValueError(f"{where} field {key[:64]!r}: not valid UTF-8 text (a lone surrogate)")
        if size > MAX_FIELD_BYTES:
            raise ValueError(f"{where} field {key[:64]!r}: {size} bytes, more than the limit of {MAX_FIELD_BYTES}")
    if "item_id" not in row:
        raise ValueError(f"{where}: no item_id field")
    if not row["item_id"]:
        raise ValueError(f"{where} field 'item_id': empty item_id")
    problem = token_problem(row["item_id"])
    if problem:
        raise ValueError(f"{where} field 'item_id': {problem}")
    return dict(row)


def check_item_rows(rows, name_row, max_items: int = MAX_DELTA_ITEMS) -> list:
    """Every row of one add checked by :func:`check_item_row` (``name_row(index)`` names row ``index``),
    at least one and at most ``max_items`` rows, no ``item_id`` twice; the rows, or ``ValueError``.

    >>> check_item_rows([{"item_id": "a"}, {"item_id": "a"}], lambda i: f"items[{i}]")
    Traceback (most recent call last):
    ...
    ValueError: items[1] field 'item_id': 'a' already appears in items[0]
    """
    if not rows:
        raise ValueError("no items")
    if len(rows) > max_items:
        raise ValueError(f"{len(rows)} items, more than the limit of {max_items}")
    checked, first = [], {}
    for index, row in enumerate(rows):
        row = check_item_row(row, name_row(index))
        if row["item_id"] in first:
            raise ValueError(f"{name_row(index)} field 'item_id': {row['item_id'][:64]!r} already appears in "
                             f"{name_row(first[row['item_id']])}")
        first[row["item_id"]] = index
        checked.append(row)
    return checked


def read_items_file(path: str, max_items: int = MAX_DELTA_ITEMS) -> list:
    """Rows of a TSV with a header naming its columns (``item_id`` required), as dicts of strings,
    checked by :func:`check_item_rows` (errors name the file's line)."""
    try:
        handle = open(path, encoding="utf-8", newline="")
    except OSError as err:
        raise ValueError(f"cannot read items file {path}: {err.strerror}") from None
    with handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            if not reader.fieldnames or "item_id" not in reader.fieldnames:
                raise ValueError(f"{path}: the first line must name the columns, with item_id")
            rows = []
            for number, row in enumerate(reader, 2):
                if None in row or any(v is None for v in row.values()):
                    raise ValueError(f"{path} line {number}: expected {len(reader.fieldnames)} tab-separated fields")
                rows.append(row)
                if len(rows) > max_items:
                    raise ValueError(f"{path}: more than {max_items} items")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from None
    if not rows:
        raise ValueError(f"{path}: no items")
    return check_item_rows(rows, lambda index: f"{path} line {index + 2}", max_items)


class EncoderFailed(ValueError):
    """The encoder raised something other than a ``ValueError``, or returned malformed output: the
    encoder's (or the server's) fault, not the rows' (``POST /v1/items`` answers INTERNAL)."""


class DeltaFailed(ValueError):
    """The delta file refused the encoded items (another width than its items, full, unreadable):
    the server's state, not the rows (``POST /v1/items`` answers FAILED_PRECONDITION)."""


class RankerFailed(ValueError):
    """The ranker's side of an add failed for a reason other than the rows (its export or the history
    store's routes failed while publishing, or the run could not be read): the server's state, not the
    rows (``POST /v1/items`` answers INTERNAL). Nothing was added to the delta file."""


def load_encoder(spec: str):
    """The function ``module:function`` names (an operator's command-line choice; see the module doc)."""
    module, _, function = (spec or "").partition(":")
    if not module or not function:
        raise ValueError(f"--encoder must be module:function, got {spec!r}")
    try:
        found = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load the encoder {spec!r}: {err}") from None
    if not callable(found):
        raise ValueError(f"the encoder {spec!r} is not callable")
    return found


def add_rows(rows: list, delta_path: Optional[str], encoder=None, ranker=None) -> dict:
    """Add checked ``rows`` (:func:`check_item_rows`) to the delta file and/or the served ranker: the one code
    path of ``tfrec items add`` and ``POST /v1/items``.

    Args:
        rows: the checked rows.
        delta_path: the delta file, or None (a ranker-only add of the CLI); with it ``encoder``
            (``encoder(rows) -> (vectors, sids)``) embeds the rows.
        ranker: optional `export.ranker_items.RankerTarget`: the rows also get a new version of that ranker
            (and, with its ``history_store``, the store's SID routes).

    Order (a failure at any step leaves no half state):

    1. under the delta file's ``flock`` (then the ranker's, `RankerTarget.lock`): the ranker add is computed
       and checked (`export.ranker_items.prepare_ranker_items`), the rows encoded, the merged delta computed
       and checked; nothing written yet;
    2. the ranker's new version is published (the store's SID routes first, when given, then the version
       folder, renamed into place whole): **the ranker comes first**, so the retrieval side never returns an
       item the served ranker does not know; a failure here writes nothing to the delta
       (:class:`RankerFailed`). The routes, when they were extended before the export failed, keep the new
       items' codes: an addition that is harmless (their events are filed into their buckets) and idempotent
       (a retry with the same items adds nothing there);
    3. the delta file is written (atomic rename). Should that fail (a full disk: every check already passed),
       the version of step 2 is withdrawn (`export.ranker_items.withdraw_version`) before :class:`DeltaFailed`
       is raised, and a server goes back to the previous version.

    Returns the delta's ``{"added", "replaced", "items", "generation"}`` (with a delta file), ``"ranker"``:
    `export.ranker_items.publish_ranker_items`'s result (with ``ranker``), and ``"seconds"`` (the whole add).
    Errors: ``ValueError`` from the encoder or the ranker's checks (the rows: a missing column, an item the
    ranker has already), re-raised naming which refused them; :class:`EncoderFailed` for any other encoder
    exception or malformed output; :class:`DeltaFailed` when the delta file refuses the items;
    :class:`RankerFailed` when the ranker's side fails otherwise. Callers serialise calls when the encoder
    is not thread-safe (the server holds a lock).
    """
    started = time.perf_counter()
    if delta_path is None and ranker is None:
        raise ValueError("nothing to add to: no delta file and no ranker")
    with contextlib.ExitStack() as locks:
        if delta_path is not None:
            locks.enter_context(_file_lock(delta_path))
        prepared = None
        if ranker is not None:
            locks.enter_context(ranker.lock())
            try:
                prepared = ranker.prepare(rows)
            except ValueError as err:
                raise ValueError(f"the ranker refused the items: {err}") from err
            except Exception as err:  # noqa: BLE001 - the run or the store could not be read
                raise RankerFailed(f"the ranker add failed: {type(err).__name__}: {err}") from err
        merged = None
        if delta_path is not None:
            vectors, sids = _encode(rows, encoder)
            try:
                merged = _merged(delta_path, [row["item_id"] for row in rows], vectors, sids)
            except (OSError, ValueError) as err:
                raise DeltaFailed(f"the delta file refused the items: {err}") from err
        result = {}
        if prepared is not None:
            from export.ranker_items import publish_ranker_items

            try:
                result["ranker"] = publish_ranker_items(prepared)
            except Exception as err:  # noqa: BLE001 - whatever failed, nothing reaches the delta
                raise RankerFailed(f"the ranker's new version could not be published ({type(err).__name__}: "
                                   f"{err}); nothing was added") from err
        if merged is not None:
            try:
                _write(delta_path, merged)
            except Exception as err:  # noqa: BLE001 - whatever failed, the ranker's version goes too
                withdrawn = ""
                if prepared is not None:
                    from export.ranker_items import withdraw_version

                    version = result["ranker"]["version"]
                    try:
                        withdraw_version(result["ranker"]["path"])
                        withdrawn = f"; the ranker's version {version} was withdrawn"
                    except OSError as again:
                        logger.error("cannot withdraw the ranker version %s: %s", result["ranker"]["path"], again)
                        withdrawn = f"; withdrawing the ranker's version {version} failed too (see the log)"
                raise DeltaFailed(f"the delta file refused the items: {err}{withdrawn}") from err
            result = {**merged["result"], **result}
    return {**result, "seconds": round(time.perf_counter() - started, 3)}


def _encode(rows: list, encoder):
    """``(vectors, sids)`` of ``encoder(rows)``, checked (:class:`EncoderFailed`, or the encoder's ``ValueError``)."""
    try:
        encoded = encoder(rows)
    except ValueError as err:
        raise ValueError(f"the encoder refused the items: {err}") from err
    except Exception as err:  # noqa: BLE001 - any other failure is the encoder's
        raise EncoderFailed(f"the encoder failed: {type(err).__name__}: {err}") from err
    if not isinstance(encoded, tuple) or len(encoded) != 2:
        raise EncoderFailed("the encoder must return (vectors (n, d), sids (n, L) or None)")
    try:
        return item_arrays(len(rows), *encoded)
    except (TypeError, ValueError) as err:
        raise EncoderFailed(f"the encoder returned malformed output: {err}") from None


def add_items_file(items_path: str, delta_path: str, encoder) -> dict:
    """Encode the items of ``items_path`` with ``encoder(rows) -> (vectors, sids)`` and add them to the delta
    (:func:`read_items_file` then :func:`add_rows`)."""
    return add_rows(read_items_file(items_path), delta_path, encoder)


def model_encoder(run: str, store: str = None, norm: str = "catalogue", sids: str = None):
    """The built-in encoder of ``--model``: `tfrec.semantics.new_items.NewItemEncoder` of a trained DMESR run
    (its folder or ``model.keras``; ``store`` overrides the semantic store the model records; ``norm``:
    ``catalogue`` (default) or ``zero_id``, see that module; ``sids``: a semantic-ID artifact of that store,
    default the run's ``sids/`` when it has one: the delta's ``sids`` are then filled)."""
    from tfrec.semantics.new_items import NewItemEncoder

    return NewItemEncoder.from_run(run, store=store, norm=norm, sids=sids)


def _check_add_flags(args) -> None:
    ranker_flags = {"--ranker_out": args.ranker_out, "--init": args.init, "--version": args.version,
                    "--history_store": args.history_store, "--ranker_store": args.ranker_store}
    given = [flag for flag, value in ranker_flags.items() if value is not None]
    if given and args.ranker is None:
        raise ValueError(f"{', '.join(given)} go(es) with --ranker")
    if args.ranker is not None and args.ranker_out is None:
        raise ValueError("--ranker needs --ranker_out (the served ranker's base directory: the new version goes there)")
    if args.delta is None and args.ranker is None:
        if args.model is None and args.encoder is None:
            raise ValueError("tfrec items add needs --delta (the retrieval delta file) and/or --ranker (a trained "
                             "CTR run: a new ranker version)")
        raise ValueError("--model and --encoder go with --delta")
    if args.delta is not None and (args.encoder is None) == (args.model is None):
        raise ValueError("tfrec items add needs exactly one of --model (a trained DMESR run) and --encoder")
    if args.delta is None and (args.model or args.encoder):
        raise ValueError("--model and --encoder go with --delta")
    if (args.store or args.norm or args.sids) and not args.model:
        raise ValueError("--store, --norm and --sids go with --model")


def _cmd_add(args) -> None:
    _check_add_flags(args)
    rows = read_items_file(args.items)
    ranker = encoder = None
    if args.ranker is not None:
        from export.ranker_items import RankerTarget

        ranker = RankerTarget(args.ranker, args.ranker_out, init=args.init or "sid_neighbours", version=args.version,
                              store=args.ranker_store, history_store=args.history_store)
    if args.delta is not None:
        encoder = model_encoder(args.model, args.store, args.norm or "catalogue", args.sids) if args.model \
            else load_encoder(args.encoder)
    result = add_rows(rows, args.delta, encoder, ranker=ranker)  # the code path of POST /v1/items
    if args.delta is not None:
        print(f"tfrec items add: {result['added']} added, {result['replaced']} replaced; the delta holds "
              f"{result['items']} items (generation {result['generation']}), {result['seconds']} s", flush=True)
    if ranker is not None:
        from export.ranker_items import describe

        print(describe(result["ranker"]), flush=True)


def add_commands(subparsers) -> None:
    items = subparsers.add_parser("items", help="catalogue items added at serving time (no retraining)")
    commands = items.add_subparsers(dest="items_command", required=True)
    add = commands.add_parser("add", help="new items without retraining: a retrieval delta file a server merges "
                                           "and/or a new version of the CTR ranker")
    add.add_argument("--items", required=True, help="TSV with a header: item_id and the text columns")
    add.add_argument("--delta", help="the delta file (.npz) a DeltaRetrievalServable serves")
    add.add_argument("--model", help="a trained DMESR run folder (or its model.keras): embeds the items' text "
                                     "with the store's frozen MiniLM and the model's frozen parts (built-in encoder)")
    add.add_argument("--store", help="with --model: the semantic store (default: the model's dmesr.store_path)")
    add.add_argument("--norm", choices=("catalogue", "zero_id"), default=None,
                     help="with --model: 'catalogue' (default) rescales each new item's vector to the median norm of "
                          "the trained catalogue's; 'zero_id' keeps it as the model gives it (ID part zero)")
    add.add_argument("--sids", help="with --model: a semantic-ID artifact of the store (default: the run's sids/ "
                                    "folder when it has one): fills the delta's sids from its frozen quantizer")
    add.add_argument("--encoder", help="instead of --model: module:function returning (vectors, sids) for the rows")
    ranker = add.add_argument_group("the CTR ranker (export.ranker_items)")
    ranker.add_argument("--ranker", help="a trained CTR run folder (tfrec ctr train): its ranker gets the new items "
                                         "(semantic IDs from its frozen quantizer, rows in every per-item table)")
    ranker.add_argument("--ranker_out", help="the served ranker's base directory: the new version is written there")
    ranker.add_argument("--init", choices=INITS, default=None,
                        help="a new item's ID embedding row and item bias: 'sid_neighbours' (default: the mean over "
                             "the trained items sharing its longest SID prefix) or 'zero' (zero row, global prior)")
    ranker.add_argument("--version", type=int, help="the new version's number (default: the next free one)")
    ranker.add_argument("--history_store", help="sqlite:///path/events.db or redis://...: add the new items' codes "
                                                "to the store's SID routes (tfrec events routes)")
    ranker.add_argument("--ranker_store", help="the semantic store of the ranker run (default: the one it records)")
    add.set_defaults(func=_cmd_add)

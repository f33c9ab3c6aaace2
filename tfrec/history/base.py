"""The history store contract: per-user event logs, appended idempotently, read most recent first.

A :class:`HistoryStore` keeps, for every user, the events ``(user, item token,
timestamp, feedback, event id)`` a server or an ingestion job appended, so a
request can name a user instead of sending the history. Backends:
``tfrec.history.sqlite_store.SQLiteHistoryStore`` (embedded, one file) and
``tfrec.history.redis_store.RedisHistoryStore`` (several replicas sharing one
store); :func:`tfrec.history.open_store` picks one from a URL.

Contract (the same tests run against every backend):

- :meth:`HistoryStore.append` validates the whole batch first (an invalid event
  raises :class:`InvalidEvent` naming the event's index and field, and nothing is
  written), then writes it atomically (one transaction). It returns how many
  events were new: an event whose ``(user, event_id)`` is already stored is
  ignored, so re-sending a batch (a retry, a resumed ingestion) never duplicates.
  Event ids are unique per user (ours: deleting a user forgets their ids too).
  Once ``append`` returned, the events are durable (see each backend).
- :meth:`HistoryStore.recent` returns a user's most recent ``n`` events, oldest
  first, ordered by timestamp, ties by arrival (the order appends stored them).
- :meth:`HistoryStore.delete_user` forgets a user (right to be forgotten).
- Bounds: ids and tokens at most ``MAX_ID_BYTES`` / ``MAX_TOKEN_BYTES`` UTF-8
  bytes without control characters, timestamps integers of magnitude below
  2**53, feedback a finite float, at most ``MAX_APPEND`` events per append and
  ``max_read`` events per read (``recent`` refuses larger ``n``).

Failures of the backend itself (unreachable server, locked file beyond the
timeout) raise :class:`StoreUnavailable`.

Stateful R2LED routes (issue 22 item 4, ``tfrec.history.routes``):
:meth:`HistoryStore.set_routes` stores a served model's item -> SID map *in the
store* (so every process appending to it, a server replica or ``tfrec events
ingest``, maintains the same buckets) and rebuilds the buckets from the
histories. From then on every append writes, in the same transaction as the
events, each new event into its ``(user, level, prefix)`` buckets (trimmed to the
``bucket_size`` most recent), and :meth:`HistoryStore.route_events` gathers a
request's buckets plus the most recent events. An append checks, inside its
transaction, that the store's map is still the one this process loaded (else it
loads the new one first), so a bucket never disagrees with the history. :meth:`HistoryStore.delete_user` removes the buckets too.
:meth:`HistoryStore.extend_routes` adds new catalogue items to the map in place (``tfrec items add
--ranker ... --history_store URL``), filing their already stored events as a rebuild would.

Example:
>>> import tempfile, os
>>> from tfrec.history import Event, open_store
>>> store = open_store("sqlite:///" + os.path.join(tempfile.mkdtemp(), "h.db"))
>>> store.append([Event("u1", "i3", 20, 1.0, "e2"), Event("u1", "i9", 10, 1.0, "e1")])
2
>>> store.append([Event("u1", "i9", 10, 1.0, "e1")])  # same event id: ignored
0
>>> [e.item for e in store.recent("u1", 10)]
['i9', 'i3']
>>> store.delete_user("u1"), store.recent("u1", 10)
(2, [])
>>> store.close()
"""

from __future__ import annotations

import abc
import dataclasses
import math
import re
import time
from typing import List, Sequence

MAX_ID_BYTES = 128  # user ids and event ids
MAX_TOKEN_BYTES = 256  # item tokens
MAX_APPEND = 10_000  # events per append call (one transaction)
DEFAULT_MAX_READ = 10_000  # events per read
MAX_TARGETS = 1_000  # targets of one route_events call
MAX_TIMESTAMP = 2**53  # exact in a float64 (Redis sorted-set scores)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class HistoryStoreError(Exception):
    """Base class of history store errors."""


class InvalidEvent(HistoryStoreError, ValueError):
    """An event or argument is malformed; ``field`` names the culprit, ``index`` the event (or None)."""

    def __init__(self, field: str, reason: str, index=None):
        where = f"event {index}: " if index is not None else ""
        super().__init__(f"{where}{field}: {reason}")
        self.field, self.reason, self.index = field, reason, index


class StoreUnavailable(HistoryStoreError):
    """The backend cannot be reached or does not answer in time."""


@dataclasses.dataclass(frozen=True)
class Event:
    """One behaviour of a user: ``item`` token at ``timestamp`` (an int, e.g. epoch seconds),
    with ``feedback`` (e.g. 1.0 for a click, a rating), identified by ``event_id``."""

    user: str
    item: str
    timestamp: int
    feedback: float
    event_id: str


def check_text(field: str, value, max_bytes: int, index=None) -> str:
    """``value`` if it is a non-empty ``str`` of at most ``max_bytes`` UTF-8 bytes without control characters."""
    if not isinstance(value, str):
        raise InvalidEvent(field, f"must be a string, got {type(value).__name__}", index)
    if not value:
        raise InvalidEvent(field, "must not be empty", index)
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidEvent(field, "is not valid UTF-8 text", index) from None
    if size > max_bytes:
        raise InvalidEvent(field, f"is {size} bytes, more than the limit of {max_bytes}", index)
    if _CONTROL.search(value):
        raise InvalidEvent(field, "contains a control character (tab, newline, ...)", index)
    return value


def check_user(user, index=None) -> str:
    return check_text("user", user, MAX_ID_BYTES, index)


def check_event(event, index=None) -> Event:
    """A validated :class:`Event` (ints/floats normalised); :class:`InvalidEvent` naming the field otherwise."""
    if not isinstance(event, Event):
        raise InvalidEvent("event", f"must be an Event, got {type(event).__name__}", index)
    check_user(event.user, index)
    check_text("item", event.item, MAX_TOKEN_BYTES, index)
    check_text("event_id", event.event_id, MAX_ID_BYTES, index)
    timestamp = event.timestamp
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise InvalidEvent("timestamp", f"must be an integer, got {type(timestamp).__name__}", index)
    if abs(timestamp) >= MAX_TIMESTAMP:
        raise InvalidEvent("timestamp", f"magnitude must be below 2**53, got {timestamp}", index)
    feedback = event.feedback
    if isinstance(feedback, bool) or not isinstance(feedback, (int, float)):
        raise InvalidEvent("feedback", f"must be a number, got {type(feedback).__name__}", index)
    if not math.isfinite(feedback):
        raise InvalidEvent("feedback", f"must be finite, got {feedback}", index)
    return Event(event.user, event.item, int(timestamp), float(feedback), event.event_id)


EVENT_FIELDS = ("user", "item", "timestamp", "feedback", "event_id")
DEFAULT_FEEDBACK = 1.0  # when an event (JSON object) has no feedback


def event_from_mapping(obj, index=None) -> Event:
    """A validated :class:`Event` from a JSON object ``{"user", "item", "timestamp", "event_id"[, "feedback"]}``.

    ``feedback`` defaults to 1.0 (ours: an implicit-feedback event); other keys are refused.

    >>> event_from_mapping({"user": "u", "item": "i", "timestamp": 3, "event_id": "e"})
    Event(user='u', item='i', timestamp=3, feedback=1.0, event_id='e')
    """
    if not isinstance(obj, dict):
        raise InvalidEvent("event", f"must be a JSON object, got {type(obj).__name__}", index)
    unknown = sorted(set(obj) - set(EVENT_FIELDS), key=str)
    if unknown:
        raise InvalidEvent(str(unknown[0])[:64], f"unknown field (fields: {', '.join(EVENT_FIELDS)})", index)
    for field in ("user", "item", "timestamp", "event_id"):
        if field not in obj:
            raise InvalidEvent(field, "missing", index)
    return check_event(Event(obj["user"], obj["item"], obj["timestamp"], obj.get("feedback", DEFAULT_FEEDBACK),
                             obj["event_id"]), index)


def check_events(events: Sequence[Event]) -> List[Event]:
    """Every event validated (the first invalid one raises), at most ``MAX_APPEND``."""
    events = list(events)
    if len(events) > MAX_APPEND:
        raise InvalidEvent("events", f"{len(events)} events in one append, more than the limit of {MAX_APPEND}")
    return [check_event(event, index) for index, event in enumerate(events)]


class HistoryStore(abc.ABC):
    """Per-user event logs (see the module docstring for the contract).

    Args:
        max_read: ``int``, most events one :meth:`recent` call returns (default 10,000).
    """

    def __init__(self, max_read: int = DEFAULT_MAX_READ):
        if isinstance(max_read, bool) or not isinstance(max_read, int) or max_read < 1:
            raise ValueError(f"max_read must be a positive int, got {max_read!r}")
        self.max_read = max_read
        self.routes = None  # tfrec.history.routes.SIDRoutes once the store has a SID map (backends load it)
        self._routes_checked = time.monotonic()

    def set_routes(self, routes) -> int:
        """Store ``routes`` (a ``SIDRoutes``) in the store, replacing any earlier map, and rebuild every
        user's buckets from their history; the number of users rebuilt. ``None`` removes the routes."""
        from tfrec.history.routes import SIDRoutes

        if routes is not None and not isinstance(routes, SIDRoutes):
            raise ValueError(f"routes must be a SIDRoutes or None, got {type(routes).__name__}")
        users = self._set_routes(routes)
        self.routes = routes
        return users

    def extend_routes(self, item_sids) -> int:
        """Add items to the store's SID map in place (new catalogue items of the served ranker,
        ``tfrec items add --ranker ... --history_store URL``): the routes' levels, bucket size, ``recent``
        and model stay; the events already stored for the added items are filed into their buckets (each
        trimmed to its ``bucket_size`` most recent), exactly as a full :meth:`set_routes` with the larger map
        would leave them. Returns the number of items added.

        ``item_sids``: mapping item token -> codes. An item already in the map with the same codes is
        skipped (re-running an add is harmless); with other codes it is a ``ValueError`` (a mapped item's
        buckets never change), as is a store without routes. SQLite extends in one transaction touching
        only the added items' events; other backends rebuild every user's buckets (:meth:`set_routes`).

        Example:
        >>> import tempfile, os
        >>> from tfrec.history import Event, open_store
        >>> from tfrec.history.routes import SIDRoutes
        >>> store = open_store("sqlite:///" + os.path.join(tempfile.mkdtemp(), "h.db"))
        >>> _ = store.set_routes(SIDRoutes({"a": (1, 2)}, bucket_size=4))
        >>> store.append([Event("u1", "new", 10, 1.0, "e1"), Event("u1", "a", 11, 1.0, "e2")])
        2
        >>> store.extend_routes({"new": (1, 3)})
        1
        >>> [e.item for e in store.route_events("u1", ["new"], 1)]  # its old event is in its bucket now
        ['new', 'a']
        >>> store.close()
        """
        from tfrec.history.routes import SIDRoutes

        self._ensure_routes()
        self._refresh_routes()
        current = self.routes
        if current is None:
            raise ValueError("this history store has no SID routes to extend (set them first: tfrec events routes)")
        added = {}
        for item, codes in dict(item_sids).items():
            codes = tuple(int(c) for c in codes)
            known = current.sids.get(item)
            if known is not None and known != codes:
                raise ValueError(f"item {item[:64]!r} is already in the store's SID map with codes {known}, not "
                                 f"{codes}: a mapped item's buckets are never changed")
            if known is None:
                added[item] = codes
        if not added:
            return 0
        routes = SIDRoutes({**current.sids, **added}, **current.meta())
        self._extend_routes(current, routes, added)
        self.routes = routes
        return len(added)

    def _extend_routes(self, current, routes, added) -> None:
        """Replace the map ``current`` by ``routes`` (= ``current`` + ``added``); default: a full rebuild."""
        self._set_routes(routes)

    def route_events(self, user: str, targets: Sequence[str], recent: int) -> List[Event]:
        """The events a stateful R2LED request for ``targets`` needs: the union of the targets' SID-prefix
        buckets and the ``recent`` most recent events, oldest first (see ``tfrec.history.routes``).

        ``ValueError`` when the store has no SID map; ``InvalidEvent`` for a malformed user, ``recent`` or
        target token."""
        self._check_read(user, recent)
        self._ensure_routes()
        if self.routes is None:
            raise ValueError("this history store has no SID routes (HistoryStore.set_routes / tfrec events routes)")
        targets = list(targets)
        if len(targets) > MAX_TARGETS:
            raise InvalidEvent("targets", f"{len(targets)} targets, more than the limit of {MAX_TARGETS}")
        for index, item in enumerate(targets):
            check_text("target", item, MAX_TOKEN_BYTES, index)
        return self._read_routes(user, targets, recent)

    def bucket_keys(self, events: Sequence[Event]):
        """``[(event, [bucket keys])]`` of validated ``events`` under the loaded routes (``[]`` keys without)."""
        routes = self.routes
        return [(e, routes.keys(e.item) if routes is not None else []) for e in events]

    @staticmethod
    def trimmed_buckets(rows, routes) -> dict:
        """``{bucket key: [values, oldest first]}`` of a user's ``(item, value)`` rows given oldest first,
        each bucket its ``routes.bucket_size`` most recent (what a rebuild writes)."""
        buckets: dict = {}
        for item, value in rows:
            for key in routes.keys(item):
                buckets.setdefault(key, []).append(value)
        return {key: bucket[-routes.bucket_size:] for key, bucket in buckets.items()}

    def current_routes(self, max_age_seconds: float = 1.0):
        """The store's SID routes (or None), re-checked against the store at most every ``max_age_seconds``
        (another process may have set or removed them since this one opened the store)."""
        now = time.monotonic()
        if now - self._routes_checked >= max_age_seconds:
            self._routes_checked = now
            self._refresh_routes()
        return self.routes

    def _refresh_routes(self) -> None:
        """Reload the SID map when the store's differs from the loaded one."""

    def _ensure_routes(self) -> None:
        """Load the store's SID map if not loaded yet (backends that may start without their server)."""

    def _set_routes(self, routes) -> int:
        raise NotImplementedError(f"{type(self).__name__} does not keep SID routes")

    def _read_routes(self, user: str, targets: List[str], recent: int) -> List[Event]:
        """The buckets of ``targets`` under the store's current map (checked in the read's snapshot) and the
        ``recent`` most recent events, oldest first."""
        raise NotImplementedError(f"{type(self).__name__} does not keep SID routes")

    def append(self, events: Sequence[Event]) -> int:
        """Store ``events`` atomically; the number that were new (duplicates by ``(user, event_id)`` ignored)."""
        events = check_events(events)
        return self._write(events) if events else 0

    def recent(self, user: str, n: int) -> List[Event]:
        """The most recent ``n`` events of ``user``, oldest first (timestamp, then arrival); ``[]`` if none."""
        self._check_read(user, n)
        return self._read(user, n)

    def recent_items(self, user: str, n: int) -> List[str]:
        """The item tokens of :meth:`recent` (what a request by user id reads; backends make it cheap)."""
        self._check_read(user, n)
        return self._read_items(user, n)

    def _check_read(self, user, n) -> None:
        check_user(user)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.max_read:
            raise InvalidEvent("n", f"must be an int in [1, {self.max_read}], got {n!r}")

    def _read_items(self, user: str, n: int) -> List[str]:
        return [event.item for event in self._read(user, n)]

    def delete_user(self, user: str) -> int:
        """Forget every event of ``user``; how many were deleted."""
        return self._delete(check_user(user))

    def count(self, user: str) -> int:
        """How many events ``user`` has."""
        return self._count(check_user(user))

    @abc.abstractmethod
    def _write(self, events: List[Event]) -> int:
        """Write validated ``events`` in one transaction; the number that were new."""

    @abc.abstractmethod
    def _read(self, user: str, n: int) -> List[Event]:
        ...

    @abc.abstractmethod
    def _delete(self, user: str) -> int:
        ...

    @abc.abstractmethod
    def _count(self, user: str) -> int:
        ...

    def close(self) -> None:
        """Release connections (the store is unusable afterwards)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

"""The embedded history store: one SQLite file in WAL mode.

Durability: every append is one ``BEGIN IMMEDIATE ... COMMIT`` transaction on a
database in WAL (write-ahead log) mode with ``synchronous=FULL`` (the default
here): the commit returns only after the WAL, holding the whole transaction, was
fsynced, so an acknowledged append survives a killed process *and* a power loss,
and a transaction cut short by a crash is rolled back on the next open (nothing
half-written). ``synchronous="NORMAL"`` (an option) skips that fsync: still
atomic and durable across a killed process (the WAL is in the OS page cache),
but the last commits may be lost on power loss; it roughly halves append latency
on slow disks. WAL also lets readers run while one writer appends.

Several processes may open the same file (writers queue on SQLite's lock, up to
``timeout_seconds``, then :class:`StoreUnavailable`). Each process keeps a small
pool of connections (``pool_size``) shared by its threads.

Schema: ``events(seq INTEGER PRIMARY KEY AUTOINCREMENT, user, event_id, item, ts,
feedback, UNIQUE(user, event_id))`` with an index on ``(user, ts, seq, item)``:
``seq`` is the arrival order that breaks timestamp ties, and the index alone
answers :meth:`recent_items` (what a request by user id reads). Stateful R2LED
routes (``tfrec.history.routes``; ``extend_routes`` adds items to the map in one transaction, filing only
their stored events): ``buckets(user, key, ts, seq)`` (primary key in
that order, so a bucket is one index range, trimmed in the append's transaction
to its ``bucket_size`` newest rows), the SID map in ``route_sids(item, codes)``,
and ``meta('routes')`` = its fingerprint, levels and bucket size.

Example:
>>> import os, tempfile
>>> from tfrec.history import Event
>>> store = SQLiteHistoryStore(os.path.join(tempfile.mkdtemp(), "h.db"))
>>> store.append([Event("u", "a", 1, 1.0, "e1"), Event("u", "b", 1, 1.0, "e2")])
2
>>> store.recent_items("u", 1)
['b']
>>> store.close()
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sqlite3
import threading
from typing import List, Optional

from tfrec.history.base import DEFAULT_MAX_READ, Event, HistoryStore, StoreUnavailable
from tfrec.history.routes import SIDRoutes

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL,
    event_id TEXT NOT NULL,
    item TEXT NOT NULL,
    ts INTEGER NOT NULL,
    feedback REAL NOT NULL,
    UNIQUE (user, event_id)
);
CREATE INDEX IF NOT EXISTS events_by_user_time ON events (user, ts, seq, item);
CREATE TABLE IF NOT EXISTS buckets (
    user TEXT NOT NULL,
    key TEXT NOT NULL,
    ts INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (user, key, ts, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS route_sids (item TEXT PRIMARY KEY, codes TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_INSERT = "INSERT OR IGNORE INTO events (user, event_id, item, ts, feedback) VALUES (?, ?, ?, ?, ?)"
# Keep a bucket's `bucket_size` most recent rows: delete those older than its bucket_size-th newest.
_TRIM = ("DELETE FROM buckets WHERE user = ?1 AND key = ?2 AND (ts, seq) < (SELECT ts, seq FROM buckets "
         "WHERE user = ?1 AND key = ?2 ORDER BY ts DESC, seq DESC LIMIT 1 OFFSET ?3)")


def resolve_under_root(path: str, root: Optional[str]) -> str:
    """The absolute ``path``; with ``root``, ``ValueError`` unless it lies inside ``root`` (symlinks resolved)."""
    if not path:
        raise ValueError("history store path is empty")
    full = os.path.realpath(path if root is None or os.path.isabs(path) else os.path.join(root, path))
    if root is not None:
        base = os.path.realpath(root)
        if os.path.commonpath([full, base]) != base:
            raise ValueError(f"history store file {path!r} is outside the configured root {root!r}")
    parent = os.path.dirname(full)
    if not os.path.isdir(parent):
        raise ValueError(f"history store folder {parent!r} does not exist")
    return full


class SQLiteHistoryStore(HistoryStore):
    """:class:`HistoryStore` in one SQLite file (see the module docstring).

    Args:
        path: ``str``, the database file (created if missing; its folder must exist).
        root: optional ``str``, a folder ``path`` must lie in (relative paths are taken under it).
        synchronous: ``"FULL"`` (default, durable on power loss) or ``"NORMAL"`` (durable on a crash).
        timeout_seconds: ``float``, longest wait for another writer's lock, default 30.
        pool_size: ``int``, connections kept per process, default 8.
        max_read: ``int``, most events per read.
    """

    def __init__(self, path: str, root: Optional[str] = None, synchronous: str = "FULL",
                 timeout_seconds: float = 30.0, pool_size: int = 8, max_read: int = DEFAULT_MAX_READ):
        super().__init__(max_read)
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', got {synchronous!r}")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size must be a positive int, got {pool_size!r}")
        self.path = resolve_under_root(path, root)
        self.synchronous = synchronous
        self.timeout_seconds = float(timeout_seconds)
        self._pool: "queue.LifoQueue[sqlite3.Connection]" = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(pool_size)
        self._all: List[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        with self._connection() as conn:
            conn.executescript(_SCHEMA)
            self.routes = self._load_routes(conn)

    @staticmethod
    def _stored_routes_meta(conn):
        row = conn.execute("SELECT value FROM meta WHERE name = 'routes'").fetchone()
        return None if row is None else json.loads(row[0])

    def _load_routes(self, conn):
        meta = self._stored_routes_meta(conn)
        if meta is None:
            return None
        sids = {item: tuple(int(c) for c in codes.split()) for item, codes in
                conn.execute("SELECT item, codes FROM route_sids")}
        routes = SIDRoutes(sids, **meta["routes"])
        if routes.fingerprint != meta["fingerprint"]:
            raise StoreUnavailable(f"history store {self.path}: its SID routes do not match their fingerprint "
                                   "(set them again: tfrec events routes)")
        return routes

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout_seconds, isolation_level=None,
                                   check_same_thread=False)
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreUnavailable(f"cannot put history store {self.path} in WAL mode (got {mode})")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
        except sqlite3.Error as err:
            raise StoreUnavailable(f"cannot open history store {self.path}: {err}") from None
        with self._lock:
            self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def _connection(self):
        if self._closed:
            raise StoreUnavailable("history store is closed")
        if not self._slots.acquire(timeout=self.timeout_seconds):
            raise StoreUnavailable(f"no free connection to the history store after {self.timeout_seconds} s")
        try:
            try:
                conn = self._pool.get_nowait()
            except queue.Empty:
                conn = self._connect()
            try:
                yield conn
            except sqlite3.DatabaseError as err:  # locked beyond the timeout, disk full, I/O error, corrupt file
                raise StoreUnavailable(f"history store {os.path.basename(self.path)}: {err}") from None
            finally:
                if conn.in_transaction:
                    conn.rollback()
                self._pool.put(conn)
        finally:
            self._slots.release()

    def _write(self, events: List[Event]) -> int:
        routes = self.routes
        with self._connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            stored = self._stored_routes_meta(conn)
            if (stored and stored["fingerprint"]) != (routes and routes.fingerprint):
                routes = self.routes = self._load_routes(conn)  # another process set new routes: follow them
            if routes is None:
                before = conn.total_changes
                conn.executemany(_INSERT, [(e.user, e.event_id, e.item, e.timestamp, e.feedback) for e in events])
                added = conn.total_changes - before
            else:
                added, touched = 0, set()
                for event, keys in self.bucket_keys(events):
                    cursor = conn.execute(_INSERT, (event.user, event.event_id, event.item, event.timestamp,
                                                    event.feedback))
                    if cursor.rowcount != 1:
                        continue  # already stored: its buckets too
                    added += 1
                    conn.executemany("INSERT INTO buckets (user, key, ts, seq) VALUES (?, ?, ?, ?)",
                                     [(event.user, key, event.timestamp, cursor.lastrowid) for key in keys])
                    touched.update((event.user, key) for key in keys)
                conn.executemany(_TRIM, [(user, key, routes.bucket_size - 1) for user, key in touched])
            conn.execute("COMMIT")
        return added

    def _refresh_routes(self) -> None:
        with self._connection() as conn:
            stored = self._stored_routes_meta(conn)
            if (stored and stored["fingerprint"]) != (self.routes and self.routes.fingerprint):
                self.routes = self._load_routes(conn)

    def _read_routes(self, user: str, targets: List[str], recent: int) -> List[Event]:
        with self._connection() as conn:
            conn.execute("BEGIN")  # one snapshot: the map checked is the one the buckets were built with
            stored = self._stored_routes_meta(conn)
            if (stored and stored["fingerprint"]) != (self.routes and self.routes.fingerprint):
                self.routes = self._load_routes(conn)
            if self.routes is None:
                raise ValueError("this history store has no SID routes any more (removed by another process)")
            keys = self.routes.target_keys(targets)
            marks = ",".join("?" * len(keys))
            rows = conn.execute(
                "SELECT item, ts, feedback, event_id FROM events WHERE seq IN ("
                f"SELECT seq FROM buckets WHERE user = ? AND key IN ({marks}) UNION SELECT seq FROM "
                "(SELECT seq FROM events WHERE user = ? ORDER BY ts DESC, seq DESC LIMIT ?)) ORDER BY ts, seq",
                (user, *keys, user, recent)).fetchall()
            conn.execute("COMMIT")
        return [Event(user, item, ts, feedback, event_id) for item, ts, feedback, event_id in rows]

    def _set_routes(self, routes) -> int:
        with self._connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM buckets")
            conn.execute("DELETE FROM route_sids")
            conn.execute("DELETE FROM meta WHERE name = 'routes'")
            users = 0
            if routes is not None:
                conn.executemany("INSERT INTO route_sids (item, codes) VALUES (?, ?)",
                                 [(item, " ".join(map(str, codes))) for item, codes in routes.sids.items()])
                conn.execute("INSERT INTO meta (name, value) VALUES ('routes', ?)", (json.dumps(
                    {"fingerprint": routes.fingerprint, "routes": routes.meta()}),))
                for (user,) in conn.execute("SELECT DISTINCT user FROM events").fetchall():
                    rows = conn.execute("SELECT item, ts, seq FROM events WHERE user = ? ORDER BY ts, seq",
                                        (user,)).fetchall()
                    buckets = self.trimmed_buckets(((item, (ts, seq)) for item, ts, seq in rows), routes)
                    conn.executemany("INSERT INTO buckets (user, key, ts, seq) VALUES (?, ?, ?, ?)",
                                     [(user, key, ts, seq) for key, bucket in buckets.items() for ts, seq in bucket])
                    users += 1
            conn.execute("COMMIT")
        return users

    def _extend_routes(self, current, routes, added) -> None:
        with self._connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            stored = self._stored_routes_meta(conn)
            if not stored or stored["fingerprint"] != current.fingerprint:
                raise ValueError("the store's SID routes changed while extending them (another process set them): "
                                 "run the add again")
            conn.executemany("INSERT INTO route_sids (item, codes) VALUES (?, ?)",
                             [(item, " ".join(map(str, codes))) for item, codes in added.items()])
            conn.execute("UPDATE meta SET value = ? WHERE name = 'routes'", (json.dumps(
                {"fingerprint": routes.fingerprint, "routes": routes.meta()}),))
            touched = set()
            items = list(added)
            for start in range(0, len(items), 500):  # the added items' stored events into their buckets
                chunk = items[start:start + 500]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(f"SELECT user, item, ts, seq FROM events WHERE item IN ({marks})", chunk).fetchall()
                for user, item, ts, seq in rows:
                    keys = routes.keys(item)
                    conn.executemany("INSERT OR IGNORE INTO buckets (user, key, ts, seq) VALUES (?, ?, ?, ?)",
                                     [(user, key, ts, seq) for key in keys])
                    touched.update((user, key) for key in keys)
            conn.executemany(_TRIM, [(user, key, routes.bucket_size - 1) for user, key in touched])
            conn.execute("COMMIT")

    def _read(self, user: str, n: int) -> List[Event]:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT item, ts, feedback, event_id FROM events WHERE user = ? ORDER BY ts DESC, seq DESC LIMIT ?",
                (user, n)).fetchall()
        return [Event(user, item, ts, feedback, event_id) for item, ts, feedback, event_id in reversed(rows)]

    def _read_items(self, user: str, n: int) -> List[str]:
        with self._connection() as conn:
            rows = conn.execute("SELECT item FROM events WHERE user = ? ORDER BY ts DESC, seq DESC LIMIT ?",
                                (user, n)).fetchall()
        return [row[0] for row in reversed(rows)]

    def _delete(self, user: str) -> int:
        with self._connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            deleted = conn.execute("DELETE FROM events WHERE user = ?", (user,)).rowcount
            conn.execute("DELETE FROM buckets WHERE user = ?", (user,))
            conn.execute("COMMIT")
        return deleted

    def _count(self, user: str) -> int:
        with self._connection() as conn:
            return conn.execute("SELECT COUNT(*) FROM events WHERE user = ?", (user,)).fetchone()[0]

    def close(self) -> None:
        self._closed = True
        with self._lock:
            connections, self._all = self._all, []
        for conn in connections:
            conn.close()

"""The HistoryStore contract, run against both backends (SQLite and a real redis-server)."""

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from history_servers import redis_server
from tfrec.history import MAX_APPEND, Event, InvalidEvent, StoreUnavailable, open_store
from tfrec.history.redis_store import parse_redis_url
from tfrec.history.sqlite_store import SQLiteHistoryStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as (url, _):
        yield url


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'events.db'}"
    url = request.getfixturevalue("redis_url")
    client = open_store(url)
    client._client.flushdb()
    client.close()
    return url


@pytest.fixture
def store(store_url):
    opened = open_store(store_url)
    yield opened
    opened.close()


def ev(user, item, ts, eid, feedback=1.0):
    return Event(user, item, ts, feedback, eid)


def test_recent_orders_by_timestamp_then_arrival(store):
    assert store.append([ev("u", "c", 30, "e3"), ev("u", "a", 10, "e1"), ev("u", "t1", 20, "e2")]) == 3
    assert store.append([ev("u", "t2", 20, "e4"), ev("u", "t3", 20, "e5"), ev("v", "x", 99, "e1")]) == 3
    assert store.recent_items("u", 10) == ["a", "t1", "t2", "t3", "c"]  # ties at 20: arrival order
    assert store.recent_items("u", 2) == ["t3", "c"]  # the most recent 2, oldest first
    events = store.recent("u", 1)
    assert events == [Event("u", "c", 30, 1.0, "e3")]
    assert store.recent_items("v", 5) == ["x"] and store.count("u") == 5


def test_recent_items_are_the_items_of_recent(store):
    """The cheap by-id read (SQLite: one concatenated row) keeps `recent`'s order over shuffled
    timestamps with many ties, at every window, and reads nothing for an unknown user."""
    import random

    rng = random.Random(7)
    events = [ev("u", f"i{rng.randrange(40)}", rng.randrange(25), f"e{k}") for k in range(300)]
    for start in range(0, 300, 60):  # several appends: arrival order spans batches
        store.append(events[start:start + 60])
    for n in (1, 2, 17, 256, 300, 1000):
        assert store.recent_items("u", n) == [e.item for e in store.recent("u", n)], n
    assert len(store.recent_items("u", 1000)) == 300
    assert store.recent_items("nobody", 5) == []


def test_append_is_idempotent_by_user_and_event_id(store):
    batch = [ev("u", "a", 1, "e1"), ev("u", "b", 2, "e2")]
    assert store.append(batch) == 2
    assert store.append(batch) == 0
    assert store.append([ev("u", "other", 5, "e1"), ev("u", "c", 3, "e3")]) == 1  # e1 kept its first value
    assert store.recent_items("u", 10) == ["a", "b", "c"]
    assert store.append([ev("w", "a", 1, "e1")]) == 1  # ids are per user


def test_delete_user_forgets_everything(store):
    store.append([ev("u", "a", 1, "e1"), ev("u", "b", 2, "e2"), ev("keep", "k", 1, "e1")])
    assert store.delete_user("u") == 2
    assert store.recent("u", 5) == [] and store.count("u") == 0
    assert store.delete_user("u") == 0
    assert store.recent_items("keep", 5) == ["k"]
    assert store.append([ev("u", "a", 1, "e1")]) == 1  # a forgotten id may come again


def test_text_round_trips(store):
    store.append([ev("ünï cødé", "item with spaces/and:colons{}", -5, "é", feedback=-2.5)])
    assert store.recent("ünï cødé", 1) == [Event("ünï cødé", "item with spaces/and:colons{}", -5, -2.5, "é")]
    assert store.recent_items("ünï cødé", 1) == ["item with spaces/and:colons{}"]


@pytest.mark.parametrize("event, field", [
    (ev("", "a", 1, "e"), "user"),
    (ev("u" * 129, "a", 1, "e"), "user"),
    (ev("u", "a\tb", 1, "e"), "item"),
    (ev("u", "i" * 257, 1, "e"), "item"),
    (ev("u", "a", 1, ""), "event_id"),
    (ev("u", "a", 1.5, "e"), "timestamp"),
    (ev("u", "a", 2**53, "e"), "timestamp"),
    (ev("u", "a", True, "e"), "timestamp"),
    (ev("u", "a", 1, "e", feedback=float("nan")), "feedback"),
    (ev("u", "a", 1, "e", feedback="1"), "feedback"),
    (Event(7, "a", 1, 1.0, "e"), "user"),
])
def test_bad_events_name_the_field_and_write_nothing(store, event, field):
    with pytest.raises(InvalidEvent) as info:
        store.append([ev("u", "good", 1, "g1"), event])
    assert info.value.field == field and info.value.index == 1 and field in str(info.value)
    assert store.count("u") == 0  # the valid event before it was not written either


def test_limits(store):
    with pytest.raises(InvalidEvent, match="limit of"):
        store.append([ev("u", "a", i, f"e{i}") for i in range(MAX_APPEND + 1)])
    store.append([ev("u", "a", i, f"e{i}") for i in range(20)])
    for n in (0, -1, store.max_read + 1, "3", True):
        with pytest.raises(InvalidEvent, match="n:"):
            store.recent("u", n)
    with pytest.raises(InvalidEvent, match="user"):
        store.recent("x" * 200, 1)
    small = open_store(STORE_URLS[type(store).__name__](store), max_read=5)
    try:
        assert len(small.recent("u", 5)) == 5
        with pytest.raises(InvalidEvent):
            small.recent("u", 6)
    finally:
        small.close()


STORE_URLS = {"SQLiteHistoryStore": lambda s: f"sqlite://{s.path}", "RedisHistoryStore": lambda s: s.url}


def _append_worker(url, worker, count, barrier):
    store = open_store(url)
    barrier.wait()
    for i in range(count):
        # Every worker appends the shared events too: each must be stored once.
        store.append([ev("shared", f"w{worker}-{i}", i, f"w{worker}-{i}"), ev("dup", "d", i, f"d{i}")])
    store.close()


def test_concurrent_appends_from_several_processes(store, store_url):
    workers, count = 4, 25
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(workers)
    processes = [context.Process(target=_append_worker, args=(store_url, w, count, barrier)) for w in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    assert store.count("shared") == workers * count
    assert store.count("dup") == count
    items = store.recent_items("shared", workers * count)
    # ordered by timestamp i; within one i, arrival order: all four workers present
    assert sorted(items[:workers]) == [f"w{w}-0" for w in range(workers)]
    assert {item.split("-")[1] for item in items[-workers:]} == {str(count - 1)}


def test_bad_urls_and_roots(tmp_path):
    for url in ("mysql://x", "sqlite://", "redis://", "redis://h:99999/0", "redis://h:1/x", 5):
        with pytest.raises(ValueError):
            open_store(url)
    with pytest.raises(ValueError, match="does not exist"):
        open_store(f"sqlite://{tmp_path}/missing/e.db")
    with pytest.raises(ValueError, match="outside the configured root"):
        open_store(f"sqlite://{tmp_path}/../e.db", root=str(tmp_path))
    inside = open_store("sqlite://e.db", root=str(tmp_path))
    assert inside.path == str(tmp_path / "e.db")
    inside.close()
    assert parse_redis_url("redis://127.0.0.1") == ("127.0.0.1", 6379, 0)
    (tmp_path / "garbage.db").write_bytes(b"not a database" * 100)
    with pytest.raises(StoreUnavailable, match="garbage.db"):
        open_store(f"sqlite://{tmp_path / 'garbage.db'}")
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteHistoryStore(str(tmp_path / "x.db"), synchronous="OFF")


def test_unreachable_redis_is_store_unavailable(tmp_path):
    from history_servers import free_port

    store = open_store(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_seconds=1.0)
    with pytest.raises(StoreUnavailable, match="unreachable"):
        store.append([ev("u", "a", 1, "e1")])
    with pytest.raises(StoreUnavailable):
        store.recent("u", 1)
    store.close()


def test_sqlite_is_wal_with_full_sync(tmp_path):
    store = SQLiteHistoryStore(str(tmp_path / "e.db"))
    with store._connection() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        store.recent("u", 1)


_KILL_WRITER = r"""
import sys
from tfrec.history import Event, open_store
store = open_store(sys.argv[1])
i = 0
while True:
    store.append([Event("u", f"i{i}", i, 1.0, f"e{i}"), Event("u", f"j{i}", i, 1.0, f"f{i}")])
    print(i, flush=True)  # acknowledged: both events of batch i are stored
    i += 1
"""


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_acknowledged_appends_survive_sigkill(backend, tmp_path):
    """A writer is SIGKILLed mid-ingestion: every acknowledged batch is there, no batch is half-written."""
    def run(url):
        writer = subprocess.Popen([sys.executable, "-c", _KILL_WRITER, url], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": ROOT})
        acked = -1
        deadline = time.monotonic() + 60
        while acked < 40 and time.monotonic() < deadline:
            line = writer.stdout.readline()
            if not line:
                break
            acked = int(line)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        assert acked >= 40, "the writer did not acknowledge enough batches"
        return acked

    if backend == "sqlite":
        url = f"sqlite://{tmp_path / 'e.db'}"
        acked = run(url)
        store = open_store(url)
        stored = store.count("u")
        store.close()
    else:
        from history_servers import free_port

        port = free_port()
        with redis_server(tmp_path, appendonly=True, port=port) as (url, process):
            acked = run(url)
            process.kill()  # the server dies too: what it acknowledged must be in its AOF
            process.wait()
        with redis_server(tmp_path, appendonly=True, port=port) as (url, _):
            store = open_store(url)
            stored = store.count("u")
            store.close()
    assert stored % 2 == 0, "a batch was half-written"
    assert stored >= 2 * (acked + 1), f"acknowledged {2 * (acked + 1)} events, only {stored} stored"

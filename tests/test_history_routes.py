"""Stateful R2LED routes in the history store (issue 22 item 4): the buckets on both backends."""

import random

import pytest

from test_history_store import redis_url, store, store_url  # noqa: F401  (both backends, fixtures reused)
from tfrec.history import Event, InvalidEvent, open_store
from tfrec.history.routes import SIDRoutes, load_sid_routes, write_sid_file

SIDS = {f"i{n}": (n % 3, (n // 3) % 3, n % 2) for n in range(40)}
SIDS["nosid2"] = (1, -1, -1)  # a code only at level 1


def random_events(user, count, seed):
    rng = random.Random(seed)
    items = list(SIDS) + ["unknown-a", "unknown-b"]
    return [Event(user, rng.choice(items), rng.randrange(0, count // 2 + 1), 1.0, f"{user}-{n}")
            for n in range(count)]


def reference(events, routes, targets, recent):
    """What route_events must return, from the whole history (events in arrival order)."""
    ordered = sorted(events, key=lambda e: e.timestamp)  # stable: arrival breaks ties
    chosen = set(range(max(0, len(ordered) - recent), len(ordered)))
    for key in routes.target_keys(targets):
        matching = [i for i, e in enumerate(ordered) if key in routes.keys(e.item)]
        chosen.update(matching[-routes.bucket_size:])
    return [ordered[i] for i in sorted(chosen)]


def test_route_keys_and_sid_files(tmp_path):
    routes = SIDRoutes(SIDS, bucket_size=4)
    assert routes.keys("i5") == ["1:2", "2:2.1", "3:2.1.1"]
    assert routes.keys("nosid2") == ["1:1"] and routes.keys("unknown-a") == []
    assert SIDRoutes(SIDS, levels=[2], bucket_size=4).keys("i5") == ["2:2.1"]
    path = str(tmp_path / "sids.tsv")
    write_sid_file(path, SIDS)
    assert load_sid_routes(path, bucket_size=4).fingerprint == routes.fingerprint
    assert SIDRoutes(SIDS, bucket_size=5).fingerprint != routes.fingerprint
    (tmp_path / "bad.tsv").write_text("a\t1 x\n")
    with pytest.raises(ValueError, match="line 1: SID codes must be integers"):
        load_sid_routes(str(tmp_path / "bad.tsv"))
    for bad, needle in (({}, "non-empty"), ({"a": (1,), "b": (1, 2)}, "same number"),
                        ({"a": ("x",)}, "must be integers")):
        with pytest.raises(ValueError, match=needle):
            SIDRoutes(bad)
    with pytest.raises(ValueError, match="levels"):
        SIDRoutes(SIDS, levels=[4])
    with pytest.raises(ValueError, match="bucket_size"):
        SIDRoutes(SIDS, bucket_size=0)


@pytest.mark.parametrize("bucket_size, recent", [(4, 3), (64, 1)])
def test_buckets_gather_what_the_whole_history_would(store, bucket_size, recent):
    routes = SIDRoutes(SIDS, bucket_size=bucket_size)
    store.set_routes(routes)
    events = random_events("u", 300, seed=bucket_size)
    for start in range(0, len(events), 37):  # several appends, out-of-order timestamps, with duplicates
        store.append(events[start:start + 37] + events[max(0, start - 5):start])
    store.append(random_events("other", 50, seed=9))
    for targets in (["i1"], ["i7", "i8", "nosid2"], ["unknown-a"], ["i1", "i1"]):
        got = store.route_events("u", targets, recent)
        assert got == reference(events, routes, targets, recent), targets
    assert all(e.user == "u" for e in store.route_events("u", ["i1"], 5))


def test_set_routes_rebuilds_and_is_stored_beside(store, store_url):
    events = random_events("u", 200, seed=3)
    store.append(events)  # before any routes: only the history
    routes = SIDRoutes(SIDS, bucket_size=5)
    assert store.set_routes(routes) == 1
    assert store.route_events("u", ["i4", "i9"], 2) == reference(events, routes, ["i4", "i9"], 2)
    other = open_store(store_url)  # another process: finds the map in the store
    try:
        assert other.routes.fingerprint == routes.fingerprint
        more = random_events("u", 60, seed=4)
        more = [Event(e.user, e.item, e.timestamp + 200, e.feedback, "m" + e.event_id) for e in more]
        other.append(more)
        assert store.route_events("u", ["i4"], 2) == reference(events + more, routes, ["i4"], 2)
        finer = SIDRoutes(SIDS, levels=[3], bucket_size=2)
        store.set_routes(finer)
        # the other process reads (and later appends) under the new map, not the one it loaded
        assert other.route_events("u", ["i4"], 1) == reference(events + more, finer, ["i4"], 1)
        late = [Event("u", "i4", 10_000, 1.0, "late")]
        other.append(late)  # still holding the old map: follows the new one before writing
        assert other.routes.fingerprint == finer.fingerprint
        assert store.route_events("u", ["i4"], 1) == reference(events + more + late, finer, ["i4"], 1)
    finally:
        other.close()
    store.set_routes(None)
    with pytest.raises(ValueError, match="no SID routes"):
        store.route_events("u", ["i4"], 2)


def test_extend_routes_files_the_new_items_stored_events_as_a_rebuild_would(store, store_url):
    """New catalogue items (`tfrec items add --ranker --history_store`): their events stored before the add
    reach their buckets; the other items' buckets and the map's settings are as a full set_routes would leave."""
    old = {item: codes for item, codes in SIDS.items() if item not in ("i3", "i4")}
    store.set_routes(SIDRoutes(old, bucket_size=4))
    events = random_events("u", 200, seed=5)  # i3 / i4 events before they are mapped: in no bucket yet
    store.append(events)
    assert store.extend_routes({"i3": SIDS["i3"], "i4": SIDS["i4"], "i5": SIDS["i5"]}) == 2  # i5: already there
    routes = SIDRoutes(SIDS, bucket_size=4)
    assert store.routes.fingerprint == routes.fingerprint
    for targets in (["i3"], ["i4", "i7"], ["i0"]):
        assert store.route_events("u", targets, 2) == reference(events, routes, targets, 2), targets
    other = open_store(store_url)  # another process follows the extended map
    try:
        assert other.routes.fingerprint == routes.fingerprint
    finally:
        other.close()
    with pytest.raises(ValueError, match="already in the store's SID map with codes"):
        store.extend_routes({"i3": (2, 2, 0)})
    assert store.extend_routes({"i3": SIDS["i3"]}) == 0
    store.set_routes(None)
    with pytest.raises(ValueError, match="no SID routes to extend"):
        store.extend_routes({"i3": SIDS["i3"]})


def test_delete_removes_buckets_and_idempotent_appends_add_none(store, store_url):
    store.set_routes(SIDRoutes(SIDS, bucket_size=3))
    batch = [Event("u", "i1", t, 1.0, f"e{t}") for t in range(6)]
    assert store.append(batch) == 6 and store.append(batch) == 0
    assert [e.event_id for e in store.route_events("u", ["i1"], 1)] == ["e3", "e4", "e5"]
    assert store.delete_user("u") == 6
    assert store.route_events("u", ["i1"], 5) == []
    if store_url.startswith("redis"):
        assert store._client.keys("*{u}*") == []
    else:
        with store._connection() as conn:
            assert conn.execute("SELECT COUNT(*) FROM buckets").fetchone()[0] == 0
    store.append([Event("u", "i1", 0, 1.0, "e0")])  # a forgotten id may come again, with its buckets
    assert [e.event_id for e in store.route_events("u", ["i1"], 1)] == ["e0"]


def test_bad_route_requests_are_clear_errors(store):
    with pytest.raises(ValueError, match="no SID routes"):
        store.route_events("u", ["i1"], 3)
    store.set_routes(SIDRoutes(SIDS))
    with pytest.raises(InvalidEvent, match="targets"):
        store.route_events("u", ["i1"] * 1001, 3)
    with pytest.raises(InvalidEvent, match="target"):
        store.route_events("u", ["bad\ttoken"], 3)
    with pytest.raises(InvalidEvent, match="n"):
        store.route_events("u", ["i1"], 0)
    with pytest.raises(ValueError, match="SIDRoutes"):
        store.set_routes({"i1": (1, 2)})


def _routes_worker(url, worker, count, barrier):
    store = open_store(url)  # finds the routes in the store
    barrier.wait()
    for i in range(count):
        item = f"i{(worker * 7 + i) % 40}"
        store.append([Event("shared", item, i % 9, 1.0, f"w{worker}-{i}"), Event("shared", "i3", i, 1.0, f"d{i}")])
    store.close()


def test_concurrent_appends_keep_buckets_consistent_with_the_history(store, store_url):
    import multiprocessing

    routes = SIDRoutes(SIDS, bucket_size=6)
    store.set_routes(routes)
    workers, count = 3, 30
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(workers)
    processes = [context.Process(target=_routes_worker, args=(store_url, w, count, barrier)) for w in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    history = store.recent("shared", 10_000)  # oldest first: timestamp, then arrival
    assert len(history) == workers * count + count
    for target in (f"i{n}" for n in range(0, 40, 3)):
        assert store.route_events("shared", [target], 2) == reference(history, routes, [target], 2), target

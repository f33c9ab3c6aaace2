"""History store costs (issue 22): appends, reads, serving by user id, durability, stateful R2LED routes.

For each backend (SQLite in WAL with synchronous=FULL, the default; SQLite with
NORMAL; Redis without persistence and with AOF `appendfsync always`, started
here on a free loopback port):

- `appends_per_second.single`: one event per `append` call (one transaction each),
  from one caller; `.batched`: `--batch` events per call;
- `reads`: `recent(user, --history)` at 1 / 8 / 32 concurrent callers (threads, as
  in the server) over `--users` users holding `--history` events each: p50 / p99 /
  mean ms and reads/s.

Then:

- `serve`: a `tfrec serve --history_store sqlite://...` subprocess with the REAL
  exported recommender (`--servables`, default `artifacts/main/servables`, what
  `scripts/main.sh` exports) and real users' histories (`--prepared`) posted to
  `POST /v1/events`: gRPC `recommend` p50 / p99 at 8 callers by `user_id`, and by
  the same histories sent explicitly (the model's share; the difference is the
  store read and the request rewrite) -- target p99 <= 25 ms by user id;
  `--serve_rounds` rounds of `--serve_requests` per mode, alternating, percentiles
  over all rounds pooled (`p99_ms_by_round` beside them), and the server process's CPU per
  request; with the server's defaults; `serve_tuned`: the same with `TUNED_FLAGS` (the
  serving benchmark's batching configuration, flags recorded in `server_flags`);
  `serve_64_threads`: the defaults with 64 gRPC threads (the former default);
- `kill9`: a server SIGKILLed while 2 clients post events: acknowledged events
  missing afterwards (must be 0);
- `redis_restart`: Redis with AOF (`appendfsync always`) SIGKILLed after
  acknowledged appends, restarted on the same folder: acknowledged events lost
  (must be 0) and seconds to answer again;
- `cold_items`: new items added to a delta file (`tfrec items add`'s library
  call) merged into the real ScaNN retrieval servable by
  `export.delta_retrieval`: seconds from the add to recommendable, `retrieve`
  p50/p99 with an empty and a 1,000-item delta, failed requests from 2 clients
  querying while the file is swapped (must be 0);
- `routes`: the stateful R2LED route cost curve (issue 22 item 4): an exported
  untrained R2LED (`--route_items` items, 3 SID levels of 16 codes, top_k 16)
  scoring `--route_candidates` candidates for a user with 256 ... 4,096 events,
  through the server's own request path (`UserHistories.replace_user_ids`, then
  the SavedModel's `score`): stateful (the candidates' buckets of 16 + the 32 most
  recent events) against stateless (the whole history read): read ms, model ms,
  events sent to the model, and the append cost per event with and without
  buckets (SQLite FULL);
- `loadavg`: `os.getloadavg()` before and after (the machine is shared: read the
  figures with it).

A full run takes a few minutes (not a test):

    .venv/bin/python benchmarks/history_store.py [--out reports/history_store.json]
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from _serving_load import percentiles_ms, server_flags  # noqa: E402
from history_servers import redis_server  # noqa: E402
from tfrec.history import Event, open_store  # noqa: E402


def appends(store, count, batch, tag):
    events = [Event(f"{tag}-{i % 50}", f"item-{i % 997}", i, 1.0, f"{tag}-{i}") for i in range(count)]
    started = time.perf_counter()
    for start in range(0, count, batch):
        store.append(events[start:start + batch])
    return round(count / (time.perf_counter() - started), 1)


def reads(store, users, history, callers, per_caller):
    latencies, lock = [], threading.Lock()
    barrier = threading.Barrier(callers)

    def caller(seed):
        mine = []
        barrier.wait()
        for i in range(per_caller):
            started = time.perf_counter()
            got = store.recent(f"r-{(seed * 7919 + i) % users}", history)
            mine.append(time.perf_counter() - started)
            assert len(got) == history
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(callers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return {"callers": callers, "reads": len(latencies), "reads_per_second": round(len(latencies) / seconds, 1),
            **percentiles_ms(latencies)}


def measure(name, url, args):
    store = open_store(url, **({"synchronous": "NORMAL"} if name == "sqlite-normal" else {}))
    try:
        single = appends(store, args.single, 1, "s")
        batched = appends(store, args.batched, args.batch, "b")
        for u in range(args.users):  # the read set: users with `history` events each
            store.append([Event(f"r-{u}", f"item-{i}", i, 1.0, f"e{i}") for i in range(args.history)])
        result = {"backend": name, "appends_per_second": {"single": single, f"batched_{args.batch}": batched},
                  "reads": [reads(store, args.users, args.history, c, max(20, args.reads // c))
                            for c in (1, 8, 32)]}
    finally:
        store.close()
    print(json.dumps(result), flush=True)
    return result


def post_events(rest_url, events, timeout=60):
    import urllib.request

    body = json.dumps({"events": events}).encode()
    request = urllib.request.Request(rest_url + "/v1/events", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def real_users(prepared, count):
    """`[(user, history tokens)]` of the first `count` users of a prepared dataset (full sequences)."""
    from tfrec.data.preprocess import load_prepared

    data = load_prepared(prepared)
    users = list(data.user_vocab.tokens)[:count]
    return [(user, [data.item_vocab.tokens[int(i) - 2] for i in data.sequences[row]])
            for row, user in enumerate(users)]


# The serving benchmark's batching configuration: one TF thread per op and request, requests merged
# into batches of up to 32 rows waiting at most 2 ms (`_serving_load.server_flags`).
TUNED_FLAGS = tuple(server_flags(batching=True))


def serve_by_user(folder, args, extra_flags=(), label="plain"):
    """recommend p50/p99 at 8 callers, by user id and by history, against the real exported recommender,
    served with the server's defaults (`label` "plain") or with `extra_flags` (e.g. `TUNED_FLAGS`)."""
    import grpc
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from _serving_load import ServeProcess, closed_loop, write_models_config

    base = Path(args.servables) / "recommender"
    if not base.is_dir():
        raise SystemExit(f"no exported recommender at {base}: run scripts/main.sh first (or pass --servables)")
    config = write_models_config(folder / "models.config", [("recommender", base, "tensorflow")])
    users = real_users(args.prepared, args.users)
    db = folder / f"served-{label}.db"
    flags = ["--history_store", f"sqlite://{db}", "--history_length", str(args.history), *extra_flags]
    with ServeProcess(config, folder / f"serve-{label}.log", flags) as server:
        server.wait_available(["recommender"])
        for user, history in users:
            events = [{"user": user, "item": t, "timestamp": i, "event_id": f"{user}:{i}"}
                      for i, t in enumerate(history)]
            assert post_events(server.rest_url, events)["appended"] == len(events)

        def request(**inputs):
            req = predict_pb2.PredictRequest()
            req.model_spec.name, req.model_spec.signature_name = "recommender", "recommend"
            for name, value in inputs.items():
                req.inputs[name].CopyFrom(tf.make_tensor_proto(value))
            return req

        no = np.array([False])
        by_id = [request(user_id=np.array([u.encode()], dtype=object), exclude_history=no) for u, _ in users]
        by_history = [request(history=np.array([[t.encode() for t in h[-args.history:]]], dtype=object),
                              exclude_history=no) for _, h in users]
        lengths = [len(h) for _, h in users]
        result = {"model": str(base), "server_flags": list(extra_flags), "callers": 8, "users": len(users),
                  "history_length_flag": args.history,
                  "user_history_events": {"mean": round(float(np.mean(lengths)), 1), "max": max(lengths)},
                  "target_p99_ms": 25.0}
        with grpc.insecure_channel(server.address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for name, requests in (("by_user_id", by_id), ("by_history", by_history)):
                closed_loop(stub, requests, 8, 80)  # warm-up
            # Rounds alternate the two modes (so drift in the machine's other work hits both);
            # percentiles are over every round's latencies pooled, with each round's p99 beside them.
            runs, cpu = {"by_user_id": [], "by_history": []}, {"by_user_id": 0.0, "by_history": 0.0}
            for _ in range(args.serve_rounds):
                for name, requests in (("by_user_id", by_id), ("by_history", by_history)):
                    begun = server.cpu_seconds()
                    runs[name].append(closed_loop(stub, requests, 8, args.serve_requests))
                    cpu[name] += server.cpu_seconds() - begun
            for name, rounds in runs.items():
                latencies = [t for run in rounds for t in run["latencies"]]
                result[name] = {"requests": len(latencies), "rounds": len(rounds),
                                "errors": sum(run["errors"] for run in rounds),
                                "server_cpu_ms_per_request": round(cpu[name] / max(len(latencies), 1) * 1e3, 3),
                                "requests_per_second": round(len(latencies) / sum(run["wall_seconds"] for run in rounds), 1),
                                **percentiles_ms(latencies),
                                "p99_ms_by_round": [percentiles_ms(run["latencies"])["p99_ms"] for run in rounds]}
            for name, requests in (("by_user_id", by_id), ("by_history", by_history)):  # where the time goes
                run = closed_loop(stub, requests, 1, max(50, args.serve_requests // 8))
                result[f"{name}_1_caller"] = percentiles_ms(run["latencies"])
        store = open_store(f"sqlite://{db}")  # the store read alone, in this process
        reads = []
        for _ in range(5):
            for user, _ in users:
                begun = time.perf_counter()
                store.recent_items(user, args.history)
                reads.append(time.perf_counter() - begun)
        store.close()
        result["store_read_1_caller"] = percentiles_ms(reads)
        result["by_id_extra_ms_p50_1_caller"] = round(result["by_user_id_1_caller"]["p50_ms"]
                                                      - result["by_history_1_caller"]["p50_ms"], 3)
    print(json.dumps(result), flush=True)
    return result


def kill9(folder, seconds=3.0):
    """A server SIGKILLed while 2 clients post events: how many acknowledged events are missing."""
    import signal

    from _serving_load import ServeProcess, write_models_config

    config = write_models_config(folder / "none.config", [])
    url = f"sqlite://{folder / 'kill9.db'}"
    acknowledged, lock, stop = [], threading.Lock(), threading.Event()

    def client(c):
        for i in range(1_000_000):
            if stop.is_set():
                return
            batch = [{"user": f"k{c}-{(i + j) % 5}", "item": f"item-{i}-{j}", "timestamp": i, "event_id": f"{i}-{j}"}
                     for j in range(5)]
            try:
                post_events(server.rest_url, batch, timeout=10)
            except OSError:
                return
            with lock:
                acknowledged.extend((e["user"], e["event_id"]) for e in batch)

    with ServeProcess(config, folder / "kill9.log", ["--history_store", url]) as server:
        threads = [threading.Thread(target=client, args=(c,)) for c in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        os.kill(server.proc.pid, signal.SIGKILL)  # mid-ingestion
        server.proc.wait()
        stop.set()
        for thread in threads:
            thread.join(30)
    store = open_store(url)
    try:
        stored = {(e.user, e.event_id) for user in {u for u, _ in acknowledged} for e in store.recent(user, 10_000)}
    finally:
        store.close()
    result = {"acknowledged_events": len(acknowledged), "lost": len(set(acknowledged) - stored),
              "stored": len(stored), "seconds_before_kill": seconds}
    print(json.dumps({"kill9": result}), flush=True)
    return result


def redis_restart(folder, count=2000, batch=10):
    """Redis (AOF, appendfsync always) SIGKILLed after acknowledged appends, restarted on the same folder."""
    from history_servers import free_port

    port = free_port()
    (folder / "aof").mkdir()
    with redis_server(folder / "aof", appendonly=True, port=port) as (url, process):
        store = open_store(url)
        acknowledged = []
        for start in range(0, count, batch):
            events = [Event(f"r{i % 7}", f"item-{i}", i, 1.0, f"e{i}") for i in range(start, start + batch)]
            store.append(events)
            acknowledged += [(e.user, e.event_id) for e in events]
        store.close()
        process.kill()  # SIGKILL: no shutdown save
        process.wait()
    started = time.perf_counter()
    with redis_server(folder / "aof", appendonly=True, port=port) as (url, _):
        restart = time.perf_counter() - started
        store = open_store(url)
        stored = {(e.user, e.event_id) for u in range(7) for e in store.recent(f"r{u}", 10_000)}
        store.close()
    result = {"persistence": "appendonly yes, appendfsync always", "acknowledged_events": len(acknowledged),
              "lost": len(set(acknowledged) - stored), "restart_seconds": round(restart, 3)}
    print(json.dumps({"redis_restart": result}), flush=True)
    return result


def cold_items(folder, args):
    """New items through a delta file merged into the real ScaNN retrieval servable (issue 22 item 5, serving
    side): seconds from `add_items` to recommendable, retrieve p50/p99 with and without a 1,000-item delta,
    failed requests while the delta file is swapped (must be 0)."""
    import numpy as np

    from _serving_load import ServeProcess, write_models_config
    from export.client import PredictClient
    from export.items_add import add_items

    servables = Path(args.servables)
    delta = folder / "delta" / "items.npz"
    delta.parent.mkdir()
    config = write_models_config(folder / "cold.config", [
        ("recommender", servables / "recommender", "tensorflow"),
        ("retrieval_scann", servables / "retrieval_scann", "tensorflow"),
        ("live", f"export.delta_retrieval:factory?retrieval=retrieval_scann&delta={delta}&reload_seconds=0.2",
         "python")])
    users = real_users(args.prepared, 8)
    with ServeProcess(config, folder / "cold.log", ["--allowed_python_modules", "export.delta_retrieval"]) as server:
        server.wait_available(["recommender", "retrieval_scann", "live"])
        with PredictClient(server.address) as client:
            queries = [np.asarray(client.predict("recommender", {"history": [h[-50:]]}, signature="user_embedding")
                                  ["embedding"], np.float32) for _, h in users]
            dim = queries[0].shape[1]
            errors, stop, lock = [], threading.Event(), threading.Lock()

            def timed(model, count):
                latencies = []
                for i in range(count):
                    begun = time.perf_counter()
                    client.predict(model, {"queries": queries[i % len(queries)]}, signature="retrieve")
                    latencies.append(time.perf_counter() - begun)
                return percentiles_ms(latencies)

            def hammer():
                with PredictClient(server.address) as own:
                    i = 0
                    while not stop.is_set():
                        try:
                            own.predict("live", {"queries": queries[i % len(queries)]}, signature="retrieve")
                        except Exception as err:  # noqa: BLE001 - every failure counts
                            with lock:
                                errors.append(repr(err)[:200])
                        i += 1

            timed("live", 20)  # warm-up
            result = {"retrieval": "retrieval_scann (real export)", "base": timed("retrieval_scann", 200),
                      "live_empty_delta": timed("live", 200)}
            threads = [threading.Thread(target=hammer) for _ in range(2)]
            for thread in threads:
                thread.start()
            rng = np.random.default_rng(0)
            seconds = []
            for n in range(5):  # one new item each time, made the best answer for user n's query
                add_items(str(delta), [f"new-{n}"], 2.0 * queries[n])
                added = time.perf_counter()
                while True:
                    got = client.predict("live", {"queries": queries[n]}, signature="retrieve")["item_ids"][0]
                    if got[0].decode() == f"new-{n}":
                        break
                    if time.perf_counter() - added > 30:
                        raise RuntimeError(f"new-{n} never became recommendable")
                    time.sleep(0.01)
                seconds.append(time.perf_counter() - added)
            add_items(str(delta), [f"bulk-{i}" for i in range(1000)],
                      rng.normal(0, 0.01, (1000, dim)).astype(np.float32))  # a 1,000-item delta
            time.sleep(0.5)
            stop.set()
            for thread in threads:
                thread.join(30)
            result["live_1000_delta"] = timed("live", 200)
            result["seconds_add_to_recommendable"] = {"max": round(max(seconds), 3),
                                                     "mean": round(float(np.mean(seconds)), 3),
                                                     "reload_seconds": 0.2}
            result["failed_requests_during_swaps"] = len(errors)
            result["error_samples"] = errors[:3]
    print(json.dumps({"cold_items": result}), flush=True)
    return result


def route_cost(folder, args):
    """The stateful R2LED route cost curve (see the module docstring)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from export.saved_model import export_ctr
    from export.server.servable import Signature
    from export.server.user_history import UserHistories
    from tfrec.data.vocab import NUM_RESERVED, Vocabulary
    from tfrec.history.routes import SIDRoutes, model_sid_map
    from tfrec.models.r2led import R2LED

    rng = np.random.default_rng(0)
    vocab = Vocabulary([f"it{n}" for n in range(args.route_items)])
    sids = np.full((vocab.size, 3), -1)
    sids[NUM_RESERVED:] = rng.integers(0, 16, (args.route_items, 3))
    keras.utils.set_random_seed(0)
    model = R2LED(vocab.size, sids, sid_codebook_sizes=[16, 16, 16], embedding_dim=32, top_k=16)
    model.compile()
    model.predict({"history_ids": np.array([[2, 3]]), "target_id": np.array([4])}, verbose=0)
    version = export_ctr(model, vocab, folder / "r2led")
    score = tf.saved_model.load(str(version)).signatures["score"]
    signature = Signature.of("score", score.structured_input_signature[1], {})
    routes = SIDRoutes(model_sid_map(sids, vocab.tokens), bucket_size=16, recent=32, model="r2led")
    stateful = open_store(f"sqlite://{folder / 'routes.db'}")
    stateful.set_routes(routes)
    plain = open_store(f"sqlite://{folder / 'plain.db'}")
    tokens = vocab.tokens
    curve = []
    for length in args.route_lengths:
        user = f"h{length}"
        events = [Event(user, tokens[int(rng.integers(len(tokens)))], t, 1.0, f"e{t}") for t in range(length)]
        for start in range(0, length, 1000):
            stateful.append(events[start:start + 1000])
            plain.append(events[start:start + 1000])
        point = {"history": length}
        for name, store, model_name in (("stateful", stateful, "r2led"), ("stateless", plain, None)):
            histories = UserHistories(store, history_length=length)
            reads, models, sizes = [], [], []
            for rep in range(args.route_requests + 3):
                candidates = np.array([[tokens[int(i)].encode() for i in rng.integers(len(tokens),
                                                                                     size=args.route_candidates)]],
                                      dtype=object)
                begun = time.perf_counter()
                arrays = histories.replace_user_ids({"user_id": np.array([user.encode()], dtype=object),
                                                     "candidates": candidates,
                                                     "timestamp": np.array([length + 1], np.int64)},
                                                    signature, model=model_name)
                read = time.perf_counter()
                score(**{k: tf.constant(v) for k, v in arrays.items()})
                done = time.perf_counter()
                if rep >= 3:  # warm-up (traces for new shapes)
                    reads.append(read - begun)
                    models.append(done - read)
                    sizes.append(int((arrays["history"] != b"").sum()))
            total = [r + m for r, m in zip(reads, models)]
            point[name] = {"read_ms_p50": round(1e3 * float(np.median(reads)), 3),
                           "model_ms_p50": round(1e3 * float(np.median(models)), 3),
                           "request_ms_p50": round(1e3 * float(np.median(total)), 3),
                           "request_ms_p90": round(1e3 * float(np.percentile(total, 90)), 3),
                           "request_ms_min": round(1e3 * float(np.min(total)), 3),
                           "events_to_model_mean": round(float(np.mean(sizes)), 1)}
            appends = []
            for i in range(args.route_appends):
                event = Event(user, tokens[int(rng.integers(len(tokens)))], length + 10 + i, 1.0, f"x{name}{i}")
                begun = time.perf_counter()
                store.append([event])
                appends.append(time.perf_counter() - begun)
            point[name]["append_ms_p50"] = round(1e3 * float(np.median(appends)), 3)
        curve.append(point)
        print(json.dumps({"routes": point}), flush=True)
    stateful.close()
    plain.close()
    flat = [p["stateful"]["request_ms_p50"] for p in curve]
    best = [p["stateful"]["request_ms_min"] for p in curve]  # the least disturbed by other work on the machine
    at = {p["history"]: p for p in curve}
    result = {"model": "R2LED, untrained, exported (export_ctr), 3 SID levels x 16 codes, top_k 16, dim 32",
              "items": args.route_items, "candidates": args.route_candidates, "bucket_size": 16, "recent": 32,
              "store": "SQLite, synchronous FULL", "requests_per_point": args.route_requests, "curve": curve,
              "stateful_max_over_min": round(max(flat) / min(flat), 3),
              "stateful_max_over_min_of_best": round(max(best) / min(best), 3)}
    if 1024 in at:
        result["at_1024"] = {"stateful_ms": at[1024]["stateful"]["request_ms_p50"],
                             "stateless_ms": at[1024]["stateless"]["request_ms_p50"],
                             "stateful_best_ms": at[1024]["stateful"]["request_ms_min"],
                             "stateless_best_ms": at[1024]["stateless"]["request_ms_min"]}
    return result


def write_reports(report, out):
    """Write `report` as `out` (a .json path, or a folder: `history_store.json` in it), its `.md` and the
    route cost plot (`benchmarks/redraw.py` calls it with the folder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from _plots import save_plot

    out = Path(out)
    out = out / "history_store.json" if out.is_dir() else out
    out.write_text(json.dumps(report, indent=2) + "\n")
    s = report["settings"]
    lines = ["# History store (issue 22)", "",
             f"`benchmarks/history_store.py`; {report['cpus']} CPUs shared with other work, load average "
             f"{report['loadavg_before'][0]:.1f} before, {report['loadavg_after'][0]:.1f} after (1-minute). "
             f"Reads: `recent(user, {s['history']})`, threads in one process.", "",
             "| backend | appends/s single | appends/s batched | read p50 / p99 ms at 1 | at 8 | at 32 |",
             "|---|---|---|---|---|---|"]
    for b in report["backends"]:
        a = b["appends_per_second"]
        cells = [f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}" for r in b["reads"]]
        batched = a[f"batched_{s['batch']}"]
        lines.append(f"| {b['backend']} | {a['single']} | {batched} | " + " | ".join(cells) + " |")
    serve = report["serve"]
    served = [("server defaults", serve)] + [(label, report[key]) for key, label in (
        ("serve_tuned", "tuned"), ("serve_64_threads", "64 gRPC threads")) if report.get(key)]
    lines += ["", "## recommend by user id (real exported model)", "",
              f"`tfrec serve --history_store sqlite://...` (FULL), `{serve['model']}`, {serve['users']} real users "
              f"(histories of {serve['user_history_events']['mean']} events on average, at most "
              f"{serve['user_history_events']['max']}), gRPC `recommend` at 8 callers; server defaults, and "
              "tuned = the serving benchmark's batching configuration (`" + " ".join(TUNED_FLAGS) + "`), and "
              "the defaults with `--grpc_max_threads 64` (the former default; the default is now 4 per CPU, "
              "TF Serving's). Server CPU = the server process's CPU seconds over the rounds per request:", "",
              "| server | request | requests | p50 ms | p99 ms | p99 ms per round | requests/s | server CPU ms/request "
              "| errors |",
              "|---|---|---|---|---|---|---|---|---|"]
    for label, run in served:
        for name in ("by_user_id", "by_history"):
            r = run[name]
            rounds = " / ".join(f"{p:.1f}" for p in r.get("p99_ms_by_round", []))
            lines.append(f"| {label} | {name} | {r['requests']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {rounds} "
                         f"| {r['requests_per_second']} | {r.get('server_cpu_ms_per_request', '')} | {r['errors']} |")
    verdicts = ", ".join(f"{label} **{'met' if run['by_user_id']['p99_ms'] <= run['target_p99_ms'] else 'MISSED'}**"
                         f" ({run['by_user_id']['p99_ms']:.1f} ms)" for label, run in served)
    one_id, one_h, read = serve["by_user_id_1_caller"], serve["by_history_1_caller"], serve["store_read_1_caller"]
    lines += ["", f"Target p99 <= 25 ms by user id at 8 callers: {verdicts}. Where the time goes (server "
              "defaults), one caller "
              f"(no contention): by user id p50 {one_id['p50_ms']:.2f} ms / p99 {one_id['p99_ms']:.2f} ms, the same "
              f"histories sent explicitly p50 {one_h['p50_ms']:.2f} ms / p99 {one_h['p99_ms']:.2f} ms (the model and "
              f"the server without the store); the store read alone (`recent_items`, in-process) p50 "
              f"{read['p50_ms']:.3f} ms / p99 {read['p99_ms']:.3f} ms. At 8 callers on 2 shared cores the "
              "requests queue for CPU: the p99 there is mostly waiting, not work."]
    k, r = report["kill9"], report["redis_restart"]
    lines += ["", "## Durability", "",
              f"- `kill -9` of the server while 2 clients posted events: {k['acknowledged_events']} events "
              f"acknowledged, **{k['lost']} lost** ({k['stored']} stored: the in-flight ones may be kept too).",
              f"- Redis ({r['persistence']}) `kill -9` after {r['acknowledged_events']} acknowledged events, restarted "
              f"on the same folder: **{r['lost']} lost**, answering again after {r['restart_seconds']} s."]
    cold = report.get("cold_items")
    if cold:
        swap = cold["seconds_add_to_recommendable"]
        lines += ["", "## New items without retraining (item 5, serving side)", "",
                  f"`tfrec items add` writes a delta file; `export.delta_retrieval` merges it into {cold['retrieval']} "
                  f"at query time (brute force over the delta, re-read every {swap['reload_seconds']} s at most). Items "
                  f"made the best answer of a real user's query: recommendable {swap['mean']} s after the add on "
                  f"average (at most {swap['max']} s); **{cold['failed_requests_during_swaps']} failed "
                  "requests** from 2 clients querying throughout the swaps. `retrieve` p50 / p99 ms, one caller:", "",
                  "| model | p50 | p99 |", "|---|---|---|"]
        for name in ("base", "live_empty_delta", "live_1000_delta"):
            lines.append(f"| {name} | {cold[name]['p50_ms']:.2f} | {cold[name]['p99_ms']:.2f} |")
        lines += ["", "Recall@10 / NDCG@10 of held-out Beauty items added at serve time, DMESR against ID-only: "
                  "`benchmarks/new_items.py` (reports/new_items.md)."]
    routes = report["routes"]
    lines += ["", "## Stateful R2LED routes (item 4)", "",
              f"{routes['model']}; {routes['items']} items, {routes['candidates']} candidates per `score` request, "
              f"buckets of {routes['bucket_size']} + the {routes['recent']} most recent events; {routes['store']}; "
              f"median of {routes['requests_per_point']} requests (read = the server's `replace_user_ids`, model = "
              "the SavedModel's `score`).", "",
              "| history | stateful read / model / total ms (best) | events to model | append ms | "
              "stateless read / model / total ms (best) | events to model | append ms |",
              "|---|---|---|---|---|---|---|"]
    for p in routes["curve"]:
        a, b = p["stateful"], p["stateless"]
        lines.append(f"| {p['history']} | {a['read_ms_p50']:.2f} / {a['model_ms_p50']:.2f} / {a['request_ms_p50']:.2f} "
                     f"({a.get('request_ms_min', float('nan')):.2f}) | {a['events_to_model_mean']} | "
                     f"{a['append_ms_p50']:.2f} | {b['read_ms_p50']:.2f} / {b['model_ms_p50']:.2f} / "
                     f"{b['request_ms_p50']:.2f} ({b.get('request_ms_min', float('nan')):.2f}) | "
                     f"{b['events_to_model_mean']} | {b['append_ms_p50']:.2f} |")
    at = routes.get("at_1024", {})
    lines += ["", f"Stateful cost, largest over smallest from {routes['curve'][0]['history']} to "
              f"{routes['curve'][-1]['history']}: {routes['stateful_max_over_min']}x at p50, "
              f"{routes.get('stateful_max_over_min_of_best')}x on the best of each point (target <= 1.5x; medians "
              "move with the other work on the machine, the best request less so); at 1,024: stateful "
              f"{at.get('stateful_ms')} ms against stateless {at.get('stateless_ms')} ms at p50, "
              f"{at.get('stateful_best_ms')} against {at.get('stateless_best_ms')} ms best (target: below). The read "
              "column is what grows with the history when stateless; the events the stateful route sends to the "
              "model level off once the buckets are full (at most candidates x levels x bucket + recent). "
              "Append ms: one event per `append` call to that user, with its buckets (stateful: one row per SID "
              "level more, trimmed in the same transaction) and without (stateless).", "",
              "p99 at 8 and 32 callers is dominated by CPU contention (2 shared cores, the load average above); "
              "rerun on an idle machine for clean figures."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["history"] for p in routes["curve"]]
    for name, style in (("stateful", "o-"), ("stateless", "s--")):
        ax.plot(xs, [p[name]["request_ms_p50"] for p in routes["curve"]], style, label=f"{name} (read + model)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("user history (events)")
    ax.set_ylabel("ms per score request (p50)")
    ax.set_title("R2LED score by user id: stateful routes vs whole history")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_plot(fig, out.parent / "history_store_routes.png", out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "reports" / "history_store.json"))
    parser.add_argument("--single", type=int, default=300, help="events appended one per call")
    parser.add_argument("--batched", type=int, default=5000, help="events appended in batches")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--users", type=int, default=50, help="users of the read set and of the serve run")
    parser.add_argument("--history", type=int, default=256, help="events per read (and per user)")
    parser.add_argument("--reads", type=int, default=800, help="reads per concurrency level (split over callers)")
    parser.add_argument("--servables", default=str(ROOT / "artifacts" / "main" / "servables"),
                        help="exported models of scripts/main.sh (the recommender is served)")
    parser.add_argument("--prepared", default=str(ROOT / "artifacts" / "prepared" / "amazon-beauty"))
    parser.add_argument("--serve_requests", type=int, default=800, help="recommend requests per mode and round")
    parser.add_argument("--serve_rounds", type=int, default=3, help="rounds of --serve_requests per mode (pooled)")
    parser.add_argument("--route_items", type=int, default=5000)
    parser.add_argument("--route_candidates", type=int, default=8)
    parser.add_argument("--route_requests", type=int, default=30)
    parser.add_argument("--route_appends", type=int, default=20)
    parser.add_argument("--route_lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    args = parser.parse_args()
    report = {"loadavg_before": os.getloadavg(), "cpus": os.cpu_count(), "settings": vars(args), "backends": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for name in ("sqlite-full", "sqlite-normal"):
            report["backends"].append(measure(name, f"sqlite://{folder / (name + '.db')}", args))
        for name, aof in (("redis", False), ("redis-aof-always", True)):
            (folder / name).mkdir()
            with redis_server(folder / name, appendonly=aof) as (url, _):
                report["backends"].append(measure(name, url, args))
        report["serve"] = serve_by_user(folder, args)
        report["serve_tuned"] = serve_by_user(folder, args, TUNED_FLAGS, "tuned")
        report["serve_64_threads"] = serve_by_user(folder, args, ("--grpc_max_threads", "64"), "threads64")
        report["kill9"] = kill9(folder)
        report["redis_restart"] = redis_restart(folder)
        report["cold_items"] = cold_items(folder, args)
        report["routes"] = route_cost(folder, args)
    report["loadavg_after"] = os.getloadavg()
    report["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    write_reports(report, out)
    print(f"wrote {out}, {out.with_suffix('.md')} and {out.parent / 'history_store_routes.png'}")


if __name__ == "__main__":
    main()

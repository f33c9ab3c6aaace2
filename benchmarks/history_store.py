"""History store costs (issue 22, phase A): appends/s and read latency per backend.

For each backend (SQLite in WAL with synchronous=FULL, the default; SQLite with
NORMAL; Redis without persistence and with AOF `appendfsync always`, started
here on a free loopback port):

- `appends_per_second.single`: one event per `append` call (one transaction each),
  from one caller; `.batched`: `--batch` events per call;
- `reads`: `recent(user, --history)` at 1 / 8 / 32 concurrent callers (threads, as
  in the server) over `--users` users holding `--history` events each: p50 / p99 /
  mean ms and reads/s;
- `serve` (SQLite, FULL): a `tfrec serve --history_store` subprocess with the toy
  model of `export.server.testing` (signature `tokens`, nearly free, so the figures
  are the server's and the store's cost, not a recommender's): gRPC Predict p50 / p99
  at 8 callers by `user_id` and by the same history sent explicitly;
- `loadavg`: `os.getloadavg()` before and after (the machine is shared: read the
  figures with it).

A small run (not a test):

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

from _serving_load import percentiles_ms  # noqa: E402
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


def serve_by_user(folder, args):
    """p50/p99 of by-user-id and by-history Predict at 8 callers against a `tfrec serve` subprocess."""
    import urllib.request

    import grpc
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from _serving_load import ServeProcess, closed_loop, write_models_config
    from export.server.testing import save_toy_model

    save_toy_model(str(folder / "toy" / "1"))
    config = write_models_config(folder / "models.config", [("toy", folder / "toy", "tensorflow")])
    url = f"sqlite://{folder / 'served.db'}"
    flags = ["--history_store", url, "--history_length", str(args.history)]
    with ServeProcess(config, folder / "serve.log", flags) as server:
        server.wait_available(["toy"])
        for u in range(args.users):
            body = {"events": [{"user": f"r-{u}", "item": f"item-{i}", "timestamp": i, "event_id": f"e{i}"}
                               for i in range(args.history)]}
            request = urllib.request.Request(server.rest_url + "/v1/events", data=json.dumps(body).encode())
            with urllib.request.urlopen(request, timeout=60) as response:
                assert json.loads(response.read())["appended"] == args.history

        def request(**inputs):
            req = predict_pb2.PredictRequest()
            req.model_spec.name, req.model_spec.signature_name = "toy", "tokens"
            for name, value in inputs.items():
                req.inputs[name].CopyFrom(tf.make_tensor_proto(value))
            return req

        history = np.array([[f"item-{i}".encode() for i in range(args.history)]], dtype=object)
        by_id = [request(user_id=np.array([f"r-{u}".encode()], dtype=object)) for u in range(args.users)]
        by_history = [request(history=history)]
        result = {"model": "toy (export.server.testing)", "callers": 8, "history": args.history}
        with grpc.insecure_channel(server.address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for name, requests in (("by_user_id", by_id), ("by_history", by_history)):
                closed_loop(stub, requests, 8, 40)  # warm-up
                run = closed_loop(stub, requests, 8, args.reads)
                result[name] = {"requests": len(run["latencies"]), "errors": run["errors"],
                                **percentiles_ms(run["latencies"])}
    print(json.dumps(result), flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "reports" / "history_store.json"))
    parser.add_argument("--single", type=int, default=300, help="events appended one per call")
    parser.add_argument("--batched", type=int, default=5000, help="events appended in batches")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--users", type=int, default=50, help="users of the read set")
    parser.add_argument("--history", type=int, default=256, help="events per read (and per user)")
    parser.add_argument("--reads", type=int, default=800, help="reads per concurrency level (split over callers)")
    args = parser.parse_args()
    report = {"loadavg_before": os.getloadavg(), "cpus": os.cpu_count(), "settings": vars(args), "backends": []}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for name in ("sqlite-full", "sqlite-normal"):
            report["backends"].append(measure(name, f"sqlite://{folder / (name + '.db')}", args))
        for name, aof in (("redis", False), ("redis-aof-always", True)):
            (folder / name).mkdir()
            with redis_server(folder / name, appendonly=aof) as (url, _):
                report["backends"].append(measure(name, url, args))
        report["serve"] = serve_by_user(folder, args)
    report["loadavg_after"] = os.getloadavg()
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# History store (issue 22, phase A)", "",
             f"`benchmarks/history_store.py`; {report['cpus']} CPUs shared with other work, load average "
             f"{report['loadavg_before'][0]:.1f} before, {report['loadavg_after'][0]:.1f} after. "
             f"Reads: `recent(user, {args.history})`, threads in one process.", "",
             "| backend | appends/s single | appends/s batched | read p50 / p99 ms at 1 | at 8 | at 32 |",
             "|---|---|---|---|---|---|"]
    for b in report["backends"]:
        a = b["appends_per_second"]
        cells = [f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}" for r in b["reads"]]
        lines.append(f"| {b['backend']} | {a['single']} | {a[f'batched_{args.batch}']} | " + " | ".join(cells) + " |")
    serve = report["serve"]
    lines += ["", f"`tfrec serve --history_store sqlite://...` (FULL), toy model, gRPC Predict at 8 callers, "
              f"history {args.history}: by `user_id` p50 {serve['by_user_id']['p50_ms']:.2f} ms / p99 "
              f"{serve['by_user_id']['p99_ms']:.2f} ms ({serve['by_user_id']['errors']} errors); the same history "
              f"sent explicitly p50 {serve['by_history']['p50_ms']:.2f} ms / p99 {serve['by_history']['p99_ms']:.2f} ms.",
              "", "p99 at 8 and 32 callers is dominated by CPU contention (2 shared cores, the load average "
              "above); SQLite reads use a pool of 8 connections per process."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

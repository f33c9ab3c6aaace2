"""History store costs (issue 22, phase A): appends/s and read latency per backend.

For each backend (SQLite in WAL with synchronous=FULL, the default; SQLite with
NORMAL; Redis without persistence and with AOF `appendfsync always`, started
here on a free loopback port):

- `appends_per_second.single`: one event per `append` call (one transaction each),
  from one caller; `.batched`: `--batch` events per call;
- `reads`: `recent(user, --history)` at 1 / 8 / 32 concurrent callers (threads, as
  in the server) over `--users` users holding `--history` events each: p50 / p99 /
  mean ms and reads/s;
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
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

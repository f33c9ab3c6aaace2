"""Benchmark (not a test): model-server latency and throughput over loopback gRPC, batching off and on.

The server is a `tfrec serve` subprocess (what users run; started as
`scripts/main.sh` starts it: a generated `models.config`, `--port 0`, the
address read from its `tfrec serve: gRPC on ...` line), serving every model the
chosen endpoints need. This process is the load generator: a closed loop of
`concurrency` threads, each sending blocking `PredictionServiceStub.Predict`
calls (the stock stub of `export.client.PredictClient`) over one shared gRPC
channel, the next request as soon as its previous answer arrived. Every
request carries ONE user (batch 1), so any merging of concurrent callers is
the server's batching. Requests are built once, before timing
(`PredictClient.request`), and cycle over `--users` real users.

Endpoints (`--endpoints`):
- `recommend`: the Beauty DMESR-SASRec recommender of the main job
  (`bash scripts/main.sh` -> `artifacts/main/servables/recommender`), signature
  `recommend`; a request = a real Beauty user's history minus its last item
  (as `tfrec ask` sends it), `exclude_history` False.
- `score`: the R2LED ranker of `configs/r2led_ml1m.yaml` on movielens-1m-subset
  (`tfrec ctr export`), signature `score`; a request = a real ML-1M user's history
  minus its last item (the most recent `model.max_history` items) with each item's
  rating, click and time (from the interactions), the request time (the held-out
  item's) and the user token, + 100 candidates (the held-out item and 99 seeded
  random items outside the history).
- `two_stage`: `export.two_stage` over ML-1M models (DMESR-SASRec of
  `configs/dmesr_sasrec_ml1m.yaml` `user_embedding` -> ScaNN retrieval -> the
  R2LED ranker, 100 candidates, top 10), signature `recommend`; requests = the
  `score` histories. Retrieval is exported with `--k` = candidates +
  `max_history`, so the 100 candidates survive dropping every history item, and
  with enough ScaNN leaves searched to hold that many items (`scann_leaves`);
  `--two-stage-retrieval bruteforce` uses the exact stock-op servable instead
  (`--sequential-config configs/sasrec_ml1m.yaml`: an ID-only first stage).

The ML-1M models are built into `--root` (git-ignored) when missing, or always
with `--build`, by the CLI steps a user would run: `tfrec prepare`, `tfrec train`
+ `tfrec export --scann --k ...` (configs/dmesr_sasrec_ml1m.yaml, after `tfrec
encode` of its semantic store), `tfrec ctr encode`
(only if the semantic store is missing), `tfrec ctr train` + `tfrec ctr export`
(configs/r2led_ml1m.yaml), with short wall-time budgets (flags).

Per server configuration (batching off, then `--enable_batching` with
`--pad_variable_length_inputs --max_padding_ratio 2`, since histories differ in
length: rows of a batch at most 2x apart in length), endpoint and
concurrency: `--warmup` untimed requests at that concurrency, then `--requests`
timed ones (default max(800, 25 x concurrency)). Latency = client wall time of
one `Predict` (p50 / p99 / mean of the successful ones); QPS = successful
requests / wall time of the timed phase. Also recorded: CPU seconds of this
process (the client) and of the server during the timed phase (client and
server share the machine's cores: at high concurrency the client takes a
visible share), and the server's batch sizes (its Prometheus
`tfrec_serving_batch_size` histogram, read over REST before and after).

Writes (after each server configuration, so an interruption keeps results):
- `serving.json`: `{"machine", "settings", "servables", "runs": [{"endpoint",
  "dataset", "model", "signature", "batching", "concurrency", "repeat",
  "requests", "errors", "p50_ms", "p99_ms", "mean_ms", "qps", ...}], "summary":
  [the same keys per (endpoint, batching, concurrency): medians over the
  `--repeats` (default 3, server configurations interleaved), plus "repeats",
  "qps_range", "p99_range"], "target"}`; `target` (computed on `summary`) =
  the issue's goals: `recommend` p99 <= 20 ms at concurrency 8 (met = with
  batching on, the configuration one deploys; both values shown) and batching
  raising QPS over unbatched, per endpoint@concurrency;
- `serving.md`: the tables and the verdicts;
- `serving_qps_p99.png`: QPS and p99 vs concurrency per endpoint, batched vs unbatched.

Usage (from the repository root):
    .venv/bin/python benchmarks/serving.py [--endpoints recommend score two_stage] [--concurrency 1 8 32]
        [--requests N] [--quick] [--build] [--out reports] [--root artifacts/benchmarks/serving]
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from _plots import save_plot  # noqa: E402
from _serving_load import BATCHING, TF_THREADS, TFREC, ServeProcess, measure, server_flags, write_models_config  # noqa: E402,E501

ENDPOINTS = ("recommend", "score", "two_stage")
P99_LIMIT_MS = 20.0
TARGET_CONCURRENCY = 8
# Served model names (the models.config the benchmark writes).
BEAUTY_RECOMMENDER, ML1M_RECOMMENDER, ML1M_RETRIEVAL, RANKER, TWO_STAGE = (
    "recommender", "ml1m_recommender", "ml1m_retrieval", "ranker", "two_stage")
ML1M = "movielens-1m-subset"
BEAUTY = "amazon-beauty"


# ------------------------------------------------------------------ helpers
def latest_version(base):
    """The highest numbered version folder of a model base path (None if there is none)."""
    versions = [int(p.name) for p in Path(base).glob("*") if p.name.isdigit() and (p / "saved_model.pb").is_file()]
    return max(versions) if versions else None


def servable_info(base):
    """`{"path", "version", "name", "kind", ...}` of a model base path (from its export_metadata.json)."""
    version = latest_version(base)
    meta = {}
    if version is not None and (Path(base) / str(version) / "export_metadata.json").is_file():
        meta = json.loads((Path(base) / str(version) / "export_metadata.json").read_text())
    experiment = meta.get("experiment_config") or {}
    return {"path": str(base), "version": version, "name": experiment.get("name"), "kind": meta.get("kind"),
            "max_history": meta.get("max_history"), "k": meta.get("k"), "index": meta.get("index")}


def run_cli(*args):
    """Run `tfrec <args>` from the repository root; a failure stops the benchmark naming the step."""
    command = [str(TFREC), *map(str, args)]
    print("$ " + " ".join(command), flush=True)
    begun = time.time()
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                                                  "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise SystemExit(f"build step failed (exit {done.returncode}): {' '.join(command)}")
    return time.time() - begun


# ------------------------------------------------------------ ML-1M models
def ml1m_paths(root):
    root = Path(root)
    servables = root / "servables"
    return {"prepared": root / "prepared" / ML1M, "runs": root / "runs", "servables": servables,
            "recommender": servables / "recommender", "retrieval_bruteforce": servables / "retrieval_bruteforce",
            "retrieval_scann": servables / "retrieval_scann", "ranker": servables / "ranker"}


def build_ml1m(args, force):
    """Prepare ML-1M and train + export the sequential recommender (+ retrieval) and the R2LED ranker.

    Each step runs when its output is missing (or always with `force`);
    returns `{step: seconds}` of the steps that ran.
    """
    from tfrec.config import load_config
    from tfrec.ctr import load_ctr_config

    paths = ml1m_paths(args.root)
    ctr = load_ctr_config(args.ctr_config)
    steps = {}
    if force or not (paths["prepared"] / "metadata.json").is_file():
        steps["prepare"] = run_cli("prepare", "--dataset", ML1M, "--out", paths["prepared"])
    runs = f"output_dir={paths['runs']}"
    sasrec_missing = (latest_version(paths["recommender"]) is None
                      or latest_version(paths[f"retrieval_{args.two_stage_retrieval}"]) is None)
    if "two_stage" in args.endpoints and (force or sasrec_missing):
        budget = [f"train.max_train_seconds={args.train_seconds}"] if args.train_seconds is not None else []
        semantic = []
        if load_config(args.sequential_config).model.item_encoder == "dmesr":  # its store follows this vocabulary
            store_dir = Path(args.root) / "semantics" / ML1M
            if force or not (store_dir / "LATEST").is_file():
                steps["encode"] = run_cli("encode", "--prepared", paths["prepared"], "--dataset", ML1M,
                                          "--out", store_dir)
            semantic = [f"dmesr.store_path={store_dir}"]
        steps["train_sequential"] = run_cli("train", "--config", args.sequential_config, runs, *semantic, *budget)
        for name in ("recommender", "retrieval_bruteforce", "retrieval_scann"):
            shutil.rmtree(paths[name], ignore_errors=True)
        k = retrieval_k(args, ctr.model.max_history)
        num_items = json.loads((paths["prepared"] / "metadata.json").read_text())["num_items"]
        leaves, searched = scann_leaves(num_items, k)
        steps["export_sequential"] = run_cli("export", "--config", args.sequential_config, "--out",
                                             paths["servables"], "--k", k, "--scann", "--scann-num-leaves", leaves,
                                             "--scann-leaves-to-search", searched, runs, *semantic)
    store = Path(ctr.sids.store_path)
    store = store if store.is_absolute() else ROOT / store
    if not (store / "LATEST").is_file():
        steps["ctr_encode"] = run_cli("ctr", "encode", "--config", args.ctr_config)
    if force or latest_version(paths["ranker"]) is None:
        overrides = [runs, f"train.max_train_seconds={args.ctr_train_seconds}"]
        if args.ctr_steps_per_epoch is not None:
            overrides.append(f"train.steps_per_epoch={args.ctr_steps_per_epoch}")
        steps["ctr_train"] = run_cli("ctr", "train", "--config", args.ctr_config, *overrides)
        shutil.rmtree(paths["ranker"], ignore_errors=True)
        steps["ctr_export"] = run_cli("ctr", "export", "--config", args.ctr_config, "--out", paths["servables"], runs)
    return steps


def scann_leaves(num_items, k):
    """`(num_leaves, leaves_to_search)` for a ScaNN index that must return `k` items.

    ScaNNIndex's default leaves (sqrt(n)) but, instead of its default tenth, enough
    leaves searched to hold about twice `k` items: a search over fewer leaves holds
    fewer than `k` items, and the two-stage would get fewer candidates.

    >>> scann_leaves(3600, 1124)
    (60, 38)
    """
    import math

    leaves = max(1, round(math.sqrt(num_items)))
    return leaves, min(leaves, max(1, math.ceil(leaves * 2 * k / num_items)))


def retrieval_k(args, max_history):
    """Items the retrieval servable returns: candidates + the history items the two-stage drops."""
    return args.retrieval_k if args.retrieval_k is not None else args.candidates + int(max_history)


# ----------------------------------------------------------------- requests
def sequences(prepared_dir, with_times=False):
    """`([item tokens of each user, oldest first], item tokens)` of a prepared dataset (`tfrec prepare`);
    with `with_times`, also `[user token of each sequence]` and `[timestamps of each sequence]`."""
    from tfrec.data.preprocess import load_prepared

    data = load_prepared(prepared_dir)
    out = [data.item_vocab.to_tokens(seq) for seq in data.sequences], list(data.item_vocab.tokens)
    return (*out, list(data.user_vocab.tokens), data.timestamps) if with_times else out


def interaction_feedback(dataset, data_root=None):
    """`{(user, item, timestamp): (rating, label)}` of a bundled dataset's interactions: the feedback
    the ranker's `score` takes beside each history item (rating 0 = none)."""
    from tfrec.data.readers import load_dataset

    frame = load_dataset(dataset, data_root).interactions
    if "label" not in frame:
        raise ValueError(f"dataset {dataset} has no click labels for the ranker's history_labels")
    ratings = frame["rating"].fillna(0.0).to_numpy(float) if "rating" in frame else np.zeros(len(frame))
    keys = zip(frame["user_id"].astype(str), frame["item_id"].astype(str), frame["timestamp"].astype(int))
    return dict(zip(keys, zip(ratings.tolist(), frame["label"].to_numpy(float).tolist())))


def ranker_inputs(user, history, times, request_time, feedback):
    """The ranker's feedback inputs of one history (batch 1); `KeyError` naming an event without feedback."""
    try:
        rated = [feedback[(user, item, int(t))] for item, t in zip(history, times)]
    except KeyError as err:
        raise KeyError(f"no rating/label for event {err.args[0]} in the dataset's interactions") from None
    return {"history_ratings": [[r for r, _ in rated]], "history_labels": [[label for _, label in rated]],
            "history_timestamps": [[int(t) for t in times]], "timestamp": [int(request_time)], "user": [user]}


def pick_users(histories, count, seed):
    """Indices of `count` seeded random users with at least 2 items (history + held-out)."""
    eligible = [u for u, items in enumerate(histories) if len(items) >= 2]
    rng = np.random.default_rng(seed)
    return rng.choice(eligible, size=min(count, len(eligible)), replace=False).tolist()


def endpoint_inputs(endpoint, prepared_dir, num_users, seed, max_history=None, num_candidates=100,
                    feedback=None):
    """`(inputs per request, description)`: one user per request (batch 1), held-out last item removed.

    `score` / `two_stage` requests carry the ranker's feedback inputs: each history item's rating and
    click from `feedback` (`interaction_feedback`), its time, the request time = the held-out item's
    time, and the user token."""
    seqs, items, users, stamps = sequences(prepared_dir, with_times=True)
    chosen = pick_users(seqs, num_users, seed)
    rng = np.random.default_rng([seed, 1])
    out, lengths = [], []
    for u in chosen:
        history, held_out = seqs[u][:-1], seqs[u][-1]
        times = stamps[u][:-1]
        if max_history is not None:
            history, times = history[-int(max_history):], times[-int(max_history):]
        lengths.append(len(history))
        ranked = {} if endpoint == "recommend" else ranker_inputs(users[u], history, times, stamps[u][-1], feedback)
        if endpoint == "recommend":
            out.append({"history": [history], "exclude_history": [False]})
        elif endpoint == "score":
            seen = set(history) | {held_out}
            pool = [t for t in items if t not in seen]
            others = rng.choice(len(pool), size=min(num_candidates - 1, len(pool)), replace=False)
            out.append({"history": [history], "candidates": [[held_out, *(pool[i] for i in others)]], **ranked})
        else:
            out.append({"history": [history], **ranked})
    lengths = np.asarray(lengths)
    description = {"prepared": str(prepared_dir), "users": len(chosen), "seed": seed,
                   "history_length": {"mean": float(lengths.mean()), "p50": float(np.median(lengths)),
                                      "max": int(lengths.max())},
                   "history": "a real user's prepared sequence minus its last item (held out for checks)"
                              + (f", its most recent {max_history} items" if max_history is not None else "")}
    if endpoint == "score":
        description["candidates"] = f"{num_candidates}: the held-out item + seeded random items outside the history"
    if endpoint != "recommend":
        description["feedback"] = ("each history item's rating and click from the interactions, its timestamp; "
                                   "request time = the held-out item's; the user token")
    return out, description


# ------------------------------------------------------------------ reports
def machine_info():
    import platform

    cpu = ""
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    try:
        import grpc

        grpc_version = grpc.__version__
    except ImportError:
        grpc_version = None
    return {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "cpu": cpu or platform.processor(),
            "platform": platform.platform(), "python": platform.python_version(), "grpcio": grpc_version,
            "load_average_at_start": list(os.getloadavg()),
            "note": "client (this process) and server (a `tfrec serve` subprocess) share these cores; other jobs "
                    "may run on the machine too (see the load averages)"}


def summarize(runs):
    """One row per (endpoint, batching, concurrency): medians over the repeats, with the QPS and p99 ranges.

    >>> rows = summarize([{"endpoint": "e", "batching": b, "concurrency": 8, "requests": 10, "errors": 0,
    ...                    "p50_ms": q, "p99_ms": q, "mean_ms": q, "qps": q, "client_cpu_seconds": 0.1,
    ...                    "server_cpu_seconds": 1.0, "server_batches": {}, "repeat": r}
    ...                   for b in (False, True) for r, q in enumerate((3.0, 1.0, 2.0))])
    >>> [(r["batching"], r["qps"], r["qps_range"], r["repeats"], r["requests"]) for r in rows]
    [(False, 2.0, [1.0, 3.0], 3, 30), (True, 2.0, [1.0, 3.0], 3, 30)]
    """
    groups = {}
    for run in runs:
        groups.setdefault((run["endpoint"], run["batching"], run["concurrency"]), []).append(run)

    def median(runs_, key):
        values = [r[key] for r in runs_ if r[key] is not None]
        return None if not values else float(np.median(values))

    rows = []
    for (endpoint, batching, concurrency), group in groups.items():
        first = group[0]
        row = {k: first[k] for k in ("endpoint", "dataset", "model", "signature") if k in first}
        row.update({"batching": batching, "concurrency": concurrency, "repeats": len(group),
                    "requests": sum(r["requests"] for r in group), "errors": sum(r["errors"] for r in group)})
        for key in ("p50_ms", "p99_ms", "mean_ms", "qps", "client_cpu_seconds", "server_cpu_seconds"):
            row[key] = median(group, key)
        for key in ("qps", "p99_ms"):
            values = [r[key] for r in group if r[key] is not None]
            row[f"{key.split('_')[0]}_range"] = [min(values), max(values)] if values else None
        row["server_batches"] = group[-1].get("server_batches") or {}
        rows.append(row)
    return rows


def target_block(runs):
    """The issue's goals: `recommend` p99 <= 20 ms at concurrency 8; batching raises QPS, per endpoint@concurrency."""
    def find(endpoint, batching, concurrency):
        return next((r for r in runs if r["endpoint"] == endpoint and r["batching"] == batching
                     and r["concurrency"] == concurrency), None)

    p99 = {}
    for label, batching in (("batching", True), ("no_batching", False)):
        run = find("recommend", batching, TARGET_CONCURRENCY)
        p99[label] = None if run is None else run["p99_ms"]
    raises = {}
    for run in runs:
        if run["batching"]:
            other = find(run["endpoint"], False, run["concurrency"])
            if other is not None and run["qps"] is not None and other["qps"] is not None:
                raises[f"{run['endpoint']}@{run['concurrency']}"] = bool(run["qps"] > other["qps"])
    batched = p99["batching"]
    return {"recommend_p99_ms_at_concurrency_8": p99, "p99_limit_ms": P99_LIMIT_MS,
            "met": None if batched is None else bool(batched <= P99_LIMIT_MS),
            "met_rule": "recommend p99 at concurrency 8 with batching on (the configuration one deploys) <= "
                        f"{P99_LIMIT_MS:g} ms; null = not measured",
            "batching_raises_qps": raises,
            "batching_raises_qps_at_concurrency_above_1": (
                all(v for k, v in raises.items() if not k.endswith("@1"))
                if any(not k.endswith("@1") for k in raises) else None)}


def write_reports(payload, out):
    from tfrec.metrics import format_metrics_table

    out.mkdir(parents=True, exist_ok=True)
    payload["summary"] = summarize(payload["runs"])
    payload["target"] = target_block(payload["summary"])
    (out / "serving.json").write_text(json.dumps(payload, indent=2))
    settings, machine, target = payload["settings"], payload["machine"], payload["target"]
    batching = settings["batching"]
    lines = [
        "# Model server: latency and QPS over loopback gRPC, batching off and on", "",
        "Written by `benchmarks/serving.py`; do not edit by hand. Server: a `tfrec serve` subprocess; client: a "
        "closed loop of `concurrency` threads in the benchmark process, each sending blocking "
        "`PredictionServiceStub.Predict` calls of ONE user (batch 1) over one shared loopback channel, so "
        "merging is the server's batching. Per level: "
        f"{settings['warmup']} warm-up requests (excluded), then the timed requests; latency = client wall time of "
        "one call, QPS = successful requests / wall time. Batching: "
        f"`--enable_batching --max_batch_size {batching['max_batch_size']} --batch_timeout_micros "
        f"{batching['batch_timeout_micros']}" + (f" --num_batch_threads {batching['num_batch_threads']}"
                                                 if batching['num_batch_threads'] else "")
        + (f" --pad_variable_length_inputs --max_padding_ratio {batching['max_padding_ratio']:g}"
           if batching["pad_variable_length_inputs"] else "") + "`. "
        f"Machine: {machine['usable_cores']} cores ({machine['cpu']}), shared by client and server and by other "
        f"jobs (load average at start {machine['load_average_at_start'][0]:.1f}); `client_cpu` / `server_cpu` = "
        "CPU seconds spent during the timed phase, `batch` = mean rows per batched model call (server metrics). "
        f"Each level ran {settings.get('repeats', 1)} times, the server configurations interleaved (off, on, off, "
        "on, ...; a fresh server each time); the tables, plot and verdicts use the median over the repeats, "
        "`*_range` = min–max. Both configurations run with `--tensorflow_intra_op_parallelism "
        f"{settings['tensorflow_intra_inter_op_parallelism'][0]} --tensorflow_inter_op_parallelism "
        f"{settings['tensorflow_intra_inter_op_parallelism'][1]}`.",
        "",
    ]
    p99 = target["recommend_p99_ms_at_concurrency_8"]

    def ms(value):
        return "n/a" if value is None else f"{value:.1f} ms"

    verdict = "not measured" if target["met"] is None else ("**met**" if target["met"] else "**not met**")
    lines += [f"Target `recommend` p99 <= {P99_LIMIT_MS:g} ms at concurrency {TARGET_CONCURRENCY}: {verdict} "
              f"(batching {ms(p99['batching'])}, no batching {ms(p99['no_batching'])}).", ""]
    if target["batching_raises_qps"]:
        lines += ["Batching raises QPS over unbatched: " + ", ".join(
            f"{k} {'yes' if v else 'no'}" for k, v in target["batching_raises_qps"].items()) + ".", ""]
    for endpoint in dict.fromkeys(r["endpoint"] for r in payload["summary"]):
        rows = [r for r in payload["summary"] if r["endpoint"] == endpoint]
        first = rows[0]
        table = [{"batching": "on" if r["batching"] else "off", "concurrency": r["concurrency"],
                  "repeats": r["repeats"], "requests": r["requests"], "errors": r["errors"],
                  "p50_ms": _round(r["p50_ms"], 1), "p99_ms": _round(r["p99_ms"], 1),
                  "p99_range": _span(r["p99_range"], 1), "mean_ms": _round(r["mean_ms"], 1),
                  "qps": _round(r["qps"], 0), "qps_range": _span(r["qps_range"], 0),
                  "client_cpu_s": r["client_cpu_seconds"],
                  "server_cpu_s": r["server_cpu_seconds"],
                  "batch": ", ".join(f"{k.split('/')[0]} {v['mean_rows']:.1f}" for k, v in r["server_batches"].items())
                  or None}
                 for r in sorted(rows, key=lambda r: (r["concurrency"], r["batching"]))]
        lines += [f"## `{endpoint}`: {first['model']} on {first['dataset']} (signature `{first['signature']}`)", "",
                  f"Requests: {payload['inputs'][endpoint]['history']}"
                  + (f"; candidates: {payload['inputs'][endpoint]['candidates']}"
                     if "candidates" in payload["inputs"][endpoint] else "")
                  + f" ({payload['inputs'][endpoint]['users']} users, history length mean "
                  f"{payload['inputs'][endpoint]['history_length']['mean']:.0f}).", "",
                  format_metrics_table(table), ""]
    (out / "serving.md").write_text("\n".join(lines) + "\n")
    plot(payload["summary"], out / "serving_qps_p99.png", out / "serving.json")


def _round(value, digits):
    return None if value is None else (round(value) if digits == 0 else round(value, digits))


def _span(values, digits):
    return "" if not values else f"{_round(values[0], digits)}–{_round(values[1], digits)}"


def plot(runs, path, source):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    endpoints = list(dict.fromkeys(r["endpoint"] for r in runs))
    if not endpoints:
        return
    levels = sorted({r["concurrency"] for r in runs})
    fig, axes = plt.subplots(len(endpoints), 2, figsize=(11, 3.4 * len(endpoints)), squeeze=False)
    for row, endpoint in zip(axes, endpoints):
        for batching, style in ((False, "o--"), (True, "s-")):
            rows = sorted((r for r in runs if r["endpoint"] == endpoint and r["batching"] == batching),
                          key=lambda r: r["concurrency"])
            if not rows:
                continue
            label = "batching on" if batching else "batching off"
            x = [r["concurrency"] for r in rows]
            row[0].plot(x, [r["qps"] for r in rows], style, label=label)
            row[1].plot(x, [r["p99_ms"] for r in rows], style, label=label)
        if endpoint == "recommend":
            row[1].axhline(P99_LIMIT_MS, color="gray", linestyle=":", label=f"target {P99_LIMIT_MS:g} ms (at c=8)")
        for ax, ylabel in zip(row, ("QPS", "p99 latency (ms)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(c) for c in levels])
            ax.set_ylim(bottom=0)
            ax.set_xlabel("concurrent callers")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{endpoint}: {ylabel}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    save_plot(fig, path, source)  # stamped with the sha256 of `source` (the JSON)


# --------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoints", nargs="+", choices=ENDPOINTS, default=list(ENDPOINTS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32], help="concurrent callers per level")
    parser.add_argument("--requests", type=int, default=None,
                        help="timed requests per level (default max(800, 25 x concurrency); --quick: max(30, 2 x c))")
    parser.add_argument("--tf-threads", nargs=2, type=int, default=list(TF_THREADS), metavar=("INTRA", "INTER"),
                        help="server --tensorflow_intra_op_parallelism / --tensorflow_inter_op_parallelism, both "
                             "configurations (default 1 1: one call = one core; 0 0 = TensorFlow's defaults)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="times each level runs (server configurations interleaved); reports use the median")
    parser.add_argument("--warmup", type=int, default=None, help="untimed requests per level (default 20; quick 5)")
    parser.add_argument("--users", type=int, default=None, help="distinct users the requests cycle over (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: few requests and users (flags still win)")
    parser.add_argument("--batching", nargs="+", choices=("off", "on"), default=["off", "on"],
                        help="server configurations to run (default both)")
    parser.add_argument("--max-batch-size", type=int, default=BATCHING["max_batch_size"])
    parser.add_argument("--batch-timeout-micros", type=int, default=BATCHING["batch_timeout_micros"])
    parser.add_argument("--num-batch-threads", type=int, default=None, help="default: the server's (#CPUs)")
    parser.add_argument("--no-pad", action="store_true",
                        help="batch without --pad_variable_length_inputs (only same-length histories merge)")
    parser.add_argument("--max-padding-ratio", type=float, default=BATCHING["max_padding_ratio"],
                        help="server --max_padding_ratio with padding: merge only histories within this length "
                             "factor (0 = pad to the longest, as TF Serving)")
    parser.add_argument("--out", default=str(ROOT / "reports"))
    parser.add_argument("--root", default=str(ROOT / "artifacts" / "benchmarks" / "serving"),
                        help="ML-1M prepared data, runs and servables (git-ignored)")
    # recommend (Beauty, main job)
    parser.add_argument("--recommender", default=str(ROOT / "artifacts" / "main" / "servables" / "recommender"),
                        help="base path of the Beauty recommender servable (bash scripts/main.sh)")
    parser.add_argument("--beauty-prepared", default=str(ROOT / "artifacts" / "prepared" / BEAUTY))
    # ML-1M build
    parser.add_argument("--build", action="store_true", help="rebuild the ML-1M models even if they exist")
    parser.add_argument("--sequential-config", default="configs/dmesr_sasrec_ml1m.yaml",
                        help="first stage of the two-stage (DMESR by default; configs/sasrec_ml1m.yaml = ID-only)")
    parser.add_argument("--ctr-config", default="configs/r2led_ml1m.yaml")
    parser.add_argument("--train-seconds", type=float, default=None,
                        help="sequential model training budget (default: the config's train.max_train_seconds)")
    parser.add_argument("--ctr-train-seconds", type=float, default=300.0, help="R2LED training budget")
    parser.add_argument("--ctr-steps-per-epoch", type=int, default=None,
                        help="R2LED batches between validations (default: the config's; the budget is checked then)")
    parser.add_argument("--retrieval-k", type=int, default=None,
                        help="retrieval servable k at export (default candidates + the ranker's max_history)")
    parser.add_argument("--two-stage-retrieval", choices=("bruteforce", "scann"), default="scann")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--two-stage-k", type=int, default=10)
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = 5 if args.quick else 20
    if args.users is None:
        args.users = 32 if args.quick else 256
    if min(args.concurrency) < 1 or (args.requests is not None and args.requests < 1) or args.warmup < 0:
        parser.error("--concurrency and --requests must be >= 1, --warmup >= 0")
    if args.users < 1:
        parser.error("--users must be >= 1")
    return args


def requests_per_level(args, concurrency):
    if args.requests is not None:
        return args.requests
    return max(30, 2 * concurrency) if args.quick else max(800, 25 * concurrency)


def served_models(args):
    """`(models for models.config, {endpoint: (model, signature, dataset, description, servable info)})`."""
    paths = ml1m_paths(args.root)
    models, endpoints = [], {}
    if "recommend" in args.endpoints:
        if latest_version(args.recommender) is None:
            raise SystemExit(f"recommend: no recommender servable in {args.recommender}. Run `bash scripts/main.sh` "
                             "(writes artifacts/main/servables/recommender) or pass --recommender PATH.")
        models.append((BEAUTY_RECOMMENDER, args.recommender, "tensorflow"))
        info = servable_info(args.recommender)
        endpoints["recommend"] = (BEAUTY_RECOMMENDER, "recommend", BEAUTY, info["name"], {"recommender": info})
    if {"score", "two_stage"} & set(args.endpoints):
        models.append((RANKER, paths["ranker"], "tensorflow"))
        ranker = servable_info(paths["ranker"])
    if "score" in args.endpoints:
        endpoints["score"] = (RANKER, "score", ML1M, ranker["name"], {"ranker": ranker})
    if "two_stage" in args.endpoints:
        retrieval = paths[f"retrieval_{args.two_stage_retrieval}"]
        models += [(ML1M_RECOMMENDER, paths["recommender"], "tensorflow"),
                   (ML1M_RETRIEVAL, retrieval, "tensorflow")]
        options = (f"recommender={ML1M_RECOMMENDER}&retrieval={ML1M_RETRIEVAL}&ranker={RANKER}"
                   f"&candidates={args.candidates}&k={args.two_stage_k}")
        models.append((TWO_STAGE, f"export.two_stage:factory?{options}", "python"))
        recommender = servable_info(paths["recommender"])
        retrieval_info = servable_info(retrieval)
        name = f"{recommender['name']} -> retrieval_{args.two_stage_retrieval} -> {ranker['name']}"
        endpoints["two_stage"] = (TWO_STAGE, "recommend", ML1M, name,
                                  {"recommender": recommender, "retrieval": retrieval_info, "ranker": ranker,
                                   "candidates": args.candidates, "k": args.two_stage_k})
    return models, endpoints


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    args = parse_args(argv)
    # SIGTERM ends the benchmark like Ctrl-C: the `finally` blocks stop the servers.
    signal.signal(signal.SIGTERM, _interrupt)
    from tfrec.ctr import load_ctr_config

    start = time.time()
    out, root = Path(args.out), Path(args.root)
    payload = {"machine": machine_info()}
    build_seconds = {}
    if {"score", "two_stage"} & set(args.endpoints):
        paths = ml1m_paths(root)
        missing = latest_version(paths["ranker"]) is None or (
            "two_stage" in args.endpoints and (latest_version(paths["recommender"]) is None or
                                               latest_version(paths[f"retrieval_{args.two_stage_retrieval}"]) is None))
        if args.build or missing or not (paths["prepared"] / "metadata.json").is_file():
            print(f"== building the ML-1M models into {root}", flush=True)
            build_seconds = build_ml1m(args, force=args.build)
    models, endpoints = served_models(args)
    max_history = load_ctr_config(args.ctr_config).model.max_history
    inputs, descriptions = {}, {}
    feedback = interaction_feedback(ML1M) if {"score", "two_stage"} & set(args.endpoints) else None
    for endpoint in args.endpoints:
        prepared = args.beauty_prepared if endpoint == "recommend" else ml1m_paths(root)["prepared"]
        if not (Path(prepared) / "metadata.json").is_file():
            raise SystemExit(f"{endpoint}: no prepared data in {prepared} (`tfrec prepare --dataset "
                             f"{BEAUTY if endpoint == 'recommend' else ML1M} --out {prepared}`)")
        inputs[endpoint], descriptions[endpoint] = endpoint_inputs(
            endpoint, prepared, args.users, args.seed, None if endpoint == "recommend" else max_history,
            args.candidates, feedback)
    batching = {"max_batch_size": args.max_batch_size, "batch_timeout_micros": args.batch_timeout_micros,
                "num_batch_threads": args.num_batch_threads, "pad_variable_length_inputs": not args.no_pad,
                "max_padding_ratio": None if args.no_pad else args.max_padding_ratio}
    payload.update({
        "settings": {
            "endpoints": args.endpoints, "concurrency": args.concurrency, "warmup": args.warmup,
            "requests_per_level": {str(c): requests_per_level(args, c) for c in args.concurrency},
            "users": args.users, "seed": args.seed, "quick": args.quick, "batching": batching,
            "server_configurations": args.batching, "repeats": args.repeats,
            "tensorflow_intra_inter_op_parallelism": args.tf_threads, "rows_per_request": 1,
            "load_generator": "closed loop: `concurrency` threads in the benchmark process, each a blocking "
                              "PredictionServiceStub.Predict (requests prebuilt, one shared insecure loopback "
                              "channel), next request when the answer arrives",
            "latency": "client wall time of one Predict; QPS = successful requests / wall time of the timed phase",
            "shared_cores": "client and server run on the same machine and share its cores",
            "server_command": "tfrec serve --model_config_file <root>/models.config --port 0 --rest_api_port 0 "
                              "[batching flags]",
        },
        "servables": {e: spec[4] for e, spec in endpoints.items()},
        "inputs": descriptions, "build_seconds": build_seconds, "runs": [],
    })
    config_path = write_models_config(root / "models.config", models)
    from export.client import PredictClient

    for repeat, mode in [(r, m) for r in range(args.repeats) for m in args.batching]:  # interleaved
        flags = server_flags(args.tf_threads, mode == "on", args.max_batch_size, args.batch_timeout_micros,
                             args.num_batch_threads, None if args.no_pad else args.max_padding_ratio)
        if any(platform == "python" for _, _, platform in models):  # the two-stage composite
            flags += ["--allowed_python_modules", "export.two_stage"]
        print(f"== repeat {repeat + 1}/{args.repeats}, server, batching {mode}: "
              f"{' '.join(map(str, flags)) or '(no flags)'}", flush=True)
        with ServeProcess(config_path, root / f"server_batching_{mode}.log", map(str, flags)) as server:
            server.wait_available([name for name, _, _ in models])
            print(f"   gRPC {server.address}, REST {server.rest_url}", flush=True)
            with PredictClient(server.address) as client:
                for endpoint in args.endpoints:
                    model, signature, dataset, model_name, _ = endpoints[endpoint]
                    requests = [client.request(model, x, signature=signature) for x in inputs[endpoint]]
                    check = [client.predict(model, x, signature=signature) for x in inputs[endpoint][:16]]
                    if endpoint == "two_stage":  # the ranker must see `candidates` items per request
                        counts = [int(c["num_candidates"][0]) for c in check]
                        descriptions[endpoint]["num_candidates_checked"] = {
                            "requests": len(counts), "min": min(counts), "mean": float(np.mean(counts))}
                    for concurrency in args.concurrency:
                        count = requests_per_level(args, concurrency)
                        result = measure(server, client.stub, requests, concurrency, count, args.warmup)
                        run = {"endpoint": endpoint, "dataset": dataset, "model": model_name, "signature": signature,
                               "batching": mode == "on", "concurrency": concurrency, "repeat": repeat, **result}
                        payload["runs"].append(run)
                        print(f"   {endpoint:9s} batching {mode:3s} c={concurrency:3d}: p50 {run['p50_ms']} ms, "
                              f"p99 {run['p99_ms']} ms, {run['qps']} q/s, errors {run['errors']}, "
                              f"batches {run['server_batches'] or '-'}", flush=True)
                    payload["total_seconds"] = round(time.time() - start, 1)
                    write_reports(payload, out)  # partial results survive an interruption
        payload["machine"]["load_average_at_end"] = list(os.getloadavg())
    payload["total_seconds"] = round(time.time() - start, 1)
    write_reports(payload, out)
    target = payload["target"]
    print(f"target recommend p99 <= {P99_LIMIT_MS:g} ms at c={TARGET_CONCURRENCY}: "
          f"{'not measured' if target['met'] is None else 'met' if target['met'] else 'not met'} "
          f"{target['recommend_p99_ms_at_concurrency_8']}; batching raises QPS: {target['batching_raises_qps']}")
    print(f"done in {time.time() - start:.0f}s -> {out}/serving.{{json,md}}, serving_qps_p99.png")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as interrupt:
        raise SystemExit(f"interrupted ({interrupt or 'Ctrl-C'}): the model server was stopped; reports hold the "
                         "endpoints finished so far") from None

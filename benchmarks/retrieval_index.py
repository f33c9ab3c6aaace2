"""Benchmark (not a test): ScaNN vs exact (brute-force) retrieval, recall@10 and queries/s.

Indexes are the serving ones of `tfrec/serving/retrieval.py`: `BruteForceIndex` (TF matmul
+ `top_k`, exact) and `ScaNNIndex` (tree + anisotropic hashing + exact re-ordering),
both called through their `retrieve` signature (the function an exported
retrieval servable runs: queries in, item tokens + scores out). k = 10.

Catalogs (`--sizes`, `--skip-beauty`):
- `beauty`: the scoring table (`export.saved_model.catalog_table`) of the trained
  model of `--beauty-config` (default `configs/sasrec_beauty.yaml`, found as
  `tfrec export` finds it, or `--beauty-model PATH`), ~12k items; queries = the
  model's `user_embedding` of test histories (each evaluated user's sequence minus
  its last item, the last `model.max_length` items) of randomly chosen users.
- `synthetic-<N>`: N items from a seeded clustered Gaussian mixture in 64-d
  (anisotropic spectrum, uneven cluster sizes, log-normal item norms so that
  maximum inner product differs from nearest neighbour, as with trained
  popularity-aware embeddings); queries from the same mixture (see
  `synthetic_catalog`; the parameters are written to the JSON). The mixture is
  the same for every N, only the number of items drawn from it changes.

Per catalog: the brute-force index, then one ScaNN index per tuning (`--tunings`,
`leaves:search:reorder` with leaves a multiple of sqrt(N), search a fraction of
the leaves, reorder the re-ordered candidates; `default` = `ScaNNIndex`'s own
defaults). Recall@10 = overlap of ScaNN's top 10 with brute force's top 10 on
`--num-queries` queries (`tfrec.serving.retrieval.recall_at_k`). Throughput: for each
`--batch-sizes` (1 = one request per call, online serving; 256 = a batched
serving/offline call), the same queries are sent in batches of that size after
`--warmup` untimed batches; queries/s = queries / wall time of one pass (median
over `--repeats` passes; outputs fetched with `.numpy()`). Build time = the index
constructor (for ScaNN: tree training, quantiser training, hashing).

Writes (partial reports after every catalog):
- `scann.json`: `{"machine", "setup", "catalogs", "records": [{"catalog", "num_items",
  "dim", "index", "tuning", "recall@10", "queries_per_second",
  "speedup_vs_bruteforce", "build_seconds", "query_batch_size"}], "target"}`;
  `target` = the issue's goal at 1M items (recall@10 >= 0.95 at >= 5x brute-force
  queries/s), met or not per batch size, with the figures;
- `scann.md`: one table per catalog, the target verdict;
- `scann_recall_qps.png`: recall@10 vs queries/s per catalog, one panel per batch size.

Usage (from the repository root, where the configs' relative paths resolve):
    .venv/bin/python benchmarks/retrieval_index.py [--skip-beauty | --beauty-model PATH]
        [--sizes 100000 1000000] [--tunings default 1:0.2:250 ...] [--batch-sizes 1 256]
        [--quick] [--out reports]
"""

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from _plots import save_plot  # noqa: E402
from tfrec.metrics import format_metrics_table  # noqa: E402

K = 10
DIM = 64
TARGET = {"catalog": "synthetic-1m", "min_recall@10": 0.95, "min_speedup_vs_bruteforce": 5.0}
DEFAULT_SIZES = (100_000, 1_000_000)
# `leaves:search:reorder`: num_leaves = leaves * sqrt(N), num_leaves_to_search =
# search * num_leaves, reorder candidates; "default" = ScaNNIndex's defaults
# (sqrt(N) leaves, a tenth searched, 100 re-ordered).
# The sweep spans ScaNN's defaults, fewer/more leaves searched, and re-ordering
# up to 1,000 candidates (on the synthetic catalogs the hashed scores, not the
# tree, limit recall: re-ordering more is the cheapest way up).
DEFAULT_TUNINGS = ("default", "1:0.05:100", "1:0.2:250", "1:0.1:500", "2:0.2:500", "1:0.05:1000", "1:0.1:1000")
QUICK = {"sizes": [20_000], "tunings": ["default", "1:0.05:100", "1:0.2:250"], "num_queries": 256,
         "batch_sizes": [1, 64], "repeats": 1}


# ----------------------------------------------------------------- catalogs
def catalog_name(num_items):
    """`synthetic-100k`, `synthetic-1m`, `synthetic-20k`, `synthetic-12345`."""
    for unit, suffix in ((1_000_000, "m"), (1_000, "k")):
        if num_items % unit == 0:
            return f"synthetic-{num_items // unit}{suffix}"
    return f"synthetic-{num_items}"


def synthetic_catalog(num_items, num_queries, dim=DIM, clusters=1024, spread=0.5, spectrum_decay=0.5,
                      norm_sigma=0.3, seed=0):
    """A seeded clustered Gaussian mixture for maximum-inner-product search.

    Cluster centres ~ N(0, C) and members = centre + `spread` * N(0, C), with
    C = R diag(s^2) R^T (R a random rotation, s_i ∝ (i+1)^-spectrum_decay, mean
    s^2 = 1: trained embeddings use few directions); cluster weights ~
    Dirichlet(1) (uneven sizes); each item is scaled by a log-normal(0,
    norm_sigma) factor (varying norms, so the top inner products are not the
    nearest neighbours). Queries come from the same mixture without the norm
    factor (a query's norm does not change its ranking). The mixture depends on
    `seed` only; items on `(seed, num_items)`; queries on `seed`.

    Returns:
        `(table float32 (num_items, dim), queries float32 (num_queries, dim), spec dict)`.

    Example:
    >>> table, queries, spec = synthetic_catalog(1000, 8, dim=16, clusters=10)
    >>> table.shape, queries.shape, table.dtype.name
    ((1000, 16), (8, 16), 'float32')
    """
    if num_items < 1 or num_queries < 1:
        raise ValueError(f"num_items and num_queries must be positive, got {num_items}, {num_queries}")
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    scales = (1.0 + np.arange(dim)) ** -spectrum_decay
    scales /= np.sqrt(np.mean(scales ** 2))
    mix = scales[:, None] * rotation.T  # x @ mix has covariance C
    centers = rng.normal(size=(clusters, dim)) @ mix
    weights = rng.dirichlet(np.ones(clusters))

    def draw(n, draw_rng, scale_norms):
        out = np.empty((n, dim), np.float32)
        for start in range(0, n, 100_000):  # bounded float64 temporaries
            m = min(100_000, n - start)
            rows = centers[draw_rng.choice(clusters, size=m, p=weights)] + spread * draw_rng.normal(size=(m, dim)) @ mix
            if scale_norms:
                rows *= draw_rng.lognormal(0.0, norm_sigma, size=(m, 1))
            out[start:start + m] = rows
        return out

    table = draw(num_items, np.random.default_rng([seed, num_items]), True)
    queries = draw(num_queries, np.random.default_rng([seed, 1]), False)
    spec = {"generator": "clustered Gaussian mixture (benchmarks/retrieval_index.py::synthetic_catalog)",
            "dim": dim, "clusters": clusters, "cluster_weights": "Dirichlet(1)",
            "centers": "N(0, C), C = R diag(s^2) R^T, R random rotation, s_i ∝ (i+1)^-decay, mean s^2 = 1",
            "spectrum_decay": spectrum_decay, "member_spread": spread,
            "item_norm_factor": f"lognormal(0, {norm_sigma})", "seed": seed, "dtype": "float32",
            "queries": "same mixture, no norm factor (independent draws)"}
    return table, queries, spec


def beauty_catalog(config_path, model_path, num_queries, seed=0):
    """`(table, tokens, queries, spec)` of a trained Beauty model.

    Table and tokens from `export.saved_model.catalog_table` (the model found
    like `tfrec export` finds it); queries = `model.user_embedding` of the test
    histories of `num_queries` random evaluated users (their real serving query).
    """
    from export.export_cli import _load_trained
    from export.saved_model import catalog_table
    from tfrec.data.pipelines import pad_right
    from tfrec.training import prepare_split

    args = argparse.Namespace(config=str(config_path), model=model_path, overrides=[])
    try:
        config, model, item_vocab, _ = _load_trained(args)
    except FileNotFoundError:
        from tfrec.config import load_config

        where = model_path or load_config(config_path).run_dir / "model.keras"
        raise SystemExit(f"beauty catalog: no trained model at {where}. Train it (`tfrec train --config "
                         f"{config_path}`, from the repository root), pass --beauty-model PATH, or run with "
                         "--skip-beauty.") from None
    table, tokens = catalog_table(model, item_vocab)
    data, split = prepare_split(config)
    if data.item_vocab != item_vocab:
        raise SystemExit(f"beauty catalog: the model's vocabulary does not match the data of {config_path} "
                         "(trained on another dataset or filtering?)")
    histories = split.test_history
    users = np.random.default_rng(seed).choice(len(histories), size=min(num_queries, len(histories)), replace=False)
    queries = np.concatenate([
        np.asarray(model.user_embedding(pad_right([histories[u] for u in users[i:i + 256]], config.model.max_length)))
        for i in range(0, len(users), 256)
    ]).astype("float32")
    spec = {"source": "catalog_table of the trained model (item vectors / temperature)",
            "config": str(config_path), "model": str(model_path or config.run_dir / "model.keras"),
            "backbone": config.model.backbone,
            "queries": f"model.user_embedding of the test histories (sequence minus its last item, last "
                       f"{config.model.max_length} items) of {len(users)} random evaluated users (seed {seed})"}
    return table, tokens, queries, spec


# -------------------------------------------------------------------- tunings
def parse_tuning(spec, num_items):
    """`(label, ScaNNIndex options)` of `"default"` or `"leaves:search:reorder"`.

    >>> parse_tuning("2:0.1:250", 10_000)
    ('2:0.1:250', {'num_leaves': 200, 'num_leaves_to_search': 20, 'reorder': 250})
    >>> parse_tuning("default", 10_000)
    ('default', {})
    """
    if spec == "default":
        return spec, {}
    try:
        leaves, search, reorder = spec.split(":")
        num_leaves = max(1, min(num_items, round(float(leaves) * math.sqrt(num_items))))
        options = {"num_leaves": num_leaves,
                   "num_leaves_to_search": max(1, min(num_leaves, round(float(search) * num_leaves))),
                   "reorder": int(reorder)}
    except ValueError:
        raise ValueError(f"tuning {spec!r} must be 'default' or 'leaves:search:reorder' (e.g. 1:0.1:100: "
                         "sqrt(N) leaves, a tenth searched, 100 re-ordered)") from None
    return spec, options


# ------------------------------------------------------------- measurement
def batches(queries, batch_size):
    import tensorflow as tf

    return [tf.constant(queries[i:i + batch_size]) for i in range(0, len(queries), batch_size)]


def retrieve_ids(index, queries, batch_size=256):
    """Item tokens `(num_queries, k)` of `index.retrieve` over all queries."""
    return np.concatenate([index.retrieve(b)["item_ids"].numpy() for b in batches(queries, batch_size)])


def queries_per_second(index, queries, batch_size, warmup=3, repeats=3):
    """Queries/s of `index.retrieve` in batches of `batch_size`: median over `repeats` timed passes."""
    chunks = batches(queries, batch_size)
    for b in chunks[:warmup]:
        index.retrieve(b)["item_ids"].numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for b in chunks:
            out = index.retrieve(b)
            out["item_ids"].numpy(), out["scores"].numpy()
        times.append(time.perf_counter() - start)
    return len(queries) / statistics.median(times)


def bench_catalog(catalog, table, tokens, queries, tunings, args):
    """Records of the brute-force index and every ScaNN tuning on one catalog."""
    from tfrec.serving.retrieval import BruteForceIndex, ScaNNIndex, recall_at_k

    num_items, dim = table.shape
    base = {"catalog": catalog, "num_items": int(num_items), "dim": int(dim)}
    records = []

    def measure(kind, tuning, build):
        start = time.perf_counter()
        index = build()
        build_seconds = time.perf_counter() - start
        found = retrieve_ids(index, queries)
        recall = 1.0 if kind == "bruteforce" else recall_at_k(found, reference)
        config = {key: value for key, value in index.config().items() if key not in ("kind", "num_items", "dim")}
        for batch_size in args.batch_sizes:
            qps = queries_per_second(index, queries, batch_size, args.warmup, args.repeats)
            brute = next((r["queries_per_second"] for r in records
                          if r["index"] == "bruteforce" and r["query_batch_size"] == batch_size), qps)
            records.append({**base, "index": kind, "tuning": {"label": tuning, **config}, "recall@10": recall,
                            "queries_per_second": qps, "speedup_vs_bruteforce": qps / brute,
                            "build_seconds": build_seconds, "query_batch_size": batch_size})
            print(f"   {catalog} {kind:10s} {tuning:11s} batch {batch_size:4d}: recall@10 {recall:.4f}, "
                  f"{qps:9.0f} q/s ({qps / brute:5.1f}x), build {build_seconds:.1f}s", flush=True)
        return found

    reference = measure("bruteforce", "exact", lambda: BruteForceIndex(table, tokens, k=K))
    for label, options in (parse_tuning(spec, num_items) for spec in tunings):
        measure("scann", label, lambda: ScaNNIndex(table, tokens, k=K, **options))
        gc.collect()  # free the previous searcher before building the next
    return records


# ------------------------------------------------------------------ reports
def machine_info():
    import tensorflow as tf

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    try:
        from importlib.metadata import version

        scann_version = version("scann")
    except Exception:  # noqa: BLE001 - informational only
        scann_version = None
    return {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "cpu": cpu,
            "platform": platform.platform(), "python": platform.python_version(), "tensorflow": tf.__version__,
            "scann": scann_version, "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "load_average_at_start": list(os.getloadavg())}


def target_block(records):
    """The issue's goal at 1M items, per batch size: met / not met, with the figures."""
    at = [r for r in records if r["catalog"] == TARGET["catalog"]]
    if not at:
        return {**TARGET, "evaluated": False, "met": None, "reason": f"{TARGET['catalog']} was not run"}
    by_batch = {}
    for batch_size in sorted({r["query_batch_size"] for r in at}):
        rows = [r for r in at if r["query_batch_size"] == batch_size]
        brute = next(r for r in rows if r["index"] == "bruteforce")
        scann = [r for r in rows if r["index"] == "scann"]
        ok = [r for r in scann if r["recall@10"] >= TARGET["min_recall@10"]]
        best = max(ok, key=lambda r: r["speedup_vs_bruteforce"]) if ok else max(scann, key=lambda r: r["recall@10"])
        met = bool(ok) and best["speedup_vs_bruteforce"] >= TARGET["min_speedup_vs_bruteforce"]
        by_batch[str(batch_size)] = {
            "met": met, "bruteforce_queries_per_second": brute["queries_per_second"],
            "best_tuning": best["tuning"]["label"], "best_tuning_options": best["tuning"],
            "recall@10": best["recall@10"], "queries_per_second": best["queries_per_second"],
            "speedup_vs_bruteforce": best["speedup_vs_bruteforce"],
            "chosen_as": ("fastest tuning with recall@10 >= target" if ok
                          else "no tuning reached the recall target; highest-recall tuning shown"),
        }
    met = all(b["met"] for b in by_batch.values())
    return {**TARGET, "evaluated": True, "met": met, "met_at_batch_sizes": [b for b, v in by_batch.items() if v["met"]],
            "by_batch_size": by_batch}


def write_reports(payload, out):
    out.mkdir(parents=True, exist_ok=True)
    payload["target"] = target_block(payload["records"])
    (out / "scann.json").write_text(json.dumps(payload, indent=2))
    setup = payload["setup"]
    lines = ["# ScaNN vs brute-force retrieval: recall@10 and queries/s", "",
             "Written by `benchmarks/retrieval_index.py`; do not edit by hand. Indexes of `tfrec/serving/retrieval.py` called "
             f"through `retrieve` (k = {K}); recall@10 against the brute-force top 10 on {setup['num_queries']} "
             f"queries; queries/s = median of {setup['repeats']} timed passes over the same queries in batches of "
             f"`batch` after {setup['warmup_batches']} warm-up batches; build = index construction. Machine: "
             f"{payload['machine']['usable_cores']} cores ({payload['machine']['cpu']}), shared with other jobs "
             f"(load average at start {payload['machine']['load_average_at_start'][0]:.1f}), so throughputs are "
             "indicative. Tuning `leaves:search:reorder` = num_leaves as a multiple of sqrt(N) : fraction of the "
             "leaves searched : candidates re-ordered exactly; `default` = ScaNNIndex's defaults.", ""]
    target = payload["target"]
    if target["evaluated"]:
        verdicts = [f"batch {b}: **{'met' if v['met'] else 'not met'}** ({v['best_tuning']}: recall@10 "
                    f"{v['recall@10']:.4f}, {v['queries_per_second']:.0f} q/s = {v['speedup_vs_bruteforce']:.1f}x "
                    f"brute force's {v['bruteforce_queries_per_second']:.0f} q/s)"
                    for b, v in target["by_batch_size"].items()]
        lines += [f"Target ({target['catalog']}: recall@10 >= {target['min_recall@10']} at >= "
                  f"{target['min_speedup_vs_bruteforce']:.0f}x brute-force queries/s): " + "; ".join(verdicts), ""]
    else:
        lines += [f"Target: not evaluated ({target['reason']}).", ""]
    for catalog, spec in payload["catalogs"].items():
        rows = [{"index": r["index"], "tuning": r["tuning"]["label"],
                 "leaves": r["tuning"].get("num_leaves"), "searched": r["tuning"].get("num_leaves_to_search"),
                 "reorder": r["tuning"].get("reorder"), "batch": r["query_batch_size"],
                 "recall@10": r["recall@10"], "queries/s": round(r["queries_per_second"]),
                 "speedup": f"{r['speedup_vs_bruteforce']:.1f}x", "build_s": f"{r['build_seconds']:.1f}"}
                for r in payload["records"] if r["catalog"] == catalog]
        rows.sort(key=lambda row: (row["batch"], row["index"] != "bruteforce"))
        lines += [f"## {catalog}: {spec['num_items']:,} items, dim {spec['dim']}", "",
                  f"Queries: {spec['queries']}", "", format_metrics_table(rows), ""]
    (out / "scann.md").write_text("\n".join(lines) + "\n")
    plot(payload["records"], out / "scann_recall_qps.png", out / "scann.json")


def pareto_front(records):
    """The records no other beats on both recall@10 and queries/s, fastest first.

    >>> rows = [{"queries_per_second": q, "recall@10": r} for q, r in ((3, 0.8), (2, 0.7), (1, 0.9))]
    >>> [row["queries_per_second"] for row in pareto_front(rows)]
    [3, 1]
    """
    front, best = [], -1.0
    for r in sorted(records, key=lambda r: (-r["queries_per_second"], -r["recall@10"])):
        if r["recall@10"] > best:
            front.append(r)
            best = r["recall@10"]
    return front


def plot(records, path, source):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch_sizes = sorted({r["query_batch_size"] for r in records})
    catalogs = list(dict.fromkeys(r["catalog"] for r in records))
    if not batch_sizes:
        return
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(6 * len(batch_sizes), 4.5), squeeze=False)
    colors = {c: f"C{i}" for i, c in enumerate(catalogs)}
    for ax, batch_size in zip(axes[0], batch_sizes):
        for catalog in catalogs:
            rows = [r for r in records if r["catalog"] == catalog and r["query_batch_size"] == batch_size]
            scann = sorted((r for r in rows if r["index"] == "scann"), key=lambda r: r["queries_per_second"])
            brute = [r for r in rows if r["index"] == "bruteforce"]
            ax.plot([r["queries_per_second"] for r in scann], [r["recall@10"] for r in scann], marker="o",
                    linestyle="none", color=colors[catalog], label=f"{catalog} ScaNN tunings")
            front = pareto_front(scann)
            ax.plot([r["queries_per_second"] for r in front], [r["recall@10"] for r in front], linestyle=":",
                    color=colors[catalog])
            for r in scann:
                ax.annotate(r["tuning"]["label"], (r["queries_per_second"], r["recall@10"]), fontsize=6,
                            textcoords="offset points", xytext=(3, -8))
            if brute:
                ax.plot([brute[0]["queries_per_second"]], [1.0], marker="*", markersize=12, linestyle="none",
                        color=colors[catalog], label=f"{catalog} brute force")
                if catalog == TARGET["catalog"]:
                    ax.axvline(TARGET["min_speedup_vs_bruteforce"] * brute[0]["queries_per_second"], color="gray",
                               linestyle="--", linewidth=1, label=f"{TARGET['min_speedup_vs_bruteforce']:.0f}x "
                               f"brute force ({catalog})")
        ax.axhline(TARGET["min_recall@10"], color="gray", linestyle="-.", linewidth=1,
                   label=f"recall@10 = {TARGET['min_recall@10']}")
        ax.set_xscale("log")
        ax.set_xlabel("queries / second (log)")
        ax.set_ylabel("recall@10 vs brute force")
        ax.set_title(f"query batch size {batch_size}")
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    save_plot(fig, path, source)  # stamped with the sha256 of `source` (the JSON)


# --------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--beauty-config", default=str(ROOT / "configs" / "sasrec_beauty.yaml"),
                        help="config of the trained Beauty model (default configs/sasrec_beauty.yaml)")
    parser.add_argument("--beauty-model", help="path to its model.keras (default: <run_dir>/model.keras)")
    parser.add_argument("--skip-beauty", action="store_true", help="synthetic catalogs only")
    parser.add_argument("--sizes", nargs="*", type=int, default=None,
                        help=f"synthetic catalog sizes (default {' '.join(map(str, DEFAULT_SIZES))}; none = no synthetic)")
    parser.add_argument("--tunings", nargs="*", default=None,
                        help="ScaNN tunings: 'default' or 'leaves:search:reorder' (leaves x sqrt(N), fraction "
                             f"searched, re-ordered); default {' '.join(DEFAULT_TUNINGS)}")
    parser.add_argument("--num-queries", type=int, default=None, help="queries for recall and timing (default 1024)")
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=None, help="query batch sizes (default 1 256)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches before timing")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes, median taken (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: sizes {QUICK['sizes']}, tunings {QUICK['tunings']}, "
                             f"{QUICK['num_queries']} queries, batch sizes {QUICK['batch_sizes']}, 1 pass "
                             "(explicit flags still win)")
    parser.add_argument("--out", default=str(ROOT / "reports"))
    args = parser.parse_args()
    defaults = QUICK if args.quick else {"sizes": list(DEFAULT_SIZES), "tunings": list(DEFAULT_TUNINGS),
                                         "num_queries": 1024, "batch_sizes": [1, 256], "repeats": 3}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("num_queries", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error("--batch-sizes needs positive sizes")
    if any(n < K for n in args.sizes):
        parser.error(f"--sizes must be >= k={K}")
    for spec in args.tunings:
        try:
            parse_tuning(spec, 10_000)
        except ValueError as err:
            parser.error(str(err))
    if args.skip_beauty and not args.sizes:
        parser.error("nothing to run: --skip-beauty and no --sizes")

    start = time.time()
    out = Path(args.out)
    payload = {"machine": machine_info(),
               "setup": {"k": K, "num_queries": args.num_queries, "batch_sizes": args.batch_sizes,
                         "warmup_batches": args.warmup, "repeats": args.repeats,
                         "timing": "median over repeats of one pass over all queries via index.retrieve, "
                                   "outputs fetched with .numpy()",
                         "recall": "tfrec.serving.retrieval.recall_at_k vs the BruteForceIndex top 10 (recall batch 256)",
                         "tunings": args.tunings, "seed": args.seed, "quick": args.quick},
               "catalogs": {}, "records": []}
    jobs = [] if args.skip_beauty else ["beauty"]
    jobs += list(args.sizes)
    for job in jobs:
        begun = time.time()
        if job == "beauty":
            print("== beauty: loading the trained model", flush=True)
            table, tokens, queries, spec = beauty_catalog(args.beauty_config, args.beauty_model, args.num_queries,
                                                          args.seed)
            catalog = "beauty"
        else:
            catalog = catalog_name(job)
            print(f"== {catalog}: generating", flush=True)
            table, queries, spec = synthetic_catalog(job, args.num_queries, seed=args.seed)
            tokens = [f"item{i}" for i in range(job)]
        payload["catalogs"][catalog] = {"num_items": int(table.shape[0]), "dim": int(table.shape[1]),
                                        "num_queries": int(len(queries)), **spec}
        payload["records"] += bench_catalog(catalog, table, tokens, queries, args.tunings, args)
        payload["catalogs"][catalog]["seconds"] = time.time() - begun
        del table, tokens, queries
        gc.collect()
        payload["machine"]["load_average_at_end"] = list(os.getloadavg())
        payload["total_seconds"] = time.time() - start
        write_reports(payload, out)  # partial results survive an interruption
    target = payload["target"]
    print(f"target: {'met' if target['met'] else 'not met' if target['evaluated'] else 'not evaluated'}")
    print(f"done in {time.time() - start:.0f}s -> {out}/scann.{{json,md}}, scann_recall_qps.png")


if __name__ == "__main__":
    main()

"""Benchmark (not a test): R2LED, its ablations and the lifelong CTR baselines on two datasets.

Data: `movielens-1m-subset` (`configs/r2led_ml1m.yaml`) and `movielens-100k`
(`configs/r2led_ml100k.yaml`) as lifelong CTR samples (rating >= 4 = click, global time
split 80/10/10 of events, every earlier event of the user as history, the most recent
`model.max_history` = 1024 given to every model). Item semantics: the store `tfrec ctr
encode` writes (MiniLM over "Title (Year). Genres: ..."; encoded here if missing),
SIDs fitted once per dataset and quantizer and shared by every run that uses them.

Runs (`--models`), one after another in this process, per dataset and seed:

| run | model | variant |
| --- | --- | --- |
| `r2led` | r2led | `r2led` (the full model, RQ-KMeans SIDs) |
| `r2led-no-multiroute`, `r2led-no-mixed-semantic`, `r2led-no-mixed-collaborative`, `r2led-no-gate` | r2led | the ablation (`no-...`) |
| `r2led-rqvae` (not run by default) | r2led | `rqvae` (RQ-VAE SIDs) |
| `din`, `sim-hard`, `sim-soft`, `eta`, `twin`, `full` | the baseline | `baseline` |
| `logreg` | logreg | `reference` (the wide part as a scikit-learn logistic regression) |
| `popularity` | popularity | `reference` (training click prior, no training; once per dataset) |

Seeds: `--seeds` (default 5) for R2LED, the baselines and logreg; `--ablation-seeds`
(default the first 3) for the ablations. Every model reads each behaviour's feedback and
time gap and has the wide part (`tfrec.models.ctr_wide`). R2LED records carry
`route_diagnostics` (per route level the mean number of behaviours sharing the target's SID
prefix, the routes' overlap) on the longest test histories tiled to 1,024.

Budget: every deep run trains at most `--max-train-seconds` (per dataset, default
`TRAIN_SECONDS`), validating every `train.steps_per_epoch` batches with early stopping on
validation AUC (`patience`), best weights restored; test metrics at the best validation
epoch. The plan's estimated time is printed first (`estimate_seconds`); the defaults fit
2 hours on 2 idle cores.

Inference cost (`ms_per_1k_requests`, the issue's cost protocol): after the runs of a
dataset, the first seed's trained model of every run is **materialised**
(`CTRModel.materialize`: what no request changes computed once, as the served ranker does)
and timed **interleaved in one process**: for each of `--repeats` (default 20) rounds,
every (history length, model) pair runs one pass over `--cost-requests` requests in
batches of `--cost-batch` (`tf.function`, inference mode), after `--warmup` untimed
rounds. A request is one (history, candidate) pair: the longest test histories, tiled
(repeated from their oldest event) to exactly the length, no padding. Reported: median
ms per 1,000 requests and its spread (quartiles, min, max over the rounds); every
record of a run carries its run's figures. `cost_profile`: where R2LED's time goes at
1,024 (wide part, retrieval, fusion). `load_average` (`os.getloadavg()`) is recorded
before and after the timing and in every record.

Writes (partial reports after every run; `--resume` keeps the records in
`<out>/r2led.json` and skips their runs):
- `r2led.json`: records `{"dataset", "model", "variant", "seed", "metrics": {"auc", "gauc",
  "logloss"}, "history_len", "ms_per_1k_requests", "train_seconds", "epochs"}` (test split)
  plus `run`, `best_epoch`, `seconds_to_best`, `samples_per_second`, `valid_metrics`,
  `ms_per_1k_requests_by_history_len`, `cost_spread`, `load_average`, `parameters`, `sids`,
  `route_diagnostics`;
- `r2led.md`: per dataset mean ± std over seeds, R2LED's paired difference (by seed) to
  every other run with a 95% bootstrap interval (`benchmarks/dmesr.paired_bootstrap`), the
  cost table with ratios to TWIN and full attention, the cost profile;
- `r2led_cost.png` (cost vs history length), `r2led_auc.png` (test AUC per run and dataset),
  stamped with the JSON's sha256 (`_plots.save_plot`).

Usage:
    .venv/bin/python benchmarks/r2led.py [--quick] [--datasets movielens-1m-subset movielens-100k]
        [--models r2led din ...] [--seeds 0 1 2 3 4] [--max-train-seconds 60] [--out reports]
        [--resume] [--dry-run] [overrides ...]
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from tfrec.ctr import (  # noqa: E402
    REFERENCES, encode_lifelong_store, fit_reference, load_ctr_config, load_ctr_data, load_store_for,
    needs_semantics, popularity_metrics, prepare_item_semantics, train_ctr)
from tfrec.metrics import format_metrics_table  # noqa: E402
from _plots import save_plot  # noqa: E402
from _records import paired_rows  # noqa: E402
from tfrec.models.ctr_baselines import CTR_BASELINES  # noqa: E402
from tfrec.models.r2led import R2LED_VARIANTS, route_diagnostics  # noqa: E402

CONFIGS = {"movielens-1m-subset": ROOT / "configs" / "r2led_ml1m.yaml",
           "movielens-100k": ROOT / "configs" / "r2led_ml100k.yaml"}
TRAIN_SECONDS = {"movielens-1m-subset": 60.0, "movielens-100k": 30.0}  # per deep run (budget, see estimate_seconds)
METRICS = ("auc", "gauc", "logloss")
ABLATIONS = tuple(v for v in R2LED_VARIANTS if v != "r2led")
R2LED_RUNS = {"r2led": ("r2led", "r2led"), "r2led-rqvae": ("r2led", "rqvae"),
              **{v: (v, v.replace("r2led-", "")) for v in ABLATIONS}}
RUNS = ("r2led", *ABLATIONS, *CTR_BASELINES, "logreg")  # the default plan (r2led-rqvae on request)
QUICK_RUNS = ("r2led", "r2led-no-multiroute", "din", "twin", "full", "logreg")
COST_RUNS = ("r2led", "twin", "full")  # the cost targets; every run's first seed is timed


def run_spec(run):
    """`(config overrides, model, variant)` of a run name."""
    if run in R2LED_RUNS:
        name, variant = R2LED_RUNS[run]
        quantizer = "rqvae" if variant == "rqvae" else "rqkmeans"
        return [f"model.name={name}", f"sids.mode={quantizer}"], "r2led", variant
    if run in CTR_BASELINES:
        return [f"model.name={run}"], run, "baseline"
    if run == "logreg":
        return ["model.name=logreg"], "logreg", "reference"
    raise SystemExit(f"unknown run {run!r}; choose from {', '.join([*RUNS, 'r2led-rqvae'])}")


def load_average():
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------- cost
def cost_requests(data, num_requests, length):
    """Feature dict of the longest test histories, each history feature tiled to `length`
    (`history_ids`, its feedback and gaps), plus `target_id`, `user_id`[, `user_profile`]."""
    import dataclasses

    from tfrec.data.lifelong import LifelongSamples, lifelong_dataset

    samples = data.splits["test"]
    order = np.argsort(-samples.history_length, kind="stable")[:num_requests]
    chosen = LifelongSamples(**{f.name: getattr(samples, f.name)[order] for f in dataclasses.fields(samples)})
    x, _ = next(iter(lifelong_dataset(data, chosen, batch_size=len(order), max_history=length,
                                      trim_to_longest=False)))
    x = {k: v.numpy() for k, v in x.items()}
    valid = (x["history_ids"] > 0).sum(1)
    for key in [k for k in x if k.startswith("history_")]:
        x[key] = np.stack([np.resize(row[:n], length) for row, n in zip(x[key], valid)])
    return x


def spread(times_ms):
    """Median and spread of per-1k timings."""
    q1, median, q3 = np.percentile(times_ms, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "min": float(min(times_ms)),
            "max": float(max(times_ms)), "repeats": len(times_ms)}


def cost_curve(models, data, lengths, num_requests=1024, batch_size=256, warmup=2, repeats=20):
    """`{run: {length: spread}}` in ms per 1,000 requests, the models materialised and
    timed interleaved (see the module doc): every round times every (length, model) pair
    once, so a slow spell of the machine hits all models alike."""
    import tensorflow as tf

    batches, forwards = {}, {}
    for length in lengths:
        x = cost_requests(data, num_requests, length)
        n = len(x["target_id"])
        batches[length] = [{k: tf.constant(v[i:i + batch_size]) for k, v in x.items()} for i in range(0, n, batch_size)]
    for run, model in models.items():
        model.materialize()
        forwards[run] = tf.function(lambda features, model=model: model(features, training=False))
    n = sum(int(b["target_id"].shape[0]) for b in batches[lengths[0]])

    def one_pass(run, length):
        start = time.perf_counter()
        for features in batches[length]:
            forwards[run](features).numpy()
        return (time.perf_counter() - start) * 1000.0 / n * 1000.0

    for _ in range(warmup):
        for length in lengths:
            for run in models:
                one_pass(run, length)
    times = {run: {length: [] for length in lengths} for run in models}
    for round_ in range(repeats):
        runs = list(models)[round_ % len(models):] + list(models)[:round_ % len(models)]  # rotate the order
        for length in lengths:
            for run in runs:
                times[run][length].append(one_pass(run, length))
    return {run: {str(length): spread(t) for length, t in by_length.items()} for run, by_length in times.items()}


def cost_profile(model, data, length=1024, num_requests=256, repeats=9):
    """Where a materialised R2LED's inference time goes at `length`: median ms per 1,000
    requests of the whole forward pass and of its parts (wide part, context tokens of the
    retrieved behaviours, semantic view (SID prefix matches), collaborative similarity,
    route top-k, retrieval, interest)."""
    import tensorflow as tf

    from tfrec.layers.multi_route_retrieval import recency_top_k

    x = cost_requests(data, num_requests, length)
    f = {k: tf.constant(v) for k, v in x.items()}
    model.materialize()
    tables = model.serving_tables()
    unpacked = model._unpack(f)
    ids, targets = unpacked["history_ids"], unpacked["target_id"]
    views = {**model.semantic_view(ids, targets, tables), "target_sids": tf.gather(model.item_sids, targets),
             "similarity": model._similarity(ids, targets, tables), "history_mask": ids > 0}
    scores, eligible = model.retrieval.route_scores(views)
    k = max(model.retrieval.route_top_k)
    positions = tf.reshape(model.retrieve(ids, targets, tables=tables)[0], (num_requests, -1))
    parts = {
        "forward": lambda: model(f, training=False),
        "wide_part": lambda: model.wide(unpacked) if model.wide is not None else tf.zeros(()),
        "context_tokens": lambda: model.context_rows(unpacked, positions) if model.feedback else tf.zeros(()),
        "sid_prefix": lambda: model.semantic_view(ids, targets, tables),
        "similarity": lambda: model._similarity(ids, targets, tables),
        "route_top_k": lambda: recency_top_k(scores, eligible, k),
        "retrieval": lambda: model.retrieve(ids, targets, tables=tables),
        "interest": lambda: model.user_interest(ids, targets, context=unpacked if model.feedback else None),
    }
    fns = {name: tf.function(fn) for name, fn in parts.items()}
    for fn in fns.values():
        fn(), fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy(), fn())
            times[name].append((time.perf_counter() - start) * 1000.0 / num_requests * 1000.0)
    return {name: float(statistics.median(t)) for name, t in times.items()}


# --------------------------------------------------------------- training
def ensure_store(config, data):
    """The store path for the lifelong vocabulary (encoded once, then reused)."""
    try:
        load_store_for(config.sids.store_path, data.item_vocab)
    except (FileNotFoundError, ValueError):
        print(f"== encoding the semantic store into {config.sids.store_path}", flush=True)
        encode_lifelong_store(data, config.sids.store_path, dataset=config.data.dataset,
                              data_root=config.data.data_root)
    return config.sids.store_path


def run_config(dataset, run, seed, args):
    overrides, _, _ = run_spec(run)
    seconds = args.max_train_seconds if args.max_train_seconds is not None else TRAIN_SECONDS[dataset]
    return load_ctr_config(CONFIGS[dataset], [*args.overrides, *overrides, f"train.seed={seed}",
                                              f"name={dataset}-{run}-s{seed}", "output_dir=runs/benchmarks/r2led"]
                           + ([f"train.max_train_seconds={seconds}"] if seconds else []))


def run_one(dataset, run, seed, args, data, semantics_cache):
    """`(record without cost, trained model)` of one run and seed."""
    _, model_name, variant = run_spec(run)
    config = run_config(dataset, run, seed, args)
    semantics = None
    need = needs_semantics(config.model.name)
    if need:
        key = config.sids.mode if need == "sids" else "pooled"
        if key not in semantics_cache:
            start = time.time()
            semantics_cache[key] = prepare_item_semantics(data, config.sids.store_path, config.sids,
                                                          fit=need == "sids")
            print(f"   semantics {key}: {time.time() - start:.0f}s", flush=True)
        semantics = semantics_cache[key]
    print(f"== {dataset} {run} seed {seed} (load {load_average()})", flush=True)
    if config.model.name in REFERENCES:
        results, model, _ = fit_reference(config, data=data, save=False)
        results.update(best_epoch=None, seconds_to_best=results["train_seconds"], samples_per_second=None,
                       validation_curve=[])
    else:
        results, model, _ = train_ctr(config, verbose=0, save=False, data=data, semantics=semantics)
    diagnostics = None
    if model_name == "r2led":  # per-route SID matches and route overlap at history 1,024
        x = cost_requests(data, min(args.cost_requests, 512), 1024)
        diagnostics = route_diagnostics(model, x["history_ids"], x["target_id"])
    test = results["splits"]["test"]
    print(f"   test auc {test['auc']:.4f} gauc {test['gauc']:.4f} logloss {test['logloss']:.4f}, "
          f"{results['epochs']} epochs (best {results['best_epoch']}), {results['train_seconds']:.0f}s", flush=True)
    record = {
        "dataset": dataset, "model": model_name, "variant": variant, "seed": seed,
        "metrics": {k: test[k] for k in METRICS}, "history_len": config.model.max_history,
        "ms_per_1k_requests": None, "train_seconds": results["train_seconds"], "epochs": results["epochs"],
        "run": run, "best_epoch": results["best_epoch"], "seconds_to_best": results["seconds_to_best"],
        "samples_per_second": results["samples_per_second"], "valid_metrics": results["splits"]["valid"],
        "ms_per_1k_requests_by_history_len": None, "cost_spread": None, "load_average": load_average(),
        "parameters": results["model"]["parameters"], "sids": (results["semantics"] or {}).get("diagnostics"),
        "route_diagnostics": diagnostics, "validation_curve": results["validation_curve"],
        "config": {k: results["config"][k] for k in ("data", "model", "sids", "train")},
    }
    return record, model


def seeds_of(run, args):
    return args.ablation_seeds if run in ABLATIONS else args.seeds


def estimate_seconds(args, datasets):
    """Rough wall time of the plan on 2 idle cores: each deep run its training cap plus
    evaluation and set-up (`overhead`), logreg ~30 s, SIDs/store ~60 s per dataset, the
    cost curve ~0.3 s per (model, length, round) at 1,024 requests."""
    overhead = {"movielens-1m-subset": 25.0, "movielens-100k": 10.0}
    total = 0.0
    for dataset in datasets:
        cap = args.max_train_seconds if args.max_train_seconds is not None else TRAIN_SECONDS[dataset]
        for run in args.models:
            seeds = len(seeds_of(run, args))
            total += seeds * (30.0 if run == "logreg" else (cap or 600.0) + overhead.get(dataset, 25.0))
        total += 60.0
        if dataset in args.cost_datasets:
            total += len(args.models) * len(args.lengths) * (args.repeats + args.warmup) * 0.3 \
                * args.cost_requests / 1024
    return total


# ---------------------------------------------------------------- reports
def mean_std(values, digits=4):
    if not values:
        return ""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def group_runs(records, dataset):
    groups = {}
    for r in records:
        if r["dataset"] == dataset and r["model"] != "popularity":
            groups.setdefault(r["run"], []).append(r)
    return groups


def cost_table(groups):
    costs = {run: rs[0]["ms_per_1k_requests_by_history_len"] for run, rs in groups.items()
             if rs[0].get("ms_per_1k_requests_by_history_len")}
    spreads = {run: rs[0]["cost_spread"] for run, rs in groups.items() if rs[0].get("cost_spread")}
    lengths = sorted({int(n) for c in costs.values() for n in c})
    rows = []
    for run, cost in costs.items():
        row = {"run": run}
        for n in lengths:
            sp = spreads.get(run, {}).get(str(n))
            row[f"ms@{n}"] = f"{cost[str(n)]:.1f}" + (f" [{sp['q1']:.1f}–{sp['q3']:.1f}]" if sp else "")
            for ref in ("twin", "full"):
                if ref in costs:
                    row[f"/{ref}@{n}"] = f"{cost[str(n)] / costs[ref][str(n)]:.2f}"
        rows.append(row)
    return costs, lengths, rows


def write_reports(payload, out):
    """`payload` = `{"records": [...], "cost": {dataset: {...}}, "plan": {...}}` (or a bare
    list of records, the format before the cost protocol; written back as it came)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "r2led.json").write_text(json.dumps(payload, indent=2))
    if isinstance(payload, list):
        payload = {"records": payload, "cost": {}}
    records = payload["records"]
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    plan = payload.get("plan", {})
    lines = ["# R2LED and lifelong CTR baselines, test split", "",
             "Written by `benchmarks/r2led.py`; do not edit by hand. Rating >= 4 = click; global time split "
             "(last 10% of events = test); histories = the most recent 1,024 earlier events; mean ± std over "
             "seeds (SIDs fixed, training seed varies); test metrics at the best validation-AUC epoch; "
             f"training capped at {plan.get('train_seconds')} s per run. Load average (1/5/15 min) at the start "
             f"{plan.get('load_average_start')}, at the end {plan.get('load_average_end')}"
             + (" — **quick smoke run: figures mean nothing**" if plan.get("quick") else "") + ".", ""]
    for dataset in datasets:
        groups = group_runs(records, dataset)
        lines += [f"## {dataset}", "", "### Quality", ""]
        rows = [{"run": run, "model": rs[0]["model"], "variant": rs[0]["variant"], "seeds": len(rs),
                 **{m: mean_std([r["metrics"][m] for r in rs]) for m in METRICS},
                 "train_s": f'{statistics.mean(r["train_seconds"] for r in rs):.0f}',
                 "epochs": f'{statistics.mean(r["epochs"] for r in rs):.1f}'} for run, rs in groups.items()]
        rows += [{"run": "popularity", "model": "popularity", "variant": r["variant"], "seeds": "-",
                  **{m: f"{r['metrics'][m]:.4f}" for m in METRICS}}
                 for r in records if r["dataset"] == dataset and r["model"] == "popularity"]
        lines += [format_metrics_table(rows), ""]
        if "r2led" in groups:
            margins = [{k: v for k, v in row.items() if not k.startswith("_")}
                       for row in paired_rows(groups, "r2led", "auc")]
            lines += ["### R2LED − other run, test AUC, paired by seed (95% bootstrap interval over seeds)", "",
                      format_metrics_table(margins) if margins else "(no other run yet)", ""]
            diag = [r["route_diagnostics"] for r in groups["r2led"] if r.get("route_diagnostics")]
            if diag:
                lines += [f"Route diagnostics (history 1,024, seed {groups['r2led'][0]['seed']}): mean SID matches "
                          f"per route level {diag[0]['sid_matches']}; mean Jaccard overlap of the routes' sets "
                          f"{diag[0]['route_overlap']}.", ""]
        costs, lengths, cost_rows = cost_table(groups)
        if cost_rows:
            info = payload.get("cost", {}).get(dataset, {})
            lines += ["### Inference cost (ms per 1,000 requests: median [quartiles] over rounds)", "",
                      f"Models materialised (`CTRModel.materialize`), timed interleaved in one process, "
                      f"{info.get('repeats')} rounds after {info.get('warmup')} warm-up rounds; "
                      f"{info.get('requests')} requests (the longest test histories tiled to the length, no "
                      f"padding) in batches of {info.get('batch_size')}; first seed's model of each run; load "
                      f"average {info.get('load_average_before')} -> {info.get('load_average_after')}. "
                      "`/twin`, `/full` = ratio to TWIN and to full-history attention at the same length.", "",
                      format_metrics_table(cost_rows), ""]
            if "r2led" in costs and "1024" in costs["r2led"]:
                c = costs["r2led"]["1024"]
                checks = []
                if "twin" in costs:
                    checks.append(f"R2LED <= TWIN at 1,024: {'yes' if c <= costs['twin']['1024'] else 'no'} "
                                  f"({c:.1f} vs {costs['twin']['1024']:.1f} ms)")
                if "full" in costs:
                    checks.append(f"R2LED <= 1/3 of full attention at 1,024: "
                                  f"{'yes' if 3 * c <= costs['full']['1024'] else 'no'} "
                                  f"(full / R2LED = {costs['full']['1024'] / c:.2f})")
                lines += ["Targets: " + "; ".join(checks), ""]
            if info.get("profile"):
                lines += ["Where R2LED's time goes at 1,024 (ms per 1,000 requests, materialised, parts timed "
                          "separately): " + ", ".join(f"{k} {v:.1f}" for k, v in info["profile"].items()) + ".", ""]
    (out / "r2led.md").write_text("\n".join(lines) + "\n")
    plot(records, datasets, out)


def plot(records, datasets, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [(d, group_runs(records, d)) for d in datasets]
    timed = [(d, g) for d, g in timed if any(rs[0].get("ms_per_1k_requests_by_history_len") for rs in g.values())]
    if timed:
        fig, axes = plt.subplots(1, len(timed), figsize=(6 * len(timed), 4), squeeze=False)
        for ax, (dataset, groups) in zip(axes[0], timed):
            for run, rs in groups.items():
                cost = rs[0].get("ms_per_1k_requests_by_history_len")
                if not cost:
                    continue
                lengths = sorted(int(n) for n in cost)
                sp = rs[0].get("cost_spread")
                yerr = ([[cost[str(n)] - sp[str(n)]["q1"] for n in lengths],
                         [sp[str(n)]["q3"] - cost[str(n)] for n in lengths]] if sp else None)
                ax.errorbar(lengths, [cost[str(n)] for n in lengths], yerr=yerr, marker="o", label=run, capsize=2,
                            linewidth=2.5 if run == "r2led" else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("history length")
            ax.set_ylabel("ms per 1,000 requests (median, quartiles)")
            ax.set_title(f"Inference cost, {dataset}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        save_plot(fig, out / "r2led_cost.png", out / "r2led.json")

    fig, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        groups = group_runs(records, dataset)
        runs = list(groups)
        if not runs:
            continue
        means = [statistics.mean(r["metrics"]["auc"] for r in groups[run]) for run in runs]
        stds = [statistics.stdev([r["metrics"]["auc"] for r in groups[run]]) if len(groups[run]) > 1 else 0.0
                for run in runs]
        ax.bar(range(len(runs)), means, yerr=stds, capsize=3,
               color=["tab:red" if groups[run][0]["model"] == "r2led" else "tab:gray" for run in runs])
        popularity = next((r["metrics"]["auc"] for r in records
                           if r["dataset"] == dataset and r["model"] == "popularity"), None)
        if popularity is not None:
            ax.axhline(popularity, color="black", linestyle="--", linewidth=1, label="item popularity")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(runs)), runs, rotation=45, ha="right")
        low = min(means + ([popularity] if popularity is not None else []))
        ax.set_ylim(low - 0.02, max(means) + 0.02)
        ax.set_ylabel("test AUC (mean ± std over seeds)")
        ax.set_title(f"{dataset} lifelong CTR")
    fig.tight_layout()
    save_plot(fig, out / "r2led_auc.png", out / "r2led.json")


# ------------------------------------------------------------------- main
def run_dataset(dataset, args, payload, out, done):
    config = run_config(dataset, "r2led", args.seeds[0], args)
    data = load_ctr_data(config.data)
    print(f"data {dataset}: {data.metadata['num_samples']} samples, {data.item_vocab.size} item ids", flush=True)
    records = payload["records"]
    if any(needs_semantics(run_spec(run)[0][0].split("=")[1]) for run in args.models):
        ensure_store(config, data)
    if not any(r["dataset"] == dataset and r["model"] == "popularity" for r in records):
        records.append({"dataset": dataset, "model": "popularity", "variant": "reference", "seed": None,
                        "metrics": popularity_metrics(data, "test"), "history_len": 0, "ms_per_1k_requests": None,
                        "train_seconds": 0.0, "epochs": 0, "run": "popularity", "load_average": load_average()})
    semantics_cache, cost_models = {}, {}
    for run in args.models:
        for seed in seeds_of(run, args):
            if (dataset, run, seed) in done:
                continue
            record, model = run_one(dataset, run, seed, args, data, semantics_cache)
            records.append(record)
            if seed == seeds_of(run, args)[0] and run != "logreg":
                cost_models[run] = model
            write_reports(payload, out)  # partial results survive an interruption
    if dataset in args.cost_datasets and cost_models:
        print(f"== cost curve {dataset}: {list(cost_models)} x {args.lengths}, {args.repeats} rounds "
              f"(load {load_average()})", flush=True)
        before = load_average()
        curve = cost_curve(cost_models, data, args.lengths, args.cost_requests, args.cost_batch, args.warmup,
                           args.repeats)
        info = {"requests": args.cost_requests, "batch_size": args.cost_batch, "warmup": args.warmup,
                "repeats": args.repeats, "lengths": args.lengths, "load_average_before": before,
                "load_average_after": load_average(), "materialized": True, "interleaved": True}
        if "r2led" in cost_models:
            info["profile"] = cost_profile(cost_models["r2led"], data)
        payload["cost"][dataset] = info
        for r in records:
            if r["dataset"] == dataset and r["run"] in curve:
                by_length = curve[r["run"]]
                r["ms_per_1k_requests_by_history_len"] = {n: v["median"] for n, v in by_length.items()}
                r["cost_spread"] = by_length
                r["ms_per_1k_requests"] = by_length.get(str(r["history_len"]), {}).get("median")
        for run in COST_RUNS:
            if run in curve:
                print(f"   {run}: " + ", ".join(f"{n}: {v['median']:.1f} ms/1k" for n, v in curve[run].items()),
                      flush=True)
        write_reports(payload, out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a few runs, 1 seed, a small user subset, short training and timing")
    parser.add_argument("--datasets", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--models", nargs="*", default=None, help=f"runs (default: {', '.join(RUNS)})")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--ablation-seeds", nargs="*", type=int, default=None,
                        help="seeds of the R2LED ablations (default: the first 3 of --seeds)")
    parser.add_argument("--max-train-seconds", type=float, default=None,
                        help=f"per deep run (default per dataset: {TRAIN_SECONDS}; 0 = no limit)")
    parser.add_argument("--max-train-samples", type=int, default=None,
                        help="train on a random subset of users with at most this many training samples")
    parser.add_argument("--lengths", nargs="*", type=int, default=[256, 1024, 2048])
    parser.add_argument("--cost-datasets", nargs="*", default=None,
                        help="datasets whose models are timed (default: all of --datasets)")
    parser.add_argument("--cost-requests", type=int, default=1024)
    parser.add_argument("--cost-batch", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "reports"))
    parser.add_argument("--resume", action="store_true", help="keep the records in <out>/r2led.json, skip their runs")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time, run nothing")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every run")
    args = parser.parse_args()
    if args.quick:
        args.models = args.models or list(QUICK_RUNS)
        args.seeds = args.seeds[:1]
        args.max_train_samples = args.max_train_samples or 20_000
        args.max_train_seconds = 20.0 if args.max_train_seconds is None else args.max_train_seconds
        args.repeats, args.warmup, args.cost_requests = min(args.repeats, 3), 1, min(args.cost_requests, 256)
        args.overrides = [*args.overrides, "train.steps_per_epoch=20", "train.epochs=2", "train.eval_batch_size=1024"]
    args.models = args.models or list(RUNS)
    args.ablation_seeds = args.ablation_seeds or args.seeds[:3]
    args.cost_datasets = args.datasets if args.cost_datasets is None else args.cost_datasets
    for run in args.models:
        run_spec(run)
    if args.max_train_samples:
        args.overrides = [*args.overrides, f"data.max_train_samples={args.max_train_samples}"]
    out = Path(args.out)
    payload = {"records": [], "cost": {}}
    if args.resume and (out / "r2led.json").is_file():
        old = json.loads((out / "r2led.json").read_text())
        payload = old if isinstance(old, dict) else {"records": old, "cost": {}}
    done = {(r.get("dataset"), r.get("run"), r.get("seed")) for r in payload["records"]}
    estimate = estimate_seconds(args, args.datasets)
    print(f"plan: {args.datasets} x {len(args.models)} runs, seeds {args.seeds} (ablations {args.ablation_seeds}); "
          f"estimated {estimate / 60:.0f} min on 2 idle cores; load average {load_average()}", flush=True)
    if args.dry_run:
        return
    payload["plan"] = {"datasets": args.datasets, "runs": args.models, "seeds": args.seeds,
                       "ablation_seeds": args.ablation_seeds, "quick": bool(args.quick),
                       "train_seconds": args.max_train_seconds if args.max_train_seconds is not None else TRAIN_SECONDS,
                       "estimated_seconds": estimate, "load_average_start": load_average(),
                       "overrides": args.overrides}
    start = time.time()
    for dataset in args.datasets:
        run_dataset(dataset, args, payload, out, done)
    payload["plan"].update(load_average_end=load_average(), wall_seconds=time.time() - start)
    write_reports(payload, out)
    print(f"done in {time.time() - start:.0f}s (estimated {estimate:.0f}s) -> {out}/r2led.{{json,md}}, "
          "r2led_cost.png, r2led_auc.png")


if __name__ == "__main__":
    main()

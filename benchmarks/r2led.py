"""Benchmark (not a test): R2LED, its ablations and the lifelong CTR baselines on MovieLens-1M.

Data: `movielens-1m-subset` as lifelong CTR samples (rating >= 4 = click, global time
split 80/10/10 of events, every earlier event of the user as history, the most
recent `model.max_history` = 1024 given to every model), config
`configs/r2led_ml1m.yaml`. Item semantics: the store `tfrec ctr encode` writes
(MiniLM over "Title (Year). Genres: ..."; encoded here if missing), SIDs fitted once
per quantizer and shared by every run that uses them.

Runs (`--models`), one after another in this process, each over `--seeds`:

| run | model | variant |
| --- | --- | --- |
| `r2led` | r2led | `rqkmeans` (the full model, RQ-KMeans SIDs) |
| `r2led-rqvae` | r2led | `rqvae` (RQ-VAE SIDs) |
| `r2led-no-multiroute`, `r2led-no-mixed-semantic`, `r2led-no-mixed-collaborative`, `r2led-no-gate` | r2led | the ablation (`no-...`) |
| `din`, `sim-hard`, `sim-soft`, `eta`, `twin`, `full` | the baseline | `baseline` |
| `logreg` | logreg | `reference` (the wide part as a scikit-learn logistic regression) |

Every model reads each behaviour's feedback (click, rating) and time gap and has the
wide part (`tfrec.models.ctr_wide`); R2LED records carry `route_diagnostics`: per
route level the mean number of behaviours sharing the target's SID prefix and the
mean Jaccard overlap of the routes' retrieved sets, on the longest test histories
tiled to 1,024.

Every run has the same budget: `train.epochs` x `train.steps_per_epoch` batches at
most, early stopping on validation AUC, and `--max-train-seconds` (checked after
each validation, so a run may overshoot by one epoch). Test metrics are those of the
best validation epoch.

Inference cost (`ms_per_1k_requests`): a request is one (history, candidate) pair.
For each length in `--lengths` (256, 1024, 2048) the `--cost-requests` test samples
with the longest histories are taken, and each history is tiled (repeated from its
oldest event, `np.resize`) to exactly that length, so no row has padding; the
model's forward pass (`tf.function`, inference mode) runs in batches of
`--cost-batch`, after `--warmup` untimed passes; the figure is the median over
`--repeats` timed passes of all batches, per 1,000 requests. Measured on every
trained model (the report gives the median over seeds).

Writes (partial reports after every run, so an interruption keeps what is done;
`--resume` skips the runs already in `<out>/r2led.json`):
- `r2led.json`: records `{"dataset", "model", "variant", "metrics": {"auc", "gauc",
  "logloss"}, "history_len", "ms_per_1k_requests", "train_seconds"}` (test split,
  `history_len` = the training/evaluation length, its cost) plus `run`, `seed`,
  `epochs`, `best_epoch`, `seconds_to_best`, `valid_metrics`,
  `ms_per_1k_requests_by_history_len`, `parameters`, `sids` (R2LED); one
  `popularity` record (item click prior, no training);
- `r2led.md`: mean ± std over seeds, the margin of R2LED's test AUC over every
  other run (paired by seed), the cost table with ratios to TWIN and full attention;
- `r2led_cost.png` (cost vs history length), `r2led_auc.png` (test AUC per run).

Usage:
    .venv/bin/python benchmarks/r2led.py [--models r2led din ...] [--seeds 0 1 2]
        [--max-train-seconds 600] [--max-train-samples N] [--out reports] [--resume] [overrides ...]
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
from tfrec.models.ctr_baselines import CTR_BASELINES  # noqa: E402
from tfrec.models.r2led import R2LED_VARIANTS, route_diagnostics  # noqa: E402

CONFIG = ROOT / "configs" / "r2led_ml1m.yaml"
METRICS = ("auc", "gauc", "logloss")
R2LED_RUNS = {"r2led": ("r2led", "rqkmeans"), "r2led-rqvae": ("r2led", "rqvae"),
              **{v: (v, v.replace("r2led-", "")) for v in R2LED_VARIANTS if v != "r2led"}}
RUNS = (*R2LED_RUNS, *CTR_BASELINES, "logreg")


def run_spec(run):
    """`(config overrides, model, variant)` of a run name."""
    if run in R2LED_RUNS:
        name, variant = R2LED_RUNS[run]
        quantizer = "rqvae" if variant == "rqvae" else "rqkmeans"
        return [f"model.name={name}", f"sids.quantizer={quantizer}"], "r2led", variant
    if run in CTR_BASELINES:
        return [f"model.name={run}"], run, "baseline"
    if run == "logreg":
        return ["model.name=logreg"], "logreg", "reference"
    raise SystemExit(f"unknown run {run!r}; choose from {', '.join(RUNS)}")


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


def inference_ms_per_1k(model, data, length, num_requests=1024, batch_size=256, warmup=2, repeats=5):
    """Median wall time of the forward pass over `num_requests` requests, in ms per 1,000."""
    import tensorflow as tf

    x = cost_requests(data, num_requests, length)
    n = len(x["target_id"])
    batches = [{k: tf.constant(v[i:i + batch_size]) for k, v in x.items()} for i in range(0, n, batch_size)]
    forward = tf.function(lambda features: model(features, training=False))

    def one_pass():
        for features in batches:
            forward(features).numpy()

    for _ in range(warmup):
        one_pass()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times) / n * 1000.0


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


def run_one(run, seed, args, data, semantics_cache):
    overrides, model_name, variant = run_spec(run)
    config = load_ctr_config(CONFIG, [*args.overrides, *overrides, f"train.seed={seed}", f"name={run}-s{seed}",
                                      "output_dir=runs/benchmarks/r2led"]
                             + ([f"train.max_train_seconds={args.max_train_seconds}"]
                                if args.max_train_seconds else []))
    semantics = None
    need = needs_semantics(config.model.name)
    if need:
        key = config.sids.quantizer if need == "sids" else "pooled"
        if key not in semantics_cache:
            start = time.time()
            semantics_cache[key] = prepare_item_semantics(data, config.sids.store_path, config.sids,
                                                          fit=need == "sids")
            print(f"   semantics {key}: {time.time() - start:.0f}s", flush=True)
        semantics = semantics_cache[key]
    print(f"== {run} seed {seed}", flush=True)
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
    costs = {str(length): inference_ms_per_1k(model, data, length, args.cost_requests, args.cost_batch,
                                              args.warmup, args.repeats) for length in args.lengths}
    test = results["splits"]["test"]
    print(f"   test auc {test['auc']:.4f} gauc {test['gauc']:.4f} logloss {test['logloss']:.4f}, "
          f"{results['epochs']} epochs (best {results['best_epoch']}), {results['train_seconds']:.0f}s, "
          f"ms/1k requests {costs}", flush=True)
    history_len = config.model.max_history
    return {
        "dataset": config.data.dataset, "model": model_name, "variant": variant,
        "metrics": {k: test[k] for k in METRICS}, "history_len": history_len,
        "ms_per_1k_requests": costs.get(str(history_len)), "train_seconds": results["train_seconds"],
        "run": run, "seed": seed, "epochs": results["epochs"], "best_epoch": results["best_epoch"],
        "seconds_to_best": results["seconds_to_best"], "samples_per_second": results["samples_per_second"],
        "valid_metrics": results["splits"]["valid"], "ms_per_1k_requests_by_history_len": costs,
        "cost_setup": {"requests": args.cost_requests, "batch_size": args.cost_batch, "warmup": args.warmup,
                       "repeats": args.repeats, "histories": "longest test histories tiled to the length"},
        "parameters": results["model"]["parameters"], "sids": (results["semantics"] or {}).get("diagnostics"),
        "route_diagnostics": diagnostics,
        "validation_curve": results["validation_curve"],
        "config": {k: results["config"][k] for k in ("data", "model", "sids", "train")},
    }


# ---------------------------------------------------------------- reports
def mean_std(values, digits=4):
    if not values:
        return ""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def group_runs(records):
    groups = {}
    for r in records:
        if r["model"] != "popularity":
            groups.setdefault(r["run"], []).append(r)
    return groups


def write_reports(records, out):
    out.mkdir(parents=True, exist_ok=True)
    (out / "r2led.json").write_text(json.dumps(records, indent=2))
    groups = group_runs(records)
    lines = ["# R2LED and lifelong CTR baselines, movielens-1m-subset, test split", "",
             "Written by `benchmarks/r2led.py`; do not edit by hand. Rating >= 4 = click; global time split "
             "(last 10% of events = test); histories = the most recent 1,024 earlier events; mean ± std over "
             "seeds (SIDs fixed, training seed varies); test metrics at the best validation-AUC epoch.", ""]
    rows = []
    for run, rs in groups.items():
        rows.append({"run": run, "model": rs[0]["model"], "variant": rs[0]["variant"], "seeds": len(rs),
                     **{m: mean_std([r["metrics"][m] for r in rs]) for m in METRICS},
                     "train_s": f'{statistics.mean(r["train_seconds"] for r in rs):.0f}',
                     "epochs": f'{statistics.mean(r["epochs"] for r in rs):.1f}',
                     "ms/1k@1024": f'{statistics.median(r["ms_per_1k_requests"] for r in rs):.1f}'})
    rows += [{"run": "popularity", "model": "popularity", "variant": r["variant"], "seeds": "-",
              **{m: f"{r['metrics'][m]:.4f}" for m in METRICS}} for r in records if r["model"] == "popularity"]
    lines += ["## Quality", "", format_metrics_table(rows), ""]

    if "r2led" in groups:
        ours = {r["seed"]: r["metrics"]["auc"] for r in groups["r2led"]}
        margins = []
        for run, rs in groups.items():
            if run == "r2led":
                continue
            diffs = [ours[r["seed"]] - r["metrics"]["auc"] for r in rs if r["seed"] in ours]
            if diffs:
                margins.append({"vs": run, "paired_seeds": len(diffs), "auc_margin": mean_std(diffs),
                                "min_margin": f"{min(diffs):+.4f}",
                                "above_in_every_seed": "yes" if min(diffs) > 0 else "no"})
        lines += ["## Margin of R2LED's test AUC (R2LED − other, paired by seed)", "",
                  format_metrics_table(margins) if margins else "(no other run yet)", ""]

    lengths = sorted({int(k) for rs in groups.values() for r in rs for k in r["ms_per_1k_requests_by_history_len"]})
    median_cost = {run: {n: statistics.median(r["ms_per_1k_requests_by_history_len"][str(n)] for r in rs)
                         for n in lengths} for run, rs in groups.items()}
    cost_rows = []
    for run, cost in median_cost.items():
        row = {"run": run}
        for n in lengths:
            row[f"ms@{n}"] = f"{cost[n]:.1f}"
            for ref in ("twin", "full"):
                if ref in median_cost:
                    row[f"/{ref}@{n}"] = f"{cost[n] / median_cost[ref][n]:.2f}"
        cost_rows.append(row)
    setup = next(iter(groups.values()))[0]["cost_setup"] if groups else {}
    lines += ["## Inference cost (ms per 1,000 requests; median over seeds)", "",
              f"A request = one (history, candidate) pair. The {setup.get('requests')} longest test histories, "
              "each tiled (repeated from its oldest event) to exactly the length, no padding; forward pass in "
              f"batches of {setup.get('batch_size')} (`tf.function`, inference mode), {setup.get('warmup')} "
              f"warm-up passes, median of {setup.get('repeats')} timed passes; `/twin`, `/full` = ratio to TWIN "
              "and to full-history attention at the same length (lower is cheaper).", "",
              format_metrics_table(cost_rows) if cost_rows else "", ""]
    if "r2led" in median_cost and 1024 in lengths:
        c = median_cost["r2led"][1024]
        checks = []
        if "twin" in median_cost:
            checks.append(f"cost <= TWIN at 1,024: {'yes' if c <= median_cost['twin'][1024] else 'no'} "
                          f"({c:.1f} vs {median_cost['twin'][1024]:.1f} ms)")
        if "full" in median_cost:
            checks.append(f">= 3x below full attention at 1,024: "
                          f"{'yes' if 3 * c <= median_cost['full'][1024] else 'no'} "
                          f"({median_cost['full'][1024] / c:.2f}x)")
        if checks:
            lines += ["Targets (issue 4): " + "; ".join(checks), ""]
    (out / "r2led.md").write_text("\n".join(lines) + "\n")
    popularity = next((r["metrics"]["auc"] for r in records if r["model"] == "popularity"), None)
    plot(groups, median_cost, lengths, popularity, out)


def plot(groups, median_cost, lengths, popularity_auc, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not groups:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for run, cost in median_cost.items():
        ax.plot(lengths, [cost[n] for n in lengths], marker="o", label=run,
                linewidth=2.5 if run == "r2led" else 1.2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("history length")
    ax.set_ylabel("ms per 1,000 requests")
    ax.set_title("Inference cost vs history length")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_plot(fig, out / "r2led_cost.png", out / "r2led.json")

    runs = list(groups)
    means = [statistics.mean(r["metrics"]["auc"] for r in groups[run]) for run in runs]
    stds = [statistics.stdev([r["metrics"]["auc"] for r in groups[run]]) if len(groups[run]) > 1 else 0.0
            for run in runs]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(runs)), 4))
    ax.bar(range(len(runs)), means, yerr=stds, capsize=3,
           color=["tab:red" if groups[run][0]["model"] == "r2led" else "tab:gray" for run in runs])
    if popularity_auc is not None:
        ax.axhline(popularity_auc, color="black", linestyle="--", linewidth=1, label="item popularity")
        ax.legend(fontsize=7)
    ax.set_xticks(range(len(runs)), runs, rotation=45, ha="right")
    low = min(means + ([popularity_auc] if popularity_auc is not None else []))
    ax.set_ylim(low - 0.02, max(means) + 0.02)
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title("movielens-1m-subset lifelong CTR")
    fig.tight_layout()
    save_plot(fig, out / "r2led_auc.png", out / "r2led.json")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(RUNS), help=f"runs, from: {', '.join(RUNS)}")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--max-train-seconds", type=float, default=600.0, help="per run (0 = no limit)")
    parser.add_argument("--max-train-samples", type=int, default=None,
                        help="train on a random subset of users with at most this many training samples (smoke runs)")
    parser.add_argument("--lengths", nargs="*", type=int, default=[256, 1024, 2048])
    parser.add_argument("--cost-requests", type=int, default=1024)
    parser.add_argument("--cost-batch", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "reports"))
    parser.add_argument("--resume", action="store_true", help="keep the records in <out>/r2led.json, skip their runs")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every run")
    args = parser.parse_args()
    for run in args.models:
        run_spec(run)
    if args.max_train_samples:
        args.overrides = [*args.overrides, f"data.max_train_samples={args.max_train_samples}"]
    out = Path(args.out)
    records = json.loads((out / "r2led.json").read_text()) if args.resume and (out / "r2led.json").is_file() else []
    done = {(r.get("run"), r.get("seed")) for r in records}

    start = time.time()
    config = load_ctr_config(CONFIG, args.overrides)
    data = load_ctr_data(config.data)
    print(f"data: {data.metadata['num_samples']} samples, {data.item_vocab.size} item ids", flush=True)
    ensure_store(config, data)
    if not any(r["model"] == "popularity" for r in records):
        records.append({"dataset": config.data.dataset, "model": "popularity", "variant": "item-click-prior",
                        "metrics": popularity_metrics(data, "test"), "history_len": 0, "ms_per_1k_requests": None,
                        "train_seconds": 0.0, "run": "popularity", "seed": None})
    semantics_cache = {}
    for run in args.models:
        for seed in args.seeds:
            if (run, seed) in done:
                continue
            records.append(run_one(run, seed, args, data, semantics_cache))
            write_reports(records, out)  # partial results survive an interruption
    write_reports(records, out)
    print(f"done in {time.time() - start:.0f}s -> {out}/r2led.{{json,md}}, r2led_cost.png, r2led_auc.png")


if __name__ == "__main__":
    main()

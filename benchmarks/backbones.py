"""Benchmark (not a test): SASRec, BERT4Rec and GRU4Rec, ID-only, on the Amazon datasets.

Trains every (dataset, backbone) pair one after another in this process (never in
parallel: the figures are wall times on this machine), with the configs in
`configs/` and early stopping on validation NDCG@10 (full ranking), then writes:

- `reports/backbones.json`: a list of records
  `{"dataset", "model", "variant": "id", "protocol": "full"|"sampled100",
    "metrics": {"hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr@10"}, "epochs",
    "train_seconds", "examples_per_second", "epoch_seconds", "gflops_per_second",
    "to_val0.05_s", ...}` (test split; extra fields: best_epoch, seconds_to_best,
    epoch_flops, validation_curve). `gflops_per_second` is the model FLOPs of an
    epoch (`tfrec.training.flops`: softmax and backbone, forward and backward,
    padding not counted) times the epochs, over the training wall time;
    `to_val0.05_s` the training seconds until validation NDCG@10 first reached
    0.05 (the RecBole SASRec reference's milestone), null if never;
- `reports/backbones.md`: one table per protocol;
- `reports/backbones_val_ndcg10.png`: validation NDCG@10 per epoch.

Usage:
    .venv/bin/python benchmarks/backbones.py [--datasets amazon-beauty ...] [--models sasrec ...]
        [--seeds 1 2 3] [--variant id] [--max-train-seconds 900] [--merge] [--out reports]
        [config overrides ...]

`--seeds` runs every pair once per seed (`train.seed`; default: the config's seed) and
`--variant NAME` labels the runs of this invocation (default `id`, the configs as they
are; e.g. `--variant ema train.ema_momentum=0.998`). Records carry `seed` and
`variant`; with several variants the Markdown adds, per (dataset, model), each
variant's mean over seeds and its paired difference (by seed) to `id` in test
NDCG@10 (full ranking) with a 95% bootstrap interval (`_records.paired_rows`).

`--merge` keeps the records of `<out>/backbones.json` for the (dataset, model,
variant, seed) runs not re-run now (a new run also replaces its (dataset, model,
variant)'s older records without a seed, made before `--seeds`), so the grid can be filled over several
invocations; every record carries its own budget, overrides and load average (the
machine's other work shows in `train_seconds` and, under a wall-time budget, in the
epochs reached).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tfrec.config import load_config  # noqa: E402
from tfrec.metrics import format_metrics_table  # noqa: E402
from tfrec.training import train_sequential  # noqa: E402
from _plots import save_plot  # noqa: E402
from _records import paired_rows, sequential_records  # noqa: E402

DATASETS = ("amazon-beauty", "amazon-sports", "amazon-toys")
MODELS = ("sasrec", "bert4rec", "gru4rec")
TARGET_VAL_NDCG10 = 0.05  # the RecBole reference's validation milestone on Beauty


def first_time_reaching(curve, threshold):
    for point in curve:
        if point["ndcg@10"] >= threshold:
            return point["seconds"]
    return None


def run_one(dataset, model, max_seconds, overrides, variant="id", seed=None):
    config = load_config(
        ROOT / "configs" / f"{model}_beauty.yaml",
        [f"data.dataset={dataset}", f"name={model}-{dataset}-{variant}", "output_dir=runs/benchmarks", *overrides]
        + ([f"train.max_train_seconds={max_seconds}"] if max_seconds else [])
        + ([f"train.seed={seed}"] if seed is not None else []),
    )
    print(f"== {dataset} / {model} / {variant} / seed {config.train.seed}", flush=True)
    load_at_start = list(os.getloadavg())
    results, _, _ = train_sequential(config, verbose=0, save=False)
    run_info = {"max_train_seconds": config.train.max_train_seconds, "overrides": list(overrides),
                "load_average_at_start": load_at_start, "load_average_at_end": list(os.getloadavg())}
    reached = first_time_reaching(results["validation_curve"], TARGET_VAL_NDCG10)
    throughput = {
        "epoch_seconds": results["epoch_seconds"],
        "epoch_flops": results["epoch_flops"],
        "gflops_per_second": results["epoch_flops"] * results["epochs"] / max(results["train_seconds"], 1e-9) / 1e9,
        "to_val0.05_s": reached,
    }
    run_info["seed"] = config.train.seed
    records = sequential_records(results, dataset, model, variant, extra=lambda protocol: {**throughput, **run_info})
    print(
        f"   test full ndcg@10 {results['splits']['test']['full']['ndcg@10']:.4f}, "
        f"{results['epochs']} epochs, {results['train_seconds']:.0f}s",
        flush=True,
    )
    return records


def to_target(record):
    """Training seconds until validation NDCG@10 first reached `TARGET_VAL_NDCG10` (older
    records without the field: read off their validation curve); None if never."""
    if "to_val0.05_s" in record:
        return record["to_val0.05_s"]
    return first_time_reaching(record.get("validation_curve", []), TARGET_VAL_NDCG10)


def variant_lines(records, metric="ndcg@10"):
    """Markdown: per (dataset, model) with several variants, each variant's mean over seeds
    and its seed-paired difference to `id` (test, full ranking)."""
    full = [r for r in records if r["protocol"] == "full"]
    lines = []
    for dataset, model in sorted({(r["dataset"], r["model"]) for r in full}):
        groups = {}
        for r in full:
            if (r["dataset"], r["model"]) == (dataset, model) and r.get("seed") is not None:
                groups.setdefault(r.get("variant", "id"), []).append(r)
        if len(groups) < 2 or "id" not in groups:
            continue
        means = [{"variant": v, "seeds": len(rs),
                  f"test {metric}": f'{np.mean([r["metrics"][metric] for r in rs]):.4f}',
                  "std": f'{np.std([r["metrics"][metric] for r in rs]):.4f}',
                  f"valid {metric}": f'{np.mean([r["valid_metrics"][metric] for r in rs]):.4f}',
                  "epochs": f'{np.mean([r["epochs"] for r in rs]):.1f}',
                  "to_val0.05_s": ", ".join("-" if to_target(r) is None else f"{to_target(r):.0f}" for r in rs)}
                 for v, rs in groups.items()]
        lines += ["", f"## {dataset} / {model}: variants over seeds (test, full ranking)", "",
                  format_metrics_table(means)]
        paired = [{"variant": variant, **{k: v for k, v in row.items() if not k.startswith("_")}}
                  for variant in groups if variant != "id"
                  for row in paired_rows({variant: groups[variant], "id": groups["id"]}, variant, metric)]
        if paired:
            lines += ["", f"Paired by seed, variant minus `id` ({metric}, 95% bootstrap interval over seeds):", "",
                      format_metrics_table(paired)]
    return lines


def write_reports(records, out):
    out.mkdir(parents=True, exist_ok=True)
    (out / "backbones.json").write_text(json.dumps(records, indent=2))
    lines = ["# Backbones (ID-only), test split, leave-one-out", ""]
    lines.append("Written by `benchmarks/backbones.py`; do not edit by hand. History items are not excluded. "
                 "Rows without a seed are older single runs (made before `--seeds`, with the configs of their "
                 "time: see each record's `config`); they carry no epoch_s or GFLOP/s.")
    for protocol in sorted({r["protocol"] for r in records}):
        rows = [
            {
                "dataset": r["dataset"],
                "model": r["model"],
                "variant": r.get("variant", "id"),
                "seed": "" if r.get("seed") is None else r["seed"],
                **r["metrics"],
                "epochs": r["epochs"],
                "train_s": round(r["train_seconds"]),
                "budget_s": "" if r.get("max_train_seconds") is None else round(r["max_train_seconds"]),
                "to_best_s": round(r["seconds_to_best"]),
                "to_val0.05_s": "" if to_target(r) is None else round(to_target(r)),
                "epoch_s": "" if r.get("epoch_seconds") is None else round(r["epoch_seconds"], 1),
                "GFLOP/s": "" if r.get("gflops_per_second") is None else round(r["gflops_per_second"], 1),
                "examples/s": round(r["examples_per_second"]),
                "protocol": protocol,
            }
            for r in records
            if r["protocol"] == protocol
        ]
        lines += ["", f"## protocol: {protocol}", "", format_metrics_table(rows)]
    lines += variant_lines(records)
    (out / "backbones.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [r for r in records if r["protocol"] == "full"]
    datasets = sorted({r["dataset"] for r in curves})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for r in curves:
            if r["dataset"] == dataset:
                c = r["validation_curve"]
                label = r["model"] if r.get("variant", "id") == "id" else f'{r["model"]} {r["variant"]}'
                label += f' s{r["seed"]}' if r.get("seed") is not None else ""
                ax.plot([p["epoch"] for p in c], [p["ndcg@10"] for p in c], marker=".", label=label)
        ax.set_title(f"{dataset}: validation NDCG@10 (full)")
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    save_plot(fig, out / "backbones_val_ndcg10.png", out / "backbones.json")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--seeds", nargs="*", type=int, default=None, help="train.seed of each run (default: the config's)")
    parser.add_argument("--variant", default="id", help="label of this invocation's runs (with its overrides)")
    parser.add_argument("--max-train-seconds", type=float, default=None)
    parser.add_argument("--merge", action="store_true",
                        help="keep the existing records of the (dataset, model, variant, seed) runs not run now")
    parser.add_argument("--out", default=str(ROOT / "reports"))
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every run")
    args = parser.parse_args()
    seeds = args.seeds or [None]
    previous = Path(args.out) / "backbones.json"
    # --merge: every old record stays unless a run of this invocation has its
    # (dataset, model, variant, seed); each finished run replaces its old record.
    records = json.loads(previous.read_text()) if args.merge and previous.is_file() else []
    start = time.time()
    for dataset in args.datasets:
        for model in args.models:
            for seed in seeds:
                new = run_one(dataset, model, args.max_train_seconds, args.overrides, args.variant, seed)
                # ... and the cell's older single runs of the same variant made before --seeds
                # (no seed recorded), which the seeded run supersedes.
                records = [r for r in records if (r["dataset"], r["model"], r.get("variant", "id"))
                           != (dataset, model, args.variant) or r.get("seed") not in (None, new[0]["seed"])] + new
                write_reports(records, Path(args.out))  # partial results survive an interruption
    print(f"done in {time.time() - start:.0f}s -> {args.out}/backbones.{{json,md,png}}")


if __name__ == "__main__":
    main()

"""Benchmark (not a test): DMESR against ID-only models, with ablations, on Amazon Beauty.

For each backbone (SASRec, BERT4Rec, GRU4Rec) trains, one after another in this
process, the ID-only model (`variant: "id"`) and the DMESR variants of
`tfrec.models.dmesr.DMESR_VARIANTS` (`dmesr`, `dmesr-no-align`,
`dmesr-no-fusion`, `dmesr-no-text-tokens`) with the same config, the same
training budget (`--max-train-seconds`, epochs, early stopping on validation
NDCG@10) and the same seed. The item semantics come from the semantic store
`tfrec encode` writes (built here if missing; an identical store is reused).

Writes:
- `reports/dmesr.json`: records with the schema of `reports/backbones.json`
  (`dataset, model, variant, protocol, metrics, epochs, train_seconds,
  examples_per_second`) plus `popularity_buckets` (test NDCG@10 / HR@10 by the
  training popularity of the target item), `cost` (training step time,
  scoring time and parameters, each also relative to the ID-only model of the
  same backbone), `relative_ndcg@10_vs_id`;
- `reports/dmesr.md`: one table per protocol, the popularity table, the cost table;
- `reports/dmesr_ndcg10.png`: test NDCG@10 (full) per backbone and variant.

Usage:
    .venv/bin/python benchmarks/dmesr.py [--models sasrec ...] [--variants id dmesr ...]
        [--max-train-seconds 900] [--merge] [--out reports] [overrides ...]

`--merge` keeps the records of `<out>/dmesr.json` for the (model, variant) pairs
not run now, so the backbones can be run in separate invocations.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfrec.config import DMESR_VARIANTS, load_config  # noqa: E402
from tfrec.data.pipelines import pad_right  # noqa: E402
from tfrec.data.preprocess import leave_one_out, save_prepared  # noqa: E402
from tfrec.evaluation import SequentialEvaluator  # noqa: E402
from tfrec.metrics import format_metrics_table, ranking_metrics_from_ranks  # noqa: E402
from tfrec.training import _evaluator_args, prepare_split, train_sequential  # noqa: E402
from _plots import save_plot  # noqa: E402
from _records import kept_records, sequential_records  # noqa: E402

MODELS = ("sasrec", "bert4rec", "gru4rec")
VARIANTS = ("id", *DMESR_VARIANTS)
# Items ranked by training interactions: the head is the most popular 20% of
# items, the tail the least popular 50% (cold items included), torso between.
BUCKETS = (("head", 0.0, 0.2), ("torso", 0.2, 0.5), ("tail", 0.5, 1.0))


def ensure_store(dataset, config):
    """The semantic store of `dataset` under artifacts/semantics (encoded once, then reused)."""
    from tfrec.semantics.encode import encode_items

    data, _ = prepare_split(config)
    prepared = ROOT / "artifacts" / "prepared" / dataset
    save_prepared(data, prepared)
    store = encode_items(prepared, dataset=dataset, out_dir=ROOT / "artifacts" / "semantics" / dataset)
    return store.path


def popularity_buckets(item_counts):
    """`{bucket: bool mask over item ids}` from training counts (ties broken by id)."""
    ids = np.arange(2, len(item_counts))
    order = ids[np.lexsort((ids, -item_counts[ids]))]  # most popular first
    masks = {}
    for name, lo, hi in BUCKETS:
        mask = np.zeros(len(item_counts), bool)
        mask[order[int(lo * len(order)) : int(hi * len(order))]] = True
        masks[name] = mask
    return masks


def bucket_metrics(model, config, data, split):
    """Test metrics (full ranking) by the popularity bucket of the target item."""
    args = {**_evaluator_args(config, data), "protocols": ("full",)}
    evaluator = SequentialEvaluator(split.test_history, split.test_targets, **args)
    ranks = evaluator.ranks(model)["full"]
    counts = np.bincount(np.concatenate(split.train), minlength=data.item_vocab.size)
    out = {}
    for name, mask in popularity_buckets(counts).items():
        users = mask[evaluator.targets]
        metrics = ranking_metrics_from_ranks(ranks[users], (10,)) if users.any() else {}
        out[name] = {"users": int(users.sum()), "ndcg@10": metrics.get("ndcg@10"), "hr@10": metrics.get("hr@10")}
    return out


def scoring_seconds(model, split, max_length, users=4096, batch_size=1024, repeats=3):
    """Median wall time to score every item for `users` test histories (after a warm-up)."""
    histories = pad_right([h[-max_length:] for h in split.test_history[:users]], max_length)
    score = tf.function(model.score_items, reduce_retracing=True)
    batches = [tf.constant(histories[i : i + batch_size]) for i in range(0, len(histories), batch_size)]
    score(batches[0]).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            score(batch).numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), len(histories)


def run_one(model_name, variant, store_path, max_seconds, overrides):
    dmesr = [] if variant == "id" else [
        "model.item_encoder=dmesr",
        f"dmesr.store_path={store_path}",
        *[f"dmesr.{k}={json.dumps(v)}" for k, v in DMESR_VARIANTS[variant].items()],
    ]
    config = load_config(
        ROOT / "configs" / f"{model_name}_beauty.yaml",
        [f"name={model_name}-{variant}", "output_dir=runs/benchmarks", *dmesr, *overrides]
        + ([f"train.max_train_seconds={max_seconds}"] if max_seconds else []),
    )
    print(f"== {config.data.dataset} / {model_name} / {variant}", flush=True)
    results, model, data = train_sequential(config, verbose=0, save=False)
    split = leave_one_out(data.sequences, min_length=config.data.min_length)  # the split it trained on
    seconds, users = scoring_seconds(model, split, config.model.max_length)
    epoch_seconds = results["train_seconds"] / max(results["epochs"], 1)
    cost = {
        "epoch_seconds": epoch_seconds,
        "score_seconds_per_1k_users": 1000 * seconds / users,
        "parameters": int(model.count_params()),
        "trainable_parameters": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
    }
    buckets = bucket_metrics(model, config, data, split)
    records = sequential_records(
        results, config.data.dataset, model_name, variant,
        extra=lambda protocol: {"popularity_buckets": buckets if protocol == "full" else None, "cost": cost},
    )
    print(
        f"   test full ndcg@10 {results['splits']['test']['full']['ndcg@10']:.4f}, "
        f"{results['epochs']} epochs ({epoch_seconds:.0f}s each), best epoch {results['best_epoch']}",
        flush=True,
    )
    return records


def add_relative_fields(records):
    """NDCG@10 and cost relative to the ID-only model of the same backbone and protocol."""
    base = {(r["model"], r["protocol"]): r for r in records if r["variant"] == "id"}
    for r in records:
        ref = base.get((r["model"], r["protocol"]))
        if ref is None:
            continue
        r["relative_ndcg@10_vs_id"] = r["metrics"]["ndcg@10"] / ref["metrics"]["ndcg@10"] - 1.0
        r["cost"]["relative_epoch_seconds"] = r["cost"]["epoch_seconds"] / ref["cost"]["epoch_seconds"]
        r["cost"]["relative_score_seconds"] = (
            r["cost"]["score_seconds_per_1k_users"] / ref["cost"]["score_seconds_per_1k_users"]
        )


def _fmt(value, digits=4):
    return "" if value is None else round(value, digits)


def write_reports(records, out):
    add_relative_fields(records)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dmesr.json").write_text(json.dumps(records, indent=2))
    lines = ["# DMESR vs ID-only, Amazon Beauty, test split, leave-one-out", ""]
    lines.append(
        "Written by `benchmarks/dmesr.py`; do not edit by hand. History items are not excluded. "
        "Every variant of a backbone has the same config, seed and training budget."
    )
    for protocol in sorted({r["protocol"] for r in records}):
        rows = [
            {
                "model": r["model"],
                "variant": r["variant"],
                **r["metrics"],
                "vs_id": "" if "relative_ndcg@10_vs_id" not in r else f"{100 * r['relative_ndcg@10_vs_id']:+.1f}%",
                "epochs": r["epochs"],
                "best_epoch": r["best_epoch"],
                "train_s": round(r["train_seconds"]),
            }
            for r in records
            if r["protocol"] == protocol
        ]
        lines += ["", f"## protocol: {protocol}", "", format_metrics_table(rows)]
    full = [r for r in records if r["protocol"] == "full"]
    rows = []
    for r in full:
        row = {"model": r["model"], "variant": r["variant"]}
        for name, _, _ in BUCKETS:
            b = r["popularity_buckets"][name]
            row[f"{name} ndcg@10"] = _fmt(b["ndcg@10"])
            row[f"{name} users"] = b["users"]
        rows.append(row)
    lines += [
        "",
        "## NDCG@10 (full) by popularity of the target item",
        "",
        "Items ranked by training interactions: head = top 20% of items, torso = next 30%, tail = bottom 50%.",
        "",
        format_metrics_table(rows),
    ]
    rows = [
        {
            "model": r["model"],
            "variant": r["variant"],
            "epoch_s": _fmt(r["cost"]["epoch_seconds"], 1),
            "epoch_vs_id": _fmt(r["cost"].get("relative_epoch_seconds"), 2),
            "score_s/1k_users": _fmt(r["cost"]["score_seconds_per_1k_users"], 3),
            "score_vs_id": _fmt(r["cost"].get("relative_score_seconds"), 2),
            "params": r["cost"]["parameters"],
            "trainable": r["cost"]["trainable_parameters"],
        }
        for r in full
    ]
    lines += ["", "## Cost", "", format_metrics_table(rows)]
    (out / "dmesr.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if any(r["model"] == m for r in full)]
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in full)]
    fig, ax = plt.subplots(figsize=(2.5 + 2 * len(models), 4))
    width = 0.8 / max(len(variants), 1)
    for j, variant in enumerate(variants):
        values = [
            next((r["metrics"]["ndcg@10"] for r in full if r["model"] == m and r["variant"] == variant), 0.0)
            for m in models
        ]
        ax.bar(np.arange(len(models)) + j * width, values, width, label=variant)
    ax.set_xticks(np.arange(len(models)) + 0.4 - width / 2, models)
    ax.set_ylabel("test NDCG@10 (full ranking)")
    ax.set_title("Amazon Beauty: DMESR variants vs ID-only")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_plot(fig, out / "dmesr_ndcg10.png", out / "dmesr.json")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--dataset", default="amazon-beauty")
    parser.add_argument("--max-train-seconds", type=float, default=None)
    parser.add_argument("--merge", action="store_true",
                        help="keep the existing records of the (model, variant) pairs not run now")
    parser.add_argument("--out", default=str(ROOT / "reports"))
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every run")
    args = parser.parse_args()
    overrides = [f"data.dataset={args.dataset}", *args.overrides]
    store_path = None
    if any(v != "id" for v in args.variants):
        store_path = ensure_store(args.dataset, load_config(ROOT / "configs" / "sasrec_beauty.yaml", overrides))
    records = kept_records(Path(args.out) / "dmesr.json", lambda r: (r["dataset"], r["model"], r["variant"]),
                           [(args.dataset, m, v) for m in args.models for v in args.variants]) if args.merge else []
    start = time.time()
    for model_name in args.models:
        for variant in args.variants:
            records += run_one(model_name, variant, store_path, args.max_train_seconds, overrides)
            write_reports(records, Path(args.out))  # partial results survive an interruption
    print(f"done in {time.time() - start:.0f}s -> {args.out}/dmesr.{{json,md}}, dmesr_ndcg10.png")


if __name__ == "__main__":
    main()

"""Benchmark (not a test): DMESR against ID-only models, with ablations, on the Amazon datasets.

For each backbone (SASRec, BERT4Rec, GRU4Rec) and seed (default 42, 43, 44),
trains, one after another in this process, the ID-only model (`variant: "id"`)
and the DMESR variants of `tfrec.config.DMESR_VARIANTS` (`dmesr`,
`dmesr-no-align`, `dmesr-no-fusion`, `dmesr-no-text-tokens`,
`dmesr-no-generated-view`, `dmesr-no-semantic-init`) with the same config and
seed. `--comparison equal_time` (default): each DMESR variant gets the wall
time the ID model of the same seed needed to early-stop (or
`--max-train-seconds`); `equal_epochs`: `--epochs` epochs each, no early
stopping. The item semantics come from the semantic store `tfrec encode`
writes (built here if missing; an identical store is reused; one store version
for all runs, recorded as `store_version`). Results that use the generated text
view are labelled so (`text_views`): it is language-model output, not MLLM.

Writes:
- `reports/dmesr.json`: records `{"dataset", "model", "variant", "protocol",
  "comparison", "seed", "metrics": {"hr@10", "ndcg@10", "hr@20", "ndcg@20",
  "mrr@10"}, "epochs", "train_seconds", "epoch_seconds", "store_version", ...}`
  plus `popularity_buckets` (head/torso/tail of the target item),
  `history_length_buckets`, `bootstrap_ndcg@10_vs_id` (paired bootstrap 95%
  interval over users of DMESR / ID-only - 1, same seed), `cost`,
  `relative_ndcg@10_vs_id`;
- `reports/dmesr.md`, `reports/dmesr_ndcg10.png`.

Usage:
    .venv/bin/python benchmarks/dmesr.py [--dataset amazon-beauty] [--models sasrec ...]
        [--variants id dmesr ...] [--seeds 42 43 44] [--comparison equal_time|equal_epochs]
        [--epochs 6] [--max-train-seconds S] [--merge] [--out reports] [overrides ...]
    .venv/bin/python benchmarks/dmesr.py --timing [--models sasrec] [--steps 200] [--repeats 3]
        (the epoch-time ratio DMESR / ID-only from interleaved short runs -> <out>/dmesr_timing.json)

`--merge` keeps the records of `<out>/dmesr.json` not run now, so the grid can
be filled over several invocations.
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


LENGTH_BUCKETS = (("short", 0, 5), ("medium", 5, 10), ("long", 10, 10**9))  # history length [lo, hi)


def per_user_ndcg(ranks, k=10):
    """Per-user NDCG@k from 0-based ranks (the mean is `ranking_metrics_from_ranks`' ndcg@k)."""
    ranks = np.asarray(ranks)
    return np.where(ranks < k, 1.0 / np.log2(ranks.astype(np.float64) + 2.0), 0.0)


def bucket_metrics(model, config, data, split):
    """Test metrics (full ranking) by the popularity bucket of the target item and by the user's
    history length, plus the per-user test NDCG@10 (for paired bootstrap intervals)."""
    args = {**_evaluator_args(config, data), "protocols": ("full",)}
    evaluator = SequentialEvaluator(split.test_history, split.test_targets, **args)
    ranks = evaluator.ranks(model)["full"]
    counts = np.bincount(np.concatenate(split.train), minlength=data.item_vocab.size)
    lengths = np.array([len(h) for h in split.test_history])
    groups = dict(popularity_buckets(counts).items())
    out = {"popularity": {}, "history_length": {}}
    for kind, masks in (("popularity", {n: m[evaluator.targets] for n, m in groups.items()}),
                        ("history_length", {n: (lengths >= lo) & (lengths < hi) for n, lo, hi in LENGTH_BUCKETS})):
        for name, users in masks.items():
            metrics = ranking_metrics_from_ranks(ranks[users], (10,)) if users.any() else {}
            out[kind][name] = {"users": int(users.sum()), "ndcg@10": metrics.get("ndcg@10"),
                               "hr@10": metrics.get("hr@10")}
    return out, per_user_ndcg(ranks)


def paired_bootstrap(variant, baseline, samples=2000, seed=0):
    """95% interval of mean(variant) / mean(baseline) - 1 over users resampled with replacement
    (paired: the same users for both). Inputs: per-user metrics, same users in the same order."""
    variant, baseline = np.asarray(variant, np.float64), np.asarray(baseline, np.float64)
    if variant.shape != baseline.shape or not variant.size:
        raise ValueError(f"paired bootstrap needs equal-length per-user arrays, got {variant.shape}, {baseline.shape}")
    rng = np.random.default_rng(seed)
    ratios = np.empty(samples)
    for i in range(samples):
        idx = rng.integers(0, len(variant), len(variant))
        ratios[i] = variant[idx].mean() / max(baseline[idx].mean(), 1e-12) - 1.0
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return {"relative": float(variant.mean() / max(baseline.mean(), 1e-12) - 1.0), "ci95": [float(lo), float(hi)],
            "samples": samples}


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


def run_one(model_name, variant, store_path, max_seconds, overrides, seed=42, comparison="equal_time",
            epochs=None, per_user=None):
    """Train and evaluate one (backbone, variant, seed); returns its records. `per_user` (a dict)
    receives the per-user test NDCG@10 under `(model, variant, seed)` for the bootstrap."""
    dmesr = [] if variant == "id" else [
        "model.item_encoder=dmesr",
        f"dmesr.store_path={store_path}",
        *[f"dmesr.{k}={json.dumps(v)}" for k, v in DMESR_VARIANTS[variant].items()],
    ]
    budget = [f"train.max_train_seconds={max_seconds}"] if max_seconds else []
    if comparison == "equal_epochs":  # a fixed number of epochs, no early stopping, no time budget
        budget = [f"train.epochs={epochs}", f"train.patience={epochs}", "train.max_train_seconds=null"]
    config = load_config(
        ROOT / "configs" / f"{model_name}_beauty.yaml",
        [f"name={model_name}-{variant}-{seed}", "output_dir=runs/benchmarks", f"train.seed={seed}", *dmesr,
         *overrides, *budget],
    )
    print(f"== {config.data.dataset} / {model_name} / {variant} / seed {seed} / {comparison}", flush=True)
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
    buckets, user_ndcg = bucket_metrics(model, config, data, split)
    if per_user is not None:
        per_user[(model_name, variant, seed)] = user_ndcg
    active = model.item_encoder.active_parts() if hasattr(model.item_encoder, "active_parts") else ["id"]
    records = sequential_records(
        results, config.data.dataset, model_name, variant,
        extra=lambda protocol: {
            "comparison": comparison, "seed": seed, "epoch_seconds": epoch_seconds,
            "store_version": None if variant == "id" else str(store_path),
            "text_views": "generated text view (language-model output, not MLLM)" if "generated" in active else None,
            "active_parts": active,
            "popularity_buckets": buckets["popularity"] if protocol == "full" else None,
            "history_length_buckets": buckets["history_length"] if protocol == "full" else None,
            "cost": cost},
    )
    print(
        f"   test full ndcg@10 {results['splits']['test']['full']['ndcg@10']:.4f}, "
        f"{results['epochs']} epochs ({epoch_seconds:.0f}s each), best epoch {results['best_epoch']}",
        flush=True,
    )
    return records, results


def add_bootstrap_fields(records, per_user, samples=2000):
    """`bootstrap_ndcg@10_vs_id` on every full-protocol DMESR record: paired over users (same seed)."""
    for r in records:
        if r["protocol"] != "full" or r["variant"] == "id":
            continue
        key, base = (r["model"], r["variant"], r["seed"]), (r["model"], "id", r["seed"])
        if key in per_user and base in per_user:
            r["bootstrap_ndcg@10_vs_id"] = paired_bootstrap(per_user[key], per_user[base], samples)


def step_timing(model_name, store_path, overrides, steps=200, repeats=3, warmup=20, dmesr_overrides=()):
    """Epoch-time ratio DMESR / ID-only from interleaved short runs (not full trainings).

    Builds both models as `tfrec train` would (same data, batches, optimizer),
    traces each train step once (`warmup` steps), then runs `steps` training
    steps of ID, then of DMESR, alternately `repeats` times, and reports the
    per-step median of each model, their ratio (the epoch-time ratio: an
    epoch is the same number of steps for both) and `os.getloadavg()` before
    and after, since the machine may be shared; plus `catalogue_ms`, the forward + backward cost of
    the parts of the DMESR encoder's catalogue pass (`catalogue_profile`).
    """
    from tfrec.data.pipelines import training_dataset
    from tfrec.training import build_item_encoder, build_model, build_optimizer

    runs = {}
    for variant in ("id", "dmesr"):
        dmesr = [] if variant == "id" else ["model.item_encoder=dmesr", f"dmesr.store_path={store_path}",
                                            *dmesr_overrides]
        config = load_config(ROOT / "configs" / f"{model_name}_beauty.yaml",
                             [f"name=timing-{variant}", *dmesr, *overrides])
        keras_seed = config.train.seed
        tf.keras.utils.set_random_seed(keras_seed)
        data, split = prepare_split(config)
        mc, tc = config.model, config.train
        model = build_model(mc, data.item_vocab.size, item_encoder=build_item_encoder(config, data.item_vocab),
                            seed=tc.seed)
        model.compile(optimizer=build_optimizer(tc), jit_compile=False)
        ds = training_dataset(split.train, mc.max_length, tc.batch_size, objective=model.objective,
                              mask_prob=mc.mask_prob, mask_token_id=model.mask_token_id, seed=tc.seed,
                              bucket_batches=tc.bucket_batches, scheme=tc.scheme).repeat()
        model.fit(ds.take(warmup), epochs=1, verbose=0)  # trace once
        active = model.item_encoder.active_parts() if hasattr(model.item_encoder, "active_parts") else ["id"]
        runs[variant] = {"model": model, "ds": ds, "seconds": [], "active_parts": active}
    load_before = os.getloadavg()
    for _ in range(repeats):
        for variant in ("id", "dmesr"):
            run = runs[variant]
            start = time.perf_counter()
            run["model"].fit(run["ds"].take(steps), epochs=1, verbose=0)
            run["seconds"].append((time.perf_counter() - start) / steps)
    load_after = os.getloadavg()
    out = {
        "model": model_name, "steps": steps, "repeats": repeats,
        "step_seconds": {v: [round(t, 5) for t in r["seconds"]] for v, r in runs.items()},
        "median_step_seconds": {v: float(np.median(r["seconds"])) for v, r in runs.items()},
        "active_parts": runs["dmesr"]["active_parts"],
        "pairwise_ratios": sorted(round(d / i, 3) for d, i in zip(runs["dmesr"]["seconds"], runs["id"]["seconds"])),
        "catalogue_ms": catalogue_profile(runs["dmesr"]["model"].item_encoder),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
        "cpus": os.cpu_count(), "note": "short interleaved timing on a shared machine, not full trainings",
    }
    out["epoch_time_ratio"] = out["median_step_seconds"]["dmesr"] / out["median_step_seconds"]["id"]
    return out


def catalogue_profile(encoder, repeats=10, align_items=512):
    """Forward + backward milliseconds of the parts of a `DMESRItemEncoder`'s per-step catalogue pass
    (median of `repeats` traced calls; the loss is the sum of squares of the part's output, the
    gradient taken for every trainable weight): the ID table, the adapted views that are fused, the
    attribute view, the semantic part (views + fuser + normalisation), the whole table, and the
    alignment on `align_items` items."""
    from keras import ops

    if not encoder.built:
        encoder.build()
    rows = lambda: encoder._table_rows(None)  # noqa: E731
    coarse = [i for i in encoder.fused_view_indices if i < encoder.num_coarse]
    parts = {
        "id_table": lambda: encoder.id_encoder.all_items(),
        "semantic_part": lambda: encoder._semantic(None, training=True),
        "table": lambda: encoder._encode(None, training=True),
    }
    if coarse:
        parts["coarse_views"] = lambda: encoder._views(rows(), coarse)[0]
    if encoder.has_attributes:
        parts["attribute_view"] = lambda: encoder._attribute_view(ops.convert_to_tensor(encoder.attribute_table))[0]
    if encoder.aligner is not None:
        parts["alignment"] = lambda: encoder.alignment_loss(tf.range(2, min(2 + align_items, encoder.vocab_size)))
    variables = [v.value for v in encoder.trainable_variables]
    out = {}
    for name, part in parts.items():
        @tf.function
        def step(part=part):
            with tf.GradientTape() as tape:
                y = part()
                loss = tf.reduce_sum(tf.square(y))
            return tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)

        step()  # trace
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - start)
        out[name] = round(1000 * float(np.median(seconds)), 2)
    return out


def add_relative_fields(records):
    """NDCG@10 and cost relative to the ID-only model of the same backbone, protocol and seed."""
    base = {(r["dataset"], r["model"], r["protocol"], r.get("seed")): r for r in records if r["variant"] == "id"}
    for r in records:
        ref = base.get((r["dataset"], r["model"], r["protocol"], r.get("seed")))
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
    lines = ["# DMESR vs ID-only, test split, leave-one-out", ""]
    lines.append(
        "Written by `benchmarks/dmesr.py`; do not edit by hand. History items are not excluded. "
        "Every variant of a backbone has the same config, seed and training budget."
    )
    for protocol in sorted({r["protocol"] for r in records}):
        rows = [
            {
                "model": r["model"],
                "variant": r["variant"],
                "seed": r.get("seed"),
                "comparison": r.get("comparison"),
                **r["metrics"],
                "vs_id": "" if "relative_ndcg@10_vs_id" not in r else f"{100 * r['relative_ndcg@10_vs_id']:+.1f}%",
                "ci95_vs_id": "" if "bootstrap_ndcg@10_vs_id" not in r else
                "[{:+.1f}%, {:+.1f}%]".format(*(100 * v for v in r["bootstrap_ndcg@10_vs_id"]["ci95"])),
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
        row = {"model": r["model"], "variant": r["variant"], "seed": r.get("seed")}
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
    parser.add_argument("--seeds", nargs="*", type=int, default=[42, 43, 44])
    parser.add_argument("--comparison", choices=("equal_time", "equal_epochs"), default="equal_time",
                        help="equal_time: every variant gets the wall time the ID model of the same seed needed "
                             "to early-stop (or --max-train-seconds); equal_epochs: --epochs each, no early stopping")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run with --comparison equal_epochs")
    parser.add_argument("--bootstrap-samples", type=int, default=2000)
    parser.add_argument("--timing", action="store_true",
                        help="only the interleaved step timing ID vs DMESR (--steps, --repeats) -> <out>/dmesr_timing.json")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every run")
    args = parser.parse_args()
    overrides = [f"data.dataset={args.dataset}", *args.overrides]
    if args.timing:
        store_path = ensure_store(args.dataset, load_config(ROOT / "configs" / "sasrec_beauty.yaml", overrides))
        results = [step_timing(m, store_path, overrides, args.steps, args.repeats) for m in args.models]
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "dmesr_timing.json").write_text(json.dumps(results, indent=2))
        for r in results:
            print(f"{r['model']}: DMESR / ID step time {r['epoch_time_ratio']:.3f} "
                  f"({r['median_step_seconds']}), load {r['loadavg_before']} -> {r['loadavg_after']}")
        return
    store_path = None
    if any(v != "id" for v in args.variants):
        store_path = ensure_store(args.dataset, load_config(ROOT / "configs" / "sasrec_beauty.yaml", overrides))
    key = lambda r: (r["dataset"], r["model"], r["variant"], r.get("seed"), r.get("comparison"))  # noqa: E731
    records = kept_records(Path(args.out) / "dmesr.json", key,
                           [(args.dataset, m, v, s, args.comparison) for m in args.models for v in args.variants
                            for s in args.seeds]) if args.merge else []
    per_user = {}
    start = time.time()
    for model_name in args.models:
        for seed in args.seeds:
            budget = args.max_train_seconds
            for variant in sorted(args.variants, key=lambda v: v != "id"):  # the ID model first: its time is the budget
                new, results = run_one(model_name, variant, store_path, budget, overrides, seed, args.comparison,
                                       args.epochs, per_user)
                records += new
                if variant == "id" and args.comparison == "equal_time" and budget is None:
                    budget = results["train_seconds"]  # equal time = the time the ID model needs to early-stop
                add_bootstrap_fields(records, per_user, args.bootstrap_samples)
                write_reports(records, Path(args.out))  # partial results survive an interruption
    print(f"done in {time.time() - start:.0f}s -> {args.out}/dmesr.{{json,md}}, dmesr_ndcg10.png")


if __name__ == "__main__":
    main()

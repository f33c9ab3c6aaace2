"""The record schema shared by the sequential benchmarks (`backbones.py`, `dmesr.py`).

One record per test protocol: `{"dataset", "model", "variant", "protocol",
"metrics": {REPORTED}, "epochs", "train_seconds", "examples_per_second",
"best_epoch", "seconds_to_best", "valid_metrics", "validation_curve", "config"}`,
plus whatever `extra(protocol)` adds. Field names are a contract other tools read.
"""

import json

import numpy as np

REPORTED = ("hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr@10")


def kept_records(path, key, rerun):
    """`--merge`: the records of the JSON list at `path` whose `key(record)` is not in `rerun`.

    Lets a benchmark grid be filled over several invocations: the runs of this
    invocation replace their old records, every other record is kept as it is.
    """
    if not path.is_file():
        return []
    rerun = set(rerun)
    return [r for r in json.loads(path.read_text()) if key(r) not in rerun]


def sequential_records(results, dataset, model, variant, extra=lambda protocol: {}):
    """Records of one `train_sequential` result, one per test protocol."""
    curve = [{"epoch": p["epoch"], "seconds": p["seconds"], "ndcg@10": p["ndcg@10"]}
             for p in results["validation_curve"]]
    return [
        {
            "dataset": dataset,
            "model": model,
            "variant": variant,
            "protocol": protocol,
            "metrics": {k: metrics[k] for k in REPORTED},
            "epochs": results["epochs"],
            "train_seconds": results["train_seconds"],
            "examples_per_second": results["examples_per_second"],
            "best_epoch": results["best_epoch"],
            "seconds_to_best": results["seconds_to_best"],
            "valid_metrics": {k: results["splits"]["valid"][protocol][k] for k in REPORTED},
            **extra(protocol),
            "validation_curve": curve,
            "config": results["config"],
        }
        for protocol, metrics in results["splits"]["test"].items()
    ]


def paired_rows(groups, ours, metric):
    """Run `ours` minus every other run of `groups` (`{run: [records with "seed" and
    "metrics"]}`), paired by seed: mean difference and a 95% interval
    (`dmesr.paired_bootstrap` over the paired seeds, relative -> absolute by the other
    run's mean; with a few seeds the interval is coarse, with one there is none). Rows for a Markdown table;
    keys starting with `_` carry the numbers."""
    from dmesr import paired_bootstrap

    mine_by_seed = {r["seed"]: r["metrics"][metric] for r in groups.get(ours, [])}
    rows = []
    for run, rs in groups.items():
        if run == ours:
            continue
        pairs = [(mine_by_seed[r["seed"]], r["metrics"][metric]) for r in rs if r["seed"] in mine_by_seed]
        if not pairs:
            continue
        mine, theirs = np.array(pairs).T
        base = float(theirs.mean())
        diff = float((mine - theirs).mean())
        if len(pairs) > 1:
            boot = paired_bootstrap(mine, theirs)
            lo, hi = (c * base for c in boot["ci95"])
            ci, above, interval = f"[{lo:+.4f}, {hi:+.4f}]", "yes" if lo > 0 else "no", [lo, hi]
        else:  # one paired seed: a difference, no interval
            ci, above, interval = "n/a (1 seed)", "n/a", None
        rows.append({"vs": run, "paired_seeds": len(pairs), f"{metric}_diff": f"{diff:+.4f}",
                     "ci95": ci, "above_zero": above, "_diff": diff, "_ci95": interval})
    return rows

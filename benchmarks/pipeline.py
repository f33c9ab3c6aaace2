"""Benchmark (not a test): wall time of the TFX pipeline per component, first run vs cached rerun.

For each pipeline config (default: SASRec and DMESR on Amazon Beauty,
`configs/pipeline_sasrec_beauty.yaml`, `configs/pipeline_dmesr_beauty.yaml`, and
R2LED on MovieLens-1M, `configs/pipeline_r2led_ml1m.yaml`), one after another in
this process:

1. `first`: a fresh pipeline root (`<--root>/<pipeline name>/`, deleted first if
   a previous benchmark left it), every component runs;
2. `cached`: the same config again, inputs unchanged: ExampleGen .. Trainer are
   reused from ML Metadata; the Evaluator runs again (its baseline is now the
   first run's blessed model) and the Pusher pushes the same model again.

Each run is `tfx_pipeline.runner.run_pipeline` (what `tfrec pipeline run`
does); per-component states and seconds come from its report (ML Metadata
execution times), not from timing here. `--merge` re-runs some configs and keeps
the other records of an existing `pipeline.json`.

Writes (into `--out`, default `reports/`):
- `pipeline.json`: `{"machine": {...}, "runs": [{"config", "dataset", "model",
  "task", "run": "first"|"cached", "total_seconds", "dag_seconds", "components":
  {name: {"state", "seconds"}}, "pushed", "gate_metric": {"name", "value"},
  "blessed", "metrics", "error"}], "aim": {"beauty_full_run_under_seconds":
  1200, "met": bool or null, "checked": [...]}}`. `total_seconds` is the whole
  `run_pipeline` call (writing the ExampleGen input included), `dag_seconds`
  the `LocalDagRunner` run alone;
- `pipeline.md`: the same as tables;
- `pipeline_components.png`: seconds per component, first vs cached, one panel per config.

Usage:
    .venv/bin/python benchmarks/pipeline.py [--configs configs/pipeline_*.yaml ...]
        [--root runs/benchmarks/pipeline] [--out reports] [overrides ...]
    # smoke run:
    .venv/bin/python benchmarks/pipeline.py --configs configs/pipeline_sasrec_ml100k.yaml \\
        --out /tmp/pipeline-smoke --root /tmp/pipeline-smoke/runs pipeline.train_steps=5
"""

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _plots import save_plot  # noqa: E402
from tfrec.metrics import format_metrics_table  # noqa: E402
from tfx_pipeline.config import load_pipeline_config  # noqa: E402
from tfx_pipeline.runner import NOT_RUN, PipelineRunError, format_report, run_pipeline  # noqa: E402

CONFIGS = ("configs/pipeline_sasrec_beauty.yaml", "configs/pipeline_dmesr_beauty.yaml",
           "configs/pipeline_r2led_ml1m.yaml")
RUNS = ("first", "cached")
AIM = {"dataset": "amazon-beauty", "seconds": 1200}  # a first (full) Beauty run under 20 minutes


def machine_info():
    """Where the figures come from (the machine is shared: see the load averages)."""
    import tensorflow as tf
    import tfx

    cpu = ""
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    return {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "cpu": cpu or platform.processor(),
            "platform": platform.platform(), "python": platform.python_version(), "tensorflow": tf.__version__,
            "tfx": tfx.__version__, "load_average_at_start": list(os.getloadavg())}


def model_label(config):
    """`sasrec`, `dmesr-sasrec`, `r2led`, ...: the backbone (prefixed by a non-ID item encoder), or the CTR model."""
    mc = config.experiment.model
    if config.is_ctr:
        return mc.name
    return mc.backbone if mc.item_encoder == "id" else f"{mc.item_encoder}-{mc.backbone}"


def run_record(config_path, config, run, report, total_seconds, error=None, load_at_start=None):
    """One `runs` entry from a `RunReport` (None when the run failed before ML Metadata had one)."""
    gate = config.pipeline.gate_metric
    data = config.experiment.data
    components = {}
    if report is not None:
        components = {c.component: {"state": c.state, "seconds": c.seconds} for c in report.components}
    return {
        "config": os.path.relpath(os.path.abspath(config_path), ROOT),
        "pipeline_name": config.pipeline_name,
        "dataset": data.dataset if not getattr(data, "interactions_path", None) else str(data.interactions_path),
        "task": "ctr" if config.is_ctr else "next-item",
        "model": model_label(config),
        "run": run,
        "total_seconds": total_seconds,
        "dag_seconds": None if report is None else report.wall_seconds,
        "components": components,
        "pushed": None if report is None else report.pushed_path,
        "not_pushed_reason": None if report is None else report.not_pushed_reason,
        "blessed": None if report is None else report.blessed,
        "gate_metric": {"name": gate, "value": None if report is None else report.metrics.get(gate)},
        "metrics": {} if report is None else report.metrics,
        "error": error,
        "load_average_at_start": load_at_start,
    }


def run_config(config_path, overrides, root, log=print):
    """The `first` and `cached` records of one pipeline config."""
    config = load_pipeline_config(config_path, [*overrides, f"pipeline.root={root}"])
    pipeline_root = Path(config.pipeline_root)
    if pipeline_root.exists():  # a fresh root for the first run (only ever under the benchmark's --root)
        shutil.rmtree(pipeline_root)
    records = []
    for run in RUNS:
        log(f"== {config_path} ({config.pipeline_name}): {run} run", flush=True)
        start, load_at_start = time.perf_counter(), list(os.getloadavg())
        error, report = None, None
        try:
            report = run_pipeline(config, log=lambda line: log(f"   {line}", flush=True))
        except PipelineRunError as err:
            error, report = str(err), err.report
        total = time.perf_counter() - start
        if report is not None:
            log(format_report(report), flush=True)
        records.append(run_record(config_path, config, run, report, total, error, load_at_start))
        if error is not None:
            log(f"   {run} run failed: {error}; skipping the rest of {config_path}", flush=True)
            break
    return records


def kept_records(out, configs):
    """`--merge`: the records of `<out>/pipeline.json` whose config is not re-run now (each keeps its own load average)."""
    path = out / "pipeline.json"
    if not path.is_file():
        return []
    rerun = {os.path.relpath(os.path.abspath(c), ROOT) for c in configs}
    return [r for r in json.loads(path.read_text())["runs"] if r["config"] not in rerun]


def aim_block(records):
    """Met when every first run on Beauty completed in under `AIM["seconds"]`."""
    checked = [
        {"config": r["config"], "total_seconds": r["total_seconds"],
         "met": r["error"] is None and r["total_seconds"] < AIM["seconds"]}
        for r in records if r["run"] == "first" and r["dataset"] == AIM["dataset"]
    ]
    return {
        "beauty_full_run_under_seconds": AIM["seconds"],
        "met": all(c["met"] for c in checked) if checked else None,
        "checked": checked,
    }


def _seconds(value):
    return "" if value is None else f"{value:.1f}"


def component_names(records):
    """Component names of all records in DAG order (a name new in a record goes after its predecessor there).

    >>> component_names([{"components": {"a": 0, "c": 0}}, {"components": {"a": 0, "b": 0, "c": 0}}])
    ['a', 'b', 'c']
    """
    names = []
    for r in records:
        previous = None
        for name in r["components"]:
            if name not in names:
                names.insert(names.index(previous) + 1 if previous is not None else 0, name)
            previous = name
    return names


def write_reports(payload, out):
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps(payload, indent=2))
    records, machine, aim = payload["runs"], payload["machine"], payload["aim"]
    lines = [
        "# TFX pipeline: wall time per component, first run vs cached rerun",
        "",
        "Written by `benchmarks/pipeline.py`; do not edit by hand. `LocalDagRunner`, Beam DirectRunner in "
        "process, on "
        f"{machine['usable_cores']} cores ({machine['cpu']}), shared with other jobs (`load_1m`: the 1-minute load average when "
        "each run started). `first`: fresh pipeline root; `cached`: the same inputs "
        "again (ExampleGen .. Trainer reused; the Evaluator re-runs against the new baseline and the Pusher "
        "pushes again). Seconds per component are ML Metadata execution times; `total_s` is the whole "
        "`run_pipeline` call (writing the ExampleGen input included). The R2LED (CTR) run trains on its "
        "config's user subsample (`data.max_train_samples`, see the config file) and gates on test AUC.",
        "",
        "## Runs",
        "",
    ]
    rows = [
        {
            "config": r["config"], "model": r["model"], "dataset": r["dataset"], "run": r["run"],
            "total_s": _seconds(r["total_seconds"]), "dag_s": _seconds(r["dag_seconds"]),
            "gate": r["gate_metric"]["name"],
            "gate_value": "" if r["gate_metric"]["value"] is None else round(r["gate_metric"]["value"], 4),
            "blessed": r["blessed"], "pushed": r["pushed"] or f"no: {r['not_pushed_reason'] or r['error']}",
            "load_1m": "" if not r.get("load_average_at_start") else f"{r['load_average_at_start'][0]:.1f}",
        }
        for r in records
    ]
    lines += [format_metrics_table(rows)] if rows else ["(no run yet)"]
    for config in dict.fromkeys(r["config"] for r in records):
        runs = {r["run"]: r for r in records if r["config"] == config}
        rows = []
        for name in component_names(runs.values()):
            row = {"component": name}
            for run in RUNS:
                c = runs.get(run, {}).get("components", {}).get(name, {"state": NOT_RUN, "seconds": None})
                row[f"{run} state"], row[f"{run} s"] = c["state"], _seconds(c["seconds"])
            rows.append(row)
        lines += ["", f"## {config}", "", format_metrics_table(rows)]
    met = {True: "met", False: "not met", None: "not evaluated (no Beauty run)"}[aim["met"]]
    lines += ["", "## Aim", "", f"A first (full) run on Amazon Beauty under {aim['beauty_full_run_under_seconds']} s: "
              f"**{met}**" + "".join(f"; {c['config']}: {c['total_seconds']:.0f} s" for c in aim["checked"])]
    (out / "pipeline.md").write_text("\n".join(lines) + "\n")
    plot_components(records, out / "pipeline_components.png", out / "pipeline.json")


def plot_components(records, path, source):
    """Horizontal bars: seconds per component, first vs cached, one panel per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    configs = list(dict.fromkeys(r["config"] for r in records))
    if not configs:
        return
    names = component_names(records)
    fig, axes = plt.subplots(1, len(configs), figsize=(5.5 * len(configs), 0.35 * len(names) + 1.8), squeeze=False)
    for ax, config in zip(axes[0], configs):
        runs = {r["run"]: r for r in records if r["config"] == config}
        y = np.arange(len(names))
        for j, run in enumerate(RUNS):
            comps = runs.get(run, {}).get("components", {})
            values = [comps.get(n, {}).get("seconds") or 0.0 for n in names]
            total = runs[run]["total_seconds"] if run in runs else None
            label = f"{run} ({total:.0f} s total)" if total is not None else f"{run} (not run)"
            ax.barh(y + (j - 0.5) * 0.4, values, 0.4, label=label)
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("seconds")
        ax.set_title(f"{Path(config).stem}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_plot(fig, path, source)  # stamped with the sha256 of `source` (the JSON)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="pipeline configs, run in this order")
    parser.add_argument("--root", default=str(ROOT / "runs" / "benchmarks" / "pipeline"),
                        help="pipeline.root of every run (each config's pipeline root under it is recreated)")
    parser.add_argument("--out", default=str(ROOT / "reports"))
    parser.add_argument("--merge", action="store_true",
                        help="keep the records of other configs already in <out>/pipeline.json (re-run some configs only)")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every config, e.g. pipeline.train_steps=5")
    args = parser.parse_args()
    missing = [c for c in args.configs if not os.path.isfile(c)]
    if missing:
        parser.error(f"config file(s) not found: {', '.join(missing)}")
    for path in args.configs:  # every config error before the first (long) run
        load_pipeline_config(path, args.overrides)
    payload = {"machine": machine_info(), "runs": kept_records(Path(args.out), args.configs) if args.merge else []}
    payload["aim"] = aim_block(payload["runs"])
    start = time.time()
    for path in args.configs:
        payload["runs"] += run_config(path, args.overrides, args.root)
        payload["aim"] = aim_block(payload["runs"])
        payload["machine"]["load_average_at_end"] = list(os.getloadavg())
        write_reports(payload, Path(args.out))  # partial results survive an interruption
    print(f"done in {time.time() - start:.0f}s -> {args.out}/pipeline.{{json,md}}, pipeline_components.png")


if __name__ == "__main__":
    main()

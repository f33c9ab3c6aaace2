"""Redraw report plots (and their markdown) from their JSON alone, no re-run.

    .venv/bin/python benchmarks/redraw.py                  # every known JSON under reports/
    .venv/bin/python benchmarks/redraw.py reports/dmesr-equal-epochs/dmesr.json

Each JSON is passed to the `write_reports(payload, out)` of the benchmark that
wrote it (chosen by file name, `WRITERS`), which rewrites the JSON unchanged,
the markdown and the plots, stamped by `_plots.save_plot`.
"""

import argparse
import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _plots import stale_plots  # noqa: E402

# JSON file name -> benchmark module (in benchmarks/) whose write_reports drew it.
WRITERS = {
    "backbones.json": "backbones",
    "dmesr.json": "dmesr",
    "history_store.json": "history_store",
    "pipeline.json": "pipeline",
    "r2led.json": "r2led",
    "scann.json": "retrieval_index",
    "serving.json": "serving",
}


def redraw(json_path):
    """Rewrite the reports of one benchmark JSON; returns the JSON path."""
    json_path = Path(json_path)
    if json_path.name not in WRITERS:
        raise ValueError(f"no benchmark writes {json_path.name}; known: {', '.join(sorted(WRITERS))}")
    before = json_path.read_bytes()
    module = importlib.import_module(WRITERS[json_path.name])
    module.write_reports(json.loads(before), json_path.parent)
    if json_path.read_bytes() != before:
        raise RuntimeError(f"redrawing changed {json_path}: its writer no longer reproduces it")
    return json_path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="*", help="benchmark JSON files (default: all under reports/)")
    args = parser.parse_args()
    paths = args.json or sorted(p for p in (ROOT / "reports").rglob("*.json") if p.name in WRITERS)
    for path in paths:
        print(f"redrew {redraw(path)}")
    problems = stale_plots(ROOT / "reports")
    print("\n".join(problems) if problems else "every plot under reports/ matches its JSON")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

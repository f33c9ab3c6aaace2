"""The docstring examples of `benchmarks/` run here.

`scripts/test.sh` collects doctests from `tfrec`, `export`, `tfx_pipeline` and
`tfrec_cli` only: `benchmarks/` holds scripts, and putting that directory on
`sys.path` (as pytest's collection would) lets them shadow installed packages.
So each benchmark module with examples is loaded by path under a private name,
with `benchmarks/` on `sys.path` only while it imports its sibling helpers
(`from _plots import save_plot`), and its examples run with `doctest`.
"""

import doctest
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
WITH_EXAMPLES = sorted(path.name for path in BENCHMARKS.glob("*.py") if ">>>" in path.read_text())


def load_benchmark(path):
    """The module of `benchmarks/<path>` under the name `benchmarks_<stem>` (not `sys.modules`' `<stem>`)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"benchmarks_{path.stem.lstrip('_')}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_the_benchmarks_with_examples_are_found():
    # The modules known to carry examples today; a new one joins by itself.
    assert {"_plots.py", "_serving_load.py", "pipeline.py", "retrieval_index.py", "serving.py"} <= set(WITH_EXAMPLES)


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_benchmark_docstring_examples_run(name):
    module = load_benchmark(BENCHMARKS / name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False, report=True)
    assert result.attempted > 0, f"benchmarks/{name}: no example ran (all skipped?)"
    assert result.failed == 0, f"benchmarks/{name}: {result.failed} of {result.attempted} examples failed (above)"

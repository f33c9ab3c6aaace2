"""The `tfrec` command prints only its own lines (tfrec/runtime.py), `--verbose` the rest.

Runs the real entry point in a fresh process (TensorFlow's start-up lines are
printed by C++ while it is imported, so only a new process shows them), on a
tiny interactions file so the command imports TensorFlow and finishes fast.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tfrec import runtime

ROOT = Path(__file__).resolve().parents[1]
# Start-up noise of TensorFlow and its dependencies on a CPU-only machine.
NOISE = (
    "Unable to register cuFFT factory",
    "Unable to register cuDNN factory",
    "Unable to register cuBLAS factory",
    "oneDNN custom operations are on",
    "Could not find cuda drivers",
    "TF-TRT Warning",
    "This TensorFlow binary is optimized",
    "which Google will stop supporting",
)


def run_tfrec(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_USE_LEGACY_KERAS")}
    env["PYTHONPATH"] = str(ROOT)
    code = "import sys; from tfrec_cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("log") / "log.tsv"
    rows = [f"u{u}\ti{(u + t) % 5}\t{t}" for u in range(4) for t in range(4)]
    path.write_text("user_id\titem_id\ttimestamp\n" + "\n".join(rows) + "\n")
    return path


def test_tfrec_prints_only_its_own_lines_and_verbose_brings_the_rest_back(tiny_log, tmp_path):
    quiet = run_tfrec(["prepare", "--input", str(tiny_log), "--out", str(tmp_path / "q")], tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.startswith("prepared 16 interactions")
    found = [line for line in (quiet.stdout + quiet.stderr).splitlines() if any(n in line for n in NOISE)]
    assert not found, found
    assert quiet.stderr.strip() == ""

    loud = run_tfrec(["--verbose", "prepare", "--input", str(tiny_log), "--out", str(tmp_path / "v")], tmp_path)
    assert loud.returncode == 0, loud.stderr
    assert loud.stdout == quiet.stdout.replace(str(tmp_path / "q"), str(tmp_path / "v"))
    # On this CPU-only machine the noise is there without the filter (so the check above means something).
    assert any(n in loud.stderr for n in NOISE), loud.stderr[:2000]


def test_only_known_noise_warnings_are_filtered():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime.configure(verbose=False)
        warnings.warn_explicit("google noise", FutureWarning, "x.py", 1,
                               module="google.api_core._python_version_support")
        warnings.warn_explicit("a real one", FutureWarning, "y.py", 1, module="tfrec.something")
        warnings.warn_explicit("other category", DeprecationWarning, "x.py", 2,
                               module="google.api_core._python_version_support")
    assert [str(w.message) for w in caught] == ["a real one", "other category"]

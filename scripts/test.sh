#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole test suite and
# every docstring example of tfrec, export, tfx_pipeline and tfrec_cli as a doctest
# (see conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TF_CPP_MIN_LOG_LEVEL=2 TF_CPU_ALLOCATOR_USE_BFC=true PYTHONHASHSEED=0
exec .venv/bin/python -m pytest tests tfrec export tfx_pipeline tfrec_cli --doctest-modules -q -p no:cacheprovider --timeout=900 --durations=10 "$@"

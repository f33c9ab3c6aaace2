#!/usr/bin/env bash
# The main job on the bundled data: prepare Amazon Beauty -> train SASRec ->
# evaluate (full ranking and 100 sampled negatives) -> print the metrics tables.
# Sets up .venv if needed. Extra arguments are config overrides (e.g. train.epochs=5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/tfrec train --config configs/sasrec_beauty.yaml "$@"

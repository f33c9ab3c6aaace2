#!/usr/bin/env bash
# The main job on the bundled data, end to end (sets up .venv if needed):
#   prepare Amazon Beauty -> encode item titles (MiniLM semantic store, reused when
#   unchanged) -> train DMESR-SASRec (short wall-time budget) -> evaluate (full ranking
#   and 100 sampled negatives) -> export SavedModels (recommender + brute-force and
#   ScaNN retrieval) -> start the model server -> ask it over gRPC for a real user's
#   top-10 (printed with titles) -> shut the server down.
# Extra arguments are training config overrides, e.g. train.max_train_seconds=900.
# Environment: MAIN_CONFIG (default configs/dmesr_sasrec_beauty.yaml), MAIN_BUDGET
# (training seconds, default 420), MAIN_OUT (default artifacts/main).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PYTHONWARNINGS=ignore  # TensorFlow start-up noise: hidden by tfrec itself (tfrec/runtime.py)
CONFIG=${MAIN_CONFIG:-configs/dmesr_sasrec_beauty.yaml}
BUDGET=${MAIN_BUDGET:-420}
OUT=${MAIN_OUT:-artifacts/main}
PREPARED=artifacts/prepared/amazon-beauty
TFREC=".venv/bin/python -m tfrec_cli"  # the `tfrec` command, whichever way the venv installed it
start=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }

step "1/6 prepare amazon-beauty"
$TFREC prepare --dataset amazon-beauty --out "$PREPARED"

step "2/6 encode item titles (semantic store; reused if inputs are unchanged)"
$TFREC encode --prepared "$PREPARED" --dataset amazon-beauty --out artifacts/semantics/amazon-beauty --progress-every 50

step "3/6 train + evaluate ($CONFIG, budget ${BUDGET}s)"
$TFREC train --config "$CONFIG" "train.max_train_seconds=$BUDGET" "$@"

step "4/6 export SavedModels + ScaNN index -> $OUT/servables"
rm -rf "$OUT/servables"
$TFREC export --config "$CONFIG" --out "$OUT/servables" --scann "$@"

step "5/6 start the model server (gRPC, loopback)"
SERVABLES=$(cd "$OUT/servables" && pwd)
cat > "$OUT/models.config" <<EOF
model_config_list {
  config { name: 'recommender' base_path: '$SERVABLES/recommender' model_platform: 'tensorflow' }
  config { name: 'retrieval_scann' base_path: '$SERVABLES/retrieval_scann' model_platform: 'tensorflow' }
}
EOF
LOG="$OUT/server.log"
$TFREC serve --model_config_file "$OUT/models.config" --port 0 --rest_api_port -1 > "$LOG" 2>&1 &
SERVER=$!
stop_server() {
  if kill -0 "$SERVER" 2>/dev/null; then
    kill -TERM "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
  fi
}
trap stop_server EXIT
ADDRESS=""
for _ in $(seq 1 240); do
  ADDRESS=$(sed -n 's/^tfrec serve: gRPC on //p' "$LOG" | head -1)
  [ -n "$ADDRESS" ] && break
  kill -0 "$SERVER" 2>/dev/null || { echo "model server exited:"; cat "$LOG"; exit 1; }
  sleep 0.5
done
[ -n "$ADDRESS" ] || { echo "model server did not start within 120 s:"; cat "$LOG"; exit 1; }
grep "^tfrec serve" "$LOG"

step "6/6 ask the server over gRPC for a real user's top-10"
$TFREC ask --address "$ADDRESS" --prepared "$PREPARED" --dataset amazon-beauty --user-index 0

step "shut down"
stop_server
trap - EXIT
tail -n 2 "$LOG"
echo "main job finished in $(( $(date +%s) - start ))s"

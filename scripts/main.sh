#!/usr/bin/env bash
# The main job on the bundled data, end to end (sets up .venv if needed):
#   prepare Amazon Beauty -> encode item titles (MiniLM semantic store, reused when
#   unchanged) -> train DMESR-SASRec (short wall-time budget) -> evaluate (full ranking
#   and 100 sampled negatives) -> export SavedModels (recommender + brute-force and
#   ScaNN retrieval) -> start the model server (SQLite history store under the run's
#   serving root) -> ask it over gRPC for a real user's top-10 (printed with titles) ->
#   post that user's events to POST /v1/events and ask for the top-10 by user id
#   (checked equal to the by-history answer) -> shut the server down.
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

step "1/7 prepare amazon-beauty"
$TFREC prepare --dataset amazon-beauty --out "$PREPARED"

step "2/7 encode item titles (semantic store; reused if inputs are unchanged)"
$TFREC encode --prepared "$PREPARED" --dataset amazon-beauty --out artifacts/semantics/amazon-beauty --progress-every 50

step "3/7 train + evaluate ($CONFIG, budget ${BUDGET}s)"
$TFREC train --config "$CONFIG" "train.max_train_seconds=$BUDGET" "$@"

step "4/7 export SavedModels + ScaNN index -> $OUT/servables"
rm -rf "$OUT/servables"
$TFREC export --config "$CONFIG" --out "$OUT/servables" --scann "$@"

step "5/7 start the model server (gRPC + REST, loopback; SQLite history store)"
SERVABLES=$(cd "$OUT/servables" && pwd)
cat > "$OUT/models.config" <<EOF
model_config_list {
  config { name: 'recommender' base_path: '$SERVABLES/recommender' model_platform: 'tensorflow' }
  config { name: 'retrieval_scann' base_path: '$SERVABLES/retrieval_scann' model_platform: 'tensorflow' }
}
EOF
LOG="$OUT/server.log"
SERVING_ROOT="$OUT/serving"
rm -rf "$SERVING_ROOT" && mkdir -p "$SERVING_ROOT"
STORE="sqlite://$(cd "$SERVING_ROOT" && pwd)/events.db"
$TFREC serve --model_config_file "$OUT/models.config" --port 0 --rest_api_port 0 --history_store "$STORE" \
  > "$LOG" 2>&1 &
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
REST_URL=""
for _ in $(seq 1 20); do
  REST_URL=$(sed -n 's/^tfrec serve: REST on //p' "$LOG" | head -1)
  [ -n "$REST_URL" ] && break
  sleep 0.5
done
[ -n "$REST_URL" ] || { echo "model server did not report its REST port:"; cat "$LOG"; exit 1; }
grep "^tfrec serve" "$LOG"

step "6/7 ask the server over gRPC for a real user's top-10"
$TFREC ask --address "$ADDRESS" --prepared "$PREPARED" --dataset amazon-beauty --user-index 0

step "7/7 ingest that user's events (POST /v1/events), then ask for the top-10 by user id"
$TFREC events ask --address "$ADDRESS" --rest_url "$REST_URL" --prepared "$PREPARED" --dataset amazon-beauty \
  --user-index 0

step "shut down"
stop_server
trap - EXIT
tail -n 2 "$LOG"
echo "main job finished in $(( $(date +%s) - start ))s"

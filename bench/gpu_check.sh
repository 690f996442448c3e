#!/usr/bin/env bash
# GPU check of dclgan-serve, for a lent CUDA machine (no network; PyTorch with CUDA and some onnxruntime).
#
#   bench/gpu_check.sh              # the real check: under 8 minutes on an H100/H200
#   bench/gpu_check.sh --dry-run    # every step with tiny sizes on the CPU (tests/deploy runs this)
#
# 1. prints onnxruntime's version and available providers, first;
# 2. bench/gpu_check.py engine: exports the default generator (ngf 64, 9 blocks, random weights) to ONNX
#    float32 + float16; if onnxruntime can really run on CUDA: provider check, parity against the CPU,
#    throughput at batch 1/8/32 at 256x256; always PyTorch on CUDA (float32 without TF32, bfloat16) as
#    the compute reference, which is the only GPU number when the CUDA provider is missing;
# 3. if onnxruntime runs on CUDA: the service on DCLGAN_DEVICES=cuda:0 under bench/serve_load.py, once
#    per precision, then SIGTERM (the drain must exit 0).
# Needs on that machine: torch, onnxruntime, numpy, pydantic, Pillow (training.export imports the
# service's model schema); onnx + onnxconverter-common for float16; the service's packages (fastapi,
# fastapi-offline, uvicorn, python-multipart, pydantic-settings, prometheus-client, httpx) for step 3.
# Step 1 lists what is missing; carry pure-Python ones in a folder on PYTHONPATH (pip install --target).
# Results: $OUT/gpu_check_results.md if $OUT is set, else ./gpu_check_results.md. Every step has a
# timeout that also never runs past GPU_CHECK_BUDGET_S (default 420 s; the last SIGTERM drain may add
# up to 30 s), and a service run starts only if its usual duration still fits.
set -euo pipefail

usage() { echo "usage: $0 [--dry-run]" >&2; exit 2; }
DRY_RUN=()
case $# in
  0) ;;
  1) [[ $1 == --dry-run ]] || usage; DRY_RUN=(--dry-run) ;;
  *) usage ;;
esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
RESULTS=${OUT:+$OUT/gpu_check_results.md}
RESULTS=${RESULTS:-$ROOT/gpu_check_results.md}
BUDGET_S=${GPU_CHECK_BUDGET_S:-420}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY=PASSIVE  # spinning onnxruntime/OpenMP threads would steal the cores the server needs

# Load levels and seconds per level for serve_load.py; a service run's usual duration; ORT CPU threads.
if [[ ${#DRY_RUN[@]} -gt 0 ]]; then
  LEVELS=1,2 LEVEL_S=0.5 RAW_S=0.3 WARM_S=0.3 LEG_USUAL_S=40 THREADS=1
else
  LEVELS=1,8,32 LEVEL_S=8 RAW_S=5 WARM_S=5 LEG_USUAL_S=90 THREADS=0
fi

WORK=$(mktemp -d)
SERVER_PID=""
log() { printf '[gpu_check %4ss] %s\n' "$SECONDS" "$*" >&2; }

# Run a command under `timeout`: at most $1 seconds, and never past the overall budget.
bounded() {
  local cap=$1 left=$((BUDGET_S - SECONDS))
  shift
  if ((left <= 0)); then
    log "time budget of $BUDGET_S s used up before: $*"
    return 124
  fi
  timeout "$((left < cap ? left : cap))" "$@"
}

# SIGTERM, then wait for the drain (bounded); sets SERVER_STATUS to the server's exit status.
SERVER_STATUS=""
stop_server() {
  local pid=$SERVER_PID
  SERVER_PID=""
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
    log "server did not exit within 30 s of SIGTERM: killed"
  fi
  SERVER_STATUS=0
  wait "$pid" || SERVER_STATUS=$?
}

# shellcheck disable=SC2317  # run by the EXIT trap, which shellcheck does not follow
cleanup() {
  if [[ -n $SERVER_PID ]]; then stop_server; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

SERVICE_MODULES="fastapi fastapi_offline uvicorn multipart pydantic_settings prometheus_client httpx"
log "1/3 onnxruntime providers, Python modules"
bounded 60 "$PY" -c 'import importlib.util, sys
import onnxruntime as ort
print("onnxruntime", ort.__version__, "available providers:", ort.get_available_providers(), flush=True)
wanted = "torch numpy pydantic PIL onnx onnxconverter_common".split() + sys.argv[1].split()
print("python modules missing:", [m for m in wanted if importlib.util.find_spec(m) is None] or "none")
' "$SERVICE_MODULES"

log "2/3 export, onnxruntime and PyTorch (results: $RESULTS)"
# A failed check (parity, provider) still lets the service step run; the script exits non-zero at the end.
ENGINE_STATUS=0
bounded 300 "$PY" bench/gpu_check.py engine --work "$WORK" --results "$RESULTS" "${DRY_RUN[@]}" \
  || ENGINE_STATUS=$?
if [[ ! -f $WORK/engine.env ]]; then
  log "step 2 stopped before it finished (status $ENGINE_STATUS)"
  exit 1
fi
# shellcheck source=/dev/null
source "$WORK/engine.env"  # SERVE_DEVICE, PRECISIONS, MODELS_DIR, DIRECTION, MAX_BATCH_SIZE
# A dry run drives one service run: the float16 one is the same code with another DCLGAN_PRECISION.
if [[ ${#DRY_RUN[@]} -gt 0 ]]; then PRECISIONS=float32; fi

# One service run: start it, wait for readiness, drive it with serve_load.py, report, SIGTERM it.
serve_leg() {
  local precision=$1 url
  export DCLGAN_MODELS_DIR=$MODELS_DIR DCLGAN_DEVICES=$SERVE_DEVICE DCLGAN_PRECISION=$precision \
    DCLGAN_HOST=127.0.0.1 DCLGAN_PORT=0 DCLGAN_MAX_BATCH_SIZE=$MAX_BATCH_SIZE \
    DCLGAN_INTRA_OP_THREADS=$THREADS DCLGAN_DRAIN_TIMEOUT_S=10 DCLGAN_ENGINE=onnxruntime  # auto: OpenVINO on a CPU
  "$PY" -m service >"$WORK/serve-$precision.log" 2>&1 &
  SERVER_PID=$!
  url=$(bounded 100 "$PY" bench/gpu_check.py wait-ready --log "$WORK/serve-$precision.log" \
    --pid "$SERVER_PID" --timeout 90)
  # The service warms up batch 1 only, and cuDNN's algorithm search runs on the first call of every
  # new batch size: an unmeasured pass at the highest concurrency meets most sizes before measuring.
  log "server ready at $url; unmeasured warm-up pass, then concurrency $LEVELS, $LEVEL_S s each"
  bounded 60 "$PY" bench/serve_load.py --url "$url" --direction "$DIRECTION" --models-dir "$MODELS_DIR" \
    --concurrency "${LEVELS##*,}" --seconds "$WARM_S" --raw-seconds 0.1 >/dev/null
  # serve_load.py opens the same ONNX file with these DCLGAN_* settings for its raw baseline.
  bounded 120 "$PY" bench/serve_load.py --url "$url" --direction "$DIRECTION" --models-dir "$MODELS_DIR" \
    --concurrency "$LEVELS" --seconds "$LEVEL_S" --raw-seconds "$RAW_S" | tee "$WORK/load-$precision.txt"
  bounded 30 "$PY" bench/gpu_check.py service-report --load "$WORK/load-$precision.txt" \
    --metrics-url "$url/metrics" --label "DCLGAN_DEVICES=$SERVE_DEVICE, $precision" --results "$RESULTS"
  stop_server
  echo "- exit status after SIGTERM (drain): $SERVER_STATUS" >>"$RESULTS"
  [[ $SERVER_STATUS == 0 ]] || { log "server exited $SERVER_STATUS after SIGTERM (expected 0)"; return 1; }
}

missing=$("$PY" -c 'import importlib.util, sys
print(" ".join(m for m in sys.argv[1].split() if importlib.util.find_spec(m) is None))' "$SERVICE_MODULES")
if [[ -z $SERVE_DEVICE ]]; then
  log "3/3 skipped: onnxruntime cannot run on CUDA here, so the service cannot either"
  printf '## Service\n\nNot run: onnxruntime has no usable CUDA provider here (see above).\n' >>"$RESULTS"
elif [[ -n $missing ]]; then
  log "3/3 skipped: the service's Python packages are missing: $missing"
  printf '## Service\n\nNot run: missing Python modules %s.\n' "$missing" >>"$RESULTS"
else
  for precision in $PRECISIONS; do
    if ((SECONDS + LEG_USUAL_S > BUDGET_S)); then
      log "3/3 service $precision skipped: it might not finish within $BUDGET_S s"
      printf '## Service, %s\n\nSkipped: out of time budget.\n\n' "$precision" >>"$RESULTS"
      continue
    fi
    log "3/3 service on $SERVE_DEVICE, $precision"
    serve_leg "$precision"
  done
fi
log "done in $SECONDS s: $RESULTS"
if ((ENGINE_STATUS != 0)); then
  log "a check of step 2 FAILED: see $RESULTS"
fi
exit "$ENGINE_STATUS"

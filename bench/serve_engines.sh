#!/usr/bin/env bash
# The service under a closed loop with each CPU engine and precision, one after the other, on one model
# (issue 13): onnxruntime float32 (the baseline), OpenVINO float32, OpenVINO with DCLGAN_PRECISION=auto
# (bfloat16 where the CPU has native bf16 kernels, else float32), and the default (engine auto, float32).
# Default thread policy; bench/serve_load.py also times the raw engine against raw onnxruntime float32 in
# the same run.
#   bench/serve_engines.sh [DIRECTION] [SIZE]        # e.g. under bench/quiet.sh 420 runs/serve-engines.txt
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
direction=${1:-horse2zebra} size=${2:-256} port=${DCLGAN_BENCH_PORT:-8031}
mkdir -p runs
for cfg in onnxruntime:float32 openvino:float32 openvino:auto auto:float32; do
  echo "=== $cfg"
  export DCLGAN_ENGINE=${cfg%%:*} DCLGAN_PRECISION=${cfg##*:}
  DCLGAN_PORT=$port .venv/bin/python -m service > "runs/serve-${cfg/:/-}.log" 2>&1 &
  pid=$!
  trap 'kill $pid 2>/dev/null' EXIT
  for _ in $(seq 240); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.5; done
  .venv/bin/python bench/serve_load.py --url "http://127.0.0.1:$port" --direction "$direction" --size "$size" \
      --concurrency 1,2,4 --seconds 10 --raw-seconds 8
  kill $pid; wait $pid || true
done

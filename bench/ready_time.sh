#!/usr/bin/env bash
# Seconds from starting the service to /readyz answering 200, for each DCLGAN_ENGINE in turn, ROUNDS times
# in alternation, on the bundled models; the process's peak and current RSS when ready; and what each instance
# serves (engine, precision, and the probe times where engine auto measured them). Start-up is where engine
# auto pays for its measurement (issue 13).
#   bench/ready_time.sh [ROUNDS] [ENGINES]      # e.g. bench/ready_time.sh 3 "openvino auto"
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
rounds=${1:-3} engines=${2:-openvino auto} port=${DCLGAN_BENCH_PORT:-8037}
mkdir -p runs
describe='
import json, sys
instances = [i for m in json.load(sys.stdin)["models"] for d in m["directions"] for i in d["instances"]]
probe = lambda i: i["probe_ms"] and {w: {k: round(v, 1) for k, v in ms.items()} for w, ms in i["probe_ms"].items()}
print("; ".join(" ".join([i["engine"], i["precision"], str(probe(i))]) for i in instances))'
for round in $(seq "$rounds"); do
  for engine in $engines; do
    start=$EPOCHREALTIME
    DCLGAN_ENGINE=$engine DCLGAN_PORT=$port .venv/bin/python -m service > "runs/ready-$engine.log" 2>&1 &
    pid=$!
    trap 'kill $pid 2>/dev/null' EXIT
    for _ in $(seq 1200); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.05; done
    ready=$EPOCHREALTIME
    served=$(curl -sf "http://127.0.0.1:$port/models" | .venv/bin/python -c "$describe")
    memory=$(awk '/^VmHWM|^VmRSS/ {printf "%s %d MB ", $1, $2 / 1024}' "/proc/$pid/status")
    echo "round $round engine=$engine ready after $(.venv/bin/python -c "print(f'{$ready - $start:.2f}')") s;" \
      "$memory; serves: $served"
    kill $pid
    wait $pid || true
  done
done

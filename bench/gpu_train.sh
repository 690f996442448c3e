#!/usr/bin/env bash
# DCLGAN training on a lent GPU machine with no network (PyTorch with CUDA there; nothing to fetch).
#
#   bench/gpu_train.sh --pack       # HERE, beforehand: pack the training data (+ wheels the GPU lacks)
#   bench/gpu_train.sh              # THERE: parity, speed, then train until the budget is spent
#   bench/gpu_train.sh --dry-run    # every step on the CPU with a tiny model and made-up images (tests)
#
# The pack (default runs/gpu_pack, an ignored folder; GPU_TRAIN_PACK overrides): trainA/trainB as
# JPEG re-encoded at the load size (286, 85% quality: about 35 MB for horse2zebra), the authors'
# dcl_step.pt record for the CUDA parity check, and wheels of the pure-Python packages the GPU
# machine's image lacks (pydantic, for the model contract the trainer imports). Carry it with the
# device tool (carry: ["runs/gpu_pack"]). The dataset's terms forbid committing it: it never is.
#
# Results go to $OUT (or runs/gpu_train_out): latest_net_G_A.pth, latest_net_G_B.pth (authors'
# layout; ngf 32, 9 blocks is 11 MB each in fp32), metrics.jsonl and gpu_train_results.json.
# GPU_TRAIN_BUDGET_S (default 540) bounds the whole run; one device call allows 600 s.
# Import the weights here with: dclgan import-official --checkpoints-dir <results> --epoch latest ...
set -euo pipefail

usage() { echo "usage: $0 [--pack | --dry-run]" >&2; exit 2; }
MODE=train
case $# in
  0) ;;
  1) case $1 in --pack) MODE=pack ;; --dry-run) MODE=dry ;; *) usage ;; esac ;;
  *) usage ;;
esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
PACK=${GPU_TRAIN_PACK:-$ROOT/runs/gpu_pack}
RESULTS=${OUT:-$ROOT/runs/gpu_train_out}
BUDGET_S=${GPU_TRAIN_BUDGET_S:-540}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
log() { printf '[gpu_train %4ss] %s\n' "$SECONDS" "$*" >&2; }

if [[ $MODE == pack ]]; then
  DATAROOT=${GPU_TRAIN_DATAROOT:-$ROOT/../shared/data/horse2zebra}
  RECORD=${GPU_TRAIN_RECORD:-$ROOT/../shared/reference/dclgan/dcl_step.pt}
  log "packing $DATAROOT into $PACK"
  "$PY" bench/pack_data.py --dataroot "$DATAROOT" --out "$PACK" --size "${GPU_TRAIN_LOAD_SIZE:-286}"
  cp "$RECORD" "$PACK/dcl_step.pt"
  mkdir -p "$PACK/wheels"
  # The GPU image runs Python 3.12 and has no pydantic; its other needs (numpy, Pillow, tqdm) are there.
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$PACK/wheels" \
    'pydantic>=2.7,<3' 'pydantic-core' 'annotated-types' 'typing-inspection'
  du -sh "$PACK" >&2
  exit 0
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [[ $MODE == dry ]]; then
  PACK=$WORK/pack
  "$PY" bench/pack_data.py --fake 6 --out "$PACK" --size 36
  RECORD=${GPU_TRAIN_RECORD:-$ROOT/../shared/reference/dclgan/dcl_step.pt}
  [[ -f $RECORD ]] && cp "$RECORD" "$PACK/dcl_step.pt"  # the parity check runs on the CPU too
  RESULTS=${OUT:-$WORK/out}
  BUDGET_S=${GPU_TRAIN_BUDGET_S:-60}
  ARGS=(--dry-run --threads 1)
else
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >&2
  ARGS=()
fi
[[ -f $PACK/pack.json ]] || { log "no pack at $PACK: run '$0 --pack' first, and carry it"; exit 2; }

if ! "$PY" -c 'import pydantic' 2>/dev/null; then
  shopt -s nullglob
  wheels=("$PACK"/wheels/*.whl)
  [[ ${#wheels[@]} -gt 0 ]] || { log "pydantic missing and no wheels in $PACK/wheels"; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "${wheels[@]}"
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi

log "budget ${BUDGET_S}s; results in $RESULTS"
timeout -s TERM "$((BUDGET_S + 30))" \
  "$PY" bench/gpu_train.py --pack "$PACK" --out "$RESULTS" --work "$WORK/run" --budget-s "$BUDGET_S" "${ARGS[@]}"
ls -l "$RESULTS" >&2
[[ $MODE == dry ]] && cat "$RESULTS/gpu_train_results.json"
exit 0

#!/usr/bin/env bash
# One-GPU check of issue 11 (models built into their placement), self-contained and short (~5 min):
# makes a random-weight Llama teacher (bf16, ~2.3 GB: 24 blocks at width 2048) under $WORK, caps this process's
# GPU memory below the teacher's size (torch.cuda.set_per_process_memory_fraction) and runs a cpu_offload plan
# and a sharded plan (one rank: its shard is the whole teacher, capped at the plan's peak + 10%), printing
# predicted vs measured torch.cuda.max_memory_allocated per phase (load / train / save). Exit 1 on a failure.
#   bash bench/gpu_check.sh [WORK_DIR]        (default /tmp/gkdc-gpu-check; needs a CUDA torch and deepspeed)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/gkdc-gpu-check}
PY=${PYTHON:-python}
export PYTHONPATH=$PWD
mkdir -p "$WORK"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs one GPU')"
if [ ! -f "$WORK/teacher/config.json" ]; then
  "$PY" bench/make_teacher.py "$WORK/teacher" --layers 24 --hidden 2048 --intermediate 5632
fi
RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=${MASTER_PORT:-29533} \
  "$PY" bench/gpu_check.py "$WORK/teacher" "$WORK"

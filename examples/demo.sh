#!/usr/bin/env bash
# The built-in example, end to end on a CPU with no download: check, plan, run, evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
GKDC=".venv/bin/gkdc"
OUT=${OUT:-runs/demo}
$GKDC check examples/tiny.gkd
$GKDC plan examples/tiny.gkd -o "$OUT/plan.json"
$GKDC run "$OUT/plan.json" --out "$OUT" ${RESUME:+--resume}
$GKDC eval "$OUT"/models/teacher "$OUT"/models/small "$OUT"/models/plain --data examples/data/heldout.txt \
  --seq-len 64 --json "$OUT/eval.json"

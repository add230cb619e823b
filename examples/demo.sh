#!/usr/bin/env bash
# The built-in example, end to end on a CPU with no download: plan (which checks the spec first), run, evaluate.
# Runs again from scratch each time (--overwrite); RESUME=1 continues an interrupted run instead.
# GKDC, OUT and MAX_STEPS may be set from outside (the tests run it with `python -m gkdc` and a few steps).
set -euo pipefail
cd "$(dirname "$0")/.."
GKDC=${GKDC:-.venv/bin/gkdc}
OUT=${OUT:-runs/demo}
$GKDC plan examples/tiny.gkd -o "$OUT/plan.json"
$GKDC run "$OUT/plan.json" --out "$OUT" ${RESUME:+--resume} ${RESUME:---overwrite} ${MAX_STEPS:+--max-steps $MAX_STEPS}
$GKDC eval "$OUT"/models/teacher "$OUT"/models/small "$OUT"/models/plain --data examples/data/heldout.txt \
  --seq-len 64 --json "$OUT/eval.json"
echo "the distilled student: $OUT/models/small (also $OUT/student); its baseline without a teacher: $OUT/models/plain"

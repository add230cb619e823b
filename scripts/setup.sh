#!/usr/bin/env bash
# Creates .venv and installs gkdc with its test dependencies.
# torch: on a machine without an NVIDIA GPU the CPU build is pinned (torch==2.13.0, a local wheel here);
# with a GPU, pip resolves pyproject's range to the CUDA build. Override with GKDC_TORCH="torch==X".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ -z "${GKDC_TORCH:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    GKDC_TORCH="torch>=2.4"
  else
    GKDC_TORCH="torch==2.13.0"
  fi
fi
.venv/bin/python -m pip install -q "$GKDC_TORCH"
.venv/bin/python -m pip install -q -e ".[test]"
# An editable install leaves gkdc's own modules uncompiled; where PYTHONDONTWRITEBYTECODE is set (CI images often
# do) every `gkdc check` would compile them again (~30 ms of a ~0.35 s check). Byte-compile them once, as a
# wheel install does; Python still recompiles any file edited later.
.venv/bin/python -m compileall -q gkdlang planner runtime gkdc >/dev/null
echo "gkdc installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"

#!/usr/bin/env bash
# The prepared GPU-node run of issue 14 (bench/README.md, "GPU node"): install the carried wheels
# (.whl/, from bench/gpu_wheels.sh) if any, then `python -m bench.gpu`, everything to $OUT.
#   on the device:  bash bench/gpu.sh --data .gpudata/xrays
#   dry run here:   PYTHON=.venv/bin/python OUT=/tmp/gpu bench/gpu.sh --cpu --data ../shared/data/xrays
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-test-output/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
# The wheels only where the product's packages are missing (the device image), never over a working venv.
if ! "$PY" -c "import celery, flask, sqlalchemy, pydantic" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import celery, flask, gunicorn, sqlalchemy, pydantic, timm, torch, torchvision" || exit 1
"$PY" -m bench.gpu --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu-console.log"

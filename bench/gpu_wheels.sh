#!/usr/bin/env bash
# Download, here, the wheels the product needs on a GPU device machine (Python 3.12, Linux x86-64)
# into .whl/ (git-ignored; never committed). bench/gpu.sh installs them there; the `run` call names
# ".whl" in carry. The list is bench/gpu_wheels.py: this checkout's pinned versions of what the
# device image lacks (Celery, Flask, SQLAlchemy, pydantic, ...). Re-running keeps one version of each.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${TRIAGE_VENV:-.venv}/bin/python"
mkdir -p .whl
mapfile -t wanted < <("$PYTHON" -m bench.gpu_wheels)
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "${wanted[@]}"
# Keep exactly the wanted versions: a second version of a package stops the whole install there.
"$PYTHON" - "${wanted[@]}" <<'PY'
import re, sys
from pathlib import Path

wanted = {re.sub(r"[-_.]+", "-", spec.split("==")[0]).lower(): spec.split("==")[1] for spec in sys.argv[1:]}
for wheel in Path(".whl").glob("*.whl"):
    name, version = wheel.name.split("-")[:2]
    if wanted.get(re.sub(r"[-_.]+", "-", name).lower()) != version:
        print(f"removing {wheel.name} (not in the list)")
        wheel.unlink()
PY
echo "$(ls .whl/*.whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/ (the device's 64 MiB limit counts them with the tree)"

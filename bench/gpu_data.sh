#!/usr/bin/env bash
# Copy the radiographs bench.gpu reads into .gpudata/xrays (git-ignored): ../shared does not travel to the
# device machine, so the `run` call names ".gpudata" in carry. Default: the test split (10 MB).
# `--train [N]` adds the first N images per class of train and val (default 300) for --train-epochs;
# keep .whl + .gpudata + the tree under the device's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCE="${TRIAGE_SHARED_DATA:-../shared/data}/xrays"
rm -rf .gpudata/xrays
mkdir -p .gpudata/xrays
cp -r "$SOURCE/test" .gpudata/xrays/
if [ "${1:-}" = "--train" ]; then
  per_class="${2:-300}"
  for split in train val; do
    for class_dir in "$SOURCE/$split"/*/; do
      target=".gpudata/xrays/$split/$(basename "$class_dir")"
      mkdir -p "$target"
      find "$class_dir" -maxdepth 1 -name '*.jpg' | sort | head -n "$per_class" | xargs -r cp -t "$target"
    done
  done
fi
echo ".gpudata: $(du -sh .gpudata | cut -f1)"

"""In-process engine vs the original one-image-at-a-time loop, measured in one run.

    .venv/bin/python -m bench.engine [--arch tf_efficientnetv2_s] [--images 512] [--runtimes torch,onnx,onnx-int8]

Random weights (timing only). The engine is the worker's own code: the content store, decode
threads one batch ahead (`core.ml.decoding.decoded_batches`), the version's preprocessing and a
batched forward pass (`core.ml.predict`). The fp32 engine must agree with the loop to 1e-4.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import git_revision, machine_line, make_jpegs, original_loop
from core.config import load_settings
from core.ml.modelio import create_model, save_weights
from core.ml.decoding import decoded_batches
from core.ml.runtimes import load_predictor
from core.ml.transforms import DecodeOptions
from core.preprocessing import default_preprocessing
from core.registry import ModelSpec, weights_path
from core.storage import ContentStore
from core.studies import ClaimedImage


def run_engine(predictor, store: ContentStore, keys: list[str], batch_size: int, options: DecodeOptions = DecodeOptions()) -> tuple[np.ndarray, float]:  # type: ignore[no-untyped-def]
    """Decode ahead + batched forward over every key; returns (probabilities, seconds)."""
    rows = [ClaimedImage(index, key) for index, key in enumerate(keys)]
    start = time.perf_counter()
    outputs = []
    for batch in decoded_batches(rows, store, batch_size, 10**9, max(1, min(8, os.cpu_count() or 1)), options, predictor.transform):
        outputs.append(predictor.predict_tensor(torch.stack([decoded.tensor for _, decoded in batch])))
    return np.concatenate(outputs), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print images/s and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tf_efficientnetv2_s")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--loop-images", type=int, default=128, help="images for the (slow) original loop")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--runtimes", default="torch,onnx,onnx-int8")
    args = parser.parse_args(argv)

    print(f"machine: {machine_line()}; commit {git_revision()}")
    images = make_jpegs(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings({}, data_dir=Path(tmp), batch_size=args.batch_size, device="auto")
        store = ContentStore(settings.storage_dir)
        keys = [store.put_bytes(data)[1] for data in images]
        torch.manual_seed(0)
        labels = ["comminuted_fracture", "no_fracture", "simple_fracture"]
        model = create_model(args.arch, num_classes=len(labels)).eval()
        staged = save_weights(model, Path(tmp) / "w.safetensors")
        from core.storage import sha256_file

        digest = sha256_file(staged)
        target = weights_path(settings, digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        staged.replace(target)
        spec = ModelSpec(1, args.arch, labels, default_preprocessing(args.image_size), 0.8, 1.0, digest)

        loop_images = images[: args.loop_images]
        original_loop(model, loop_images[:4], args.image_size)  # warm-up
        start = time.perf_counter()
        loop_probs = original_loop(model, loop_images, args.image_size)
        loop_rate = len(loop_images) / (time.perf_counter() - start)
        print(f"original loop (batch 1, {len(loop_images)} images): {loop_rate:7.1f} images/s  1.00x")

        for runtime in [r for r in args.runtimes.split(",") if r]:
            runtime_settings = settings.model_copy(update={"runtime": runtime})
            if runtime == "onnx-int8":
                from core.ml.quantize import calibration_images, quantize_int8
                from bench.common import SHARED_XRAYS

                quantize_int8(runtime_settings, spec, calibration_images(SHARED_XRAYS / "val", 64))
            predictor = load_predictor(spec, runtime_settings)
            run_engine(predictor, store, keys[: args.batch_size], args.batch_size)  # warm-up
            probs, seconds = run_engine(predictor, store, keys, args.batch_size)
            rate = len(keys) / seconds
            diff = float(np.abs(probs[: len(loop_images)] - loop_probs).max())
            agree = float((probs[: len(loop_images)].argmax(1) == loop_probs.argmax(1)).mean())
            print(f"engine {runtime:<9} (batch {args.batch_size}, {len(keys)} images): {rate:7.1f} images/s  {rate / loop_rate:4.2f}x  "
                  f"max |p - p_loop| = {diff:.2e}, label agreement {agree:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

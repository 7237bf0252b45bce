"""Large radiographs: full decode + resize vs the fast path (DCT-domain downscaled, luminance-only decode).

    .venv/bin/python -m bench.large_jpeg [--version ID] [--images 40]

Times both paths on 2000x2500 JPEGs made from real radiographs, then checks that the labels of a
model agree between the paths on every image of ../shared/data/xrays/test, as stored and
upscaled to 2000x2500 (where draft mode actually downscales). With --version the registered
version (TRIAGE_* settings) is used; without it, a random-init tiny model (timing only).
"""

from __future__ import annotations

import argparse
import io
import sys
import time

import numpy as np
from PIL import Image

from bench.common import SHARED_XRAYS, git_revision, jpeg_bytes, machine_line, source_images
from core.config import get_settings
from core.imaging import decode_image
from core.ml.transforms import DecodeOptions, build_transform, decode_options
from core.preprocessing import default_preprocessing


def _time(paths_bytes: list[bytes], transform, options: DecodeOptions) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for data in paths_bytes:
        transform(decode_image(data, 10**9, draft_size=options.draft_size, grey=options.grey))
    return (time.perf_counter() - start) / len(paths_bytes)


def _predictor(version: int | None):  # type: ignore[no-untyped-def]
    from core import registry
    from core.db import Database
    from core.ml.predict import Predictor

    settings = get_settings()
    if version is None:
        import tempfile
        from pathlib import Path

        import torch

        from core.ml.modelio import create_model, save_weights

        torch.manual_seed(0)
        path = save_weights(create_model("test_efficientnet", 2), Path(tempfile.mkdtemp()) / "w.safetensors")
        spec = registry.ModelSpec(0, "test_efficientnet", ["fracture", "no_fracture"], default_preprocessing(224), 0.8, 1.0, "0" * 64)
        return Predictor(spec, path, device="cpu")
    with Database(settings).transaction() as session:
        spec = registry.ModelSpec.from_version(registry.get_version(session, version))
    return Predictor(spec, registry.weights_path(settings, spec.weights_sha256), device=settings.device)


def _labels(predictor, blobs: list[bytes], options: DecodeOptions) -> np.ndarray:  # type: ignore[no-untyped-def]
    out = []
    for start in range(0, len(blobs), 32):
        images = [decode_image(b, 10**9, draft_size=options.draft_size, grey=options.grey) for b in blobs[start : start + 32]]
        out.append(predictor.predict_tensor(predictor.preprocess(images)).argmax(1))
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--version", type=int, help="registered model version for the agreement check")
    args = parser.parse_args(argv)
    print(f"machine: {machine_line()}; commit {git_revision()}")

    predictor = _predictor(args.version)
    _, height, width = predictor.spec.preprocessing.input_size
    full, fast = DecodeOptions(), decode_options(predictor.spec.preprocessing, fast_jpeg_decode=True)
    transform = build_transform(predictor.spec.preprocessing, training=False)
    large = [jpeg_bytes(path, (2000, 2500), salt=i + 1) for i, path in enumerate(source_images(args.images))]
    _time(large[:3], transform, full)
    slow = _time(large, transform, full)
    quick = _time(large, transform, fast)
    print(f"2000x2500 JPEG -> {width}x{height} tensor: full decode + resize {slow * 1000:.1f} ms, "
          f"fast path (draft + grey) decode + resize {quick * 1000:.1f} ms: {slow / quick:.1f}x faster")
    small = [jpeg_bytes(path, (512, 512), salt=i + 1) for i, path in enumerate(source_images(args.images))]
    _time(small[:3], transform, full)
    slow, quick = _time(small, transform, full), _time(small, transform, fast)
    print(f"512x512 JPEG -> {width}x{height} tensor: full decode + resize {slow * 1000:.2f} ms, fast path {quick * 1000:.2f} ms: {slow / quick:.1f}x faster")

    test_files = sorted((SHARED_XRAYS / "test").glob("*/*.jpg"))
    as_stored = [p.read_bytes() for p in test_files]
    upscaled = []
    for p in test_files:
        image = Image.open(p).convert("RGB").resize((2000, 2500), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=92)
        upscaled.append(buffer.getvalue())
    name = f"version #{args.version}" if args.version else "random tiny model (timing only)"
    for title, blobs in (("as stored", as_stored), ("upscaled to 2000x2500", upscaled)):
        agree = float((_labels(predictor, blobs, full) == _labels(predictor, blobs, fast)).mean())
        print(f"label agreement, fast path vs full decode, xrays/test {title} ({len(blobs)} images, {name}): {agree:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

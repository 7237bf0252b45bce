"""int8 vs fp32 label agreement of a trained, registered model version on xrays/test.

    TRIAGE_DATA_DIR=... .venv/bin/python -m bench.int8 --version ID [--calibration-count 256]

Builds the version's int8 ONNX runtime calibrated on ../shared/data/xrays/val (as
`triage model quantize` does) and compares its labels with the torch fp32 model on every test image.
Speed is measured end to end by `bench.e2e --runtime onnx-int8`.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from bench.common import SHARED_XRAYS, git_revision, machine_line
from core import registry
from core.config import get_settings
from core.db import Database
from core.imaging import decode_image
from core.ml.predict import FLAG_UNFAMILIAR
from core.ml.quantize import calibration_images, quantize_int8
from core.ml.runtimes import load_predictor


def main(argv: list[str] | None = None) -> int:
    """Run the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", type=int, required=True)
    parser.add_argument("--calibration-count", type=int, default=256, help="val images: half calibrate, half pick the percentile")
    parser.add_argument("--min-speedup", type=float, default=1.0, help="as `triage model quantize --min-speedup`")
    args = parser.parse_args(argv)
    print(f"machine: {machine_line()}; commit {git_revision()}")
    settings = get_settings()
    with Database(settings).transaction() as session:
        spec = registry.ModelSpec.from_version(registry.get_version(session, args.version))
    build = quantize_int8(settings, spec, calibration_images(SHARED_XRAYS / "val", args.calibration_count), min_speedup=args.min_speedup)
    if not build.installed:
        raise SystemExit(f"no int8 runtime installed: {build.refused_because}")
    print(f"quantized: activation percentile {build.percentile}, {build.weights} weights chosen on {build.held_out} held-out val images "
          f"(label agreement there, speed-up over fp32: "
          f"{', '.join(f'{p}/{w}: {a:.1%} {build.speedups[(p, w)]:.2f}x' for (p, w), a in build.tried.items())}); of the {build.unflagged} "
          f"held-out images fp32 leaves unflagged (threshold {spec.threshold:.3f}), int8 keeps {build.unflagged_kept} with the same label and no flag")
    print(f"kept in float: {'the first layers, up to ' + build.float_prefix[-1] if build.float_prefix else 'the stem only'}")
    fp32 = load_predictor(spec, settings.model_copy(update={"runtime": "torch"}))
    int8 = load_predictor(spec, settings.model_copy(update={"runtime": "onnx-int8"}))
    files = sorted((SHARED_XRAYS / "test").glob("*/*.jpg"))
    truth = np.array([spec.labels.index(p.parent.name) if p.parent.name in spec.labels else -1 for p in files])
    labels: dict[str, list[np.ndarray]] = {"fp32": [], "int8": []}
    accepted: dict[str, list[bool]] = {"fp32": [], "int8": []}
    unfamiliar: dict[str, list[bool]] = {"fp32": [], "int8": []}
    top_fp32: list[np.ndarray] = []
    seconds = {"fp32": 0.0, "int8": 0.0}
    for start in range(0, len(files), 32):
        batch = fp32.preprocess([decode_image(p.read_bytes(), 10**9) for p in files[start : start + 32]])
        for name, predictor in (("fp32", fp32), ("int8", int8)):
            clock = time.perf_counter()
            results = predictor.predict_preprocessed(list(batch))  # the worker's whole rule: unsure and unfamiliar flags
            seconds[name] += time.perf_counter() - clock
            labels[name].append(np.array([spec.labels.index(r.label) for r in results]))
            accepted[name] += [not r.flagged for r in results]
            unfamiliar[name] += [r.flag_kind == FLAG_UNFAMILIAR for r in results]
            if name == "fp32":
                top_fp32.append(np.array([r.confidence for r in results]))
    a, b = np.concatenate(labels["fp32"]), np.concatenate(labels["int8"])
    print(f"version #{spec.version_id} {spec.architecture}: int8 vs fp32 label agreement on xrays/test ({len(files)} images): {(a == b).mean():.2%}")
    fp32_ok, int8_ok = np.array(accepted["fp32"]), np.array(accepted["int8"])
    kept = fp32_ok & int8_ok & (a == b)
    print(f"of the {int(fp32_ok.sum())} test images fp32 accepts without review, int8 accepts {int(kept.sum())} with the same label "
          f"({kept.sum() / max(fp32_ok.sum(), 1):.2%}); int8 accepts {int((int8_ok & ~fp32_ok).sum())} that fp32 sends to review")
    same_flag = np.mean(np.array(unfamiliar["fp32"]) == np.array(unfamiliar["int8"]))
    print(f"flagged unfamiliar: fp32 {np.mean(unfamiliar['fp32']):.1%}, int8 {np.mean(unfamiliar['int8']):.1%} of the test images "
          f"(int8 {'with its rescaled reference' if build.rescaled_reference else 'with the fp32 reference'}); same decision on {same_flag:.1%}")
    # How far from a coin toss the fp32 model is: a barely trained model leaves many images near
    # the decision boundary, where any int8 noise flips the label.
    top = np.concatenate(top_fp32)
    boundary = 1.0 / len(spec.labels) + 0.1
    confident = top >= boundary
    print(f"fp32 top probability < {boundary:.2f} on {1 - confident.mean():.1%} of the images; "
          f"agreement on the other {confident.mean():.1%}: {(a == b)[confident].mean():.2%}")
    if (truth >= 0).all():
        print(f"accuracy fp32 {(a == truth).mean():.2%}, int8 {(b == truth).mean():.2%}")
    print(f"model-only time: fp32 {seconds['fp32']:.1f} s, int8 {seconds['int8']:.1f} s ({seconds['fp32'] / seconds['int8']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""int8 vs fp32 label agreement of a trained, registered model version on xrays/test.

    TRIAGE_DATA_DIR=... .venv/bin/python -m bench.int8 --version ID [--calibration-count 256]

Builds the version's int8 ONNX runtime calibrated on ../shared/data/xrays/val (as
`triage model quantize` does) and compares its labels with the torch fp32 model on every test image,
timing it against torch and ONNX Runtime fp32.
Reports int8 by itself and as served, with fp32's second opinion on the images near a decision.
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
    print(f"quantized: activation percentile {build.percentile}, {build.weights} weights chosen on {build.held_out} held-out val images "
          f"(label agreement there, share asked to fp32, speed-up over fp32 with those runs: "
          f"{', '.join(f'{p}/{w}: {a:.1%} {build.asked[(p, w)]:.1%} {build.speedups[(p, w)]:.2f}x' for (p, w), a in build.tried.items())}); "
          f"of the {build.unflagged} held-out images fp32 leaves unflagged (threshold {spec.threshold:.3f}), int8 alone keeps "
          f"{build.unflagged_kept} with the same label and no flag")
    if not build.installed:
        raise SystemExit(f"no int8 runtime installed: {build.refused_because}")
    print(f"kept in float: {'the first layers, up to ' + build.float_prefix[-1] if build.float_prefix else 'the stem only'}")
    margins = build.second_opinion
    assert margins is not None
    print(f"second opinion: fp32 decides images within {margins.log_odds_margin:.3f} of the threshold's top-class log-odds or "
          f"{margins.score_margin:.2%} of the unfamiliar cut ({build.asked_share:.1%} of the held-out images)")
    served = load_predictor(spec, settings.model_copy(update={"runtime": "onnx-int8"}))
    alone = load_predictor(spec, settings.model_copy(update={"runtime": "onnx-int8"}))
    alone.second_opinion = None  # type: ignore[attr-defined]  # int8 by itself, to show what the second opinion adds
    # "fp32" (PyTorch) is the reference for labels and flags; ONNX Runtime fp32 is what a CPU worker
    # serves without int8 (TRIAGE_RUNTIME=auto), so speed-ups are given against both.
    runtimes = {"fp32": load_predictor(spec, settings.model_copy(update={"runtime": "torch"})),
                "fp32 onnx": load_predictor(spec, settings.model_copy(update={"runtime": "onnx"})), "int8 alone": alone, "int8 served": served}
    files = sorted((SHARED_XRAYS / "test").glob("*/*.jpg"))
    truth = np.array([spec.labels.index(p.parent.name) if p.parent.name in spec.labels else -1 for p in files])
    labels: dict[str, list[np.ndarray]] = {name: [] for name in runtimes}
    accepted: dict[str, list[bool]] = {name: [] for name in runtimes}
    unfamiliar: dict[str, list[bool]] = {name: [] for name in runtimes}
    top: dict[str, list[float]] = {name: [] for name in runtimes}
    seconds = dict.fromkeys(runtimes, 0.0)
    for start in range(0, len(files), 32):
        batch = runtimes["fp32"].preprocess([decode_image(p.read_bytes(), 10**9) for p in files[start : start + 32]])
        for name, predictor in runtimes.items():
            clock = time.perf_counter()
            results = predictor.predict_preprocessed(list(batch))  # the worker's whole rule: unsure and unfamiliar flags
            seconds[name] += time.perf_counter() - clock
            labels[name].append(np.array([spec.labels.index(r.label) for r in results]))
            accepted[name] += [not r.flagged for r in results]
            unfamiliar[name] += [r.flag_kind == FLAG_UNFAMILIAR for r in results]
            top[name] += [r.confidence for r in results]
    asked_share = served.second_opinions_asked / len(files)  # type: ignore[attr-defined]
    print(f"version #{spec.version_id} {spec.architecture} on xrays/test ({len(files)} images); the served int8 runtime asked fp32 "
          f"about {asked_share:.1%} of them")
    fp32_labels, fp32_ok = np.concatenate(labels["fp32"]), np.array(accepted["fp32"])
    # How far from a coin toss the fp32 model is: a barely trained model leaves many images near
    # the decision boundary, where any int8 noise flips the label.
    boundary = 1.0 / len(spec.labels) + 0.1
    confident = np.array(top["fp32"]) >= boundary
    for name in ("int8 alone", "int8 served"):
        same = np.concatenate(labels[name]) == fp32_labels
        ok = np.array(accepted[name])
        kept = fp32_ok & ok & same
        print(f"{name}: label agreement with fp32 {same.mean():.2%} ({same[confident].mean():.2%} where fp32's top probability "
              f">= {boundary:.2f}, {confident.mean():.1%} of the images); of the {int(fp32_ok.sum())} images fp32 accepts without "
              f"review, {int(kept.sum())} accepted with the same label ({kept.sum() / max(fp32_ok.sum(), 1):.2%}); "
              f"{int((ok & ~fp32_ok).sum())} accepted that fp32 sends to review; flagged unfamiliar {np.mean(unfamiliar[name]):.1%} "
              f"(fp32 {np.mean(unfamiliar['fp32']):.1%}, same decision on {np.mean(np.array(unfamiliar[name]) == np.array(unfamiliar['fp32'])):.1%})")
    if (truth >= 0).all():
        print("accuracy: " + ", ".join(f"{name} {(np.concatenate(labels[name]) == truth).mean():.2%}" for name in runtimes))
    print("model-only time: " + ", ".join(f"{name} {seconds[name]:.1f} s ({seconds['fp32'] / seconds[name]:.2f}x torch fp32, "
                                          f"{seconds['fp32 onnx'] / seconds[name]:.2f}x onnx fp32)" for name in runtimes))
    return 0


if __name__ == "__main__":
    sys.exit(main())

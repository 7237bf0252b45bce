"""How far a registered version can be trusted: accuracy, certified coverage, unfamiliar-image flags.

    TRIAGE_DATA_DIR=... .venv/bin/python -m bench.trust --version ID [--data ../shared/data/xrays]

On the data set's test split (through the worker's predictor and rule): accuracy, AUC, the
coverage and realised error among unflagged images for certified thresholds chosen on the val
split at several error targets (Clopper–Pearson, delta 0.05), and the unfamiliar-flag rate; then
the unfamiliar-flag rate on images that are not this data set's radiographs: scikit-image's sample
photographs, generated non-images (noise, flat frames, text, gradients) and the DICOM radiograph of
another body part and source in ../shared/data/dicom.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bench.common import SHARED_XRAYS, git_revision, machine_line
from core import registry
from core.config import get_settings
from core.db import Database
from core.imaging import decode_image
from core.ml.predict import FLAG_UNFAMILIAR, Predictor
from core.ml.runtimes import load_predictor
from trainer.calibrate import choose_threshold, softmax
from trainer.data import eval_tensors, list_samples
from trainer.evaluate import classification_report


def photographs() -> list[Image.Image]:
    """scikit-image's sample pictures (photographs, micrographs, text, a logo): none is a radiograph."""
    import skimage.data as data

    names = ["astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass", "gravel",
             "horse", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina", "rocket", "text"]
    pictures = []
    for name in names:
        array = np.asarray(getattr(data, name)())
        pictures.append(Image.fromarray(array.astype(np.uint8) * (255 if array.dtype == bool else 1)).convert("RGB"))
    return pictures


def generated_non_images(seed: int = 0) -> list[Image.Image]:
    """Noise, flat frames, gradients and typed text: what a wrong upload or a blank detector gives."""
    rng = np.random.default_rng(seed)
    pictures = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(3)]
    pictures += [Image.new("RGB", (256, 256), (v, v, v)) for v in (0, 128, 255)]
    ramp = np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (256, 1))
    pictures += [Image.fromarray(ramp).convert("RGB"), Image.fromarray(ramp.T.copy()).convert("RGB")]
    for text in ("Discharge summary: patient seen in clinic", "INVOICE 2026-11 total due"):
        page = Image.new("RGB", (320, 240), "white")
        draw = ImageDraw.Draw(page)
        for line in range(8):
            draw.text((10, 10 + 28 * line), text, fill="black")
        pictures.append(page)
    return pictures


def _unfamiliar_share(predictor: Predictor, pictures: list[Image.Image]) -> tuple[float, int]:
    results = predictor.predict_images(pictures)
    return sum(r.flag_kind == FLAG_UNFAMILIAR for r in results) / max(len(results), 1), len(results)


def main(argv: list[str] | None = None) -> int:
    """Print the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", type=int, required=True)
    parser.add_argument("--data", type=Path, default=SHARED_XRAYS)
    parser.add_argument("--targets", default="0.02,0.05,0.10", help="error targets to certify on val")
    args = parser.parse_args(argv)
    print(f"machine: {machine_line()}; commit {git_revision()}")
    settings = get_settings()
    with Database(settings).transaction() as session:
        spec = registry.ModelSpec.from_version(registry.get_version(session, args.version))
    predictor = load_predictor(spec, settings)
    assert predictor.reference is not None, "this version has no unfamiliar-image reference"
    outputs = {}
    for split in ("val", "test"):
        images, targets, _ = eval_tensors(list_samples(args.data, split, spec.labels), spec.preprocessing, settings.max_image_pixels)
        logits, features = predictor.predict_outputs(images)
        outputs[split] = (softmax(logits, spec.temperature), targets.numpy(), predictor.reference.scores(features), predictor.input_problems(images))
    probs, targets, scores, problems = outputs["test"]
    cut = predictor.reference.cut
    report = classification_report(probs, targets, spec.labels, spec.threshold, unfamiliar_scores=scores, unfamiliar_cut=cut, input_problems=problems)
    print(f"version #{spec.version_id} {spec.architecture} on {args.data / 'test'} ({report['n']} images): "
          f"accuracy {report['accuracy']:.4f}, AUC {report['auc']:.4f}; unfamiliar {report['unfamiliar_rate']:.1%}")
    print(f"  as registered (threshold {spec.threshold:.4f}): coverage {report['coverage']:.1%}, error among unflagged "
          f"{report['error_unflagged']:.2%} (95% interval {report['error_unflagged_interval'][0]:.2%}-{report['error_unflagged_interval'][1]:.2%})")
    val_probs, val_targets, val_scores, val_problems = outputs["val"]
    familiar = ~predictor.reference.is_unfamiliar(val_scores, val_problems)
    for target in (float(t) for t in args.targets.split(",")):
        choice = choose_threshold(val_probs, val_targets, "error", target_error=target, eligible=familiar)
        at = classification_report(probs, targets, spec.labels, choice.threshold, unfamiliar_scores=scores, unfamiliar_cut=cut, input_problems=problems)
        print(f"  certified {target:.0%} on val ({'met' if choice.met else 'NOT certifiable'}, bound {choice.bound:.2%}, val coverage "
              f"{choice.coverage:.1%}): test coverage {at['coverage']:.1%}, error among unflagged {at['error_unflagged']:.2%} "
              f"({at['errors_unflagged']}/{at['unflagged']}, 95% interval {at['error_unflagged_interval'][0]:.2%}-{at['error_unflagged_interval'][1]:.2%})")
    share, count = _unfamiliar_share(predictor, photographs())
    print(f"unfamiliar: photographs and drawings (scikit-image samples) {share:.1%} of {count}")
    share, count = _unfamiliar_share(predictor, generated_non_images())
    print(f"unfamiliar: generated non-images (noise, flat, gradients, text) {share:.1%} of {count}")
    dicom = sorted((args.data.parent / "dicom").glob("*.dcm"))
    if dicom:
        share, count = _unfamiliar_share(predictor, [decode_image(p.read_bytes(), 10**9) for p in dicom])
        print(f"unfamiliar: DICOM CR of a tibia from another source {share:.1%} of {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ONNX Runtime inference: fp32 export and int8 static quantization of a registered version.

Runtimes are built from the registered weights and cached on disk under a key derived from the
weights' sha256, the architecture and the input size, so a cache can never serve another version.
The int8 model is calibrated on real images (the validation split) with QDQ static quantization,
per-channel weights and percentile activation ranges, the percentile chosen by label agreement with
fp32 on held-out images; build it once with ``triage model quantize``, which reports that agreement.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from core.config import Settings
from core.imaging import ImageDecodeError, decode_image
from core.ml.modelio import create_model, load_state_dict_file, load_weights, logits_and_features
from core.ml.predict import Predictor, load_reference, probabilities_from_logits, spec_reference_file
from core.ml.transforms import build_transform
from core.registry import ModelSpec, weights_path

log = logging.getLogger(__name__)

ONNX_OPSET = 17


class RuntimeUnavailable(RuntimeError):
    """A runtime artifact is missing or cannot be built; the message says how to build it."""


#: Bumped when the exported graph changes (v2: a second output, the penultimate features).
EXPORT_FORMAT = "logits+features-v2"


class _LogitsAndFeatures(torch.nn.Module):
    """Export wrapper: one forward pass, two outputs (``logits``, ``features``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_and_features(self.model, batch)


def runtime_key(spec: ModelSpec) -> str:
    """Cache key of a version's runtimes: weights sha256 + architecture + input size + graph format."""
    identity = f"{spec.weights_sha256}|{spec.architecture}|{spec.preprocessing['input_size']}|{EXPORT_FORMAT}"
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def runtime_path(settings: Settings, spec: ModelSpec, kind: str) -> Path:
    """Where the ``kind`` ("onnx" or "onnx-int8") artifact of ``spec`` lives."""
    assert settings.models_dir is not None
    return settings.models_dir / "runtimes" / f"{runtime_key(spec)}.{kind}.onnx"


def _atomic_target(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".building-", suffix=".onnx")
    os.close(fd)
    return Path(tmp)


def export_onnx(spec: ModelSpec, weights_file: Path, target: Path) -> Path:
    """Export the version's torch model to ONNX (fp32, dynamic batch) at ``target``."""
    model = load_weights(create_model(spec.architecture, len(spec.labels)), load_state_dict_file(weights_file)).eval()
    channels, height, width = (int(v) for v in spec.preprocessing["input_size"])
    example = torch.zeros(2, channels, height, width)
    tmp = _atomic_target(target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _LogitsAndFeatures(model), (example,), str(tmp), input_names=["input"], output_names=["logits", "features"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
            opset_version=ONNX_OPSET, dynamo=False,
        )
    tmp.replace(target)
    log.info("exported %s to ONNX at %s", spec.architecture, target)
    return target


def ensure_fp32(settings: Settings, spec: ModelSpec) -> Path:
    """The fp32 ONNX file of ``spec``, exported on first use."""
    target = runtime_path(settings, spec, "onnx")
    if not target.exists():
        export_onnx(spec, weights_path(settings, spec.weights_sha256), target)
    return target


def calibration_images(folder: Path, limit: int) -> list[Image.Image]:
    """Up to ``limit`` decodable images from ``folder`` (recursively, sorted, spread over classes)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("."))
    step = max(1, len(files) // max(1, limit))
    images: list[Image.Image] = []
    for path in files[::step]:
        try:
            images.append(decode_image(path.read_bytes(), max_pixels=200_000_000))
        except ImageDecodeError:
            continue
        if len(images) >= limit:
            break
    if not images:
        raise RuntimeUnavailable(f"no decodable calibration images under {folder}")
    return images


def _confidence(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Top probability per row after the version's temperature, as the worker computes it."""
    return probabilities_from_logits(torch.from_numpy(logits), temperature).max(dim=1).values.numpy()


#: Activation-range percentiles tried by :func:`quantize_int8`; the held-out images pick one.
CANDIDATE_PERCENTILES = (99.9, 99.99, 99.999)


@dataclass(frozen=True)
class Int8Build:
    """The int8 runtime built for a version and how well it agrees with fp32 on held-out images."""

    path: Path
    percentile: float
    agreement: float
    held_out: int
    #: label agreement on the held-out images for every percentile tried
    tried: dict[float, float]
    #: False when the agreement was below ``min_agreement``: nothing was written to ``path``
    installed: bool
    #: held-out images fp32 leaves unflagged (confidence >= the version's threshold: no review) ...
    unflagged: int = 0
    #: ... and on how many of them the chosen int8 model gives the same label and leaves them unflagged too
    unflagged_kept: int = 0


def _logits(session: Any, batch: np.ndarray, chunk: int = 32) -> np.ndarray:
    return np.concatenate([session.run(["logits"], {"input": batch[i : i + chunk]})[0] for i in range(0, len(batch), chunk)])


def quantize_int8(
    settings: Settings, spec: ModelSpec, images: Sequence[Image.Image], batch_size: int = 8,
    percentiles: Sequence[float] = CANDIDATE_PERCENTILES, min_agreement: float = 0.0,
) -> Int8Build:
    """Build the int8 (QDQ, per-channel, static) ONNX model of ``spec`` and measure it against fp32.

    Every other image calibrates the activation ranges; the rest are held out. For each candidate
    percentile of the activation histograms (outliers beyond it are clipped) an int8 model is built
    and its labels compared with the fp32 model's on the held-out images; the one that keeps most
    of the images fp32 accepts without review accepted with the same label (then: agrees most) is
    installed, unless its agreement is below ``min_agreement`` (then no int8 runtime is written,
    and an older one of the same version is removed). The right percentile depends on the model:
    on a briefly trained tf_efficientnetv2_s, 99.9 to 99.999 moved test agreement from 90 % to 80 %
    (bench/README.md). Each candidate repeats the calibration pass: an offline command, so the
    simple public ONNX Runtime API is preferred to sharing one histogram between candidates.

    Raises:
        RuntimeUnavailable: fewer than two images (nothing to hold out).
    """
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(images) < 2:
        raise RuntimeUnavailable("int8 quantization needs at least two images: one to calibrate, one to check")
    transform = build_transform(spec.preprocessing, training=False)
    tensors = np.stack([transform(image).numpy() for image in images])
    calibration, held_out = tensors[0::2], tensors[1::2]

    # ONNX Runtime's histogram calibrators stack the batches, so they must all have one size.
    size = max(d for d in range(1, min(batch_size, len(calibration)) + 1) if len(calibration) % d == 0)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches: Iterator[np.ndarray] = iter([calibration[i : i + size] for i in range(0, len(calibration), size)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {"input": batch}

    fp32 = ensure_fp32(settings, spec)
    reference_logits = _logits(ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]), held_out)
    reference = reference_logits.argmax(1)
    unflagged = _confidence(reference_logits, spec.temperature) >= spec.threshold
    kept: dict[float, int] = {}
    target = runtime_path(settings, spec, "onnx-int8")
    prepared = _atomic_target(target)
    candidates: dict[float, Path] = {}
    tried: dict[float, float] = {}
    try:
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        for percentile in percentiles:
            candidate = candidates[percentile] = _atomic_target(target)
            quantize_static(
                str(prepared), str(candidate), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                calibrate_method=CalibrationMethod.Percentile, extra_options={"CalibPercentile": percentile},
            )
            logits = _logits(ort.InferenceSession(str(candidate), providers=["CPUExecutionProvider"]), held_out)
            tried[percentile] = float((logits.argmax(1) == reference).mean())
            kept[percentile] = int((unflagged & (logits.argmax(1) == reference) & (_confidence(logits, spec.temperature) >= spec.threshold)).sum())
            log.info("int8 candidate of version %s, percentile %s: label agreement %.2f%% on %d held-out images",
                     spec.version_id, percentile, 100 * tried[percentile], len(held_out))
        # What matters for triage first: the images fp32 accepts without review keep their label and
        # stay accepted; then agreement on all held-out images; remaining ties go to the highest
        # percentile (least clipping, ONNX Runtime's default behaviour).
        best = max(sorted(percentiles, reverse=True), key=lambda p: (kept[p], tried[p]))
        installed = tried[best] >= min_agreement
        if installed:
            candidates.pop(best).replace(target)
        else:
            target.unlink(missing_ok=True)
    finally:
        prepared.unlink(missing_ok=True)
        for leftover in candidates.values():
            leftover.unlink(missing_ok=True)
    log.info("int8 runtime of version %s: percentile %s, %d calibration images, %s", spec.version_id, best,
             len(calibration), "installed" if installed else f"not installed (agreement below {min_agreement:.1%})")
    return Int8Build(target, best, tried[best], len(held_out), tried, installed, int(unflagged.sum()), kept[best])


class OnnxPredictor(Predictor):
    """A :class:`Predictor` whose forward pass runs in ONNX Runtime (CPU)."""

    def __init__(
        self, spec: ModelSpec, onnx_file: Path, batch_size: int = 32, threads: int = 0, weights_file: Path | None = None,
        reference_file: Path | None = None,
    ) -> None:
        import onnxruntime as ort

        self._setup_common(spec, batch_size, load_reference(reference_file), torch.device("cpu"))
        self._weights_file = weights_file
        self._torch_model: torch.nn.Module | None = None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        log.info("loaded ONNX runtime %s for model version %s", onnx_file.name, spec.version_id)

    @property
    def model(self) -> torch.nn.Module | None:  # type: ignore[override]
        """The same version as a torch module, loaded on first use (Grad-CAM heat maps need it)."""
        if self._torch_model is None and self._weights_file is not None:
            model = create_model(self.spec.architecture, len(self.spec.labels))
            self._torch_model = load_weights(model, load_state_dict_file(self._weights_file)).eval()
        return self._torch_model

    @classmethod
    def for_spec(cls, spec: ModelSpec, settings: Settings) -> "OnnxPredictor":
        """The runtime ``settings.runtime`` names; int8 must have been built with ``triage model quantize``.

        Raises:
            RuntimeUnavailable: when the int8 artifact has not been built for this version.
        """
        if settings.runtime == "onnx-int8":
            path = runtime_path(settings, spec, "onnx-int8")
            if not path.exists():
                raise RuntimeUnavailable(
                    f"no int8 runtime for model version {spec.version_id}; build it with "
                    f"`triage model quantize {spec.version_id} --calibration VAL_DIR`"
                )
        else:
            path = ensure_fp32(settings, spec)
        return cls(spec, path, batch_size=settings.batch_size, threads=settings.torch_threads,
                   weights_file=weights_path(settings, spec.weights_sha256), reference_file=spec_reference_file(spec, settings))

    def _forward(self, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.session.run(["logits", "features"], {"input": part.numpy().astype(np.float32, copy=False)})
        return torch.from_numpy(logits).float(), torch.from_numpy(features).float()

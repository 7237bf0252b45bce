"""Batched predictor: preprocess, forward, temperature-scaled softmax, low-confidence flags.

Load once, then decode -> preprocess -> batched forward under ``torch.inference_mode()`` ->
postprocess. Used by the worker and by the trainer's evaluation, so both see the same numbers.
:class:`Predictor` is the PyTorch runtime and the base of the others (:mod:`core.ml.onnx_runtime`);
:func:`core.ml.runtimes.load_predictor` picks one for a version. This module knows no subclass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from core.ml.modelio import create_model, load_state_dict_file, load_weights, logits_and_features
from core.ml.unfamiliar import ReferenceError, UnfamiliarReference
from core.ml.transforms import build_transform, preprocess_batch
from core.config import Settings
from core.registry import ModelSpec, reference_path
from core.storage import sha256_file

log = logging.getLogger(__name__)


#: Flag kinds, stored in ``predictions.flag_kind``.
FLAG_UNSURE = "unsure"
FLAG_UNFAMILIAR = "unfamiliar"
#: The label whose complement is the probability of a fracture ("suspected fractures first").
NO_FRACTURE_LABEL = "no_fracture"


@dataclass(frozen=True)
class PredictionResult:
    """One image's outcome: probabilities per label, the top label, and the flag.

    ``flag_kind`` says why it is flagged: :data:`FLAG_UNFAMILIAR` (its features lie far from the
    training radiographs, whatever the confidence) wins over :data:`FLAG_UNSURE` (top probability
    below the version's threshold).
    """

    probabilities: dict[str, float]
    label: str
    confidence: float
    flagged: bool
    flag_reason: str | None
    flag_kind: str | None = None
    unfamiliar_score: float | None = None
    fracture_probability: float | None = None


def fracture_probability(probabilities: dict[str, float]) -> float | None:
    """``1 - p(no_fracture)`` when the labels include ``no_fracture``; otherwise None."""
    if NO_FRACTURE_LABEL not in probabilities:
        return None
    return float(min(max(1.0 - probabilities[NO_FRACTURE_LABEL], 0.0), 1.0))


def resolve_device(preference: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error.

    Raises:
        RuntimeError: when CUDA is asked for and none is present.
    """
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("TRIAGE_DEVICE=cuda but no CUDA device is available")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def probabilities_from_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature-scaled softmax over classes: what every runtime reports as probabilities."""
    return torch.softmax(logits / temperature, dim=1)


def flag_result(
    probabilities: np.ndarray,
    labels: list[str],
    threshold: float,
    unfamiliar_score: float | None = None,
    unfamiliar_cut: float | None = None,
    input_problem: str | None = None,
) -> PredictionResult:
    """Turn one probability row (and its unfamiliar score) into a result with its flag.

    Flagged as unfamiliar when its pixels show a problem (``input_problem``: a colour picture, a
    blank frame) or ``unfamiliar_score > unfamiliar_cut`` (both given), else as unsure when the top
    probability is below ``threshold`` (a threshold of 1.0, "nothing certified", flags every
    image, even one whose rounded probability is exactly 1). The reason is written for people.
    """
    index = int(np.argmax(probabilities))
    confidence = float(probabilities[index])
    by_label = {label: float(p) for label, p in zip(labels, probabilities)}
    kind: str | None = None
    reason: str | None = None
    if input_problem is not None:
        kind = FLAG_UNFAMILIAR
        reason = f"Unfamiliar image: {input_problem}"
    elif unfamiliar_score is not None and unfamiliar_cut is not None and unfamiliar_score > unfamiliar_cut:
        kind = FLAG_UNFAMILIAR
        reason = f"Unfamiliar image: unlike the radiographs the model was trained on (score {unfamiliar_score:.3g} > {unfamiliar_cut:.3g})"
    elif confidence < threshold or threshold >= 1.0:  # 1.0: nothing certified, every image is reviewed
        kind = FLAG_UNSURE
        reason = f"Model unsure: {_percent(confidence)} < {_percent(threshold)} needed"
    return PredictionResult(
        probabilities=by_label,
        label=labels[index],
        confidence=confidence,
        flagged=kind is not None,
        flag_reason=reason,
        flag_kind=kind,
        unfamiliar_score=None if unfamiliar_score is None else float(unfamiliar_score),
        fracture_probability=fracture_probability(by_label),
    )


def _percent(value: float) -> str:
    """A probability as people read it: 76 %, 99.4 % (never "100 %" for less than 1)."""
    percent = 100.0 * value
    if percent >= 99.95 and value < 1.0:
        return "99.9 %"
    return f"{percent:.0f} %" if percent < 99 else f"{percent:.1f} %"


class Predictor:
    """A loaded model version ready to classify batches of decoded images.

    Every runtime (this PyTorch one, ONNX fp32/int8, the benchmarks' stand-in) calls :meth:`_setup`
    once and implements :meth:`_forward`, which returns the logits and the penultimate features of
    one forward pass; the features give the unfamiliar-image score when the version has a reference
    (:mod:`core.ml.unfamiliar`). :meth:`explainable_model` says whether it can explain a result.
    """

    #: On CUDA the forward pass runs under this autocast dtype (None: float32 throughout; bench.gpu
    #: measures both and their label agreement).
    cuda_autocast: torch.dtype | None = torch.bfloat16

    def __init__(
        self, spec: ModelSpec, weights_file: Path, device: str = "auto", batch_size: int = 32, reference_file: Path | None = None
    ) -> None:
        model = create_model(spec.architecture, num_classes=len(spec.labels))
        self._setup(spec, batch_size, load_reference(reference_file), resolve_device(device))
        self._place_model(load_weights(model, load_state_dict_file(weights_file)))
        log.info("loaded model version %s (%s) on %s", spec.version_id, spec.architecture, self.device)

    def _setup(self, spec: ModelSpec, batch_size: int, reference: UnfamiliarReference | None, device: torch.device) -> None:
        """What every runtime sets: version, device, batch size, the version's transform and reference."""
        self.spec = spec
        self.device = device
        self.batch_size = batch_size
        self.transform = build_transform(spec.preprocessing, training=False)
        self.reference = reference

    def _place_model(self, model: nn.Module) -> None:
        """Keep ``model`` in eval mode on :attr:`device` as this runtime's forward pass."""
        self.model: nn.Module = model.eval().to(self.device)
        if self.device.type == "cuda":
            # Faster convolutions on CUDA. On CPU it is faster too, but this build's channels_last
            # kernels changed outputs far beyond 1e-4 in bench.engine, so CPU stays NCHW.
            self.model = self.model.to(memory_format=torch.channels_last)

    @classmethod
    def from_model(
        cls, spec: ModelSpec, model: nn.Module, device: str = "auto", batch_size: int = 32, reference: UnfamiliarReference | None = None
    ) -> "Predictor":
        """A predictor around a model already in memory (the trainer's evaluation), same code path."""
        predictor = cls.__new__(cls)
        predictor._setup(spec, batch_size, reference, resolve_device(device))
        predictor._place_model(model)
        return predictor

    def explainable_model(self) -> nn.Module | None:
        """The torch module Grad-CAM heat maps can use for this runtime's inputs (None: it cannot explain)."""
        return self.model

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """Decoded RGB images -> a normalised batch tensor (same transform as evaluation)."""
        return preprocess_batch(images, self.transform)

    @torch.inference_mode()
    def _forward(self, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [N, classes], features [N, D])`` of one forward pass (float32, on the CPU)."""
        part = part.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            part = part.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=self.cuda_autocast or torch.float32, enabled=self.cuda_autocast is not None):
                logits, features = logits_and_features(self.model, part)
        else:
            logits, features = logits_and_features(self.model, part)
        return logits.float().cpu(), features.float().cpu()

    def predict_outputs(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Raw logits ``[N, classes]`` (before temperature) and features ``[N, D]``, in slices."""
        logits, features = [], []
        for start in range(0, batch.shape[0], self.batch_size):
            part_logits, part_features = self._forward(batch[start : start + self.batch_size])
            logits.append(part_logits.numpy())
            features.append(part_features.numpy())
        if not logits:
            return np.zeros((0, len(self.spec.labels)), dtype=np.float32), np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(logits), np.concatenate(features)

    def predict_logits(self, batch: torch.Tensor) -> np.ndarray:
        """Raw logits ``[N, classes]`` (before temperature) for a preprocessed batch."""
        return self.predict_outputs(batch)[0]

    def predict_tensor(self, batch: torch.Tensor) -> np.ndarray:
        """Probabilities ``[N, classes]`` for a preprocessed batch, in slices of ``batch_size``."""
        return probabilities_from_logits(torch.from_numpy(self.predict_logits(batch)), self.spec.temperature).numpy()

    def unfamiliar_scores(self, features: np.ndarray) -> np.ndarray | None:
        """The unfamiliar-image score of each feature row, or None when the version has no reference."""
        return None if self.reference is None else self.reference.scores(features)

    def predict_images(self, images: list[Image.Image]) -> list[PredictionResult]:
        """Classify decoded images; one result per image, flags from the version's threshold."""
        return self.predict_preprocessed([self.transform(image) for image in images])

    def predict_preprocessed(self, tensors: list[torch.Tensor]) -> list[PredictionResult]:
        """Classify images already passed through :attr:`transform` (e.g. in decode threads)."""
        if not tensors:
            return []
        batch = torch.stack(tensors)
        logits, features = self.predict_outputs(batch)
        probabilities = probabilities_from_logits(torch.from_numpy(logits), self.spec.temperature).numpy()
        scores = self.unfamiliar_scores(features)
        problems = self.input_problems(batch)
        cut = None if self.reference is None else self.reference.cut
        return [
            flag_result(row, self.spec.labels, self.spec.threshold, None if scores is None else float(scores[i]), cut, problems[i])
            for i, row in enumerate(probabilities)
        ]

    def input_problems(self, batch: torch.Tensor) -> list[str | None]:
        """Per preprocessed image, an input problem that makes it unfamiliar (None: none, or no reference)."""
        return [None] * len(batch) if self.reference is None else self.reference.input_problems(batch)


def load_reference(path: Path | None) -> UnfamiliarReference | None:
    """The unfamiliar-image reference stored at ``path`` (None: the version has none)."""
    return None if path is None else UnfamiliarReference.load(path)


def spec_reference_file(spec: ModelSpec, settings: Settings) -> Path | None:
    """Where the version's unfamiliar-image reference lives, after checking its sha256.

    Raises:
        ReferenceError: when the stored file is missing or its content does not match the registry.
    """
    if spec.reference_sha256 is None:
        return None
    path = reference_path(settings, spec.reference_sha256)
    if not path.is_file() or sha256_file(path) != spec.reference_sha256:
        raise ReferenceError(f"the unfamiliar-image reference of model version {spec.version_id} is missing or altered ({path})")
    return path


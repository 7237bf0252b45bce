"""ONNX Runtime inference: fp32 export of a registered version and the ONNX predictor (fp32 or int8).

Runtimes are built from the registered weights and cached on disk under a key derived from the
weights' sha256, the architecture and the input size, so a cache can never serve another version.
The int8 model is built by :mod:`core.ml.quantize` (``triage model quantize``); this module only
serves it, asking the fp32 model about the images whose int8 outputs lie too close to a decision
(:class:`SecondOpinion`).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from core.config import Settings
from core.files import atomic_target
from core.ml.devices import model_threads
from core.ml.modelio import create_model, load_state_dict_file, load_weights, logits_and_features
from core.ml.predict import Predictor, load_reference, spec_reference_file
from core.registry import ModelSpec, weights_path

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

ONNX_OPSET = 17


class RuntimeUnavailable(RuntimeError):
    """A runtime artifact is missing or cannot be built; the message says how to build it."""


#: Bumped when the exported graph changes (v2: a second output, the penultimate features; v3: the
#: features of every stage beside them, :func:`core.ml.modelio.logits_and_features`).
EXPORT_FORMAT = "logits+layered-features-v3"
#: Name prefix of a runtime file still being written beside its final path.
BUILDING_PREFIX = ".building-"


class _LogitsAndFeatures(torch.nn.Module):
    """Export wrapper: one forward pass, two outputs (``logits``, ``features``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_and_features(self.model, batch)


def runtime_key(spec: ModelSpec) -> str:
    """Cache key of a version's runtimes: weights sha256 + architecture + input size + graph format."""
    identity = f"{spec.weights_sha256}|{spec.architecture}|{list(spec.preprocessing.input_size)}|{EXPORT_FORMAT}"
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def runtime_path(settings: Settings, spec: ModelSpec, kind: str) -> Path:
    """Where the ``kind`` ("onnx" or "onnx-int8") artifact of ``spec`` lives."""
    assert settings.models_dir is not None
    return settings.models_dir / "runtimes" / f"{runtime_key(spec)}.{kind}.onnx"


def export_onnx(spec: ModelSpec, weights_file: Path, target: Path) -> Path:
    """Export the version's torch model to ONNX (fp32, dynamic batch) at ``target``."""
    model = load_weights(create_model(spec.architecture, len(spec.labels)), load_state_dict_file(weights_file)).eval()
    example = torch.zeros(2, *spec.preprocessing.input_size)
    with atomic_target(target, prefix=BUILDING_PREFIX, suffix=".onnx") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _LogitsAndFeatures(model), (example,), str(tmp), input_names=["input"], output_names=["logits", "features"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
            opset_version=ONNX_OPSET, dynamo=False,
        )
    log.info("exported %s to ONNX at %s", spec.architecture, target)
    return target


def ensure_fp32(settings: Settings, spec: ModelSpec) -> Path:
    """The fp32 ONNX file of ``spec``, exported on first use."""
    target = runtime_path(settings, spec, "onnx")
    if not target.exists():
        export_onnx(spec, weights_path(settings, spec.weights_sha256), target)
    return target


#: Which quantile of int8's deviations from fp32 on held-out images becomes a second-opinion margin.
#: The largest deviation (1.0) sent 56 % of the recipe model's test images to fp32; the 95th
#: percentile sent 18 % and kept 99.8 % of the accepted images accepted with fp32's label
#: (bench/README.md, section 2b).
SECOND_OPINION_QUANTILE = 0.95


def top_log_odds(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Per row, the log-odds ``log(p / (1 - p))`` of the top class after the temperature (computed from the logits)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    rows = np.arange(len(scaled))
    top = scaled.argmax(axis=1)
    others = scaled.copy()
    others[rows, top] = -np.inf
    return scaled[rows, top] - np.logaddexp.reduce(others, axis=1)


@dataclass(frozen=True)
class SecondOpinion:
    """Which images the int8 runtime hands to the fp32 model: those whose int8 outputs lie near a decision.

    int8 rounding moves the logits and the unfamiliar score a little. Where the version's threshold
    (or the unfamiliar cut) lies within that distance, int8 alone could decide otherwise than fp32;
    there the fp32 model runs the image again and its outputs are served. Distances to the threshold
    are measured in log-odds of the top class: if the temperature-scaled logits move by at most
    ``log_odds_margin`` from their lowest to their highest change, no class's log-odds moves by
    more, so an image whose int8 top-class log-odds lie farther than that from the threshold's gets
    fp32's label and flag. (In probability the same rounding moves a 0.5 far more than a 0.9, so
    one probability margin for every image sent most images to fp32.) The unfamiliar score is
    compared in units of the cut. The margins are a high quantile (:data:`SECOND_OPINION_QUANTILE`)
    of the deviations measured on held-out images (:meth:`measured`): about one image in twenty
    deviates more, and its decision changes only if it also lies that close to a boundary.
    """

    #: how far int8's temperature-scaled logits stray from fp32's (largest minus smallest change over the classes)
    log_odds_margin: float
    #: how far int8's unfamiliar score strays from fp32's, in units of the cut (0: the version has no reference)
    score_margin: float

    #: keys of the margins in the int8 ONNX file's metadata, written by ``triage model quantize``
    METADATA_KEYS = ("triage.second_opinion.log_odds_margin", "triage.second_opinion.score_margin")

    @classmethod
    def measured(
        cls, int8_logits: np.ndarray, fp32_logits: np.ndarray, temperature: float,
        int8_relative_scores: np.ndarray | None = None, fp32_relative_scores: np.ndarray | None = None,
        quantile: float = SECOND_OPINION_QUANTILE,
    ) -> "SecondOpinion":
        """Margins from int8's and fp32's outputs for the same images: the ``quantile`` of their deviations.

        ``*_relative_scores``: unfamiliar scores divided by the cut (None: the version has no reference).
        """
        change = (np.asarray(int8_logits, dtype=np.float64) - np.asarray(fp32_logits, dtype=np.float64)) / temperature
        log_odds = float(np.quantile(change.max(axis=1) - change.min(axis=1), quantile)) if len(change) else 0.0
        score = 0.0
        if int8_relative_scores is not None and fp32_relative_scores is not None and len(int8_relative_scores):
            score = float(np.quantile(np.abs(np.asarray(int8_relative_scores) - np.asarray(fp32_relative_scores)), quantile))
        return cls(log_odds, score)

    def needed(
        self, logits: np.ndarray, temperature: float, threshold: float, relative_scores: np.ndarray | None = None
    ) -> np.ndarray:
        """Per image, whether its int8 top-class log-odds or relative unfamiliar score lies within a margin of the decision.

        A threshold of 1.0 flags every image and one of 0 none, whatever the confidence, so
        confidence never calls for a second opinion then.
        """
        ask = np.zeros(len(logits), dtype=bool)
        if 0.0 < threshold < 1.0:
            ask |= np.abs(top_log_odds(logits, temperature) - np.log(threshold / (1.0 - threshold))) <= self.log_odds_margin
        if relative_scores is not None:
            ask |= np.abs(np.asarray(relative_scores) - 1.0) <= self.score_margin
        return ask

    def metadata(self) -> dict[str, str]:
        """The margins as ONNX metadata properties."""
        return dict(zip(self.METADATA_KEYS, (repr(self.log_odds_margin), repr(self.score_margin))))

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> "SecondOpinion | None":
        """The margins stored in an int8 file's metadata; None for a file built without them."""
        if not all(key in metadata for key in cls.METADATA_KEYS):
            return None
        return cls(*(float(metadata[key]) for key in cls.METADATA_KEYS))


#: ONNX Runtime graph rewrites that change what a QDQ model computes. ``WeightBiasQuantization``
#: quantizes, per tensor, the weights of a Conv/Gemm that the quantizer left in float between a
#: DequantizeLinear and a QuantizeLinear: with batch norm folded in, a convolution's channels have
#: weights of very different sizes, and one scale for all of them rounds the small ones away. On the
#: recipe model with its linear-bottleneck convolutions kept in float, it moved int8's agreement with
#: fp32 on 128 held-out images from 98.4 % (the graph as written) to 97.7 % (bench/README.md).
DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)


def inference_session(onnx_file: Path, threads: int = 0) -> "onnxruntime.InferenceSession":
    """An ONNX Runtime CPU session as the worker runs it (fp32 or int8): the quantizer measures the same.

    ``threads``: intra-op threads (0: ONNX Runtime's default, one per core). Idle threads sleep
    instead of spinning: the worker decodes the next batch in threads beside the forward pass, and
    spinning threads took the cores they need (bench.peers: 47.7 -> 53.9 images/s end to end on
    two cores). The rewrites in :data:`DISABLED_OPTIMIZERS` are turned off.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        str(onnx_file), options, providers=["CPUExecutionProvider"], disabled_optimizers=list(DISABLED_OPTIMIZERS)
    )


class OnnxPredictor(Predictor):
    """A :class:`Predictor` whose forward pass runs in ONNX Runtime (CPU)."""

    def __init__(
        self, spec: ModelSpec, onnx_file: Path, batch_size: int = 32, threads: int = 0, weights_file: Path | None = None,
        reference_file: Path | None = None,
    ) -> None:
        self._setup(spec, batch_size, load_reference(reference_file), torch.device("cpu"))
        self._weights_file = weights_file
        self._torch_model: torch.nn.Module | None = None
        self.session = inference_session(onnx_file, threads)
        #: the margins and the fp32 runtime this (int8) runtime hands the images near a decision to
        self.second_opinion: tuple[SecondOpinion, OnnxPredictor] | None = None
        #: how many images it has handed to that fp32 runtime since it was loaded
        self.second_opinions_asked = 0
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
        if settings.runtime != "onnx-int8":
            return cls._fp32(spec, settings, spec_reference_file(spec, settings))
        path = runtime_path(settings, spec, "onnx-int8")
        if not path.exists():
            raise RuntimeUnavailable(
                f"no int8 runtime for model version {spec.version_id}; build it with "
                f"`triage model quantize {spec.version_id} --calibration VAL_DIR`"
            )
        predictor = cls(spec, path, batch_size=settings.batch_size, threads=model_threads(settings),
                        weights_file=weights_path(settings, spec.weights_sha256), reference_file=spec_reference_file(spec, settings))
        margins = SecondOpinion.from_metadata(predictor.session.get_modelmeta().custom_metadata_map)
        if margins is not None:
            predictor.second_opinion = (margins, cls._fp32(spec, settings, None))
        return predictor

    @classmethod
    def _fp32(cls, spec: ModelSpec, settings: Settings, reference_file: Path | None) -> "OnnxPredictor":
        """The fp32 ONNX runtime of ``spec`` (exported on first use)."""
        return cls(spec, ensure_fp32(settings, spec), batch_size=settings.batch_size, threads=model_threads(settings),
                   weights_file=weights_path(settings, spec.weights_sha256), reference_file=reference_file)

    def _forward(self, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, features)`` of one ONNX Runtime pass (float32, on the CPU)."""
        logits, features = self.session.run(["logits", "features"], {"input": part.numpy().astype(np.float32, copy=False)})
        return torch.from_numpy(logits).float(), torch.from_numpy(features).float()

    def predict_outputs(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Logits and features of ``batch``; with a second opinion, fp32's for the images near a decision."""
        logits, features = super().predict_outputs(batch)
        if self.second_opinion is None or not len(logits):
            return logits, features
        margins, fp32 = self.second_opinion
        relative_scores = None if self.reference is None else self.reference.relative_scores(features)
        asked = np.flatnonzero(margins.needed(logits, self.spec.temperature, self.spec.threshold, relative_scores))
        if len(asked):
            logits[asked], features[asked] = fp32.predict_outputs(batch[torch.from_numpy(asked)])
            self.second_opinions_asked += len(asked)
            log.debug("int8 runtime of version %s asked fp32 about %d of %d images", self.spec.version_id, len(asked), len(logits))
        return logits, features

"""ONNX Runtime inference: fp32 export of a registered version and the ONNX predictor (fp32 or int8).

Runtimes are built from the registered weights and cached on disk under a key derived from the
weights' sha256, the architecture and the input size, so a cache can never serve another version.
The int8 model is built by :mod:`core.ml.quantize` (``triage model quantize``); this module only
serves it.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
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


def int8_reference_path(int8_file: Path) -> Path:
    """The unfamiliar-image reference rescaled on the int8 model's own features, beside its ONNX file."""
    return int8_file.with_name(int8_file.name.removesuffix(".onnx") + ".reference.safetensors")


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
        reference_file = spec_reference_file(spec, settings)
        if settings.runtime == "onnx-int8":
            path = runtime_path(settings, spec, "onnx-int8")
            if not path.exists():
                raise RuntimeUnavailable(
                    f"no int8 runtime for model version {spec.version_id}; build it with "
                    f"`triage model quantize {spec.version_id} --calibration VAL_DIR`"
                )
            if reference_file is not None and int8_reference_path(path).exists():
                reference_file = int8_reference_path(path)  # rescaled on the int8 model's features
        else:
            path = ensure_fp32(settings, spec)
        return cls(spec, path, batch_size=settings.batch_size, threads=model_threads(settings),
                   weights_file=weights_path(settings, spec.weights_sha256), reference_file=reference_file)

    def _forward(self, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, features)`` of one ONNX Runtime pass (float32, on the CPU)."""
        logits, features = self.session.run(["logits", "features"], {"input": part.numpy().astype(np.float32, copy=False)})
        return torch.from_numpy(logits).float(), torch.from_numpy(features).float()

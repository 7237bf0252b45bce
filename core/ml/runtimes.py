"""Pick and build the runtime that serves a model version: PyTorch, ONNX (fp32/int8) or the stand-in.

:func:`load_predictor` is the one factory; it sits above every runtime module, so the base
:class:`core.ml.predict.Predictor` never has to know its subclasses.
"""

from __future__ import annotations

import logging

import torch

from core.config import Settings
from core.ml.devices import model_threads
from core.ml.onnx_runtime import OnnxPredictor
from core.ml.predict import Predictor, resolve_device, spec_reference_file
from core.registry import ModelSpec, weights_path

log = logging.getLogger(__name__)


class StandInPredictor(Predictor):
    """Benchmarks only: preprocesses like the real model, then returns fixed logits at no cost.

    Used to measure the ceiling of queue, database, storage and decode without a model
    (``TRIAGE_RUNTIME=standin``); it never serves a real study, has no unfamiliar-image score and
    cannot explain a result.
    """

    def __init__(self, spec: ModelSpec, batch_size: int = 32) -> None:
        self._setup(spec, batch_size, None, torch.device("cpu"))
        self._fixed = torch.linspace(1.0, 0.0, len(spec.labels))
        log.warning("stand-in runtime: constant output for model version %s (benchmarks only)", spec.version_id)

    def _forward(self, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed logits for every image and one zero feature each."""
        return self._fixed.expand(part.shape[0], -1), torch.zeros(part.shape[0], 1)

    def explainable_model(self) -> torch.nn.Module | None:
        """None: constant logits have nothing to explain."""
        return None


def load_predictor(spec: ModelSpec, settings: Settings) -> Predictor:
    """Build the runtime that ``settings.runtime`` names for ``spec`` (weights from the registry)."""
    torch.set_num_threads(model_threads(settings))
    if settings.runtime == "standin":
        return StandInPredictor(spec, batch_size=settings.batch_size)
    if settings.runtime in ("onnx", "onnx-int8"):
        return OnnxPredictor.for_spec(spec, settings)
    if settings.runtime == "auto" and resolve_device(settings.device).type == "cpu":
        # On CPU, ONNX Runtime runs the same fp32 model about twice as fast as eager PyTorch
        # (bench/README.md); a model it cannot export still serves through PyTorch.
        try:
            return OnnxPredictor.for_spec(spec, settings.model_copy(update={"runtime": "onnx"}))
        except Exception:  # the exporter raises many types; PyTorch serves the same numbers
            log.exception("ONNX export of model version %s failed; serving it with PyTorch", spec.version_id)
    return Predictor(
        spec, weights_path(settings, spec.weights_sha256), device=settings.device, batch_size=settings.batch_size,
        reference_file=spec_reference_file(spec, settings),
    )

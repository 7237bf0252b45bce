"""Heat maps on request: the Grad-CAM of one prediction that has none (the worker's ``triage.heatmap`` task).

The worker stores heat maps for flagged images while it classifies them (:mod:`core.ml.heatmap`);
a reviewer may ask for any other classified image's. This decodes the stored image exactly as the
worker did when it classified it, explains the class the prediction names, stores the PNG and
records its key, or records in words why there is none (``Prediction.heatmap_error``), so the
viewer stops waiting.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from core.config import Settings
from core.db import Database
from core.imaging import ImageDecodeError, decode_image
from core.ml.heatmap import colorize, display_size, explainable, grad_cam
from core.ml.predict import Predictor
from core.ml.transforms import decode_options
from core.models import Prediction
from core.registry import ModelSpec
from core.storage import heatmap_store, image_store

log = logging.getLogger(__name__)

#: Longest reason kept on the prediction (the column's size).
MAX_ERROR = 200


class PredictorSource(Protocol):
    """Anything that hands out a loaded predictor for a model version (the worker's PredictorCache)."""

    def get(self, spec: ModelSpec) -> Predictor:
        """The predictor for ``spec``."""


def explain_prediction(db: Database, settings: Settings, predictors: PredictorSource, prediction_id: int) -> str:
    """Compute and store the heat map of one prediction unless it has one; returns what happened.

    Returns ``"stored"``, ``"exists"``, ``"missing"`` (no such prediction) or ``"failed"`` (the
    reason is recorded on the prediction). Idempotent: a repeated request changes nothing.
    """
    with db.transaction() as session:
        prediction = session.get(Prediction, prediction_id)
        if prediction is None:
            return "missing"
        if prediction.heatmap_key:
            return "exists"
        image = prediction.image
        spec = ModelSpec.from_version(prediction.model_version)
        key, size = image.storage_key, (image.width or 0, image.height or 0)
        label = prediction.label
    try:
        png = _heatmap_png(settings, predictors, spec, key, size, label)
    except (ImageDecodeError, FileNotFoundError, ValueError) as exc:
        reason = f"No heat map: {exc}"[:MAX_ERROR]
        log.info("prediction %s: %s", prediction_id, reason)
        with db.transaction() as session:
            row = session.get(Prediction, prediction_id)
            if row is not None:
                row.heatmap_error = reason
        return "failed"
    _, stored_key = heatmap_store(settings).put_bytes(png)
    with db.transaction() as session:
        row = session.get(Prediction, prediction_id)
        if row is not None:
            row.heatmap_key, row.heatmap_error = stored_key, None
    return "stored"


def _heatmap_png(
    settings: Settings, predictors: PredictorSource, spec: ModelSpec, key: str | None, size: tuple[int, int], label: str,
) -> bytes:
    """The heat-map PNG for the class ``label`` of the image stored under ``key``.

    Raises:
        ValueError: the model cannot be explained (no torch model) or does not know ``label``.
        ImageDecodeError, FileNotFoundError: the stored image cannot be read or decoded.
    """
    if key is None:
        raise FileNotFoundError("the image has no stored file")
    if label not in spec.labels:
        raise ValueError(f"the model has no class {label!r}")
    predictor = predictors.get(spec)
    if not explainable(predictor):
        raise ValueError(f"the model runtime ({type(predictor).__name__}) has no torch model to explain with")
    model = predictor.explainable_model()
    assert model is not None  # explainable() said so
    options = decode_options(spec.preprocessing, settings.fast_jpeg_decode)
    picture = decode_image(image_store(settings).read(key), settings.max_image_pixels,
                           draft_size=options.draft_size, grey=options.grey, resize=options.resize)
    width, height = size if all(size) else picture.size
    tensor: torch.Tensor = predictor.transform(picture)
    device = next(model.parameters()).device
    (cam,) = grad_cam(model, tensor.unsqueeze(0).to(device), [spec.labels.index(label)])
    return colorize(cam, display_size(width, height))

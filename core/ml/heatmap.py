"""Grad-CAM heat maps for flagged images, computed once by the worker and stored as PNG.

A short hand-written Grad-CAM (torch autograd on the last feature map; no extra dependency): the
gradient of the predicted class's score with respect to the final convolutional feature map, averaged
per channel, weights that map; the ReLU of the weighted sum shows where the model looked. The map is
scaled to the image's aspect ratio (the serving transform is a plain resize, no crop, so it lies
exactly over the radiograph) and coloured into a transparent PNG the viewer overlays.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image as PILImage
from sqlalchemy import update
from sqlalchemy.orm import Session
from torch import nn

from core.config import Settings
from core.models import Image, Prediction
from core.ml.predict import Predictor
from core.storage import heatmap_store
from core.studies import ClaimedImage

log = logging.getLogger(__name__)

MAX_SIDE = 512
#: Images per Grad-CAM pass.
HEATMAP_BATCH = 8
# (position, r, g, b): a perceptually ordered blue -> cyan -> green -> yellow -> red ramp.
_STOPS = np.array([
    [0.00, 0, 0, 160], [0.25, 0, 170, 255], [0.50, 40, 210, 40], [0.75, 255, 220, 0], [1.00, 230, 20, 20],
], dtype=np.float32)


def _last_conv(model: nn.Module) -> nn.Module | None:
    found = None
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            found = module
    return found


def _features_and_logits(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last feature map ``[N, C, H, W]`` and the logits, with a graph between them."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        features = model.forward_features(batch)  # type: ignore[operator]
        if features.ndim == 4:
            return features, model.forward_head(features)  # type: ignore[operator]
    layer = _last_conv(model)
    if layer is None:
        raise ValueError("the model has no convolutional layer to explain")
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        logits = model(batch)
    finally:
        handle.remove()
    return captured[-1], logits


def grad_cam(model: nn.Module, batch: torch.Tensor, class_indices: Sequence[int] | None = None) -> np.ndarray:
    """Grad-CAM maps ``[N, h, w]`` in [0, 1] for ``batch`` (default: each image's top class)."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            inputs = batch.detach().clone().requires_grad_(True)
            features, logits = _features_and_logits(model, inputs)
            logits = logits.float()
            if class_indices is None:
                index = logits.argmax(dim=1)
            else:
                index = torch.as_tensor(list(class_indices), device=logits.device)
            score = logits.gather(1, index.view(-1, 1)).sum()
            (gradients,) = torch.autograd.grad(score, features)
        weights = gradients.float().mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * features.detach().float()).sum(dim=1))
        peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12).view(-1, 1, 1)
        return (cam / peak).cpu().numpy()
    finally:
        model.train(was_training)


def colorize(cam: np.ndarray, size: tuple[int, int]) -> bytes:
    """A transparent RGBA PNG of ``cam`` resized to ``size`` (width, height): hot is red and opaque."""
    resized = PILImage.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8), mode="L").resize(size, PILImage.BILINEAR)
    values = np.asarray(resized, dtype=np.float32) / 255.0
    rgb = np.stack([np.interp(values, _STOPS[:, 0], _STOPS[:, channel]) for channel in (1, 2, 3)], axis=-1)
    alpha = np.clip(values * 1.4, 0, 1) * 200
    rgba = np.concatenate([rgb, alpha[..., None]], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(rgba, mode="RGBA").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def display_size(width: int, height: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """``(width, height)`` scaled down so the longer side is at most ``max_side``."""
    scale = min(1.0, max_side / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


def heatmap_pngs(predictor: Predictor, inputs: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]]) -> list[bytes]:
    """Heat-map PNGs with ``predictor``'s torch model for images it classified.

    Args:
        predictor: a loaded predictor that can explain (see :func:`explainable`).
        inputs: each image's model input ``[C, H, W]`` (``predictor.transform`` of its picture):
            the very numbers the model classified, so no picture has to be kept for this.
        sizes: each image's (width, height); its heat map has that aspect ratio, at most ``MAX_SIDE``.
    """
    model = predictor.explainable_model()
    if model is None:
        raise ValueError(f"runtime {type(predictor).__name__} has no torch model to explain with")
    device = next(model.parameters()).device
    pngs: list[bytes] = []
    # Grad-CAM keeps activations and gradients: small slices bound the memory it needs.
    for start in range(0, len(inputs), HEATMAP_BATCH):
        cams = grad_cam(model, torch.stack(list(inputs[start : start + HEATMAP_BATCH])).to(device))
        pngs += [colorize(cam, display_size(*size)) for cam, size in zip(cams, sizes[start : start + HEATMAP_BATCH])]
    return pngs


def explainable(predictor: Predictor) -> bool:
    """Whether ``predictor`` offers a torch model Grad-CAM can use (the stand-in does not)."""
    return predictor.explainable_model() is not None


def store_heatmaps(
    session: Session, settings: Settings, predictor: Predictor, model_version_id: int,
    flagged: Sequence[tuple[Image | ClaimedImage, torch.Tensor, tuple[int, int]]],
) -> int:
    """Compute, store and record heat maps for flagged images; returns how many were stored.

    ``flagged`` holds (image row, its model input tensor, its (width, height)) per image.

    Never raises for a heat-map problem: the predictions are already saved, so a failure here is
    logged and the images simply have no heat map. The caller's session is committed.
    """
    if not flagged:
        return 0
    if not explainable(predictor):
        log.info("no heat maps for %d flagged images: runtime %s has no torch model", len(flagged), type(predictor).__name__)
        return 0
    try:
        pngs = heatmap_pngs(predictor, [tensor for _, tensor, _ in flagged], [size for _, _, size in flagged])
        store = heatmap_store(settings)
        for (row, _, _), png in zip(flagged, pngs):
            _, key = store.put_bytes(png)
            session.execute(
                update(Prediction)
                .where(Prediction.image_id == row.id, Prediction.model_version_id == model_version_id)
                .values(heatmap_key=key)
            )
        session.commit()
    except Exception:  # a heat map is an aid, never a reason to lose a batch: log it with its trace
        session.rollback()
        log.exception("heat maps failed for %d flagged images of model version %s", len(flagged), model_version_id)
        return 0
    return len(pngs)

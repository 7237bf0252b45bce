"""Grad-CAM heat maps: computed by the worker for flagged images only, stored once, skipped without torch."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from sqlalchemy import select

from core.config import Settings
from core.db import Database
from core.ml.heatmap import grad_cam
from core.ml.pipeline import PredictorCache, classify_chunk
from core.models import Image, ModelVersion, Prediction
from core.storage import heatmap_store
from core.studies import add_upload, create_study
from tests.conftest import make_settings, xray_sample


def _study(db: Database, settings: Settings, files: dict[str, bytes]) -> tuple[int, list[int]]:
    with db.transaction() as session:
        version = session.scalars(select(ModelVersion).where(ModelVersion.is_production.is_(True))).one()
        study = create_study(session, "heat maps", version)
        return study.id, [add_upload(session, settings, study, name, data).id for name, data in files.items()]


def test_grad_cam_highlights_the_region_that_drives_the_class() -> None:
    # Two feature channels: channel 0 sees the left half of the picture, channel 1 the right half;
    # class 1's score depends on channel 1 only, so its map must light the right half alone.
    class TwoChannelModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 1, bias=False)
            with torch.no_grad():
                self.conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            features = self.conv(x)
            return torch.stack([features[:, 0].mean(dim=(1, 2)), features[:, 1].mean(dim=(1, 2))], dim=1)

    batch = torch.zeros(1, 2, 8, 8)
    batch[:, 0, :, :4] = 1.0
    batch[:, 1, :, 4:] = 1.0
    (cam,) = grad_cam(TwoChannelModel(), batch, class_indices=[1])
    assert cam.shape == (8, 8)
    assert cam[:, 4:].min() == pytest.approx(1.0) and cam[:, :4].max() == pytest.approx(0.0)


def test_worker_stores_heat_maps_for_flagged_images_only(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    files = {path.name: path.read_bytes() for path in xray_sample(xrays_dir, 8)}
    study_id, ids = _study(db, settings, files)
    classify_chunk(db, settings, PredictorCache(settings), study_id, ids)
    with db.transaction() as session:
        rows = session.execute(select(Image, Prediction).join(Prediction).where(Image.study_id == study_id)).all()
        flagged = [(image, p) for image, p in rows if p.flagged]
        unflagged = [(image, p) for image, p in rows if not p.flagged]
        assert flagged, "the random tiny model leaves some images under the 0.9 threshold"
        assert all(p.heatmap_key is None for _, p in unflagged)
        store = heatmap_store(settings)
        for image, prediction in flagged:
            assert prediction.heatmap_key, image.filename
            png = PILImage.open(io.BytesIO(store.read(prediction.heatmap_key)))
            assert png.format == "PNG" and png.mode == "RGBA"
            # Same aspect ratio as the radiograph, so the overlay lies over it exactly.
            assert abs(png.width / png.height - image.width / image.height) < 0.02
            assert max(png.size) <= 512
            alpha = np.asarray(png)[..., 3]
            assert alpha.max() > 0  # something is highlighted


def test_stand_in_runtime_skips_heat_maps_with_a_log_line(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path, caplog: pytest.LogCaptureFixture, tiny_weights: dict
) -> None:
    standin = make_settings(settings.data_dir, runtime="standin")
    # The stand-in's constant output (linspace 1..0 over 2 labels) gives confidence 0.73 < 0.9: all flagged.
    files = {path.name: path.read_bytes() for path in xray_sample(xrays_dir, 3)}
    study_id, ids = _study(db, standin, files)
    with caplog.at_level(logging.INFO, logger="core.ml.heatmap"):
        classify_chunk(db, standin, PredictorCache(standin), study_id, ids)
    with db.transaction() as session:
        predictions = session.scalars(select(Prediction).join(Image).where(Image.study_id == study_id)).all()
        assert predictions and all(p.flagged for p in predictions)
        assert all(p.heatmap_key is None for p in predictions)
    assert "no heat maps" in caplog.text and "StandInPredictor" in caplog.text

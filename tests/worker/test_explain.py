"""Heat maps on request (the worker's ``triage.heatmap`` task): any classified image, the class its prediction
names, stored once; a runtime without a torch model records why there is none."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select

from core.config import Settings
from core.db import Database
from core.ml.explain import explain_prediction
from core.ml.pipeline import PredictorCache, classify_chunk
from core.models import Image, ModelVersion, Prediction
from core.storage import heatmap_store
from core.studies import add_upload, create_study
from tests.conftest import make_settings, xray_sample


def _classified(db: Database, settings: Settings, paths: list[Path]) -> list[int]:
    """Prediction ids of ``paths`` classified by the worker's pipeline, heat maps cleared (as for an unflagged image)."""
    with db.transaction() as session:
        version = session.scalars(select(ModelVersion).where(ModelVersion.is_production.is_(True))).one()
        study = create_study(session, "on request", version)
        ids = [add_upload(session, settings, study, path.name, path.read_bytes()).id for path in paths]
        study_id = study.id
    classify_chunk(db, settings, PredictorCache(settings), study_id, ids)
    with db.transaction() as session:
        predictions = session.scalars(select(Prediction).where(Prediction.image_id.in_(ids))).all()
        for prediction in predictions:
            prediction.heatmap_key = None
        return [prediction.id for prediction in predictions]


def test_a_heat_map_is_made_for_any_prediction_once(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path,
) -> None:
    (prediction_id,) = _classified(db, settings, xray_sample(xrays_dir, 1))
    cache = PredictorCache(settings)
    assert explain_prediction(db, settings, cache, prediction_id) == "stored"
    with db.transaction() as session:
        prediction = session.get(Prediction, prediction_id)
        image = session.get(Image, prediction.image_id)
        png = PILImage.open(io.BytesIO(heatmap_store(settings).read(prediction.heatmap_key)))
        assert png.mode == "RGBA" and abs(png.width / png.height - image.width / image.height) < 0.02
        assert np.asarray(png)[..., 3].max() > 0 and prediction.heatmap_error is None
    assert explain_prediction(db, settings, cache, prediction_id) == "exists"
    assert explain_prediction(db, settings, cache, 10**9) == "missing"


def test_a_runtime_without_a_torch_model_records_why_there_is_no_heat_map(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path,
) -> None:
    standin = make_settings(settings.data_dir, runtime="standin")
    (prediction_id,) = _classified(db, standin, xray_sample(xrays_dir, 1))
    assert explain_prediction(db, standin, PredictorCache(standin), prediction_id) == "failed"
    with db.transaction() as session:
        prediction = session.get(Prediction, prediction_id)
        assert prediction.heatmap_key is None
        assert prediction.heatmap_error.startswith("No heat map: the model runtime (StandInPredictor)")

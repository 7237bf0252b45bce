"""The viewer's routes: full-depth pixels (16-bit PNG of the modality-rescaled DICOM values), heat maps on
request (a worker task by name, a status to poll), the study's thumbnail strip and DICOM attributes, and
previews decoded at a bounded size."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from flask.testing import FlaskClient
from PIL import Image as PILImage
from pydicom.pixels import apply_modality_lut
from sqlalchemy import select

from core.artifacts import PREVIEW_SIDE, preview_bytes
from core.config import Settings
from core.db import Database
from core.models import AuditEvent, Prediction
from core.queue import HEATMAP_TASK
from core.storage import heatmap_store
from tests.portal.conftest import broker_messages, predict
from tests.portal.test_review_flow import upload


def _png(picture: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def dicom_study(client: FlaskClient, db: Database, production_model: int, dicom_dir: Path, xrays_dir: Path) -> dict[str, int]:
    """A DICOM study of two views (the 10-bit MONOCHROME1 radiograph flagged, its lossless JPEG 2000 copy) and a
    JPEG in a study of its own, all classified."""
    dicom_id, other_id = upload(client, [dicom_dir / "RG3_UNCR.dcm", dicom_dir / "RG3_J2KR.dcm"])
    (jpeg_id,) = upload(client, sorted((xrays_dir / "test").rglob("*.jpg"))[:1])
    predict(db, [dicom_id, other_id], [0.6, 0.97])
    predict(db, [jpeg_id], [0.97])
    with db.transaction() as session:
        prediction_id = session.scalars(select(Prediction.id).where(Prediction.image_id == dicom_id)).one()
    return {"dicom": dicom_id, "other": other_id, "jpeg": jpeg_id, "prediction": prediction_id}


def test_the_pixels_of_a_dicom_image_are_its_modality_rescaled_values_in_a_16_bit_png(
    client: FlaskClient, dicom_study: dict[str, int], dicom_dir: Path,
) -> None:
    response = client.get(f"/images/{dicom_study['dicom']}/pixels.png")
    assert response.status_code == 200 and response.mimetype == "image/png"
    picture = PILImage.open(io.BytesIO(response.data))
    assert picture.mode == "I;16"
    dataset = pydicom.dcmread(dicom_dir / "RG3_UNCR.dcm")
    expected = apply_modality_lut(dataset.pixel_array, dataset)
    text = picture.text
    assert (float(text["triage:offset"]), float(text["triage:step"])) == (0.0, 1.0)  # the values themselves
    np.testing.assert_array_equal(np.asarray(picture, dtype=np.int64), np.asarray(expected, dtype=np.int64))
    assert text["triage:photometric"] == "MONOCHROME1" and text["triage:inverse"] == "1"
    assert (float(text["triage:window_center"]), float(text["triage:window_width"])) == (
        float(dataset.WindowCenter), float(dataset.WindowWidth))
    assert (float(text["triage:low"]), float(text["triage:high"])) == (float(expected.min()), float(expected.max()))
    assert text["triage:bits"] == "10"
    assert client.get(f"/images/{dicom_study['dicom']}/pixels.png").data == response.data  # made once, kept


def test_the_pixels_of_a_jpeg_are_its_8_bit_grey_levels(client: FlaskClient, dicom_study: dict[str, int]) -> None:
    picture = PILImage.open(io.BytesIO(client.get(f"/images/{dicom_study['jpeg']}/pixels.png").data))
    assert picture.mode == "L"
    assert (picture.text["triage:low"], picture.text["triage:high"], picture.text["triage:bits"]) == ("0", "255", "8")


def test_pixels_of_unknown_images_are_404(client: FlaskClient, production_model: int) -> None:
    assert client.get("/images/999999/pixels.png").status_code == 404
    assert client.get("/predictions/999999/heatmap.json").status_code == 404


def test_a_heat_map_is_made_on_request_by_a_worker_task_and_the_status_says_when_it_is_there(
    client: FlaskClient, dicom_study: dict[str, int], db: Database, settings: Settings,
) -> None:
    prediction_id = dicom_study["prediction"]
    status_url = f"/predictions/{prediction_id}/heatmap.json"
    assert client.get(status_url).get_json() == {"prediction_id": prediction_id, "explains": "Fracture", "status": "absent"}

    response = client.post(f"/predictions/{prediction_id}/heatmap")
    assert response.status_code == 202 and response.get_json()["status"] == "pending"
    assert [m["args"] for m in broker_messages(settings) if m["task"] == HEATMAP_TASK] == [[prediction_id]]
    with db.transaction() as session:
        assert session.scalars(select(AuditEvent).where(AuditEvent.action == "heatmap_request")).one().object_id == str(prediction_id)
        session.get(Prediction, prediction_id).heatmap_error = "No heat map: the model runtime has no torch model"
    assert client.get(status_url).get_json()["status"] == "failed"

    with db.transaction() as session:  # what the worker does when it made one
        prediction = session.get(Prediction, prediction_id)
        prediction.heatmap_key = heatmap_store(settings).put_bytes(_png(PILImage.new("RGBA", (32, 32))))[1]
        prediction.heatmap_error = None
    state = client.get(status_url).get_json()
    assert state["status"] == "ready" and client.get(state["url"]).status_code == 200
    again = client.post(f"/predictions/{prediction_id}/heatmap")
    assert again.status_code == 200 and again.get_json()["status"] == "ready"
    assert len([m for m in broker_messages(settings) if m["task"] == HEATMAP_TASK]) == 1  # nothing sent again


def test_the_viewer_shows_the_studys_other_images_and_the_dicom_attributes(
    client: FlaskClient, dicom_study: dict[str, int],
) -> None:
    html = client.get(f"/review/{dicom_study['dicom']}").get_data(as_text=True)
    assert f'href="/review/{dicom_study["other"]}"' in html  # the study's other view opens from the strip
    assert f'/review/{dicom_study["jpeg"]}"' not in html  # another study's image is not in the strip
    assert 'aria-current="true"' in html
    for name, value in (("Body part", "EXTREMITY"), ("Laterality", "Right"), ("View", "AP"), ("Modality", "CR")):
        assert f"<div><dt>{name}</dt><dd>{value}</dd></div>" in html
    assert f'data-pixels-url="/images/{dicom_study["dicom"]}/pixels.png"' in html
    assert "influence on <strong>Fracture</strong>" in html


def test_a_preview_is_decoded_at_its_bounded_size() -> None:
    big = PILImage.fromarray((np.arange(3000 * 2400, dtype=np.uint32).reshape(2400, 3000) % 65536).astype(np.uint16))
    preview = PILImage.open(io.BytesIO(preview_bytes(_png(big), 100_000_000)))
    assert preview.size == (PREVIEW_SIDE, round(2400 * PREVIEW_SIDE / 3000)) and preview.mode == "L"
    small = PILImage.open(io.BytesIO(preview_bytes(_png(PILImage.new("L", (300, 200), 90)), 100_000_000)))
    assert small.size == (300, 200) and small.getextrema() == (90, 90)  # never scaled up

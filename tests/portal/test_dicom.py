"""DICOM through the portal: grouping by study, refusals with a reason, study fields, UIDs in exports, the SR download."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pydicom
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from core.config import Settings
from core.db import Database
from core.models import AuditEvent, Image, ImageStatus
from core.studies import finish_study_if_complete
from tests.core.test_dicom import (
    PHI,
    _bytes,
    _jpeg,
    _sr_in_study,
    database_hits,
    dciodvfy_errors,
    report_values,
    small_ct_like,
    with_identity,
)
from tests.portal.conftest import broker_messages, predict, token_client

RG3_STUDY = "1.3.6.1.4.1.5962.1.2.11.20040826185059.5457"


def _upload(client: FlaskClient, files: dict[str, bytes], name: str = "pacs export"):  # type: ignore[no-untyped-def]
    data = {"name": name, "files": [(io.BytesIO(content), filename) for filename, content in files.items()]}
    return client.post("/api/studies", data=data, content_type="multipart/form-data")


def _classify(db: Database, study_id: int) -> list[int]:
    with db.transaction() as session:
        ids = list(session.scalars(select(Image.id).where(Image.study_id == study_id, Image.status == ImageStatus.QUEUED)))
    predict(db, ids, [0.5 if index % 2 == 0 else 0.97 for index in range(len(ids))])
    with db.transaction() as session:
        finish_study_if_complete(session, study_id)
    return ids


def test_upload_is_split_by_study_with_reasons_and_dicom_fields(
    client: FlaskClient, production_model: int, settings: Settings, dicom_dir: Path
) -> None:
    rg3 = (dicom_dir / "RG3_UNCR.dcm").read_bytes()
    no_pixels = pydicom.dcmread(io.BytesIO(rg3))
    del no_pixels.PixelData
    other_study = small_ct_like(12)
    files = {
        "export/IMG0001.jpg": rg3,  # DICOM named .jpg
        "export/IMG0002": (dicom_dir / "RG3_J2KI.dcm").read_bytes(),
        "export/photo.dcm": _jpeg(),  # JPEG named .dcm
        "export/hand.dcm": _bytes(other_study),
        "export/report.dcm": _bytes(_sr_in_study(rg3)),
        "export/truncated.dcm": rg3[: len(rg3) // 2],
        "export/nopixels.dcm": _bytes(no_pixels),
    }
    response = _upload(client, files)
    assert response.status_code == 201, response.get_data(as_text=True)
    body = response.get_json()
    studies = body["studies"]
    assert [s["study_instance_uid"] for s in studies] == [RG3_STUDY, None, str(other_study.StudyInstanceUID)]
    assert body["id"] == studies[0]["id"] and body["files"] == studies[0]["files"]  # top level = first study
    assert [s["name"] for s in studies] == ["pacs export (CR EXTREMITY 2004-08-26)", "pacs export (other files)",
                                           "pacs export (DX HAND 2024-01-02)"]
    first = {f["filename"]: f for f in studies[0]["files"]}
    assert set(first) == {"export/IMG0001.jpg", "export/IMG0002", "export/report.dcm", "export/truncated.dcm",
                          "export/nopixels.dcm"}
    assert first["export/IMG0001.jpg"]["status"] == first["export/IMG0002"]["status"] == "queued"
    assert "SR Storage object is not an image" in first["export/report.dcm"]["error"]
    assert "truncated" in first["export/truncated.dcm"]["error"]
    assert "no pixel data" in first["export/nopixels.dcm"]["error"]
    assert [f["status"] for f in studies[1]["files"]] == ["queued"]  # the JPEG, by content
    assert studies[0]["modality"] == "CR" and studies[0]["body_part"] == "EXTREMITY" and studies[0]["study_date"] == "2004-08-26"
    assert studies[0]["sr_url"] == f"/api/studies/{studies[0]['id']}/sr.dcm" and studies[1]["sr_url"] is None
    queued_tasks = {message["args"][0] for message in broker_messages(settings)}
    assert queued_tasks == {s["id"] for s in studies}  # one queue entry per study, after the commit

    page = client.get(f"/studies/{studies[0]['id']}").get_data(as_text=True)
    assert 'id="dicom-modality">CR<' in page and 'id="dicom-body-part">EXTREMITY<' in page
    assert 'id="dicom-study-date">2004-08-26<' in page and 'id="export-sr"' in page
    assert 'id="dicom-study"' not in client.get(f"/studies/{studies[1]['id']}").get_data(as_text=True)

    results = client.get(f"/api/studies/{studies[0]['id']}/results").get_json()["images"]
    by_name = {item["filename"]: item for item in results}
    assert by_name["export/IMG0001.jpg"]["sop_instance_uid"] == "1.3.6.1.4.1.5962.1.1.11.1.1.20040826185059.5457"
    assert by_name["export/IMG0001.jpg"]["modality"] == "CR"


def test_exports_carry_dicom_uids(client: FlaskClient, db: Database, production_model: int, dicom_dir: Path) -> None:
    body = _upload(client, {"rg3.dcm": (dicom_dir / "RG3_UNCR.dcm").read_bytes(), "x.jpg": _jpeg()}).get_json()
    rows = list(csv.DictReader(io.StringIO(client.get(f"/studies/{body['id']}/export.csv").get_data(as_text=True))))
    assert rows[0]["sop_instance_uid"] == "1.3.6.1.4.1.5962.1.1.11.1.1.20040826185059.5457"
    assert rows[0]["study_instance_uid"] == RG3_STUDY and rows[0]["sop_class_uid"] == pydicom.uid.ComputedRadiographyImageStorage
    exported = client.get(f"/api/studies/{body['id']}/export?format=json").get_json()
    assert exported["images"][0]["series_instance_uid"] == "1.3.6.1.4.1.5962.1.3.11.1.20040826185059.5457"
    assert exported["study"]["study_instance_uid"] == RG3_STUDY
    other = client.get(f"/api/studies/{body['studies'][1]['id']}/export?format=json").get_json()
    assert other["images"][0]["sop_instance_uid"] is None  # not DICOM: no UIDs


def test_structured_report_download_from_page_and_api_is_audited_and_valid(
    client: FlaskClient, app: Flask, users: dict[str, str], anon: FlaskClient, db: Database, settings: Settings,
    production_model: int, dicom_dir: Path, tmp_path: Path,
) -> None:
    files = {name: with_identity(dicom_dir / name) for name in ("RG3_UNCR.dcm", "RG3_J2KR.dcm", "RG3_J2KI.dcm")}
    body = _upload(client, files).get_json()
    study_id = body["id"]
    assert len(body["studies"]) == 1
    not_yet = client.get(f"/api/studies/{study_id}/sr.dcm")
    assert not_yet.status_code == 409 and "once every image is finished" in not_yet.get_json()["error"]
    _classify(db, study_id)

    response = token_client(app, users["reviewer"]).get(f"/api/studies/{study_id}/sr.dcm")
    assert response.status_code == 200 and response.mimetype == "application/dicom"
    assert f"study-{study_id}-sr.dcm" in response.headers["Content-Disposition"]
    report = pydicom.dcmread(io.BytesIO(response.data))
    assert report.SOPClassUID == pydicom.uid.ComprehensiveSRStorage and report.StudyInstanceUID == RG3_STUDY
    assert str(report.PatientName) == PHI["PatientName"]  # the PACS files the report with its patient
    values = report_values(response.data)
    for item in client.get(f"/api/studies/{study_id}/results").get_json()["images"]:
        assert item["sop_instance_uid"] in values and item["label"] in values
    assert "tiny test model" in values and "not a diagnosis" in values
    assert dciodvfy_errors(response.data, tmp_path) == []

    page_download = client.get(f"/studies/{study_id}/sr.dcm")
    assert page_download.status_code == 200 and page_download.data[128:132] == b"DICM"
    assert anon.get(f"/api/studies/{study_id}/sr.dcm").status_code == 401
    with db.transaction() as session:
        exports = list(session.scalars(select(AuditEvent).where(AuditEvent.action == "export")))
        assert len(exports) == 2 and all("dicom-sr" in (event.detail or "") for event in exports)

    # Nothing that identifies the patient reached the database, whatever was uploaded, classified and exported.
    needles = [*PHI.values(), *PHI["PatientName"].split("^")]
    assert database_hits(settings.database_url, needles) == []


def test_structured_report_of_a_study_without_dicom_is_409(client: FlaskClient, db: Database, production_model: int) -> None:
    body = _upload(client, {"a.jpg": _jpeg()}).get_json()
    _classify(db, body["id"])
    response = client.get(f"/api/studies/{body['id']}/sr.dcm")
    assert response.status_code == 409 and "no classified DICOM image" in response.get_json()["error"]
    assert client.get("/api/studies/999999/sr.dcm").status_code == 404


def test_dicom_images_are_shown_as_png_renderings(client: FlaskClient, production_model: int, dicom_dir: Path) -> None:
    from PIL import Image as PILImage

    body = _upload(client, {"rg3.dcm": (dicom_dir / "RG3_J2KR.dcm").read_bytes(), "x.jpg": _jpeg()}).get_json()
    item = client.get(f"/api/studies/{body['id']}/results").get_json()["images"][0]
    assert item["preview_url"] == f"/images/{item['id']}/preview.png" and item["file_url"] != item["preview_url"]
    response = client.get(item["preview_url"])
    assert response.status_code == 200 and response.mimetype == "image/png"
    picture = PILImage.open(io.BytesIO(response.data))
    assert max(picture.size) == 1760 and picture.getextrema() == (0, 255)
    assert client.get(item["preview_url"]).data == response.data  # made once, then served from the store
    page = client.get(f"/studies/{body['id']}").get_data(as_text=True)
    assert f'src="{item["preview_url"]}"' in page
    jpeg = client.get(f"/api/studies/{body['studies'][1]['id']}/results").get_json()["images"][0]
    assert jpeg["preview_url"] == jpeg["file_url"]  # browsers show JPEG as it is

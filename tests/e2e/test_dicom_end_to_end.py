"""DICOM end to end: portal (HTTP) -> filesystem broker -> a real celery worker -> SQLite -> the SR download.

The three RG3 files (uncompressed, JPEG 2000 lossless, JPEG 2000 lossy), one of them named ``.jpg``,
classify next to a JPEG named ``.dcm``; a DICOM without pixel data, a truncated DICOM and an SR
object in the same upload fail alone with a reason. The structured report of the DICOM study reads
back with pydicom, names every source image and the model version and passes dciodvfy, and no
patient identifier of the input is anywhere in the database.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import requests

from core.config import Settings
from tests.conftest import deploy_tiny_model, make_settings
from tests.core.test_dicom import PHI, _bytes, _jpeg, _sr_in_study, database_hits, dciodvfy_errors, report_values, with_identity
from tests.e2e.conftest import LivePortal, LiveWorker, api_token, wait_for

RG3_STUDY = "1.3.6.1.4.1.5962.1.2.11.20040826185059.5457"


@pytest.mark.slow
def test_dicom_studies_classify_end_to_end_and_return_a_valid_structured_report(
    tmp_path: Path,
    dicom_dir: Path,
    tiny_weights: dict[str, object],
    live_worker_factory: Callable[[Settings], LiveWorker],
    live_portal_factory: Callable[[Settings], LivePortal],
) -> None:
    settings = make_settings(tmp_path / "var")
    db, version_id = deploy_tiny_model(settings, tiny_weights)
    worker = live_worker_factory(settings)
    portal = live_portal_factory(settings)
    portal.headers = {"Authorization": f"Bearer {api_token(settings)}"}

    uncompressed = with_identity(dicom_dir / "RG3_UNCR.dcm")
    no_pixels = pydicom.dcmread(io.BytesIO(uncompressed))
    del no_pixels.PixelData
    files = {
        "pacs/RG3_UNCR.jpg": uncompressed,  # DICOM named .jpg
        "pacs/RG3_J2KR.dcm": with_identity(dicom_dir / "RG3_J2KR.dcm"),
        "pacs/RG3_J2KI": with_identity(dicom_dir / "RG3_J2KI.dcm"),
        "pacs/scan.dcm": _jpeg((128, 96)),  # JPEG named .dcm
        "pacs/nopixels.dcm": _bytes(no_pixels),
        "pacs/truncated.dcm": uncompressed[: len(uncompressed) * 2 // 3],
        "pacs/report.dcm": _bytes(_sr_in_study(uncompressed)),
    }
    response = requests.post(
        f"{portal.url}/api/studies", data={"name": "pacs export"},
        files=[("files", (name, data, "application/octet-stream")) for name, data in files.items()],
        headers=portal.headers, timeout=120,
    )
    assert response.status_code == 201, response.text
    studies = response.json()["studies"]
    assert [s["study_instance_uid"] for s in studies] == [RG3_STUDY, None]

    def finished() -> list[dict] | None:
        if worker.process.poll() is not None:
            raise AssertionError(f"worker died:\n{worker.log()[-4000:]}")
        states = [requests.get(f"{portal.url}/api/studies/{s['id']}", headers=portal.headers, timeout=30).json()
                  for s in studies]
        return states if all(state["status"] == "done" for state in states) else None

    wait_for(finished, 300, "both studies to finish", interval=0.25)

    dicom_results = requests.get(f"{portal.url}/api/studies/{studies[0]['id']}/results", headers=portal.headers,
                                 timeout=30).json()["images"]
    by_name = {item["filename"]: item for item in dicom_results}
    for name in ("pacs/RG3_UNCR.jpg", "pacs/RG3_J2KR.dcm", "pacs/RG3_J2KI"):
        item = by_name[name]
        assert item["status"] == "done", item
        assert item["model_version_id"] == version_id and item["label"] in tiny_weights["labels"]
        assert abs(sum(item["probabilities"].values()) - 1.0) < 1e-4
    # the same picture three times: identical input for the lossless twin, nearly identical for the lossy one
    reference = by_name["pacs/RG3_UNCR.jpg"]["probabilities"]
    for name, tolerance in (("pacs/RG3_J2KR.dcm", 1e-6), ("pacs/RG3_J2KI", 0.05)):
        assert all(abs(by_name[name]["probabilities"][k] - p) <= tolerance for k, p in reference.items()), (name, reference)
    assert "no pixel data" in by_name["pacs/nopixels.dcm"]["error"]
    assert "truncated" in by_name["pacs/truncated.dcm"]["error"]
    assert "not an image" in by_name["pacs/report.dcm"]["error"]
    other = requests.get(f"{portal.url}/api/studies/{studies[1]['id']}/results", headers=portal.headers, timeout=30).json()
    assert [(item["filename"], item["status"]) for item in other["images"]] == [("pacs/scan.dcm", "done")]

    report_response = requests.get(f"{portal.url}{studies[0]['sr_url']}", headers=portal.headers, timeout=60)
    assert report_response.status_code == 200, report_response.text
    report = pydicom.dcmread(io.BytesIO(report_response.content))
    assert report.StudyInstanceUID == RG3_STUDY
    values = report_values(report_response.content)
    for name in ("pacs/RG3_UNCR.jpg", "pacs/RG3_J2KR.dcm", "pacs/RG3_J2KI"):
        assert by_name[name]["sop_instance_uid"] in values
    assert f"model version #{version_id} tiny test model" in values
    assert dciodvfy_errors(report_response.content, tmp_path) == []

    needles = [*PHI.values(), *PHI["PatientName"].split("^")]
    assert database_hits(settings.database_url, needles) == []
    db.dispose()

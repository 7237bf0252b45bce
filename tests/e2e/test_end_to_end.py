"""Portal (HTTP) -> broker -> real celery worker process -> database, on both deployments.

* embedded: SQLite file + Kombu filesystem broker (what `triage demo` runs).
* production: PostgreSQL + Redis (what docker-compose runs).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select

from core.config import Settings
from core.models import Prediction
from tests.conftest import deploy_tiny_model, make_settings, xray_sample
from tests.e2e.conftest import LivePortal, LiveWorker, api_token, wait_for

IMAGES_PER_STUDY = 24


def _deployment(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> Settings:
    if kind == "embedded":
        return make_settings(tmp_path / "var")
    postgres_url = request.getfixturevalue("postgres_url")
    redis_url = request.getfixturevalue("redis_url")
    return make_settings(tmp_path / "var", database_url=postgres_url, broker_url=redis_url)


def _upload(portal: LivePortal, files: list[tuple[str, bytes]], name: str) -> dict:
    response = requests.post(
        f"{portal.url}/api/studies",
        data={"name": name},
        files=[("files", (filename, data, "application/octet-stream")) for filename, data in files],
        headers=portal.headers, timeout=120,
    )
    assert response.status_code == 201, response.text
    return response.json()


def _wait_until_done(portal: LivePortal, study_id: int, worker: LiveWorker) -> dict:
    def done() -> dict | None:
        if worker.process.poll() is not None:
            raise AssertionError(f"worker died:\n{worker.log()[-4000:]}")
        status = requests.get(f"{portal.url}/api/studies/{study_id}", headers=portal.headers, timeout=30).json()
        return status if status["status"] == "done" else None

    return wait_for(done, 300, f"study {study_id} to finish", interval=0.25)  # type: ignore[return-value]


@pytest.mark.parametrize("kind", ["embedded", "postgres_redis"])
def test_study_flows_from_upload_to_review(
    kind: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    xrays_dir: Path,
    tiny_weights: dict[str, object],
    live_worker_factory: Callable[[Settings], LiveWorker],
    live_portal_factory: Callable[[Settings], LivePortal],
) -> None:
    settings = _deployment(request, tmp_path, kind)
    db, version_id = deploy_tiny_model(settings, tiny_weights)
    worker = live_worker_factory(settings)
    portal = live_portal_factory(settings)
    portal.headers = {"Authorization": f"Bearer {api_token(settings)}"}

    good = [(f"{path.parent.name}/{path.name}", path.read_bytes()) for path in xray_sample(xrays_dir, IMAGES_PER_STUDY)]
    bad = [
        ("broken/truncated.jpg", good[0][1][: len(good[0][1]) // 3]),
        ("broken/notes.jpg", b"patient list - not an image\n"),
        ("broken/empty.jpg", b""),
    ]
    created = _upload(portal, good[:12] + bad + good[12:], name=f"e2e {kind}")
    study_id = created["id"]

    status = _wait_until_done(portal, study_id, worker)
    assert status["counts"]["done"] == IMAGES_PER_STUDY
    assert status["counts"]["failed"] == 3

    results = requests.get(f"{portal.url}/api/studies/{study_id}/results", headers=portal.headers, timeout=30).json()["images"]
    by_name = {item["filename"]: item for item in results}
    assert len(by_name) == IMAGES_PER_STUDY + 3
    for filename, _ in good:
        item = by_name[filename]
        assert item["status"] == "done", item
        assert item["model_version_id"] == version_id
        assert abs(sum(item["probabilities"].values()) - 1.0) < 1e-4
        assert item["label"] == max(item["probabilities"], key=item["probabilities"].get)
        assert item["flagged"] == (item["confidence"] < tiny_weights["threshold"])
    assert "truncated" in by_name["broken/truncated.jpg"]["error"]
    assert "not an image" in by_name["broken/notes.jpg"]["error"]
    assert "empty file" in by_name["broken/empty.jpg"]["error"]

    with db.transaction() as session:
        per_image = session.execute(
            select(Prediction.image_id, func.count()).where(Prediction.image_id.in_([i["id"] for i in results])).group_by(Prediction.image_id)
        ).all()
        assert len(per_image) == IMAGES_PER_STUDY and all(count == 1 for _, count in per_image)

    # The study page shows results and failures to a person.
    page = requests.get(f"{portal.url}/studies/{study_id}", headers=portal.headers, timeout=30).text
    assert "broken/notes.jpg" in page and "not an image" in page

    flagged = [item for item in results if item["flagged"]]
    assert flagged, "the random tiny model should leave some images under the 0.9 threshold"
    queue = requests.get(f"{portal.url}/api/review-queue", headers=portal.headers, timeout=30).json()["cases"]
    # Flagged images, plus the audit samples (TRIAGE_AUDIT_RATE of the unflagged ones).
    assert {item["image_id"] for item in queue if item["reason"] != "audit"} == {item["id"] for item in flagged}
    assert not {item["image_id"] for item in queue if item["reason"] == "audit"} & {item["id"] for item in flagged}

    case = flagged[0]
    response = requests.post(
        f"{portal.url}/api/images/{case['id']}/review",
        json={"label": "fracture", "note": "cortical break"},
        headers=portal.headers, timeout=30,
    )
    assert response.status_code == 201, response.text
    queue_after = requests.get(f"{portal.url}/api/review-queue", headers=portal.headers, timeout=30).json()["cases"]
    assert case["id"] not in {item["image_id"] for item in queue_after}
    assert len(queue_after) == len(queue) - 1
    db.dispose()

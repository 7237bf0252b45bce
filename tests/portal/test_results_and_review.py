"""Study status and results JSON, and reviewing flagged cases through the API and the HTML form."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from core.db import Database
from core.models import Review
from core.studies import finish_study_if_complete
from tests.conftest import xray_sample
from tests.portal.conftest import csrf_token, predict, session_client


@pytest.fixture
def study(client: FlaskClient, db: Database, production_model: int, xrays_dir: Path) -> dict[str, object]:
    """A study of 3 radiographs and one bad file; images 1 and 3 predicted with low confidence (flagged)."""
    files = [(io.BytesIO(p.read_bytes()), p.name) for p in xray_sample(xrays_dir, 3)]
    files.append((io.BytesIO(b"not an image"), "bad.jpg"))
    response = client.post("/api/studies", data={"name": "results", "files": files}, content_type="multipart/form-data")
    assert response.status_code == 201
    body = response.get_json()
    good = [item["id"] for item in body["files"] if item["status"] == "queued"]
    predict(db, good, [0.55, 0.97, 0.6])  # tiny model threshold is 0.9
    with db.transaction() as session:
        assert finish_study_if_complete(session, body["id"])
    return {"id": body["id"], "good": good, "bad": [item["id"] for item in body["files"] if item["status"] == "failed"]}


def test_status_and_results_report_counts_predictions_and_errors(client: FlaskClient, study: dict, production_model: int) -> None:
    status = client.get(f"/api/studies/{study['id']}").get_json()
    assert status["status"] == "done"
    assert status["counts"] == {"queued": 0, "processing": 0, "done": 3, "failed": 1, "total": 4, "flagged": 2}
    results = client.get(f"/api/studies/{study['id']}/results").get_json()
    images = {image["id"]: image for image in results["images"]}
    first, second, _ = study["good"]
    assert images[first]["flagged"] is True and images[first]["flag_reason"] == "low confidence"
    assert images[first]["confidence"] == pytest.approx(0.55)
    assert images[first]["label"] == "fracture" and set(images[first]["probabilities"]) == {"fracture", "no_fracture"}
    assert images[first]["model_version_id"] == production_model
    assert images[second]["flagged"] is False
    (bad,) = study["bad"]
    assert images[bad]["status"] == "failed" and "not an image" in images[bad]["error"]
    assert images[bad]["label"] is None and images[bad]["file_url"] is None
    listing = client.get("/api/studies").get_json()["studies"]
    assert [s["id"] for s in listing] == [study["id"]] and listing[0]["counts"]["flagged"] == 2
    assert client.get("/api/studies/9999").status_code == 404
    assert client.get("/api/studies/9999").get_json() == {"error": "study #9999 not found"}


def test_review_through_the_api_removes_the_case_from_the_queue(client: FlaskClient, db: Database, study: dict) -> None:
    first, _, third = study["good"]
    queue = client.get("/api/review-queue").get_json()
    assert [case["image_id"] for case in queue["cases"]] == [first, third]  # oldest first, only flagged
    assert queue["cases"][0]["labels"] == ["fracture", "no_fracture"]

    assert queue["cases"][0]["waiting_seconds"] >= 0 and queue["cases"][0]["waiting"].endswith("s")

    response = client.post(f"/api/images/{first}/review", json={"label": "no_fracture", "note": "rotated"})
    assert response.status_code == 201
    assert response.get_json()["label"] == "no_fracture"
    with db.transaction() as session:
        (review,) = session.scalars(select(Review).where(Review.image_id == first))
        # The reviewer is the signed-in user (from the token), never a name the client makes up.
        assert (review.reviewer_name, review.note) == ("admin", "rotated")
        assert review.reviewer_id is not None
    assert [case["image_id"] for case in client.get("/api/review-queue").get_json()["cases"]] == [third]
    assert client.get(f"/api/review-queue?study={study['id'] + 1}").get_json()["count"] == 0


def test_review_with_bad_input_is_refused(client: FlaskClient, db: Database, study: dict) -> None:
    first = study["good"][0]
    unknown = client.post(f"/api/images/{first}/review", json={"label": "broken_leg"})
    assert unknown.status_code == 400
    assert "label must be one of fracture, no_fracture" in unknown.get_json()["error"]
    assert client.post(f"/api/images/{first}/review", json={"note": "no label"}).status_code == 400
    assert client.post(f"/api/images/{first}/review", json={"label": "fracture", "note": 5}).status_code == 400
    assert client.post(f"/api/images/{first}/review", data="label=fracture").status_code == 400
    assert client.post("/api/images/9999/review", json={"label": "fracture", "reviewer": "x"}).status_code == 404
    failed = client.post(f"/api/images/{study['bad'][0]}/review", json={"label": "fracture", "reviewer": "x"})
    assert failed.status_code == 409
    with db.transaction() as session:
        assert session.scalars(select(Review)).all() == []


def test_viewer_records_a_label_with_csrf_and_opens_the_next_case(app, db: Database, study: dict) -> None:  # type: ignore[no-untyped-def]
    client = session_client(app, "admin")  # a person in a browser: cookie, no token
    first, _, third = study["good"]
    queue = client.get("/review").get_data(as_text=True)
    assert f'id="case-{first}"' in queue and f'id="case-{third}"' in queue
    assert queue.index(f'id="case-{first}"') < queue.index(f'id="case-{third}"')  # oldest first
    assert f'href="/review/{first}"' in queue and 'class="waiting"' in queue

    page = client.get(f"/review/{first}").get_data(as_text=True)
    assert "55 %" in page and "45 %" in page  # probability of every class is shown
    assert 'data-label="no_fracture" data-key="2"' in page and 'data-model-label="fracture"' in page
    assert 'id="ww"' in page and 'id="wl"' in page and 'id="preset"' in page and "viewer.js" in page
    assert 'data-status="absent"' in page and 'id="request-heatmap"' in page  # none stored: one can be asked for

    without_token = client.post(f"/review/{first}", data={"label": "fracture"})
    assert without_token.status_code == 400 and b"CSRF" in without_token.data

    response = client.post(f"/review/{first}", data={"csrf_token": csrf_token(page), "label": "fracture", "note": ""})
    assert response.status_code == 303
    assert response.headers["Location"] == f"/review/{third}"  # the next case opens
    with db.transaction() as session:
        (review,) = session.scalars(select(Review).where(Review.image_id == first))
        assert (review.label, review.reviewer_name, review.note) == ("fracture", "admin", None)
    after = client.get("/review").get_data(as_text=True)
    assert f'id="case-{first}"' not in after and f'id="case-{third}"' in after

    bad_label = client.post(f"/review/{third}", data={"csrf_token": csrf_token(after), "label": "nope"})
    assert bad_label.status_code == 400 and b"label must be one of" in bad_label.data
    last = client.post(f"/review/{third}", data={"csrf_token": csrf_token(after), "label": "no_fracture", "note": "ok"})
    assert last.status_code == 303 and last.headers["Location"] == "/review"  # queue empty: back to it


def test_queue_filters_by_study_and_flag_reason(client: FlaskClient, db: Database, study: dict) -> None:
    first, _, third = study["good"]
    assert client.get(f"/api/review-queue?study={study['id']}").get_json()["count"] == 2
    assert client.get("/api/review-queue?reason=low confidence").get_json()["count"] == 2
    assert client.get("/api/review-queue?reason=something else").get_json()["count"] == 0
    page = client.get("/review?reason=nothing+like+it").get_data(as_text=True)
    assert f'id="case-{first}"' not in page and "0 flagged cases waiting" in page
    assert '<option value="low confidence"' in client.get("/review").get_data(as_text=True)


@pytest.mark.parametrize(("url", "names"), [
    ("/api/review-queue?study=abc", "study"),
    ("/api/review-queue?study=0", "study"),
    ("/api/review-queue?study=1.5", "study"),
    ("/api/review-queue?reason=" + "x" * 201, "reason"),
    ("/api/review-queue?order=random", "order"),
    ("/api/review-queue?studdy=1", "'studdy'"),  # a misspelt filter is not ignored
    ("/api/review-queue?order=oldest&order=suspicious", "'order' given more than once"),
    ("/api/review-queue?study=1&study=2", "'study' given more than once"),
    ("/api/studies/1/export?format=xml", "format"),
    ("/api/studies/1/export?fmt=csv", "'fmt'"),
    ("/api/studies?limit=5", "'limit'"),
    ("/api/models?production=1", "'production'"),
])
def test_bad_query_parameters_of_the_api_are_a_400_that_names_them(client: FlaskClient, study: dict, url: str, names: str) -> None:
    response = client.get(url)
    assert response.status_code == 400, response.get_data(as_text=True)
    assert names in response.get_json()["error"]


def test_good_and_empty_query_parameters_are_accepted(client: FlaskClient, study: dict) -> None:
    assert client.get(f"/api/review-queue?study={study['id']}&reason=low+confidence&order=suspicious").get_json()["count"] == 2
    assert client.get("/api/review-queue?study=&reason=&order=").get_json()["count"] == 2  # empty: no filter
    assert client.get("/api/review-queue?reason=" + "x" * 200).get_json()["count"] == 0
    assert client.get(f"/api/studies/{study['id']}/export?format=csv").status_code == 200

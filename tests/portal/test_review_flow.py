"""The review workspace over HTTP: undo (own review, in the window, audited), skip and previous, spot checks of
unflagged images, the worklist's sorting and filters, and wording (percent, labels and reasons in words)."""

from __future__ import annotations

import io
import json
import re
from datetime import timedelta
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from core.auth import create_user
from core.db import Database
from core.models import AuditEvent, Image, ModelVersion, Review, utcnow
from core.studies import REVIEW_UNDO_SECONDS, finish_study_if_complete, save_predictions
from portal import presenters
from tests.conftest import xray_sample
from tests.portal.conftest import FakeResult, PASSWORD, csrf_token, session_client


def predict(db: Database, p_fracture: dict[int, float], unfamiliar: tuple[int, ...] = (), audit: tuple[int, ...] = ()) -> None:
    """Predictions of the tiny model (fracture / no_fracture, threshold 0.9) with the given p(fracture) per image."""
    with db.transaction() as session:
        pairs = []
        for image_id, p in p_fracture.items():
            image = session.get(Image, image_id)
            label, confidence = ("fracture", p) if p >= 0.5 else ("no_fracture", 1 - p)
            kind = "unfamiliar" if image_id in unfamiliar else "unsure" if confidence < 0.9 else None
            reason = {"unfamiliar": "Unfamiliar image: unlike the radiographs the model was trained on (score 80 > 40)",
                      "unsure": "confidence 0.512 below threshold 0.900"}.get(kind or "")  # an old-style text
            pairs.append((image, FakeResult({"fracture": p, "no_fracture": 1 - p}, label, confidence, kind is not None, reason, kind, p)))
        save_predictions(session, pairs[0][0].study.model_version_id, pairs, audit_ids=set(audit))


def upload(client: FlaskClient, paths: list[Path], name: str = "ward") -> list[int]:
    files = [(io.BytesIO(p.read_bytes()), p.name) for p in paths]
    response = client.post("/api/studies", data={"name": name, "files": files}, content_type="multipart/form-data")
    assert response.status_code == 201, response.get_data(as_text=True)
    return [item["id"] for item in response.get_json()["files"]]


@pytest.fixture
def cases(client: FlaskClient, db: Database, production_model: int, xrays_dir: Path) -> dict[str, int]:
    """One study of five images: three unsure (p fracture 0.6, 0.3, 0.8), one confident (0.97) and one audit sample (0.02)."""
    ids = upload(client, xray_sample(xrays_dir, 5))
    unsure_a, unsure_b, confident, unsure_c, audit = ids
    predict(db, {unsure_a: 0.6, unsure_b: 0.3, confident: 0.97, unsure_c: 0.8, audit: 0.02}, audit=(audit,))
    with db.transaction() as session:
        study_id = session.get(Image, ids[0]).study_id
        assert finish_study_if_complete(session, study_id)
    return {"a": unsure_a, "b": unsure_b, "confident": confident, "c": unsure_c, "audit": audit, "study": study_id}


def _review(browser: FlaskClient, image_id: int, label: str, **query: object) -> str:
    page = browser.get(f"/review/{image_id}", query_string=query).get_data(as_text=True)
    response = browser.post(f"/review/{image_id}", query_string=query, data={"csrf_token": csrf_token(page), "label": label})
    assert response.status_code == 303, response.get_data(as_text=True)[:300]
    return response.headers["Location"]


def _events(db: Database, action: str) -> list[AuditEvent]:
    with db.transaction() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)))


def test_undo_takes_back_ones_own_last_review_and_is_audited(app: Flask, db: Database, cases: dict) -> None:
    reviewer = session_client(app, "reviewer")
    following = _review(reviewer, cases["a"], "no_fracture")
    page = reviewer.get(following).get_data(as_text=True)
    assert "Recorded <strong>No fracture</strong>" in page and 'id="undo-form"' in page
    assert f'action="/review/{cases["a"]}/undo"' in page

    response = reviewer.post(f"/review/{cases['a']}/undo", data={"csrf_token": csrf_token(page)})
    assert response.status_code == 303 and response.headers["Location"] == f"/review/{cases['a']}"
    with db.transaction() as session:
        assert session.scalars(select(Review)).all() == []
    (event,) = _events(db, "review_undo")
    assert event.username == "reviewer" and event.object_id == str(cases["a"])
    assert json.loads(event.detail)["label"] == "no_fracture"
    assert len(_events(db, "review")) == 1  # the review itself stays in the audit log
    again = reviewer.get(f"/review/{cases['a']}").get_data(as_text=True)
    assert "Undone: No fracture" in again and 'id="review-form"' in again  # back in the queue, to choose again
    assert f'id="case-{cases["a"]}"' in reviewer.get("/review").get_data(as_text=True)
    assert reviewer.post(f"/review/{cases['a']}/undo", data={"csrf_token": csrf_token(page)}).status_code == 409


def test_undo_refuses_someone_elses_review_an_old_one_and_one_not_last(app: Flask, db: Database, cases: dict) -> None:
    with db.transaction() as session:
        create_user(session, "second", PASSWORD, "reviewer")
    first, second = session_client(app, "reviewer"), session_client(app, "second")
    _review(first, cases["a"], "fracture")
    token = csrf_token(second.get("/review").get_data(as_text=True))
    other = second.post(f"/review/{cases['a']}/undo", data={"csrf_token": token})
    assert other.status_code == 409 and "only your own review" in other.get_data(as_text=True)

    _review(first, cases["b"], "fracture")  # the first review is no longer the reviewer's last
    token = csrf_token(first.get("/review").get_data(as_text=True))
    not_last = first.post(f"/review/{cases['a']}/undo", data={"csrf_token": token})
    assert not_last.status_code == 409 and "Only your last review" in not_last.get_data(as_text=True)

    with db.transaction() as session:  # the last one, but older than the window
        review = session.scalars(select(Review).where(Review.image_id == cases["b"])).one()
        review.created_at = utcnow() - timedelta(seconds=REVIEW_UNDO_SECONDS + 60)
    assert 'id="undo-form"' not in first.get(f"/review/{cases['c']}").get_data(as_text=True)
    late = first.post(f"/review/{cases['b']}/undo", data={"csrf_token": token})
    assert late.status_code == 409 and "can be undone for 5 minutes" in late.get_data(as_text=True)
    assert first.post(f"/review/{cases['b']}/undo", data={}).status_code == 400  # CSRF
    with db.transaction() as session:
        assert len(session.scalars(select(Review)).all()) == 2
    assert _events(db, "review_undo") == []


def test_skip_moves_on_without_recording_and_previous_goes_back(app: Flask, db: Database, cases: dict) -> None:
    reviewer = session_client(app, "reviewer")
    reviewer.get("/review")  # a sitting starts at the worklist
    reviewer.get(f"/review/{cases['a']}")
    skipped = reviewer.get(f"/review/{cases['a']}/skip")
    assert skipped.status_code == 303 and skipped.headers["Location"] == f"/review/{cases['b']}"
    page = reviewer.get(f"/review/{cases['b']}").get_data(as_text=True)
    assert f'href="/review/{cases["a"]}" id="previous-case"' in page
    # After the others, the skipped case comes back.
    assert _review(reviewer, cases["b"], "fracture") == f"/review/{cases['c']}"
    assert _review(reviewer, cases["c"], "fracture") == f"/review/{cases['audit']}"
    assert _review(reviewer, cases["audit"], "no_fracture") == f"/review/{cases['a']}"
    with db.transaction() as session:
        assert cases["a"] not in {r.image_id for r in session.scalars(select(Review))}
    assert reviewer.get("/review/999999/skip").status_code == 404


def test_any_classified_image_can_be_spot_checked_and_the_study_offers_its_flags(app: Flask, db: Database, cases: dict) -> None:
    reviewer = session_client(app, "reviewer")
    study = reviewer.get(f"/studies/{cases['study']}").get_data(as_text=True)
    assert f'href="/review/first?study={cases["study"]}"' in study and "Review this study's flags (4 waiting)" in study
    assert f'href="/review/{cases["confident"]}?study={cases["study"]}" class="open-case">Spot check' in study
    assert f'href="/review/{cases["a"]}?study={cases["study"]}" class="open-case">Review' in study
    first = reviewer.get(f"/review/first?study={cases['study']}")
    assert first.headers["Location"] == f"/review/{cases['a']}?study={cases['study']}"

    page = reviewer.get(f"/review/{cases['confident']}?study={cases['study']}").get_data(as_text=True)
    assert "Not flagged: spot check" in page and 'id="review-form"' in page
    following = _review(reviewer, cases["confident"], "no_fracture", study=cases["study"])
    assert following == f"/review/{cases['a']}?study={cases['study']}"  # then on to the study's waiting cases
    with db.transaction() as session:
        review = session.scalars(select(Review).where(Review.image_id == cases["confident"])).one()
        assert (review.label, review.reviewer_name) == ("no_fracture", "reviewer")
    (event,) = _events(db, "review")
    assert json.loads(event.detail) == {"label": "no_fracture", "rereview": False, "spot_check": True}


def test_rows_json_reports_each_images_own_status(client: FlaskClient, db: Database, production_model: int,
                                                  xrays_dir: Path) -> None:
    ids = upload(client, xray_sample(xrays_dir, 3))
    predict(db, {ids[0]: 0.6})
    with db.transaction() as session:
        study_id = session.get(Image, ids[0]).study_id
    body = client.get(f"/studies/{study_id}/rows.json").get_json()
    rows = {row["id"]: row for row in body["images"]}
    assert body["status"] != "done" and body["counts"]["done"] == 1
    assert rows[ids[0]]["status"] == "done" and rows[ids[0]]["label_name"] == "Fracture"
    assert rows[ids[0]]["confidence_text"] == "60 %" and rows[ids[0]]["reason_text"] == "Model unsure: 60 % < 90 % needed"
    assert rows[ids[1]]["status"] == "queued" and rows[ids[1]]["label_name"] == "" and rows[ids[1]]["case_url"] is None


def _worklist_ids(browser: FlaskClient, **query: object) -> list[int]:
    page = browser.get("/review", query_string=query)
    assert page.status_code == 200, page.get_data(as_text=True)[:300]
    return [int(i) for i in re.findall(r'<tr id="case-(\d+)"', page.get_data(as_text=True))]


def test_the_worklist_sorts_and_filters_by_label_fracture_probability_reason_study_and_waiting(
    app: Flask, client: FlaskClient, db: Database, cases: dict
) -> None:
    reviewer = session_client(app, "reviewer")
    a, b, c, audit = cases["a"], cases["b"], cases["c"], cases["audit"]
    assert _worklist_ids(reviewer) == [a, b, c, audit]
    assert _worklist_ids(reviewer, order="suspicious") == [c, a, b, audit]
    assert _worklist_ids(reviewer, order="least_suspicious") == [audit, b, a, c]
    assert _worklist_ids(reviewer, order="newest") == [audit, c, b, a]
    assert _worklist_ids(reviewer, order="label") == [c, a, b, audit]  # fracture, then no_fracture; most suspicious first
    assert _worklist_ids(reviewer, order="reason") == [a, b, c, audit]  # unsure, then audit
    assert _worklist_ids(reviewer, model_label="no_fracture") == [b, audit]
    assert _worklist_ids(reviewer, min_fracture=60) == [a, c]
    assert _worklist_ids(reviewer, reason="audit") == [audit]
    assert _worklist_ids(reviewer, study=cases["study"] + 1) == []
    assert _worklist_ids(reviewer, waited=60) == []  # nothing has waited an hour yet
    page = reviewer.get("/review?order=suspicious").get_data(as_text=True)
    assert 'id="sort-fracture">Fracture probability ▼' in page and 'href="/review?order=least_suspicious" id="sort-fracture"' in page
    assert reviewer.get("/review?order=random").status_code == 400
    assert reviewer.get("/review?min_fracture=101").status_code == 400
    # The order and filters travel with the cases: the next case follows them.
    assert _review(reviewer, c, "fracture", order="suspicious") == f"/review/{a}?order=suspicious"
    assert client.get("/api/review-queue?order=least_suspicious").get_json()["cases"][0]["image_id"] == audit


def test_the_same_image_in_two_studies_is_one_row_per_study(app: Flask, client: FlaskClient, db: Database,
                                                         production_model: int, xrays_dir: Path) -> None:
    path = xray_sample(xrays_dir, 1)
    first, second = upload(client, path, "first"), upload(client, path, "second")
    predict(db, {first[0]: 0.6})
    predict(db, {second[0]: 0.6})
    page = session_client(app, "reviewer").get("/review").get_data(as_text=True)
    rows = re.findall(r'<tr id="case-(\d+)"', page)
    assert rows == [str(first[0]), str(second[0])]
    assert "first</a>" in page and "second</a>" in page


def test_wording_is_percent_labels_and_reasons_in_words(app: Flask, db: Database, cases: dict) -> None:
    reviewer = session_client(app, "reviewer")
    page = reviewer.get(f"/review/{cases['b']}").get_data(as_text=True)
    assert "Model unsure: 70 % &lt; 90 % needed" in page  # from the data, not the old stored text
    assert "0.512" not in page and "0.900" not in page and ">no_fracture<" not in page
    assert 'id="model-label">No fracture</strong> (70 %)' in page
    # Number keys follow the order the probabilities are shown in: highest first.
    assert page.index('data-label="no_fracture" data-key="1"') < page.index('data-label="fracture" data-key="2"')
    audit = reviewer.get(f"/review/{cases['audit']}").get_data(as_text=True)
    assert "Audit sample: random check of an unflagged image" in audit
    queue = reviewer.get("/review").get_data(as_text=True)
    assert "<strong>Fracture</strong> 60 %" in queue and "Audit sample" in queue

    assert presenters.percent_pair(0.99996, 0.99999) == ("99.996 %", "99.999 %")  # never "1.000 below 1.000"
    assert presenters.label_name("comminuted_fracture") == "Comminuted fracture"


def test_the_models_page_shows_metrics_as_tables_and_the_temperature_rounded(
    client: FlaskClient, db: Database, production_model: int
) -> None:
    with db.transaction() as session:
        version = session.get(ModelVersion, production_model)
        version.temperature = 1.23456789
        version.metrics = {
            "val_accuracy": 0.6125, "best_epoch": 7,
            "test": {"n": 767, "accuracy": 0.575, "error_unflagged_interval": [0.01, 0.04],
                     "per_class": {"fracture": {"precision": 0.5, "recall": 0.25, "f1": 0.33, "support": 40}},
                     "confusion_matrix": [[10, 30], [5, 55]], "flag_rate_by_reason": {"unsure": 0.31, "unfamiliar": 0.08}},
        }
    page = client.get("/models").get_data(as_text=True)
    assert '{"' not in page and "[[" not in page  # no JSON blob
    assert ">1.23<" in page and "1.23456789" not in page.replace('title="1.23456789"', "")
    assert "<td>Val accuracy</td><td class=\"num\">61 %</td>" in page and "<td>N</td><td class=\"num\">767</td>" in page
    assert "Test › per class" in page and "<th>Fracture</th><td class=\"num\">33 %</td>" in page
    assert "Test › confusion matrix" in page and "<td>Unsure</td><td class=\"num\">31 %</td>" in page
    assert "Flag threshold</dt><dd class=\"threshold\">90 %" in page and "Fracture, No fracture" in page

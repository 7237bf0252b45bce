"""Audit cases in the review queue, suspected fractures first, suspected-fracture counts, and what the
models page promises (held-out results, the validation guarantee, the audit on this site's patients)."""

from __future__ import annotations

import io

import pytest
from flask.testing import FlaskClient
from PIL import Image as PILImage

from core import registry
from core.config import Settings
from core.db import Database
from core.models import Image, ModelVersion
from core.reviewing import flagged_cases
from core.studies import finish_study_if_complete, save_predictions
from tests.conftest import register_tiny_model
from tests.portal.conftest import FakeResult, csrf_token

AUDIT_WORDS = "Audit sample: random check of an unflagged image"


def _png(shade: int) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("L", (72, 64), shade).save(buffer, format="PNG")
    return buffer.getvalue()


def _upload(client: FlaskClient, name: str, count: int) -> tuple[int, list[int]]:
    files = [(io.BytesIO(_png(20 + 30 * index)), f"image{index}.png") for index in range(count)]
    body = client.post("/api/studies", data={"name": name, "files": files}, content_type="multipart/form-data").get_json()
    return body["id"], [item["id"] for item in body["files"]]


def _write(db: Database, study_id: int, rows: list[tuple[int, str, str | None, float | None, bool]]) -> None:
    """Predictions as (image id, label, flag kind, fracture probability, audit), all in one batch."""
    with db.transaction() as session:
        version_id = session.get(Image, rows[0][0]).study.model_version_id
        pairs, audited = [], set()
        for image_id, label, kind, fracture, audit in rows:
            confidence = 0.6 if kind else 0.97
            other = next(name for name in session.get(ModelVersion, version_id).labels if name != label)
            reason = {"unsure": "Model unsure: 60 % < 90 % needed", "unfamiliar": "Unfamiliar image: unlike the radiographs"}.get(kind or "")
            pairs.append((session.get(Image, image_id),
                          FakeResult({label: confidence, other: 1 - confidence}, label, confidence, kind is not None, reason, kind, fracture)))
            if audit:
                audited.add(image_id)
        save_predictions(session, version_id, pairs, audit_ids=audited)
        assert finish_study_if_complete(session, study_id)


@pytest.fixture
def queue(client: FlaskClient, db: Database, production_model: int) -> dict[str, object]:
    """A finished study of 8 images (tiny model: fracture / no_fracture) with every kind of case.

    0 unsure (fracture probability 0.30), 1 audit (0.95), 2 unfamiliar (0.70), 3 unflagged, not audited,
    4 unsure with no fracture probability, 5 and 6 audits (0.20, 0.85), 7 unsure (0.55).
    """
    study_id, ids = _upload(client, "queue", 8)
    _write(db, study_id, [
        (ids[0], "no_fracture", "unsure", 0.30, False),
        (ids[1], "fracture", None, 0.95, True),
        (ids[2], "fracture", "unfamiliar", 0.70, False),
        (ids[3], "fracture", None, 0.99, False),
        (ids[4], "fracture", "unsure", None, False),
        (ids[5], "no_fracture", None, 0.20, True),
        (ids[6], "fracture", None, 0.85, True),
        (ids[7], "fracture", "unsure", 0.55, False),
    ])
    return {"id": study_id, "ids": ids}


def test_review_queue_holds_flagged_and_audit_cases_with_their_reason(client: FlaskClient, queue: dict) -> None:
    ids = queue["ids"]
    body = client.get("/api/review-queue").get_json()
    cases = {case["image_id"]: case for case in body["cases"]}
    assert [case["image_id"] for case in body["cases"]] == [ids[i] for i in (0, 1, 2, 4, 5, 6, 7)]  # oldest first (then id)
    assert body["count"] == 7
    assert {i: cases[ids[i]]["reason"] for i in (0, 1, 2, 4)} == {0: "unsure", 1: "audit", 2: "unfamiliar", 4: "unsure"}
    assert cases[ids[1]]["audit"] is True and cases[ids[1]]["flag_reason"] is None
    assert cases[ids[0]]["audit"] is False and cases[ids[0]]["flag_reason"].startswith("Model unsure")
    assert cases[ids[1]]["fracture_probability"] == pytest.approx(0.95) and cases[ids[4]]["fracture_probability"] is None
    audits = client.get("/api/review-queue?reason=audit").get_json()
    assert [case["image_id"] for case in audits["cases"]] == [ids[1], ids[5], ids[6]] and audits["count"] == 3
    assert [c["image_id"] for c in client.get("/api/review-queue?reason=unfamiliar").get_json()["cases"]] == [ids[2]]

    # A reviewed audit case leaves the queue like a flagged one.
    assert client.post(f"/api/images/{ids[6]}/review", json={"label": "fracture"}).status_code == 201
    assert ids[6] not in [case["image_id"] for case in client.get("/api/review-queue").get_json()["cases"]]

    page = client.get("/review").get_data(as_text=True)
    assert "Longest waiting first" in page and "Most suspicious (highest fracture probability) first" in page
    assert "4 flagged cases and 2 audit samples waiting" in page
    assert page.count(AUDIT_WORDS) == 2  # the two waiting audit cases, marked in words
    assert f'id="case-{ids[3]}"' not in page  # unflagged and not audited: not a case
    viewer = client.get(f"/review/{ids[1]}").get_data(as_text=True)
    assert AUDIT_WORDS in viewer


def test_suspicious_order_puts_the_highest_fracture_probability_first(client: FlaskClient, db: Database, queue: dict) -> None:
    ids = queue["ids"]
    body = client.get("/api/review-queue?order=suspicious").get_json()
    assert [case["image_id"] for case in body["cases"]] == [ids[i] for i in (1, 6, 2, 7, 0, 5, 4)]
    with db.transaction() as session:
        assert [image.id for image, _ in flagged_cases(session, order="suspicious")] == [ids[i] for i in (1, 6, 2, 7, 0, 5, 4)]
        assert [image.id for image, _ in flagged_cases(session, study_id=queue["id"])] == [ids[i] for i in (0, 1, 2, 4, 5, 6, 7)]
        with pytest.raises(ValueError, match="order must be one of oldest, newest, suspicious"):
            flagged_cases(session, order="bogus")
    probabilities = [case["fracture_probability"] for case in body["cases"]]
    assert probabilities[:-1] == sorted(probabilities[:-1], reverse=True) and probabilities[-1] is None  # none last
    assert client.get("/api/review-queue?order=oldest").get_json()["cases"][0]["image_id"] == ids[0]

    bogus = client.get("/api/review-queue?order=bogus")
    assert bogus.status_code == 400
    assert "order must be one of: oldest, newest, suspicious" in bogus.get_json()["error"]
    assert client.get("/review?order=bogus").status_code == 400

    page = client.get("/review?order=suspicious").get_data(as_text=True)
    positions = [page.index(f'id="case-{ids[i]}"') for i in (1, 6, 2, 7, 0, 5, 4)]
    assert positions == sorted(positions)
    assert "most suspicious (highest fracture probability) first" in page
    assert f'href="/review/{ids[1]}?order=suspicious"' in page  # the viewer keeps the order

    # Recording a label opens the next case in the same order.
    viewer = client.get(f"/review/{ids[1]}?order=suspicious").get_data(as_text=True)
    response = client.post(f"/review/{ids[1]}?order=suspicious", data={"csrf_token": csrf_token(viewer), "label": "fracture"})
    assert response.status_code == 303 and response.headers["Location"].endswith(f"/review/{ids[6]}?order=suspicious")


def test_studies_list_shows_suspected_fractures(
    client: FlaskClient, db: Database, settings: Settings, queue: dict, tiny_weights: dict[str, object]
) -> None:
    # Images 1, 2, 3, 4, 6 and 7 are labelled fracture: 6 suspected fractures.
    listing = client.get("/api/studies").get_json()["studies"]
    assert [(s["id"], s["suspected_fractures"]) for s in listing] == [(queue["id"], 6)]
    assert client.get(f"/api/studies/{queue['id']}").get_json()["suspected_fractures"] == 6

    # A version whose labels have no no_fracture: nothing to count, null (and an empty cell).
    register_tiny_model(db, settings, {**tiny_weights, "labels": ["hand", "foot"]})
    other_id, other_ids = _upload(client, "no fracture label", 2)
    _write(db, other_id, [(other_ids[0], "hand", None, None, False), (other_ids[1], "foot", None, None, False)])
    listing = {s["id"]: s["suspected_fractures"] for s in client.get("/api/studies").get_json()["studies"]}
    assert listing == {queue["id"]: 6, other_id: None}

    page = client.get("/").get_data(as_text=True)
    assert "Suspected fractures" in page
    assert '<td class="num" data-field="suspected_fractures" data-value="6">6</td>' in page
    assert '<td class="num" data-field="suspected_fractures" data-value="-1"></td>' in page


TEST_METRICS = {
    "n": 767, "coverage": 0.61, "error_unflagged": 0.012, "error_unflagged_bound": 0.024, "flag_rate": 0.39,
    "flag_rate_by_reason": {"unsure": 0.31, "unfamiliar": 0.08}, "accuracy": 0.874, "auc_macro_ovr": 0.9312,
}
GUARANTEE = {"target_error": 0.05, "delta": 0.05, "threshold": 0.83, "bound": 0.041, "coverage": 0.6, "n": 615, "certified": True}


def test_models_page_states_the_promise_and_the_audit_estimate(
    client: FlaskClient, db: Database, settings: Settings, queue: dict, production_model: int, tiny_weights: dict[str, object]
) -> None:
    with db.transaction() as session:
        session.get(ModelVersion, production_model).metrics = {"test": TEST_METRICS, "guarantee": GUARANTEE}
        # Older versions lack these keys (or hold partial ones): the page shows what there is and never fails.
        old = registry.register_version(session, settings, name="old model", **{**tiny_weights, "metrics": {"accuracy": 0.8}})
        partial = registry.register_version(session, settings, name="partial", **{
            **tiny_weights, "metrics": {"test": {"flag_rate": 0.25, "flag_rate_by_reason": None}, "guarantee": {"certified": False}}})
        uncertified = registry.register_version(session, settings, name="uncertified", **{
            **tiny_weights, "metrics": {"guarantee": {**GUARANTEE, "bound": 0.063, "certified": False}, "test": {
                **TEST_METRICS, "coverage": 0.0, "error_unflagged": 0.0, "error_unflagged_bound": 1.0, "flag_rate": 1.0,
                "flag_rate_by_reason": {"unsure": 0.978, "unfamiliar": 0.022}}}})
        versions = {"old": old.id, "partial": partial.id, "uncertified": uncertified.id}

    page = client.get("/models").get_data(as_text=True)
    assert ("On 767 held-out images: 61 % accepted without review, 1.2 % of those wrong (95 % bound 2.4 %); "
            "39 % sent to review (31 % unsure, 8 % unfamiliar).") in page
    assert ("Promise made at validation: error among unflagged images ≤ 5 % with 95 % confidence "
            "(bound 4.1 % on 615 images)") in page
    assert "Held-out accuracy 87.4 %, AUC 0.931 (macro, one-vs-rest)." in page
    assert ("Promise made at validation: not certified: error among unflagged images ≤ 5 % with 95 % confidence "
            "could not be shown (bound 6.3 % on 615 images)") in page
    assert "On held-out images: 25 % sent to review." in page
    # A version that accepts nothing says so, not "0 % of those wrong (95 % bound 100 %)".
    assert "On 767 held-out images: none accepted without review; 100 % sent to review (98 % unsure, 2.2 % unfamiliar)." in page
    assert "0 % of those wrong" not in page
    assert page.count("No reviewed audit cases yet") == 4
    assert all(f'id="model-{version_id}"' in page for version_id in versions.values())

    ids = queue["ids"]
    # Audit cases 1 (model: fracture) and 6 (fracture) confirmed, 5 (model: no_fracture) corrected; a flagged
    # case reviewed wrong does not count (it is no audit case).
    for image, label in ((1, "fracture"), (5, "fracture"), (6, "fracture"), (0, "fracture")):
        assert client.post(f"/api/images/{ids[image]}/review", json={"label": label}).status_code == 201
    page = client.get("/models").get_data(as_text=True)
    assert "Audit on your patients: 1 of 3 audited images wrong, 33 % (95 % interval 0.8–91 %)" in page

    # The latest review of an image counts: the admin corrects case 1, now 2 of 3 are wrong.
    assert client.post(f"/api/images/{ids[1]}/review", json={"label": "no_fracture"}).status_code == 201
    page = client.get("/models").get_data(as_text=True)
    assert "Audit on your patients: 2 of 3 audited images wrong, 67 % (95 % interval 9.4–99 %)" in page
    assert page.count("No reviewed audit cases yet") == 3

"""Audit sampling through a real `celery -A worker worker`: a random, reproducible share of unflagged
images goes to the review queue as audit cases, at the configured rate; flagged images never do."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sqlalchemy import select

from core import registry
from core.audit_sampling import is_audit_sample
from core.config import Settings
from core.db import Database
from core.migrate import upgrade
from core.models import Image, Prediction, Study, StudyStatus
from core.stats import clopper_pearson_interval
from portal import create_app
from tests.conftest import make_settings
from tests.e2e.conftest import LiveWorker, wait_for
from tests.portal.conftest import admin_token, token_client
from trainer.synthetic import CLASSES, render_image

IMAGES = 300
AUDIT_RATE = 0.25
# The tiny random model is barely confident; a low temperature spreads its top probability over about
# 0.52-0.99 on these images, so this threshold flags some and leaves most unflagged.
TEMPERATURE, THRESHOLD = 0.02, 0.8


def _synthetic_pngs(count: int) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(7)
    files = []
    for index in range(count):
        buffer = io.BytesIO()
        render_image(CLASSES[index % len(CLASSES)], 64, rng).save(buffer, format="PNG")
        files.append((f"synthetic/{index:03d}.png", buffer.getvalue()))
    return files


def test_worker_sends_a_reproducible_sample_of_unflagged_images_to_review(
    tmp_path: Path, tiny_weights: dict[str, object], live_worker_factory: Callable[[Settings], LiveWorker]
) -> None:
    settings = make_settings(tmp_path / "var", audit_rate=AUDIT_RATE, chunk_size=100, batch_size=50,
                             secret_key="audit sampling e2e key")
    upgrade(settings.database_url)
    db = Database(settings)
    with db.transaction() as session:
        version = registry.register_version(session, settings, name="audit test", **{
            **tiny_weights, "threshold": THRESHOLD, "temperature": TEMPERATURE})  # type: ignore[arg-type]
        registry.promote(session, version.id)
        version_id = version.id
    app = create_app(settings)
    client = token_client(app, admin_token(db))
    body = client.post("/api/studies", data={"name": "audit", "files": [(io.BytesIO(data), name) for name, data in _synthetic_pngs(IMAGES)]},
                       content_type="multipart/form-data").get_json()
    study_id = body["id"]
    assert len(body["files"]) == IMAGES and body["tasks"] == 3

    worker = live_worker_factory(settings)

    def done() -> bool:
        if worker.process.poll() is not None:
            raise AssertionError(f"worker died:\n{worker.log()[-4000:]}")
        with db.transaction() as session:
            return session.get(Study, study_id).status == StudyStatus.DONE

    wait_for(done, 240, "the study to be classified", interval=0.25)

    with db.transaction() as session:
        predictions = list(session.scalars(
            select(Prediction).join(Image, Image.id == Prediction.image_id).where(Image.study_id == study_id)))
        outcomes = [(p.image_id, p.flagged, p.audit, p.flag_kind) for p in predictions]
    assert len(outcomes) == IMAGES
    flagged = [image_id for image_id, is_flagged, _, _ in outcomes if is_flagged]
    unflagged = [image_id for image_id, is_flagged, _, _ in outcomes if not is_flagged]
    audited = [image_id for image_id, _, audit, _ in outcomes if audit]
    assert flagged and len(unflagged) >= IMAGES // 2, f"{len(flagged)} flagged: pick another threshold for the tiny model"
    assert {kind for _, is_flagged, _, kind in outcomes if is_flagged} == {"unsure"}

    # Flagged images go to review anyway: never audit cases.
    assert not set(audited) & set(flagged)
    # The worker's choice is the keyed, deterministic one (a redelivered task would choose the same) ...
    assert sorted(audited) == sorted(i for i in unflagged if is_audit_sample(settings.secret_key, version_id, i, AUDIT_RATE))
    # ... and the share of unflagged images audited agrees with the setting (exact binomial 99.9 % interval).
    low, high = clopper_pearson_interval(len(audited), len(unflagged), 0.999)
    assert low <= AUDIT_RATE <= high, f"{len(audited)} of {len(unflagged)} unflagged images audited at rate {AUDIT_RATE}"

    # Audit cases wait in the review queue with their reason, beside the flagged cases.
    queue = client.get(f"/api/review-queue?study={study_id}").get_json()
    assert queue["count"] == len(flagged) + len(audited)
    reasons = {case["image_id"]: case["reason"] for case in queue["cases"]}
    assert reasons == {**{i: "unsure" for i in flagged}, **{i: "audit" for i in audited}}
    audit_cases = client.get(f"/api/review-queue?study={study_id}&reason=audit").get_json()["cases"]
    assert sorted(case["image_id"] for case in audit_cases) == sorted(audited)
    assert all(case["audit"] and case["flag_reason"] is None for case in audit_cases)
    app.extensions["triage_db"].dispose()
    db.dispose()

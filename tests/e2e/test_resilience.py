"""A killed worker and a broker that lost its queue lose nothing and duplicate nothing.

Real processes on PostgreSQL + Redis: `celery -A worker worker` is SIGKILLed mid-study and
restarted; Redis's queue is wiped and the database-driven reconciler re-enqueues the work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from core import registry
from core.config import Settings
from core.db import Database
from core.models import Image, ImageStatus, Prediction, Study, StudyStatus
from core.queue import enqueue_images, make_celery
from core.studies import add_upload, create_study
from tests.conftest import PROJECT_ROOT, deploy_tiny_model, make_settings, register_tiny_model, xray_sample
from tests.e2e.conftest import LiveWorker, settings_env, wait_for


def _deploy(tmp_path: Path, postgres_url: str, redis_url: str, tiny_weights: dict, **overrides: object) -> tuple[Settings, Database, int]:
    """PostgreSQL + Redis settings, a migrated database and a promoted tiny model (its id)."""
    values: dict[str, object] = {"database_url": postgres_url, "broker_url": redis_url, "chunk_size": 4, "batch_size": 2}
    values.update(overrides)
    settings = make_settings(tmp_path / "var", **values)
    return (settings, *deploy_tiny_model(settings, tiny_weights))


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "core.cli", *args], env=settings_env(settings), cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)


def _queue_study(db: Database, settings: Settings, files: list[Path], name: str) -> tuple[int, list[int]]:
    with db.transaction() as session:
        version = registry.production_version(session)
        study = create_study(session, name, version)
        ids = [add_upload(session, settings, study, path.name, path.read_bytes()).id for path in files]
        study_id = study.id
    enqueue_images(make_celery(settings, main="test"), study_id, ids, settings.chunk_size)
    return study_id, ids


def _predictions_per_image(db: Database, study_id: int) -> dict[int, int]:
    with db.transaction() as session:
        return dict(
            session.execute(
                select(Prediction.image_id, func.count()).join(Image, Image.id == Prediction.image_id)
                .where(Image.study_id == study_id).group_by(Prediction.image_id)
            ).all()
        )


def _study_status(db: Database, study_id: int) -> StudyStatus:
    with db.transaction() as session:
        return session.get(Study, study_id).status


def _kill_hard(worker: LiveWorker) -> None:
    """SIGKILL the worker's main process and its pool children, as an OOM kill or power loss would."""
    children = subprocess.run(["pgrep", "-P", str(worker.process.pid)], capture_output=True, text=True).stdout.split()
    for pid in [worker.process.pid, *map(int, children)]:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    worker.process.wait()


@pytest.mark.postgres
@pytest.mark.redis
def test_sigkilled_worker_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, postgres_url: str, redis_url: str, xrays_dir: Path, tiny_weights: dict,
    live_worker_factory: Callable[[Settings], LiveWorker],
) -> None:
    # A short visibility timeout so the chunk the dead worker held is redelivered quickly.
    bigger = {**tiny_weights, "preprocessing": {**tiny_weights["preprocessing"], "input_size": [3, 160, 160]}}
    settings, db, _ = _deploy(tmp_path, postgres_url, redis_url, bigger, visibility_timeout_s=3)
    files = xray_sample(xrays_dir, 160)
    study_id, ids = _queue_study(db, settings, files, "kill test")

    worker = live_worker_factory(settings)
    wait_for(lambda: len(_predictions_per_image(db, study_id)) >= 8, 120, "the first predictions")
    _kill_hard(worker)
    done_at_kill = len(_predictions_per_image(db, study_id))
    assert done_at_kill < len(ids), "the study finished before the kill; make the study larger"

    live_worker_factory(settings)
    wait_for(lambda: _study_status(db, study_id) == StudyStatus.DONE, 300, "the study to finish after the restart", interval=0.25)

    per_image = _predictions_per_image(db, study_id)
    assert per_image == {image_id: 1 for image_id in ids}
    with db.transaction() as session:
        statuses = set(session.scalars(select(Image.status).where(Image.study_id == study_id)))
    assert statuses == {ImageStatus.DONE}
    db.dispose()


@pytest.mark.postgres
@pytest.mark.redis
def test_reconciler_recovers_a_queue_lost_by_the_broker(
    tmp_path: Path, postgres_url: str, redis_url: str, xrays_dir: Path, tiny_weights: dict,
    live_worker_factory: Callable[[Settings], LiveWorker],
) -> None:
    settings, db, _ = _deploy(tmp_path, postgres_url, redis_url, tiny_weights)
    study_id, ids = _queue_study(db, settings, xray_sample(xrays_dir, 12), "lost queue")

    # Redis restarted without persistence: every queued message is gone.
    client = redis.Redis.from_url(redis_url)
    assert client.llen("triage") > 0
    client.flushdb()
    live_worker_factory(settings)

    young = _cli(settings, "reconcile")
    assert young.returncode == 0 and "nothing to re-enqueue" in young.stdout, young.stderr
    result = _cli(settings, "reconcile", "--older-than", "0")
    assert result.returncode == 0, result.stderr
    assert f"re-enqueued {len(ids)} image(s) in 1 study(ies)" in result.stdout

    wait_for(lambda: _study_status(db, study_id) == StudyStatus.DONE, 300, "the reconciled study to finish", interval=0.25)
    assert _predictions_per_image(db, study_id) == {image_id: 1 for image_id in ids}
    db.dispose()


@pytest.mark.postgres
@pytest.mark.redis
def test_promotion_reaches_running_workers_and_studies_keep_their_version(
    tmp_path: Path, postgres_url: str, redis_url: str, xrays_dir: Path, tiny_weights: dict,
    live_worker_factory: Callable[[Settings], LiveWorker],
) -> None:
    import torch

    from core.ml.modelio import create_model, save_weights

    settings, db, first = _deploy(tmp_path, postgres_url, redis_url, tiny_weights)
    torch.manual_seed(7)
    other = save_weights(create_model(tiny_weights["architecture"], num_classes=2), tmp_path / "second.safetensors")
    second = register_tiny_model(db, settings, {**tiny_weights, "weights_file": other}, promote=False)
    live_worker_factory(settings)

    files = xray_sample(xrays_dir, 16)
    before_id, before_ids = _queue_study(db, settings, files[:8], "before promotion")
    with db.transaction() as session:
        registry.promote(session, second)  # while the first study may still be in flight
    after_id, after_ids = _queue_study(db, settings, files[8:], "after promotion")

    for study_id in (before_id, after_id):
        wait_for(lambda: _study_status(db, study_id) == StudyStatus.DONE, 300, f"study {study_id}", interval=0.25)
    with db.transaction() as session:
        versions = dict(session.execute(select(Prediction.image_id, Prediction.model_version_id).where(Prediction.image_id.in_(before_ids + after_ids))).all())
    assert {versions[i] for i in before_ids} == {first}
    assert {versions[i] for i in after_ids} == {second}
    db.dispose()

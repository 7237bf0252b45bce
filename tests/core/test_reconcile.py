"""Claims under a lease, the heartbeat that renews them, the reconciler that re-queues lost work, and uploads still arriving.

In-process against a real SQLite database and a real Celery app on the filesystem broker; the
"other" worker processes are real processes (one alive, one that has exited).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select, update

from core.config import Settings
from core.db import Database
from core.leases import LeaseHeartbeat, owner_is_gone, process_identity
from core.models import Image, ImageStatus, ModelVersion, Study, StudyStatus, utcnow
from core.queue import QUEUE_NAME, make_celery
from core.reconcile import reconcile, waiting_messages
from core.studies import add_upload, claim_images, create_study, finish_receiving, finish_study_if_complete
from tests.conftest import xray_sample
from tests.e2e.conftest import wait_for

HOST = socket.gethostname()


@pytest.fixture
def live_process() -> Iterator[int]:
    """The pid of another process that is running (a worker holding images)."""
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield process.pid
    process.communicate()


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited (a worker that was killed)."""
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(process.stdout)


def _study(db: Database, settings: Settings, xrays_dir: Path, count: int) -> tuple[int, list[int]]:
    with db.transaction() as session:
        version = session.scalars(select(ModelVersion).where(ModelVersion.is_production.is_(True))).one()
        study = create_study(session, "lease test", version)
        ids = [add_upload(session, settings, study, p.name, p.read_bytes()).id for p in xray_sample(xrays_dir, count)]
        return study.id, ids


def _set(db: Database, image_id: int, **values: object) -> None:
    with db.transaction() as session:
        session.execute(update(Image).where(Image.id == image_id).values(**values))


def _rows(db: Database, ids: list[int]) -> dict[int, Image]:
    with db.transaction() as session:
        return {image.id: image for image in session.scalars(select(Image).where(Image.id.in_(ids)))}


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def _messages(settings: Settings) -> int:
    return sum(1 for path in (settings.broker_folder / "queue").iterdir() if path.name.endswith(f".{QUEUE_NAME}.msg"))


def test_owner_is_gone_only_when_provably_so(live_process: int, dead_pid: int) -> None:
    assert not owner_is_gone(process_identity())
    assert not owner_is_gone(f"{HOST}:{live_process}:abcd")
    assert owner_is_gone(f"{HOST}:{dead_pid}:abcd")
    mine = process_identity().rsplit(":", 1)[0]
    assert owner_is_gone(f"{mine}:another-nonce")  # an earlier process with this pid
    assert not owner_is_gone("some-other-host:1:abcd")  # cannot tell: its lease has to run out
    assert owner_is_gone(None)


def test_claim_leaves_live_claims_alone_and_takes_back_dead_ones_as_suspects(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path, live_process: int, dead_pid: int
) -> None:
    study_id, ids = _study(db, settings, xrays_dir, 6)
    soon, past = utcnow() + timedelta(minutes=5), utcnow() - timedelta(seconds=1)
    fresh, live, dead, elsewhere_live, elsewhere_expired, mine = ids
    processing = {"status": ImageStatus.PROCESSING, "attempts": 1}
    _set(db, live, claimed_by=f"{HOST}:{live_process}:aaaa", lease_expires_at=soon, **processing)
    _set(db, dead, claimed_by=f"{HOST}:{dead_pid}:bbbb", lease_expires_at=soon, **processing)
    _set(db, elsewhere_live, claimed_by="other-host:12:cccc", lease_expires_at=soon, **processing)
    _set(db, elsewhere_expired, claimed_by="other-host:12:cccc", lease_expires_at=past, **processing)
    _set(db, mine, claimed_by=process_identity(), lease_expires_at=soon, **processing)

    with db.transaction() as session:
        chunk = claim_images(session, study_id, ids, max_attempts=3, lease_s=30)

    assert sorted(chunk.held) == sorted([live, elsewhere_live])
    # A first try and the images this very process held (it survived them) go in batches...
    assert [image.id for image in chunk.images] == [fresh, mine]
    # ...images that were in flight when their worker died are tried alone.
    assert [image.id for image in chunk.suspects] == [dead, elsewhere_expired]
    assert chunk.gave_up == []
    rows = _rows(db, ids)
    for image_id in (fresh, dead, elsewhere_expired, mine):
        assert rows[image_id].claimed_by == process_identity() and rows[image_id].status == ImageStatus.PROCESSING
        assert _aware(rows[image_id].lease_expires_at) > utcnow() + timedelta(seconds=20)
    # Only a first try counts its attempt at the claim; a suspect counts it when tried alone.
    assert {image_id: rows[image_id].attempts for image_id in (fresh, dead, elsewhere_expired, mine)} == {
        fresh: 1, dead: 1, elsewhere_expired: 1, mine: 1}
    assert rows[live].claimed_by.startswith(f"{HOST}:{live_process}:")


def test_a_suspect_is_given_up_only_after_a_try_alone(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    study_id, ids = _study(db, settings, xrays_dir, 2)
    once, twice = ids
    _set(db, once, status=ImageStatus.QUEUED, attempts=1)  # in flight in a batch when a worker died
    _set(db, twice, status=ImageStatus.QUEUED, attempts=2)  # ...and then alone

    with db.transaction() as session:
        chunk = claim_images(session, study_id, ids, max_attempts=1)

    assert [image.id for image in chunk.suspects] == [once] and chunk.gave_up == [twice]
    rows = _rows(db, ids)
    assert rows[twice].status == ImageStatus.FAILED
    assert rows[twice].error.startswith("gave up after 2 attempts: the worker process died each time")


def test_two_claims_of_the_same_images_never_both_get_one(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    study_id, ids = _study(db, settings, xrays_dir, 3)
    with db.transaction() as session:
        first = claim_images(session, study_id, ids, max_attempts=3, owner=f"{HOST}:1:first")
    with db.transaction() as session:
        second = claim_images(session, study_id, ids, max_attempts=3, owner="other-host:1:second")
    assert [image.id for image in first.images] == ids
    assert second.images == [] and second.suspects == [] and sorted(second.held) == ids


def test_the_heartbeat_renews_the_leases_of_its_owner_only(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    study_id, ids = _study(db, settings, xrays_dir, 2)
    owner = process_identity()
    with db.transaction() as session:
        claim_images(session, study_id, ids[:1], max_attempts=3, owner=owner, lease_s=2)
        claim_images(session, study_id, ids[1:], max_attempts=3, owner="other-host:1:x", lease_s=2)
    before = {image_id: _aware(row.lease_expires_at) for image_id, row in _rows(db, ids).items()}

    with LeaseHeartbeat(db, owner, lease_s=2, study_id=study_id):
        wait_for(lambda: _aware(_rows(db, ids[:1])[ids[0]].lease_expires_at) > before[ids[0]], 20, "a renewed lease")
    assert _aware(_rows(db, ids[1:])[ids[1]].lease_expires_at) == before[ids[1]]


def test_reconciler_requeues_the_images_of_a_gone_worker_once_and_leaves_live_ones(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path, live_process: int, dead_pid: int
) -> None:
    settings = settings.model_copy(update={"lease_s": 30})
    celery_app = make_celery(settings, main="test")
    study_id, ids = _study(db, settings, xrays_dir, 5)
    soon, past = utcnow() + timedelta(minutes=5), utcnow() - timedelta(seconds=1)
    live, dead, expired, young_queued, _ = ids
    processing = {"status": ImageStatus.PROCESSING, "attempts": 1}
    _set(db, live, claimed_by=f"{HOST}:{live_process}:aaaa", lease_expires_at=soon, **processing)
    _set(db, dead, claimed_by=f"{HOST}:{dead_pid}:bbbb", lease_expires_at=soon, **processing)
    _set(db, expired, claimed_by="other-host:12:cccc", lease_expires_at=past, **processing)
    _set(db, ids[4], status=ImageStatus.DONE)

    assert reconcile(db, settings, celery_app) == {study_id: 2}
    assert _messages(settings) == 1  # one chunk
    rows = _rows(db, ids)
    for image_id in (dead, expired):
        assert rows[image_id].status == ImageStatus.QUEUED and rows[image_id].claimed_by is None
        assert rows[image_id].attempts == 1  # remembered: they were in flight when a worker died
    assert rows[live].status == ImageStatus.PROCESSING
    assert rows[young_queued].status == ImageStatus.QUEUED  # just uploaded: its message is on its way
    # A second pass (another worker's watchdog) finds nothing left to send.
    assert reconcile(db, settings, celery_app) == {}
    assert _messages(settings) == 1


def test_reconciler_requeues_queued_images_when_the_broker_lost_their_messages(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    settings = settings.model_copy(update={"lease_s": 30, "reconcile_after_s": 600})
    celery_app = make_celery(settings, main="test")
    study_id, ids = _study(db, settings, xrays_dir, 3)
    a_while_ago, long_ago = utcnow() - timedelta(seconds=60), utcnow() - timedelta(seconds=900)
    waiting, very_old, young = ids
    _set(db, waiting, updated_at=a_while_ago)
    _set(db, very_old, updated_at=long_ago)

    celery_app.send_task("triage.classify_chunk", args=[study_id, [young]], queue=QUEUE_NAME)
    assert waiting_messages(celery_app) == 1
    # Messages are waiting: only the image queued beyond TRIAGE_RECONCILE_AFTER_S is sent again.
    assert reconcile(db, settings, celery_app) == {study_id: 1}
    assert _rows(db, [very_old])[very_old].status == ImageStatus.QUEUED

    for path in (settings.broker_folder / "queue").iterdir():  # the broker loses every message
        path.unlink()
    assert waiting_messages(celery_app) == 0
    # An empty queue: images queued for longer than a lease have lost their message.
    assert reconcile(db, settings, celery_app) == {study_id: 1}
    assert reconcile(db, settings, celery_app) == {}
    assert _messages(settings) == 1


def _study_status(db: Database, study_id: int) -> StudyStatus:
    with db.transaction() as session:
        return session.get(Study, study_id).status


def test_a_study_still_receiving_its_upload_is_not_finished_until_its_last_file_is_recorded(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    study_id, ids = _study(db, settings, xrays_dir, 2)
    with db.transaction() as session:
        session.get(Study, study_id).status = StudyStatus.RECEIVING
    for image_id in ids:  # a worker classified everything recorded so far
        _set(db, image_id, status=ImageStatus.DONE)
    with db.transaction() as session:
        assert finish_study_if_complete(session, study_id) is False  # more files are on their way
    assert _study_status(db, study_id) == StudyStatus.RECEIVING
    with db.transaction() as session:
        assert finish_receiving(session, study_id) is True  # the portal recorded the last file
    assert _study_status(db, study_id) == StudyStatus.DONE

    # A worker already started: the finished upload says processing, not queued.
    study_id, (started, waiting) = _study(db, settings, xrays_dir, 2)
    with db.transaction() as session:
        session.get(Study, study_id).status = StudyStatus.RECEIVING
    _set(db, started, status=ImageStatus.DONE)
    with db.transaction() as session:
        assert finish_receiving(session, study_id) is False
    assert _study_status(db, study_id) == StudyStatus.PROCESSING


def test_reconciler_ends_an_upload_that_stopped_half_way_and_leaves_one_still_arriving(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    settings = settings.model_copy(update={"lease_s": 30})
    celery_app = make_celery(settings, main="test")
    long_ago = utcnow() - timedelta(seconds=120)
    interrupted, (done, queued) = _study(db, settings, xrays_dir, 2)
    arriving, (recent,) = _study(db, settings, xrays_dir, 1)
    with db.transaction() as session:
        for study_id in (interrupted, arriving):
            study = session.get(Study, study_id)
            study.status, study.created_at = StudyStatus.RECEIVING, long_ago
    _set(db, done, status=ImageStatus.DONE, created_at=long_ago)
    _set(db, queued, created_at=long_ago)  # recorded, then the portal died
    # `arriving` recorded a file just now: its upload is alive.

    reconcile(db, settings, celery_app)
    assert _study_status(db, interrupted) == StudyStatus.PROCESSING  # a worker had started on it
    assert _study_status(db, arriving) == StudyStatus.RECEIVING
    _set(db, queued, status=ImageStatus.DONE)
    with db.transaction() as session:
        assert finish_study_if_complete(session, interrupted) is True
    assert _rows(db, [recent])[recent].status == ImageStatus.QUEUED

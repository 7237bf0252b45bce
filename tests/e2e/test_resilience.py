"""Crashes lose nothing and duplicate nothing, and recover with no manual command.

Real processes: `celery -A worker worker` SIGKILLed mid-study (parent and child) and started
again, on the embedded default and on PostgreSQL + Redis; a poison image that kills the pool
child; PostgreSQL and Redis (without persistence) restarted mid-study; the `triage demo`
supervisor with a killed worker; Redis's queue wiped and `triage reconcile` run by hand.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import requests
from sqlalchemy import func, select
from sqlalchemy.exc import InterfaceError, OperationalError

from core import registry
from core.config import Settings
from core.db import Database
from core.models import Image, ImageStatus, Prediction, Study, StudyStatus
from core.queue import enqueue_images, make_celery
from core.studies import add_upload, create_study
from tests.conftest import PROJECT_ROOT, deploy_tiny_model, make_settings, register_tiny_model, service_missing, xray_sample
from tests.e2e.conftest import LivePortal, LiveWorker, api_token, settings_env, wait_for


def _deploy(tmp_path: Path, postgres_url: str, redis_url: str, tiny_weights: dict, **overrides: object) -> tuple[Settings, Database, int]:
    """PostgreSQL + Redis settings, a migrated database and a promoted tiny model (its id)."""
    values: dict[str, object] = {"database_url": postgres_url, "broker_url": redis_url, "chunk_size": 4, "batch_size": 2}
    values.update(overrides)
    settings = make_settings(tmp_path / "var", **values)
    return (settings, *deploy_tiny_model(settings, tiny_weights))


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "admin.cli", *args], env=settings_env(settings), cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)


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


def _deployment(request: pytest.FixtureRequest, tmp_path: Path, kind: str, tiny_weights: dict, **overrides: object) -> tuple[Settings, Database, int]:
    """The embedded default (SQLite + filesystem broker) or PostgreSQL + Redis, migrated, with a promoted tiny model."""
    if kind == "embedded":
        values: dict[str, object] = {"chunk_size": 4, "batch_size": 2, **overrides}
        settings = make_settings(tmp_path / "var", **values)
        return (settings, *deploy_tiny_model(settings, tiny_weights))
    return _deploy(tmp_path, request.getfixturevalue("postgres_url"), request.getfixturevalue("redis_url"), tiny_weights, **overrides)


#: Larger inputs, so a study of 160 images is still running when the test kills the worker.
def _slower(tiny_weights: dict) -> dict:
    return {**tiny_weights, "preprocessing": dataclasses.replace(tiny_weights["preprocessing"], input_size=(3, 160, 160))}


def _statuses(db: Database, study_id: int) -> dict[ImageStatus, int]:
    with db.transaction() as session:
        return dict(session.execute(select(Image.status, func.count()).where(Image.study_id == study_id).group_by(Image.status)).all())


def _assert_everything_classified_once(db: Database, study_id: int, ids: list[int]) -> None:
    assert _predictions_per_image(db, study_id) == {image_id: 1 for image_id in ids}  # 0 lost, 0 duplicated
    assert _statuses(db, study_id) == {ImageStatus.DONE: len(ids)}  # nothing left processing


def _kill_mid_study(db: Database, study_id: int, ids: list[int], worker: LiveWorker) -> int:
    """SIGKILL ``worker`` while it holds images of the study (after its first predictions); returns how many it held."""
    def working() -> bool:
        statuses = _statuses(db, study_id)
        return statuses.get(ImageStatus.DONE, 0) >= 8 and statuses.get(ImageStatus.PROCESSING, 0) > 0

    wait_for(working, 120, "the worker to hold images after its first predictions", interval=0.02)
    _kill_hard(worker)
    statuses = _statuses(db, study_id)
    assert statuses.get(ImageStatus.DONE, 0) < len(ids), "the study finished before the kill; make the study larger"
    return statuses.get(ImageStatus.PROCESSING, 0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["embedded", pytest.param("postgres-redis", marks=[pytest.mark.postgres, pytest.mark.redis])])
def test_whole_worker_killed_mid_study_and_started_again_finishes_the_study(
    request: pytest.FixtureRequest, kind: str, tmp_path: Path, xrays_dir: Path, tiny_weights: dict,
    live_worker_factory: Callable[[Settings], LiveWorker],
) -> None:
    """SIGKILL of parent and pool child, then a plain start: no manual command, 0 lost, 0 duplicated.

    The killed worker's message is gone (filesystem broker) or invisible for an hour (Redis, default
    visibility timeout): the new worker's watchdog finds the images whose claiming process is gone
    at start-up and re-queues them; they are retried one at a time (they were in flight in a crash).
    """
    settings, db, _ = _deployment(request, tmp_path, kind, _slower(tiny_weights), chunk_size=8)
    study_id, ids = _queue_study(db, settings, xray_sample(xrays_dir, 96), "kill test")
    held = _kill_mid_study(db, study_id, ids, live_worker_factory(settings))

    restarted = live_worker_factory(settings)
    wait_for(lambda: _study_status(db, study_id) == StudyStatus.DONE, 120, "the study to finish after the restart", interval=0.25)

    _assert_everything_classified_once(db, study_id, ids)
    if held:  # almost always: the kill lands between two chunks only by a rare chance
        assert "re-enqueued" in restarted.log() and "classifying it alone" in restarted.log()
    db.dispose()


@pytest.mark.slow
def test_poison_image_fails_alone_and_the_rest_of_its_chunk_is_classified(
    tmp_path: Path, xrays_dir: Path, tiny_weights: dict, live_worker_factory: Callable[[Settings], LiveWorker],
) -> None:
    """A pool child killed three times on one chunk fails only the image that kills it.

    TRIAGE_TEST_CRASH_ON_SHA256 plants the crash: the child SIGKILLs itself when it reads that image.
    """
    from core.storage import sha256_bytes

    files = xray_sample(xrays_dir, 12)
    poison_sha256 = sha256_bytes(files[5].read_bytes())
    settings = make_settings(tmp_path / "var", chunk_size=12, batch_size=4, test_crash_on_sha256=poison_sha256)
    db, _ = deploy_tiny_model(settings, tiny_weights)
    study_id, ids = _queue_study(db, settings, files, "poison")
    worker = live_worker_factory(settings)

    wait_for(lambda: _study_status(db, study_id) == StudyStatus.DONE, 180, "the study with a poison image to finish", interval=0.25)

    poison = ids[5]
    assert _predictions_per_image(db, study_id) == {image_id: 1 for image_id in ids if image_id != poison}
    with db.transaction() as session:
        images = {image.id: image for image in session.scalars(select(Image).where(Image.study_id == study_id))}
    assert {image_id: image.status for image_id, image in images.items()} == {
        image_id: ImageStatus.FAILED if image_id == poison else ImageStatus.DONE for image_id in ids}
    assert images[poison].error.startswith(f"gave up after {settings.max_image_attempts} attempts: the worker process died")
    # It killed the worker once in its batch and then twice alone; every other image was tried at most twice.
    assert worker.log().count("TRIAGE_TEST_CRASH_ON_SHA256: killing") == settings.max_image_attempts
    assert max(image.attempts for image_id, image in images.items() if image_id != poison) <= 2
    db.dispose()


@pytest.mark.postgres
@pytest.mark.redis
def test_reconciler_recovers_a_queue_lost_by_the_broker(
    tmp_path: Path, postgres_url: str, redis_url: str, xrays_dir: Path, tiny_weights: dict,
    live_worker_factory: Callable[[Settings], LiveWorker],
) -> None:
    # A long lease: the workers' own watchdog would otherwise re-queue these images before the CLI does.
    settings, db, _ = _deploy(tmp_path, postgres_url, redis_url, tiny_weights, lease_s=600)
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


def _restart_postgres() -> None:
    """Restart the local PostgreSQL cluster (fast shutdown: every connection is cut)."""
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions or shutil.which("pg_ctlcluster") is None:
        service_missing("restarting PostgreSQL needs a local cluster and pg_ctlcluster")
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "restart"], check=True, timeout=120,
                   capture_output=True)


#: How the CI starts Redis: no persistence, so a restart loses every queued message.
REDIS_START = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379", "--save", "",
               "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log"]


def _redis_answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


def _up(check: Callable[[], object]) -> Callable[[], object]:
    """``check`` as a wait_for condition that reads a service which may be restarting: errors are 'not yet'."""
    def condition() -> object:
        try:
            return check()
        except (OperationalError, InterfaceError, requests.ConnectionError):
            return False
    return condition


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_postgres_restarted_mid_study_workers_and_portal_recover_by_themselves(
    tmp_path: Path, postgres_url: str, redis_url: str, xrays_dir: Path, tiny_weights: dict,
    live_worker_factory: Callable[[Settings], LiveWorker], live_portal_factory: Callable[[Settings], LivePortal],
) -> None:
    settings, db, _ = _deploy(tmp_path, postgres_url, redis_url, _slower(tiny_weights))
    portal = live_portal_factory(settings)
    portal.headers = {"Authorization": f"Bearer {api_token(settings)}"}
    study_id, ids = _queue_study(db, settings, xray_sample(xrays_dir, 64), "postgres restart")
    worker = live_worker_factory(settings)
    wait_for(lambda: len(_predictions_per_image(db, study_id)) >= 8, 120, "the first predictions")

    _restart_postgres()

    wait_for(_up(lambda: _study_status(db, study_id) == StudyStatus.DONE), 180, "the study to finish after the restart", interval=0.25)
    _assert_everything_classified_once(db, study_id, ids)
    assert worker.process.poll() is None, "the worker died with the database"
    # The portal's pooled connections were cut too: it answers again without a restart.
    response = wait_for(_up(lambda: (r := requests.get(f"{portal.url}/api/studies/{study_id}", headers=portal.headers, timeout=30)).ok and r),
                        60, "the portal to answer after the restart")
    assert response.json()["status"] == "done"
    db.dispose()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_redis_restarted_without_persistence_mid_study_workers_and_portal_recover_by_themselves(
    tmp_path: Path, postgres_url: str, redis_url: str, xrays_dir: Path, tiny_weights: dict,
    live_worker_factory: Callable[[Settings], LiveWorker], live_portal_factory: Callable[[Settings], LivePortal],
) -> None:
    """Redis loses every queued message; an upload while it is down is saved but not queued.

    The workers reconnect with back-off and their watchdog re-queues what the broker lost (an empty
    queue and images waiting longer than a lease), with no manual command.
    """
    if not redis_url.startswith("redis://127.0.0.1:6379/") or shutil.which("redis-server") is None:
        service_missing("restarting Redis needs the local redis-server on 127.0.0.1:6379")
    settings, db, _ = _deploy(tmp_path, postgres_url, redis_url, _slower(tiny_weights), lease_s=6)
    portal = live_portal_factory(settings)
    portal.headers = {"Authorization": f"Bearer {api_token(settings)}"}
    files = xray_sample(xrays_dir, 80)
    study_id, ids = _queue_study(db, settings, files[:64], "redis restart")
    worker = live_worker_factory(settings)
    wait_for(lambda: len(_predictions_per_image(db, study_id)) >= 8, 120, "the first predictions")

    client = redis.Redis(host="127.0.0.1", port=6379)
    try:
        subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], capture_output=True, timeout=30)
        wait_for(lambda: not _redis_answers(client), 30, "Redis to stop")
        during = requests.post(f"{portal.url}/api/studies", data={"name": "uploaded while Redis was down"},
                               files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in files[64:]],
                               headers=portal.headers, timeout=120)
    finally:
        if not _redis_answers(client):
            subprocess.run(REDIS_START, check=True, timeout=30)
    wait_for(lambda: _redis_answers(client), 30, "Redis to start again")
    assert during.status_code == 503 and "was saved" in during.json()["error"], during.text
    with db.transaction() as session:
        second_id = session.scalar(select(Study.id).where(Study.name == "uploaded while Redis was down"))
        second_ids = list(session.scalars(select(Image.id).where(Image.study_id == second_id)))

    for study, name in ((study_id, "the study under way"), (second_id, "the study uploaded while Redis was down")):
        wait_for(lambda: _study_status(db, study) == StudyStatus.DONE, 180, f"{name} to finish", interval=0.25)
    _assert_everything_classified_once(db, study_id, ids)
    _assert_everything_classified_once(db, second_id, second_ids)
    assert worker.process.poll() is None, "the worker died with the broker"
    assert "re-enqueued" in worker.log()
    ready = wait_for(_up(lambda: (r := requests.get(f"{portal.url}/readyz", timeout=30)).ok and r), 60, "the portal to be ready")
    assert ready.json()["checks"]["broker"] == "ok"
    db.dispose()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _children(pid: int) -> list[int]:
    return [int(child) for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_demo_supervisor_restarts_a_killed_worker_keeps_the_portal_and_queues_the_sample_once(
    tmp_path: Path, xrays_dir: Path, tiny_weights: dict,
) -> None:
    """`triage demo` (what `scripts/run` runs): SIGKILL its worker; the portal stays up and a new worker works."""
    settings = make_settings(tmp_path / "var", chunk_size=4, batch_size=2)
    db, _ = deploy_tiny_model(settings, tiny_weights)  # a production model exists: no demo training
    sample = xray_sample(xrays_dir, 6)
    for path in sample:  # what `trainer synth` leaves for the sample study
        target = settings.data_dir / "demo-data" / "test" / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    port = _free_port()
    log_path = tmp_path / "demo.log"

    def start_demo() -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            return subprocess.Popen([sys.executable, "-m", "admin.cli", "demo", "--port", str(port)], cwd=PROJECT_ROOT,
                                    env=settings_env(settings), stdout=log, stderr=subprocess.STDOUT)

    def healthy() -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30).ok
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or its workers are still booting
            return False

    def sample_studies() -> list[int]:
        with db.transaction() as session:
            return list(session.scalars(select(Study.id).where(Study.name.startswith("Sample study"))))

    def workers(demo: subprocess.Popen[bytes]) -> list[int]:
        return [pid for pid in _children(demo.pid) if " celery " in _command_line(pid)]

    demo = start_demo()
    try:
        wait_for(healthy, 120, "the demo portal")
        (sample_id,) = wait_for(sample_studies, 60, "the sample study")
        wait_for(lambda: _study_status(db, sample_id) == StudyStatus.DONE, 120, "the sample study to finish", interval=0.25)
        (first_worker,) = wait_for(lambda: workers(demo), 30, "the demo's worker")
        portal_processes = [pid for pid in _children(demo.pid) if pid != first_worker]

        for pid in [first_worker, *_children(first_worker)]:
            os.kill(pid, signal.SIGKILL)
        (second_worker,) = wait_for(lambda: [pid for pid in workers(demo) if pid != first_worker], 60, "the supervisor to restart the worker")
        assert healthy() and demo.poll() is None
        assert [pid for pid in _children(demo.pid) if pid != second_worker] == portal_processes  # the portal was left alone

        study_id, ids = _queue_study(db, settings, xray_sample(xrays_dir, 6, split="val"), "after the restart")
        wait_for(lambda: _study_status(db, study_id) == StudyStatus.DONE, 120, "a study on the restarted worker", interval=0.25)
        _assert_everything_classified_once(db, study_id, ids)
        demo.terminate()
        assert demo.wait(timeout=60) == 0

        demo = start_demo()  # `scripts/run` again: the sample study is not queued a second time
        wait_for(lambda: "was queued on an earlier start" in log_path.read_text(errors="replace"), 60, "the second start")
        assert sample_studies() == [sample_id]
        wait_for(healthy, 120, "the demo portal after the second start")
    finally:
        if demo.poll() is None:
            demo.terminate()
            demo.wait(timeout=60)
        db.dispose()

"""Thin Celery tasks: they take ids, call core services, and log with the task id."""

from __future__ import annotations

from celery import Task
from celery.utils.log import get_task_logger
from sqlalchemy.exc import InterfaceError, OperationalError

from core.db import Database
from core.leases import LeaseHeartbeat, process_identity
from core.queue import CLASSIFY_CHUNK_TASK, HEATMAP_TASK, RECONCILE_TASK
from worker.app import app, settings

log = get_task_logger(__name__)

_db: Database | None = None
_cache = None


def reset_process_state() -> None:
    """Forget connections and models inherited from a parent process."""
    global _db, _cache
    _db = None
    _cache = None


def _services():  # type: ignore[no-untyped-def]
    global _db, _cache
    if _db is None:
        _db = Database(settings)
    if _cache is None:
        from core.ml.pipeline import PredictorCache  # torch is imported in the child only

        _cache = PredictorCache(settings)
    return _db, _cache


@app.task(
    name=CLASSIFY_CHUNK_TASK,
    bind=True,
    # A database blip (restart, failover) retries the chunk later instead of stranding its images;
    # this process keeps its claim, so the retry takes its images back in batches.
    autoretry_for=(OperationalError, InterfaceError),
    retry_backoff=True,
    retry_backoff_max=300,
    max_retries=8,
)
def classify_chunk(self: Task, study_id: int, image_ids: list[int]) -> dict[str, int | bool]:
    """Classify one chunk of a study's images and write the predictions (idempotent)."""
    from core.ml.pipeline import classify_chunk as run_chunk

    db, cache = _services()
    owner = process_identity()
    # While the chunk runs, its claims are renewed; if this process dies they run out (core.leases).
    with LeaseHeartbeat(db, owner, settings.lease_s, study_id):
        report = run_chunk(db, settings, cache, study_id, image_ids, owner)
    timing = " ".join(f"{stage}={seconds:.3f}s" for stage, seconds in report.seconds.items())
    log.info(
        "task %s study %s: %d predicted, %d failed, %d already finished or held elsewhere, %d tried alone after a crash%s; timing %s",
        self.request.id, study_id, report.predicted, report.failed, report.skipped, report.isolated,
        "; study done" if report.study_done else "", timing,
    )
    return {"predicted": report.predicted, "failed": report.failed, "skipped": report.skipped, "isolated": report.isolated,
            "study_done": report.study_done}


@app.task(name=RECONCILE_TASK)
def reconcile() -> dict[int, int]:
    """Periodic: re-enqueue images no task will finish (`celery -A worker beat`; every worker also runs it itself)."""
    from core.reconcile import reconcile as run_reconcile

    db, _ = _services()
    return run_reconcile(db, settings, app)


@app.task(name=HEATMAP_TASK, autoretry_for=(OperationalError, InterfaceError), retry_backoff=True, max_retries=5)
def heatmap(prediction_id: int) -> str:
    """Compute the heat map a reviewer asked for (idempotent; a reason is recorded when there can be none)."""
    from core.ml.explain import explain_prediction

    db, cache = _services()
    outcome = explain_prediction(db, settings, cache, prediction_id)
    log.info("heat map for prediction %s: %s", prediction_id, outcome)
    return outcome

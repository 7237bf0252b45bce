"""The Celery application's configuration and how work is put on the queue.

Both the worker (which runs tasks) and the portal (which only sends them, by name, with ids) build
their Celery app here, so broker settings live in one place. Importing this module does not import
the worker or torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery

from core.config import Settings

CLASSIFY_CHUNK_TASK = "triage.classify_chunk"
RECONCILE_TASK = "triage.reconcile"
HEATMAP_TASK = "triage.heatmap"
QUEUE_NAME = "triage"


def celery_config(settings: Settings) -> dict[str, object]:
    """Celery settings for long model tasks: acks late, prefetch 1, results in the database."""
    transport_options: dict[str, object] = {"visibility_timeout": settings.visibility_timeout_s}
    if settings.broker_url.startswith("filesystem"):
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": settings.broker_poll_interval_s,
        }
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        # A worker whose broker went away (Redis restarted) reconnects with back-off however long it takes.
        "broker_connection_max_retries": None,
        # A publish rides out a short broker restart; a longer outage raises, the images stay queued in the
        # database, and the workers' watchdog (core.reconcile) sends them once the broker is back.
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 4, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2.0},
        "result_backend": None,
        "task_ignore_result": True,
        "task_default_queue": QUEUE_NAME,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.worker_concurrency,
        "worker_hijack_root_logger": False,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_send_task_events": False,
        "beat_schedule": {
            "reconcile-stale-images": {"task": RECONCILE_TASK, "schedule": max(30.0, settings.reconcile_after_s / 3)},
        },
    }


def make_celery(settings: Settings, main: str = "worker") -> Celery:
    """A Celery app configured from ``settings`` (tasks are registered by the worker package)."""
    app = Celery(main)
    app.conf.update(celery_config(settings))
    return app


def chunked(ids: Sequence[int], size: int) -> list[list[int]]:
    """Split ``ids`` into lists of at most ``size``."""
    return [list(ids[start : start + size]) for start in range(0, len(ids), size)]


def enqueue_images(app: Celery, study_id: int, image_ids: Sequence[int], chunk_size: int) -> int:
    """Send one classify task per chunk of ``image_ids``; returns the number of tasks sent.

    Call after the database commit that recorded the images, so a worker never looks for rows that
    are not there yet.
    """
    chunks = chunked(image_ids, chunk_size)
    for chunk in chunks:
        app.send_task(CLASSIFY_CHUNK_TASK, args=[study_id, chunk], queue=QUEUE_NAME)
    return len(chunks)


def enqueue_heatmap(app: Celery, prediction_id: int) -> None:
    """Ask a worker for the heat map of one prediction (computed once; a repeated request changes nothing)."""
    app.send_task(HEATMAP_TASK, args=[prediction_id], queue=QUEUE_NAME)

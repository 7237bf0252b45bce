"""The Celery worker: ``celery -A worker worker`` classifies queued images with the production model.

The app is configured from :mod:`core.config` (one broker setting for portal and worker). The model
is loaded lazily in the child process that runs the task, never at import time or in the parent:
CUDA does not survive a fork.
"""

from __future__ import annotations

from celery.signals import setup_logging, worker_init, worker_process_init, worker_ready, worker_shutdown

from core.logs import configure_logging
from worker.app import app, settings

celery = app  # `celery -A worker` finds `app` or `celery`


@setup_logging.connect
def _configure_logging(**_: object) -> None:
    """Celery leaves logging to us: TRIAGE_LOG_LEVEL, in the format every process uses."""
    configure_logging(settings)


@worker_init.connect
def _refuse_an_outdated_database(**_: object) -> None:
    """Stop start-up with the fix when the database schema is missing or behind the code."""
    from core.migrate import SchemaNotCurrent, check_schema

    try:
        check_schema(settings.database_url)
    except SchemaNotCurrent as exc:
        raise SystemExit(f"error: {exc}") from None


@worker_process_init.connect
def _reset_after_fork(**_: object) -> None:
    """Each forked child takes its own GPU, opens its own database connections and loads its own model."""
    from core.ml.devices import pin_pool_child
    from worker.tasks import reset_process_state

    pin_pool_child(settings)
    reset_process_state()


_watchdog = None


@worker_ready.connect
def _start_watchdog(**_: object) -> None:
    """Re-queue work no task will finish now (e.g. the chunk of a worker killed before this start), then every half lease."""
    global _watchdog
    from core.queue import make_celery
    from core.reconcile import Watchdog

    # Its own Celery app: the thread never shares a broker connection with the consumer.
    _watchdog = Watchdog(settings, make_celery(settings, main="watchdog"))
    _watchdog.start()


@worker_shutdown.connect
def _stop_watchdog(**_: object) -> None:
    if _watchdog is not None:
        _watchdog.stop()


from worker import tasks  # noqa: E402,F401  (registers the tasks)

"""The worker's settings and Celery app, made once per process from :mod:`core.config`.

Their own module, so that :mod:`worker.tasks` can use them without importing the package that
imports it (``worker/__init__.py`` registers the tasks).
"""

from __future__ import annotations

from core.config import get_settings
from core.queue import make_celery

settings = get_settings()
app = make_celery(settings, main="worker")

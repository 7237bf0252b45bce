"""Re-enqueue work the broker lost, driven by the database (the source of truth).

If Redis restarts without persistence, or a message is dropped, images stay ``queued`` or
``processing`` with no task to finish them. The reconciler finds images untouched for longer than
``Settings.reconcile_after_s`` and sends their chunks again; tasks are idempotent, so a task that
was merely slow costs a little duplicate work, never a duplicate prediction.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import timedelta

from celery import Celery
from sqlalchemy import select, update

from core.config import Settings
from core.db import Database
from core.models import Image, ImageStatus, Study, StudyStatus, utcnow
from core.queue import enqueue_images

log = logging.getLogger(__name__)


def reconcile(db: Database, settings: Settings, celery_app: Celery, older_than_s: float | None = None) -> dict[int, int]:
    """Re-enqueue stale images of unfinished studies; returns {study id: images re-enqueued}."""
    age = settings.reconcile_after_s if older_than_s is None else older_than_s
    cutoff = utcnow() - timedelta(seconds=age)
    with db.transaction() as session:
        rows = session.execute(
            select(Image.study_id, Image.id)
            .join(Study, Study.id == Image.study_id)
            .where(
                Image.status.in_([ImageStatus.QUEUED, ImageStatus.PROCESSING]),
                Image.updated_at < cutoff,
                Study.status != StudyStatus.DONE,
            )
            .order_by(Image.study_id, Image.id)
        ).all()
        by_study: dict[int, list[int]] = defaultdict(list)
        for study_id, image_id in rows:
            by_study[study_id].append(image_id)
        if rows:
            # Touch them so the next pass does not send the same work again straight away.
            session.execute(update(Image).where(Image.id.in_([i for _, i in rows])).values(updated_at=utcnow()))
    for study_id, image_ids in by_study.items():
        enqueue_images(celery_app, study_id, image_ids, settings.chunk_size)
        log.warning("reconciler: re-enqueued %d stale images of study %s", len(image_ids), study_id)
    return {study_id: len(ids) for study_id, ids in by_study.items()}

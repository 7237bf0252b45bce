"""Re-enqueue work that no task will finish, driven by the database (the source of truth).

Three cases, all found by one conditional UPDATE:

* **A worker died** (SIGKILL, OOM, power loss): its images stay ``processing``, and with the
  serverless broker, or a Redis visibility timeout of an hour, its message is gone or far away.
  A worker renews the lease on the images it holds (:mod:`core.leases`); an image whose lease ran
  out, or whose claiming process on this host is gone, is re-queued at once.
* **The broker lost messages** (Redis restarted without persistence, a publish that failed): the
  images stay ``queued``. When the broker's queue is empty, images queued for longer than a lease
  are re-queued; in any case, images queued for longer than ``Settings.reconcile_after_s``.
* **An upload stopped half-way** (the portal died while recording it): its study stays
  ``receiving``; once no file was recorded for a lease, the study is ended with what it holds
  (:func:`core.studies.finish_receiving`).
* Anything else that left an image behind ends in one of those states.

Every worker runs this at start-up and every half lease (:class:`Watchdog`), so no scheduler is
needed, also in the embedded deployment; ``triage reconcile`` and the ``triage.reconcile`` beat task
run it by hand or on a schedule. Tasks are idempotent and claims are exclusive, so a message sent
for work that was merely slow costs one SELECT, never a duplicate prediction; and the UPDATE is
conditional, so several workers reconciling at once never send the same work twice.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from datetime import datetime, timedelta

from celery import Celery
from kombu.exceptions import ChannelError
from sqlalchemy import and_, false, func, or_, select, update
from sqlalchemy.orm import Session

from core.config import Settings
from core.db import Database
from core.leases import owner_is_gone
from core.models import Image, ImageStatus, Study, StudyStatus, utcnow
from core.queue import QUEUE_NAME, enqueue_images
from core.studies import finish_receiving

log = logging.getLogger(__name__)


def waiting_messages(celery_app: Celery) -> int:
    """Messages waiting in the broker's queue (not those a worker holds); raises when the broker is down."""
    with celery_app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=2, interval_start=0.2, interval_step=0.5, timeout=5)
        try:
            return int(connection.default_channel.queue_declare(queue=QUEUE_NAME, passive=True).message_count)
        except ChannelError:  # Redis drops an empty queue's key: no queue, no messages
            return 0


def reconcile(
    db: Database, settings: Settings, celery_app: Celery, older_than_s: float | None = None, check_broker: bool = True
) -> dict[int, int]:
    """Re-queue images that no task will finish; returns {study id: images re-enqueued}.

    ``older_than_s``: age after which a queued image is re-queued whatever the broker holds
    (default ``Settings.reconcile_after_s``). With ``check_broker``, queued images older than one
    lease are re-queued too when the broker's queue is empty.
    """
    now = utcnow()
    lease = timedelta(seconds=settings.lease_s)
    queued_age = timedelta(seconds=settings.reconcile_after_s if older_than_s is None else older_than_s)
    queue_empty = check_broker and waiting_messages(celery_app) == 0
    with db.transaction() as session:
        owners = session.scalars(
            select(Image.claimed_by).distinct().where(
                Image.status == ImageStatus.PROCESSING, Image.lease_expires_at > now, Image.claimed_by.is_not(None)
            )
        ).all()
        gone = [owner for owner in owners if owner_is_gone(owner)]
        worker_gone = and_(
            Image.status == ImageStatus.PROCESSING,
            or_(
                Image.lease_expires_at <= now,
                and_(Image.lease_expires_at.is_(None), Image.updated_at < now - lease),  # claimed before leases existed
                Image.claimed_by.in_(gone),
            ),
        )
        message_lost = and_(
            Image.status == ImageStatus.QUEUED,
            or_(Image.updated_at < now - queued_age, (Image.updated_at < now - lease) if queue_empty else false()),
        )
        # Conditional and atomic: a concurrent reconciler's UPDATE re-checks the condition on the new
        # row (updated_at is now fresh) and skips it, so the same work is never sent twice.
        rows = session.execute(
            update(Image)
            .where(or_(worker_gone, message_lost))
            .values(status=ImageStatus.QUEUED, claimed_by=None, lease_expires_at=None, updated_at=now)
            .returning(Image.study_id, Image.id)
            .execution_options(synchronize_session=False)
        ).all()
        finish_interrupted_uploads(session, now - lease)
    by_study: dict[int, list[int]] = defaultdict(list)
    for study_id, image_id in sorted(rows):
        by_study[study_id].append(image_id)
    # If sending fails now, the images are queued with no message: the next pass finds them again.
    for study_id, image_ids in by_study.items():
        enqueue_images(celery_app, study_id, image_ids, settings.chunk_size)
        log.warning("reconciler: re-enqueued %d image(s) of study %s that no task would finish", len(image_ids), study_id)
    return {study_id: len(ids) for study_id, ids in by_study.items()}


def finish_interrupted_uploads(session: Session, quiet_since: datetime) -> list[int]:
    """End the studies still ``receiving`` whose upload recorded nothing since ``quiet_since``; returns their ids.

    The portal records a large upload a chunk at a time, a few seconds in all, so a study that
    received nothing for a lease lost its portal process: it is ended with the files it holds.
    """
    latest_file = select(func.max(Image.created_at)).where(Image.study_id == Study.id).scalar_subquery()
    stale = session.scalars(
        select(Study.id).where(Study.status == StudyStatus.RECEIVING, Study.created_at < quiet_since,
                               or_(latest_file.is_(None), latest_file < quiet_since))
    ).all()
    for study_id in stale:
        finish_receiving(session, study_id)
        log.warning("reconciler: the upload of study %s stopped half-way; the study keeps the files it received", study_id)
    return list(stale)


class Watchdog(threading.Thread):
    """Runs :func:`reconcile` at start and every half lease until stopped (one per worker).

    Errors (database or broker down) are logged and the next pass tries again.
    """

    def __init__(self, settings: Settings, celery_app: Celery) -> None:
        super().__init__(name="triage-watchdog", daemon=True)
        self.settings = settings
        self.celery_app = celery_app
        self.passes = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Reconcile now, then every half lease."""
        db = Database(self.settings, pooled=False)  # holds no connection between passes (the worker forks)
        try:
            while True:
                try:
                    reconcile(db, self.settings, self.celery_app)
                except Exception as exc:  # kombu and the drivers raise many types; the next pass retries
                    log.warning("watchdog: reconcile pass failed (%s: %s); retrying in %.0f s",
                                exc.__class__.__name__, exc, self.settings.lease_s / 2)
                self.passes += 1
                if self._stop_event.wait(self.settings.lease_s / 2):
                    return
        finally:
            db.dispose()

    def stop(self) -> None:
        """Ask the thread to end after its current pass."""
        self._stop_event.set()

"""Leases on claimed images: which worker process holds an image, until when, and whether it is gone.

A worker claims a chunk's images as ``processing`` with ``claimed_by`` (this process:
``host:pid:nonce``) and ``lease_expires_at``. While it works, a heartbeat thread renews the lease.
A worker that dies stops renewing: its images become claimable again when the lease runs out, or
at once when the claiming process is known to be gone (same host, process no longer running), so a
redelivered task or a restarted worker does not wait for the lease.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from datetime import timedelta
from types import TracebackType

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError

from core.db import Database
from core.models import Image, ImageStatus, utcnow

log = logging.getLogger(__name__)

_identity: tuple[int, str] | None = None


def process_identity() -> str:
    """This process as a lease owner: ``host:pid:nonce`` (the nonce tells a reused pid apart)."""
    global _identity
    pid = os.getpid()
    if _identity is None or _identity[0] != pid:  # recomputed in a forked child
        _identity = (pid, f"{socket.gethostname()[:80]}:{pid}:{secrets.token_hex(4)}")
    return _identity[1]


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    try:  # a zombie has exited; it only waits for its parent to read its status
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def owner_is_gone(owner: str | None) -> bool:
    """Whether the process that holds a lease is known to have stopped.

    Only provable on the same host: the process id is not running, or it is this process's id with
    another nonce (an earlier process that had the same id). Elsewhere the lease has to run out.
    """
    if not owner:
        return True
    host, _, rest = owner.partition(":")
    pid_text, _, _nonce = rest.partition(":")
    if host != socket.gethostname()[:80] or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return owner != process_identity()
    return not _pid_running(pid)


def renew_leases(db: Database, owner: str, lease_s: float, study_id: int | None = None) -> int:
    """Extend every lease ``owner`` holds (of one study, if given); returns the number renewed."""
    condition = [Image.claimed_by == owner, Image.status == ImageStatus.PROCESSING]
    if study_id is not None:
        condition.append(Image.study_id == study_id)  # uses the (study_id, status) index
    with db.transaction() as session:
        result = session.execute(
            update(Image).where(*condition).values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount or 0)


class LeaseHeartbeat:
    """A thread that renews ``owner``'s leases every third of ``lease_s`` while a task works.

    Use as a context manager around one task. A database outage is logged and retried at the next
    beat; if it lasts longer than the lease, another worker may take the images over, which costs
    duplicate work but never a duplicate prediction.
    """

    def __init__(self, db: Database, owner: str, lease_s: float, study_id: int | None = None) -> None:
        self.db, self.owner, self.lease_s, self.study_id = db, owner, lease_s, study_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                renew_leases(self.db, self.owner, self.lease_s, self.study_id)
            except SQLAlchemyError as exc:
                log.warning("could not renew the leases of %s: %s", self.owner, exc.__class__.__name__)

    def __enter__(self) -> LeaseHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=self.lease_s)  # a beat stuck on an unreachable database is left behind

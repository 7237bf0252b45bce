"""The audit log: who uploaded, viewed, reviewed, exported, promoted, logged in or managed accounts, when, from where."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import AuditEvent, User

ACTIONS = (
    "login", "login_failed", "logout", "upload", "view", "review", "review_undo", "export", "promote", "rerun", "token",
    "token_revoke", "user_create", "user_disable", "user_enable", "password_reset", "password_change",
    "group_create", "user_group", "heatmap_request",
)


def record(
    session: Session,
    action: str,
    user: User | None,
    object_type: str | None = None,
    object_id: object | None = None,
    ip: str | None = None,
    detail: dict[str, Any] | str | None = None,
    username: str | None = None,
) -> AuditEvent:
    """Add one audit event to ``session`` (committed with the caller's transaction).

    Raises:
        ValueError: for an action not in :data:`ACTIONS`.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    text = json.dumps(detail, sort_keys=True, default=str) if isinstance(detail, dict) else detail
    event = AuditEvent(
        action=action,
        user_id=user.id if user is not None else None,
        username=(username if username is not None else (user.username if user is not None else ""))[:80],
        object_type=object_type,
        object_id=None if object_id is None else str(object_id)[:64],
        ip=(ip or None) and ip[:64],
        detail=text,
    )
    session.add(event)
    return event


def events(
    session: Session, action: str | None = None, username: str | None = None, limit: int = 200, offset: int = 0
) -> list[AuditEvent]:
    """Audit events, newest first, optionally for one action and/or user name."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc())
    if action:
        query = query.where(AuditEvent.action == action)
    if username:
        query = query.where(AuditEvent.username == username)
    return list(session.scalars(query.limit(limit).offset(offset)))

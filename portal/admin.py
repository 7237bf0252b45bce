"""Administration pages: the audit log."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, render_template, request

from core import audit
from portal import extensions
from portal.auth import require

bp = Blueprint("admin", __name__, url_prefix="/admin")

PAGE = 100


@bp.get("/audit")
@require("audit")
def audit_log() -> Any:
    """Read the audit log, newest first, filterable by action and user name."""
    action = request.args.get("action") or None
    username = (request.args.get("user") or "").strip() or None
    page = max(1, request.args.get("page", default=1, type=int) or 1)
    events = audit.events(extensions.db_session(), action=action, username=username, limit=PAGE + 1, offset=(page - 1) * PAGE)
    return render_template(
        "audit.html", events=events[:PAGE], has_more=len(events) > PAGE, page=page,
        action=action, username=username or "", actions=audit.ACTIONS,
    )

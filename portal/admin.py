"""Administration pages: the audit log, accounts (create, disable, enable, reset password, group),
groups (radiology sites) and API tokens.

Every change is audited. Ending sessions is :mod:`core.auth`'s job: disabling an account or resetting
its password ends every session of that user. A new API token is shown once, in the response body,
never in a flash message (those travel in the signed but readable session cookie).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user

from core import audit
from core.auth import ROLES, AuthError, create_user, issue_token, list_tokens, list_users, revoke_token, set_active, set_password
from core.groups import GroupError, create_group, list_groups, set_group
from core.models import ApiToken, User
from portal import extensions
from portal.auth import record, require
from portal.http import int_param

bp = Blueprint("admin", __name__, url_prefix="/admin")

PAGE = 100
MAX_PAGE = 1_000_000


@bp.get("/audit")
@require("audit")
def audit_log() -> Any:
    """Read the audit log, newest first, filterable by action and user name."""
    action = request.args.get("action") or None
    if action is not None and action not in audit.ACTIONS:
        abort(400, f"action must be one of: {', '.join(audit.ACTIONS)}.")
    username = (request.args.get("user") or "").strip()[:80] or None
    page = int_param("page", source=request.args, maximum=MAX_PAGE, default=1) or 1
    events = audit.events(extensions.db_session(), action=action, username=username, limit=PAGE + 1, offset=(page - 1) * PAGE)
    return render_template(
        "audit.html", events=events[:PAGE], has_more=len(events) > PAGE, page=page,
        action=action, username=username or "", actions=audit.ACTIONS,
    )


def _render_users(error: str | None = None, status: int = 200, issued: tuple[ApiToken, str] | None = None) -> Any:
    session = extensions.db_session()
    users = list_users(session)
    active_tokens = {user.id: sum(1 for t in user.tokens if t.revoked_at is None) for user in users}
    return render_template("admin_users.html", users=users, active_tokens=active_tokens, roles=ROLES, error=error,
                           issued=issued, groups=list_groups(session)), status


def _changed(message: str, action: str, object_type: str, object_id: object, detail: Any = None) -> Any:
    """Audit a change that went through, commit it, say so, and go back to the accounts page (303)."""
    record(action, object_type, object_id, detail)
    extensions.db_session().commit()
    flash(message, "info")
    return redirect(url_for("admin.users"), code=303)


def _user(user_id: int) -> User:
    user = extensions.db_session().get(User, user_id)
    if user is None:
        abort(404, f"User #{user_id} not found.")
    return user


@bp.get("/users")
@require("users")
def users() -> Any:
    """Accounts with their role, state, last sign-in and active tokens; forms to manage them."""
    return _render_users()


@bp.post("/users")
@require("users")
def create() -> Any:
    """Create an account with a role and an initial password (audited)."""
    session = extensions.db_session()
    form = request.form
    role = form.get("role", "")
    group_id = int_param("group_id", source=form)
    try:
        user = create_user(session, form.get("username", "")[:200], form.get("password", ""), role)
        group = set_group(session, user, group_id)
    except (AuthError, GroupError) as exc:
        session.rollback()
        return _render_users(error=f"Not created: {exc}.", status=400)
    return _changed(f"Created {user.username} ({user.role}).",
                    "user_create", "user", user.username, {"role": user.role, "group": group.name if group else None})


@bp.post("/users/<int:user_id>/group")
@require("users")
def move(user_id: int) -> Any:
    """Put an account in a group (empty: the default group); it sees that group's studies from now on (audited)."""
    session = extensions.db_session()
    user = _user(user_id)
    try:
        group = set_group(session, user, int_param("group_id", source=request.form))
    except GroupError as exc:
        session.rollback()
        abort(404, f"{exc}.")
    return _changed(f"{user.username} is now in {group.name if group else 'the default group'}.",
                    "user_group", "user", user.username, {"group": group.name if group else None})


@bp.post("/groups")
@require("users")
def new_group() -> Any:
    """Create a group (a radiology site; audited)."""
    session = extensions.db_session()
    try:
        group = create_group(session, request.form.get("name", "")[:200])
    except GroupError as exc:
        session.rollback()
        return _render_users(error=f"Group not created: {exc}.", status=400)
    return _changed(f"Created group {group.name}; put users in it below.", "group_create", "group", group.id, {"name": group.name})


@bp.post("/users/<int:user_id>/disable")
@require("users")
def disable(user_id: int) -> Any:
    """Disable an account: its sessions end at once and its tokens stop working (audited)."""
    session = extensions.db_session()
    user = _user(user_id)
    if user.id == current_user.id:
        abort(409, "You cannot disable your own account; ask another admin.")
    try:
        set_active(session, user, False)
    except AuthError as exc:
        session.rollback()
        abort(409, f"{exc}.")
    return _changed(f"Disabled {user.username}: signed out everywhere; API tokens refused while disabled.",
                    "user_disable", "user", user.username)


@bp.post("/users/<int:user_id>/enable")
@require("users")
def enable(user_id: int) -> Any:
    """Enable a disabled account again (it signs in afresh; audited)."""
    user = _user(user_id)
    set_active(extensions.db_session(), user, True)
    return _changed(f"Enabled {user.username}.", "user_enable", "user", user.username)


@bp.post("/users/<int:user_id>/password")
@require("users")
def reset_password(user_id: int) -> Any:
    """Set a new password for an account; every session of that user ends (audited)."""
    session = extensions.db_session()
    user = _user(user_id)
    try:
        set_password(user, request.form.get("password", ""))
    except AuthError as exc:
        session.rollback()
        return _render_users(error=f"Password of {user.username} not changed: {exc}.", status=400)
    return _changed(f"New password set for {user.username}; their sessions were ended.", "password_reset", "user", user.username)


@bp.post("/users/<int:user_id>/tokens")
@require("users")
def issue(user_id: int) -> Any:
    """Issue an API token for an account; shown once on the answer page (audited)."""
    session = extensions.db_session()
    user = _user(user_id)
    if not user.is_active:
        abort(409, f"{user.username} is disabled; enable the account first.")
    label = (request.form.get("label") or "").strip()[:120] or "portal"
    row, token = issue_token(session, user, label)
    record("token", "api_token", row.id, {"label": row.name, "for": user.username, "via": "portal"})
    session.commit()
    return _render_users(status=201, issued=(row, token))


@bp.get("/tokens")
@require("users")
def tokens() -> Any:
    """Every API token (hash never shown): owner, label, created, last used, revoked; revoke buttons."""
    session = extensions.db_session()
    owner_id = int_param("user", source=request.args)
    owner = _user(owner_id) if owner_id else None
    return render_template("tokens.html", tokens=list_tokens(session, owner), owner=owner, admin_view=True)


@bp.post("/tokens/<int:token_id>/revoke")
@require("users")
def revoke(token_id: int) -> Any:
    """Revoke any API token at once (audited)."""
    session = extensions.db_session()
    token = session.get(ApiToken, token_id)
    if token is None:
        abort(404, f"API token #{token_id} not found.")
    if revoke_token(token):
        record("token_revoke", "api_token", token.id, {"label": token.name, "of": token.user.username})
        session.commit()
        flash(f"Revoked token #{token.id} ({token.name}) of {token.user.username}.", "info")
    else:
        flash(f"Token #{token.id} was already revoked.", "info")
    return redirect(url_for("admin.tokens", user=int_param("user", source=request.args)), code=303)

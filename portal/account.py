"""The signed-in user's own account: change the password, see and revoke their API tokens.

Changing the password ends every other session of the user (this one carries on). Tokens are
issued by an admin (``/admin/users`` or ``triage user token``), so a stolen session cookie cannot
mint a credential that outlives logout; their owner may revoke them here.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, flash, g, redirect, render_template, request, url_for
from flask_login import current_user

from core.auth import AuthError, check_password, list_tokens, revoke_token, set_password
from core.models import ApiToken
from portal import extensions
from portal.auth import db_user, keep_this_session, record

bp = Blueprint("account", __name__, url_prefix="/account")


def _render(error: str | None = None, status: int = 200) -> Any:
    user = db_user()
    return render_template("tokens.html", tokens=list_tokens(extensions.db_session(), user), owner=user,
                           admin_view=False, error=error), status


@bp.get("")
def index() -> Any:
    """Your account: your API tokens (revoke) and a form to change your password."""
    return _render()


@bp.post("/password")
def change_password() -> Any:
    """Change your password (the current one is asked); your other sessions end (audited)."""
    session = extensions.db_session()
    user = db_user()
    form = request.form
    if user is None or not check_password(user, form.get("current_password", "")[:500]):
        return _render(error="Password not changed: the current password is wrong.", status=400)
    if form.get("new_password", "") != form.get("confirm_password", ""):
        return _render(error="Password not changed: the two new passwords differ.", status=400)
    try:
        set_password(user, form.get("new_password", ""))
    except AuthError as exc:
        session.rollback()
        return _render(error=f"Password not changed: {exc}.", status=400)
    record("password_change", "user", user.username)
    session.commit()
    if not g.get("auth_via_token"):
        keep_this_session(user)
    flash("Password changed; every other session of yours was signed out.", "info")
    return redirect(url_for("account.index"), code=303)


@bp.post("/tokens/<int:token_id>/revoke")
def revoke(token_id: int) -> Any:
    """Revoke one of your API tokens (another user's token is a 404; audited)."""
    session = extensions.db_session()
    token = session.get(ApiToken, token_id)
    if token is None or token.user_id != current_user.id:
        abort(404, f"API token #{token_id} not found.")
    if revoke_token(token):
        record("token_revoke", "api_token", token.id, {"label": token.name, "of": current_user.username})
        session.commit()
        flash(f"Revoked token #{token.id} ({token.name}).", "info")
    return redirect(url_for("account.index"), code=303)

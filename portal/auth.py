"""Sign-in, roles and API tokens for the portal; every route needs a signed-in user unless listed public.

* People sign in with a password (Flask-Login session; the form has a CSRF token).
* Scripts send ``Authorization: Bearer <token>`` (tokens from ``triage user token NAME``); a token,
  when sent, decides who the request is from, and a bad one is a 401.
* A guard before every request refuses anonymous access to any endpoint not in
  :data:`PUBLIC_ENDPOINTS`, so a new route is protected without anyone remembering to.
* Every cookie-authenticated write (form or JSON API) needs the CSRF token (form field or header
  ``X-CSRFToken``), checked here after sign-in so anonymous requests get 401/redirect first;
  token-authenticated requests need none (a browser never sends a bearer token by itself). The
  login form checks its own token (Flask-WTF form).
* Failed logins are counted in the audit log (so across every portal process), per user name and
  per client address with separate limits; over either, 429. Behind reverse proxies the client
  address comes from ``TRIAGE_TRUSTED_PROXIES`` hops of X-Forwarded-For (Werkzeug's ProxyFix).
* Each session carries the user's *session generation* from sign-in; logout, a password change or
  reset and disabling the account raise it, so every session of that user (and any copy of its
  cookie) stops working at once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Blueprint, Flask, abort, flash, g, jsonify, redirect, render_template, request, session, url_for
from flask.sessions import SecureCookieSessionInterface
from flask_login import LoginManager, UserMixin, current_user, login_user, logout_user
from flask_wtf import FlaskForm
from wtforms import PasswordField, StringField
from wtforms.validators import DataRequired, Length

from core import audit, groups
from core.auth import can, check_password, end_sessions, get_user, recent_login_failures, user_for_token
from core.groups import study_condition
from core.models import Study, User, utcnow
from portal import extensions
from portal.http import safe_redirect_target

bp = Blueprint("auth", __name__)
login_manager = LoginManager()
login_manager.login_view = "auth.login"
login_manager.login_message = "Sign in to continue."
login_manager.session_protection = "basic"

#: Session key holding the user's session generation at sign-in (see :func:`core.auth.end_sessions`).
SESSION_GENERATION = "_generation"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC_ENDPOINTS = frozenset({"auth.login", "health.healthz", "health.readyz", "static"})

F = TypeVar("F", bound=Callable[..., Any])


class PortalUser(UserMixin):
    """The signed-in person as the portal sees them (detached from any database session)."""

    def __init__(self, user: User) -> None:
        self.id = user.id
        self.username = user.username
        self.role = user.role
        self.group_id = user.group_id
        self._active = bool(user.is_active)

    @property
    def is_active(self) -> bool:  # type: ignore[override]
        """Deactivated accounts cannot sign in or use tokens."""
        return self._active

    def can(self, permission: str) -> bool:
        """Whether this user's role grants ``permission``."""
        return can(self.role, permission)


class LoginForm(FlaskForm):
    """User name and password (with Flask-WTF's CSRF token)."""

    username = StringField("User name", validators=[DataRequired(), Length(max=80)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=500)])

    class Meta:
        """Read only the posted form: never a JSON body (whose numbers and lists are no text fields)."""

        def wrap_formdata(self, form: Any, formdata: Any) -> Any:  # type: ignore[no-untyped-def]
            return request.form if request.method in ("POST", "PUT", "PATCH", "DELETE") else None


class PortalSessionInterface(SecureCookieSessionInterface):
    """Signed cookie sessions whose cookie is Secure whenever the request is HTTPS (or always, by setting)."""

    def get_cookie_secure(self, app: Flask) -> bool:
        """Secure for HTTPS requests, or always with ``TRIAGE_SECURE_COOKIES``."""
        if app.config.get("SESSION_COOKIE_SECURE"):
            return True
        return bool(request) and request.is_secure


def client_ip() -> str | None:
    """The client's address: the connection's, or the one TRIAGE_TRUSTED_PROXIES trusted proxies forwarded."""
    return request.remote_addr


def visible_studies() -> Any:
    """A SQL condition on Study: the studies the current user may see (None: every study, for admins)."""
    return study_condition(current_user.can("all_groups"), current_user.group_id)


def may_see(study: Study | None) -> bool:
    """Whether the current user may see ``study`` (another group's study is treated as missing: 404)."""
    return groups.may_see(study, current_user.can("all_groups"), current_user.group_id)


def db_user(user: object | None = None) -> User | None:
    """The signed-in user's database row (in the request's session)."""
    user = user or current_user
    if not getattr(user, "is_authenticated", False):
        return None
    return extensions.db_session().get(User, user.id)  # type: ignore[attr-defined]


def record(action: str, object_type: str | None = None, object_id: object | None = None, detail: Any = None,
           username: str | None = None) -> None:
    """Add an audit event for the current user and client address (committed by the view)."""
    audit.record(extensions.db_session(), action, db_user(), object_type, object_id, client_ip(), detail, username=username)


def require(permission: str) -> Callable[[F], F]:
    """Refuse (403) users whose role lacks ``permission``; the login guard already refused anonymous ones."""

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not current_user.is_authenticated:
                abort(401, "Sign in first.")
            if not current_user.can(permission):
                abort(403, f"Your role ({current_user.role}) may not {permission}.")
            return view(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


@login_manager.user_loader
def _load_user(user_id: str) -> PortalUser | None:
    """The session's user, if the account is active and the session is of its current generation."""
    try:
        user = extensions.db_session().get(User, int(user_id))
    except (ValueError, OverflowError):
        return None
    if user is None or not user.is_active or session.get(SESSION_GENERATION) != user.session_generation:
        return None  # signed out, password changed or account disabled since this session began
    return PortalUser(user)


def start_session(user: User) -> None:
    """Sign ``user`` in on a fresh session that carries their current session generation."""
    session.clear()  # nothing from before sign-in carries over
    login_user(PortalUser(user))
    session[SESSION_GENERATION] = user.session_generation


def keep_this_session(user: User) -> None:
    """After ending all of ``user``'s sessions, keep the current one (a password change by its owner)."""
    session[SESSION_GENERATION] = user.session_generation


def _token_user() -> PortalUser | None | bool:
    """The user of a bearer token: PortalUser, False for a bad token, None when no token was sent."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    db = extensions.db_session()
    user = user_for_token(db, token.strip())
    if user is None:
        return False
    db.commit()  # last_used_at
    return PortalUser(user)


@login_manager.unauthorized_handler
def _unauthorized() -> Any:
    if _wants_json():
        return jsonify(error="authentication required: sign in or send 'Authorization: Bearer <token>'"), 401
    return redirect(url_for("auth.login", next=request.full_path if request.method == "GET" else None))


def _wants_json() -> bool:
    return request.path.startswith("/api/") or request.path == "/metrics" or request.accept_mimetypes.best == "application/json"


def _guard() -> Any:
    """Before every request: anonymous users reach only public endpoints; session API POSTs need CSRF."""
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    token_user = _token_user()  # a bearer token, when sent, decides who this is (over any session)
    if token_user is False:
        return jsonify(error="invalid or revoked API token"), 401
    if token_user is not None:
        login_manager._update_request_context_with_user(token_user)
        g.auth_via_token = True
    if not current_user.is_authenticated:
        return login_manager.unauthorized()
    if request.method not in SAFE_METHODS and not g.get("auth_via_token"):
        extensions.csrf.protect()  # cookie-authenticated writes, pages and API alike, need the CSRF token
    return None


def _safe_next(target: str | None) -> str:
    return safe_redirect_target(target) or url_for("studies.index")


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    """Sign in with a user name and password (rate-limited per address and per user name)."""
    if current_user.is_authenticated and request.method == "GET":
        return redirect(_safe_next(request.args.get("next")))
    form = LoginForm()
    status = 200
    error = None
    if request.method == "POST":
        if not form.validate_on_submit():
            error, status = "Enter your user name and password (and reload the page if it is old).", 400
        else:
            settings, db = extensions.settings(), extensions.db_session()
            name = form.username.data.strip()
            failures = recent_login_failures(db, client_ip(), name, settings.login_window_s)
            limited = ("address" if failures.by_address >= settings.login_max_address_failures
                       else "account" if failures.by_account >= settings.login_max_failures else None)
            if limited:
                record("login_failed", "user", name, {"reason": "rate limited", "limit": limited}, username=name)
                db.commit()
                minutes = max(1, settings.login_window_s // 60)
                error, status = f"Too many failed sign-ins. Wait {minutes} minute(s) and try again.", 429
            else:
                user = get_user(db, name)
                if user is None or not user.is_active or not check_password(user, form.password.data):
                    record("login_failed", "user", name, {"reason": "bad credentials"}, username=name)
                    db.commit()
                    error, status = "Wrong user name or password.", 401
                else:
                    target = _safe_next(request.args.get("next"))
                    start_session(user)
                    user.last_login_at = utcnow()
                    audit.record(db, "login", user, "user", user.username, client_ip())
                    db.commit()
                    return redirect(target, code=303)
    return render_template("login.html", form=form, error=error), status


@bp.post("/logout")
def logout() -> Any:
    """Sign out everywhere: every session of this user ends, copies of the cookie included (POST with CSRF)."""
    user = db_user()
    if user is not None:
        end_sessions(user)
    record("logout", "user", current_user.username)
    extensions.db_session().commit()
    logout_user()
    session.clear()
    flash("Signed out.", "info")
    return redirect(url_for("auth.login"), code=303)


def init_app(app: Flask) -> None:
    """Install Flask-Login, the login guard and the cookie policy on ``app``."""
    settings = extensions.settings_of(app)
    app.config.update(
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        SESSION_COOKIE_NAME="triage_session",
        WTF_CSRF_CHECK_DEFAULT=False,  # the guard calls csrf.protect() itself (see the module docstring)
        REMEMBER_COOKIE_HTTPONLY=True,
        REMEMBER_COOKIE_SAMESITE="Lax",
    )
    app.session_interface = PortalSessionInterface()
    login_manager.init_app(app)
    app.before_request(_guard)
    app.register_blueprint(bp)

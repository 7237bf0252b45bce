"""Accounts, roles, password hashing and API tokens (no Flask: the CLI and the portal share it).

Passwords are hashed with werkzeug's scrypt; API tokens are 256-bit random strings of which only
the sha256 is stored (a token is high-entropy, so a fast hash is enough and lookups stay indexed).
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from werkzeug.security import check_password_hash, generate_password_hash

from core.models import ApiToken, AuditEvent, User, utcnow

ROLES = ("uploader", "reviewer", "admin")
TOKEN_PREFIX = "trg_"
MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 500

# What each role may do. Everyone signed in may view studies, results and models.
PERMISSIONS: dict[str, frozenset[str]] = {
    "uploader": frozenset({"view", "upload", "export", "rerun"}),
    "reviewer": frozenset({"view", "review", "export", "stats"}),
    "admin": frozenset({"view", "upload", "export", "rerun", "review", "rereview", "promote", "audit", "stats", "users",
                        "all_groups"}),
}


class AuthError(ValueError):
    """A bad user name, role, password or token; the message says which."""


def can(role: str, permission: str) -> bool:
    """Whether ``role`` grants ``permission``."""
    return permission in PERMISSIONS.get(role, frozenset())


def hash_password(password: str) -> str:
    """A salted scrypt hash of ``password``."""
    return generate_password_hash(password, method="scrypt")


def check_password(user: User, password: str) -> bool:
    """Whether ``password`` is the user's password (False for accounts without one)."""
    if not user.password_hash:
        return False
    return check_password_hash(user.password_hash, password)


def validate_password(password: str) -> None:
    """Refuse passwords shorter than :data:`MIN_PASSWORD_LENGTH` or longer than :data:`MAX_PASSWORD_LENGTH`.

    Raises:
        AuthError: when the password is too short or too long.
    """
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AuthError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise AuthError(f"password must have at most {MAX_PASSWORD_LENGTH} characters")


def get_user(session: Session, username: str) -> User | None:
    """The user called ``username``, if any."""
    return session.scalars(select(User).where(User.username == username)).first()


def create_user(session: Session, username: str, password: str, role: str) -> User:
    """Create an account.

    Raises:
        AuthError: on an empty or taken name, an unknown role, or a short password.
    """
    username = username.strip()
    if not username or len(username) > 80 or any(c.isspace() for c in username):
        raise AuthError("user name must be 1-80 characters without spaces")
    if role not in ROLES:
        raise AuthError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
    validate_password(password)
    if get_user(session, username) is not None:
        raise AuthError(f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), role=role, is_active=True)
    session.add(user)
    session.flush()
    return user


def end_sessions(user: User) -> None:
    """End every portal session of ``user`` (sessions carry the generation they were signed in with)."""
    user.session_generation = (user.session_generation or 0) + 1


def set_password(user: User, password: str) -> None:
    """Give ``user`` a new password and end all their sessions.

    Raises:
        AuthError: when the password is too short.
    """
    validate_password(password)
    user.password_hash = hash_password(password)
    end_sessions(user)


def set_active(session: Session, user: User, active: bool) -> None:
    """Enable or disable an account; disabling ends its sessions (its tokens stop working while disabled).

    Raises:
        AuthError: when disabling would leave no active admin.
    """
    if not active and user.is_active and user.role == "admin" and count_active_admins(session) <= 1:
        raise AuthError(f"{user.username!r} is the last active admin; enable or create another admin first")
    if not active:
        end_sessions(user)
    user.is_active = active


def count_active_admins(session: Session) -> int:
    """How many enabled admin accounts exist."""
    query = select(func.count()).select_from(User).where(User.role == "admin", User.is_active.is_(True))
    return int(session.scalar(query) or 0)


def list_users(session: Session) -> list[User]:
    """Every account, by name."""
    return list(session.scalars(select(User).order_by(User.username)))


def list_tokens(session: Session, user: User | None = None) -> list[ApiToken]:
    """API tokens (of ``user`` only, when given), newest first; revoked ones included."""
    query = select(ApiToken).order_by(ApiToken.id.desc())
    if user is not None:
        query = query.where(ApiToken.user_id == user.id)
    return list(session.scalars(query))


def revoke_token(token: ApiToken) -> bool:
    """Revoke an API token; False when it was already revoked."""
    if token.revoked_at is not None:
        return False
    token.revoked_at = utcnow()
    return True


def count_users(session: Session) -> int:
    """How many accounts exist."""
    return int(session.scalar(select(func.count()).select_from(User)) or 0)


def hash_token(token: str) -> str:
    """The stored form of an API token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def issue_token(session: Session, user: User, name: str = "") -> tuple[ApiToken, str]:
    """Create an API token for ``user``; returns the row and the token (shown once, never stored)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(user_id=user.id, name=name[:120], token_hash=hash_token(token))
    session.add(row)
    session.flush()
    return row, token


def user_for_token(session: Session, token: str) -> User | None:
    """The active user an unrevoked API token belongs to (and note when it was used), else None."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    row = session.scalars(
        select(ApiToken).where(ApiToken.token_hash == hash_token(token), ApiToken.revoked_at.is_(None))
    ).first()
    if row is None or not row.user.is_active:
        return None
    row.last_used_at = utcnow()
    return row.user


class LoginFailures(NamedTuple):
    """Recent failed logins, counted separately per client address and per user name."""

    by_address: int
    by_account: int


def recent_login_failures(
    session: Session, ip: str | None, username: str, window_s: int, now: datetime | None = None
) -> LoginFailures:
    """Failed logins from ``ip`` (any user name) and for ``username`` (any address) in the last ``window_s`` seconds.

    Counted from the audit log, so the limits hold across every portal process. The two counts have
    their own limits, so one person's typos do not lock out everyone behind the same address.
    """
    since = (now or utcnow()) - timedelta(seconds=window_s)
    query = select(func.count()).select_from(AuditEvent).where(
        AuditEvent.action == "login_failed", AuditEvent.created_at >= since
    )
    by_ip = session.scalar(query.where(AuditEvent.ip == ip[:64])) if ip else 0
    by_name = session.scalar(query.where(AuditEvent.object_id == username[:64])) if username else 0
    return LoginFailures(int(by_ip or 0), int(by_name or 0))

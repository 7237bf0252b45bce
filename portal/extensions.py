"""Per-app services: settings, database, Celery client and CSRF; one database session per request."""

from __future__ import annotations

import logging

from celery import Celery
from flask import Flask, current_app, g, request
from flask_wtf import CSRFProtect
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import RequestEntityTooLarge
from sqlalchemy.orm import Session

from core import registry
from core.config import Settings
from core.db import Database
from core.models import ModelVersion
from core.queue import make_celery

log = logging.getLogger(__name__)

csrf = CSRFProtect()

SETTINGS_KEY = "triage_settings"
DATABASE_KEY = "triage_db"
CELERY_KEY = "triage_celery"

CONTENT_SECURITY_POLICY = "default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'"


def init_app(app: Flask, settings: Settings) -> None:
    """Attach settings, one :class:`Database` and a Celery client to ``app`` (CSRF: see create_app)."""
    app.extensions[SETTINGS_KEY] = settings
    app.extensions[DATABASE_KEY] = Database(settings)
    app.extensions[CELERY_KEY] = make_celery(settings, main="portal")
    app.before_request(_refuse_oversized)
    app.teardown_appcontext(_close_session)
    app.context_processor(_template_globals)
    app.after_request(_security_headers)


def settings() -> Settings:
    """The current app's settings."""
    return current_app.extensions[SETTINGS_KEY]


def settings_of(app: Flask) -> Settings:
    """The settings of ``app`` (outside a request)."""
    return app.extensions[SETTINGS_KEY]


def database() -> Database:
    """The current app's database."""
    return current_app.extensions[DATABASE_KEY]


def celery_app() -> Celery:
    """The current app's Celery client (sends tasks by name; runs none)."""
    return current_app.extensions[CELERY_KEY]


def db_session() -> Session:
    """The request's database session, opened on first use and closed at teardown."""
    if "db_session" not in g:
        g.db_session = database().session()
    return g.db_session


def rollback_session() -> None:
    """Roll back the request's session, if one is open (after an error)."""
    session = g.get("db_session")
    if session is not None:
        session.rollback()


def _close_session(exc: BaseException | None) -> None:
    session = g.pop("db_session", None)
    if session is None:
        return
    try:
        if exc is not None:
            session.rollback()
    finally:
        session.close()


def production_model() -> ModelVersion | None:
    """The production model version, looked up once per request."""
    if "production_model" not in g:
        g.production_model = registry.production_version(db_session())
    return g.production_model


def _refuse_oversized() -> None:
    """Answer 413 from the Content-Length header alone, before any other check reads the body."""
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is not None and limit is not None and request.content_length > limit:
        raise RequestEntityTooLarge()


def _template_globals() -> dict[str, object]:
    try:
        version = production_model()
    except SQLAlchemyError:
        # Error pages must still render when the database is the problem; the error is logged.
        log.exception("could not look up the production model for the page banner")
        rollback_session()
        version = None
    from flask_login import current_user

    return {"production_model": version, "max_upload_mb": settings().max_upload_mb, "user": current_user}


def _security_headers(response):  # type: ignore[no-untyped-def]
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if response.mimetype == "text/html" and not request.path.startswith("/api/"):
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("X-Frame-Options", "DENY")
    return response

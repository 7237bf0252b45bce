"""Error handlers: JSON ``{"error": ...}`` under /api, an HTML page for people; 500s roll back."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, make_response, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from portal import extensions

log = logging.getLogger(__name__)


def wants_json() -> bool:
    """True for API clients (everything under /api and the health check) and pages' scripts that ask for JSON."""
    return (request.path.startswith("/api/") or request.path == "/api" or request.path == "/healthz"
            or request.accept_mimetypes.best == "application/json")


def error_response(status: int, message: str) -> Response:
    """The error as JSON for API clients or as an HTML page for people."""
    if wants_json():
        response = jsonify(error=message)
    else:
        response = make_response(render_template("error.html", status=status, message=message))
    response.status_code = status
    return response


def too_large_message() -> str:
    """What a person needs to know when a request is over the upload limit."""
    limit = extensions.settings().max_upload_mb
    return (
        f"Upload too large: the limit is {limit} MB per request (TRIAGE_MAX_UPLOAD_MB). "
        "Split the batch into smaller uploads or raise the limit."
    )


def _http_error(exc: HTTPException):  # type: ignore[no-untyped-def]
    if isinstance(exc, RequestEntityTooLarge) and exc.description == RequestEntityTooLarge.description:
        return error_response(413, too_large_message())
    if exc.code is not None and exc.code >= 500:
        extensions.rollback_session()
    response = error_response(exc.code or 500, exc.description or exc.name)
    if exc.code == 405 and exc.valid_methods:  # type: ignore[attr-defined]
        response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
    return response


def _unexpected_error(exc: Exception):  # type: ignore[no-untyped-def]
    log.exception("unhandled error on %s %s", request.method, request.path)
    extensions.rollback_session()
    return error_response(500, "Internal error: it has been logged. Try again, or contact the administrator.")


def init_app(app: Flask) -> None:
    """Register the handlers on ``app``."""
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)

"""The web portal: upload study batches, follow their progress, review flagged cases.

The portal is light: it imports :mod:`core` services only, never :mod:`worker`, :mod:`core.ml` or
torch. Work reaches the GPU workers as Celery task names with ids (:func:`core.queue.enqueue_images`).
"""

from __future__ import annotations

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import IntegerConverter

from core.config import Settings, get_settings
from core.logs import configure_logging


class BoundedInt(IntegerConverter):
    """``<int:...>`` URL parts limited to the 32-bit range every database column holds."""

    def __init__(self, url_map, fixed_digits: int = 0, min: int | None = None, max: int | None = 2**31 - 1, signed: bool = False) -> None:  # type: ignore[no-untyped-def]
        super().__init__(url_map, fixed_digits=fixed_digits, min=min, max=max, signed=signed)


def create_app(settings: Settings | None = None) -> Flask:
    """Build a portal app for ``settings`` (default: read from the ``TRIAGE_*`` environment)."""
    from portal import account, admin, api, auth, errors, extensions, health, http, model_pages, presenters, review, study_pages

    settings = settings or get_settings()
    configure_logging(settings)
    app = Flask(__name__)
    app.request_class = http.PortalRequest  # 413s that name the limit hit
    app.json = http.PortalJSONProvider(app)  # JSON nested too deeply is a 400, not a RecursionError
    if settings.trusted_proxies:
        # The client's address (rate limit, audit log) and scheme (Secure cookie) from the trusted proxies.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies)  # type: ignore[method-assign]
    app.url_map.converters["int"] = BoundedInt  # ids past the database's integer range are 404s, not 500s
    app.config.update(
        SECRET_KEY=settings.secret_key,
        MAX_CONTENT_LENGTH=settings.max_upload_mb * 1024 * 1024,
        # A dropped folder can hold thousands of files; each is one multipart part.
        MAX_FORM_PARTS=100_000,
        MAX_FORM_MEMORY_SIZE=http.MAX_FORM_FIELD_BYTES,  # per text field; files are limited by the settings
        WTF_CSRF_TIME_LIMIT=None,
    )
    extensions.init_app(app, settings)
    auth.init_app(app)  # the login guard runs before the CSRF check: anonymous requests get 401/redirect
    extensions.csrf.init_app(app)
    app.before_request(http.refuse_nul_characters)  # after the login guard: anonymous requests get 401 first
    errors.init_app(app)
    presenters.register_filters(app)  # one way of writing percentages and labels
    for blueprint in (study_pages.bp, review.bp, model_pages.bp, api.bp, health.bp, admin.bp, account.bp):
        app.register_blueprint(blueprint)
    # CSRF is checked by portal.auth's guard for every cookie-authenticated write; tokens need none.
    return app

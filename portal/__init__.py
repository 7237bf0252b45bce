"""The web portal: upload study batches, follow their progress, review flagged cases.

The portal is light: it imports :mod:`core` services only, never :mod:`worker`, :mod:`core.ml` or
torch. Work reaches the GPU workers as Celery task names with ids (:func:`core.queue.enqueue_images`).
"""

from __future__ import annotations

from flask import Flask

from core.config import Settings, get_settings


def create_app(settings: Settings | None = None) -> Flask:
    """Build a portal app for ``settings`` (default: read from the ``TRIAGE_*`` environment)."""
    from portal import api, errors, extensions, health, models, review, studies

    settings = settings or get_settings()
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=settings.secret_key,
        MAX_CONTENT_LENGTH=settings.max_upload_mb * 1024 * 1024,
        # A dropped folder can hold thousands of files; each is one multipart part.
        MAX_FORM_PARTS=100_000,
        WTF_CSRF_TIME_LIMIT=None,
    )
    extensions.init_app(app, settings)
    errors.init_app(app)
    for blueprint in (studies.bp, review.bp, models.bp, api.bp, health.bp):
        app.register_blueprint(blueprint)
    extensions.csrf.exempt(api.bp)
    extensions.csrf.exempt(health.bp)
    return app

"""The model registry page: every registered version and which one is in production."""

from __future__ import annotations

from flask import Blueprint, render_template

from core import registry
from portal import extensions

bp = Blueprint("models", __name__)


@bp.get("/models")
def list_models():  # type: ignore[no-untyped-def]
    """List registered model versions with their labels, threshold and metrics."""
    return render_template("models.html", versions=registry.list_versions(extensions.db_session()))

"""Liveness check for load balancers and compose."""

from __future__ import annotations

from flask import Blueprint, jsonify
from sqlalchemy import text

from portal.extensions import db_session

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    """Report that the portal is up and its database answers."""
    db_session().execute(text("SELECT 1"))
    return jsonify(status="ok")

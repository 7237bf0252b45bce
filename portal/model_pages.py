"""The model registry page: versions, metrics, the trainer's plots, review agreement; promote (admin)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, abort, flash, redirect, render_template, send_file, url_for

from core import registry
from core.models import ModelVersion
from core.reviewing import audit_estimate, version_stats
from portal import extensions, presenters
from portal.auth import record, require
from portal.drift import drift_views

bp = Blueprint("models", __name__)

PLOT_SUFFIX = ".png"


def plot_files(version: ModelVersion) -> dict[str, Path]:
    """The trainer's PNG plots of a version, by file name.

    Looked up in ``extra["plots"]`` (a list of paths) when the trainer recorded one, else as the PNG
    files of ``extra["run_dir"]``. Only existing ``.png`` files are offered; names never come from a
    request, they are matched against this list.
    """
    extra = version.extra or {}
    candidates: list[Path] = []
    plots = extra.get("plots")
    if isinstance(plots, (list, tuple)):
        candidates = [Path(str(p)) for p in plots]
    elif isinstance(plots, dict):
        candidates = [Path(str(p)) for p in plots.values()]
    elif isinstance(extra.get("run_dir"), str):
        run_dir = Path(extra["run_dir"])
        if run_dir.is_dir():
            candidates = sorted(run_dir.glob("*" + PLOT_SUFFIX))
    return {path.name: path for path in candidates if path.suffix.lower() == PLOT_SUFFIX and path.is_file()}


@bp.get("/models")
@require("view")
def list_models() -> Any:
    """Versions with labels, threshold, metrics, plots, agreement with reviewers, flag rate and drift."""
    session = extensions.db_session()
    versions = registry.list_versions(session)
    stats = {version.id: version_stats(session, version) for version in versions}
    plots = {version.id: sorted(plot_files(version)) for version in versions}
    trust = {version.id: presenters.model_trust(version, audit_estimate(session, version.id)) for version in versions}
    drift = drift_views(session, versions, extensions.settings().drift_psi)
    metrics = {version.id: presenters.metrics_sections(version.metrics, list(version.labels)) for version in versions}
    return render_template("models.html", versions=versions, stats=stats, plots=plots, drift=drift, trust=trust,
                           metrics=metrics)


@bp.get("/models/<int:version_id>/plots/<name>")
@require("view")
def plot(version_id: int, name: str) -> Any:
    """One of the trainer's plots of a version (only files the version lists)."""
    version = extensions.db_session().get(ModelVersion, version_id)
    if version is None:
        abort(404, f"Model version #{version_id} not found.")
    path = plot_files(version).get(name)
    if path is None:
        abort(404, f"Model version #{version_id} has no plot {name!r}.")
    return send_file(path, mimetype="image/png", max_age=3600)


@bp.post("/models/<int:version_id>/promote")
@require("promote")
def promote(version_id: int) -> Any:
    """Make a version the production model (admin only; audited)."""
    session = extensions.db_session()
    try:
        version = registry.promote(session, version_id)
    except registry.RegistryError as exc:
        session.rollback()
        abort(404, str(exc))
    record("promote", "model_version", version.id, {"name": version.name})
    session.commit()
    flash(f"{version.display_name} is now the production model; new studies use it.", "info")
    return redirect(url_for("models.list_models"), code=303)

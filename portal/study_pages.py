"""Pages for people: the studies list with the upload form, one study's progress and results, exports, re-runs."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, abort, flash, jsonify, redirect, render_template, request, send_file, url_for
from flask_login import current_user
from sqlalchemy import select

from core import registry
from core.artifacts import full_depth_path, preview_png
from core.config import Settings
from core.imaging import ImageDecodeError
from core.dicom_report import ReportUnavailable, report_filename, structured_report
from core.models import Image, ModelVersion, Prediction, Study, StudyStatus
from core.queue import enqueue_heatmap, enqueue_images
from core.reruns import comparison, rerun_study
from core.reviewing import case_reason, count_flagged_cases
from core.storage import heatmap_store, image_store
from core.studies import study_counts, study_prediction, suspected_fracture_counts
from portal import extensions, presenters
from portal.auth import may_see, record, require, visible_studies
from portal.errors import wants_json
from portal.http import int_param
from portal.uploads import UploadError, collect_files, require_production_model, submit_studies

bp = Blueprint("studies", __name__)

MAX_LISTED = 200
SNIFF_BYTES = 132
# (magic bytes at offset 0, mimetype shown inline); anything else is downloaded, never rendered.
INLINE_TYPES = (
    (b"\xff\xd8\xff", "image/jpeg", ".jpg"),
    (b"\x89PNG\r\n\x1a\n", "image/png", ".png"),
    (b"BM", "image/bmp", ".bmp"),
)
CSV_FIELDS = ("image_id", "filename", "sha256", "status", "error", "label", "confidence", "flagged", "flag_reason",
              "model_version_id", "review_label", "reviewer", "reviewed_at", "study_instance_uid", "series_instance_uid",
              "sop_instance_uid", "sop_class_uid", "modality", "body_part")


def _render_index(error: str | None = None, status: int = 200) -> Any:
    session = extensions.db_session()
    query = select(Study).order_by(Study.id.desc()).limit(MAX_LISTED)
    if (visible := visible_studies()) is not None:
        query = query.where(visible)
    studies = list(session.scalars(query))
    rows = [(study, study_counts(session, study.id)) for study in studies]
    suspected = suspected_fracture_counts(session, studies)
    return render_template("studies.html", rows=rows, suspected=suspected, error=error), status


def get_study(study_id: int) -> Study:
    """The study with ``study_id`` or a 404 (also for another group's study)."""
    study = extensions.db_session().get(Study, study_id)
    if study is None or not may_see(study):
        abort(404, f"Study #{study_id} not found.")
    return study


@bp.get("/")
@require("view")
def index() -> Any:
    """List studies (with live progress) and offer the upload form."""
    return _render_index()


@bp.post("/studies")
@require("upload")
def upload() -> Any:
    """Create a study from the upload form and go to its page (the page's script asks for JSON: where to go, or the error)."""
    session, settings = extensions.db_session(), extensions.settings()
    try:
        version = require_production_model(session)
        files = collect_files(request.files.getlist("files"), request.files.get("archive"),
                              settings.max_upload_mb * 1024 * 1024, settings.max_file_mb * 1024 * 1024)
        created = submit_studies(session, settings, extensions.celery_app(), request.form.get("name", ""), files, version,
                                 created_by_id=current_user.id)
    except UploadError as exc:
        session.rollback()
        if wants_json():
            return jsonify(error=exc.for_people), exc.status
        return _render_index(error=exc.for_people, status=exc.status)
    for submitted in created:
        failed = len(submitted.images) - len(submitted.queued_ids)
        flash(f"Study #{submitted.study.id} created: {len(submitted.images)} files, {len(submitted.queued_ids)} queued, "
              f"{failed} refused.", "info")
    if len(created) > 1:
        flash(f"The upload held {len(created)} studies (DICOM files are grouped by study); this is the first.", "info")
    target = url_for("studies.study_page", study_id=created[0].study.id)
    if wants_json():
        return jsonify(redirect=target, studies=[submitted.study.id for submitted in created]), 201
    return redirect(target, code=303)


def result_row(image: Image, study: Study) -> dict[str, Any]:
    """One image of the study page: its result plus what people read (label in words, percent, reason in words)."""
    row = presenters.image_result(image, study.model_version_id)
    prediction = study_prediction(image, study.model_version_id)
    reason = case_reason(prediction) if prediction is not None else None
    review = row["review"]
    row.update({
        "label_name": presenters.label_name(row["label"]),
        "confidence_text": presenters.percent(row["confidence"]) if row["confidence"] is not None else "",
        "reason": reason,
        "reason_text": presenters.reason_words(prediction, study.model_version.threshold, short=True)
        if prediction is not None and reason else "",
        "review_text": f"reviewed: {presenters.label_name(review['label'])} ({review['reviewer']})" if review else "",
        # Every classified image can be opened and reviewed: flagged and audit cases, or any other as a spot check.
        "case_url": url_for("review.case", image_id=image.id, study=study.id) if row["status"] == "done" else None,
    })
    return row


@bp.get("/studies/<int:study_id>")
@require("view")
def study_page(study_id: int) -> Any:
    """Show a study's live progress and, as they arrive, its results (sortable, filterable)."""
    session = extensions.db_session()
    study = get_study(study_id)
    results = [result_row(image, study) for image in presenters.study_images(session, study)]
    record("view", "study", study.id)
    session.commit()
    versions = [v for v in registry.list_versions(session) if v.id != study.model_version_id]
    waiting = count_flagged_cases(session, study_id=study.id, visible=visible_studies()) if current_user.can("review") else 0
    return render_template(
        "study.html", study=study, counts=study_counts(session, study.id), results=results,
        compare=comparison(session, study), versions=versions, waiting=waiting,
    )


ROW_FIELDS = ("id", "status", "error", "label", "label_name", "confidence", "confidence_text", "flagged", "reason",
              "reason_text", "review_text", "case_url")


@bp.get("/studies/<int:study_id>/rows.json")
@require("view")
def study_rows(study_id: int) -> Any:
    """Each image's own status and result, for the study page to update its rows live (the page view is audited)."""
    session = extensions.db_session()
    study = get_study(study_id)
    rows = [{key: row[key] for key in ROW_FIELDS} for row in (result_row(image, study) for image in presenters.study_images(session, study))]
    return jsonify(status=study.status.value, counts=study_counts(session, study.id), images=rows)


def export_rows(study: Study) -> list[dict[str, Any]]:
    """One flat row per image of ``study`` (for CSV and JSON exports)."""
    rows = []
    for image in presenters.study_images(extensions.db_session(), study):
        result = presenters.image_result(image, study.model_version_id)
        review = result["review"] or {}
        rows.append({
            "image_id": image.id, "filename": image.filename, "sha256": image.sha256, "status": result["status"],
            "error": result["error"], "label": result["label"], "confidence": result["confidence"],
            "flagged": result["flagged"], "flag_reason": result["flag_reason"],
            "model_version_id": result["model_version_id"], "probabilities": result["probabilities"],
            "review_label": review.get("label"), "reviewer": review.get("reviewer"), "reviewed_at": review.get("created_at"),
            "study_instance_uid": image.study_instance_uid, "series_instance_uid": image.series_instance_uid,
            "sop_instance_uid": image.sop_instance_uid, "sop_class_uid": image.sop_class_uid,
            "modality": image.modality, "body_part": image.body_part,
        })
    return rows


def _csv_safe(value: Any) -> Any:
    """Neutralise spreadsheet formulas in user-supplied text (a file name like ``=HYPERLINK(...)``)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def export_response(study: Study, fmt: str) -> Response:
    """The study's results as a CSV or JSON download (audited)."""
    rows = export_rows(study)
    record("export", "study", study.id, {"format": fmt, "rows": len(rows)})
    extensions.db_session().commit()
    if fmt == "json":
        body = json.dumps({"study": presenters.study_dict(extensions.db_session(), study), "images": rows}, indent=2)
        return Response(body, mimetype="application/json",
                        headers={"Content-Disposition": f'attachment; filename="study-{study.id}.json"'})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*CSV_FIELDS, "probabilities"], extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_safe(value) for key, value in row.items()} | {"probabilities": json.dumps(row["probabilities"])})
    return Response(buffer.getvalue(), mimetype="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="study-{study.id}.csv"'})


@bp.get("/studies/<int:study_id>/export.<fmt>")
@require("export")
def export(study_id: int, fmt: str) -> Any:
    """Download a study's results as CSV or JSON."""
    if fmt not in ("csv", "json"):
        abort(404, "Export formats: csv, json.")
    return export_response(get_study(study_id), fmt)


def report_response(study: Study) -> Response:
    """The study's DICOM Structured Report as a download (audited as an export); 409 when there is none yet."""
    session = extensions.db_session()
    if study.status != StudyStatus.DONE:
        abort(409, f"Study #{study.id} is {study.status.value}: the structured report is available once every image is finished.")
    try:
        data = structured_report(session, extensions.settings(), study)
    except ReportUnavailable as exc:
        abort(409, str(exc))
    record("export", "study", study.id, {"format": "dicom-sr", "bytes": len(data)})
    session.commit()
    return Response(data, mimetype="application/dicom",
                    headers={"Content-Disposition": f'attachment; filename="{report_filename(study)}"'})


@bp.get("/studies/<int:study_id>/sr.dcm")
@require("export")
def report(study_id: int) -> Any:
    """Download a study's results as a DICOM Structured Report."""
    return report_response(get_study(study_id))


@bp.post("/studies/<int:study_id>/rerun")
@require("rerun")
def rerun(study_id: int) -> Any:
    """Classify a study's stored images again with another model version (a new, linked study)."""
    session, settings = extensions.db_session(), extensions.settings()
    study = get_study(study_id)
    version_id = int_param("model_version_id", source=request.form)
    version = session.get(ModelVersion, version_id) if version_id is not None else None
    if version is None:
        abort(400, "Choose a registered model version.")
    try:
        created = rerun_study(session, study, version, created_by_id=current_user.id)
    except ValueError as exc:
        session.rollback()
        abort(409, str(exc))
    record("rerun", "study", created.study.id, {"of": study.id, "model_version_id": version.id})
    session.commit()
    enqueue_images(extensions.celery_app(), created.study.id, created.queued_ids, settings.chunk_size)
    flash(f"Re-running {len(created.queued_ids)} images with {version.display_name}.", "info")
    return redirect(url_for("studies.study_page", study_id=created.study.id), code=303)


def _sniff(head: bytes) -> tuple[str, str, bool]:
    for magic, mimetype, suffix in INLINE_TYPES:
        if head.startswith(magic):
            return mimetype, suffix, False
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "application/dicom", ".dcm", True
    return "application/octet-stream", ".bin", True


@bp.get("/images/<int:image_id>/file")
@require("view")
def image_file(image_id: int) -> Any:
    """Serve an image's stored bytes by image id, with a type sniffed from its content."""
    image = extensions.db_session().get(Image, image_id)
    if image is None or not may_see(image.study):
        abort(404, f"Image #{image_id} not found.")
    if not image.storage_key:
        abort(404, f"Image #{image_id} has no stored file: the upload was refused ({image.error}).")
    path = image_store(extensions.settings()).path_for_key(image.storage_key)
    if not path.is_file():
        abort(404, f"The stored file of image #{image_id} is missing from the image store.")
    with open(path, "rb") as handle:
        mimetype, suffix, attachment = _sniff(handle.read(SNIFF_BYTES))
    return send_file(
        path, mimetype=mimetype, as_attachment=attachment, download_name=f"image-{image.id}{suffix}", max_age=3600
    )


def _derived_image(image_id: int, make: Callable[[Settings, str, bytes], Path]) -> Any:
    """Serve a PNG derived from a stored image with ``make`` (made once and kept); 404 for another group's image."""
    image = extensions.db_session().get(Image, image_id)
    if image is None or not may_see(image.study) or not image.storage_key or not image.sha256:
        abort(404, f"Image #{image_id} has no stored file.")
    settings = extensions.settings()
    try:
        path = make(settings, image.sha256, image_store(settings).read(image.storage_key))
    except (ImageDecodeError, FileNotFoundError) as exc:
        abort(404, f"Image #{image_id} cannot be shown: {exc}")
    return send_file(path, mimetype="image/png", max_age=3600)


@bp.get("/images/<int:image_id>/preview.png")
@require("view")
def image_preview(image_id: int) -> Any:
    """Serve a PNG rendering of a stored image (DICOM as the model sees it), made once and kept."""
    return _derived_image(image_id, preview_png)


@bp.get("/images/<int:image_id>/pixels.png")
@require("view")
def image_pixels(image_id: int) -> Any:
    """Serve an image's values at full depth for the viewer's windowing (DICOM: 16-bit after modality rescale)."""
    return _derived_image(image_id, full_depth_path)


def _prediction(prediction_id: int) -> Prediction:
    """The prediction, or 404 when unknown or another group's."""
    prediction = extensions.db_session().get(Prediction, prediction_id)
    if prediction is None or not may_see(prediction.image.study):
        abort(404, f"Prediction #{prediction_id} not found.")
    return prediction


@bp.get("/predictions/<int:prediction_id>/heatmap.png")
@require("view")
def heatmap(prediction_id: int) -> Any:
    """Serve the stored Grad-CAM heat map of a prediction (computed once by the worker)."""
    prediction = _prediction(prediction_id)
    if not prediction.heatmap_key:
        abort(404, f"Prediction #{prediction_id} has no heat map.")
    path = heatmap_store(extensions.settings()).path_for_key(prediction.heatmap_key)
    if not path.is_file():
        abort(404, "The heat map file is missing from the store.")
    return send_file(path, mimetype="image/png", max_age=3600)


@bp.get("/predictions/<int:prediction_id>/heatmap.json")
@require("view")
def heatmap_status(prediction_id: int) -> Any:
    """Whether a prediction's heat map is there (``ready`` with its url), being made (``pending``) or cannot be (``failed``)."""
    return jsonify(presenters.heatmap_state(_prediction(prediction_id)))


@bp.post("/predictions/<int:prediction_id>/heatmap")
@require("review")
def request_heatmap(prediction_id: int) -> Any:
    """Ask a worker for a prediction's heat map (audited); the viewer polls the status until it is there."""
    session = extensions.db_session()
    prediction = _prediction(prediction_id)
    if not prediction.heatmap_key:
        prediction.heatmap_error = None
        record("heatmap_request", "prediction", prediction.id)
        session.commit()
        enqueue_heatmap(extensions.celery_app(), prediction.id)
    state = presenters.heatmap_state(prediction, requested=True)
    return jsonify(state), 200 if state["status"] == "ready" else 202

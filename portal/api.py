"""JSON API for scripts and other systems (no CSRF: clients send no cookies to trust)."""

from __future__ import annotations

from flask import Blueprint, abort, jsonify, request
from sqlalchemy import select

from core import registry
from core.models import Image, ImageStatus, Study
from core.studies import record_review, review_queue
from portal import extensions, presenters
from portal.uploads import UploadError, collect_files, require_production_model, submit_study

bp = Blueprint("api", __name__, url_prefix="/api")

MAX_LIST = 500


@bp.errorhandler(UploadError)
def _upload_error(exc: UploadError):  # type: ignore[no-untyped-def]
    return jsonify(error=exc.message), exc.status


def _get_study(study_id: int) -> Study:
    study = extensions.db_session().get(Study, study_id)
    if study is None:
        abort(404, f"study #{study_id} not found")
    return study


@bp.post("/studies")
def create_study():  # type: ignore[no-untyped-def]
    """Create a study from multipart `files` and/or an `archive` zip and queue its images."""
    session, settings = extensions.db_session(), extensions.settings()
    version = require_production_model(session)
    files = collect_files(request.files.getlist("files"), request.files.get("archive"), settings.max_upload_mb * 1024 * 1024)
    submitted = submit_study(session, settings, extensions.celery_app(), request.form.get("name", ""), files, version)
    body = presenters.study_dict(session, submitted.study)
    body["tasks"] = submitted.tasks
    body["files"] = [
        {"id": image.id, "filename": image.filename, "status": image.status.value, "error": image.error}
        for image in submitted.images
    ]
    return jsonify(body), 201, {"Location": body["status_url"]}


@bp.get("/studies")
def list_studies():  # type: ignore[no-untyped-def]
    """The newest studies with their status and counts."""
    session = extensions.db_session()
    studies = session.scalars(select(Study).order_by(Study.id.desc()).limit(MAX_LIST))
    return jsonify(studies=[presenters.study_dict(session, study) for study in studies])


@bp.get("/studies/<int:study_id>")
def study_status(study_id: int):  # type: ignore[no-untyped-def]
    """One study's status and image counts (polled by the study page)."""
    return jsonify(presenters.study_dict(extensions.db_session(), _get_study(study_id)))


@bp.get("/studies/<int:study_id>/results")
def study_results(study_id: int):  # type: ignore[no-untyped-def]
    """Every image of a study with its status, error or prediction."""
    session = extensions.db_session()
    study = _get_study(study_id)
    images = presenters.study_images(session, study)
    body = presenters.study_dict(session, study)
    body["images"] = [presenters.image_result(image, study.model_version_id) for image in images]
    return jsonify(body)


@bp.get("/review-queue")
def review_cases():  # type: ignore[no-untyped-def]
    """Flagged, unreviewed images, oldest first (optional `study` filter)."""
    study_id = request.args.get("study", type=int)
    cases = review_queue(extensions.db_session(), study_id=study_id)
    return jsonify(count=len(cases), cases=[presenters.review_case(image, prediction) for image, prediction in cases[:MAX_LIST]])


@bp.post("/images/<int:image_id>/review")
def review_image(image_id: int):  # type: ignore[no-untyped-def]
    """Record a reviewer's label for an image: JSON {label, reviewer, note}."""
    session = extensions.db_session()
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        abort(400, "send a JSON object: {\"label\": ..., \"reviewer\": ..., \"note\": ...}")
    image = session.get(Image, image_id)
    if image is None:
        abort(404, f"image #{image_id} not found")
    label, reviewer, note = payload.get("label"), payload.get("reviewer"), payload.get("note")
    if not isinstance(label, str) or not label:
        abort(400, "label is required")
    if not isinstance(reviewer, str) or not reviewer.strip():
        abort(400, "reviewer is required (the name of the person reviewing)")
    if note is not None and not isinstance(note, str):
        abort(400, "note must be a string")
    if image.status == ImageStatus.FAILED:
        abort(409, f"image #{image_id} failed ({image.error}); there is nothing to review")
    try:
        review = record_review(session, image, label, reviewer.strip(), note)
    except ValueError as exc:
        abort(400, str(exc))
    session.commit()
    return jsonify(
        id=review.id, image_id=image.id, label=review.label, reviewer=review.reviewer_name, note=review.note,
        created_at=presenters.iso(review.created_at),
    ), 201


@bp.get("/models")
def list_models():  # type: ignore[no-untyped-def]
    """Registered model versions, newest first, with which one is in production."""
    return jsonify(models=[presenters.model_dict(version) for version in registry.list_versions(extensions.db_session())])

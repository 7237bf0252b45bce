"""JSON API for scripts and other systems, described by the OpenAPI document at /api/openapi.json.

Clients authenticate with ``Authorization: Bearer <token>``; the portal's own pages may call it with
their session cookie, and then writes need the CSRF token (checked in :mod:`portal.auth`).
"""

from __future__ import annotations

from flask import Blueprint, abort, jsonify, request
from flask_login import current_user
from sqlalchemy import select

from core import registry
from core.models import Image, ImageStatus, Study
from core.reviewing import ORDERS, count_flagged_cases, flagged_cases, humanize_seconds, waiting_seconds
from core.studies import record_review, suspected_fracture_counts
from portal import extensions, openapi, presenters
from portal.auth import may_see, record, require, visible_studies
from portal.http import int_param
from portal.study_pages import export_response, report_response
from portal.uploads import SubmittedStudy, UploadError, collect_files, require_production_model, submit_studies

bp = Blueprint("api", __name__, url_prefix="/api")

MAX_LIST = 500
#: Longest ``reason`` filter of the review queue (as the OpenAPI document says).
MAX_REASON_LENGTH = 200


@bp.before_request
def _refuse_unknown_query_parameters():  # type: ignore[no-untyped-def]
    """A query parameter the operation does not take, or one given twice, is a 400 (never silently ignored)."""
    if request.url_rule is None or request.method == "OPTIONS":
        return None
    allowed = openapi.query_parameters(request.url_rule.rule, request.method)
    if allowed is None:  # an operation the document does not describe: its own test says so
        return None
    unknown = sorted(set(request.args) - allowed)
    if unknown:
        takes = f"it takes {', '.join(sorted(allowed))}" if allowed else "it takes none"
        abort(400, f"unknown query parameter {', '.join(map(repr, unknown))} for {request.method} {request.path}: {takes}")
    repeated = sorted(name for name in allowed if len(request.args.getlist(name)) > 1)
    if repeated:
        abort(400, f"query parameter {', '.join(map(repr, repeated))} given more than once")
    return None


@bp.errorhandler(UploadError)
def _upload_error(exc: UploadError):  # type: ignore[no-untyped-def]
    return jsonify(error=exc.message), exc.status


def _get_study(study_id: int) -> Study:
    study = extensions.db_session().get(Study, study_id) if 0 < study_id <= openapi.MAX_ID else None
    if study is None or not may_see(study):  # another group's study is not found
        abort(404, f"study #{study_id} not found")
    return study


@bp.get("/openapi.json")
@require("view")
def openapi_document():  # type: ignore[no-untyped-def]
    """The OpenAPI 3 description of this API."""
    return jsonify(openapi.document())


@bp.post("/studies")
@require("upload")
def create_study():  # type: ignore[no-untyped-def]
    """Create studies from multipart `files` and/or an `archive` zip (one per DICOM study) and queue their images.

    The top-level fields describe the first study of the upload; `studies` lists every study created.
    """
    session, settings = extensions.db_session(), extensions.settings()
    version = require_production_model(session)
    files = collect_files(request.files.getlist("files"), request.files.get("archive"),
                          settings.max_upload_mb * 1024 * 1024, settings.max_file_mb * 1024 * 1024)
    submitted = submit_studies(session, settings, extensions.celery_app(), request.form.get("name", ""), files, version,
                               created_by_id=current_user.id)
    studies = [_created_study(session, item) for item in submitted]
    body = {**studies[0], "studies": studies}
    return jsonify(body), 201, {"Location": body["status_url"]}


def _created_study(session, item: SubmittedStudy) -> dict:  # type: ignore[no-untyped-def]
    body = presenters.study_dict(session, item.study)
    body["tasks"] = item.tasks
    body["files"] = [
        {"id": image.id, "filename": image.filename, "status": image.status.value, "error": image.error}
        for image in item.images
    ]
    return body


@bp.get("/studies")
@require("view")
def list_studies():  # type: ignore[no-untyped-def]
    """The newest studies with their status and counts."""
    session = extensions.db_session()
    query = select(Study).order_by(Study.id.desc()).limit(MAX_LIST)
    if (visible := visible_studies()) is not None:
        query = query.where(visible)
    studies = list(session.scalars(query))
    suspected = suspected_fracture_counts(session, studies)
    return jsonify(studies=[presenters.study_dict(session, study, suspected[study.id]) for study in studies])


@bp.get("/studies/<int:study_id>")
@require("view")
def study_status(study_id: int):  # type: ignore[no-untyped-def]
    """One study's status and image counts (polled by the study page)."""
    return jsonify(presenters.study_dict(extensions.db_session(), _get_study(study_id)))


@bp.get("/studies/<int:study_id>/results")
@require("view")
def study_results(study_id: int):  # type: ignore[no-untyped-def]
    """Every image of a study with its status, error or prediction."""
    session = extensions.db_session()
    study = _get_study(study_id)
    record("view", "study", study.id, {"via": "api"})
    session.commit()
    images = presenters.study_images(session, study)
    body = presenters.study_dict(session, study)
    body["images"] = [presenters.image_result(image, study.model_version_id) for image in images]
    return jsonify(body)


@bp.get("/studies/<int:study_id>/export")
@require("export")
def export_study(study_id: int):  # type: ignore[no-untyped-def]
    """Download a study's results: `format=csv` or `format=json` (default)."""
    fmt = request.args.get("format", "json")
    if fmt not in ("csv", "json"):
        abort(400, "format must be csv or json")
    return export_response(_get_study(study_id), fmt)


@bp.get("/studies/<int:study_id>/sr.dcm")
@require("export")
def study_report(study_id: int):  # type: ignore[no-untyped-def]
    """Download the study's results as a DICOM Structured Report (for a PACS; not a diagnosis)."""
    return report_response(_get_study(study_id))


@bp.get("/review-queue")
@require("review")
def review_cases():  # type: ignore[no-untyped-def]
    """Unreviewed cases (flagged and audit samples), `order=oldest` first (default) or `suspicious` first.

    Optional filters: `study`, and `reason` (`unsure`, `unfamiliar`, `audit`, or a flag-reason category).
    """
    session = extensions.db_session()
    study_id = int_param("study", source=request.args)
    reason = (request.args.get("reason") or "").strip() or None
    if reason is not None and len(reason) > MAX_REASON_LENGTH:
        abort(400, f"reason must be at most {MAX_REASON_LENGTH} characters: unsure, unfamiliar, audit or a flag-reason category")
    order = request.args.get("order") or "oldest"
    if order not in ORDERS:
        abort(400, f"order must be one of: {', '.join(ORDERS)} (oldest: longest waiting first; suspicious: highest fracture probability first)")
    cases = []
    visible = visible_studies()
    for image, prediction in flagged_cases(session, study_id=study_id, reason=reason, limit=MAX_LIST, order=order,
                                           visible=visible):
        case = presenters.review_case(image, prediction)
        seconds = waiting_seconds(prediction.created_at)
        case["waiting_seconds"] = seconds
        case["waiting"] = humanize_seconds(seconds)
        cases.append(case)
    return jsonify(count=count_flagged_cases(session, study_id=study_id, reason=reason, visible=visible), cases=cases)


@bp.post("/images/<int:image_id>/review")
@require("review")
def review_image(image_id: int):  # type: ignore[no-untyped-def]
    """Record the signed-in reviewer's label for an image: JSON {label, note}."""
    session = extensions.db_session()
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        abort(400, "send a JSON object: {\"label\": ..., \"note\": ...}")
    image = session.get(Image, image_id) if 0 < image_id <= openapi.MAX_ID else None
    if image is None or not may_see(image.study):
        abort(404, f"image #{image_id} not found")
    label, note = payload.get("label"), payload.get("note")
    if not isinstance(label, str) or not label:
        abort(400, "label is required")
    if note is not None and not isinstance(note, str):
        abort(400, "note must be a string")
    if image.status == ImageStatus.FAILED:
        abort(409, f"image #{image_id} failed ({image.error}); there is nothing to review")
    if image.status != ImageStatus.DONE:
        abort(409, f"image #{image_id} is {image.status.value}; it can be reviewed once classified")
    rereview = bool(image.reviews)
    if rereview and not current_user.can("rereview"):
        abort(409, f"image #{image_id} was already reviewed; only an admin can review it again")
    try:
        review = record_review(session, image, label, current_user.username, (note or "").strip()[:2000] or None,
                               reviewer_id=current_user.id)
    except ValueError as exc:
        abort(400, str(exc))
    record("review", "image", image.id, {"label": review.label, "rereview": rereview, "via": "api"})
    session.commit()
    return jsonify(
        id=review.id, image_id=image.id, label=review.label, reviewer=review.reviewer_name, note=review.note,
        created_at=presenters.iso(review.created_at),
    ), 201


@bp.get("/models")
@require("view")
def list_models():  # type: ignore[no-untyped-def]
    """Registered model versions, newest first, with which one is in production."""
    return jsonify(models=[presenters.model_dict(version) for version in registry.list_versions(extensions.db_session())])

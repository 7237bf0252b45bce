"""Pages for people: the studies list with the upload form, one study's progress and results."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, send_file, url_for
from sqlalchemy import select

from core.models import Image, Study
from core.studies import image_store, study_counts
from portal import extensions, presenters
from portal.uploads import UploadError, collect_files, require_production_model, submit_study

bp = Blueprint("studies", __name__)

MAX_LISTED = 200
SNIFF_BYTES = 132
# (magic bytes at offset 0, mimetype shown inline); anything else is downloaded, never rendered.
INLINE_TYPES = (
    (b"\xff\xd8\xff", "image/jpeg", ".jpg"),
    (b"\x89PNG\r\n\x1a\n", "image/png", ".png"),
    (b"BM", "image/bmp", ".bmp"),
)


def _render_index(error: str | None = None, status: int = 200):  # type: ignore[no-untyped-def]
    session = extensions.db_session()
    studies = list(session.scalars(select(Study).order_by(Study.id.desc()).limit(MAX_LISTED)))
    rows = [(study, study_counts(session, study.id)) for study in studies]
    return render_template("studies.html", rows=rows, error=error), status


@bp.get("/")
def index():  # type: ignore[no-untyped-def]
    """List studies and offer the upload form."""
    return _render_index()


@bp.post("/studies")
def upload():  # type: ignore[no-untyped-def]
    """Create a study from the upload form and go to its page."""
    session, settings = extensions.db_session(), extensions.settings()
    try:
        version = require_production_model(session)
        files = collect_files(request.files.getlist("files"), request.files.get("archive"), settings.max_upload_mb * 1024 * 1024)
        submitted = submit_study(session, settings, extensions.celery_app(), request.form.get("name", ""), files, version)
    except UploadError as exc:
        session.rollback()
        return _render_index(error=exc.message, status=exc.status)
    failed = len(submitted.images) - len(submitted.queued_ids)
    flash(f"Study created: {len(submitted.images)} files, {len(submitted.queued_ids)} queued, {failed} refused.", "info")
    return redirect(url_for("studies.study_page", study_id=submitted.study.id), code=303)


@bp.get("/studies/<int:study_id>")
def study_page(study_id: int):  # type: ignore[no-untyped-def]
    """Show a study's live progress and, as they arrive, its results."""
    session = extensions.db_session()
    study = session.get(Study, study_id)
    if study is None:
        abort(404, f"Study #{study_id} not found.")
    results = [presenters.image_result(image, study.model_version_id) for image in presenters.study_images(session, study)]
    return render_template("study.html", study=study, counts=study_counts(session, study.id), results=results)


def _sniff(head: bytes) -> tuple[str, str, bool]:
    for magic, mimetype, suffix in INLINE_TYPES:
        if head.startswith(magic):
            return mimetype, suffix, False
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "application/dicom", ".dcm", True
    return "application/octet-stream", ".bin", True


@bp.get("/images/<int:image_id>/file")
def image_file(image_id: int):  # type: ignore[no-untyped-def]
    """Serve an image's stored bytes by image id, with a type sniffed from its content."""
    image = extensions.db_session().get(Image, image_id)
    if image is None:
        abort(404, f"Image #{image_id} not found.")
    if not image.storage_key:
        abort(404, f"Image #{image_id} has no stored file: the upload was refused ({image.error}).")
    path = image_store(extensions.settings()).path_for_key(image.storage_key)
    if not path.is_file():
        abort(404, f"The stored file of image #{image_id} is missing from the image store.")
    with open(path, "rb") as handle:
        mimetype, suffix, attachment = _sniff(handle.read(SNIFF_BYTES))
    return send_file(
        path, mimetype=mimetype, as_attachment=attachment, download_name=f"image-{image.id}{suffix}", max_age=86400
    )

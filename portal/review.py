"""The review queue: people label the cases the model flagged as low-confidence."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, session, url_for

from core.models import Image, ImageStatus
from core.studies import record_review, review_queue
from portal import extensions, presenters

bp = Blueprint("review", __name__)

MAX_SHOWN = 50


def _render_queue(study_id: int | None, error: str | None = None, status: int = 200):  # type: ignore[no-untyped-def]
    cases = review_queue(extensions.db_session(), study_id=study_id)
    shown = [presenters.review_case(image, prediction) for image, prediction in cases[:MAX_SHOWN]]
    return (
        render_template(
            "review.html", cases=shown, total=len(cases), study_id=study_id, error=error,
            reviewer=session.get("reviewer", ""),
        ),
        status,
    )


@bp.get("/review")
def queue():  # type: ignore[no-untyped-def]
    """List flagged, unreviewed images, oldest first, each with a review form."""
    return _render_queue(request.args.get("study", type=int))


@bp.post("/review/<int:image_id>")
def submit(image_id: int):  # type: ignore[no-untyped-def]
    """Record a review from the form and go on to the next case."""
    db = extensions.db_session()
    study_id = request.form.get("study", type=int)
    image = db.get(Image, image_id)
    if image is None:
        abort(404, f"Image #{image_id} not found.")
    reviewer = request.form.get("reviewer", "").strip()
    if not reviewer:
        return _render_queue(study_id, error="Enter your name as the reviewer.", status=400)
    if image.status == ImageStatus.FAILED:
        return _render_queue(study_id, error=f"Image #{image_id} failed; there is nothing to review.", status=409)
    before = [case.id for case, _ in review_queue(db, study_id=study_id)]
    try:
        record_review(db, image, request.form.get("label", ""), reviewer, request.form.get("note", "").strip() or None)
    except ValueError as exc:
        db.rollback()
        return _render_queue(study_id, error=str(exc), status=400)
    db.commit()
    session["reviewer"] = reviewer
    flash(f"Review recorded for {image.filename}.", "info")
    following = before[before.index(image_id) + 1 :] if image_id in before else before
    anchor = f"#case-{following[0]}" if following else ""
    return redirect(url_for("review.queue", study=study_id) + anchor, code=303)

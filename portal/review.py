"""Review: the queue of flagged cases and audit samples, oldest or most suspicious first, and a one-key viewer."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user
from sqlalchemy.orm import Session

from core.models import Image, ImageStatus
from core.reviewing import (
    ORDER_OLDEST, ORDERS, REASON_AUDIT, count_flagged_cases, flagged_cases, humanize_seconds, next_case, reason_categories,
    waiting_reasons, waiting_seconds,
)
from core.studies import record_review, study_prediction
from portal import extensions, presenters
from portal.auth import record, require

bp = Blueprint("review", __name__)

MAX_SHOWN = 100


def _filters() -> dict[str, Any]:
    """The queue filters of this request (study id, reason, order), empty and default ones left out.

    A bad ``order`` is a 400.
    """
    values = request.values
    filters: dict[str, Any] = {}
    study = values.get("study", type=int)
    if study:
        filters["study"] = study
    reason = (values.get("reason") or "").strip()[:200]
    if reason:
        filters["reason"] = reason
    order = (values.get("order") or ORDER_OLDEST).strip()
    if order not in ORDERS:
        abort(400, f"order must be one of: {', '.join(ORDERS)}.")
    if order != ORDER_OLDEST:
        filters["order"] = order
    return filters


@bp.get("/review")
@require("review")
def queue() -> Any:
    """Unreviewed flagged cases and audit samples, oldest or most suspicious first, filterable, with waiting time."""
    session = extensions.db_session()
    filters = _filters()
    order = filters.get("order", ORDER_OLDEST)
    cases = flagged_cases(session, study_id=filters.get("study"), reason=filters.get("reason"), limit=MAX_SHOWN, order=order)
    shown = []
    for image, prediction in cases:
        case = presenters.review_case(image, prediction)
        case["waiting"] = humanize_seconds(waiting_seconds(prediction.created_at))
        case["open_url"] = url_for("review.case", image_id=image.id, **filters)
        shown.append(case)
    total = count_flagged_cases(session, study_id=filters.get("study"), reason=filters.get("reason"))
    reason = filters.get("reason")
    audits = count_flagged_cases(session, study_id=filters.get("study"), reason=REASON_AUDIT) if reason in (None, REASON_AUDIT) else 0
    return render_template("review.html", cases=shown, total=total, audits=audits, filters=filters, order=order,
                           reasons=reason_categories(session), kinds=waiting_reasons(session),
                           reason_names=presenters.REASON_NAMES)


def _case_context(session: Session, image: Image) -> dict[str, Any]:
    prediction = study_prediction(image, image.study.model_version_id)
    if prediction is None:
        abort(404, f"Image #{image.id} has no prediction yet.")
    case = presenters.review_case(image, prediction)
    case["waiting"] = humanize_seconds(waiting_seconds(prediction.created_at))
    case["heatmap_url"] = url_for("studies.heatmap", prediction_id=prediction.id) if prediction.heatmap_key else None
    case["width"], case["height"] = image.width, image.height
    case["reviews"] = [
        {"label": r.label, "reviewer": r.reviewer_name, "note": r.note, "created_at": presenters.iso(r.created_at)}
        for r in image.reviews
    ]
    return case


def _classified_image(session: Any, image_id: int) -> Image:
    """The image, or 404 when unknown and 409 when it has no classification to review."""
    image = session.get(Image, image_id)
    if image is None:
        abort(404, f"Image #{image_id} not found.")
    if image.status != ImageStatus.DONE:
        abort(409, f"Image #{image_id} is {image.status.value}; only classified images can be reviewed.")
    return image


@bp.get("/review/<int:image_id>")
@require("review")
def case(image_id: int) -> Any:
    """The viewer: the image large (zoom, pan, window/level), probabilities, heat map, one-key labels."""
    session = extensions.db_session()
    image = _classified_image(session, image_id)
    context = _case_context(session, image)
    record("view", "image", image.id)
    session.commit()
    filters = _filters()
    may_review = not image.reviews or current_user.can("rereview")
    remaining = count_flagged_cases(session, study_id=filters.get("study"), reason=filters.get("reason"))
    return render_template("viewer.html", case=context, filters=filters, may_review=may_review, remaining=remaining)


@bp.post("/review/<int:image_id>")
@require("review")
def submit(image_id: int) -> Any:
    """Record the reviewer's label (and optional note), then open the next case."""
    session = extensions.db_session()
    image = _classified_image(session, image_id)
    if image.reviews and not current_user.can("rereview"):
        abort(409, f"Image #{image_id} was already reviewed; only an admin can review it again.")
    note = (request.form.get("note") or "").strip()[:2000] or None
    rereview = bool(image.reviews)
    try:
        review = record_review(session, image, request.form.get("label", ""), current_user.username, note,
                               reviewer_id=current_user.id)
    except ValueError as exc:
        session.rollback()
        abort(400, str(exc))
    record("review", "image", image.id, {"label": review.label, "rereview": rereview})
    session.commit()
    filters = _filters()
    flash(f"Recorded {review.label} for {image.filename}.", "info")
    following = next_case(session, image.id, study_id=filters.get("study"), reason=filters.get("reason"),
                          order=filters.get("order", ORDER_OLDEST))
    if following is None:
        flash("No more cases waiting" + (" with these filters." if filters else "."), "info")
        return redirect(url_for("review.queue", **filters), code=303)
    return redirect(url_for("review.case", image_id=following.id, **filters), code=303)

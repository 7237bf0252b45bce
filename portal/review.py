"""Review: the worklist of flagged cases and audit samples (sortable, filterable) and the viewer.

The viewer records a label with a number key (in the order the probabilities are shown) or accepts
the model's label with ``A``; no key records anything from a text field or a link. A reviewer may
skip a case (it comes back after the others), go back to the previous case of this sitting, and
undo their own last review within :data:`core.studies.REVIEW_UNDO_SECONDS` (audited). Any
classified image can be opened and reviewed, flagged or not (a spot check).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask import session as browser_session
from flask_login import current_user
from sqlalchemy.orm import Session

from core.models import Image, ImageStatus
from core.reviewing import (
    ORDER_OLDEST, ORDERS, REASON_AUDIT, case_reason, count_flagged_cases, flagged_cases, humanize_seconds, next_case,
    reason_categories, waiting_labels, waiting_reasons, waiting_seconds,
)
from core.studies import REVIEW_UNDO_SECONDS, UndoRefused, last_own_review, record_review, study_prediction, undo_review
from portal import extensions, presenters
from portal.auth import may_see, record, require, visible_studies
from portal.http import int_param

bp = Blueprint("review", __name__)

MAX_SHOWN = 100
#: Browser-session keys: the cases opened in this sitting (for "previous"), and the cases skipped.
TRAIL_KEY, SKIPPED_KEY = "review_trail", "review_skipped"
MAX_TRAIL, MAX_SKIPPED = 30, 200
#: Longest ``label`` filter (model labels are at most 100 characters).
MAX_LABEL_LENGTH = 100
#: Sortable worklist columns: the order each heading asks for (the first is used, the second when already sorted so).
COLUMN_ORDERS = {
    "label": ("label", "label"),
    "fracture": ("suspicious", "least_suspicious"),
    "reason": ("reason", "reason"),
    "study": ("study", "study"),
    "waiting": ("oldest", "newest"),
}
#: The worklist column each order sorts, and its arrow (waiting time: longest first is descending).
ORDER_ARROWS = {
    "oldest": ("waiting", "▼"), "newest": ("waiting", "▲"), "suspicious": ("fracture", "▼"),
    "least_suspicious": ("fracture", "▲"), "label": ("label", "▲"), "reason": ("reason", "▲"), "study": ("study", "▲"),
}
ORDER_NAMES = {
    "oldest": "longest waiting first", "newest": "newest first", "suspicious": "most suspicious (highest fracture probability) first",
    "least_suspicious": "least suspicious first", "label": "by the model's label", "reason": "by reason", "study": "by study",
}


def _filters() -> dict[str, Any]:
    """The worklist filters of this request, empty and default ones left out (they travel from case to case).

    ``study`` (id), ``reason`` (unsure, unfamiliar, audit or a reason category), ``model_label`` (the
    model's label), ``min_fracture`` (lowest fracture probability, percent 0-100), ``waited`` (minutes
    waiting at least) and ``order``. A bad value is a 400.
    """
    values = request.values
    filters: dict[str, Any] = {}
    study = int_param("study")
    if study:
        filters["study"] = study
    reason = (values.get("reason") or "").strip()[:200]
    if reason:
        filters["reason"] = reason
    label = (values.get("model_label") or "").strip()  # not "label": that is the form's chosen label
    if len(label) > MAX_LABEL_LENGTH:
        abort(400, f"model_label must be at most {MAX_LABEL_LENGTH} characters.")
    if label:
        filters["model_label"] = label
    min_fracture = int_param("min_fracture", minimum=0, maximum=100)
    if min_fracture:
        filters["min_fracture"] = min_fracture
    waited = int_param("waited", minimum=0, maximum=10_000_000)
    if waited:
        filters["waited"] = waited
    order = (values.get("order") or ORDER_OLDEST).strip()
    if order not in ORDERS:
        abort(400, f"order must be one of: {', '.join(ORDERS)}.")
    if order != ORDER_OLDEST:
        filters["order"] = order
    return filters


def _query_args(filters: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :mod:`core.reviewing`'s queue functions for ``filters`` (and the reader's groups)."""
    return {
        "study_id": filters.get("study"), "reason": filters.get("reason"), "label": filters.get("model_label"),
        "min_fracture": filters["min_fracture"] / 100.0 if "min_fracture" in filters else None,
        "waited_s": filters["waited"] * 60.0 if "waited" in filters else None, "visible": visible_studies(),
    }


@bp.get("/review")
@require("review")
def queue() -> Any:
    """The worklist: unreviewed flagged cases and audit samples, sortable and filterable, with waiting time."""
    session = extensions.db_session()
    filters = _filters()
    order = filters.get("order", ORDER_OLDEST)
    args = _query_args(filters)
    cases = flagged_cases(session, limit=MAX_SHOWN, order=order, **args)
    shown = []
    for image, prediction in cases:
        case = _display(presenters.review_case(image, prediction), prediction, image.study.model_version.threshold)
        case["waiting"] = humanize_seconds(waiting_seconds(prediction.created_at))
        case["open_url"] = url_for("review.case", image_id=image.id, **filters)
        shown.append(case)
    total = count_flagged_cases(session, **args)
    reason = filters.get("reason")
    audits = count_flagged_cases(session, **{**args, "reason": REASON_AUDIT}) if reason in (None, REASON_AUDIT) else 0
    browser_session.pop(TRAIL_KEY, None)  # a new sitting starts from the worklist
    browser_session.pop(SKIPPED_KEY, None)
    visible = args["visible"]
    kinds = waiting_reasons(session, visible=visible)
    categories = [c for c in reason_categories(session, visible=visible)
                  if not c.startswith(("Model unsure", "Unfamiliar image"))]  # those are the kinds above
    sort_links = {}
    for column, (first, second) in COLUMN_ORDERS.items():
        wanted = second if order == first else first
        sort_links[column] = {"url": url_for("review.queue", **{**filters, "order": wanted}),
                              "arrow": ORDER_ARROWS[order][1] if ORDER_ARROWS[order][0] == column else ""}
    return render_template("review.html", cases=shown, total=total, audits=audits, filters=filters, order=order,
                           reasons=categories, kinds=kinds, labels=waiting_labels(session, visible=visible),
                           reason_names=presenters.REASON_NAMES, order_names=ORDER_NAMES, sort_links=sort_links,
                           start_url=url_for("review.first", **filters))


def _display(case: dict[str, Any], prediction: Any, threshold: float | None) -> dict[str, Any]:
    """Add what people read to a review case: the label in words, percentages, the reason in words."""
    case["label_name"] = presenters.label_name(case["label"])
    case["reason_short"] = presenters.reason_words(prediction, threshold, short=True)
    case["reason_long"] = presenters.reason_words(prediction, threshold)
    return case


def _case_context(session: Session, image: Image) -> dict[str, Any]:
    prediction = study_prediction(image, image.study.model_version_id)
    if prediction is None:
        abort(404, f"Image #{image.id} has no prediction yet.")
    case = _display(presenters.review_case(image, prediction), prediction, image.study.model_version.threshold)
    case["spot_check"] = case_reason(prediction) is None
    case["waiting"] = humanize_seconds(waiting_seconds(prediction.created_at))
    case["heatmap"] = presenters.heatmap_state(prediction)
    case["heatmap_status_url"] = url_for("studies.heatmap_status", prediction_id=prediction.id)
    case["heatmap_request_url"] = url_for("studies.request_heatmap", prediction_id=prediction.id)
    case["pixels_url"] = url_for("studies.image_pixels", image_id=image.id)
    case["attributes"] = presenters.dicom_attributes(extensions.settings(), image)
    case["strip"] = presenters.study_strip(session, image)
    case["width"], case["height"] = image.width, image.height
    # The labels in the order their probabilities are shown (highest first): key 1 is the top one.
    case["choices"] = [
        {"label": label, "name": presenters.label_name(label), "probability": p, "text": presenters.percent(p),
         "key": index + 1, "model": label == prediction.label}
        for index, (label, p) in enumerate(case["probabilities"].items())
    ]
    known = {choice["label"] for choice in case["choices"]}
    for label in case["labels"]:  # a label without a probability (never expected) still gets a button
        if label not in known:
            case["choices"].append({"label": label, "name": presenters.label_name(label), "probability": 0.0,
                                    "text": presenters.percent(0.0), "key": len(case["choices"]) + 1, "model": False})
    case["reviews"] = [
        {"label": r.label, "label_name": presenters.label_name(r.label), "reviewer": r.reviewer_name, "note": r.note,
         "created_at": presenters.iso(r.created_at)}
        for r in image.reviews
    ]
    return case


def _classified_image(session: Any, image_id: int) -> Image:
    """The image, or 404 when unknown (or another group's) and 409 when it has no classification to review."""
    image = session.get(Image, image_id)
    if image is None or not may_see(image.study):
        abort(404, f"Image #{image_id} not found.")
    if image.status != ImageStatus.DONE:
        abort(409, f"Image #{image_id} is {image.status.value}; only classified images can be reviewed.")
    return image


def _remember(image_id: int) -> int | None:
    """Add ``image_id`` to this sitting's trail; the case opened before it (None: the first)."""
    trail = [i for i in browser_session.get(TRAIL_KEY, []) if isinstance(i, int)]
    if image_id not in trail:
        trail = (trail + [image_id])[-MAX_TRAIL:]
        browser_session[TRAIL_KEY] = trail
    position = trail.index(image_id)
    return trail[position - 1] if position > 0 else None


def _skipped() -> list[int]:
    return [i for i in browser_session.get(SKIPPED_KEY, []) if isinstance(i, int)]


def _following(session: Session, current_id: int | None, filters: dict[str, Any]) -> Image | None:
    """The next waiting case after ``current_id``: not skipped ones first; skipped ones come back when only they are left."""
    args = {**_query_args(filters), "order": filters.get("order", ORDER_OLDEST)}
    skipped = _skipped()
    following = next_case(session, current_id, exclude=skipped, **args)
    if following is None and skipped:
        browser_session.pop(SKIPPED_KEY, None)
        following = next_case(session, current_id, **args)
    return following


def _go_on(session: Session, current_id: int | None, filters: dict[str, Any]) -> Any:
    following = _following(session, current_id, filters)
    if following is None:
        flash("No more cases waiting" + (" with these filters." if filters else "."), "info")
        return redirect(url_for("review.queue", **filters), code=303)
    return redirect(url_for("review.case", image_id=following.id, **filters), code=303)


def _last_review(session: Session) -> dict[str, Any] | None:
    """The signed-in reviewer's last review while it can still be undone (shown with an Undo button)."""
    review = last_own_review(session, current_user.id)
    if review is None:
        return None
    return {"image_id": review.image_id, "label": review.label, "label_name": presenters.label_name(review.label),
            "filename": review.image.filename, "created_at": presenters.iso(review.created_at)}


@bp.get("/review/first")
@require("review")
def first() -> Any:
    """Open the first waiting case of the worklist with these filters (e.g. one study's flags)."""
    browser_session.pop(TRAIL_KEY, None)
    browser_session.pop(SKIPPED_KEY, None)
    return _go_on(extensions.db_session(), None, _filters())


@bp.get("/review/<int:image_id>")
@require("review")
def case(image_id: int) -> Any:
    """The viewer: the image large (zoom, pan, window/level), probabilities, heat map, one-key labels."""
    session = extensions.db_session()
    filters = _filters()
    image = _classified_image(session, image_id)
    context = _case_context(session, image)
    record("view", "image", image.id)
    session.commit()
    may_review = not image.reviews or current_user.can("rereview")
    args = _query_args(filters)
    remaining = count_flagged_cases(session, **args)
    previous = _remember(image.id)
    last = _last_review(session)
    return render_template(
        "viewer.html", case=context, filters=filters, may_review=may_review, remaining=remaining, last=last,
        previous_url=url_for("review.case", image_id=previous, **filters) if previous else None,
        skip_url=url_for("review.skip", image_id=image.id, **filters),
        undo_minutes=f"{REVIEW_UNDO_SECONDS / 60:g}",
    )


@bp.get("/review/<int:image_id>/skip")
@require("review")
def skip(image_id: int) -> Any:
    """Leave a case for later (it comes back after the others) and open the next one; nothing is recorded."""
    filters = _filters()
    _classified_image(extensions.db_session(), image_id)  # another group's image is not found
    skipped = [i for i in _skipped() if i != image_id] + [image_id]
    browser_session[SKIPPED_KEY] = skipped[-MAX_SKIPPED:]
    return _go_on(extensions.db_session(), image_id, filters)


@bp.post("/review/<int:image_id>")
@require("review")
def submit(image_id: int) -> Any:
    """Record the reviewer's label (and optional note), then open the next case."""
    session = extensions.db_session()
    filters = _filters()  # checked before anything is recorded
    image = _classified_image(session, image_id)
    if image.reviews and not current_user.can("rereview"):
        abort(409, f"Image #{image_id} was already reviewed; only an admin can review it again.")
    note = (request.form.get("note") or "").strip()[:2000] or None
    rereview = bool(image.reviews)
    prediction = study_prediction(image, image.study.model_version_id)
    try:
        review = record_review(session, image, request.form.get("label", ""), current_user.username, note,
                               reviewer_id=current_user.id)
    except ValueError as exc:
        session.rollback()
        abort(400, str(exc))
    detail: dict[str, Any] = {"label": review.label, "rereview": rereview}
    if prediction is not None and case_reason(prediction) is None:
        detail["spot_check"] = True  # an image the model neither flagged nor sampled
    record("review", "image", image.id, detail)
    session.commit()
    browser_session[SKIPPED_KEY] = [i for i in _skipped() if i != image.id]
    return _go_on(session, image.id, filters)


@bp.post("/review/<int:image_id>/undo")
@require("review")
def undo(image_id: int) -> Any:
    """Take back one's own last review of this image (within the undo window; audited) and open the case again."""
    session = extensions.db_session()
    filters = _filters()
    image = session.get(Image, image_id)
    if image is None or not may_see(image.study):
        abort(404, f"Image #{image_id} not found.")
    try:
        review = undo_review(session, image, current_user.id)
    except UndoRefused as exc:
        session.rollback()
        abort(exc.status, str(exc))
    label, filename = review.label, image.filename
    record("review_undo", "image", image.id, {
        "review_id": review.id, "label": label, "note": review.note, "reviewed_at": presenters.iso(review.created_at),
    })
    session.commit()
    flash(f"Undone: {presenters.label_name(label)} for {filename}. Choose again.", "info")
    return redirect(url_for("review.case", image_id=image.id, **filters), code=303)

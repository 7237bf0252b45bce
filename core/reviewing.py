"""Review work and its statistics: the review queue with filters, per-model agreement, audit estimates.

The review queue holds the images the model flagged (``unsure``: low confidence; ``unfamiliar``:
unlike the training radiographs) and the audit samples (``audit``: a random share of unflagged
images, see :mod:`core.audit_sampling`), of each study's model version, not yet reviewed.

No Flask and no torch: the portal calls these with its request's session.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from collections.abc import Collection
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Integer, Select, and_, case, cast, func, or_, select
from sqlalchemy.orm import Session

from core.models import Image, ImageStatus, ModelVersion, Prediction, Review, Study
from core.stats import clopper_pearson_interval

_NUMBER = re.compile(r"\d+(?:\.\d+)?")

#: Why a case is in the review queue.
REASON_UNSURE, REASON_UNFAMILIAR, REASON_AUDIT = "unsure", "unfamiliar", "audit"
REASONS = (REASON_UNSURE, REASON_UNFAMILIAR, REASON_AUDIT)
#: Queue orders: oldest first (the default: longest waiting), newest first, most / least suspicious first
#: (fracture probability), by model label, by reason (unsure, unfamiliar, audit) or by study.
ORDER_OLDEST, ORDER_NEWEST, ORDER_SUSPICIOUS, ORDER_LEAST_SUSPICIOUS = "oldest", "newest", "suspicious", "least_suspicious"
ORDER_LABEL, ORDER_REASON, ORDER_STUDY = "label", "reason", "study"
ORDERS = (ORDER_OLDEST, ORDER_NEWEST, ORDER_SUSPICIOUS, ORDER_LEAST_SUSPICIOUS, ORDER_LABEL, ORDER_REASON, ORDER_STUDY)


def case_reason(prediction: Prediction) -> str | None:
    """Why ``prediction`` is a review case: ``unsure``, ``unfamiliar``, ``audit``, or None (not a case).

    A flag without a kind (made before flag kinds existed) was a low-confidence flag: ``unsure``.
    """
    if prediction.flagged:
        return prediction.flag_kind or REASON_UNSURE
    return REASON_AUDIT if prediction.audit else None


def check_order(order: str) -> str:
    """``order`` when it is one of :data:`ORDERS`.

    Raises:
        ValueError: naming the valid orders.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {order[:40]!r}")
    return order


def reason_category(reason: str | None) -> str:
    """A flag reason without its numbers (``confidence 0.512 below threshold 0.900`` -> ``confidence below threshold``)."""
    if not reason:
        return ""
    return " ".join(_NUMBER.sub(" ", reason).split())


def _reason_condition(reason: str) -> Any:
    if reason == REASON_AUDIT:
        return and_(Prediction.audit.is_(True), Prediction.flagged.is_(False))
    if reason == REASON_UNFAMILIAR:
        return and_(Prediction.flagged.is_(True), Prediction.flag_kind == REASON_UNFAMILIAR)
    return and_(Prediction.flagged.is_(True), or_(Prediction.flag_kind == REASON_UNSURE, Prediction.flag_kind.is_(None)))


def _kind_rank() -> Any:
    return case((Prediction.flagged.is_(False), 2), (Prediction.flag_kind == REASON_UNFAMILIAR, 1), else_=0)


def _ordering(order: str) -> list[Any]:
    oldest = [Prediction.created_at, Image.id]
    fracture = Prediction.fracture_probability
    return {
        ORDER_OLDEST: oldest,
        ORDER_NEWEST: [Prediction.created_at.desc(), Image.id.desc()],
        ORDER_SUSPICIOUS: [fracture.desc().nulls_last(), *oldest],
        ORDER_LEAST_SUSPICIOUS: [fracture.asc().nulls_last(), *oldest],
        ORDER_LABEL: [Prediction.label, fracture.desc().nulls_last(), *oldest],
        ORDER_REASON: [_kind_rank(), *oldest],
        ORDER_STUDY: [Image.study_id, Image.id],
    }[order]


def _queue_query(study_id: int | None, reason: str | None, include_reviewed: bool, order: str = ORDER_OLDEST,
                 visible: Any = None, label: str | None = None, min_fracture: float | None = None,
                 waited_s: float | None = None, exclude: Collection[int] = ()) -> Select[Any]:
    check_order(order)
    # One row per image of a study: predictions are unique per (image, version), and only the
    # study's own version counts; a re-run is another study with its own image rows.
    query = (
        select(Image, Prediction)
        .join(Prediction, Prediction.image_id == Image.id)
        .join(Study, Study.id == Image.study_id)
        .where(or_(Prediction.flagged.is_(True), Prediction.audit.is_(True)),
               Prediction.model_version_id == Study.model_version_id, Image.status == ImageStatus.DONE)
        .order_by(*_ordering(order))
    )
    if label:
        query = query.where(Prediction.label == label)
    if min_fracture is not None:
        query = query.where(Prediction.fracture_probability >= min_fracture)
    if waited_s:
        query = query.where(Prediction.created_at <= datetime.now(timezone.utc) - timedelta(seconds=waited_s))
    if exclude:
        query = query.where(Image.id.not_in(list(exclude)))
    if study_id is not None:
        query = query.where(Image.study_id == study_id)
    if visible is not None:  # the studies the reader may see (core.groups.study_condition)
        query = query.where(visible)
    if reason in REASONS:  # a case kind: unsure, unfamiliar or audit
        query = query.where(_reason_condition(reason))
    elif reason:
        words = reason.split()
        for word in words:  # every word of the category, in any reason text (numbers stripped)
            query = query.where(Prediction.flag_reason.contains(word, autoescape=True))
    if not include_reviewed:
        query = query.where(~select(Review.id).where(Review.image_id == Image.id).exists())
    return query


def flagged_cases(
    session: Session, study_id: int | None = None, reason: str | None = None,
    include_reviewed: bool = False, limit: int | None = None, order: str = ORDER_OLDEST, visible: Any = None,
    label: str | None = None, min_fracture: float | None = None, waited_s: float | None = None,
) -> list[tuple[Image, Prediction]]:
    """Review cases (flagged images and audit samples) with their prediction, in ``order``.

    ``reason`` is a case kind (``unsure``, ``unfamiliar``, ``audit``) or a flag-reason category
    (see :func:`reason_category`). ``order``: ``oldest`` first, or ``suspicious`` (fracture
    probability, highest first; none last; then oldest), or another of :data:`ORDERS`. ``visible``:
    a condition on the study limiting the cases to those the reader may see
    (:func:`core.groups.study_condition`). ``label``: the model's label; ``min_fracture``: lowest
    fracture probability (0..1); ``waited_s``: cases waiting at least this many seconds.

    Raises:
        ValueError: for an unknown ``order``.
    """
    query = _queue_query(study_id, reason, include_reviewed, order, visible, label, min_fracture, waited_s)
    if limit is not None:
        query = query.limit(limit)
    return [(image, prediction) for image, prediction in session.execute(query)]


def count_flagged_cases(session: Session, study_id: int | None = None, reason: str | None = None,
                        visible: Any = None, label: str | None = None, min_fracture: float | None = None,
                        waited_s: float | None = None) -> int:
    """How many cases (flagged and audit) wait for review, with the same filters as :func:`flagged_cases`."""
    inner = (_queue_query(study_id, reason, False, visible=visible, label=label, min_fracture=min_fracture, waited_s=waited_s)
             .with_only_columns(Image.id).order_by(None).subquery())
    return int(session.scalar(select(func.count()).select_from(inner)) or 0)


def reason_categories(session: Session, limit: int = 1000, visible: Any = None) -> list[str]:
    """Distinct flag-reason categories among waiting cases (for the filter menu)."""
    query = _queue_query(None, None, False, visible=visible).with_only_columns(Prediction.flag_reason).order_by(None).distinct().limit(limit)
    return sorted({reason_category(reason) for reason in session.scalars(query) if reason})


def waiting_labels(session: Session, visible: Any = None) -> list[str]:
    """The model labels among waiting cases (for the filter menu), sorted."""
    query = _queue_query(None, None, False, visible=visible).with_only_columns(Prediction.label).order_by(None).distinct()
    return sorted(set(session.scalars(query)))


def waiting_reasons(session: Session, study_id: int | None = None, visible: Any = None) -> dict[str, int]:
    """How many cases wait for review per kind (``unsure``, ``unfamiliar``, ``audit``), kinds present only."""
    kind = case(
        (Prediction.flagged.is_(False), REASON_AUDIT),
        (Prediction.flag_kind == REASON_UNFAMILIAR, REASON_UNFAMILIAR),
        else_=REASON_UNSURE,
    )
    inner = _queue_query(study_id, None, False, visible=visible).with_only_columns(kind.label("kind")).order_by(None).subquery()
    rows = session.execute(select(inner.c.kind, func.count()).group_by(inner.c.kind)).all()
    return {reason: int(count) for reason, count in sorted(rows, key=lambda row: REASONS.index(row[0]))}


def next_case(
    session: Session, after_image_id: int | None, study_id: int | None = None, reason: str | None = None,
    order: str = ORDER_OLDEST, visible: Any = None, label: str | None = None, min_fracture: float | None = None,
    waited_s: float | None = None, exclude: Collection[int] = (),
) -> Image | None:
    """The first waiting case in ``order`` other than ``after_image_id`` (the one just reviewed) and ``exclude`` (skipped)."""
    skip = {*exclude, *([after_image_id] if after_image_id is not None else [])}
    query = _queue_query(study_id, reason, False, order, visible, label, min_fracture, waited_s, skip)
    row = session.execute(query.limit(1)).first()
    return row[0] if row else None


def waiting_seconds(since: datetime | None, now: datetime | None = None) -> float:
    """Seconds since ``since`` (naive datetimes are UTC, as SQLite returns them)."""
    if since is None:
        return 0.0
    if since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    return max(0.0, ((now or datetime.now(timezone.utc)) - since).total_seconds())


def humanize_seconds(seconds: float) -> str:
    """``42 s``, ``5 min``, ``3 h 20 min``, ``2 d 4 h``."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours = minutes // 60
    if hours < 48:
        return f"{hours} h {minutes % 60} min"
    return f"{hours // 24} d {hours % 24} h"


@dataclass
class VersionStats:
    """How reviewers agree with one model version, and how often it flags."""

    version_id: int
    labels: list[str]
    reviewed: int = 0
    agreed: int = 0
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)  # model label -> reviewed label -> count
    reviewed_labels: list[str] = field(default_factory=list)
    flag_rate_by_day: list[dict[str, Any]] = field(default_factory=list)  # {day, predictions, flagged, rate}
    predictions: int = 0
    flagged: int = 0

    @property
    def agreement_rate(self) -> float | None:
        """Share of reviewed predictions whose label the reviewer confirmed (None before any review)."""
        return self.agreed / self.reviewed if self.reviewed else None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        return {
            "model_version_id": self.version_id, "labels": self.labels, "predictions": self.predictions,
            "flagged": self.flagged, "reviewed": self.reviewed, "agreed": self.agreed,
            "agreement_rate": self.agreement_rate, "confusion": self.confusion,
            "flag_rate_by_day": self.flag_rate_by_day,
        }


def version_stats(session: Session, version: ModelVersion) -> VersionStats:
    """Agreement rate, confusion matrix (model vs latest review) and daily flag rate of ``version``."""
    stats = VersionStats(version_id=version.id, labels=list(version.labels))
    latest = (
        select(Review.image_id, func.max(Review.id).label("review_id")).group_by(Review.image_id).subquery()
    )
    pairs = session.execute(
        select(Prediction.label, Review.label)
        .join(latest, latest.c.image_id == Prediction.image_id)
        .join(Review, Review.id == latest.c.review_id)
        .where(Prediction.model_version_id == version.id)
    ).all()
    counts = Counter((model_label, reviewed_label) for model_label, reviewed_label in pairs)
    reviewed_labels = list(version.labels) + sorted({r for _, r in counts} - set(version.labels))
    stats.reviewed_labels = reviewed_labels
    stats.confusion = {m: {r: counts.get((m, r), 0) for r in reviewed_labels} for m in version.labels}
    stats.reviewed = len(pairs)
    stats.agreed = sum(count for (m, r), count in counts.items() if m == r)
    day = func.date(Prediction.created_at)
    for when, total, flagged in session.execute(
        select(day, func.count(), func.sum(cast(Prediction.flagged, Integer)))
        .where(Prediction.model_version_id == version.id)
        .group_by(day)
        .order_by(day)
    ):
        flagged = int(flagged or 0)
        stats.flag_rate_by_day.append({"day": str(when), "predictions": int(total), "flagged": flagged,
                                       "rate": flagged / total if total else 0.0})
        stats.predictions += int(total)
        stats.flagged += flagged
    return stats



@dataclass(frozen=True)
class AuditEstimate:
    """The error among unflagged images of one version, measured on reviewed audit samples.

    ``reviewed`` audit cases have a review (the latest review of each image counts); ``wrong`` of
    them were labelled differently from the model. ``low``/``high``: exact (Clopper–Pearson)
    interval on the error rate at ``confidence``; None before any review.
    """

    version_id: int
    reviewed: int
    wrong: int
    confidence: float
    low: float | None
    high: float | None

    @property
    def rate(self) -> float | None:
        """Share of reviewed audit cases the model got wrong (None before any review)."""
        return self.wrong / self.reviewed if self.reviewed else None


def audit_estimate(session: Session, version_id: int, confidence: float = 0.95) -> AuditEstimate:
    """Reviewed audit cases of ``version_id`` and how many the model got wrong, with an exact interval.

    One query: each audited image's latest review against the version's prediction.
    """
    latest = select(Review.image_id, func.max(Review.id).label("review_id")).group_by(Review.image_id).subquery()
    wrong = func.sum(case((Prediction.label != Review.label, 1), else_=0))
    reviewed, errors = session.execute(
        select(func.count(), wrong)
        .select_from(Prediction)
        .join(latest, latest.c.image_id == Prediction.image_id)
        .join(Review, Review.id == latest.c.review_id)
        .where(Prediction.model_version_id == version_id, Prediction.audit.is_(True))
    ).one()
    reviewed, errors = int(reviewed or 0), int(errors or 0)
    if not reviewed:
        return AuditEstimate(version_id, 0, 0, confidence, None, None)
    low, high = clopper_pearson_interval(errors, reviewed, confidence)
    return AuditEstimate(version_id, reviewed, errors, confidence, low, high)

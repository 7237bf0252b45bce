"""Watching models in production: prediction histograms for ``/metrics`` and daily drift.

No Flask and no torch. Everything is aggregated in the database with grouped queries that work on
SQLite and PostgreSQL, so the work and the answer stay bounded by (model versions x buckets) and
(days x bins), never by the number of predictions held in Python.

Drift compares each UTC day's distribution of a version's predictions (confidence, unfamiliar
score) with the distribution the trainer measured on its validation set, stored with the version as
``metrics["validation_distributions"] = {name: {"edges": [e0, ..., ek], "counts": [c1, ..., ck]}}``
(a value below ``e0`` counts in the first bin, one above ``ek`` in the last), using the population
stability index (:func:`core.stats.population_stability_index`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Date, Integer, and_, case, cast, func, literal, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session
from sqlalchemy.sql.elements import ColumnElement

from core.models import ModelVersion, Prediction
from core.stats import population_stability_index

log = logging.getLogger(__name__)

# Upper bounds of the /metrics histogram buckets (Prometheus ``le``; +Inf is added).
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
FRACTURE_PROBABILITY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
#: Unfamiliar scores are layer distances in units of their validation quantile (the cut is near 1;
#: first-format references give unscaled distances): 1-2-5 log steps from 0.25 to 10,000.
UNFAMILIAR_SCORE_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0)
#: Per-image seconds of one stage (decode, model), from half a millisecond to ten seconds.
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Histograms per version exported on /metrics: name -> (column, bucket upper bounds).
HISTOGRAMS: dict[str, tuple[InstrumentedAttribute[Any], tuple[float, ...]]] = {
    "confidence": (Prediction.confidence, CONFIDENCE_BUCKETS),
    "fracture_probability": (Prediction.fracture_probability, FRACTURE_PROBABILITY_BUCKETS),
    "unfamiliar_score": (Prediction.unfamiliar_score, UNFAMILIAR_SCORE_BUCKETS),
    "decode_seconds": (Prediction.decode_seconds, SECONDS_BUCKETS),
    "model_seconds": (Prediction.model_seconds, SECONDS_BUCKETS),
}
FLAG_REASONS = ("unsure", "unfamiliar")

#: Distributions compared with validation: key in ``validation_distributions`` -> (column, words).
DRIFT_DISTRIBUTIONS: dict[str, tuple[InstrumentedAttribute[Any], str]] = {
    "confidence": (Prediction.confidence, "confidence"),
    "unfamiliar_score": (Prediction.unfamiliar_score, "unfamiliar-score"),
}
DRIFT_DAYS = 30
#: Days with fewer predictions are shown but never raise a drift warning (their PSI is noise).
DRIFT_MIN_PREDICTIONS = 50
#: Floor of a bin's share in the PSI (a bin empty on one side would make it infinite).
PSI_EPSILON = 1e-4


@dataclass
class Histogram:
    """One Prometheus histogram: cumulative counts per upper bound, count and sum of the values."""

    buckets: list[tuple[float, int]]
    count: int
    total: float


@dataclass
class VersionCounts:
    """A model version's predictions in numbers: histograms, flags by reason, audit samples."""

    version_id: int
    predictions: int
    flagged: dict[str, int]
    audit: int
    histograms: dict[str, Histogram]


def prediction_counts(session: Session) -> list[VersionCounts]:
    """Histograms and counts of every version's predictions, in one grouped query (one row per version).

    A histogram counts only the predictions that have the value (no unfamiliar score without a
    reference, no timings on predictions written before they were recorded). A flagged prediction
    with no recorded kind (written before kinds existed) counts as ``unsure``.
    """
    columns: list[ColumnElement[Any]] = [Prediction.model_version_id, func.count()]
    for column, bounds in HISTOGRAMS.values():
        columns += [func.count(column), func.coalesce(func.sum(column), 0.0)]
        columns += [func.sum(case((column <= bound, 1), else_=0)) for bound in bounds]
    unfamiliar = Prediction.flag_kind == "unfamiliar"
    flagged = Prediction.flagged.is_(True)
    columns += [
        func.sum(case((and_(flagged, or_(Prediction.flag_kind.is_(None), ~unfamiliar)), 1), else_=0)),
        func.sum(case((and_(flagged, unfamiliar), 1), else_=0)),
        func.sum(cast(Prediction.audit, Integer)),
    ]
    rows = session.execute(select(*columns).group_by(Prediction.model_version_id).order_by(Prediction.model_version_id))
    summaries = []
    for row in rows:
        values = list(row)
        version_id, total = int(values[0]), int(values[1])
        position = 2
        histograms = {}
        for name, (_, bounds) in HISTOGRAMS.items():
            count, value_sum = int(values[position]), float(values[position + 1] or 0.0)
            cumulative = [int(v or 0) for v in values[position + 2 : position + 2 + len(bounds)]]
            position += 2 + len(bounds)
            histograms[name] = Histogram(list(zip(bounds, cumulative)), count, value_sum)
        unsure, unfamiliar_count, audit = (int(v or 0) for v in values[position : position + 3])
        summaries.append(VersionCounts(version_id, total, {"unsure": unsure, "unfamiliar": unfamiliar_count}, audit, histograms))
    return summaries


@dataclass
class DayDrift:
    """One UTC day of one distribution: predictions, shares per bin, PSI against validation."""

    day: str
    n: int
    shares: list[float]
    psi: float
    #: At least the minimum number of predictions for the PSI to count.
    enough: bool
    #: ``enough`` and the PSI is beyond the threshold.
    drifted: bool


@dataclass
class DistributionDrift:
    """A distribution's validation shares and its recent days, oldest first (days with values only)."""

    name: str
    words: str
    edges: list[float]
    validation_counts: list[float]
    validation_shares: list[float]
    threshold: float
    min_predictions: int
    days: list[DayDrift] = field(default_factory=list)

    @property
    def drifted_days(self) -> list[DayDrift]:
        """Days with enough predictions whose PSI is beyond the threshold, oldest first."""
        return [day for day in self.days if day.drifted]

    @property
    def warning(self) -> str | None:
        """The drift warning for people (the latest drifted day), or None."""
        drifted = self.drifted_days
        if not drifted:
            return None
        latest = drifted[-1]
        text = (f"Drift: {self.words} distribution on {latest.day} differs from validation "
                f"(PSI {latest.psi:.2f} > {self.threshold:.2f})")
        if len(drifted) > 1:
            text += f"; {len(drifted) - 1} earlier day{'s' if len(drifted) > 2 else ''} too"
        return text


@dataclass
class VersionDrift:
    """Drift of one version's predictions, per distribution the version has a validation reference for."""

    version_id: int
    days: int
    distributions: list[DistributionDrift]

    @property
    def warnings(self) -> list[str]:
        """One warning per drifted distribution."""
        return [d.warning for d in self.distributions if d.warning]


def validation_distribution(version: ModelVersion, name: str) -> tuple[list[float], list[float]] | None:
    """``(edges, counts)`` of a validation distribution recorded with ``version``, or None.

    None when the version has none (versions registered before the trainer recorded them) or when
    what is recorded is not usable: k+1 increasing finite edges, k >= 1 non-negative counts, some > 0.
    """
    distributions = (version.metrics or {}).get("validation_distributions")
    entry = distributions.get(name) if isinstance(distributions, Mapping) else None
    if not isinstance(entry, Mapping):
        return None
    edges, counts = entry.get("edges"), entry.get("counts")
    try:
        edges = [float(e) for e in edges]  # type: ignore[union-attr]
        counts = [float(c) for c in counts]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        log.warning("model version %s: unusable validation distribution %r", version.id, name)
        return None
    usable = (
        len(counts) >= 1 and len(edges) == len(counts) + 1
        and all(math.isfinite(e) for e in edges) and all(a < b for a, b in zip(edges, edges[1:]))
        and all(math.isfinite(c) and c >= 0 for c in counts) and sum(counts) > 0
    )
    if not usable:
        log.warning("model version %s: unusable validation distribution %r", version.id, name)
        return None
    return edges, counts


def _bin_index(column: ColumnElement[Any], edges: Sequence[float]) -> ColumnElement[Any]:
    """Bin of ``column`` (0-based): [e0, e1) -> 0, ..., [e(k-1), ek] -> k-1; below e0 first, above ek last."""
    inner = edges[1:-1]
    if not inner:
        return literal(0)
    return case(*[(column < edge, index) for index, edge in enumerate(inner)], else_=len(inner))


def _utc_day(session: Session, column: ColumnElement[Any]) -> ColumnElement[Any]:
    """The UTC calendar day of a timestamp column (PostgreSQL's ``date()`` would use the session's zone)."""
    if session.get_bind().dialect.name == "postgresql":
        return cast(func.timezone("UTC", column), Date)
    return func.date(column)  # SQLite stores the UTC time as text


def _daily_bins(
    session: Session, version_id: int, column: InstrumentedAttribute[Any], edges: Sequence[float], since: datetime
) -> dict[str, list[int]]:
    """Counts per bin for each UTC day since ``since``: day -> counts (days with values only)."""
    per_row = (
        select(_utc_day(session, Prediction.created_at).label("day"), _bin_index(column, edges).label("bin"))
        .where(Prediction.model_version_id == version_id, Prediction.created_at >= since, column.is_not(None))
        .subquery()
    )
    # Grouping on the subquery's columns, not on the expressions: PostgreSQL would not see the
    # bound parameters of the same expression in SELECT and GROUP BY as equal.
    rows = session.execute(select(per_row.c.day, per_row.c.bin, func.count()).group_by(per_row.c.day, per_row.c.bin))
    days: dict[str, list[int]] = {}
    for day, index, count in rows:
        key = day.isoformat() if hasattr(day, "isoformat") else str(day)
        days.setdefault(key, [0] * (len(edges) - 1))[int(index)] += int(count)
    return days


def version_drift(
    session: Session,
    version: ModelVersion,
    psi_threshold: float,
    min_predictions: int = DRIFT_MIN_PREDICTIONS,
    days: int = DRIFT_DAYS,
    now: datetime | None = None,
) -> VersionDrift | None:
    """Daily drift of ``version``'s predictions over the last ``days`` UTC days, against validation.

    For each distribution the version has a usable validation reference for, each day with values
    gets its count, its shares per validation bin and its PSI against validation; a day is drifted
    when it has at least ``min_predictions`` values and a PSI above ``psi_threshold``. None when the
    version has no usable reference at all (nothing to compare with: show nothing).
    """
    now = now or datetime.now(timezone.utc)
    today = now.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    since = today - timedelta(days=days - 1)
    distributions = []
    for name, (column, words) in DRIFT_DISTRIBUTIONS.items():
        reference = validation_distribution(version, name)
        if reference is None:
            continue
        edges, counts = reference
        total = sum(counts)
        drift = DistributionDrift(name, words, edges, counts, [c / total for c in counts], psi_threshold, min_predictions)
        for day, binned in sorted(_daily_bins(session, version.id, column, edges, since).items()):
            n = sum(binned)
            psi = population_stability_index(counts, binned, PSI_EPSILON)
            enough = n >= min_predictions
            drift.days.append(DayDrift(day, n, [c / n for c in binned], psi, enough, enough and psi > psi_threshold))
        distributions.append(drift)
    if not distributions:
        return None
    return VersionDrift(version.id, days, distributions)

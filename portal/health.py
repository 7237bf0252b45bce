"""Health for load balancers and compose, and Prometheus metrics.

* ``/healthz`` (public): the process is up and answering.
* ``/readyz`` (public): the database and the broker answer and a production model exists; 503 if not.
* ``/metrics`` (signed in or API token): Prometheus text, computed from the database at scrape time,
  so every portal process reports the same numbers. Counts are not patient data, but they do reveal
  activity, so a scraper sends ``Authorization: Bearer <token>`` like any other client.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, jsonify
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError

from core import monitoring, registry
from core.models import Image, ImageStatus, Prediction, Study
from core.reviewing import count_flagged_cases, flagged_cases, waiting_seconds
from portal import extensions
from portal.auth import require

log = logging.getLogger(__name__)
bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Any:
    """Report that the portal process is up."""
    return jsonify(status="ok")


def _check_database() -> str | None:
    try:
        extensions.db_session().execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        extensions.rollback_session()
        return f"database unreachable: {exc.__class__.__name__}"
    return None


def _check_broker() -> str | None:
    try:
        with extensions.celery_app().connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=3)
    except Exception as exc:  # kombu raises transport-specific errors; report which
        return f"broker unreachable: {exc.__class__.__name__}: {exc}"
    return None


@bp.get("/readyz")
def readyz() -> Any:
    """Report whether the portal can do its work: database, broker, production model."""
    problems = {"database": _check_database(), "broker": _check_broker()}
    if problems["database"] is None:
        version = registry.production_version(extensions.db_session())
        problems["production_model"] = None if version else "no production model: promote one"
    else:
        problems["production_model"] = "unknown (database unreachable)"
    ready = not any(problems.values())
    body = {"status": "ready" if ready else "not ready",
            "checks": {name: problem or "ok" for name, problem in problems.items()}}
    return jsonify(body), 200 if ready else 503


class DatabaseCollector:
    """Prometheus collector that reads the numbers from the database at scrape time."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def collect(self) -> Any:
        """Yield the metric families."""
        session = self.session
        by_status = dict(session.execute(select(Image.status, func.count()).group_by(Image.status)).all())
        images = CounterMetricFamily("triage_images", "Images by final outcome.", labels=["outcome"])
        images.add_metric(["classified"], by_status.get(ImageStatus.DONE, 0))
        images.add_metric(["failed"], by_status.get(ImageStatus.FAILED, 0))
        yield images
        flagged = session.scalar(
            select(func.count()).select_from(Prediction).join(Image, Image.id == Prediction.image_id)
            .join(Study, Study.id == Image.study_id)
            .where(Prediction.flagged.is_(True), Prediction.model_version_id == Study.model_version_id)
        )
        flagged_family = CounterMetricFamily("triage_images_flagged", "Images flagged low-confidence for review.")
        flagged_family.add_metric([], flagged or 0)
        yield flagged_family
        queue = GaugeMetricFamily("triage_queue_images", "Images waiting for or in classification.", labels=["status"])
        queue.add_metric(["queued"], by_status.get(ImageStatus.QUEUED, 0))
        queue.add_metric(["processing"], by_status.get(ImageStatus.PROCESSING, 0))
        yield queue
        oldest_queued = session.scalar(
            select(func.min(Image.created_at)).where(Image.status.in_([ImageStatus.QUEUED, ImageStatus.PROCESSING]))
        )
        wait = GaugeMetricFamily("triage_queue_wait_seconds", "Age of the oldest image not yet classified (0: none).")
        wait.add_metric([], waiting_seconds(oldest_queued) if oldest_queued else 0.0)
        yield wait
        backlog = GaugeMetricFamily("triage_review_backlog", "Images waiting for a review (flagged cases and audit samples).")
        backlog.add_metric([], count_flagged_cases(session))
        yield backlog
        oldest = flagged_cases(session, limit=1)
        age = GaugeMetricFamily("triage_review_backlog_oldest_seconds", "How long the oldest unreviewed case has waited (0: none).")
        age.add_metric([], waiting_seconds(oldest[0][1].created_at) if oldest else 0.0)
        yield age
        yield from prediction_metrics(monitoring.prediction_counts(session))


#: /metrics histograms per model version: name, help, histogram in core.monitoring.
_PREDICTION_HISTOGRAMS = (
    ("triage_prediction_confidence", "Top probability of each prediction, per model version.", "confidence"),
    ("triage_prediction_fracture_probability", "Probability of a fracture (1 - p(no_fracture)), per model version.",
     "fracture_probability"),
    ("triage_prediction_unfamiliar_score", "Unfamiliar-image score (distance from the training radiographs), per model "
     "version; only versions with an unfamiliar-image reference.", "unfamiliar_score"),
)


def _add_histogram(family: HistogramMetricFamily, labels: list[str], histogram: monitoring.Histogram) -> None:
    buckets = [(floatToGoString(bound), count) for bound, count in histogram.buckets] + [("+Inf", histogram.count)]
    family.add_metric(labels, buckets, histogram.total)


def prediction_metrics(counts: list[monitoring.VersionCounts]) -> Any:
    """Metric families of predictions per model version: distributions, flags by reason, audits, stage latency."""
    for name, documentation, key in _PREDICTION_HISTOGRAMS:
        family = HistogramMetricFamily(name, documentation, labels=["version"])
        for version in counts:
            if version.histograms[key].count:
                _add_histogram(family, [str(version.version_id)], version.histograms[key])
        yield family
    stages = HistogramMetricFamily("triage_image_stage_seconds", "Seconds per image by worker stage: decode (decode and "
                                   "preprocess) and model (its share of the batch's forward pass).", labels=["version", "stage"])
    for version in counts:
        for stage in ("decode", "model"):
            histogram = version.histograms[f"{stage}_seconds"]
            if histogram.count:
                _add_histogram(stages, [str(version.version_id), stage], histogram)
    yield stages
    flagged = CounterMetricFamily("triage_predictions_flagged", "Predictions flagged for review, by model version and "
                                  "reason (unsure: low confidence; unfamiliar: unlike the training images).",
                                  labels=["version", "reason"])
    audit = CounterMetricFamily("triage_predictions_audit", "Unflagged predictions sent to review as audit samples.",
                                labels=["version"])
    for version in counts:
        for reason in monitoring.FLAG_REASONS:
            flagged.add_metric([str(version.version_id), reason], version.flagged[reason])
        audit.add_metric([str(version.version_id)], version.audit)
    yield flagged
    yield audit


@bp.get("/metrics")
@require("view")
def metrics() -> Any:
    """Prometheus metrics: images, queue, review backlog; per model version distributions, flags and latency."""
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(DatabaseCollector(extensions.db_session()))
    return Response(generate_latest(collectors), mimetype=CONTENT_TYPE_LATEST.split(";")[0],
                    headers={"Content-Type": CONTENT_TYPE_LATEST})

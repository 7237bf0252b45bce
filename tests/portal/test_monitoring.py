"""/metrics per model version (distributions, flags by reason, audits, stage latency) and drift on the models page."""

from __future__ import annotations

import re
from datetime import timedelta

from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from core.db import Database
from core.models import utcnow
from tests.core.test_monitoring import VALIDATION, add_predictions, add_version, spread


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_export_prediction_histograms_flags_audits_and_stage_latency_per_version(client: FlaskClient, db: Database) -> None:
    with db.transaction() as session:
        first = add_version(session, name="first")
        add_predictions(session, first, [
            {"confidence": 0.55, "fracture_probability": 0.45, "unfamiliar_score": 0.5, "flagged": True, "flag_kind": "unsure",
             "decode_seconds": 0.003, "model_seconds": 0.0008},
            {"confidence": 0.65, "fracture_probability": 0.35, "unfamiliar_score": 3.0, "decode_seconds": 0.02, "model_seconds": 0.0008},
            {"confidence": 0.97, "fracture_probability": 0.97, "unfamiliar_score": 3.0, "audit": True,
             "decode_seconds": 0.02, "model_seconds": 0.004},
            {"confidence": 0.99, "fracture_probability": 0.01, "unfamiliar_score": 7000.0, "flagged": True, "flag_kind": "unfamiliar",
             "decode_seconds": 0.3, "model_seconds": 0.004},
        ], utcnow())
        second = add_version(session, name="second")  # no unfamiliar reference, no timings recorded
        add_predictions(session, second, spread([(0.8, 2)]), utcnow())
        first_id, second_id = str(first.id), str(second.id)

    response = client.get("/metrics")
    assert response.status_code == 200
    samples = _samples(response.get_data(as_text=True))

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    buckets = [("0.5", 0), ("0.6", 1), ("0.7", 2), ("0.9", 2), ("0.95", 2), ("0.99", 4), ("1.0", 4), ("+Inf", 4)]
    for le, count in buckets:
        assert value("triage_prediction_confidence_bucket", version=first_id, le=le) == count, le
    assert value("triage_prediction_confidence_count", version=first_id) == 4
    assert abs(value("triage_prediction_confidence_sum", version=first_id) - 3.16) < 1e-9
    assert value("triage_prediction_confidence_bucket", version=second_id, le="0.8") == 2
    assert value("triage_prediction_fracture_probability_bucket", version=first_id, le="0.4") == 2
    assert value("triage_prediction_fracture_probability_bucket", version=first_id, le="0.5") == 3
    for le, count in [("1.0", 1), ("5.0", 3), ("5000.0", 3), ("10000.0", 4), ("+Inf", 4)]:
        assert value("triage_prediction_unfamiliar_score_bucket", version=first_id, le=le) == count, le
    assert not any(name.startswith("triage_prediction_unfamiliar_score") and ("version", second_id) in labels
                   for name, labels in samples)  # nothing to report for a version without scores

    assert value("triage_predictions_flagged_total", version=first_id, reason="unsure") == 1
    assert value("triage_predictions_flagged_total", version=first_id, reason="unfamiliar") == 1
    assert value("triage_predictions_flagged_total", version=second_id, reason="unfamiliar") == 0
    assert value("triage_predictions_audit_total", version=first_id) == 1

    for le, count in [("0.0025", 0), ("0.005", 1), ("0.025", 3), ("0.25", 3), ("0.5", 4), ("+Inf", 4)]:
        assert value("triage_image_stage_seconds_bucket", version=first_id, stage="decode", le=le) == count, le
    for le, count in [("0.0005", 0), ("0.001", 2), ("0.005", 4)]:
        assert value("triage_image_stage_seconds_bucket", version=first_id, stage="model", le=le) == count, le
    assert abs(value("triage_image_stage_seconds_sum", version=first_id, stage="model") - 0.0096) < 1e-9
    assert not any(name.startswith("triage_image_stage_seconds") and ("version", second_id) in labels for name, labels in samples)


def test_models_page_plots_drift_and_warns_on_a_drifted_day(client: FlaskClient, db: Database) -> None:
    yesterday = utcnow() - timedelta(days=1)
    with db.transaction() as session:
        watched = add_version(session, {"validation_distributions": VALIDATION}, name="watched")
        shifted = spread([(0.55, 60), (0.65, 20), (0.75, 10), (0.85, 5), (0.95, 5)])
        for index, row in enumerate(shifted):  # unfamiliar scores as in validation: 70 %, 25 %, 5 % per bin
            row["unfamiliar_score"] = 5.0 if index % 20 < 14 else (50.0 if index % 20 < 19 else 500.0)
        add_predictions(session, watched, shifted, yesterday)
        add_predictions(session, watched, spread([(0.55, 10), (0.65, 10), (0.75, 20), (0.85, 30), (0.95, 30)]), utcnow())
        old = add_version(session, {"accuracy": 0.8}, name="registered before distributions")
        add_predictions(session, old, spread([(0.55, 60)]), yesterday)
        broken = add_version(session, {"validation_distributions": {"confidence": {"edges": [1], "counts": []}}}, name="broken")
        watched_id, old_id, broken_id = watched.id, old.id, broken.id

    response = client.get("/models")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    cards = {int(m.group(1)): m.group(0) for m in re.finditer(r'<article class="card model[^"]*" id="model-(\d+)">.*?</article>', page, re.S)}
    watched_card = cards[watched_id]
    day = yesterday.strftime("%Y-%m-%d")
    assert re.search(rf"Drift: confidence distribution on {day} differs from validation \(PSI \d\.\d\d &gt; 0\.20\)", watched_card)
    assert "unfamiliar-score distribution" in watched_card and "Drift: unfamiliar-score" not in watched_card
    assert watched_card.count('<svg class="drift-chart"') == 2 and "<rect class=\"validation\"" in watched_card
    assert 'class="day drifted"' in watched_card  # yesterday's line
    assert "Population stability index (PSI) per day" in watched_card and day in watched_card
    assert "validation_distributions" not in watched_card  # the raw numbers are plotted, not dumped
    for other in (old_id, broken_id):
        assert "Drift" not in cards[other] and "drift-chart" not in cards[other]

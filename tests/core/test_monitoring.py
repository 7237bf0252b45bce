"""Watching models in production: PSI, per-version prediction counts and daily drift against validation."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from core.db import Database
from core.migrate import upgrade
from core.models import Image, ImageStatus, ModelVersion, Prediction, Study
from core.monitoring import prediction_counts, version_drift
from core.stats import population_stability_index
from tests.conftest import make_settings

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)
#: Validation distributions as the trainer records them (k bins, k + 1 edges).
VALIDATION = {
    "confidence": {"edges": [0.5, 0.6, 0.7, 0.8, 0.9, 1.0], "counts": [10, 10, 20, 30, 30]},
    "unfamiliar_score": {"edges": [0.0, 10.0, 100.0, 1000.0], "counts": [70, 25, 5]},
}


def add_version(session: Session, metrics: dict[str, Any] | None = None, name: str = "monitored") -> ModelVersion:
    """A registered version row (no weights needed: nothing here runs the model)."""
    version = ModelVersion(name=name, architecture="test_efficientnet", labels=["fracture", "no_fracture"], preprocessing={},
                           threshold=0.9, weights_sha256="0" * 64, metrics=metrics or {})
    session.add(version)
    session.flush()
    return version


def add_predictions(session: Session, version: ModelVersion, rows: list[dict[str, Any]], created_at: datetime) -> None:
    """One study of done images with one prediction each, made by ``version`` at ``created_at``."""
    study = Study(name="monitoring", model_version_id=version.id)
    session.add(study)
    session.flush()
    images = [Image(study_id=study.id, filename=f"{index}.png", status=ImageStatus.DONE) for index in range(len(rows))]
    session.add_all(images)
    session.flush()
    session.add_all(
        Prediction(image_id=image.id, model_version_id=version.id, probabilities={}, label="fracture", created_at=created_at, **row)
        for image, row in zip(images, rows)
    )
    session.flush()


def spread(values_and_counts: list[tuple[float, int]], **fields: Any) -> list[dict[str, Any]]:
    """Prediction rows: ``count`` rows with confidence ``value`` for each pair."""
    return [{"confidence": value, **fields} for value, count in values_and_counts for _ in range(count)]


def test_psi_is_zero_for_identical_distributions_and_large_for_a_shift() -> None:
    validation = [10, 10, 20, 30, 30]
    assert population_stability_index(validation, validation) == pytest.approx(0.0, abs=1e-12)
    assert population_stability_index(validation, [2 * c for c in validation]) == pytest.approx(0.0, abs=1e-12)  # shares, not counts
    assert population_stability_index(validation, [11, 9, 21, 29, 30]) < 0.01
    shifted = population_stability_index(validation, [60, 20, 10, 5, 5])
    assert shifted > 0.2
    # An empty bin on one side is floored, not infinite.
    assert 0.2 < population_stability_index([50, 50, 0], [0, 50, 50]) < 20
    with pytest.raises(ValueError):
        population_stability_index([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        population_stability_index([1, 2], [0, 0])


def _drift_fixture(session: Session) -> tuple[ModelVersion, ModelVersion]:
    version = add_version(session, {"accuracy": 0.9, "validation_distributions": VALIDATION})
    other = add_version(session, name="no reference")  # registered before the trainer recorded distributions
    # Day 1 matches validation in both distributions; unfamiliar scores beyond the last edge count in the last bin.
    matching = spread([(0.55, 10), (0.65, 10), (0.75, 20), (0.85, 30), (0.95, 30)])
    for index, row in enumerate(matching):
        row["unfamiliar_score"] = 5.0 if index % 20 < 14 else (50.0 if index % 20 < 19 else 5000.0)
    add_predictions(session, version, matching, datetime(2026, 11, 24, 23, 30, tzinfo=timezone.utc))
    # Day 2: confidence shifted low (the unfamiliar scores still match, one value below the first edge).
    shifted = spread([(0.55, 60), (0.65, 20), (0.75, 10), (0.85, 5), (0.95, 5)])
    for index, row in enumerate(shifted):
        row["unfamiliar_score"] = -1.0 if index == 0 else (5.0 if index % 20 < 14 else (50.0 if index % 20 < 19 else 500.0))
    add_predictions(session, version, shifted, datetime(2026, 11, 25, 0, 15, tzinfo=timezone.utc))
    # Today: shifted, but too few predictions to judge; no unfamiliar scores at all (no reference then).
    add_predictions(session, version, spread([(0.55, 10)]), NOW - timedelta(hours=1))
    # Outside the 30-day window, and another version: neither counts.
    add_predictions(session, version, spread([(0.55, 80)]), NOW - timedelta(days=31))
    add_predictions(session, other, spread([(0.55, 80)]), datetime(2026, 11, 25, 9, 0, tzinfo=timezone.utc))
    return version, other


def _assert_drift(session: Session, version: ModelVersion, other: ModelVersion) -> None:
    drift = version_drift(session, version, psi_threshold=0.2, min_predictions=50, now=NOW)
    assert drift is not None
    confidence, unfamiliar = drift.distributions
    assert confidence.name == "confidence" and unfamiliar.name == "unfamiliar_score"
    assert [(d.day, d.n) for d in confidence.days] == [("2026-11-24", 100), ("2026-11-25", 100), ("2026-11-26", 10)]
    day1, day2, today = confidence.days
    assert day1.shares == pytest.approx([0.1, 0.1, 0.2, 0.3, 0.3])
    assert day1.psi == pytest.approx(0.0, abs=1e-9) and not day1.drifted
    assert day2.psi > 0.2 and day2.drifted
    assert today.psi > 0.2 and not today.enough and not today.drifted
    assert [(d.day, d.n) for d in unfamiliar.days] == [("2026-11-24", 100), ("2026-11-25", 100)]
    assert unfamiliar.days[0].shares == pytest.approx([0.7, 0.25, 0.05])
    assert unfamiliar.days[1].shares == pytest.approx([0.7, 0.25, 0.05])
    assert not any(d.drifted for d in unfamiliar.days)
    assert drift.warnings == [
        f"Drift: confidence distribution on 2026-11-25 differs from validation (PSI {day2.psi:.2f} > 0.20)"
    ]
    assert version_drift(session, other, psi_threshold=0.2, now=NOW) is None


def test_drift_flags_only_the_shifted_day_with_enough_predictions(db: Database) -> None:
    with db.transaction() as session:
        version, other = _drift_fixture(session)
        _assert_drift(session, version, other)


def test_drift_and_counts_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    """Same answers on PostgreSQL: UTC days whatever the server's zone, grouping on bound parameters."""
    settings = make_settings(tmp_path / "var", database_url=postgres_url)
    upgrade(settings.database_url)
    database = Database(settings)
    try:
        with database.transaction() as session:
            version, other = _drift_fixture(session)
            session.commit()
            # A zone where 2026-11-25 00:15 UTC is still the 24th: days must stay UTC days.
            session.execute(text("SET TIME ZONE 'America/New_York'"))
            _assert_drift(session, version, other)
            counts = {c.version_id: c for c in prediction_counts(session)}
            assert counts[version.id].predictions == 290
            assert counts[version.id].histograms["unfamiliar_score"].count == 200
            assert dict(counts[version.id].histograms["confidence"].buckets)[0.6] == 10 + 60 + 10 + 80
    finally:
        database.dispose()


@pytest.mark.parametrize(
    "distributions",
    [
        None,
        "not a mapping",
        {"confidence": {"edges": [0.5, 1.0], "counts": [1, 2]}},  # k + 1 edges needed
        {"confidence": {"edges": [1.0, 0.5, 0.2], "counts": [1, 2]}},  # not increasing
        {"confidence": {"edges": [0.5, 0.7, 1.0], "counts": [0, 0]}},  # nothing counted
        {"confidence": {"edges": ["a", "b"], "counts": [1]}},
        {"confidence": {"counts": [1]}},
    ],
)
def test_versions_without_a_usable_validation_distribution_have_no_drift(db: Database, distributions: Any) -> None:
    with db.transaction() as session:
        version = add_version(session, {"validation_distributions": distributions} if distributions is not None else {})
        add_predictions(session, version, spread([(0.55, 3)]), NOW)
        assert version_drift(session, version, psi_threshold=0.2, now=NOW) is None


def test_prediction_counts_are_cumulative_histograms_flags_and_audits_per_version(db: Database) -> None:
    with db.transaction() as session:
        version = add_version(session)
        add_predictions(session, version, [
            {"confidence": 0.55, "flagged": True, "flag_kind": "unsure", "decode_seconds": 0.002, "model_seconds": 0.0004},
            {"confidence": 0.95, "flagged": True, "flag_kind": "unfamiliar", "unfamiliar_score": 700.0},
            {"confidence": 0.6, "flagged": True},  # flagged before kinds were recorded: unsure
            {"confidence": 1.0, "audit": True, "unfamiliar_score": 3.0, "fracture_probability": 0.02},
        ], NOW)
        (counts,) = prediction_counts(session)
        assert counts.version_id == version.id and counts.predictions == 4
        assert counts.flagged == {"unsure": 2, "unfamiliar": 1} and counts.audit == 1
        confidence = dict(counts.histograms["confidence"].buckets)
        assert (confidence[0.5], confidence[0.6], confidence[0.9], confidence[0.95], confidence[1.0]) == (0, 2, 2, 3, 4)
        assert counts.histograms["confidence"].total == pytest.approx(3.1)
        unfamiliar = counts.histograms["unfamiliar_score"]
        assert unfamiliar.count == 2 and dict(unfamiliar.buckets)[5.0] == 1 and dict(unfamiliar.buckets)[1000.0] == 2
        assert counts.histograms["decode_seconds"].count == 1 and counts.histograms["model_seconds"].total == pytest.approx(0.0004)
        assert counts.histograms["fracture_probability"].count == 1

"""Audit sampling: a keyed, deterministic choice of unflagged images, at the configured rate."""

from __future__ import annotations

from core.audit_sampling import audit_draw, audit_ids, is_audit_sample
from core.stats import clopper_pearson_interval

KEY = "a test secret key"


def test_the_choice_is_deterministic_per_image_version_and_key() -> None:
    outcomes = [(image_id, False) for image_id in range(1, 2001)]
    first = audit_ids(KEY, 7, 0.3, outcomes)
    assert first == audit_ids(KEY, 7, 0.3, list(reversed(outcomes)))  # a redelivered task chooses the same
    assert all(0.0 <= audit_draw(KEY, 7, image_id) < 1.0 for image_id, _ in outcomes)
    assert audit_draw(KEY, 7, 42) == audit_draw(KEY, 7, 42)
    # Another model version or another key draws independently.
    assert audit_ids(KEY, 8, 0.3, outcomes) != first
    assert audit_ids(KEY + "x", 7, 0.3, outcomes) != first
    # A lower rate audits a subset of what a higher rate audits (the draw is fixed, the cut moves).
    assert audit_ids(KEY, 7, 0.1, outcomes) <= first


def test_rate_zero_audits_nothing_rate_one_every_unflagged_image_and_flagged_ones_never() -> None:
    outcomes = [(image_id, image_id % 3 == 0) for image_id in range(1, 601)]
    unflagged = {image_id for image_id, flagged in outcomes if not flagged}
    assert audit_ids(KEY, 1, 0.0, outcomes) == set()
    assert audit_ids(KEY, 1, 1.0, outcomes) == unflagged
    assert not any(is_audit_sample(KEY, 1, image_id, 0.0) for image_id in range(1, 601))
    assert all(is_audit_sample(KEY, 1, image_id, 1.0) for image_id in range(1, 601))
    assert audit_ids(KEY, 1, 0.5, outcomes) <= unflagged


def test_the_audited_share_matches_the_rate() -> None:
    n, rate = 20000, 0.02
    audited = len(audit_ids(KEY, 3, rate, [(image_id, False) for image_id in range(1, n + 1)]))
    low, high = clopper_pearson_interval(audited, n, 0.999)
    assert low <= rate <= high, (audited, n)

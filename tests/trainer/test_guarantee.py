"""The certified threshold keeps its promise on fresh data; the point estimate does not.

A known error model: a calibrated binary classifier whose top probability ``c`` is uniform on
[0.5, 1] and right with probability ``c``. Leaving unflagged the images with ``c >= t`` gives a
true error among them of exactly ``(1 - t) / 2``, so each repetition's realised risk is known.
"""

from __future__ import annotations

import numpy as np

from trainer.calibrate import certified_threshold, point_estimate_threshold

TARGET = 0.10
DELTA = 0.05


def _true_error(threshold: float) -> float:
    """Error among unflagged images of the known model when flagging confidence below ``threshold``."""
    return (1.0 - threshold) / 2.0 if threshold < 1.0 else 0.0


def test_bound_keeps_the_realised_error_within_target_in_95_percent_of_repetitions() -> None:
    rng = np.random.default_rng(20261126)
    repetitions, n = 300, 2000
    certified_ok = point_ok = certified_any = 0
    for _ in range(repetitions):
        confidence = rng.uniform(0.5, 1.0, n)
        correct = rng.uniform(size=n) < confidence
        threshold, bound = certified_threshold(confidence, correct, TARGET, DELTA)
        certified_any += threshold < 1.0
        certified_ok += _true_error(threshold) <= TARGET
        if threshold < 1.0:
            assert bound <= TARGET
        point_ok += _true_error(point_estimate_threshold(confidence, correct, TARGET)) <= TARGET
    # the promise: at least 1 - delta of the repetitions keep the error among unflagged <= target
    assert certified_ok / repetitions >= 1.0 - DELTA
    # and the promise is not bought by flagging everything: most repetitions certify a threshold
    assert certified_any / repetitions >= 0.9
    # the old point estimate breaks the target far more often than delta allows
    assert point_ok / repetitions < 0.8

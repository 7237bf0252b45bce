"""Temperature scaling fitted on the validation split, and the low-confidence threshold.

The worker flags an image when its top (temperature-scaled) probability is below the version's
threshold (:func:`core.ml.predict.flag_result`); here the threshold is chosen on validation data
with a stated guarantee: the error among unflagged images is at most the target with probability
``1 - delta`` (a Clopper–Pearson bound, selection with guaranteed risk), so its meaning is known
before the model serves.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np

from core.stats import clopper_pearson_upper

log = logging.getLogger(__name__)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``targets`` under temperature-scaled softmax."""
    probs = softmax(logits, temperature)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, None))))


def fit_temperature(logits: np.ndarray, targets: np.ndarray, low: float = 0.05, high: float = 20.0) -> float:
    """The temperature minimising validation NLL (log-grid search, then golden-section refinement).

    Deterministic and bounded to ``[low, high]``; returns 1.0 when there is no data.
    """
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if len(targets) == 0:
        return 1.0
    grid = np.exp(np.linspace(math.log(low), math.log(high), 121))
    losses = [nll(logits, targets, t) for t in grid]
    best = int(np.argmin(losses))
    a = math.log(grid[max(best - 1, 0)])
    b = math.log(grid[min(best + 1, len(grid) - 1)])
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        c = b - ratio * (b - a)
        d = a + ratio * (b - a)
        if nll(logits, targets, math.exp(c)) < nll(logits, targets, math.exp(d)):
            b = d
        else:
            a = c
    return float(math.exp((a + b) / 2))


@dataclass(frozen=True)
class ThresholdChoice:
    """The chosen threshold and what it gives on the split it was chosen on.

    For an error target, ``bound`` is the one-sided Clopper–Pearson upper bound (level
    ``1 - delta``, fixed-sequence tested) on the error among the unflagged images; ``met``
    (certified) when it is at most the target.
    """

    threshold: float
    target: str
    target_value: float
    met: bool
    coverage: float
    error_unflagged: float
    flag_rate: float
    bound: float = 1.0
    delta: float = 0.05
    n: int = 0

    def to_dict(self) -> dict[str, float | str | bool | int]:
        """Plain data for JSON and the registry."""
        return asdict(self)


def flag_stats(probs: np.ndarray, targets: np.ndarray, threshold: float, eligible: np.ndarray | None = None) -> tuple[float, float, float]:
    """``(coverage, error among unflagged, flag rate)`` when flagging top probability < threshold.

    ``eligible``: images not flagged for another reason (unfamiliar); the others count as flagged.
    """
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    unflagged = (confidence >= threshold) & (threshold < 1.0)  # 1.0 flags every image (flag_result)
    if eligible is not None:
        unflagged &= np.asarray(eligible, dtype=bool)
    coverage = float(unflagged.mean()) if len(targets) else 0.0
    error = float(1.0 - correct[unflagged].mean()) if unflagged.any() else 0.0
    return coverage, error, 1.0 - coverage


def point_estimate_threshold(confidence: np.ndarray, correct: np.ndarray, target_error: float) -> float:
    """The lowest threshold whose *observed* error among unflagged images is at most the target.

    This is what earlier versions used: it promises nothing beyond the validation images (on
    fresh data it exceeds the target about half the time; see :func:`certified_threshold`).
    Returns 1.0 when no threshold reaches the target.
    """
    order = np.argsort(-confidence, kind="stable")
    sorted_conf = confidence[order]
    errors = np.cumsum(~correct[order])
    count = np.arange(1, len(order) + 1)
    # leaving the top k unflagged works only where the next confidence is strictly lower (ties go together)
    ok = (errors / count <= target_error + 1e-12) & np.append(sorted_conf[1:] < sorted_conf[:-1], True)
    return float(sorted_conf[int(np.nonzero(ok)[0].max())]) if ok.any() else 1.0


#: Coverage added by each step of :func:`certified_threshold`'s fixed sequence.
CERTIFY_COVERAGE_STEP = 0.025


def certified_threshold(
    confidence: np.ndarray, correct: np.ndarray, target_error: float, delta: float = 0.05, step: float = CERTIFY_COVERAGE_STEP
) -> tuple[float, float]:
    """The lowest threshold whose error among unflagged images is certified: ``(threshold, bound)``.

    Selective classification with guaranteed risk (Geifman & El-Yaniv 2017) by fixed-sequence
    testing (Learn then Test, Angelopoulos et al. 2021). The candidates leave unflagged the ``k``
    most confident images, for ``k`` = twice the smallest count that could certify the target at
    all (with no error), then ``step`` of the images more at a time; they are tested in that
    order, each accepted when the one-sided Clopper–Pearson upper bound (level ``1 - delta``) on
    the error among the images it leaves unflagged is at most ``target_error``, and the sequence
    stops at the first failure. The order depends on no label, and because the sequence stops
    there no correction for the number of candidates is needed: with probability at least
    ``1 - delta`` the error among unflagged images of fresh data from the same distribution is at
    most the target (``tests/trainer/test_guarantee.py`` checks it). Returns ``(1.0, bound of the
    first candidate)`` when even the first cannot be certified.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    n = len(confidence)
    if n == 0 or not 0.0 < target_error < 1.0:
        return 1.0, 1.0
    order = np.argsort(-confidence, kind="stable")
    sorted_conf = confidence[order]
    errors = np.cumsum(~correct[order])
    smallest = math.ceil(math.log(delta) / math.log(1.0 - target_error))  # 0 errors in this many: bound = target
    counts = range(min(2 * smallest, n), n + 1, max(1, int(round(step * n))))
    best: tuple[float, float] | None = None
    first_bound = 1.0
    for index, count in enumerate(counts):
        threshold = float(sorted_conf[count - 1])
        kept = int(np.searchsorted(-sorted_conf, -threshold, side="right"))  # ties at the threshold pass together
        bound = clopper_pearson_upper(int(errors[kept - 1]), kept, delta)
        if index == 0:
            first_bound = bound
        if bound > target_error:
            break
        best = (threshold, bound)
    return best if best is not None else (1.0, first_bound)


def choose_threshold(
    probs: np.ndarray,
    targets: np.ndarray,
    target: str = "error",
    target_error: float = 0.05,
    target_flag_rate: float = 0.1,
    delta: float = 0.05,
    eligible: np.ndarray | None = None,
) -> ThresholdChoice:
    """Choose the flag threshold on (calibrated) validation probabilities.

    ``target="error"``: the lowest threshold whose error among unflagged images is *certified* at
    most ``target_error`` with probability ``1 - delta`` (:func:`certified_threshold`); when none
    is, 1.0 (flag all). ``target="flag_rate"``: the lowest threshold that flags at most
    ``target_flag_rate`` of images. ``eligible``: images not flagged as unfamiliar (only they can
    be left unflagged, so only they enter the certificate).
    """
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    eligible_mask = np.ones(len(targets), dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    bound = 1.0
    if target == "error":
        threshold, bound = certified_threshold(confidence[eligible_mask], correct[eligible_mask], target_error, delta)
        target_value = target_error
    elif target == "flag_rate":
        order = np.sort(confidence)[::-1]
        allowed_flags = int(math.floor(target_flag_rate * len(order) + 1e-9))
        keep = len(order) - allowed_flags
        threshold = 1.0 if keep <= 0 else float(order[keep - 1])
        target_value = target_flag_rate
    else:
        raise ValueError(f"unknown threshold target {target!r}; use error or flag_rate")
    coverage, error, flag_rate = flag_stats(probs, targets, threshold, eligible_mask)
    # flagging everything meets an error target only vacuously: report it as not met
    met = (bound <= target_value + 1e-12 and threshold < 1.0) if target == "error" else flag_rate <= target_value + 1e-12
    if not met:
        log.warning("threshold target %s <= %.3f not certified on validation; threshold %.4f", target, target_value, threshold)
    return ThresholdChoice(
        float(threshold), target, float(target_value), bool(met), coverage, error, flag_rate, float(bound), float(delta), int(eligible_mask.sum())
    )

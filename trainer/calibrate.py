"""Temperature scaling fitted on the validation split, and the low-confidence threshold.

The worker flags an image when its top (temperature-scaled) probability is below the version's
threshold (:func:`core.ml.predict.flag_result`); here the threshold is chosen on validation data
from a stated target, so its meaning is known before the model serves.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np

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
    """The chosen threshold and what it gives on the split it was chosen on."""

    threshold: float
    target: str
    target_value: float
    met: bool
    coverage: float
    error_unflagged: float
    flag_rate: float

    def to_dict(self) -> dict[str, float | str | bool]:
        """Plain data for JSON and the registry."""
        return asdict(self)


def flag_stats(probs: np.ndarray, targets: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """``(coverage, error among unflagged, flag rate)`` when flagging top probability < threshold."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    unflagged = confidence >= threshold
    coverage = float(unflagged.mean()) if len(targets) else 0.0
    error = float(1.0 - correct[unflagged].mean()) if unflagged.any() else 0.0
    return coverage, error, 1.0 - coverage


def choose_threshold(
    probs: np.ndarray, targets: np.ndarray, target: str = "error", target_error: float = 0.01, target_flag_rate: float = 0.1
) -> ThresholdChoice:
    """Choose the flag threshold on (calibrated) validation probabilities.

    ``target="error"``: the lowest threshold (most images left unflagged) whose error among
    unflagged images is at most ``target_error``; when no threshold reaches it, 1.0 (flag all).
    ``target="flag_rate"``: the lowest threshold that flags at most ``target_flag_rate`` of images.
    """
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    order = np.argsort(-confidence, kind="stable")
    sorted_conf = confidence[order]
    errors = np.cumsum(~correct[order])
    count = np.arange(1, len(order) + 1)
    if target == "error":
        # candidate thresholds are the observed confidences; leaving the top k unflagged works only
        # where the next confidence is strictly lower (ties are flagged or kept together)
        ok = (errors / count <= target_error + 1e-12) & np.append(sorted_conf[1:] < sorted_conf[:-1], True)
        found = bool(ok.any())
        if found:
            k = int(np.nonzero(ok)[0].max())
            threshold = float(sorted_conf[k])
        else:
            threshold = 1.0
        target_value = target_error
    elif target == "flag_rate":
        found = True
        allowed_flags = int(math.floor(target_flag_rate * len(order) + 1e-9))
        keep = len(order) - allowed_flags
        if keep <= 0:
            threshold = 1.0
        else:
            threshold = float(sorted_conf[keep - 1])
        target_value = target_flag_rate
    else:
        raise ValueError(f"unknown threshold target {target!r}; use error or flag_rate")
    coverage, error, flag_rate = flag_stats(probs, targets, threshold)
    # flagging everything meets an error target only vacuously: report it as not met
    met = (found and error <= target_value + 1e-12) if target == "error" else flag_rate <= target_value + 1e-12
    if not met:
        log.warning("threshold target %s <= %.3f not reachable on validation; threshold %.4f", target, target_value, threshold)
    return ThresholdChoice(threshold, target, float(target_value), bool(met), coverage, error, flag_rate)

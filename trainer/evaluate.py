"""Evaluation report: scikit-learn metrics, AUC, calibration error, flag statistics, plots.

Probabilities come from :class:`core.ml.predict.Predictor` (the worker's class) on tensors made by
the worker's transform, and flags from :func:`core.ml.predict.flag_result`, so the report describes
what the worker will do.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

from core.ml.predict import FLAG_UNFAMILIAR, FLAG_UNSURE, flag_result
from core.stats import clopper_pearson_interval, clopper_pearson_upper

log = logging.getLogger(__name__)


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-class confidence: sum over equal-width bins of |accuracy - confidence| x share."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    if len(targets) == 0:
        return 0.0
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == targets).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def reliability_bins(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> list[dict[str, float]]:
    """Per-bin confidence, accuracy and count, for the reliability diagram."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == targets).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        rows.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "count": int(members.sum()),
                "confidence": float(confidence[members].mean()) if members.any() else 0.0,
                "accuracy": float(correct[members].mean()) if members.any() else 0.0,
            }
        )
    return rows


def macro_auc(probs: np.ndarray, targets: np.ndarray, num_classes: int) -> float | None:
    """Macro one-vs-rest ROC AUC; None when a class is missing from ``targets``."""
    if len(np.unique(targets)) < num_classes:
        return None
    if num_classes == 2:
        return float(roc_auc_score(targets, probs[:, 1]))
    return float(roc_auc_score(targets, probs, multi_class="ovr", average="macro", labels=list(range(num_classes))))


def classification_report(
    probs: np.ndarray,
    targets: np.ndarray,
    labels: list[str],
    threshold: float,
    ece_bins: int = 15,
    unfamiliar_scores: np.ndarray | None = None,
    unfamiliar_cut: float | None = None,
    input_problems: list[str | None] | None = None,
) -> dict[str, Any]:
    """Every number of the report for one split, from (temperature-scaled) probabilities.

    Flags use :func:`core.ml.predict.flag_result`, the worker's rule (unfamiliar first, then
    unsure). The error among unflagged images comes with its exact 95 % interval and one-sided
    95 % upper bound (Clopper–Pearson), so a test figure says how far it can be trusted.
    """
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    n = len(labels)
    predicted = probs.argmax(axis=1) if len(targets) else np.zeros(0, dtype=np.int64)
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, predicted, labels=list(range(n)), zero_division=0
    )
    scores = [None] * len(targets) if unfamiliar_scores is None else [float(v) for v in unfamiliar_scores]
    problems = input_problems if input_problems is not None else [None] * len(targets)
    results = [flag_result(row, labels, threshold, score, unfamiliar_cut, problem) for row, score, problem in zip(probs, scores, problems)]
    flagged = np.array([r.flagged for r in results], dtype=bool)
    kinds = np.array([r.flag_kind or "" for r in results])
    correct = predicted == targets
    unflagged = ~flagged
    errors_unflagged = int((~correct[unflagged]).sum())
    low, high = clopper_pearson_interval(errors_unflagged, int(unflagged.sum()), 0.95)
    per_class_flag = {
        label: float(flagged[targets == i].mean()) if (targets == i).any() else 0.0 for i, label in enumerate(labels)
    }
    auc = macro_auc(probs, targets, n) if len(targets) else None
    share = (lambda mask: float(mask.mean())) if len(targets) else (lambda mask: 0.0)
    return {
        "n": int(len(targets)),
        "accuracy": float(accuracy_score(targets, predicted)) if len(targets) else 0.0,
        "per_class": {
            label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, label in enumerate(labels)
        },
        "macro_f1": float(np.mean(f1)),
        "confusion_matrix": confusion_matrix(targets, predicted, labels=list(range(n))).tolist(),
        "auc_macro_ovr": auc,
        "auc": auc,
        "ece": expected_calibration_error(probs, targets, ece_bins),
        "reliability": reliability_bins(probs, targets, ece_bins) if len(targets) else [],
        "threshold": float(threshold),
        "unfamiliar_cut": unfamiliar_cut,
        "coverage": share(unflagged),
        "unflagged": int(unflagged.sum()),
        "errors_unflagged": errors_unflagged,
        "error_unflagged": float(1.0 - correct[unflagged].mean()) if unflagged.any() else 0.0,
        "error_unflagged_interval": [low, high],
        "error_unflagged_bound": clopper_pearson_upper(errors_unflagged, int(unflagged.sum()), 0.05),
        "flag_rate": share(flagged),
        "flag_rate_by_reason": {FLAG_UNSURE: share(kinds == FLAG_UNSURE), FLAG_UNFAMILIAR: share(kinds == FLAG_UNFAMILIAR)},
        "unfamiliar_rate": share(kinds == FLAG_UNFAMILIAR),
        "flag_rate_per_class": per_class_flag,
    }


def format_report(report: dict[str, Any], labels: list[str], title: str = "test") -> str:
    """A human-readable summary of :func:`classification_report`."""
    auc = report.get("auc_macro_ovr")
    lines = [
        f"{title}: n={report['n']} accuracy={report['accuracy']:.4f} macro-F1={report['macro_f1']:.4f} "
        f"AUC={'n/a' if auc is None else f'{auc:.4f}'} ECE={report['ece']:.4f}",
        f"  threshold={report['threshold']:.4f} coverage={report['coverage']:.3f} "
        f"error among unflagged={report['error_unflagged']:.4f} (95% interval {report['error_unflagged_interval'][0]:.4f}-"
        f"{report['error_unflagged_interval'][1]:.4f}) flag rate={report['flag_rate']:.3f} "
        f"(unsure {report['flag_rate_by_reason'][FLAG_UNSURE]:.3f}, unfamiliar {report['unfamiliar_rate']:.3f})",
    ]
    for label in labels:
        row = report["per_class"][label]
        lines.append(
            f"  {label:>22}: precision={row['precision']:.3f} recall={row['recall']:.3f} f1={row['f1']:.3f} "
            f"n={row['support']} flagged={report['flag_rate_per_class'][label]:.3f}"
        )
    lines.append(f"  confusion matrix (rows true, cols predicted, order {labels}): {report['confusion_matrix']}")
    return "\n".join(lines)


def write_json(data: dict[str, Any], path: Path) -> Path:
    """Write ``data`` as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    return path


def save_plots(out_dir: Path, report: dict[str, Any], labels: list[str], history: list[dict[str, float]] | None = None) -> list[Path]:
    """Confusion matrix, reliability diagram and (when given) learning curves as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    matrix = np.array(report["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(4 + len(labels), 3.5 + len(labels)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="black")
    ax.set_title(f"confusion matrix (accuracy {report['accuracy']:.3f})")
    fig.tight_layout()
    written.append(out_dir / "confusion_matrix.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    rows = [r for r in report["reliability"] if r["count"]]
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.bar([(r["low"] + r["high"]) / 2 for r in rows], [r["accuracy"] for r in rows], width=1 / max(len(report["reliability"]), 1), alpha=0.6, edgecolor="k")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {report['ece']:.3f})")
    fig.tight_layout()
    written.append(out_dir / "reliability.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    if history:
        epochs = [h["epoch"] for h in history]
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
        left.plot(epochs, [h["train_loss"] for h in history], label="train")
        left.plot(epochs, [h["val_loss"] for h in history], label="val")
        left.set_title("loss")
        left.legend()
        right.plot(epochs, [h["train_acc"] for h in history], label="train")
        right.plot(epochs, [h["val_acc"] for h in history], label="val")
        right.set_title("accuracy")
        right.legend()
        for axis in (left, right):
            axis.set_xlabel("epoch")
        fig.tight_layout()
        written.append(out_dir / "learning_curves.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def evaluate_version(db: Any, settings: Any, version_id: int, data_dir: Path, split: str = "test") -> tuple[dict[str, Any], list[str]]:
    """Run registered version ``version_id`` on a data folder; returns ``(report, labels)``.

    ``data_dir`` is a data set (``DIR/{train,val,test}/<class>``: ``split`` is used) or a folder of
    class folders. Class folders must be among the version's labels. Images are decoded and
    preprocessed exactly as the worker does, with the version's temperature and threshold.

    Raises:
        RegistryError: when there is no such version.
        DataError: when a class folder is not one of the version's labels.
    """
    from core import registry
    from core.ml.runtimes import load_predictor
    from trainer.calibrate import softmax
    from trainer.data import DataError, eval_tensors, list_samples

    with db.transaction() as session:
        spec = registry.ModelSpec.from_version(registry.get_version(session, version_id))
    data_dir = Path(data_dir)
    root, split_name = (data_dir, split) if (data_dir / split).is_dir() else (data_dir.parent, data_dir.name)
    samples = list_samples(root, split_name, spec.labels)
    if not samples:
        raise DataError(f"no images found in {root / split_name}")
    predictor = load_predictor(spec, settings)  # the runtime the workers use (TRIAGE_RUNTIME)
    images, targets, _ = eval_tensors(samples, spec.preprocessing, settings.max_image_pixels)
    logits, features = predictor.predict_outputs(images)
    probs = softmax(logits, spec.temperature)
    scores = predictor.unfamiliar_scores(features)
    cut = predictor.reference.cut if predictor.reference is not None else None
    report = classification_report(
        probs, targets.numpy(), spec.labels, spec.threshold, unfamiliar_scores=scores, unfamiliar_cut=cut,
        input_problems=predictor.input_problems(images),
    )
    report["version_id"] = version_id
    return report, spec.labels

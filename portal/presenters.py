"""Plain-dict views of studies, images, predictions and model versions (for JSON and templates)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from flask import url_for
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from core.config import Settings
from core.models import Image, ModelVersion, Prediction, Study
from core.pixels import view_attributes
from core.reviewing import AuditEstimate, case_reason
from core.storage import image_store
from core.studies import study_counts, study_prediction, suspected_fracture_counts


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC (SQLite hands back naive datetimes that are UTC)."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat()


def model_summary(version: ModelVersion) -> dict[str, Any]:
    """The fields of a model version people and clients need to recognise it."""
    return {
        "id": version.id,
        "name": version.name,
        "display_name": version.display_name,
        "is_demo": version.is_demo,
        "is_production": version.is_production,
    }


def model_dict(version: ModelVersion) -> dict[str, Any]:
    """Everything the registry knows about a version, except its preprocessing internals."""
    return {
        **model_summary(version),
        "architecture": version.architecture,
        "labels": list(version.labels),
        "threshold": version.threshold,
        "temperature": version.temperature,
        "metrics": version.metrics or {},
        "weights_sha256": version.weights_sha256,
        "created_at": iso(version.created_at),
        "promoted_at": iso(version.promoted_at),
    }


_UNSET: Any = object()


def study_dict(session: Session, study: Study, suspected_fractures: int | None = _UNSET) -> dict[str, Any]:
    """A study's status and counts, with links to its status, results and page.

    ``suspected_fractures``: predictions of the study's version not labelled ``no_fracture`` (None
    when its labels have no ``no_fracture``); counted here unless the caller counted a whole list
    at once with :func:`core.studies.suspected_fracture_counts`.
    """
    if suspected_fractures is _UNSET:
        suspected_fractures = suspected_fracture_counts(session, [study])[study.id]
    return {
        "id": study.id,
        "name": study.name,
        "status": study.status.value,
        "rerun_of_id": study.rerun_of_id,
        "created_at": iso(study.created_at),
        "finished_at": iso(study.finished_at),
        "model_version": model_summary(study.model_version),
        "counts": study_counts(session, study.id),
        "suspected_fractures": suspected_fractures,
        "study_instance_uid": study.study_instance_uid,
        "modality": study.modality,
        "body_part": study.body_part,
        "study_date": study.study_date.isoformat() if study.study_date else None,
        "status_url": url_for("api.study_status", study_id=study.id),
        "results_url": url_for("api.study_results", study_id=study.id),
        "page_url": url_for("studies.study_page", study_id=study.id),
        "sr_url": url_for("api.study_report", study_id=study.id) if study.study_instance_uid else None,
    }


def study_images(session: Session, study: Study) -> list[Image]:
    """A study's images with their predictions and reviews loaded, in upload order."""
    return list(
        session.scalars(
            select(Image)
            .where(Image.study_id == study.id)
            .options(selectinload(Image.predictions), selectinload(Image.reviews))
            .order_by(Image.id)
        )
    )


def heatmap_state(prediction: Prediction, requested: bool = False) -> dict[str, Any]:
    """A prediction's heat map for the viewer: ``ready`` (with its url), ``failed`` (why), else ``absent``
    (``pending`` right after a request), and the class it explains in words."""
    state: dict[str, Any] = {"prediction_id": prediction.id, "explains": label_name(prediction.label)}
    if prediction.heatmap_key:
        return state | {"status": "ready", "url": url_for("studies.heatmap", prediction_id=prediction.id)}
    if prediction.heatmap_error and not requested:
        return state | {"status": "failed", "error": prediction.heatmap_error}
    return state | {"status": "pending" if requested else "absent"}


#: Most thumbnails in the viewer's strip of a study's images (the ones nearest the open image).
MAX_STRIP = 60


def study_strip(session: Session, image: Image) -> list[dict[str, Any]]:
    """The images of ``image``'s study for the viewer's thumbnail strip: thumbnail, name, whether it
    can be opened (classified) and which one is open; at most :data:`MAX_STRIP`, centred on ``image``."""
    rows = list(session.execute(
        select(Image.id, Image.filename, Image.status, Image.storage_key, Image.sop_class_uid, Image.photometric,
               Image.body_part).where(Image.study_id == image.study_id).order_by(Image.id)
    ))
    position = next((index for index, row in enumerate(rows) if row.id == image.id), 0)
    start = max(0, min(position - MAX_STRIP // 2, len(rows) - MAX_STRIP))
    strip = []
    for row in rows[start : start + MAX_STRIP]:
        strip.append({
            "image_id": row.id, "filename": row.filename, "current": row.id == image.id,
            "thumb_url": _shown_url(row.id, row.storage_key, bool(row.sop_class_uid or row.photometric)),
            "body_part": row.body_part, "status": row.status.value,
            "case_url": url_for("review.case", image_id=row.id) if row.status.value == "done" else None,
        })
    return strip


def dicom_attributes(settings: Settings, image: Image) -> dict[str, str]:
    """Body part, laterality, view and modality from a stored DICOM image's header (empty for other images)."""
    if not (image.storage_key and (image.sop_class_uid or image.photometric)):
        return {}
    return view_attributes(image_store(settings).path_for_key(image.storage_key))


def preview_url(image: Image) -> str | None:
    """Where a browser can show the image: the stored file, or a PNG rendering for DICOM."""
    return _shown_url(image.id, image.storage_key, bool(image.sop_class_uid or image.photometric))


def _shown_url(image_id: int, storage_key: str | None, dicom: bool) -> str | None:
    """The stored file itself, or a PNG rendering for DICOM (browsers cannot show it); None without a stored file."""
    if not storage_key:
        return None
    return url_for("studies.image_preview" if dicom else "studies.image_file", image_id=image_id)


def image_result(image: Image, model_version_id: int) -> dict[str, Any]:
    """One image's outcome: status or error, and the study model's prediction when there is one."""
    prediction = study_prediction(image, model_version_id)
    review = image.reviews[-1] if image.reviews else None
    return {
        "id": image.id,
        "filename": image.filename,
        "status": image.status.value,
        "error": image.error,
        "sha256": image.sha256,
        "width": image.width,
        "height": image.height,
        "label": prediction.label if prediction else None,
        "confidence": prediction.confidence if prediction else None,
        "probabilities": dict(prediction.probabilities) if prediction else None,
        "flagged": prediction.flagged if prediction else None,
        "flag_reason": prediction.flag_reason if prediction else None,
        "model_version_id": prediction.model_version_id if prediction else None,
        "review": {"label": review.label, "reviewer": review.reviewer_name, "created_at": iso(review.created_at)}
        if review
        else None,
        "file_url": url_for("studies.image_file", image_id=image.id) if image.storage_key else None,
        "preview_url": preview_url(image),
        "sop_instance_uid": image.sop_instance_uid,
        "sop_class_uid": image.sop_class_uid,
        "series_instance_uid": image.series_instance_uid,
        "study_instance_uid": image.study_instance_uid,
        "modality": image.modality,
        "body_part": image.body_part,
    }


#: Why a case is in the review queue, in words for people.
REASON_WORDS = {
    "unsure": "Model unsure",
    "unfamiliar": "Unfamiliar image",
    "audit": "Audit sample: random check of an unflagged image",
}
#: The same, short (menus).
REASON_NAMES = {"unsure": "Model unsure", "unfamiliar": "Unfamiliar image", "audit": "Audit sample"}
#: An image opened for review that the model neither flagged nor sampled for audit.
SPOT_CHECK_WORDS = "Not flagged: spot check"


def label_name(label: str | None) -> str:
    """A model label as people read it: ``no_fracture`` -> ``No fracture``."""
    if not label:
        return ""
    text = " ".join(str(label).replace("_", " ").split())
    return text[:1].upper() + text[1:]


def _percent_digits(value: float, digits: int) -> str:
    text = f"{100.0 * value:.{digits}f}"
    if digits and "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def percent_pair(value: float, reference: float) -> tuple[str, str]:
    """Both shares as :func:`percent` writes them, with more decimals where that alone would make them look equal.

    ``(0.9996, 0.9999)`` -> ``("99.96 %", "99.99 %")``, never "100 % below 100 %".
    """
    first, second = percent(value), percent(reference)
    digits = 1
    while first == second and value != reference and digits <= 4:
        digits += 1
        first, second = f"{_percent_digits(value, digits)} %", f"{_percent_digits(reference, digits)} %"
    return first, second


def reason_words(prediction: Prediction, threshold: float | None, short: bool = False) -> str:
    """Why a prediction is (or is not) a review case, in words, from its data rather than its stored text.

    "Model unsure: 76 % < 95 % needed", "Unfamiliar image" (``short``) or the worker's sentence with
    its score, "Audit sample: random check of an unflagged image", or "Not flagged: spot check".
    """
    reason = case_reason(prediction)
    if reason == "unsure":
        if threshold is None:
            return "Model unsure"
        confidence, needed = percent_pair(float(prediction.confidence), float(threshold))
        return f"Model unsure: {confidence} < {needed} needed"
    if reason == "unfamiliar":
        stored = prediction.flag_reason or ""
        if short or not stored.startswith("Unfamiliar image"):
            return "Unfamiliar image" if short else "Unfamiliar image: unlike the radiographs the model was trained on"
        return stored
    if reason == "audit":
        return REASON_WORDS["audit"]
    return SPOT_CHECK_WORDS


def review_case(image: Image, prediction: Prediction) -> dict[str, Any]:
    """A review case (flagged image or audit sample), with the model's probability for every class.

    ``reason`` is ``unsure``, ``unfamiliar`` or ``audit``; ``reason_text`` says it in words.
    """
    reason = case_reason(prediction)
    version = image.study.model_version
    labels = list(version.labels)
    probabilities = sorted(prediction.probabilities.items(), key=lambda item: item[1], reverse=True)
    return {
        "image_id": image.id,
        "study_id": image.study_id,
        "study_name": image.study.name,
        "filename": image.filename,
        "label": prediction.label,
        "confidence": prediction.confidence,
        "probabilities": dict(probabilities),
        "flag_reason": prediction.flag_reason,
        "reason": reason,
        "reason_text": reason_words(prediction, version.threshold) if reason else "",
        "audit": bool(prediction.audit),
        "fracture_probability": prediction.fracture_probability,
        "labels": labels,
        "model_version_id": prediction.model_version_id,
        "flagged_at": iso(prediction.created_at),
        "file_url": url_for("studies.image_file", image_id=image.id),
        "preview_url": preview_url(image),
        "review_url": url_for("api.review_image", image_id=image.id),
    }


def percent(value: float) -> str:
    """A share as people read it: ``61 %``, ``1.2 %``, ``8 %`` (one decimal under 10 %, never a 100 % that is not)."""
    return f"{percent_number(value)} %"


def percent_number(value: float) -> str:
    """:func:`percent` without the sign: ``61``, ``1.2``, ``8``, ``99.7``."""
    share = 100.0 * value
    if share < 9.95:
        text = f"{share:.1f}"
        return text[:-2] if text.endswith(".0") else text
    if share >= 99.5 and value < 1.0:
        return f"{min(share, 99.9):.1f}"
    return f"{share:.0f}"


def _number(mapping: dict[str, Any], key: str) -> float | None:
    value = mapping.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def held_out_sentence(metrics: dict[str, Any]) -> str | None:
    """The held-out test results of a version in words, from ``metrics["test"]``; None without them.

    "On 767 held-out images: 61 % accepted without review, 1.2 % of those wrong (95 % bound 2.4 %);
    39 % sent to review (31 % unsure, 8 % unfamiliar)." Missing figures are left out.
    """
    test = metrics.get("test") if isinstance(metrics, dict) else None
    if not isinstance(test, dict):
        return None
    n, coverage = _number(test, "n"), _number(test, "coverage")
    error, bound, flag_rate = _number(test, "error_unflagged"), _number(test, "error_unflagged_bound"), _number(test, "flag_rate")
    clauses = []
    accepted = []
    if coverage == 0:  # nothing accepted: an error "among" no images says nothing
        accepted.append("none accepted without review")
    elif coverage is not None:
        accepted.append(f"{percent(coverage)} accepted without review")
    if error is not None and coverage != 0:
        wrong = f"{percent(error)} of those wrong" if coverage is not None else f"{percent(error)} of unflagged images wrong"
        accepted.append(wrong + (f" (95 % bound {percent(bound)})" if bound is not None else ""))
    if accepted:
        clauses.append(", ".join(accepted))
    if flag_rate is not None:
        by_reason = test.get("flag_rate_by_reason")
        parts = [f"{percent(share)} {reason}" for reason in ("unsure", "unfamiliar")
                 if isinstance(by_reason, dict) and (share := _number(by_reason, reason)) is not None]
        clauses.append(f"{percent(flag_rate)} sent to review" + (f" ({', '.join(parts)})" if parts else ""))
    if not clauses:
        return None
    head = f"On {int(n):,} held-out images" if n is not None else "On held-out images"
    return f"{head}: {'; '.join(clauses)}."


def guarantee_sentence(metrics: dict[str, Any]) -> str | None:
    """The promise certified at validation, in words, from ``metrics["guarantee"]``; None without it.

    "Promise made at validation: error among unflagged images ≤ 5 % with 95 % confidence (bound
    4.1 % on 615 images)", or the same promise marked not certified.
    """
    guarantee = metrics.get("guarantee") if isinstance(metrics, dict) else None
    if not isinstance(guarantee, dict):
        return None
    target = _number(guarantee, "target_error")
    if target is None or not isinstance(guarantee.get("certified"), bool):
        return None
    delta, bound, n = _number(guarantee, "delta"), _number(guarantee, "bound"), _number(guarantee, "n")
    promise = f"error among unflagged images ≤ {percent(target)}"
    if delta is not None:
        promise += f" with {percent(1.0 - delta)} confidence"
    evidence = []
    if bound is not None:
        evidence.append(f"bound {percent(bound)}")
    if n is not None:
        evidence.append(f"on {int(n):,} images")
    detail = f" ({' '.join(evidence)})" if evidence else ""
    if guarantee["certified"]:
        return f"Promise made at validation: {promise}{detail}"
    return f"Promise made at validation: not certified: {promise} could not be shown{detail}"


def audit_sentence(estimate: AuditEstimate) -> str:
    """What reviewed audit cases say about the error among unflagged images, in words."""
    if not estimate.reviewed or estimate.rate is None or estimate.low is None or estimate.high is None:
        return "No reviewed audit cases yet"
    return (
        f"Audit on your patients: {estimate.wrong:,} of {estimate.reviewed:,} audited images wrong, "
        f"{percent(estimate.rate)} ({percent(estimate.confidence)} interval "
        f"{percent_number(estimate.low)}–{percent(estimate.high)})"
    )


def model_trust(version: ModelVersion, estimate: AuditEstimate) -> dict[str, Any]:
    """What the models page says about how far a version can be trusted, as sentences (None: unknown)."""
    metrics = version.metrics if isinstance(version.metrics, dict) else {}
    test = metrics.get("test") if isinstance(metrics.get("test"), dict) else {}
    accuracy, auc = _number(test, "accuracy"), _number(test, "auc_macro_ovr")
    scores = []
    if accuracy is not None:
        scores.append(f"accuracy {100 * accuracy:.1f} %")  # one decimal: versions are compared on it
    if auc is not None:
        scores.append(f"AUC {auc:.3f} (macro, one-vs-rest)")
    return {
        "test": held_out_sentence(metrics),
        "scores": ("Held-out " + ", ".join(scores) + ".") if scores else None,
        "guarantee": guarantee_sentence(metrics),
        "audit": audit_sentence(estimate),
        "audit_reviewed": estimate.reviewed,
    }


#: Metrics the models page leaves to other sections (drift plots) or to the run folder (per-bin curves).
HIDDEN_METRICS = frozenset({"validation_distributions", "reliability"})
_SHARE_WORDS = ("accuracy", "rate", "coverage", "error", "precision", "recall", "f1", "bound", "ece", "share", "threshold",
                "target", "delta", "auc")


def metric_name(key: str) -> str:
    """A metrics key as a heading: ``error_unflagged_bound`` -> ``Error unflagged bound``; ``auc_macro_ovr`` keeps AUC."""
    text = label_name(key)
    for short in ("Auc", "auc", "Ece", "ece", "F1", "Ovr", "ovr"):
        text = " ".join(word.upper() if word == short else word for word in text.split())
    return text


def metric_value(key: str, value: Any) -> str:
    """One metric for people: shares as percent, counts with separators, other numbers to 4 digits."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        lowered = key.lower()
        if 0.0 <= value <= 1.0 and any(word in lowered for word in _SHARE_WORDS) and "auc" not in lowered:
            return percent(value)
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        if len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) and "interval" in key:
            return f"{metric_value(key, float(value[0]))} – {metric_value(key, float(value[1]))}"
        return ", ".join(metric_value(key, v) for v in value) if all(not isinstance(v, (dict, list)) for v in value) else f"{len(value)} items"
    return str(value)


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, (dict, list, tuple)) or (
        isinstance(value, (list, tuple)) and all(not isinstance(v, (dict, list, tuple)) for v in value))


def metrics_sections(metrics: dict[str, Any] | None, labels: list[str] | None = None) -> list[dict[str, Any]]:
    """A version's metrics as tables, never a JSON blob.

    Returns sections ``{"title", "rows": [(name, text)], "grid": {"columns", "rows": [(name, [text])]} | None}``:
    top-level figures first, then one section per group (``test``, ``guarantee``...), a group of
    per-label figures (``per_class``) and a confusion matrix as grids.
    """
    if not isinstance(metrics, dict):
        return []
    top: list[tuple[str, str]] = []
    sections: list[dict[str, Any]] = []

    def visit(title: str, group: dict[str, Any]) -> None:
        rows: list[tuple[str, str]] = []
        grids: list[dict[str, Any]] = []
        nested: list[tuple[str, Any]] = []
        for key in sorted(group):
            if key in HIDDEN_METRICS:
                continue
            value = group[key]
            if key == "confusion_matrix" and isinstance(value, list) and all(isinstance(r, list) for r in value):
                names = [label_name(label) for label in (labels or [])]
                if len(names) != len(value):
                    names = [str(i + 1) for i in range(len(value))]
                grids.append({"title": f"{title} › confusion matrix (true ↓, predicted →)", "rows": [],
                              "grid": {"columns": names,
                                       "rows": [(names[i], [f"{int(c):,}" for c in row]) for i, row in enumerate(value)]}})
            elif isinstance(value, dict) and value and all(
                    isinstance(v, dict) and all(_is_scalar(x) for x in v.values()) for v in value.values()):
                columns = sorted({c for v in value.values() for c in v})
                grids.append({"title": f"{title} › {metric_name(key).lower()}", "rows": [], "grid": {
                    "columns": [metric_name(c) for c in columns],
                    "rows": [(label_name(name), [metric_value(c, v.get(c)) for c in columns]) for name, v in value.items()]}})
            elif isinstance(value, dict):
                nested.append((key, value))
            elif _is_scalar(value):
                rows.append((metric_name(key), metric_value(f"{title} {key}", value)))  # "flag rate by reason › unsure" is a share
            else:
                rows.append((metric_name(key), f"{len(value)} items"))
        if rows:
            sections.append({"title": title, "rows": rows, "grid": None})
        sections.extend(grids)
        for key, value in nested:
            visit(f"{title} › {metric_name(key).lower()}", value)

    scalars = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    groups = {k: v for k, v in metrics.items() if isinstance(v, dict)}
    for key in sorted(scalars):
        if key in HIDDEN_METRICS:
            continue
        value = scalars[key]
        top.append((metric_name(key), metric_value(key, value) if _is_scalar(value) else f"{len(value)} items"))
    result = [{"title": "", "rows": top, "grid": None}] if top else []
    for key in sorted(groups):
        if key in HIDDEN_METRICS:
            continue
        visit(metric_name(key), groups[key])
    return result + sections


def register_filters(app: Any) -> None:
    """Template filters for one way of writing things: ``pct`` (76 %), ``label_name`` (No fracture)."""
    app.add_template_filter(lambda value: "—" if value is None else percent(float(value)), "pct")
    app.add_template_filter(label_name, "label_name")


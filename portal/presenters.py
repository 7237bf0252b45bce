"""Plain-dict views of studies, images, predictions and model versions (for JSON and templates)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from flask import url_for
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from core.models import Image, ModelVersion, Prediction, Study
from core.studies import study_counts, study_prediction


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


def study_dict(session: Session, study: Study) -> dict[str, Any]:
    """A study's status and counts, with links to its status, results and page."""
    return {
        "id": study.id,
        "name": study.name,
        "status": study.status.value,
        "rerun_of_id": study.rerun_of_id,
        "created_at": iso(study.created_at),
        "finished_at": iso(study.finished_at),
        "model_version": model_summary(study.model_version),
        "counts": study_counts(session, study.id),
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


def preview_url(image: Image) -> str | None:
    """Where a browser can show the image: the stored file, or a PNG rendering for DICOM."""
    if not image.storage_key:
        return None
    if image.sop_class_uid or image.photometric:
        return url_for("studies.image_preview", image_id=image.id)
    return url_for("studies.image_file", image_id=image.id)


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


def review_case(image: Image, prediction: Prediction) -> dict[str, Any]:
    """A flagged image waiting for review, with the model's probability for every class."""
    labels = list(image.study.model_version.labels)
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
        "labels": labels,
        "model_version_id": prediction.model_version_id,
        "flagged_at": iso(prediction.created_at),
        "file_url": url_for("studies.image_file", image_id=image.id),
        "preview_url": preview_url(image),
        "review_url": url_for("api.review_image", image_id=image.id),
    }

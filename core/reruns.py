"""Re-run a study with another model version, and compare the versions side by side.

A re-run is a new study that references the original (``rerun_of_id``) with new image rows that
reuse the stored bytes (same sha256 and storage key: nothing is uploaded again). Results are matched
across versions by sha256.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from core.models import Image, ImageStatus, ModelVersion, Study
from core.studies import create_study, finish_study_if_complete, study_prediction

DICOM_COLUMNS = ("sop_class_uid", "sop_instance_uid", "series_instance_uid", "study_instance_uid", "modality",
                 "body_part", "photometric", "bits_stored", "patient_key")


@dataclass
class Rerun:
    """The new study and the ids of its images to queue."""

    study: Study
    queued_ids: list[int]


def root_study(session: Session, study: Study) -> Study:
    """The original study of a re-run group (a study that is not a re-run is its own root)."""
    if study.rerun_of_id is None:
        return study
    return session.get(Study, study.rerun_of_id) or study


def rerun_study(session: Session, original: Study, version: ModelVersion, created_by_id: int | None = None) -> Rerun:
    """Create a re-run of ``original``'s stored images with ``version`` (the caller commits, then enqueues).

    Raises:
        ValueError: when ``version`` is the one the study already used, or no image has stored bytes.
    """
    root = root_study(session, original)
    if version.id == original.model_version_id:
        raise ValueError(f"study #{original.id} was already classified with model version #{version.id}")
    sources = [image for image in root.images if image.storage_key and image.sha256]
    if not sources:
        raise ValueError(f"study #{root.id} has no stored images to re-run")
    study = create_study(session, f"{root.name} (re-run with model #{version.id})", version, created_by_id)
    study.rerun_of_id = root.id
    study.group_id = root.group_id  # a re-run stays with its original's group, whoever started it
    study.study_instance_uid, study.modality = root.study_instance_uid, root.modality
    study.body_part, study.study_date = root.body_part, root.study_date
    copies = [
        Image(study_id=study.id, filename=image.filename, sha256=image.sha256, storage_key=image.storage_key,
              size_bytes=image.size_bytes, width=image.width, height=image.height, status=ImageStatus.QUEUED,
              **{column: getattr(image, column) for column in DICOM_COLUMNS})
        for image in sources
    ]
    session.add_all(copies)
    session.flush()
    if not copies:
        finish_study_if_complete(session, study.id)
    return Rerun(study=study, queued_ids=[image.id for image in copies])


def comparison(session: Session, study: Study) -> dict[str, Any] | None:
    """Side-by-side results of a study and its re-runs, rows matched by sha256; None without re-runs.

    Returns ``{"studies": [Study...], "rows": [{"sha256", "filename", "cells": [dict|None per study]}]}``.
    """
    root = root_study(session, study)
    group = [root] + list(
        session.scalars(select(Study).where(Study.rerun_of_id == root.id).order_by(Study.id))
    )
    if len(group) < 2:
        return None
    by_study: list[dict[str, dict[str, Any]]] = []
    for member in group:
        images = session.scalars(
            select(Image).where(Image.study_id == member.id).options(selectinload(Image.predictions)).order_by(Image.id)
        )
        cells: dict[str, dict[str, Any]] = {}
        for image in images:
            if not image.sha256 or image.sha256 in cells:
                continue
            prediction = study_prediction(image, member.model_version_id)
            cells[image.sha256] = {
                "image_id": image.id, "status": image.status.value,
                "label": prediction.label if prediction else None,
                "confidence": prediction.confidence if prediction else None,
                "flagged": prediction.flagged if prediction else None,
            }
        by_study.append(cells)
    rows = []
    for image in root.images:
        if not image.sha256:
            continue
        cells_for = [cells.get(image.sha256) for cells in by_study]
        labels = {c["label"] for c in cells_for if c and c["label"]}
        rows.append({"sha256": image.sha256, "filename": image.filename, "cells": cells_for, "disagree": len(labels) > 1})
    return {"studies": group, "rows": rows}

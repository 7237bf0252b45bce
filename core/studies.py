"""Study and image services shared by the portal and the worker (no torch, no Flask)."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core.config import Settings
from core.dicom import DicomMetadata, UploadGroup, read_metadata
from core.imaging import ImageDecodeError, inspect_image, is_dicom
from core.models import Image, ImageStatus, ModelVersion, Prediction, Review, Study, StudyStatus, utcnow
from core.storage import ContentStore

log = logging.getLogger(__name__)

TERMINAL = (ImageStatus.DONE, ImageStatus.FAILED)
#: The label whose absence is a suspected fracture (as ``core.ml.predict.NO_FRACTURE_LABEL``; no torch here).
NO_FRACTURE_LABEL = "no_fracture"


def image_store(settings: Settings) -> ContentStore:
    """The content-addressed store of uploaded images."""
    assert settings.storage_dir is not None
    return ContentStore(settings.storage_dir)


def create_study(session: Session, name: str, model_version: ModelVersion, created_by_id: int | None = None) -> Study:
    """A new, empty study that will be classified with ``model_version``."""
    study = Study(name=name[:200] or "Untitled study", model_version_id=model_version.id, created_by_id=created_by_id)
    session.add(study)
    session.flush()
    return study


def create_dicom_study(
    session: Session, name: str, model_version: ModelVersion, group: UploadGroup, created_by_id: int | None = None
) -> Study:
    """A new, empty study for one group of an upload, with the group's DICOM study attributes."""
    study = create_study(session, name, model_version, created_by_id=created_by_id)
    study.study_instance_uid = group.study_instance_uid
    study.modality, study.body_part, study.study_date = group.modality, group.body_part, group.study_date
    session.flush()
    return study


def _apply_dicom_metadata(image: Image, metadata: DicomMetadata) -> None:
    image.sop_class_uid = metadata.sop_class_uid
    image.sop_instance_uid = metadata.sop_instance_uid
    image.series_instance_uid = metadata.series_instance_uid
    image.study_instance_uid = metadata.study_instance_uid
    image.modality = metadata.modality
    image.body_part = metadata.body_part
    image.photometric = metadata.photometric
    image.bits_stored = metadata.bits_stored
    image.patient_key = metadata.patient_key


def add_upload(
    session: Session, settings: Settings, study: Study, filename: str, data: bytes, metadata: DicomMetadata | None = None,
    flush: bool = True,
) -> Image:
    """Check one uploaded file and record it in ``study``.

    With ``flush=False`` the row gets its id at the caller's next flush: a batch upload then
    inserts all its rows in one round trip instead of one per file.

    A usable image is stored by content hash and queued; anything else is recorded as a failed
    image with a message saying why, so the user sees every file they sent. For a DICOM file the
    header's UIDs, modality and body part are recorded (``metadata``, read here when not given),
    with a keyed hash of the patient identifier; the stored bytes are the original file.
    """
    display_name = (filename or "unnamed").replace("\x00", "")[-500:]
    image = Image(study_id=study.id, filename=display_name, size_bytes=len(data))
    if metadata is None and is_dicom(data):
        metadata = read_metadata(data, settings.secret_key)
    if metadata is not None:
        _apply_dicom_metadata(image, metadata)
    max_bytes = settings.max_file_mb * 1024 * 1024
    try:
        if len(data) > max_bytes:
            raise ImageDecodeError(f"file too large: {len(data):,} bytes, limit {max_bytes:,} (TRIAGE_MAX_FILE_MB)")
        info = inspect_image(data, settings.max_image_pixels)
    except ImageDecodeError as exc:
        image.status = ImageStatus.FAILED
        image.error = str(exc)
    else:
        image.sha256, image.storage_key = image_store(settings).put_bytes(data)
        image.width, image.height = info.width, info.height
        image.status = ImageStatus.QUEUED
    session.add(image)
    if flush:
        session.flush()
    return image


def queued_image_ids(session: Session, study_id: int) -> list[int]:
    """Ids of a study's images still waiting for the worker."""
    return list(
        session.scalars(
            select(Image.id).where(Image.study_id == study_id, Image.status == ImageStatus.QUEUED).order_by(Image.id)
        )
    )


@dataclass(frozen=True)
class ClaimedImage:
    """An image a worker is about to classify: its id and where its bytes are."""

    id: int
    storage_key: str | None


@dataclass
class ClaimedChunk:
    """Images of a chunk the worker should process now, and the ids of those it gave up on."""

    images: list[ClaimedImage]
    gave_up: list[int]


def claim_images(session: Session, study_id: int, image_ids: Sequence[int], max_attempts: int) -> ClaimedChunk:
    """Mark a chunk's unfinished images as processing and count the attempt.

    Images already done or failed are skipped (a redelivered task changes nothing). An image whose
    attempts reached ``max_attempts`` (it keeps killing the worker) is failed instead of retried.
    One SELECT and one UPDATE for the whole chunk (plus one per image given up on, which is rare).
    """
    rows = session.execute(
        select(Image.id, Image.storage_key, Image.attempts)
        .where(Image.study_id == study_id, Image.id.in_(list(image_ids)), Image.status.not_in(TERMINAL))
        .order_by(Image.id)
    ).all()
    chunk = ClaimedChunk(images=[], gave_up=[])
    for row in rows:
        if row.attempts >= max_attempts:
            session.execute(
                update(Image)
                .where(Image.id == row.id)
                .values(status=ImageStatus.FAILED, error=f"gave up after {row.attempts} attempts: the worker stopped while processing this image")
                .execution_options(synchronize_session=False)
            )
            chunk.gave_up.append(row.id)
        else:
            chunk.images.append(ClaimedImage(row.id, row.storage_key))
    if chunk.images:
        # updated_at is refreshed too (its onupdate): the reconciler measures "processing too long" from it.
        session.execute(
            update(Image)
            .where(Image.id.in_([image.id for image in chunk.images]))
            .values(attempts=Image.attempts + 1, status=ImageStatus.PROCESSING)
            .execution_options(synchronize_session=False)
        )
    session.execute(
        update(Study).where(Study.id == study_id, Study.status == StudyStatus.QUEUED).values(status=StudyStatus.PROCESSING)
    )
    return chunk


def _insert_ignoring_duplicates(session: Session, values: list[dict[str, Any]]) -> None:
    dialect = session.get_bind().dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect]
    # One cached statement executed with many parameter sets ("insertmanyvalues" batching).
    statement = insert(Prediction).on_conflict_do_nothing(index_elements=["image_id", "model_version_id"])
    session.execute(statement, values)


def save_predictions(
    session: Session,
    model_version_id: int,
    results: Sequence[tuple[Image | ClaimedImage, Any]],
    audit_ids: Collection[int] = (),
    seconds: dict[int, tuple[float, float]] | None = None,
) -> None:
    """Write one prediction per (image, version) and mark the images done; duplicates are ignored.

    ``results`` pairs each image with a :class:`core.ml.predict.PredictionResult` (or any object
    with its attributes). ``audit_ids``: images sent to review as audit samples. ``seconds``: per
    image id, ``(decode seconds, model seconds)``. One multi-row INSERT and one UPDATE per call,
    whatever the batch size.
    """
    if not results:
        return
    now = utcnow()
    seconds = seconds or {}
    _insert_ignoring_duplicates(
        session,
        [
            {
                "image_id": image.id,
                "model_version_id": model_version_id,
                "probabilities": result.probabilities,
                "label": result.label,
                "confidence": result.confidence,
                "flagged": result.flagged,
                "flag_reason": result.flag_reason,
                "flag_kind": getattr(result, "flag_kind", None),
                "unfamiliar_score": getattr(result, "unfamiliar_score", None),
                "fracture_probability": getattr(result, "fracture_probability", None),
                "audit": image.id in audit_ids,
                "decode_seconds": seconds.get(image.id, (None, None))[0],
                "model_seconds": seconds.get(image.id, (None, None))[1],
                "created_at": now,
            }
            for image, result in results
        ],
    )
    session.execute(
        update(Image)
        .where(Image.id.in_([image.id for image, _ in results]))
        .values(status=ImageStatus.DONE, error=None, updated_at=now)
        .execution_options(synchronize_session="evaluate")
    )


def fail_image(session: Session, image_id: int, message: str) -> None:
    """Mark one image failed with a message for the user."""
    session.execute(
        update(Image)
        .where(Image.id == image_id)
        .values(status=ImageStatus.FAILED, error=message[:2000])
        .execution_options(synchronize_session=False)
    )


def finish_study_if_complete(session: Session, study_id: int) -> bool:
    """Mark the study done when every image is done or failed; returns whether it is done."""
    remaining = session.scalar(
        select(func.count()).select_from(Image).where(Image.study_id == study_id, Image.status.not_in(TERMINAL))
    )
    if remaining:
        return False
    session.execute(
        update(Study)
        .where(Study.id == study_id, Study.status != StudyStatus.DONE)
        .values(status=StudyStatus.DONE, finished_at=utcnow())
    )
    session.flush()
    return True


def study_counts(session: Session, study_id: int) -> dict[str, int]:
    """Counts of a study's images per status, plus ``total`` and ``flagged``."""
    counts = {status.value: 0 for status in ImageStatus}
    for status, count in session.execute(
        select(Image.status, func.count()).where(Image.study_id == study_id).group_by(Image.status)
    ):
        counts[ImageStatus(status).value] = count
    counts["total"] = sum(counts[s.value] for s in ImageStatus)
    study = session.get(Study, study_id)
    counts["flagged"] = session.scalar(
        select(func.count())
        .select_from(Prediction)
        .join(Image, Image.id == Prediction.image_id)
        .where(Image.study_id == study_id, Prediction.flagged.is_(True), Prediction.model_version_id == study.model_version_id)
    ) if study else 0
    return counts


def suspected_fracture_counts(session: Session, studies: Sequence[Study]) -> dict[int, int | None]:
    """Per study id: predictions by the study's model version whose label is not ``no_fracture``.

    None for a study whose version has no ``no_fracture`` label (nothing to count against). One
    grouped query for all ``studies``.
    """
    counts: dict[int, int | None] = {
        study.id: 0 if NO_FRACTURE_LABEL in (study.model_version.labels or []) else None for study in studies
    }
    countable = [study_id for study_id, count in counts.items() if count is not None]
    if countable:
        for study_id, count in session.execute(
            select(Image.study_id, func.count())
            .select_from(Prediction)
            .join(Image, Image.id == Prediction.image_id)
            .join(Study, Study.id == Image.study_id)
            .where(Image.study_id.in_(countable), Prediction.model_version_id == Study.model_version_id,
                   Prediction.label != NO_FRACTURE_LABEL)
            .group_by(Image.study_id)
        ):
            counts[study_id] = int(count)
    return counts


def study_prediction(image: Image, model_version_id: int) -> Prediction | None:
    """The image's prediction by ``model_version_id``, if any."""
    return next((p for p in image.predictions if p.model_version_id == model_version_id), None)


def review_queue(
    session: Session, study_id: int | None = None, include_reviewed: bool = False, order: str = "oldest"
) -> list[tuple[Image, Prediction]]:
    """Review cases with their prediction: flagged images and audit samples of each study's model version.

    ``order``: ``oldest`` first or ``suspicious`` first (fracture probability, highest first, then
    oldest); reviewed cases are left out unless asked. See :func:`core.reviewing.flagged_cases`.

    Raises:
        ValueError: for an unknown ``order``.
    """
    from core.reviewing import flagged_cases  # here, not at the top: it loads scipy, which the worker does not need

    return flagged_cases(session, study_id=study_id, include_reviewed=include_reviewed, order=order)


def record_review(session: Session, image: Image, label: str, reviewer_name: str, note: str | None = None, reviewer_id: int | None = None) -> Review:
    """Record a reviewer's label for ``image``.

    Raises:
        ValueError: when ``label`` is not one of the study's model labels.
    """
    labels = image.study.model_version.labels
    if label not in labels:
        raise ValueError(f"label must be one of {', '.join(labels)}; got {label!r}")
    review = Review(image_id=image.id, label=label, reviewer_name=reviewer_name[:80] or "anonymous", note=note or None, reviewer_id=reviewer_id)
    session.add(review)
    session.flush()
    return review

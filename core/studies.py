"""Study and image services shared by the portal and the worker (no torch, no Flask)."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import case, exists, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core.config import Settings
from core.dicom import DicomMetadata, UploadGroup, read_metadata
from core.imaging import ImageDecodeError, inspect_image, is_dicom
from core.leases import owner_is_gone, process_identity
from core.models import Image, ImageStatus, ModelVersion, Prediction, Review, Study, StudyStatus, utcnow
from core.storage import image_store

log = logging.getLogger(__name__)

TERMINAL = (ImageStatus.DONE, ImageStatus.FAILED)
#: The label whose absence is a suspected fracture (as ``core.ml.predict.NO_FRACTURE_LABEL``; no torch here).
NO_FRACTURE_LABEL = "no_fracture"


def create_study(session: Session, name: str, model_version: ModelVersion, created_by_id: int | None = None) -> Study:
    """A new, empty study that will be classified with ``model_version``, in its creator's group."""
    from core.groups import group_of_user

    study = Study(name=name[:200] or "Untitled study", model_version_id=model_version.id, created_by_id=created_by_id,
                  group_id=group_of_user(session, created_by_id))
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


def file_too_large(size_bytes: int, max_bytes: int, what: str = "") -> str:
    """The message for a file over ``TRIAGE_MAX_FILE_MB`` (``what`` qualifies the size, e.g. "declared by the zip")."""
    qualifier = f" {what}" if what else ""
    return f"file too large: {size_bytes:,} bytes{qualifier}, limit {max_bytes:,} (TRIAGE_MAX_FILE_MB)"


#: The largest value of ``images.size_bytes`` (a 32-bit integer column).
MAX_RECORDED_SIZE = 2**31 - 1


def _display_name(filename: str | None) -> str:
    return (filename or "unnamed").replace("\x00", "")[-500:]


def add_refused_upload(
    session: Session, study: Study, filename: str, size_bytes: int, reason: str, flush: bool = True
) -> Image:
    """Record a file refused before it was read in full (too large, not an image) as a failed image of ``study``.

    Nothing is stored; the image keeps its display name, its (declared) size and ``reason``, so the
    user sees it beside the files that were read. A declared size beyond the 32-bit column (a zip
    header may claim anything) is recorded as the column's maximum; ``reason`` carries the exact one.
    ``flush`` as in :func:`add_upload`.
    """
    image = Image(study_id=study.id, filename=_display_name(filename), size_bytes=min(size_bytes, MAX_RECORDED_SIZE),
                  status=ImageStatus.FAILED, error=reason)
    session.add(image)
    if flush:
        session.flush()
    return image


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
    image = Image(study_id=study.id, filename=_display_name(filename), size_bytes=len(data))
    if metadata is None and is_dicom(data):
        metadata = read_metadata(data, settings.secret_key)
    if metadata is not None:
        _apply_dicom_metadata(image, metadata)
    max_bytes = settings.max_file_mb * 1024 * 1024
    try:
        if len(data) > max_bytes:
            raise ImageDecodeError(file_too_large(len(data), max_bytes))
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


@dataclass(frozen=True)
class ClaimedImage:
    """An image a worker is about to classify: its id and where its bytes are."""

    id: int
    storage_key: str | None


@dataclass
class ClaimedChunk:
    """What a task does with its chunk's unfinished images.

    ``images`` are classified together in batches: first tries, and images this very process held
    when an earlier task of it stopped with an error (the process survived them). ``suspects`` were
    in flight when a worker process died: they are classified one at a time, each attempt counted
    just before it, so a crash is charged to the one image that caused it (:func:`charge_attempt`).
    ``gave_up``: suspects failed now; ``held``: images another live worker holds, left to it.
    """

    images: list[ClaimedImage]
    gave_up: list[int]
    suspects: list[ClaimedImage] = field(default_factory=list)
    held: list[int] = field(default_factory=list)


def gives_up_after(max_attempts: int) -> int:
    """Attempts after which a suspect is failed: at least two, so its last try was alone."""
    return max(max_attempts, 2)


def _as_utc(moment: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; every stored time is UTC.
    return moment.replace(tzinfo=timezone.utc) if moment is not None and moment.tzinfo is None else moment


def claim_images(
    session: Session, study_id: int, image_ids: Sequence[int], max_attempts: int, owner: str | None = None, lease_s: float = 60.0
) -> ClaimedChunk:
    """Claim a chunk's unfinished images for ``owner`` (default: this process) under a lease of ``lease_s``.

    Images already done or failed are skipped (a redelivered task changes nothing), and so are
    images another worker holds under a live lease. An image claimed before that is still
    unfinished was in flight when a worker died: it becomes a *suspect*, retried alone; one that
    has reached :func:`gives_up_after` attempts (it keeps killing the worker) is failed instead.
    A first try counts its attempt here. The claim is one conditional UPDATE, so two tasks racing
    for the same images never both get one. One SELECT and one UPDATE for the whole chunk (plus
    one per image given up on, which is rare).
    """
    owner = owner or process_identity()
    now = utcnow()
    rows = session.execute(
        select(Image.id, Image.storage_key, Image.attempts, Image.status, Image.claimed_by, Image.lease_expires_at)
        .where(Image.study_id == study_id, Image.id.in_(list(image_ids)), Image.status.not_in(TERMINAL))
        .order_by(Image.id)
    ).all()
    chunk = ClaimedChunk(images=[], gave_up=[])
    gone: dict[str, bool] = {}
    fresh: list[int] = []
    suspects = []
    attempts: dict[int, int] = {}  # of the suspects to give up on
    for row in rows:
        leased = row.status == ImageStatus.PROCESSING and row.claimed_by and row.claimed_by != owner
        if leased and (_as_utc(row.lease_expires_at) or now) > now:
            if row.claimed_by not in gone:
                gone[row.claimed_by] = owner_is_gone(row.claimed_by)
            if not gone[row.claimed_by]:
                chunk.held.append(row.id)
                continue
        if row.status == ImageStatus.PROCESSING and row.claimed_by == owner:
            chunk.images.append(ClaimedImage(row.id, row.storage_key))  # resumed: this process survived it
        elif row.attempts == 0:
            chunk.images.append(ClaimedImage(row.id, row.storage_key))
            fresh.append(row.id)
        elif row.attempts >= gives_up_after(max_attempts):
            attempts[row.id] = row.attempts
        else:
            suspects.append(row)
    # Least suspicious first: innocent images finish before a poison one stops the worker again.
    chunk.suspects = [ClaimedImage(row.id, row.storage_key) for row in sorted(suspects, key=lambda r: (r.attempts, r.id))]
    claimable = or_(
        Image.status == ImageStatus.QUEUED,
        Image.claimed_by.is_(None),
        Image.claimed_by == owner,
        Image.lease_expires_at.is_(None),
        Image.lease_expires_at <= now,
        Image.claimed_by.in_(sorted(name for name, is_gone in gone.items() if is_gone)),
    )
    for image_id, count in attempts.items():
        failed = session.execute(
            update(Image)
            .where(Image.id == image_id, Image.status.not_in(TERMINAL), claimable)
            .values(status=ImageStatus.FAILED, lease_expires_at=None,
                    error=f"gave up after {count} attempts: the worker process died each time it classified this image "
                    f"(the last {count - 1} time{'s' if count > 2 else ''} with no other image in flight)")
            .execution_options(synchronize_session=False)
        )
        if failed.rowcount:
            chunk.gave_up.append(image_id)
    wanted = [image.id for image in chunk.images + chunk.suspects]
    if wanted:
        # updated_at is refreshed too (its onupdate); first tries count their attempt now, suspects when tried alone.
        claimed = set(session.scalars(
            update(Image)
            .where(Image.id.in_(wanted), Image.status.not_in(TERMINAL), claimable)
            .values(status=ImageStatus.PROCESSING, claimed_by=owner, lease_expires_at=now + timedelta(seconds=lease_s),
                    attempts=case((Image.id.in_(fresh), Image.attempts + 1), else_=Image.attempts) if fresh else Image.attempts)
            .returning(Image.id)
            .execution_options(synchronize_session=False)
        ))
        lost = [image_id for image_id in wanted if image_id not in claimed]  # another task claimed them first
        chunk.held.extend(lost)
        chunk.images = [image for image in chunk.images if image.id in claimed]
        chunk.suspects = [image for image in chunk.suspects if image.id in claimed]
    session.execute(
        update(Study).where(Study.id == study_id, Study.status == StudyStatus.QUEUED).values(status=StudyStatus.PROCESSING)
    )
    return chunk


def charge_attempt(session: Session, image_id: int, owner: str, lease_s: float) -> bool:
    """Count one attempt of a suspect about to be classified alone (commit before classifying it).

    Returns False when ``owner`` no longer holds the image (its lease ran out and another worker
    took it): leave it to that worker.
    """
    result = session.execute(
        update(Image)
        .where(Image.id == image_id, Image.claimed_by == owner, Image.status == ImageStatus.PROCESSING)
        .values(attempts=Image.attempts + 1, lease_expires_at=utcnow() + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)


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
    """Mark the study done when every image is done or failed; returns whether it is done.

    A study still receiving its upload is never done: more images are on their way
    (:func:`finish_receiving` checks again when the last is recorded). The study's row is locked
    first, so a worker finishing the last image and the portal finishing the upload cannot both
    leave it undone (PostgreSQL; SQLite serialises writers anyway).
    """
    status = session.scalar(select(Study.status).where(Study.id == study_id).with_for_update())
    if status == StudyStatus.RECEIVING:
        return False
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


def finish_receiving(session: Session, study_id: int) -> bool:
    """End a study's upload: it becomes processing (a worker already started) or queued, or done at once.

    Called by the portal after the upload's last image is recorded, and by the reconciler for an
    upload that stopped half-way (the portal died). Returns whether the study is now done.
    """
    status = session.scalar(select(Study.status).where(Study.id == study_id).with_for_update())
    if status == StudyStatus.RECEIVING:
        started = session.scalar(select(exists().where(
            Image.study_id == study_id, Image.status.in_([ImageStatus.PROCESSING, ImageStatus.DONE]))))
        session.execute(update(Study).where(Study.id == study_id)
                        .values(status=StudyStatus.PROCESSING if started else StudyStatus.QUEUED)
                        .execution_options(synchronize_session=False))
    return finish_study_if_complete(session, study_id)


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


#: How long a reviewer may take back their own last review (seconds).
REVIEW_UNDO_SECONDS = 300


class UndoRefused(ValueError):
    """A review that cannot be undone, with the reason in words (``status``: the HTTP status that fits)."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


def last_own_review(session: Session, reviewer_id: int, window_s: float = REVIEW_UNDO_SECONDS,
                    now: datetime | None = None) -> Review | None:
    """The reviewer's most recent review when it is younger than ``window_s`` and still its image's latest; else None."""
    review = session.scalars(
        select(Review).where(Review.reviewer_id == reviewer_id).order_by(Review.id.desc()).limit(1)
    ).first()
    if review is None:
        return None
    age = ((now or utcnow()) - (_as_utc(review.created_at) or utcnow())).total_seconds()
    if age > window_s:
        return None
    newer = session.scalar(select(func.count()).select_from(Review).where(Review.image_id == review.image_id,
                                                                       Review.id > review.id))
    return None if newer else review


def undo_review(session: Session, image: Image, reviewer_id: int, window_s: float = REVIEW_UNDO_SECONDS,
                now: datetime | None = None) -> Review:
    """Take back ``reviewer_id``'s last review, which must be of ``image``, younger than ``window_s`` and not yet superseded.

    The review row is deleted (the image goes back to the review queue); the caller audits the undo
    with the returned (deleted) review's label, note and time, so nothing is lost from the record.

    Raises:
        UndoRefused: no review, someone else's, too old, or not the reviewer's last (status 409).
    """
    reviews = list(image.reviews)
    if not reviews:
        raise UndoRefused(f"Image #{image.id} has no review to undo.")
    latest = reviews[-1]
    if latest.reviewer_id != reviewer_id:
        raise UndoRefused(f"The latest review of image #{image.id} is {latest.reviewer_name}'s: only your own review can be undone.")
    last = session.scalars(select(Review).where(Review.reviewer_id == reviewer_id).order_by(Review.id.desc()).limit(1)).first()
    if last is None or last.id != latest.id:
        raise UndoRefused("Only your last review can be undone; you have reviewed other images since.")
    age = ((now or utcnow()) - (_as_utc(latest.created_at) or utcnow())).total_seconds()
    if age > window_s:
        raise UndoRefused(f"Reviews can be undone for {window_s / 60:g} minutes; this one was recorded "
                          f"{age / 60:.0f} minutes ago.")
    session.delete(latest)
    session.flush()
    session.expire(image, ["reviews"])
    return latest

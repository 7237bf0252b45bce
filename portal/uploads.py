"""Turn an upload request (many files and/or one zip) into studies whose good images are queued.

DICOM files are grouped into one study per StudyInstanceUID (:func:`core.dicom.group_files`); all
other files of the upload make one study, as before. Every file goes through
:func:`core.studies.add_upload`, which checks it, stores it by sha256 and records failures with a
message. File and member names are display names only: they never reach the file system. Tasks are
sent only after the commit that recorded the images.
"""

from __future__ import annotations

import logging
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from celery import Celery
from sqlalchemy.orm import Session
from werkzeug.datastructures import FileStorage

from core import registry
from core.config import Settings
from core.models import Image, ImageStatus, ModelVersion, Study
from core.queue import enqueue_images
from core.dicom import group_files
from core.studies import add_upload, create_dicom_study, finish_study_if_complete

log = logging.getLogger(__name__)

READ_BLOCK = 1 << 20
NO_MODEL_MESSAGE = (
    "No production model: uploads are refused until a model version is promoted. "
    "Register and promote one with `triage model register ... --promote`, or run the demo."
)


class UploadError(Exception):
    """An upload that cannot be accepted; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class SubmittedStudy:
    """A recorded study, its images and the number of tasks sent."""

    study: Study
    images: list[Image]
    tasks: int
    queued_ids: list[int] = field(default_factory=list)


def require_production_model(session: Session) -> ModelVersion:
    """The production model, or an :class:`UploadError` (409) saying how to get one."""
    version = registry.production_version(session)
    if version is None:
        raise UploadError(NO_MODEL_MESSAGE, status=409)
    return version


def _limit_message(limit_bytes: int) -> str:
    return f"{limit_bytes // (1024 * 1024)} MB (TRIAGE_MAX_UPLOAD_MB)"


def unsafe_member_name(name: str) -> bool:
    """True for a zip member name that is absolute or climbs out of the archive (zip slip)."""
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or re.match(r"^[A-Za-z]:", normalised):
        return True
    return ".." in PurePosixPath(normalised).parts


def _skipped_member(info: zipfile.ZipInfo) -> bool:
    parts = PurePosixPath(info.filename.replace("\\", "/")).parts
    return info.is_dir() or not parts or parts[0] == "__MACOSX" or any(part.startswith(".") for part in parts)


def read_zip(archive: FileStorage, limit_bytes: int) -> list[tuple[str, bytes]]:
    """The files of a zip upload as ``(display name, bytes)``.

    Directories, ``__MACOSX/`` and dotfiles are skipped. The whole archive is refused when a member
    name is absolute or contains ``..`` (400), when it is not a readable zip (400), or when it
    unpacks to more than ``limit_bytes`` (413; checked on the headers and again while reading).
    """
    label = archive.filename or "archive"
    try:
        bundle = zipfile.ZipFile(archive.stream)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise UploadError(f"{label} is not a valid zip archive ({exc})") from None
    with bundle:
        members = bundle.infolist()
        unsafe = [info.filename for info in members if unsafe_member_name(info.filename)]
        if unsafe:
            raise UploadError(
                f"{label} refused: member path(s) {', '.join(repr(n) for n in unsafe[:5])} are absolute or contain '..'"
            )
        wanted = [info for info in members if not _skipped_member(info)]
        declared = sum(info.file_size for info in wanted)
        if declared > limit_bytes:
            raise UploadError(
                f"{label} refused: it unpacks to {declared:,} bytes, over the limit of {_limit_message(limit_bytes)}",
                status=413,
            )
        files: list[tuple[str, bytes]] = []
        total = 0
        for info in wanted:
            blocks: list[bytes] = []
            try:
                with bundle.open(info) as member:
                    while block := member.read(READ_BLOCK):
                        total += len(block)
                        if total > limit_bytes:
                            raise UploadError(
                                f"{label} refused: it unpacks to more than the limit of {_limit_message(limit_bytes)}",
                                status=413,
                            )
                        blocks.append(block)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
                raise UploadError(f"{label} is corrupt: cannot read {info.filename!r} ({exc})") from None
            except NotImplementedError as exc:
                raise UploadError(f"{label}: {info.filename!r} uses an unsupported compression ({exc})") from None
            except RuntimeError as exc:  # zipfile raises RuntimeError for encrypted members
                raise UploadError(f"{label}: cannot read {info.filename!r} ({exc}); encrypted zips are not supported") from None
            files.append((info.filename, b"".join(blocks)))
    if not files:
        raise UploadError(f"{label} contains no files")
    return files


def collect_files(files: list[FileStorage], archive: FileStorage | None, limit_bytes: int) -> list[tuple[str, bytes]]:
    """Every uploaded file as ``(display name, bytes)``: the plain files, then the zip's members.

    Raises:
        UploadError: no files at all (400), or a bad zip (see :func:`read_zip`).
    """
    collected: list[tuple[str, bytes]] = []
    for upload in files:
        if not upload.filename:  # an empty <input type=file> sends a part with no file name
            continue
        collected.append((upload.filename, upload.read()))
    if archive is not None and archive.filename:
        collected.extend(read_zip(archive, limit_bytes))
    if not collected:
        raise UploadError("No files in the request: send one or more `files` and/or an `archive` zip.")
    return collected


def submit_studies(
    session: Session,
    settings: Settings,
    celery: Celery,
    name: str,
    files: list[tuple[str, bytes]],
    model_version: ModelVersion,
    created_by_id: int | None = None,
) -> list[SubmittedStudy]:
    """Record one study per DICOM study (and one for the other files), audited as uploads; commit; queue.

    With several studies each name gets the study's modality, body part and date (or "other
    files"). The studies come back in the order their first file was sent.
    """
    from portal.auth import record

    groups = group_files(files, settings.secret_key)
    base = name.strip()
    submitted: list[SubmittedStudy] = []
    for group in groups:
        study_name = base if len(groups) == 1 else f"{base or 'Upload'} ({group.describe()})"
        study = create_dicom_study(session, study_name, model_version, group, created_by_id=created_by_id)
        images = [add_upload(session, settings, study, filename, data, meta, flush=False) for filename, data, meta in group.files]
        session.flush()  # one multi-row INSERT for the whole group
        queued = [image.id for image in images if image.status == ImageStatus.QUEUED]
        record("upload", "study", study.id, {"files": len(images), "queued": len(queued), "studies_in_upload": len(groups)})
        if not queued:  # every file was refused: no worker will ever finish this study, so finish it now
            finish_study_if_complete(session, study.id)
            session.refresh(study)
        submitted.append(SubmittedStudy(study=study, images=images, tasks=0, queued_ids=queued))
    session.commit()
    for item in submitted:
        try:
            item.tasks = enqueue_images(celery, item.study.id, item.queued_ids, settings.chunk_size)
        except Exception as exc:  # kombu raises many types; the study is saved, the user must know
            log.exception("study %s recorded but its %d images could not be queued", item.study.id, len(item.queued_ids))
            raise UploadError(
                f"Study #{item.study.id} was saved but its images could not be queued ({exc.__class__.__name__}): "
                "nothing is lost: the reconciler queues them once the broker is back (or run `triage reconcile`).",
                status=503,
            ) from exc
        log.info("study %s: %d files, %d queued in %d tasks", item.study.id, len(item.images), len(item.queued_ids), item.tasks)
    return submitted


def submit_study(
    session: Session,
    settings: Settings,
    celery: Celery,
    name: str,
    files: list[tuple[str, bytes]],
    model_version: ModelVersion,
    created_by_id: int | None = None,
) -> SubmittedStudy:
    """Like :func:`submit_studies`, returning only the first (main) study of the upload."""
    return submit_studies(session, settings, celery, name, files, model_version, created_by_id)[0]

"""Turn an upload request (many files and/or one zip) into studies whose good images are queued.

DICOM files are grouped into one study per StudyInstanceUID (:func:`core.dicom.group_files`); all
other files of the upload make one study, as before. Every file goes through
:func:`core.studies.add_upload`, which checks it, stores it by sha256 and records failures with a
message. File and member names are display names only: they never reach the file system. A task is
sent only after the commit that recorded its images, one chunk at a time while the upload is still
being recorded, so workers start on a large upload at once.

Files are read in blocks and refused as early as possible (:func:`read_file`): a file or zip member
whose (declared) size is over ``TRIAGE_MAX_FILE_MB`` is not read at all, one whose first 64 KB
cannot start an image (zeros, a video, a zip inside the zip) is not read further, and no file is read
past the limit whatever its zip header claimed. Such files are recorded as failed with the reason
(:class:`RefusedFile`). A zip whose members declare more than ``TRIAGE_MAX_UPLOAD_MB`` in all is
refused before anything is extracted. Zips inside the zip are not expanded: they fail with a
message saying so.
"""

from __future__ import annotations

import logging
import re
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import IO

from celery import Celery
from sqlalchemy.orm import Session
from werkzeug.datastructures import FileStorage

from core import registry
from core.config import Settings
from core.models import Image, ImageStatus, ModelVersion, Study, StudyStatus
from core.queue import enqueue_images
from core.dicom import UploadGroup, group_files
from core.imaging import content_problem
from core.studies import add_refused_upload, add_upload, create_dicom_study, file_too_large, finish_receiving

log = logging.getLogger(__name__)

READ_BLOCK = 1 << 20
#: Bytes read first, to tell from its signature whether a file can be an image at all.
HEAD_BYTES = 64 * 1024
NO_MODEL_MESSAGE = (
    "No production model: uploads are refused until a model version is promoted. "
    "Register and promote one with `triage model register ... --promote`, or run the demo."
)


class UploadError(Exception):
    """An upload that cannot be accepted; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, for_people: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        #: The message for the upload page when ``message`` speaks the API's language (field names).
        self.for_people = for_people or message


@dataclass(frozen=True)
class RefusedFile:
    """A file of an upload refused before it was read in full; recorded as a failed image with ``reason``."""

    name: str
    size_bytes: int
    reason: str


#: One file of an upload: ``(display name, bytes)``, or a file refused before it was read in full.
UploadedFile = tuple[str, bytes] | RefusedFile


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


def read_file(name: str, stream: IO[bytes], size: int, max_file_bytes: int, declared_by: str = "") -> UploadedFile:
    """Read one file of an upload in blocks, refusing it as early as its size or content allows.

    Args:
        name: display name.
        stream: the file's content.
        size: its size as far as known (a zip member: the size its header declares).
        max_file_bytes: ``TRIAGE_MAX_FILE_MB`` in bytes.
        declared_by: where ``size`` comes from when it is a claim (``"declared by the zip"``), for messages.

    Returns:
        ``(name, bytes)``, or a :class:`RefusedFile`: without reading anything when ``size`` is over
        ``max_file_bytes``; after its first :data:`HEAD_BYTES` when they cannot start an image
        (:func:`core.imaging.content_problem`; smaller files are read whole and checked as usual);
        and as soon as more than ``max_file_bytes`` have been read, whatever ``size`` claimed.
    """
    if size > max_file_bytes:
        reason = file_too_large(size, max_file_bytes, declared_by)
        return RefusedFile(name, size, f"{reason}; not read" if declared_by else reason)
    head = stream.read(HEAD_BYTES)
    if len(head) == HEAD_BYTES:  # more may follow: not worth reading when this cannot be an image
        problem = content_problem(head)
        if problem is not None:
            return RefusedFile(name, size, problem)
    blocks, total = [head], len(head)
    while block := stream.read(READ_BLOCK):
        total += len(block)
        if total > max_file_bytes:
            claim = f" ({size:,} {declared_by})" if declared_by else ""
            return RefusedFile(name, total, file_too_large(total, max_file_bytes, f"read before stopping{claim}"))
        blocks.append(block)
    return name, b"".join(blocks)


def _stream_size(stream: IO[bytes]) -> int:
    """The size of a seekable upload stream (werkzeug spools file parts to memory or disk); 0 when unknown."""
    try:
        position = stream.tell()
        size = stream.seek(0, 2) - position
        stream.seek(position)
    except (AttributeError, OSError, ValueError):
        return 0
    return size


def read_zip(archive: FileStorage, limit_bytes: int, max_file_bytes: int) -> list[UploadedFile]:
    """The files of a zip upload, in order: ``(display name, bytes)`` or :class:`RefusedFile`.

    Directories, ``__MACOSX/`` and dotfiles are skipped. A member is refused on its own (see
    :func:`read_file`) when its declared size is over ``max_file_bytes`` (``TRIAGE_MAX_FILE_MB``;
    not extracted) or when its first bytes cannot start an image; a member that is itself a zip
    fails like any non-image, with a message saying that zips inside a zip are not expanded
    (:data:`core.imaging.ZIP_NOT_IMAGE`). The whole archive is refused when a member name is absolute or contains
    ``..`` (400), when it is not a readable zip (400), or when its other members unpack to more than
    ``limit_bytes`` (413, naming ``TRIAGE_MAX_UPLOAD_MB``; checked on the declared sizes before
    anything is extracted, and again after each member).
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
        declared = sum(info.file_size for info in wanted if info.file_size <= max_file_bytes)
        if declared > limit_bytes:
            raise UploadError(
                f"{label} refused: it unpacks to {declared:,} bytes, over the limit of {_limit_message(limit_bytes)}",
                status=413,
            )
        files: list[UploadedFile] = []
        total = 0
        for info in wanted:
            try:
                with bundle.open(info) as member:
                    item = read_file(info.filename, member, info.file_size, max_file_bytes, "declared by the zip")
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
                raise UploadError(f"{label} is corrupt: cannot read {info.filename!r} ({exc})") from None
            except NotImplementedError as exc:
                raise UploadError(f"{label}: {info.filename!r} uses an unsupported compression ({exc})") from None
            except RuntimeError as exc:  # zipfile raises RuntimeError for encrypted members
                raise UploadError(f"{label}: cannot read {info.filename!r} ({exc}); encrypted zips are not supported") from None
            total += 0 if isinstance(item, RefusedFile) else len(item[1])
            if total > limit_bytes:  # only if a header lied and zipfile did not notice
                raise UploadError(
                    f"{label} refused: it unpacks to more than the limit of {_limit_message(limit_bytes)}", status=413
                )
            files.append(item)
    if not files:
        raise UploadError(f"{label} contains no files")
    return files


def collect_files(
    files: list[FileStorage], archive: FileStorage | None, limit_bytes: int, max_file_bytes: int
) -> list[UploadedFile]:
    """Every uploaded file, the plain files then the zip's members, read with :func:`read_file`.

    Args:
        files: the request's ``files`` parts.
        archive: its ``archive`` part (a zip), if any.
        limit_bytes: ``TRIAGE_MAX_UPLOAD_MB`` in bytes (what the zip may unpack to).
        max_file_bytes: ``TRIAGE_MAX_FILE_MB`` in bytes.

    Raises:
        UploadError: no files at all (400), or a bad zip (see :func:`read_zip`).
    """
    collected: list[UploadedFile] = []
    for upload in files:
        if not upload.filename:  # an empty <input type=file> sends a part with no file name
            continue
        if _is_zip(upload):  # "Choose files or a zip" and a dropped zip send it as one of the files
            collected.extend(read_zip(upload, limit_bytes, max_file_bytes))
            continue
        collected.append(read_file(upload.filename, upload.stream, _stream_size(upload.stream), max_file_bytes))
    if archive is not None and archive.filename:
        collected.extend(read_zip(archive, limit_bytes, max_file_bytes))
    if not collected:
        raise UploadError("No files in the request: send one or more `files` and/or an `archive` zip.",
                          for_people="Choose at least one image, folder or zip to upload.")
    return collected


def _is_zip(upload: FileStorage) -> bool:
    """Whether an uploaded file is a zip (by its name or its first bytes; the stream is left where it was)."""
    if upload.filename and upload.filename.lower().endswith(".zip"):
        return True
    stream = upload.stream
    if not stream.seekable():
        return False
    start = stream.tell()
    head = stream.read(4)
    stream.seek(start)
    return head == b"PK\x03\x04"


def submit_studies(
    session: Session,
    settings: Settings,
    celery: Celery,
    name: str,
    files: Sequence[UploadedFile],
    model_version: ModelVersion,
    created_by_id: int | None = None,
) -> list[SubmittedStudy]:
    """Record one study per DICOM study (and one for the other files), audited as uploads, queuing as it goes.

    With several studies each name gets the study's modality, body part and date (or "other
    files"). The studies come back in the order their first file was sent. Files refused before
    they were read (:class:`RefusedFile`) are recorded as failed in the other files' study, or in
    the first study when every readable file is DICOM.

    Workers start before the upload is recorded in full: each chunk of ``settings.chunk_size``
    good images is committed and then queued while the next chunk is checked and stored. Until its
    last file is recorded a study is ``receiving`` and cannot be finished
    (:func:`core.studies.finish_receiving`). If the broker refuses a chunk, the rest is still
    recorded and the upload answers 503 (the reconciler queues the images once the broker is back).
    """
    from portal.auth import record

    refused = [item for item in files if isinstance(item, RefusedFile)]
    groups = group_files([item for item in files if not isinstance(item, RefusedFile)], settings.secret_key)
    home = next((g for g in groups if g.study_instance_uid is None), groups[0] if groups else None)
    if refused and home is None:
        home = UploadGroup(None)
        groups.append(home)
    base = name.strip()
    queue = _ChunkQueue(session, celery, settings.chunk_size)
    submitted: list[SubmittedStudy] = []
    for group in groups:
        study_name = base if len(groups) == 1 else f"{base or 'Upload'} ({group.describe()})"
        study = create_dicom_study(session, study_name, model_version, group, created_by_id=created_by_id)
        study.status = StudyStatus.RECEIVING
        item = SubmittedStudy(study=study, images=[], tasks=0, queued_ids=[])
        try:
            for filename, data, meta in group.files:
                image = add_upload(session, settings, study, filename, data, meta, flush=False)
                item.images.append(image)
                if image.status == ImageStatus.QUEUED:
                    queue.add(item, image)
            if group is home:
                item.images += [add_refused_upload(session, study, refused_file.name, refused_file.size_bytes,
                                                   refused_file.reason, flush=False) for refused_file in refused]
            session.flush()
            record("upload", "study", study.id, {"files": len(item.images), "queued": len(item.queued_ids),
                                                 "studies_in_upload": len(groups)})
            queue.send(item)  # commits the rest of the study, then queues its last chunk
        except Exception:
            _end_failed_upload(session, study.id, len(item.queued_ids))
            raise
        finish_receiving(session, study.id)  # done at once when every file was refused
        session.commit()
        session.refresh(study)
        submitted.append(item)
        log.info("study %s: %d files, %d queued in %d tasks", study.id, len(item.images), len(item.queued_ids), item.tasks)
    if queue.broker_error is not None:
        exc, study_id = queue.broker_error
        raise UploadError(
            f"Study #{study_id} was saved but its images could not be queued ({exc.__class__.__name__}): "
            "nothing is lost: the reconciler queues them once the broker is back (or run `triage reconcile`).",
            status=503,
        ) from exc
    return submitted


def _end_failed_upload(session: Session, study_id: int | None, committed: int) -> None:
    """After an error half-way through an upload: end its study with the chunks already committed (if any).

    Without committed images nothing of the study survives the rollback. When the database itself
    failed, the reconciler ends the study later (:func:`core.reconcile.finish_interrupted_uploads`).
    """
    session.rollback()
    if not committed or study_id is None:
        return
    try:
        finish_receiving(session, study_id)
        session.commit()
        log.warning("study %s: the upload failed after %d images were recorded and queued; the study keeps them", study_id, committed)
    except Exception:  # the database is what failed: leave the study to the reconciler
        session.rollback()
        log.exception("study %s: could not end the interrupted upload; the reconciler will", study_id)


class _ChunkQueue:
    """Sends a study's good images to the workers a chunk at a time, each after the commit that recorded it.

    After the broker fails once, nothing more is sent in this upload (the images stay queued in
    the database for the reconciler) and :attr:`broker_error` says why.
    """

    def __init__(self, session: Session, celery: Celery, chunk_size: int) -> None:
        self.session, self.celery, self.chunk_size = session, celery, chunk_size
        self.pending: list[Image] = []
        #: The broker's error and the study whose images it refused, once it failed.
        self.broker_error: tuple[Exception, int] | None = None

    def add(self, item: SubmittedStudy, image: Image) -> None:
        """Note a queued image of ``item``; a full chunk is committed and sent at once."""
        self.pending.append(image)
        if len(self.pending) >= self.chunk_size:
            self.send(item)

    def send(self, item: SubmittedStudy) -> None:
        """Commit what ``item``'s study recorded so far, then queue its pending images as one task."""
        self.session.flush()
        ids = [image.id for image in self.pending]
        self.pending = []
        self.session.commit()
        item.queued_ids += ids
        if not ids or self.broker_error is not None:
            return
        try:
            item.tasks += enqueue_images(self.celery, item.study.id, ids, self.chunk_size)
        except Exception as exc:  # kombu raises many types; the images are saved, the user must know
            log.exception("study %s: %d images recorded but not queued", item.study.id, len(ids))
            self.broker_error = (exc, item.study.id)

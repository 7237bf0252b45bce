"""DICOM in: header metadata, grouping uploads into studies, keyed patient hashes.

What the database keeps of a DICOM file is the minimum a reviewer needs (UIDs, modality, body part,
study date, photometric interpretation, bits stored) plus a *keyed* hash of the patient identifier
for matching; names, identifiers and birth dates are never copied. The stored file keeps the
original bytes, so a structured report (:mod:`core.dicom_report`, the way out) can take the
patient and study attributes from it when it is built.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from core.imaging import is_dicom

log = logging.getLogger(__name__)

PATIENT_KEY_CONTEXT = b"bone-xray-triage/dicom-patient-key/v1"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True)
class DicomMetadata:
    """What the database may keep of one DICOM file's header (no names, ids or birth dates)."""

    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None
    study_instance_uid: str | None = None
    modality: str | None = None
    body_part: str | None = None
    study_date: date | None = None
    photometric: str | None = None
    bits_stored: int | None = None
    patient_key: str | None = None


def derived_key(secret_key: str, context: bytes) -> bytes:
    """A key for one purpose (``context``) derived from the deployment's secret key (HMAC-SHA256)."""
    return hmac.new(secret_key.encode("utf-8"), context, hashlib.sha256).digest()


def patient_key(patient_id: str, secret_key: str, issuer: str = "") -> str | None:
    """Keyed hash (HMAC-SHA256) of a patient identifier, for matching studies of one patient.

    The key is derived from ``secret_key`` (TRIAGE_SECRET_KEY), so the hash cannot be reversed by
    hashing candidate identifiers without the server's secret. ``None`` for an empty identifier.
    """
    patient_id = (patient_id or "").strip()
    if not patient_id:
        return None
    message = f"{(issuer or '').strip()}\x00{patient_id}".encode("utf-8")
    return hmac.new(derived_key(secret_key, PATIENT_KEY_CONTEXT), message, hashlib.sha256).hexdigest()


def _uid(value: Any) -> str | None:
    text = str(value or "").strip()
    return text if text and len(text) <= 64 and _UID.match(text) else None


def _short(value: Any, limit: int) -> str | None:
    text = " ".join(str(value or "").split())
    return text[:limit] or None


def _date(value: Any) -> date | None:
    text = str(value or "").strip()
    try:
        return datetime.strptime(text[:8], "%Y%m%d").date() if len(text) >= 8 else None
    except ValueError:
        return None


def metadata_from_dataset(dataset: Any, secret_key: str) -> DicomMetadata:
    """The storable metadata of a parsed DICOM dataset (header only is enough)."""
    file_meta = getattr(dataset, "file_meta", None)
    sop_class = dataset.get("SOPClassUID") or (file_meta.get("MediaStorageSOPClassUID") if file_meta else None)
    sop_instance = dataset.get("SOPInstanceUID") or (file_meta.get("MediaStorageSOPInstanceUID") if file_meta else None)
    bits = dataset.get("BitsStored")
    return DicomMetadata(
        sop_class_uid=_uid(sop_class),
        sop_instance_uid=_uid(sop_instance),
        series_instance_uid=_uid(dataset.get("SeriesInstanceUID")),
        study_instance_uid=_uid(dataset.get("StudyInstanceUID")),
        modality=_short(dataset.get("Modality"), 16),
        body_part=_short(dataset.get("BodyPartExamined"), 64),
        study_date=_date(dataset.get("StudyDate")),
        photometric=_short(dataset.get("PhotometricInterpretation"), 16),
        bits_stored=int(bits) if isinstance(bits, int) else None,
        patient_key=patient_key(str(dataset.get("PatientID", "") or ""), secret_key,
                                str(dataset.get("IssuerOfPatientID", "") or "")),
    )


def read_metadata(data: bytes, secret_key: str) -> DicomMetadata | None:
    """Metadata of a DICOM file's header; ``None`` when ``data`` is not DICOM or its header is unreadable."""
    if not is_dicom(data):
        return None
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        log.info("unreadable DICOM header: %s", exc)
        return None
    return metadata_from_dataset(dataset, secret_key)


@dataclass
class UploadGroup:
    """Files of one upload that make one study: a DICOM study (by StudyInstanceUID) or the other files."""

    study_instance_uid: str | None
    files: list[tuple[str, bytes, DicomMetadata | None]] = field(default_factory=list)

    def _headers(self) -> list[DicomMetadata]:
        """Headers of the group's images (those with a photometric interpretation), else of every DICOM file."""
        headers = [m for _, _, m in self.files if m is not None]
        return [m for m in headers if m.photometric] or headers

    @property
    def modality(self) -> str | None:
        """Distinct modalities of the group's images (an SR or presentation state beside them does not count)."""
        return _short(", ".join(sorted({m.modality for m in self._headers() if m.modality})), 64)

    @property
    def body_part(self) -> str | None:
        """Distinct body parts examined of the group's images, comma-separated."""
        return _short(", ".join(sorted({m.body_part for m in self._headers() if m.body_part})), 200)

    @property
    def study_date(self) -> date | None:
        """The first study date found in the group."""
        return next((m.study_date for _, _, m in self.files if m and m.study_date), None)

    def describe(self) -> str:
        """A short label for the study name: modality, body part and date, or "other files"."""
        if not self.study_instance_uid:
            return "other files"
        parts = [self.modality, self.body_part, self.study_date.isoformat() if self.study_date else None]
        return " ".join(p for p in parts if p) or "DICOM study"


def group_files(files: Sequence[tuple[str, bytes]], secret_key: str) -> list[UploadGroup]:
    """Split an upload into studies, in the order their first file arrived.

    DICOM files are grouped by StudyInstanceUID; every other file (JPEG, PNG, unreadable files)
    goes into one further group, as before DICOM support. A DICOM file without a readable
    StudyInstanceUID (a DICOMDIR, a damaged header) joins the first DICOM study so it is reported
    there rather than making a study of its own; with no DICOM study it joins the other files.
    """
    groups: dict[str | None, UploadGroup] = {}
    orphans: list[tuple[str, bytes, DicomMetadata | None]] = []
    for filename, data in files:
        meta = read_metadata(data, secret_key) if is_dicom(data) else None
        uid = meta.study_instance_uid if meta else None
        if uid is None and is_dicom(data):
            orphans.append((filename, data, meta))
            continue
        groups.setdefault(uid, UploadGroup(uid)).files.append((filename, data, meta))
    if orphans:
        target = next((g for uid, g in groups.items() if uid is not None), None)
        if target is None:
            target = groups.setdefault(None, UploadGroup(None))
        target.files.extend(orphans)
    return list(groups.values())


# --------------------------------------------------------------------------------------------------

"""DICOM in and out: header metadata, grouping uploads into studies, keyed patient hashes, the SR report.

What the database keeps of a DICOM file is the minimum a reviewer needs (UIDs, modality, body part,
study date, photometric interpretation, bits stored) plus a *keyed* hash of the patient identifier
for matching; names, identifiers and birth dates are never copied. The stored file keeps the
original bytes, so a structured report can take the patient and study attributes from it when it
is built (the report is a download for the PACS, not a database row).
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

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from core.config import Settings
from core.imaging import is_dicom
from core.models import Image, ImageStatus, Study

log = logging.getLogger(__name__)

PATIENT_KEY_CONTEXT = b"bone-xray-triage/dicom-patient-key/v1"
SR_UID_CONTEXT = b"bone-xray-triage/dicom-sr-uid/v1"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
CODING_SCHEME = "99BXT"  # private coding scheme of this product (DICOM PS3.16: "99" prefix)
DISCLAIMER = (
    "Produced automatically by software (bone-xray-triage) for review by a qualified reader. "
    "This is not a diagnosis and has not been verified by a person."
)
SR_MANUFACTURER = "bone-xray-triage"
SOFTWARE_VERSION = "0.1.0"


class ReportUnavailable(ValueError):
    """A structured report cannot be built for this study; the message says why."""


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


def _derived_key(secret_key: str, context: bytes) -> bytes:
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
    return hmac.new(_derived_key(secret_key, PATIENT_KEY_CONTEXT), message, hashlib.sha256).hexdigest()


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
# The structured report


def _code(value: str, meaning: str) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=CODING_SCHEME, meaning=meaning[:64])


def _sr_uid(settings: Settings, *parts: object) -> str:
    from pydicom.uid import generate_uid

    secret = _derived_key(settings.secret_key, SR_UID_CONTEXT).hex()
    return str(generate_uid(prefix=None, entropy_srcs=[secret, *map(str, parts)]))


def _image_container(image: Image, study: Study, dataset: Any | None) -> Any:
    from core.studies import study_prediction
    from highdicom.sr import (
        CodeContentItem,
        ContainerContentItem,
        ImageContentItem,
        NumContentItem,
        RelationshipTypeValues,
        TextContentItem,
    )
    from pydicom.sr.codedict import codes

    contains = RelationshipTypeValues.CONTAINS
    items: list[Any] = []
    if dataset is not None:
        items.append(ImageContentItem(
            name=_code("SOURCE-IMAGE", "Source image"),
            referenced_sop_class_uid=str(dataset.SOPClassUID),
            referenced_sop_instance_uid=str(dataset.SOPInstanceUID),
            relationship_type=contains,
        ))
    else:
        note = (f"Not a DICOM instance (uploaded file sha256 {image.sha256}); there is no DICOM UID to reference"
                if image.sha256 else "The upload was refused, so there is no stored image to reference")
        items.append(TextContentItem(name=_code("SOURCE-NOTE", "Source image note"), value=note[:1024],
                                     relationship_type=contains))
    items.append(TextContentItem(name=_code("SOURCE-FILE", "Source file name"), value=(image.filename or "unnamed")[:1024],
                                 relationship_type=contains))
    prediction = study_prediction(image, study.model_version_id)
    version = study.model_version
    if prediction is None:
        reason = image.error or f"not classified yet (status {image.status.value})"
        items.append(TextContentItem(name=_code("NOT-CLASSIFIED", "Not classified"), value=reason[:1024],
                                     relationship_type=contains))
    else:
        items.append(TextContentItem(name=_code("LABEL", "Predicted label"), value=prediction.label[:1024],
                                     relationship_type=contains))
        for index, label in enumerate(version.labels):
            items.append(NumContentItem(
                name=_code(f"PROB-{index}", f"Probability of {label}"),
                value=float(prediction.probabilities.get(label, 0.0)),
                unit=codes.UCUM.NoUnits,
                relationship_type=contains,
            ))
        items.append(NumContentItem(name=_code("CONFIDENCE", "Confidence"), value=float(prediction.confidence),
                                    unit=codes.UCUM.NoUnits, relationship_type=contains))
        items.append(CodeContentItem(name=_code("FLAG", "Low-confidence flag for review"),
                                     value=codes.SCT.Yes if prediction.flagged else codes.SCT.No,
                                     relationship_type=contains))
        if prediction.flagged and prediction.flag_reason:
            items.append(TextContentItem(name=_code("FLAG-REASON", "Flag reason"), value=prediction.flag_reason[:1024],
                                         relationship_type=contains))
        items.append(TextContentItem(name=_code("MODEL-VERSION", "Model version"),
                                     value=_model_text(study)[:1024], relationship_type=contains))
    review = image.reviews[-1] if image.reviews else None
    if review is not None:
        items.append(TextContentItem(name=_code("REVIEW-LABEL", "Label recorded by a reviewer"), value=review.label[:1024],
                                     relationship_type=contains))
    container = ContainerContentItem(name=_code("IMAGE-RESULT", "Image result"), relationship_type=contains)
    container.ContentSequence = items
    return container


def _model_text(study: Study) -> str:
    version = study.model_version
    demo = " (demo model, not for clinical use)" if version.is_demo else ""
    return f"model version #{version.id} {version.name}{demo}; architecture {version.architecture}; weights sha256 {version.weights_sha256}"


def _source_header(settings: Settings, image: Image) -> Any | None:
    """The stored DICOM header of ``image`` (patient and study attributes included), or None."""
    if not (image.sop_instance_uid and image.storage_key):
        return None
    import pydicom

    from core.studies import image_store
    from pydicom.errors import InvalidDicomError

    path = image_store(settings).path_for_key(image.storage_key)
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("image %s: cannot read its stored DICOM header for the report: %s", image.id, exc)
        return None
    if not (dataset.get("SOPClassUID") and dataset.get("SOPInstanceUID") and dataset.get("StudyInstanceUID")):
        return None
    return dataset


def structured_report(session: Session, settings: Settings, study: Study) -> bytes:
    """A DICOM Comprehensive SR (Part 10 bytes) with every image's result in ``study``.

    Each image gets a container with its predicted label, one probability per class, the
    confidence, the low-confidence flag (and reason), the model version and, when a reviewer
    recorded one, the reviewed label. Classified DICOM images are referenced by SOP Class and
    Instance UID and listed as evidence; other images (non-DICOM uploads, refused files) are
    listed by file name with a note saying why there is no UID. The report takes its patient and
    study attributes from the stored source files, belongs to their study, is marked unverified
    and partial, and states that it was produced by software for review and is not a diagnosis.

    Raises:
        ReportUnavailable: the study has no classified DICOM image to report on.
    """
    from highdicom.sr import (
        ComprehensiveSR,
        ContainerContentItem,
        DeviceObserverIdentifyingAttributes,
        ObserverContext,
        RelationshipTypeValues,
        TextContentItem,
    )
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from core.studies import study_prediction

    images = list(session.scalars(
        select(Image).where(Image.study_id == study.id)
        .options(selectinload(Image.predictions), selectinload(Image.reviews)).order_by(Image.id)
    ))
    evidence: dict[str, Any] = {}
    containers = []
    for image in images:
        dataset = None
        if image.status == ImageStatus.DONE and study_prediction(image, study.model_version_id) is not None:
            dataset = _source_header(settings, image)
        if dataset is not None:
            evidence.setdefault(str(dataset.SOPInstanceUID), dataset)
        containers.append(_image_container(image, study, dataset))
    if not evidence:
        raise ReportUnavailable(
            f"study #{study.id} has no classified DICOM image: a DICOM structured report needs at least one "
            "(use the CSV or JSON export for other images)"
        )
    sources = list(evidence.values())
    report_study_uid = str(sources[0].StudyInstanceUID)
    sources = [d for d in sources if str(d.StudyInstanceUID) == report_study_uid] + [
        d for d in sources if str(d.StudyInstanceUID) != report_study_uid
    ]

    version = study.model_version
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=_sr_uid(settings, "device", version.weights_sha256),
            name=f"bone-xray-triage model #{version.id}"[:64],
            manufacturer_name=SR_MANUFACTURER,
            model_name=f"{version.name} (#{version.id})"[:64],
        ),
    )
    contains = RelationshipTypeValues.CONTAINS
    root = ContainerContentItem(name=_code("TRIAGE-REPORT", "Automated bone X-ray triage report"))
    root.ContentSequence = [
        *observer,
        TextContentItem(name=codes.DCM.Comment, value=DISCLAIMER, relationship_type=contains),
        TextContentItem(name=_code("MODEL-VERSION", "Model version"), value=_model_text(study)[:1024],
                        relationship_type=contains),
        *containers,
    ]
    report = ComprehensiveSR(
        evidence=sources,
        content=root,
        series_instance_uid=_sr_uid(settings, "series", study.id),
        series_number=9001,
        sop_instance_uid=str(generate_uid()),
        instance_number=1,
        manufacturer=SR_MANUFACTURER,
        is_complete=False,
        is_final=False,
        is_verified=False,
        series_description="AI triage for review - not a diagnosis",
    )
    report.SoftwareVersions = [SOFTWARE_VERSION, f"model {version.id}"]
    report.ManufacturerModelName = "bone-xray-triage"
    identification = _coding_scheme_identification()
    report.CodingSchemeIdentificationSequence = [identification]
    buffer = io.BytesIO()
    report.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _coding_scheme_identification() -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = CODING_SCHEME
    item.CodingSchemeName = "bone-xray-triage private codes"
    item.CodingSchemeResponsibleOrganization = "bone-xray-triage project"
    return item


def report_filename(study: Study) -> str:
    """The download name of a study's structured report."""
    return f"study-{study.id}-sr.dcm"

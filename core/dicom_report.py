"""DICOM out: a study's results as a DICOM Comprehensive Structured Report for the PACS.

Built on demand from the database rows, the stored source files (their patient and study
attributes) and the predictions; the report is a download, not a database row. Reading DICOM
headers and grouping uploads lives one floor down, in :mod:`core.dicom`.
"""

from __future__ import annotations

import io
import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from core import __version__
from core.config import Settings
from core.dicom import derived_key
from core.models import Image, ImageStatus, Study
from core.storage import image_store
from core.studies import study_prediction

log = logging.getLogger(__name__)

SR_UID_CONTEXT = b"bone-xray-triage/dicom-sr-uid/v1"
CODING_SCHEME = "99BXT"  # private coding scheme of this product (DICOM PS3.16: "99" prefix)
DISCLAIMER = (
    "Produced automatically by software (bone-xray-triage) for review by a qualified reader. "
    "This is not a diagnosis and has not been verified by a person."
)
SR_MANUFACTURER = "bone-xray-triage"


class ReportUnavailable(ValueError):
    """A structured report cannot be built for this study; the message says why."""


def _code(value: str, meaning: str) -> Any:
    """A concept in this product's private coding scheme."""
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=CODING_SCHEME, meaning=meaning[:64])


def _sr_uid(settings: Settings, *parts: object) -> str:
    """A UID that is the same for the same ``parts`` in one deployment (keyed by its secret)."""
    from pydicom.uid import generate_uid

    secret = derived_key(settings.secret_key, SR_UID_CONTEXT).hex()
    return str(generate_uid(prefix=None, entropy_srcs=[secret, *map(str, parts)]))


def _image_container(image: Image, study: Study, dataset: Any | None) -> Any:
    """The report's container of one image: its source, result, flag, model version and review."""
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
    """The study's model version in one line (demo marked, weights sha256 named)."""
    version = study.model_version
    demo = " (demo model, not for clinical use)" if version.is_demo else ""
    return f"model version #{version.id} {version.name}{demo}; architecture {version.architecture}; weights sha256 {version.weights_sha256}"


def _source_header(settings: Settings, image: Image) -> Any | None:
    """The stored DICOM header of ``image`` (patient and study attributes included), or None."""
    if not (image.sop_instance_uid and image.storage_key):
        return None
    import pydicom

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
    report.SoftwareVersions = [__version__, f"model {version.id}"]
    report.ManufacturerModelName = "bone-xray-triage"
    identification = _coding_scheme_identification()
    report.CodingSchemeIdentificationSequence = [identification]
    buffer = io.BytesIO()
    report.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _coding_scheme_identification() -> Any:
    """The item that declares this product's private coding scheme in the report."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = CODING_SCHEME
    item.CodingSchemeName = "bone-xray-triage private codes"
    item.CodingSchemeResponsibleOrganization = "bone-xray-triage project"
    return item


def report_filename(study: Study) -> str:
    """The download name of a study's structured report."""
    return f"study-{study.id}-sr.dcm"

"""DICOM in and out: pixel handling, refusals with a reason, grouping, keyed patient hashes, the SR report."""

from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image as PILImage
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from core.config import Settings
from core.db import Database
from core.dicom import group_files, patient_key, read_metadata
from core.dicom_report import ReportUnavailable, structured_report
from core.imaging import ImageDecodeError, decode_image, inspect_image
from core.models import Image, ImageStatus, Study
from core.studies import add_upload, create_dicom_study, create_study, save_predictions
from tests.conftest import service_missing

MAX_PIXELS = 10_000_000
SECRET_NAME = "Secretname^Jane^Q"
SECRET_ID = "PID-SECRET-4711"


def _bytes(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _grey(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data, MAX_PIXELS).convert("L"), dtype=np.float64)


def _jpeg(size: tuple[int, int] = (80, 64)) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("L", size, 128).save(buffer, "JPEG")
    return buffer.getvalue()


def small_ct_like(bits: int = 12, photometric: str = "MONOCHROME2", **extra: object) -> pydicom.Dataset:
    """A small synthetic DX image: a bright bar (bone) on a dark background, ``bits`` bits stored."""
    from pydicom.dataset import FileMetaDataset

    high = 2**bits - 1
    pixels = np.full((64, 64), high // 10, dtype=np.uint16)
    pixels[:, 24:40] = high  # the brightest values: must not be clipped away
    pixels[:, 30:34] = int(high * 0.9)
    if photometric == "MONOCHROME1":
        pixels = high - pixels
    dataset = pydicom.Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = pydicom.uid.DigitalXRayImageStorageForPresentation
    dataset.SOPClassUID = pydicom.uid.DigitalXRayImageStorageForPresentation
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.Modality, dataset.BodyPartExamined, dataset.StudyDate = "DX", "HAND", "20240102"
    dataset.PatientName, dataset.PatientID = SECRET_NAME, SECRET_ID
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, photometric
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, bits, bits - 1, 0
    dataset.PixelData = pixels.tobytes()
    for key, value in extra.items():
        setattr(dataset, key, value)
    return dataset


# -- pixels ----------------------------------------------------------------------------------------


def test_rg3_twins_decode_to_the_same_picture_with_bone_bright(dicom_dir: Path) -> None:
    reference = _grey((dicom_dir / "RG3_UNCR.dcm").read_bytes())
    lossless = _grey((dicom_dir / "RG3_J2KR.dcm").read_bytes())
    lossy = _grey((dicom_dir / "RG3_J2KI.dcm").read_bytes())
    assert reference.shape == lossless.shape == lossy.shape == (1760, 1760)
    assert np.abs(lossless - reference).max() <= 1.0
    assert np.abs(lossy - reference).mean() < 1.0 and np.abs(lossy - reference).max() <= 16
    # MONOCHROME1: the tibia shaft must come out bright and the air beside the leg dark.
    bone, air = reference[350:450, 830:930].mean(), reference[650:750, 470:560].mean()
    assert bone > 150 and air < 60, (bone, air)
    assert reference.max() == 255 and reference.min() == 0


@pytest.mark.parametrize("bits", [10, 12, 16])
def test_high_bit_depth_is_scaled_without_clipping_the_brightest_values(bits: int) -> None:
    grey = _grey(_bytes(small_ct_like(bits)))
    assert grey[0, 24] == 255 and grey[0, 0] == 0
    # the two bright levels (full scale and 90 %) stay distinct instead of both saturating
    assert 200 < grey[0, 31] < 255


def test_monochrome1_is_inverted_so_bone_is_bright() -> None:
    grey = _grey(_bytes(small_ct_like(12, "MONOCHROME1")))
    assert grey[0, 24] == 255 and grey[0, 0] == 0


def test_modality_rescale_and_window_are_applied() -> None:
    # values 0..4095 rescaled to -1024..3071; the window 0 +/- 500 saturates everything above 500
    dataset = small_ct_like(12, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=0, WindowWidth=1000)
    grey = _grey(_bytes(dataset))
    background = 4095 // 10 - 1024  # -615: below the window, black
    assert background < -500 and grey[0, 0] == 0
    assert grey[0, 24] == 255 and grey[0, 31] == 255  # both above the window


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda s: s.name)
def test_compressed_transfer_syntaxes_decode_like_the_native_file(syntax: pydicom.uid.UID) -> None:
    native = small_ct_like(12)
    compressed = small_ct_like(12)
    compressed.SOPInstanceUID = native.SOPInstanceUID
    compressed.compress(syntax)
    assert np.array_equal(_grey(_bytes(compressed)), _grey(_bytes(native)))


def test_jpeg_baseline_dicom_decodes() -> None:
    from pydicom.encaps import encapsulate

    dataset = small_ct_like(8)
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
    picture = np.zeros((64, 64), dtype=np.uint8)
    picture[:, 24:40] = 250
    buffer = io.BytesIO()
    PILImage.fromarray(picture, mode="L").save(buffer, "JPEG", quality=95)
    dataset.PixelData = encapsulate([buffer.getvalue()])
    dataset["PixelData"].VR = "OB"
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.LossyImageCompression = "01"
    grey = _grey(_bytes(dataset))
    assert grey[:, 28:36].mean() > 240 and grey[:, :16].mean() < 15


def test_format_is_recognised_by_content_not_by_name(dicom_dir: Path) -> None:
    dicom = (dicom_dir / "RG3_J2KI.dcm").read_bytes()
    assert inspect_image(dicom, MAX_PIXELS).format == "dicom"  # would be named photo.jpg
    assert inspect_image(_jpeg(), MAX_PIXELS).format == "jpeg"  # would be named image.dcm


# -- refusals --------------------------------------------------------------------------------------


def _no_pixels(dicom_dir: Path) -> bytes:
    dataset = pydicom.dcmread(dicom_dir / "RG3_UNCR.dcm")
    del dataset.PixelData
    return _bytes(dataset)


def _truncated_native(dicom_dir: Path) -> bytes:
    data = (dicom_dir / "RG3_UNCR.dcm").read_bytes()
    return data[: len(data) // 2]


def _truncated_j2k(dicom_dir: Path) -> bytes:
    data = (dicom_dir / "RG3_J2KR.dcm").read_bytes()
    return data[: len(data) // 2]


def structured_report_object() -> bytes:
    """A minimal Basic Text SR object (no pixel data) of a made-up study."""
    from pydicom.dataset import FileMetaDataset

    dataset = pydicom.Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = pydicom.uid.BasicTextSRStorage
    dataset.SOPClassUID = pydicom.uid.BasicTextSRStorage
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.Modality = generate_uid(), generate_uid(), "SR"
    dataset.ValueType = "CONTAINER"
    return _bytes(dataset)


def _multi_frame() -> bytes:
    dataset = small_ct_like(12)
    dataset.NumberOfFrames = 2
    dataset.PixelData = dataset.PixelData * 2
    return _bytes(dataset)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_no_pixels, "no pixel data"),
        (_truncated_native, "truncated"),
        (_truncated_j2k, "truncated"),
        (lambda _: structured_report_object(), r"SR Storage object is not an image"),
        (lambda _: _multi_frame(), "multi-frame"),
    ],
    ids=["no-pixel-data", "truncated-native", "truncated-j2k", "sr-object", "multi-frame"],
)
def test_unusable_dicom_fails_with_a_clear_message(dicom_dir: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    data = make(dicom_dir)
    with pytest.raises(ImageDecodeError, match=message):
        inspect_image(data, MAX_PIXELS)
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data, MAX_PIXELS)


# -- metadata, grouping, patient key ----------------------------------------------------------------


def test_metadata_keeps_uids_and_a_keyed_patient_hash_but_no_identifiers(dicom_dir: Path) -> None:
    data = (dicom_dir / "RG3_UNCR.dcm").read_bytes()
    meta = read_metadata(data, "secret one")
    assert meta is not None
    assert meta.sop_instance_uid == "1.3.6.1.4.1.5962.1.1.11.1.1.20040826185059.5457"
    assert meta.study_instance_uid == "1.3.6.1.4.1.5962.1.2.11.20040826185059.5457"
    assert (meta.modality, meta.body_part, meta.photometric, meta.bits_stored) == ("CR", "EXTREMITY", "MONOCHROME1", 10)
    assert str(meta.study_date) == "2004-08-26"
    assert meta.patient_key == patient_key("11RG3", "secret one")
    assert meta.patient_key != patient_key("11RG3", "secret two")  # keyed: useless without the server's secret
    assert "11RG3" not in repr(meta) and "CompressedSamples" not in repr(meta)
    assert read_metadata(_jpeg(), "secret") is None


def test_upload_groups_by_study_instance_uid_and_keeps_other_files_together(dicom_dir: Path) -> None:
    first, second = small_ct_like(12), small_ct_like(12)
    second_again = small_ct_like(12, StudyInstanceUID=second.StudyInstanceUID)
    rg3 = (dicom_dir / "RG3_UNCR.dcm").read_bytes()
    groups = group_files(
        [("a.dcm", _bytes(first)), ("photo.jpg", _jpeg()), ("b.dcm", _bytes(second)), ("rg3.jpg", rg3),
         ("c", _bytes(second_again)), ("notes.txt", b"hello")],
        "secret",
    )
    assert [g.study_instance_uid for g in groups] == [
        first.StudyInstanceUID, None, second.StudyInstanceUID, "1.3.6.1.4.1.5962.1.2.11.20040826185059.5457"]
    assert [[name for name, _, _ in g.files] for g in groups] == [["a.dcm"], ["photo.jpg", "notes.txt"], ["b.dcm", "c"], ["rg3.jpg"]]
    assert groups[3].describe() == "CR EXTREMITY 2004-08-26"


# -- the structured report --------------------------------------------------------------------------


@dataclass
class _Result:
    probabilities: dict[str, float]
    label: str
    confidence: float
    flagged: bool
    flag_reason: str | None


def classified_dicom_study(db: Database, settings: Settings, files: list[tuple[str, bytes]]) -> int:
    """Record ``files`` as one study and write a prediction for every queued image (as the worker would)."""
    with db.transaction() as session:
        from core.registry import production_version

        version = production_version(session)
        groups = group_files(files, settings.secret_key)
        study = create_dicom_study(session, "sr test", version, groups[0])
        images = [add_upload(session, settings, study, name, data) for group in groups for name, data, _ in group.files]
        queued = [image for image in images if image.status == ImageStatus.QUEUED]
        pairs = []
        for index, image in enumerate(queued):
            low = index % 2 == 0
            confidence = 0.6 if low else 0.95
            pairs.append((image, _Result({version.labels[0]: confidence, version.labels[1]: 1 - confidence},
                                         version.labels[0], confidence, low, "low confidence" if low else None)))
        save_predictions(session, version.id, pairs)
        return study.id


def dciodvfy_errors(data: bytes, tmp_path: Path) -> list[str]:
    """The error lines dciodvfy reports for a DICOM file (skips when dicom3tools is not installed)."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        service_missing("dciodvfy not installed (apt-get install dicom3tools; .ci/system-packages installs it in CI)")
    path = tmp_path / "report.dcm"
    path.write_bytes(data)
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    output = run.stdout + run.stderr
    return [line for line in output.splitlines() if line.startswith("Error")] or ([] if run.returncode == 0 else [output])


def test_structured_report_reads_back_names_every_image_and_model_and_passes_dciodvfy(
    db: Database, settings: Settings, production_model: int, dicom_dir: Path, tmp_path: Path
) -> None:
    files = [(name, (dicom_dir / name).read_bytes()) for name in ("RG3_UNCR.dcm", "RG3_J2KR.dcm", "RG3_J2KI.dcm")]
    files.append(("report-object.dcm", _bytes(_sr_in_study(files[0][1]))))  # refused, listed with its reason
    study_id = classified_dicom_study(db, settings, files)
    with db.transaction() as session:
        study = session.get(Study, study_id)
        data = structured_report(session, settings, study)
        version = study.model_version
        uids = [image.sop_instance_uid for image in study.images if image.status == ImageStatus.DONE]
    assert len(uids) == 3
    report = pydicom.dcmread(io.BytesIO(data))
    assert report.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
    assert report.StudyInstanceUID == "1.3.6.1.4.1.5962.1.2.11.20040826185059.5457"
    assert report.VerificationFlag == "UNVERIFIED" and report.CompletionFlag == "PARTIAL"
    evidence = {item.ReferencedSOPInstanceUID
                for study_item in report.CurrentRequestedProcedureEvidenceSequence
                for series in study_item.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert evidence == set(uids)
    text = report_values(data)
    for uid in uids:
        assert uid in text
    assert f"model version #{version.id} {version.name}" in text and version.weights_sha256 in text
    assert "not a diagnosis" in text
    assert "SR Storage object is not an image" in text  # the refused SR object is listed with why
    for label in version.labels:
        assert f"Probability of {label}" in text
    assert dciodvfy_errors(data, tmp_path) == []


def report_values(data: bytes) -> str:
    """Every value in a DICOM file, nested sequences included, one per line (for searching)."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    return "\n".join(str(element.value) for element in dataset.iterall() if element.VR != "SQ")


def _sr_in_study(source: bytes) -> pydicom.Dataset:
    dataset = pydicom.dcmread(io.BytesIO(structured_report_object()))
    dataset.StudyInstanceUID = pydicom.dcmread(io.BytesIO(source), stop_before_pixels=True).StudyInstanceUID
    return dataset


def test_structured_report_needs_a_classified_dicom_image(db: Database, settings: Settings, production_model: int) -> None:
    with db.transaction() as session:
        from core.registry import production_version

        study = create_study(session, "jpegs", production_version(session))
        add_upload(session, settings, study, "photo.jpg", _jpeg())
        with pytest.raises(ReportUnavailable, match="no classified DICOM image"):
            structured_report(session, settings, study)


def test_structured_report_explains_non_dicom_images(
    db: Database, settings: Settings, production_model: int, dicom_dir: Path, tmp_path: Path
) -> None:
    study_id = classified_dicom_study(db, settings, [("photo.jpg", _jpeg((96, 96))), ("rg3.dcm", (dicom_dir / "RG3_UNCR.dcm").read_bytes())])
    with db.transaction() as session:
        data = structured_report(session, settings, session.get(Study, study_id))
    text = report_values(data)
    assert "Not a DICOM instance" in text and "photo.jpg" in text
    assert dciodvfy_errors(data, tmp_path) == []


def test_images_rows_hold_no_patient_identifiers(db: Database, settings: Settings, production_model: int) -> None:
    dataset = small_ct_like(12)
    classified_dicom_study(db, settings, [("hand.dcm", _bytes(dataset))])
    with db.transaction() as session:
        image = session.query(Image).one()
        assert image.patient_key == patient_key(SECRET_ID, settings.secret_key)
        values = [str(getattr(image, column.name)) for column in Image.__table__.columns]
    assert not any(SECRET_ID in value or "Secretname" in value for value in values)


# -- helpers shared with the portal and end-to-end DICOM tests -------------------------------------

PHI = {"PatientName": "Quixotepatient^Esmeralda", "PatientID": "MRN-QX-99817", "PatientBirthDate": "19610203",
       "OtherPatientIDs": "ALT-QX-55", "AccessionNumber": "ACC-QX-31337"}


def with_identity(source: Path | bytes) -> bytes:
    """A copy of a DICOM file whose patient fields carry the values in :data:`PHI` (original pixels)."""
    data = source if isinstance(source, bytes) else source.read_bytes()
    dataset = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in PHI.items():
        setattr(dataset, keyword, value)
    return _bytes(dataset)


def database_hits(url: str, needles: list[str]) -> list[str]:
    """``table.column=value`` for every text or JSON cell of every table that contains one of ``needles``."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    hits = []
    try:
        with engine.connect() as connection:
            metadata = sa.MetaData()
            metadata.reflect(connection)
            assert metadata.tables, "no tables reflected"
            for table in metadata.tables.values():
                for row in connection.execute(sa.select(table)).mappings():
                    for column, value in row.items():
                        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
                        hits += [f"{table.name}.{column}={text[:80]}" for needle in needles if needle.lower() in text.lower()]
    finally:
        engine.dispose()
    return hits


def test_database_scan_finds_what_it_looks_for(db: Database, settings: Settings) -> None:
    with db.transaction() as session:
        from core.audit import record

        record(session, "upload", None, detail={"note": PHI["PatientName"]})
    assert database_hits(settings.database_url, [PHI["PatientName"]]) != []

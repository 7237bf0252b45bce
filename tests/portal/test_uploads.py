"""Uploads through the API: checking, content-addressed storage, queueing after commit, zip rules."""

from __future__ import annotations

import io
import math
import struct
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from celery.signals import before_task_publish
from flask.testing import FlaskClient
from sqlalchemy import func, select

from core.config import Settings
from core.db import Database
from core.models import Image, Study
from core.queue import CLASSIFY_CHUNK_TASK
from core.storage import sha256_bytes
from portal import create_app
from portal.uploads import READ_BLOCK, RefusedFile, read_file
from tests.conftest import deploy_tiny_model, make_settings, saved_image, xray_sample
from tests.portal.conftest import admin_token, broker_messages, files_under, token_client


def _post(client: FlaskClient, name: str, files: dict[str, bytes] | None = None, archive: bytes | None = None):
    data: dict[str, object] = {"name": name}
    if files is not None:
        data["files"] = [(io.BytesIO(content), filename) for filename, content in files.items()]
    if archive is not None:
        data["archive"] = (io.BytesIO(archive), "batch.zip")
    return client.post("/api/studies", data=data, content_type="multipart/form-data")


def _zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as bundle:
        for name, content in members.items():
            bundle.writestr(name, content)
    return buffer.getvalue()


T = TypeVar("T")
MB = 1024 * 1024


def _peak_allocated(call: Callable[[], T]) -> tuple[T, int]:
    """``call()``, and the peak of the memory Python allocated during it (tracemalloc counts only what is allocated while it runs)."""
    tracemalloc.start()
    try:
        result = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


@pytest.fixture
def limited_portal(tmp_path: Path, tiny_weights: dict[str, object]) -> Iterator[Callable[..., tuple[FlaskClient, Settings]]]:
    """Make a portal with the given settings (e.g. ``max_file_mb=1``) and a production model: (admin API client, settings)."""
    databases: list[Database] = []

    def make(**overrides: object) -> tuple[FlaskClient, Settings]:
        limited = make_settings(tmp_path / "limited", **overrides)
        database, _ = deploy_tiny_model(limited, tiny_weights)
        databases.append(database)
        return token_client(create_app(limited), admin_token(database)), limited

    yield make
    for database in databases:
        database.dispose()


def test_upload_stores_good_images_fails_bad_ones_and_queues_one_task_per_chunk_after_commit(
    client: FlaskClient, db: Database, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    good = {path.name: path.read_bytes() for path in xray_sample(xrays_dir, 10)}
    truncated = next(iter(good.values()))[:200]
    bad = {"truncated.jpg": truncated, "notes.jpg": b"this is a text file, not a radiograph\n", "empty.jpg": b""}
    seen_at_publish: list[list[tuple[int, str]]] = []
    study_at_publish: list[tuple[str, int]] = []  # the study's status and its images recorded so far

    def check_committed(sender: str, body: tuple, **_: object) -> None:
        study_id, image_ids = body[0]
        with db.transaction() as other:  # a separate connection sees only committed rows
            rows = other.execute(select(Image.id, Image.status).where(Image.id.in_(image_ids), Image.study_id == study_id))
            seen_at_publish.append([(row.id, row.status.value) for row in rows])
            recorded = other.scalar(select(func.count()).select_from(Image).where(Image.study_id == study_id))
            study_at_publish.append((other.get(Study, study_id).status.value, recorded))

    before_task_publish.connect(check_committed, weak=False)
    try:
        response = _post(client, "ward 4", {**good, **bad})
    finally:
        before_task_publish.disconnect(check_committed)

    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert body["name"] == "ward 4" and body["model_version"]["id"] == production_model
    assert body["status_url"] == f"/api/studies/{body['id']}"
    results = {item["filename"]: item for item in body["files"]}
    assert set(results) == set(good) | set(bad)
    for name in good:
        assert results[name]["status"] == "queued" and results[name]["error"] is None
    assert results["truncated.jpg"]["status"] == "failed"
    assert "truncated" in results["truncated.jpg"]["error"] or "corrupt" in results["truncated.jpg"]["error"]
    assert results["notes.jpg"]["status"] == "failed" and "not an image" in results["notes.jpg"]["error"]
    assert results["empty.jpg"]["status"] == "failed" and "empty file" in results["empty.jpg"]["error"]
    assert body["counts"] == {**body["counts"], "queued": 10, "failed": 3, "total": 13}

    with db.transaction() as session:
        images = {image.filename: image for image in session.scalars(select(Image).where(Image.study_id == body["id"]))}
    store = settings.storage_dir
    for name, content in good.items():
        digest = sha256_bytes(content)
        assert images[name].sha256 == digest
        assert (store / digest[:2] / digest).read_bytes() == content
    assert all(images[name].storage_key is None for name in bad)

    expected_chunks = math.ceil(len(good) / settings.chunk_size)
    messages = broker_messages(settings)
    assert body["tasks"] == expected_chunks == len(messages) == 2
    assert {m["task"] for m in messages} == {CLASSIFY_CHUNK_TASK}
    queued_ids = sorted(images[name].id for name in good)
    assert sorted(i for m in messages for i in m["args"][1]) == queued_ids
    assert all(m["args"][0] == body["id"] for m in messages)
    # When each task was published, its images were already committed (visible to another connection).
    assert len(seen_at_publish) == expected_chunks
    assert sorted(i for rows in seen_at_publish for i, status in rows if status == "queued") == queued_ids
    # The first chunk went to the workers while the rest of the upload was still being recorded, and
    # the study could not be finished meanwhile; once the last file was recorded it was queued.
    assert study_at_publish[0] == ("receiving", settings.chunk_size) and settings.chunk_size < len(good)
    assert body["status"] == "queued"


def test_an_upload_that_fails_half_way_keeps_its_recorded_chunks_queued_and_its_study_ends(
    client: FlaskClient, db: Database, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    sample = {path.name: path.read_bytes() for path in xray_sample(xrays_dir, 12)}
    digests = {name: sha256_bytes(content) for name, content in sample.items()}
    names = list(sample)
    first_chunk = names[: settings.chunk_size]
    # The storage fails on the file after the first chunk: its folder's name is taken by a file.
    breaking = next(name for name in names[settings.chunk_size :]
                    if digests[name][:2] not in {digests[other][:2] for other in first_chunk})
    files = {name: sample[name] for name in first_chunk + [breaking]}
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    (settings.storage_dir / digests[breaking][:2]).write_bytes(b"in the way")

    assert _post(client, "ward 9", files).status_code == 500

    with db.transaction() as session:
        study = session.scalars(select(Study).where(Study.name == "ward 9")).one()
        images = list(session.scalars(select(Image).where(Image.study_id == study.id)))
        # The first chunk was recorded and sent before the failure; the study is not left receiving.
        assert study.status.value == "queued"
        assert sorted(image.filename for image in images) == sorted(first_chunk)
        assert all(image.status.value == "queued" for image in images)
    messages = broker_messages(settings)
    assert [sorted(m["args"][1]) for m in messages] == [sorted(image.id for image in images)]


def test_zip_upload_records_members_by_display_name_and_skips_junk(
    client: FlaskClient, db: Database, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    first, second = (path.read_bytes() for path in xray_sample(xrays_dir, 2))
    archive = _zip({
        "batch/left wrist.jpg": first,
        "batch/sub/right.jpg": second,
        "batch/readme.txt": b"hello",
        "__MACOSX/batch/._left wrist.jpg": b"\x00\x05junk",
        "batch/.DS_Store": b"junk",
    })
    response = _post(client, "zipped", archive=archive)
    assert response.status_code == 201, response.get_json()
    files = {item["filename"]: item for item in response.get_json()["files"]}
    assert set(files) == {"batch/left wrist.jpg", "batch/sub/right.jpg", "batch/readme.txt"}
    assert files["batch/left wrist.jpg"]["status"] == "queued"
    assert files["batch/sub/right.jpg"]["status"] == "queued"
    assert files["batch/readme.txt"]["status"] == "failed"
    assert {sha256_bytes(first), sha256_bytes(second)} == {p.name for p in files_under(settings.storage_dir)}
    assert len(broker_messages(settings)) == 1


@pytest.mark.parametrize("evil", ["../evil.jpg", "/abs.jpg", "batch/../../evil.jpg", "C:\\evil.jpg"])
def test_zip_slip_is_refused_and_nothing_is_written(
    client: FlaskClient, db: Database, settings: Settings, production_model: int, xrays_dir: Path, tmp_path: Path, evil: str
) -> None:
    image = xray_sample(xrays_dir, 1)[0].read_bytes()
    before = files_under(tmp_path)
    response = _post(client, "slip", archive=_zip({"ok.jpg": image, evil: image}))
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert evil in error or repr(evil) in error
    assert "'..'" in error or "absolute" in error
    # Nothing was stored (not even the good member), recorded or queued, and no file appeared anywhere.
    new_files = files_under(tmp_path) - before
    assert not [p for p in new_files if not p.name.startswith("triage.db")], new_files
    assert not (tmp_path / "evil.jpg").exists() and not Path("/abs.jpg").exists()
    assert broker_messages(settings) == []
    with db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Study)) == 0


def test_corrupt_zip_is_a_clear_400(client: FlaskClient, production_model: int, settings: Settings) -> None:
    response = _post(client, "broken", archive=b"PK\x03\x04 this is not really a zip")
    assert response.status_code == 400
    assert "not a valid zip" in response.get_json()["error"]
    assert broker_messages(settings) == []


def test_zip_bomb_over_the_upload_limit_is_refused_with_413(
    limited_portal: Callable[..., tuple[FlaskClient, Settings]],
) -> None:
    client, small = limited_portal(max_upload_mb=1)
    bomb = _zip({"zeros.jpg": b"\x00" * (3 * 1024 * 1024)})
    assert len(bomb) < 100_000  # the request itself is small; only its content is large
    response = _post(client, "bomb", archive=bomb)
    assert response.status_code == 413
    error = response.get_json()["error"]
    assert "unpacks to" in error and "TRIAGE_MAX_UPLOAD_MB" in error
    assert broker_messages(small) == []


def test_request_over_the_upload_limit_is_413_naming_the_setting(tmp_path: Path) -> None:
    from core.migrate import upgrade

    small = make_settings(tmp_path / "small", max_upload_mb=1)
    upgrade(small.database_url)
    client = token_client(create_app(small), admin_token(Database(small)))
    response = _post(client, "huge", {"big.jpg": b"\xff" * (2 * 1024 * 1024)})
    assert response.status_code == 413
    error = response.get_json()["error"]
    assert "1 MB" in error and "TRIAGE_MAX_UPLOAD_MB" in error
    page = client.post("/studies", data={"files": (io.BytesIO(b"\xff" * (2 * 1024 * 1024)), "big.jpg")},
                       content_type="multipart/form-data")
    assert page.status_code == 413 and b"TRIAGE_MAX_UPLOAD_MB" in page.data and page.mimetype == "text/html"


def test_upload_without_a_production_model_is_409_and_records_nothing(
    client: FlaskClient, db: Database, settings: Settings, xrays_dir: Path
) -> None:
    response = _post(client, "too early", {"a.jpg": xray_sample(xrays_dir, 1)[0].read_bytes()})
    assert response.status_code == 409
    error = response.get_json()["error"]
    assert "No production model" in error and "--promote" in error
    assert broker_messages(settings) == []
    with db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Study)) == 0


def test_upload_with_no_files_is_400(client: FlaskClient, production_model: int, settings: Settings) -> None:
    response = client.post("/api/studies", data={"name": "nothing"}, content_type="multipart/form-data")
    assert response.status_code == 400
    assert "No files" in response.get_json()["error"]
    empty_part = client.post("/api/studies", data={"name": "x", "files": (io.BytesIO(b""), "")},
                             content_type="multipart/form-data")
    assert empty_part.status_code == 400
    assert broker_messages(settings) == []


def test_html_upload_form_creates_study_and_redirects_to_its_page(
    app, users: dict, production_model: int, settings: Settings, xrays_dir: Path  # type: ignore[no-untyped-def]
) -> None:
    from tests.portal.conftest import csrf_token, session_client

    client = session_client(app, "uploader")  # a person in a browser: cookie, no token

    token = csrf_token(client.get("/").get_data(as_text=True))
    image = xray_sample(xrays_dir, 1)[0]
    response = client.post("/studies", data={
        "csrf_token": token, "name": "from the form",
        "files": [(io.BytesIO(image.read_bytes()), f"folder/{image.name}")],
        "archive": (io.BytesIO(b""), ""),
    }, content_type="multipart/form-data")
    assert response.status_code == 303
    assert response.headers["Location"].startswith("/studies/")
    page = client.get(response.headers["Location"])
    assert page.status_code == 200 and f"folder/{image.name}".encode() in page.data
    assert len(broker_messages(settings)) == 1
    # Without the CSRF token the form is refused.
    refused = client.post("/studies", data={"name": "x", "files": [(io.BytesIO(b"x"), "a.jpg")]},
                          content_type="multipart/form-data")
    assert refused.status_code == 400 and b"CSRF" in refused.data


def test_study_whose_every_file_is_refused_is_done_at_once_with_no_task(
    client: FlaskClient, production_model: int, settings: Settings
) -> None:
    response = _post(client, "all bad", {"a.jpg": b"", "b.jpg": b"text"})
    assert response.status_code == 201
    body = response.get_json()
    assert body["status"] == "done" and body["tasks"] == 0
    assert body["counts"]["failed"] == 2 and body["counts"]["total"] == 2
    assert broker_messages(settings) == []
    assert client.get(f"/api/studies/{body['id']}").get_json()["status"] == "done"


def test_zip_members_declared_over_the_file_limit_are_refused_without_being_read(
    limited_portal: Callable[..., tuple[FlaskClient, Settings]],
) -> None:
    client, limited = limited_portal(max_file_mb=1, max_upload_mb=16)
    zeros = bytes(8 * MB)
    members = {f"scans/{index}.png": zeros for index in range(8)}  # 64 MB declared: 4 times the upload limit
    archive = _zip({**members, "scans/ok.png": saved_image("PNG", 90)})
    assert len(archive) < 200_000
    oversized_plain_file = saved_image("PNG", 90)[:16] + bytes(2 * MB)

    def upload():  # type: ignore[no-untyped-def]
        return client.post("/api/studies", data={
            "name": "declared too large", "archive": (io.BytesIO(archive), "bomb.zip"),
            "files": [(io.BytesIO(oversized_plain_file), "big.png")],
        }, content_type="multipart/form-data")

    response, peak = _peak_allocated(upload)
    assert response.status_code == 201, response.get_json()
    files = {item["filename"]: item for item in response.get_json()["files"]}
    for name in members:
        assert files[name]["status"] == "failed"
        assert files[name]["error"] == (
            "file too large: 8,388,608 bytes declared by the zip, limit 1,048,576 (TRIAGE_MAX_FILE_MB); not read"
        )
    assert files["big.png"]["error"] == "file too large: 2,097,168 bytes, limit 1,048,576 (TRIAGE_MAX_FILE_MB)"
    assert files["scans/ok.png"]["status"] == "queued"
    assert len(broker_messages(limited)) == 1
    # Nothing large was allocated: not one 8 MB member, let alone the 64 MB they claim together.
    assert peak < 6 * MB, f"peak {peak:,} bytes"


def test_zip_of_large_members_that_are_not_images_is_refused_from_their_first_block(
    limited_portal: Callable[..., tuple[FlaskClient, Settings]],
) -> None:
    # The reported case, scaled down: members under the file limit, together under the upload limit,
    # that are not images. They used to be extracted whole (all at once) before each was refused.
    client, limited = limited_portal(max_file_mb=10, max_upload_mb=128)
    zeros = bytes(8 * MB)
    archive = _zip({f"m{index}.jpg": zeros for index in range(8)})
    response, peak = _peak_allocated(lambda: _post(client, "zeros", archive=archive))
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert [item["status"] for item in body["files"]] == ["failed"] * 8
    assert all(item["error"].startswith("not an image: the content is not JPEG, PNG, GIF") for item in body["files"])
    assert broker_messages(limited) == []
    assert peak < 8 * MB, f"peak {peak:,} bytes: a whole member was extracted (before: all 64 MB at once)"


def test_zip_whose_members_together_exceed_the_upload_limit_is_refused_before_extraction(
    limited_portal: Callable[..., tuple[FlaskClient, Settings]],
) -> None:
    client, limited = limited_portal(max_file_mb=1, max_upload_mb=2)
    # Each member is under the file limit; together they declare 3 MB, over the 2 MB upload limit.
    archive = _zip({f"part{index}.png": saved_image("PNG", 90)[:16] + bytes(MB - 16) for index in range(3)})
    response, peak = _peak_allocated(lambda: _post(client, "too much", archive=archive))
    assert response.status_code == 413
    assert response.get_json()["error"] == (
        "batch.zip refused: it unpacks to 3,145,728 bytes, over the limit of 2 MB (TRIAGE_MAX_UPLOAD_MB)"
    )
    assert peak < 1 * MB, f"peak {peak:,} bytes: a member was extracted"
    assert broker_messages(limited) == []


def _lie_about_size(archive: bytes, name: bytes, size: int) -> bytes:
    """``archive`` whose local and central headers declare ``size`` uncompressed bytes for member ``name``."""
    data = bytearray(archive)
    local = data.index(b"PK\x03\x04" + data[4:8])  # the first member's local header
    central = data.index(b"PK\x01\x02")
    assert data[local + 30:local + 30 + len(name)] == name and data[central + 46:central + 46 + len(name)] == name
    struct.pack_into("<I", data, local + 22, size)
    struct.pack_into("<I", data, central + 24, size)
    return bytes(data)


def test_a_zip_header_that_understates_a_member_cannot_make_it_read_past_its_claim(
    client: FlaskClient, production_model: int, settings: Settings
) -> None:
    png = saved_image("PNG", 90)
    archive = _lie_about_size(_zip({"liar.png": png[:64] + bytes(8 * MB)}), b"liar.png", 1000)
    response, peak = _peak_allocated(lambda: _post(client, "liar", archive=archive))
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error.startswith("batch.zip is corrupt: cannot read 'liar.png'") and "CRC" in error
    assert peak < 4 * MB, f"peak {peak:,} bytes: the member was read past its claimed size"
    assert broker_messages(settings) == []


def test_reading_a_file_stops_at_the_file_limit_whatever_its_size_claimed() -> None:
    stream = io.BytesIO(saved_image("PNG", 90)[:64] + bytes(5 * MB))
    item = read_file("liar.png", stream, 100, 2 * MB, "declared by the zip")
    assert isinstance(item, RefusedFile)
    assert item.reason.startswith("file too large: ") and "(100 declared by the zip)" in item.reason
    assert item.reason.endswith("limit 2,097,152 (TRIAGE_MAX_FILE_MB)")
    assert stream.tell() <= 2 * MB + READ_BLOCK  # it stopped there, not at the end
    assert read_file("small.png", io.BytesIO(b"\x89PNG small"), 11, 2 * MB) == ("small.png", b"\x89PNG small")


@pytest.mark.parametrize("inner_size", ["small", "large"])  # large: refused from its first bytes
def test_a_zip_inside_the_zip_is_not_expanded_and_says_so(
    client: FlaskClient, db: Database, settings: Settings, production_model: int, inner_size: str
) -> None:
    image = saved_image("PNG", 90)
    padding = bytes(2 * READ_BLOCK) if inner_size != "small" else b""
    inner = _zip({"a.png": saved_image("PNG", 120), "padding.bin": padding}, compression=zipfile.ZIP_STORED)
    response = _post(client, "nested", archive=_zip({"batch/ok.png": image, "batch/a.zip": inner}))
    assert response.status_code == 201, response.get_json()
    files = {item["filename"]: item for item in response.get_json()["files"]}
    assert files["batch/ok.png"]["status"] == "queued"
    assert files["batch/a.zip"]["status"] == "failed"
    assert files["batch/a.zip"]["error"].startswith("a zip archive, not an image: ")
    assert "zips inside a zip are not expanded" in files["batch/a.zip"]["error"]
    assert {p.name for p in files_under(settings.storage_dir)} == {sha256_bytes(image)}


def test_each_supported_format_is_accepted_and_others_are_refused_with_a_reason(
    client: FlaskClient, production_model: int, settings: Settings
) -> None:
    accepted = {f"scan.{name.lower()}": saved_image(name, 90) for name in ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")}
    accepted["animated.gif"] = saved_image("GIF", 40, 200)  # the first frame is classified
    bad_crc = bytearray(saved_image("PNG", 90))
    bad_crc[29] ^= 0xFF  # the IHDR chunk's CRC
    refused = {"bad-crc.png": bytes(bad_crc), "scan.ppm": saved_image("PPM", 90)}
    response = _post(client, "formats", {**accepted, **refused})
    assert response.status_code == 201, response.get_json()
    files = {item["filename"]: item for item in response.get_json()["files"]}
    assert {name: files[name]["status"] for name in accepted} == dict.fromkeys(accepted, "queued")
    assert files["bad-crc.png"]["error"].startswith("corrupt PNG file: ")
    assert files["scan.ppm"]["error"].startswith("unsupported image format PPM: use JPEG, PNG, GIF, BMP, TIFF, WebP or DICOM")

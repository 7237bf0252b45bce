"""Content store keys and upload decoding with specific errors."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from core.imaging import ImageDecodeError, decode_image, inspect_image
from core.storage import ContentStore, sha256_bytes


def _jpeg(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, "JPEG")
    return buffer.getvalue()


def test_store_keys_by_content_and_is_idempotent(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    digest, key = store.put_bytes(b"abc")
    assert digest == sha256_bytes(b"abc") and key == f"{digest[:2]}/{digest}"
    assert store.put_bytes(b"abc") == (digest, key)
    assert store.read(key) == b"abc"
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [digest]


def test_store_refuses_keys_outside_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ContentStore(tmp_path / "store").path_for_key("../outside")


def test_grey_jpeg_decodes_to_rgb() -> None:
    image = decode_image(_jpeg(), max_pixels=10_000)
    assert image.mode == "RGB" and image.size == (64, 48)
    assert inspect_image(_jpeg(), max_pixels=10_000).format == "jpeg"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"hello, I am text", "not an image"),
        (_jpeg()[:200], "truncated"),
    ],
)
def test_bad_uploads_fail_with_a_specific_message(data: bytes, message: str) -> None:
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data, max_pixels=10_000)


def test_pixel_limit_is_checked_from_the_header() -> None:
    with pytest.raises(ImageDecodeError, match="too large"):
        inspect_image(_jpeg(200, 200), max_pixels=10_000)


def test_dicom_is_recognised_by_content_not_name(dicom_dir: Path) -> None:
    data = (dicom_dir / "RG3_UNCR.dcm").read_bytes()
    info = inspect_image(data, max_pixels=10_000_000)
    assert info.format == "dicom" and (info.width, info.height) == (1760, 1760)
    image = decode_image(data, max_pixels=10_000_000)
    assert image.mode == "RGB" and image.size == (1760, 1760)

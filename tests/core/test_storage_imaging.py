"""Content store keys and upload decoding with specific errors."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from core.imaging import ImageDecodeError, content_problem, decode_image, inspect_image, sniff_format
from core.storage import ContentStore, sha256_bytes
from tests.conftest import saved_image


def _jpeg(width: int = 80, height: int = 64) -> bytes:
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
    assert image.mode == "RGB" and image.size == (80, 64)
    assert inspect_image(_jpeg(), max_pixels=10_000).format == "jpeg"


def test_grey_decode_of_a_radiograph_equals_every_channel_of_the_full_decode(xrays_dir: Path) -> None:
    """The fast path's luminance-only JPEG decode loses nothing for grey content (all of xrays/)."""
    import numpy as np

    from tests.conftest import xray_sample

    for path in xray_sample(xrays_dir, 24):
        data = path.read_bytes()
        grey = decode_image(data, max_pixels=10**8, grey=True)
        full = np.asarray(decode_image(data, max_pixels=10**8))
        assert grey.mode == "L" and grey.size == (full.shape[1], full.shape[0])
        for channel in range(3):
            assert np.array_equal(np.asarray(grey), full[..., channel]), (path.name, channel)


def test_grey_decode_of_colour_and_non_jpeg_images_gives_luminance() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 40, 40)).save(buffer, "JPEG", quality=95)
    grey = decode_image(buffer.getvalue(), max_pixels=10_000, grey=True)
    assert grey.mode == "L" and grey.size == (40, 30)
    assert abs(grey.getpixel((20, 15)) - Image.new("RGB", (1, 1), (200, 40, 40)).convert("L").getpixel((0, 0))) <= 3
    buffer = io.BytesIO()
    Image.new("LA", (20, 10), (90, 255)).save(buffer, "PNG")
    png = decode_image(buffer.getvalue(), max_pixels=10_000, grey=True)
    assert png.mode == "L" and png.getpixel((3, 3)) == 90


def test_grey_picture_gives_the_same_tensor_as_its_rgb_copy(xrays_dir: Path) -> None:
    """Resizing one grey channel and repeating it equals resizing R = G = B: the fast path's premise."""
    import torch

    from core.ml.transforms import build_transform
    from core.preprocessing import default_preprocessing
    from tests.conftest import xray_sample

    transform = build_transform(default_preprocessing(224))
    for path in xray_sample(xrays_dir, 6):
        grey = decode_image(path.read_bytes(), max_pixels=10**8, grey=True)
        from_grey, from_rgb = transform(grey), transform(grey.convert("RGB"))
        assert from_grey.shape == (3, 224, 224)
        assert torch.equal(from_grey, from_rgb), path.name


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


@pytest.mark.parametrize("size", [(1, 1), (63, 400), (400, 20)])
def test_images_too_small_to_read_are_refused_at_upload(size: tuple[int, int]) -> None:
    buffer = io.BytesIO()
    Image.new("L", size, 90).save(buffer, "PNG")
    with pytest.raises(ImageDecodeError, match=rf"too small to read: {size[0]}x{size[1]} pixels.*at least 64"):
        inspect_image(buffer.getvalue(), max_pixels=10_000_000)
    buffer = io.BytesIO()
    Image.new("L", (64, 64), 90).save(buffer, "PNG")
    assert inspect_image(buffer.getvalue(), max_pixels=10_000_000).width == 64


@pytest.mark.parametrize(
    ("pil_format", "recorded", "shades"),
    [
        ("JPEG", "jpeg", (90,)),
        ("PNG", "png", (90,)),
        ("GIF", "gif", (90,)),
        ("BMP", "bmp", (90,)),
        ("TIFF", "tiff", (90,)),
        ("WEBP", "webp", (90,)),
        # Multi-frame files are read as their first frame.
        ("GIF", "gif", (40, 200)),
        ("TIFF", "tiff", (40, 200)),
        ("WEBP", "webp", (40, 200)),
        ("MPO", "jpeg", (40, 200)),  # a multi-picture JPEG (cameras, phones)
    ],
)
def test_each_supported_format_decodes_to_an_rgb_picture_of_its_first_frame(
    pil_format: str, recorded: str, shades: tuple[int, ...]
) -> None:
    data = saved_image(pil_format, *shades)
    assert sniff_format(data[:132]) == recorded and content_problem(data[:132]) is None
    info = inspect_image(data, max_pixels=10_000_000)
    assert (info.format, info.width, info.height) == (recorded, 96, 80)
    picture = decode_image(data, max_pixels=10_000_000)
    assert picture.mode == "RGB" and picture.size == (96, 80)
    red, green, blue = picture.getpixel((48, 40))
    assert red == green == blue and abs(red - shades[0]) <= 4, (pil_format, picture.getpixel((48, 40)))


@pytest.mark.parametrize("pil_format", ["PPM", "ICO", "PCX", "TGA", "SGI"])
def test_other_formats_pillow_knows_are_refused_by_name(pil_format: str) -> None:
    data = saved_image(pil_format, 90)
    for check in (inspect_image, decode_image):
        with pytest.raises(ImageDecodeError, match=rf"^unsupported image format {pil_format}: use JPEG, PNG, GIF, BMP, TIFF, WebP or DICOM"):
            check(data, 10_000_000)


def test_a_png_with_a_bad_checksum_is_a_corrupt_png_not_not_an_image() -> None:
    data = bytearray(saved_image("PNG", 90))
    data[29] ^= 0xFF  # the CRC of the IHDR chunk (8-byte signature + length + type + 13 data bytes)
    for check in (inspect_image, decode_image):
        with pytest.raises(ImageDecodeError, match=r"^corrupt PNG file: .*bad header checksum in b'IHDR'"):
            check(bytes(data), 10_000_000)


@pytest.mark.parametrize(("pil_format", "name"), [
    ("JPEG", "JPEG"), ("PNG", "PNG"), ("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF"), ("WEBP", "WebP"),
])
def test_a_cut_header_names_the_format_it_claims(pil_format: str, name: str) -> None:
    for length in (12, 16, 30):  # 12 bytes: the longest signature (WebP) is complete
        with pytest.raises(ImageDecodeError, match=rf"^corrupt (or truncated )?{name} file: ") as caught:
            inspect_image(saved_image(pil_format, 90)[:length], 10_000_000)
        assert "unpack_from" not in str(caught.value)  # Pillow's struct errors are said plainly


def test_a_zip_or_zeros_are_not_images_from_their_first_bytes() -> None:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("inner.png", saved_image("PNG", 90))
    with pytest.raises(ImageDecodeError, match="^a zip archive, not an image: .*zips inside a zip are not expanded"):
        inspect_image(archive.getvalue(), 10_000_000)
    assert content_problem(archive.getvalue()[:4096]).startswith("a zip archive, not an image")  # type: ignore[union-attr]
    assert content_problem(bytes(1 << 20)).startswith("not an image")  # type: ignore[union-attr]
    assert content_problem(saved_image("PPM", 90)).startswith("unsupported image format PPM")  # type: ignore[union-attr]
    assert sniff_format(bytes(1 << 20)) is None

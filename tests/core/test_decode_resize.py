"""Decoding straight to the model's input size: bit for bit the resize of the full decode, never converted at full size."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from core import imaging
from core.imaging import ImageDecodeError, Resize, decode_image
from tests.conftest import xray_sample
from tests.core.test_dicom import small_ct_like

MAX_PIXELS = 10**8
FILTERS = [PILImage.Resampling.BILINEAR, PILImage.Resampling.BICUBIC, PILImage.Resampling.NEAREST, PILImage.Resampling.LANCZOS]


def _encode(image: PILImage.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _pictures() -> dict[str, bytes]:
    """One PNG per mode the decoder converts, 611 x 523, random content (the hardest case for a resize)."""
    rng = np.random.default_rng(7)
    rgba = rng.integers(0, 256, (523, 611, 4), dtype=np.uint8)
    palette = PILImage.fromarray(rgba[..., :3].copy(), "RGB").convert("P", palette=PILImage.Palette.ADAPTIVE)
    palette.info["transparency"] = 3
    return {
        "RGBA": _encode(PILImage.fromarray(rgba, "RGBA")),
        "LA": _encode(PILImage.fromarray(rgba[..., :2].copy(), "LA")),
        "P": _encode(palette),
        "I;16": _encode(PILImage.fromarray(rng.integers(300, 3000, (523, 611)).astype(np.uint16))),
        "L": _encode(PILImage.fromarray(rgba[..., 0].copy(), "L")),
        "RGB": _encode(PILImage.fromarray(rgba[..., :3].copy(), "RGB")),
    }


PICTURES = _pictures()


@pytest.mark.parametrize("resample", FILTERS, ids=lambda f: f.name.lower())
@pytest.mark.parametrize("grey", [False, True], ids=["rgb", "grey"])
@pytest.mark.parametrize("mode", list(PICTURES))
def test_decoding_to_a_size_equals_resizing_the_full_decode(
    mode: str, grey: bool, resample: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small strips: the conversion runs over 27 strips, the last one short.
    monkeypatch.setattr(imaging, "STRIP_PIXELS", 611 * 20)
    data = PICTURES[mode]
    for size in [(64, 64), (100, 37), (700, 600)]:  # down, uneven, up
        got = decode_image(data, MAX_PIXELS, grey=grey, resize=Resize(size, resample))
        expected = decode_image(data, MAX_PIXELS, grey=grey).resize(size, resample)
        assert got.mode == expected.mode == ("L" if grey else "RGB") and got.size == size
        assert np.array_equal(np.asarray(got), np.asarray(expected)), (mode, size)


@pytest.mark.parametrize("fast", [False, True], ids=["full-decode", "draft-grey"])
def test_jpegs_decode_to_the_resize_of_the_same_decode(xrays_dir: Path, fast: bool) -> None:
    options = {"draft_size": (128, 128), "grey": True} if fast else {}
    for path in xray_sample(xrays_dir, 6):
        data = path.read_bytes()
        got = decode_image(data, MAX_PIXELS, resize=Resize((64, 64), PILImage.Resampling.BILINEAR), **options)
        expected = decode_image(data, MAX_PIXELS, **options).resize((64, 64), PILImage.Resampling.BILINEAR)
        assert np.array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("window", [True, False], ids=["window", "full-range"])
def test_dicom_decodes_to_the_resize_of_its_full_display_values(photometric: str, window: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imaging, "STRIP_PIXELS", 64 * 5)
    extra = {"RescaleSlope": 1, "RescaleIntercept": -1024, "WindowCenter": 0, "WindowWidth": 3000} if window else {}
    dataset = small_ct_like(12, photometric, **extra)
    noise = np.random.default_rng(3).integers(-200, 200, (64, 64))
    dataset.PixelData = np.clip(dataset.pixel_array.astype(np.int64) + noise, 0, 4095).astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()

    got = decode_image(data, MAX_PIXELS, resize=Resize((20, 27), PILImage.Resampling.BICUBIC))

    expected = decode_image(data, MAX_PIXELS).resize((20, 27), PILImage.Resampling.BICUBIC)
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(expected))


def test_a_huge_image_is_never_converted_at_full_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the loaded image is ever full size: every conversion happens on a strip."""
    converted: list[tuple[int, int]] = []
    real = imaging._to_rgb

    def spy(image: PILImage.Image, value_range: tuple[float, float] | None = None) -> PILImage.Image:
        converted.append(image.size)
        return real(image, value_range)

    monkeypatch.setattr(imaging, "_to_rgb", spy)
    decode_image(_encode(PILImage.new("RGBA", (3000, 2000))), MAX_PIXELS, resize=Resize((224, 224)))
    assert converted and max(width * height for width, height in converted) <= imaging.STRIP_PIXELS


def test_admit_sees_the_header_size_before_any_pixel_is_decoded() -> None:
    seen: list[tuple[int, int]] = []
    decode_image(PICTURES["RGBA"], MAX_PIXELS, admit=lambda width, height: seen.append((width, height)))
    assert seen == [(611, 523)]

    def refuse(width: int, height: int) -> None:
        raise ImageDecodeError(f"no room for {width}x{height}")

    truncated = PICTURES["RGB"][: len(PICTURES["RGB"]) // 2]
    with pytest.raises(ImageDecodeError, match="no room for 611x523"):
        decode_image(truncated, MAX_PIXELS, admit=refuse)  # refused before the truncated pixels are read

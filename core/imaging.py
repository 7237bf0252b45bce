"""Decode and validate uploads (JPEG, PNG, DICOM) into one image form, with clear errors.

Formats are recognised by content (magic bytes, the DICOM ``DICM`` preamble), never by file name.
Two levels of checking:

* :func:`inspect_image` reads only the header: cheap, used by the portal at upload time.
* :func:`decode_image` decodes every pixel into an 8-bit RGB :class:`PIL.Image.Image`: used by the
  worker and the trainer; a truncated or corrupt file fails here with a specific message.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# Our own pixel limit (Settings.max_image_pixels) is checked from the header before decoding.
Image.MAX_IMAGE_PIXELS = None

PIL_FORMATS = {"JPEG": "jpeg", "PNG": "png", "BMP": "bmp", "TIFF": "tiff", "WEBP": "webp"}
SUPPORTED = "JPEG, PNG, BMP, TIFF, WEBP or DICOM"


class ImageDecodeError(ValueError):
    """An upload is not a usable image; the message says why, for the user."""


@dataclass(frozen=True)
class ImageInfo:
    """What the header says about an image."""

    format: str
    width: int
    height: int


def is_dicom(data: bytes) -> bool:
    """True when ``data`` carries the DICOM Part 10 preamble (``DICM`` at offset 128)."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image too large: {width}x{height} = {width * height:,} pixels, "
            f"limit is {max_pixels:,} (TRIAGE_MAX_IMAGE_PIXELS)"
        )


def _open_pil(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not an image: the content is not {SUPPORTED}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image file: {exc}") from None
    if image.format not in PIL_FORMATS:
        raise ImageDecodeError(f"unsupported image format {image.format}: use {SUPPORTED}")
    return image


def inspect_image(data: bytes, max_pixels: int) -> ImageInfo:
    """Check an upload from its header alone: a supported format within the pixel limit.

    Raises:
        ImageDecodeError: empty file, unknown format, or too many pixels.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    if is_dicom(data):
        dataset = _read_dicom(data, pixels=False)
        rows, cols = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
        if "PixelData" not in dataset and not (rows and cols):
            raise ImageDecodeError("DICOM object has no pixel data (not an image)")
        _check_pixels(cols, rows, max_pixels)
        return ImageInfo("dicom", cols, rows)
    image = _open_pil(data)
    _check_pixels(image.width, image.height, max_pixels)
    return ImageInfo(PIL_FORMATS[image.format], image.width, image.height)


def decode_image(data: bytes, max_pixels: int, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode every pixel of an upload into an 8-bit RGB image.

    Args:
        data: the file's bytes.
        max_pixels: pixel limit checked from the header before decoding.
        draft_size: for JPEG, let the decoder downscale in the DCT domain to no less than this
            size (much faster for large radiographs); ``None`` decodes at full size.

    Raises:
        ImageDecodeError: with a message that says what is wrong with this file.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    if is_dicom(data):
        return _decode_dicom(data, max_pixels)
    image = _open_pil(data)
    _check_pixels(image.width, image.height, max_pixels)
    try:
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", draft_size)
        image.load()
    except OSError as exc:
        raise ImageDecodeError(f"corrupt or truncated {image.format} file: {exc}") from None
    except (ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"cannot decode {image.format} file: {exc}") from None
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _array_to_rgb(np.asarray(image, dtype=np.float32))
    if image.mode in ("RGBA", "LA", "P", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _array_to_rgb(pixels: np.ndarray) -> Image.Image:
    """Scale a 2-D array of any range linearly to 0–255 and return it as RGB."""
    low, high = float(np.min(pixels)), float(np.max(pixels))
    scale = 255.0 / (high - low) if high > low else 0.0
    grey = np.clip((pixels - low) * scale, 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _read_dicom(data: bytes, pixels: bool):  # type: ignore[no-untyped-def]
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=not pixels)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as exc:
        raise ImageDecodeError(f"corrupt or truncated DICOM file: {exc}") from None


def _decode_dicom(data: bytes, max_pixels: int) -> Image.Image:
    """DICOM to display pixels: modality rescale, VOI LUT / window, MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    dataset = _read_dicom(data, pixels=True)
    if "PixelData" not in dataset:
        raise ImageDecodeError("DICOM object has no pixel data (not an image)")
    _check_pixels(int(dataset.get("Columns", 0)), int(dataset.get("Rows", 0)), max_pixels)
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        raise ImageDecodeError("multi-frame DICOM is not supported (one radiograph per file)")
    try:
        array = dataset.pixel_array
    except Exception as exc:  # decoder plug-ins raise many types; report which one failed
        raise ImageDecodeError(f"cannot decode DICOM pixel data ({dataset.file_meta.TransferSyntaxUID.name}): {exc}") from None
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric.startswith("MONOCHROME"):
        values = apply_modality_lut(array, dataset)
        values = apply_voi_lut(values, dataset, prefer_lut=True)
        values = np.asarray(values, dtype=np.float32)
        if photometric == "MONOCHROME1":
            values = values.max() - values + values.min()
        return _array_to_rgb(values)
    if array.ndim == 3 and array.shape[-1] == 3:
        return Image.fromarray(np.asarray(array, dtype=np.uint8), mode="RGB")
    raise ImageDecodeError(f"unsupported DICOM photometric interpretation {photometric}")

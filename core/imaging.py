"""Decode and validate uploads (JPEG, PNG, DICOM) into one image form, with clear errors.

Formats are recognised by content (magic bytes, the DICOM ``DICM`` preamble), never by file name.
Two levels of checking:

* :func:`inspect_image` reads only the header: cheap, used by the portal at upload time.
* :func:`decode_image` decodes every pixel into an 8-bit RGB :class:`PIL.Image.Image` (or grey, for
  the worker's fast path): used by the worker and the trainer; a truncated or corrupt file fails
  here with a specific message.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

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


#: Uploads with a shorter side are refused: too small to show a fracture (a 1x1 PNG was once
#: classified "no fracture" at 100 %). Training data are not held to it.
MIN_UPLOAD_SIDE = 64


def _check_readable_size(width: int, height: int) -> None:
    if min(width, height) < MIN_UPLOAD_SIDE:
        raise ImageDecodeError(
            f"image too small to read: {width}x{height} pixels; radiographs need at least "
            f"{MIN_UPLOAD_SIDE} pixels on each side"
        )


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
    """Check an upload from its header alone: a supported format within the pixel limits.

    DICOM files are recognised by the ``DICM`` preamble whatever their name, and checked with
    :func:`dicom_problem` (no pixel data, non-image object, multi-frame, truncated, no decoder).

    Raises:
        ImageDecodeError: empty file, unknown format, too many pixels, or a side under
            :data:`MIN_UPLOAD_SIDE`.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    if is_dicom(data):
        # The whole file is parsed (pixels stay encoded): missing or truncated pixel data, non-image
        # objects, multi-frame files and missing decoders are refused at upload, not in the worker.
        dataset = _read_dicom(data, pixels=True)
        problem = dicom_problem(dataset, max_pixels)
        if problem:
            raise ImageDecodeError(problem)
        _check_readable_size(int(dataset.Columns), int(dataset.Rows))
        return ImageInfo("dicom", int(dataset.Columns), int(dataset.Rows))
    image = _open_pil(data)
    _check_pixels(image.width, image.height, max_pixels)
    _check_readable_size(image.width, image.height)
    return ImageInfo(PIL_FORMATS[image.format], image.width, image.height)


def decode_image(
    data: bytes, max_pixels: int, draft_size: tuple[int, int] | None = None, grey: bool = False
) -> Image.Image:
    """Decode every pixel of an upload into an 8-bit RGB image (or an 8-bit grey one with ``grey``).

    Args:
        data: the file's bytes.
        max_pixels: pixel limit checked from the header before decoding.
        draft_size: for JPEG, let the decoder downscale in the DCT domain to no less than this
            size (much faster for large radiographs); ``None`` decodes at full size.
        grey: return an ``L`` image. A colour JPEG is then decoded as luminance only (the decoder
            skips chroma upsampling and colour conversion: about twice as fast); for the grey
            content of a radiograph that luminance equals each of the R, G and B of a full decode.
            Other formats are decoded as usual and converted.

    Raises:
        ImageDecodeError: with a message that says what is wrong with this file.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    if is_dicom(data):
        picture = _decode_dicom(data, max_pixels)
        return picture.convert("L") if grey else picture
    image = _open_pil(data)
    _check_pixels(image.width, image.height, max_pixels)
    try:
        if image.format == "JPEG" and (draft_size is not None or grey):
            image.draft("L" if grey else "RGB", draft_size)
        image.load()
    except OSError as exc:
        raise ImageDecodeError(f"corrupt or truncated {image.format} file: {exc}") from None
    except (ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"cannot decode {image.format} file: {exc}") from None
    if grey and image.mode == "L":
        return image
    picture = _to_rgb(image)
    return picture.convert("L") if grey else picture


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


# SOP classes that are never images, named in the refusal (the rest say "has no pixel data").
_NON_IMAGE_HINTS = ("SR Storage", "Presentation State", "Key Object", "Directory", "Encapsulated", "Waveform", "Report")


def _read_dicom(data: bytes, pixels: bool):  # type: ignore[no-untyped-def]
    """Parse a DICOM Part 10 file; a file that ends early fails as truncated, not silently shortened."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=not pixels)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise ImageDecodeError(f"corrupt or truncated DICOM file: {exc}") from None
    for warning in caught:
        text = str(warning.message)
        if "End of file reached" in text or "unexpected end" in text.lower():
            raise ImageDecodeError(f"truncated DICOM file: {text}")
        log.debug("pydicom: %s", text)
    return dataset


def _sop_class_name(dataset) -> str:  # type: ignore[no-untyped-def]
    uid = dataset.get("SOPClassUID") or dataset.file_meta.get("MediaStorageSOPClassUID")
    if not uid:
        return "DICOM object"
    name = getattr(uid, "name", str(uid))
    return name if name != str(uid) else f"DICOM object of SOP class {uid}"


def _expected_native_bytes(dataset) -> int:  # type: ignore[no-untyped-def]
    rows, cols = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    bits = int(dataset.get("BitsAllocated", 8) or 8)
    total_bits = rows * cols * samples * frames * bits
    if str(dataset.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
        total_bits = total_bits * 2 // 3
    return (total_bits + 7) // 8


def dicom_problem(dataset, max_pixels: int) -> str | None:  # type: ignore[no-untyped-def]
    """Why a parsed DICOM dataset (read with its pixel data) cannot be classified, or ``None``.

    Covers non-image objects (structured reports, presentation states, DICOMDIR, ...), missing
    pixel data, multi-frame objects, the pixel limit, missing decoders and truncated native pixel data.
    """
    from pydicom.pixels import get_decoder

    sop_name = _sop_class_name(dataset)
    if "PixelData" not in dataset:
        if any(hint in sop_name for hint in _NON_IMAGE_HINTS):
            return f"DICOM {sop_name} object is not an image (no pixel data): skipped"
        return f"DICOM object ({sop_name}) has no pixel data (not an image): skipped"
    rows, cols = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return f"multi-frame DICOM ({frames} frames) is not supported: one radiograph per file"
    try:
        _check_pixels(cols, rows, max_pixels)
    except ImageDecodeError as exc:
        return f"DICOM {exc}"
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        return "DICOM file has no transfer syntax in its file meta information"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return f"DICOM transfer syntax {syntax.name} is not supported"
    if not decoder.is_available:
        return f"no decoder installed for DICOM transfer syntax {syntax.name}"
    if not syntax.is_compressed:
        expected, actual = _expected_native_bytes(dataset), len(dataset.PixelData)
        if actual < expected:
            return f"truncated DICOM file: pixel data has {actual:,} of {expected:,} bytes"
    return None


def _decode_dicom(data: bytes, max_pixels: int) -> Image.Image:
    """DICOM to display pixels: modality rescale, VOI LUT or window, MONOCHROME1 inverted (bone bright).

    Without a VOI LUT or window the full range of the stored values is mapped linearly to 0-255,
    so 10-16-bit data keeps its brightest (bone) values instead of being clipped.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    dataset = _read_dicom(data, pixels=True)
    problem = dicom_problem(dataset, max_pixels)
    if problem:
        raise ImageDecodeError(problem)
    try:
        array = dataset.pixel_array
    except Exception as exc:  # decoder plug-ins raise many types; report which one failed
        raise ImageDecodeError(
            f"cannot decode DICOM pixel data ({dataset.file_meta.TransferSyntaxUID.name}): corrupt or truncated ({exc})"
        ) from None
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric.startswith("MONOCHROME"):
        values = np.asarray(apply_modality_lut(array, dataset), dtype=np.float64)
        if "VOILUTSequence" in dataset or "WindowCenter" in dataset:
            values = np.asarray(apply_voi_lut(values, dataset, prefer_lut=True), dtype=np.float64)
        inverse = photometric == "MONOCHROME1"
        if str(dataset.get("PresentationLUTShape", "")).strip() == "INVERSE":
            inverse = not inverse
        if inverse:
            values = values.max() - values + values.min()
        return _array_to_rgb(values)
    if array.ndim == 3 and array.shape[-1] == 3:
        if array.dtype != np.uint8:
            return _array_to_rgb(np.asarray(array, dtype=np.float64).mean(axis=-1))
        return Image.fromarray(np.ascontiguousarray(array), mode="RGB")
    raise ImageDecodeError(f"unsupported DICOM photometric interpretation {photometric}")

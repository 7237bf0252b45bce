"""Decode and validate uploads (JPEG, PNG, GIF, BMP, TIFF, WebP, DICOM) into one image form, with clear errors.

Formats are recognised by content (magic bytes, the DICOM ``DICM`` preamble), never by file name.
GIF, multi-page TIFF, animated WebP and multi-picture JPEG (MPO) are read as their first frame;
every other format Pillow knows is refused by name, and a file that carries a supported format's
signature but cannot be opened is reported as a corrupt file of that format (not "not an image").
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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

# Our own pixel limit (Settings.max_image_pixels) is checked from the header before decoding.
Image.MAX_IMAGE_PIXELS = None

#: Pillow's format name -> the format recorded for an upload. Multi-frame files give their first frame.
PIL_FORMATS = {
    "JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff", "WEBP": "webp",
}
SUPPORTED = "JPEG, PNG, GIF, BMP, TIFF, WebP or DICOM"

#: Leading bytes by which Pillow's plugins recognise each supported format (WebP: see _pil_signature).
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II\x00*", "TIFF"), (b"MM*\x00", "TIFF"),  # classic TIFF
    (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"),  # BigTIFF
)
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
ZIP_NOT_IMAGE = (
    "a zip archive, not an image: send a zip as the upload's archive; zips inside a zip are not expanded "
    "(unzip it and upload its files, or put them all in one zip)"
)


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


def _pil_signature(head: bytes) -> str | None:
    """The supported Pillow format whose signature ``head`` starts with, or ``None``."""
    for prefix, pil_format in _SIGNATURES:
        if head.startswith(prefix):
            return pil_format
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _format_name(pil_format: str) -> str:
    return "WebP" if pil_format == "WEBP" else pil_format


def sniff_format(head: bytes) -> str | None:
    """The supported format that content starting with ``head`` claims by its signature, or ``None``.

    Only the leading bytes are looked at (the first 132 are enough), so a caller can tell from a
    file's first block whether it can be an image at all; a claimed format still has to be checked
    with :func:`inspect_image`.

    Returns:
        ``"dicom"``, or a value of :data:`PIL_FORMATS` (``"jpeg"``, ``"png"``, ...), or ``None``.
    """
    if is_dicom(head):
        return "dicom"
    pil_format = _pil_signature(head)
    return PIL_FORMATS[pil_format] if pil_format else None


def content_problem(head: bytes) -> str | None:
    """Why content that starts with ``head`` cannot be a supported image, or ``None`` when it may be one.

    Judged from ``head`` alone, by signature: ``None`` when it carries a supported format's signature
    (the whole file must still pass :func:`inspect_image`). Lets a caller refuse a large file that is
    not an image (a nested zip, a video, zeros) after reading only its first block.
    """
    if sniff_format(head) is not None:
        return None
    if not head:
        return "empty file (0 bytes)"
    try:
        _open_pil(head)
    except ImageDecodeError as exc:
        return str(exc)
    return None


def _plugin_error(data: bytes, pil_format: str) -> str:
    """Pillow's own reason for refusing ``data`` as ``pil_format`` (``Image.open`` only says "cannot identify")."""
    Image.init()
    factory, _accept = Image.OPEN[pil_format]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            factory(io.BytesIO(data), "").close()
    except (SyntaxError, IndexError, TypeError, struct.error, OSError, ValueError, EOFError) as exc:
        # Pillow wraps a struct.error ("unpack_from requires a buffer ...") in a SyntaxError: say it plainly.
        if isinstance(exc, (struct.error, EOFError)) or isinstance(exc.__cause__, (struct.error, EOFError)):
            return "the header is truncated"
        return str(exc) or exc.__class__.__name__
    return "its header cannot be read"


def _unidentified(data: bytes) -> str:
    """The message for content Pillow cannot identify: a corrupt file of the format it claims, a zip, or not an image."""
    claimed = _pil_signature(data)
    if claimed is not None:
        return f"corrupt {_format_name(claimed)} file: {_plugin_error(data, claimed)}"
    if data.startswith(_ZIP_SIGNATURES):
        return ZIP_NOT_IMAGE
    return f"not an image: the content is not {SUPPORTED}"


def _open_pil(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(_unidentified(data)) from None
    except (OSError, ValueError, SyntaxError) as exc:
        claimed = _pil_signature(data)
        kind = _format_name(claimed) if claimed else "image"
        raise ImageDecodeError(f"corrupt or truncated {kind} file: {exc}") from None
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


#: Pillow allocates a picture in blocks, 16 MB by default. glibc serves blocks of that size from
#: per-thread heaps that keep what is freed, so decode threads taking turns on huge images ratchet a
#: worker's resident memory up to twice the pixels it really holds (+494 vs +266 MB for 7745x7745
#: PNGs on two threads). Blocks above glibc's largest mmap threshold (32 MB) are each mapped on
#: their own and given back to the system as soon as the picture is freed.
PIL_BLOCK_BYTES = 64 * 1024 * 1024
Image.core.set_block_size(PIL_BLOCK_BYTES)


@dataclass(frozen=True)
class Resize:
    """Decode straight to ``size`` (width, height): exactly ``picture.resize(size, resample)``.

    Pillow resizes in two passes, rows then columns, and the column pass only needs the rows
    already resized. So an image that needs converting (alpha, palette, 16-bit, DICOM values) is
    converted and its rows resized one strip at a time, and only the loaded image, one strip and
    the row-resized picture (``size[0]`` x full height) are ever in memory: a huge image never
    exists at full size in RGB, and the result is bit for bit the resize of the full decode.
    """

    size: tuple[int, int]
    resample: int = Image.Resampling.BILINEAR


#: Pixels per strip when an image is converted for a :class:`Resize`: its temporary copies stay near
#: 1 MB each (and in the CPU's cache: a quarter megapixel was a third faster than one megapixel).
STRIP_PIXELS = 1 << 18

#: Pillow modes whose values are scaled linearly from their own range to 0-255.
_ARRAY_MODES = ("I;16", "I;16B", "I;16L", "I", "F")

#: Called with an image's width and height (from its header) before any pixel is decoded.
Admit = Callable[[int, int], object]


def decode_image(
    data: bytes,
    max_pixels: int,
    draft_size: tuple[int, int] | None = None,
    grey: bool = False,
    resize: Resize | None = None,
    admit: Admit | None = None,
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
        resize: return the picture resized (see :class:`Resize`): the same pixels as resizing the
            full decode, without its full-size conversion; ``None`` returns the full decode.
        admit: called with the image's width and height from its header once the header passed
            the checks and before any pixel is decoded; it may block (the worker's budget of
            pixels decoding at once) or raise.

    Raises:
        ImageDecodeError: with a message that says what is wrong with this file.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    if is_dicom(data):
        picture = _decode_dicom(data, max_pixels, resize, admit)
        return picture.convert("L") if grey else picture
    image = _open_pil(data)
    _check_pixels(image.width, image.height, max_pixels)
    if admit is not None:
        admit(image.width, image.height)
    try:
        if image.format == "JPEG" and (draft_size is not None or grey):
            image.draft("L" if grey else "RGB", draft_size)
        image.load()
    except OSError as exc:
        raise ImageDecodeError(f"corrupt or truncated {image.format} file: {exc}") from None
    except (ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"cannot decode {image.format} file: {exc}") from None
    if resize is None:
        return _final(image, grey)
    if image.mode == ("L" if grey else "RGB") or image.mode == "L":
        # Nothing to convert at full size (grey to RGB repeats the channel: it commutes with the resize).
        return _final(image.resize(resize.size, resize.resample), grey)
    value_range = _value_range(image) if image.mode in _ARRAY_MODES else None
    width = image.width
    return _resize_in_strips(
        image.size, resize, lambda top, bottom: _final(image.crop((0, top, width, bottom)), grey, value_range)
    )


def _final(image: Image.Image, grey: bool, value_range: tuple[float, float] | None = None) -> Image.Image:
    """A decoded image in the form the caller asked for: RGB, or grey ``L`` with ``grey``."""
    if grey and image.mode == "L":
        return image
    picture = _to_rgb(image, value_range)
    return picture.convert("L") if grey else picture


def _resize_in_strips(size: tuple[int, int], resize: Resize, strip: Callable[[int, int], Image.Image]) -> Image.Image:
    """``resize`` of the picture whose rows ``top`` to ``bottom`` are ``strip(top, bottom)``.

    Each strip's rows are resized on their own (a row's resize needs only that row), then the
    columns of the row-resized picture: Pillow's own two passes, so the result is the same.
    """
    width, height = size
    rows = max(1, STRIP_PIXELS // width)
    resized_rows: Image.Image | None = None
    for top in range(0, height, rows):
        part = strip(top, min(height, top + rows))
        part = part.resize((resize.size[0], part.height), resize.resample)
        if resized_rows is None:
            resized_rows = Image.new(part.mode, (resize.size[0], height))
        resized_rows.paste(part, (0, top))
    assert resized_rows is not None, "an image has at least one row"
    return resized_rows.resize(resize.size, resize.resample)


def _value_range(image: Image.Image) -> tuple[float, float]:
    """The lowest and highest value of a 16-bit, integer or float image, as :func:`_to_rgb` scales them."""
    low, high = image.getextrema()
    return float(np.float32(low)), float(np.float32(high))


def _to_rgb(image: Image.Image, value_range: tuple[float, float] | None = None) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _ARRAY_MODES:
        return _array_to_rgb(np.asarray(image, dtype=np.float32), value_range)
    if image.mode in ("RGBA", "LA", "P", "PA"):
        if image.mode != "RGBA":
            image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _array_to_rgb(pixels: np.ndarray, value_range: tuple[float, float] | None = None) -> Image.Image:
    """Scale a 2-D array linearly from its range (or ``value_range``) to 0–255 and return it as RGB."""
    return Image.fromarray(_to_grey_levels(pixels, value_range), mode="L").convert("RGB")


def _to_grey_levels(pixels: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """A 2-D array scaled linearly from its own range (or ``value_range``: low, high) to uint8 0–255."""
    low, high = value_range if value_range is not None else (float(np.min(pixels)), float(np.max(pixels)))
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.clip((pixels - low) * scale, 0, 255).astype(np.uint8)


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


def _decode_dicom(data: bytes, max_pixels: int, resize: Resize | None = None, admit: Admit | None = None) -> Image.Image:
    """DICOM to display pixels: modality rescale, VOI LUT or window, MONOCHROME1 inverted (bone bright).

    Without a VOI LUT or window the full range of the stored values is mapped linearly to 0-255,
    so 10-16-bit data keeps its brightest (bone) values instead of being clipped. With ``resize``
    the display values are made and resized strip by strip (see :class:`Resize`), so only the
    decoded stored values are held at full size.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    dataset = _read_dicom(data, pixels=True)
    problem = dicom_problem(dataset, max_pixels)
    if problem:
        raise ImageDecodeError(problem)
    if admit is not None:
        admit(int(dataset.Columns), int(dataset.Rows))
    try:
        array = dataset.pixel_array
    except Exception as exc:  # decoder plug-ins raise many types; report which one failed
        raise ImageDecodeError(
            f"cannot decode DICOM pixel data ({dataset.file_meta.TransferSyntaxUID.name}): corrupt or truncated ({exc})"
        ) from None
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric.startswith("MONOCHROME"):

        def display_values(stored: np.ndarray) -> np.ndarray:
            values = np.asarray(apply_modality_lut(stored, dataset), dtype=np.float64)
            if "VOILUTSequence" in dataset or "WindowCenter" in dataset:
                values = np.asarray(apply_voi_lut(values, dataset, prefer_lut=True), dtype=np.float64)
            return values

        inverse = photometric == "MONOCHROME1"
        if str(dataset.get("PresentationLUTShape", "")).strip() == "INVERSE":
            inverse = not inverse
        if resize is not None:
            return _grey_values_resized(array, display_values, inverse, resize)
        values = display_values(array)
        if inverse:
            values = values.max() - values + values.min()
        return _array_to_rgb(values)
    if array.ndim == 3 and array.shape[-1] == 3:
        if array.dtype != np.uint8:

            def channel_mean(stored: np.ndarray) -> np.ndarray:
                return np.asarray(stored, dtype=np.float64).mean(axis=-1)

            if resize is not None:
                return _grey_values_resized(array, channel_mean, False, resize)
            return _array_to_rgb(channel_mean(array))
        if resize is not None:
            height, width = array.shape[:2]
            return _resize_in_strips(
                (width, height), resize, lambda top, bottom: Image.fromarray(np.ascontiguousarray(array[top:bottom]), mode="RGB")
            )
        return Image.fromarray(np.ascontiguousarray(array), mode="RGB")
    raise ImageDecodeError(f"unsupported DICOM photometric interpretation {photometric}")


def _grey_values_resized(
    array: np.ndarray, display_values: Callable[[np.ndarray], np.ndarray], inverse: bool, resize: Resize
) -> Image.Image:
    """Stored DICOM values -> the resized RGB picture of their display values, never a full-size float array.

    Two passes over strips of rows: the range of the display values of the whole image, then each
    strip inverted (when asked) and scaled to 0-255 exactly as the full array would be, and resized.
    """
    height, width = array.shape[:2]
    rows = max(1, STRIP_PIXELS // width)
    low, high = np.inf, -np.inf
    for top in range(0, height, rows):
        values = display_values(array[top : top + rows])
        low, high = min(low, float(values.min())), max(high, float(values.max()))
    # The full path inverts as (max - v) + min and then scales from that array's own range, which is
    # (min, (max - min) + min): the same floating-point operations here, so the same grey levels.
    value_range = (low, (high - low) + low) if inverse else (low, high)

    def strip(top: int, bottom: int) -> Image.Image:
        values = display_values(array[top:bottom])
        if inverse:
            values = high - values + low
        return Image.fromarray(_to_grey_levels(values, value_range), mode="L")

    return _resize_in_strips((width, height), resize, strip).convert("RGB")

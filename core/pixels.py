"""Pixels at their full stored depth for the viewer's own windowing (torch-free).

The viewer windows an image in the browser (a lookup table on a canvas), so it needs the values
themselves, not an 8-bit rendering. :func:`full_depth_png` makes a greyscale PNG of them:

- DICOM greyscale (MONOCHROME1/2): the stored values after the modality rescale (Rescale Slope and
  Intercept, or a Modality LUT), at full resolution, as a 16-bit PNG. Each PNG value ``p`` stands
  for ``offset + p * step``: ``step`` is 1 and ``offset`` 0 whenever the rescaled values are
  integers within 0-65535 (an ordinary radiograph: the PNG holds the values exactly); integers
  outside that range are shifted (``offset`` = the lowest value); anything else is quantised
  linearly over 65,536 levels.
- Everything else (JPEG, PNG, colour DICOM, ...): the 8-bit grey picture the model sees
  (:func:`core.imaging.decode_image`), as an 8-bit PNG.

What the viewer needs to interpret the values travels inside the PNG as ``tEXt`` chunks
(``triage:`` keys, see :data:`TEXT_KEYS`): offset and step, the value range, bits stored, the
photometric interpretation and whether low values are shown bright (MONOCHROME1, or a Presentation
LUT Shape of INVERSE), and the file's own window (centre and width) when its header has one.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from core.imaging import STRIP_PIXELS, ImageDecodeError, _read_dicom, decode_image, dicom_problem, is_dicom

log = logging.getLogger(__name__)

#: The PNG's text keys (all prefixed ``triage:``) and what they say.
TEXT_KEYS = {
    "offset": "the real value of PNG value 0",
    "step": "real value per PNG step",
    "low": "lowest real value in the image",
    "high": "highest real value in the image",
    "bits": "bits stored (8 for non-DICOM images)",
    "photometric": "DICOM photometric interpretation ('' for other images)",
    "inverse": "1 when low values are shown bright (MONOCHROME1, or Presentation LUT Shape INVERSE)",
    "window_center": "the file's own window centre (DICOM Window Center), when present",
    "window_width": "the file's own window width (DICOM Window Width), when present",
    "window_name": "the file's name for its window (Window Center & Width Explanation), when present",
    "units": "what the values are (Rescale Type, e.g. HU), when present",
}
PNG_LEVELS = 65535


@dataclass(frozen=True)
class FullDepth:
    """One image's values as PNG levels, and how to read them back."""

    levels: np.ndarray  # uint16 (DICOM greyscale) or uint8, shape (rows, columns)
    offset: float
    step: float
    low: float
    high: float
    bits: int
    photometric: str = ""
    inverse: bool = False
    window: tuple[float, float] | None = None  # (centre, width) from the header
    window_name: str = ""
    units: str = ""

    def png(self) -> bytes:
        """The PNG (16-bit grey for uint16 levels, else 8-bit) with the text chunks of :data:`TEXT_KEYS`."""
        info = PngInfo()
        values: dict[str, Any] = {
            "offset": self.offset, "step": self.step, "low": self.low, "high": self.high, "bits": self.bits,
            "photometric": self.photometric, "inverse": int(self.inverse), "window_name": self.window_name,
            "units": self.units,
        }
        if self.window is not None:
            values["window_center"], values["window_width"] = self.window
        for key, value in values.items():
            info.add_text(f"triage:{key}", _text(value))
        picture = Image.fromarray(self.levels)  # uint16: "I;16", uint8: "L"
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", pnginfo=info, compress_level=3)
        return buffer.getvalue()


def _text(value: Any) -> str:
    if isinstance(value, float):
        return repr(float(value)) if not value.is_integer() else str(int(value))
    return str(value)


def _number(value: Any) -> float | None:
    """The first value of a possibly multi-valued DICOM number, or None."""
    if value is None:
        return None
    if not isinstance(value, (int, float, str)):
        try:
            value = list(value)[0]
        except (TypeError, IndexError):
            return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _header_window(dataset: Any) -> tuple[tuple[float, float] | None, str]:
    """The file's first window (centre, width) and its explanation; (None, '') without a usable one."""
    centre, width = _number(dataset.get("WindowCenter")), _number(dataset.get("WindowWidth"))
    if centre is None or width is None or width < 1:
        return None, ""
    explanation = dataset.get("WindowCenterWidthExplanation")
    if explanation is not None and not isinstance(explanation, str):
        explanation = next(iter(explanation), "")
    return (centre, width), " ".join(str(explanation or "").split())[:64]


def _strips(array: np.ndarray) -> Iterator[slice]:
    rows = max(1, STRIP_PIXELS // max(1, array.shape[1]))
    for top in range(0, array.shape[0], rows):
        yield slice(top, top + rows)


def _dicom_full_depth(data: bytes, max_pixels: int) -> FullDepth | None:
    """The modality-rescaled values of a greyscale DICOM image; None for colour DICOM."""
    from pydicom.pixels import apply_modality_lut

    dataset = _read_dicom(data, pixels=True)
    problem = dicom_problem(dataset, max_pixels)
    if problem:
        raise ImageDecodeError(problem)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if not photometric.startswith("MONOCHROME"):
        return None
    try:
        stored = dataset.pixel_array
    except Exception as exc:  # decoder plug-ins raise many types; report which one failed
        raise ImageDecodeError(f"cannot decode DICOM pixel data: corrupt or truncated ({exc})") from None

    def rescaled(rows: slice) -> np.ndarray:
        return np.asarray(apply_modality_lut(stored[rows], dataset), dtype=np.float64)

    # Two passes over strips of rows: the range (and whether every value is an integer), then the levels.
    low, high, integral = np.inf, -np.inf, True
    for rows in _strips(stored):
        values = rescaled(rows)
        low, high = min(low, float(values.min())), max(high, float(values.max()))
        integral = integral and bool(np.all(values == np.round(values)))
    if integral and high - low <= PNG_LEVELS:
        step, offset = 1.0, 0.0 if low >= 0 and high <= PNG_LEVELS else low
    else:
        step, offset = (high - low) / PNG_LEVELS or 1.0, low
    levels = np.empty(stored.shape[:2], dtype=np.uint16)
    for rows in _strips(stored):
        levels[rows] = np.clip(np.round((rescaled(rows) - offset) / step), 0, PNG_LEVELS)
    inverse = photometric == "MONOCHROME1"
    if str(dataset.get("PresentationLUTShape", "")).strip() == "INVERSE":
        inverse = not inverse
    window, window_name = _header_window(dataset)
    bits = dataset.get("BitsStored")
    return FullDepth(
        levels, offset, step, low, high, int(bits) if isinstance(bits, int) else 16, photometric, inverse,
        window, window_name, " ".join(str(dataset.get("RescaleType", "") or "").split())[:16],
    )


def full_depth(data: bytes, max_pixels: int) -> FullDepth:
    """An image's values at full depth (module docstring); the 8-bit grey picture for non-DICOM images.

    Raises:
        ImageDecodeError: the file cannot be decoded (what is wrong with it, in words).
    """
    if is_dicom(data):
        found = _dicom_full_depth(data, max_pixels)
        if found is not None:
            return found
    grey = np.asarray(decode_image(data, max_pixels, grey=True), dtype=np.uint8)
    return FullDepth(grey, 0.0, 1.0, 0.0, 255.0, 8)  # the 8-bit range: "full range" shows it as it is


def full_depth_png(data: bytes, max_pixels: int) -> bytes:
    """:func:`full_depth` as a PNG with its text chunks."""
    return full_depth(data, max_pixels).png()


#: DICOM attributes shown beside an image in the viewer: (keyword, what people call it).
VIEW_ATTRIBUTES = (
    ("BodyPartExamined", "Body part"), ("ImageLaterality", "Laterality"), ("Laterality", "Laterality"),
    ("ViewPosition", "View"), ("Modality", "Modality"),
)
LATERALITY = {"R": "Right", "L": "Left", "B": "Both", "U": "Unpaired"}


def view_attributes(path: Path) -> dict[str, str]:
    """What a reader wants beside the picture from a stored DICOM file's header: body part, laterality,
    view position and modality (those present, in people's words); empty for other files or an unreadable header.

    Only the header is read (the pixel data is not), and nothing that identifies the patient.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with open(path, "rb") as handle:
            if not is_dicom(handle.read(132)):
                return {}
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        log.info("no DICOM attributes for %s: %s", path.name, exc)
        return {}
    found: dict[str, str] = {}
    for keyword, name in VIEW_ATTRIBUTES:
        value = " ".join(str(dataset.get(keyword, "") or "").split())[:64]
        if value and name not in found:
            found[name] = LATERALITY.get(value, value) if name == "Laterality" else value
    return found

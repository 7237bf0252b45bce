"""Derived artifacts that the portal serves: previews and full-depth PNGs of stored images (torch-free)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

from core.config import Settings
from core.files import atomic_write_bytes
from core.storage import derived_png_store

PREVIEW_SIDE = 2048


def _derived_png(settings: Settings, folder: str, sha256: str, make: Callable[[], bytes]) -> Path:
    """The file ``folder``/<source sha256>.png under the data folder, made once with ``make`` and written atomically."""
    store = derived_png_store(settings, folder)
    target = store.path_for_key(store.key_for(sha256))
    if target.is_file():
        return target
    atomic_write_bytes(target, make())
    return target


def preview_size(width: int, height: int, side: int = PREVIEW_SIDE) -> tuple[int, int]:
    """``(width, height)`` scaled down (never up) so the longer side is at most ``side``."""
    scale = min(1.0, side / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


def preview_bytes(data: bytes, max_pixels: int, side: int = PREVIEW_SIDE) -> bytes:
    """A grey PNG of an image as the model sees it, at most ``side`` pixels on the long side.

    Decoded at a bounded size (core.imaging.decode_image with ``draft_size`` and ``resize``): a JPEG
    is scaled down in the DCT domain, and a 16-bit, palette or DICOM image is converted strip by
    strip, so a 7745x7745 upload never exists as a full-size RGB or float picture.

    Raises:
        core.imaging.ImageDecodeError: the file cannot be decoded.
    """
    from core.imaging import Resize, decode_image, inspect_image

    info = inspect_image(data, max_pixels)
    size = preview_size(info.width, info.height, side)
    picture = decode_image(data, max_pixels, draft_size=size, grey=True, resize=Resize(size))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG", optimize=False)
    return buffer.getvalue()


def preview_png(settings: Settings, sha256: str, data: bytes) -> Path:
    """A PNG rendering of a stored image (for browsers that cannot show DICOM), made once per source sha256.

    The picture is the one the model sees (core.imaging.decode_image: modality rescale, VOI/window,
    MONOCHROME1 inverted), scaled down to at most PREVIEW_SIDE pixels on the long side
    (:func:`preview_bytes`: decoded at that size, not at full size).

    Raises:
        core.imaging.ImageDecodeError: the stored file cannot be decoded.
    """
    return _derived_png(settings, "previews", sha256, lambda: preview_bytes(data, settings.max_image_pixels))


def full_depth_path(settings: Settings, sha256: str, data: bytes) -> Path:
    """The viewer's full-depth PNG of a stored image (core.pixels), made once per source sha256.

    Raises:
        core.imaging.ImageDecodeError: the stored file cannot be decoded.
    """
    from core.pixels import full_depth_png

    return _derived_png(settings, "pixels", sha256, lambda: full_depth_png(data, settings.max_image_pixels))

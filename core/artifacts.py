"""Stores of derived artifacts that the portal serves and the worker writes (torch-free)."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from core.config import Settings
from core.storage import ContentStore


def heatmap_store(settings: Settings) -> ContentStore:
    """Where Grad-CAM heat-map PNGs are kept (content-addressed, under the data folder)."""
    return ContentStore(Path(settings.data_dir) / "heatmaps", suffix=".png")


PREVIEW_SIDE = 2048


def preview_png(settings: Settings, sha256: str, data: bytes) -> Path:
    """A PNG rendering of a stored image (for browsers that cannot show DICOM), made once per source sha256.

    The picture is the one the model sees (core.imaging.decode_image: modality rescale, VOI/window,
    MONOCHROME1 inverted), scaled down to at most PREVIEW_SIDE pixels on the long side.

    Raises:
        core.imaging.ImageDecodeError: the stored file cannot be decoded.
    """
    from core.imaging import decode_image

    store = ContentStore(Path(settings.data_dir) / "previews", suffix=".png")
    target = store.path_for_key(store.key_for(sha256))
    if target.is_file():
        return target
    picture = decode_image(data, settings.max_image_pixels)
    picture.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    buffer = io.BytesIO()
    picture.convert("L").save(buffer, "PNG", optimize=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
    with os.fdopen(fd, "wb") as handle:
        handle.write(buffer.getvalue())
    os.replace(tmp, target)
    return target

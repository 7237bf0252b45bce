"""Content-addressed file stores: bytes are kept under their sha256, never under a user's file name.

The factories at the end are the one place that says where each store lives (uploaded images,
model weights, heat maps, derived PNGs).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from core.config import Settings
from core.files import atomic_write_bytes


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of the file at ``path``, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


class ContentStore:
    """Files keyed by their sha256 under one root folder (``ab/abcdef…``), written atomically.

    The key is derived from the content only, so a user-supplied name can never reach the file
    system, and storing the same bytes twice costs nothing.
    """

    def __init__(self, root: Path, suffix: str = "") -> None:
        self.root = Path(root)
        self.suffix = suffix

    def key_for(self, sha256: str) -> str:
        """The storage key of a digest (relative path inside the store)."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return f"{sha256[:2]}/{sha256}{self.suffix}"

    def path_for_key(self, key: str) -> Path:
        """Absolute path of a storage key; refuses keys that would leave the store."""
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"storage key escapes the store: {key!r}")
        return path

    def put_bytes(self, data: bytes) -> tuple[str, str]:
        """Store ``data``; return ``(sha256, key)``. Idempotent."""
        digest = sha256_bytes(data)
        key = self.key_for(digest)
        target = self.root / key  # a checked hex digest cannot leave the store: no need to resolve the path
        if not target.exists():
            atomic_write_bytes(target, data)
        return digest, key

    def read(self, key: str) -> bytes:
        """The bytes stored under ``key``."""
        return self.path_for_key(key).read_bytes()

    def exists(self, key: str) -> bool:
        """Whether something is stored under ``key``."""
        return self.path_for_key(key).exists()


def image_store(settings: Settings) -> ContentStore:
    """The content-addressed store of uploaded images."""
    assert settings.storage_dir is not None
    return ContentStore(settings.storage_dir)


def model_store(settings: Settings) -> ContentStore:
    """The content-addressed store of model weights and unfamiliar-image references."""
    assert settings.models_dir is not None
    return ContentStore(settings.models_dir, suffix=".safetensors")


def heatmap_store(settings: Settings) -> ContentStore:
    """Where Grad-CAM heat-map PNGs are kept (content-addressed, under the data folder)."""
    return ContentStore(Path(settings.data_dir) / "heatmaps", suffix=".png")


def derived_png_store(settings: Settings, folder: str) -> ContentStore:
    """PNGs derived from stored images (``previews``, ``pixels``), keyed by their source's sha256."""
    return ContentStore(Path(settings.data_dir) / folder, suffix=".png")

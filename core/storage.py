"""Content-addressed file store: bytes are kept under their sha256, never under a user's file name."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


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
        target = self.path_for_key(key)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return digest, key

    def put_file(self, source: Path) -> tuple[str, str]:
        """Store a copy of the file at ``source``; return ``(sha256, key)``."""
        return self.put_bytes(Path(source).read_bytes())

    def read(self, key: str) -> bytes:
        """The bytes stored under ``key``."""
        return self.path_for_key(key).read_bytes()

    def exists(self, key: str) -> bool:
        """Whether something is stored under ``key``."""
        return self.path_for_key(key).exists()

"""Atomic file writes: a file appears complete under its name, or not at all.

A writer fills a temporary file beside the target (same folder, so the same file system) and
renames it into place; a crash or an error leaves the previous file (or none) and no half-written one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def sibling_temp_path(target: Path, prefix: str = ".incoming-", suffix: str = "") -> Path:
    """A new, empty temporary file beside ``target`` (its folder is created); the caller removes or renames it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=suffix)
    os.close(fd)
    return Path(tmp)


@contextmanager
def atomic_target(target: Path, prefix: str = ".incoming-", suffix: str = "") -> Iterator[Path]:
    """A temporary path to write ``target``'s content to; it replaces ``target`` when the block succeeds.

    On an exception inside the block the temporary file is removed and ``target`` is untouched.
    """
    tmp = sibling_temp_path(target, prefix, suffix)
    try:
        yield tmp
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_target(target) as tmp:
        tmp.write_bytes(data)

"""Atomic file writes: a file appears complete under its name, or not at all.

A writer fills a temporary file beside the target (same folder, so the same file system) and
renames it into place; a crash or an error leaves the previous file (or none) and no half-written one.
"""

from __future__ import annotations

import os
import tempfile
import time
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


def remove_stale_temporaries(folder: Path, prefix: str, older_than_s: float) -> list[Path]:
    """Remove the temporary files named ``prefix*`` in ``folder`` last modified more than ``older_than_s`` ago.

    A writer killed between creating its temporary and renaming it (``kill -9``, the kernel's
    out-of-memory killer) leaves the temporary behind; nothing else ever removes it. Writers that
    own ``folder`` call this before writing, with an age no live writer reaches, so a build still
    running beside them keeps its files. Returns the paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    cutoff = time.time() - older_than_s
    removed: list[Path] = []
    for path in folder.glob(f"{prefix}*"):
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # another writer's cleanup got there first
            continue
    return removed

"""Temporary files of atomic writes: what a killed writer leaves behind is removed later, and only that."""

from __future__ import annotations

import os
import time
from pathlib import Path

from core.files import remove_stale_temporaries, sibling_temp_path


def test_only_old_temporaries_with_the_prefix_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "runtimes" / "model.onnx"
    left_by_a_killed_build = sibling_temp_path(target, prefix=".building-", suffix=".onnx")
    running_build = sibling_temp_path(target, prefix=".building-", suffix=".onnx")
    old_runtime = target.parent / "installed.onnx"
    old_upload = sibling_temp_path(target, prefix=".incoming-")
    old_runtime.write_bytes(b"serving")
    two_days_ago = time.time() - 2 * 24 * 3600
    for path in (left_by_a_killed_build, old_runtime, old_upload):
        os.utime(path, (two_days_ago, two_days_ago))

    assert remove_stale_temporaries(target.parent, ".building-", 24 * 3600) == [left_by_a_killed_build]
    assert not left_by_a_killed_build.exists()
    assert running_build.exists() and old_runtime.read_bytes() == b"serving" and old_upload.exists()
    assert remove_stale_temporaries(tmp_path / "absent", ".building-", 0) == []

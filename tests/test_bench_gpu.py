"""The prepared GPU script's dry run (``python -m bench.gpu --cpu``): every section runs on the CPU and is reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu import salted_jpeg
from core.ml.gpu_decode import read_jpeg_header
from tests.conftest import PROJECT_ROOT, XRAYS

SECTIONS = ("gpu", "engine", "agreement", "e2e", "train")


def test_a_salted_copy_is_another_file_with_the_same_header() -> None:
    data = sorted((XRAYS / "test" / "fracture").glob("*.jpg"))[0].read_bytes()
    copy = salted_jpeg(data, 7)
    assert copy != data and read_jpeg_header(copy) == read_jpeg_header(data)


@pytest.mark.slow
def test_the_dry_run_exercises_every_section_and_writes_them_all(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--cpu", "--data", str(XRAYS), "--out", str(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=850,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["dry_run"] is True
    for name in SECTIONS:
        assert name in report and name in report["utilisation"], name
    assert all(report[name]["status"] == "ok" for name in SECTIONS if name != "train")
    assert report["train"]["status"].startswith("skipped")
    rows = report["engine"]["rows"]
    assert {(row["precision"], row["batch_size"]) for row in rows} == {(p, b) for p in ("fp32", "bf16") for b in (4, 8)}
    assert all(row["model_only_images_per_s"] > 0 and row["with_decode_images_per_s"] > 0 for row in rows)
    agreement = report["agreement"]["test_efficientnet"]
    assert agreement["gpu_decode"]["left_to_cpu"] == 0 and agreement["bf16_vs_fp32_label_agreement"] == 1.0
    e2e = report["e2e"]
    assert e2e["database"] == "sqlite" and e2e["broker"] == "filesystem"
    assert e2e["counts"] == {"done": e2e["images"], "failed": 0} and e2e["end_to_end_images_per_s"] > 0
    assert (tmp_path / "gpu.log").stat().st_size > 0 and (tmp_path / "worker.log").is_file()

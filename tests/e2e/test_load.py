"""`python -m bench.load` at a tiny size: concurrent HTTP uploads, two worker nodes, one killed and restarted.

Real processes throughout (gunicorn portal, two `celery -A worker worker` nodes, PostgreSQL, Redis);
the benchmark itself counts predictions per image in the database and exits 1 unless every image
has exactly one. Cold nodes (``--no-warm-up``): node b's first chunk holds its claimed images while
it loads the model, so the kill lands on claimed work every time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_load_with_a_worker_node_killed_and_restarted_loses_and_duplicates_nothing(postgres_url: str, redis_url: str, xrays_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.load", "--uploads", "2", "--per-upload", "6", "--arch", "test_efficientnet", "--image-size", "64",
         "--chunk-size", "2", "--batch-size", "2", "--kill-at", "0", "--no-warm-up", "--portal-workers", "1",
         "--database-url", postgres_url, "--redis-url", redis_url],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "node b SIGKILLed (main + pool child)" in result.stdout
    assert "images: 12 of 12 recorded; statuses done 12; exactly one prediction: 12; 0 lost, 0 duplicated" in result.stdout, result.stdout

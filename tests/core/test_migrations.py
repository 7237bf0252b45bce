"""Alembic upgrades an empty database to head and the models match it (no autogenerate diff)."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from core.db import make_engine
from core.migrate import upgrade
from core.models import Base


def _assert_head_matches_models(url: str) -> None:
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            diff = compare_metadata(context, Base.metadata)
            tables = set(inspect(connection).get_table_names())
    finally:
        engine.dispose()
    assert diff == [], f"models and migrations differ; run `alembic revision --autogenerate`: {diff}"
    assert {"studies", "images", "predictions", "reviews", "model_versions", "users", "alembic_version"} <= tables


def test_empty_sqlite_upgrades_to_head_without_drift(tmp_path: Path) -> None:
    _assert_head_matches_models(f"sqlite:///{tmp_path / 'fresh.db'}")


@pytest.mark.postgres
def test_empty_postgres_upgrades_to_head_without_drift(postgres_url: str) -> None:
    _assert_head_matches_models(postgres_url)


def test_upgrade_is_idempotent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'twice.db'}"
    upgrade(url)
    upgrade(url)  # a second run at head must be a no-op, not an error
    engine = make_engine(url)
    with engine.connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() is not None
    engine.dispose()


def test_commands_refuse_a_database_without_the_schema(tmp_path: Path) -> None:
    """The CLI, the trainer and the worker stop with the fix instead of a SQL traceback."""
    import subprocess
    import sys

    from tests.conftest import PROJECT_ROOT

    env = {"PATH": "/usr/bin:/bin", "TRIAGE_DATA_DIR": str(tmp_path / "var"), "PYTHONPATH": str(PROJECT_ROOT)}
    commands = [
        [sys.executable, "-m", "admin.cli", "model", "list"],
        [sys.executable, "-m", "trainer", "train", "--data", str(tmp_path / "nowhere"), "--arch", "test_resnet", "--register"],
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "--pool", "solo", "--without-gossip", "--without-mingle"],
    ]
    for command in commands:
        result = subprocess.run(command, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=180)
        assert result.returncode != 0, command
        assert "has no schema yet" in result.stderr and "triage db upgrade" in result.stderr, (command, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, result.stderr[-2000:]

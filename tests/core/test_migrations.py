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

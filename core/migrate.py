"""Run Alembic migrations from code (the admin CLI and the tests use this)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS_DIR = PROJECT_ROOT / "migrations"


def alembic_config(database_url: str) -> Config:
    """An Alembic config for ``database_url`` using the project's migrations folder."""
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Upgrade the database at ``database_url`` to ``revision``."""
    command.upgrade(alembic_config(database_url), revision)


class SchemaNotCurrent(RuntimeError):
    """The database is missing tables or lags behind the code's migrations."""


def check_schema(database_url: str) -> None:
    """Fail fast, with the fix in the message, when the database is not at the newest revision.

    Raises:
        SchemaNotCurrent: naming the database, its revision, the expected one and the command.
    """
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from core.db import make_engine, printable_url

    head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
    if current != head:
        where = printable_url(database_url)
        state = "has no schema yet" if current is None else f"is at revision {current}"
        raise SchemaNotCurrent(f"the database at {where} {state}, the code needs {head}: run `triage db upgrade`")

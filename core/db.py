"""Database engine and session factory.

Create them per process, after any fork (Celery's prefork pool forks the worker): call
:func:`make_engine` / :func:`make_session_factory` in the process that uses them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from core.config import Settings


def printable_url(url: str) -> str:
    """``url`` with its password hidden, for messages and logs."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _enable_sqlite_concurrency(engine: Engine) -> None:
    """Portal and worker share one SQLite file: WAL, a busy timeout and foreign keys."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


def make_engine(url: str, pooled: bool = True) -> Engine:
    """Create an engine for ``url``; SQLite files get their parent folder and WAL mode.

    ``pooled=False``: no connection is kept between uses (for a thread in a process that forks).
    """
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            from pathlib import Path

            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": 30})
        _enable_sqlite_concurrency(engine)
        return engine
    if not pooled:
        return create_engine(url, poolclass=NullPool)
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory bound to ``engine``; objects stay readable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)


class Database:
    """An engine plus its session factory, created lazily for one process."""

    def __init__(self, settings: Settings, pooled: bool = True) -> None:
        self.settings = settings
        self.pooled = pooled
        self._engine: Engine | None = None
        self._factory: sessionmaker[Session] | None = None

    @property
    def engine(self) -> Engine:
        """The engine, created on first use (so after any fork)."""
        if self._engine is None:
            self._engine = make_engine(self.settings.database_url, self.pooled)
        return self._engine

    def session(self) -> Session:
        """A new session; the caller closes it (or uses :meth:`transaction`)."""
        if self._factory is None:
            self._factory = make_session_factory(self.engine)
        return self._factory()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on any error."""
        session = self.session()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        """Close pooled connections (call in a child process after fork)."""
        if self._engine is not None:
            self._engine.dispose()

"""Live processes for end-to-end tests: a real `celery -A worker worker` and a real HTTP portal."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from core.config import Settings
from tests.conftest import PROJECT_ROOT


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> object:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def settings_env(settings: Settings) -> dict[str, str]:
    """The process environment that makes another process see exactly ``settings``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TRIAGE_")}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"TRIAGE_{name.upper()}"] = str(value)
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    return env


@dataclass
class LiveWorker:
    """A running worker process and its log file."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        """Everything the worker wrote so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Stop the worker (SIGTERM, then SIGKILL)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_worker(settings: Settings, log_path: Path, hostname: str = "e2e") -> LiveWorker:
    """Start `celery -A worker worker` for ``settings`` and wait until it is ready."""
    handle = open(log_path, "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel", "INFO", "--concurrency", "1",
         "--hostname", f"{hostname}-{os.getpid()}@%h", "--without-gossip", "--without-mingle"],
        cwd=PROJECT_ROOT, env=settings_env(settings), stdout=handle, stderr=subprocess.STDOUT,
    )
    worker = LiveWorker(process, log_path)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"worker exited with {process.returncode}:\n{worker.log()[-4000:]}")
        return " ready." in worker.log()

    wait_for(ready, 120, "the celery worker to be ready")
    return worker


@pytest.fixture
def live_worker_factory(tmp_path: Path) -> Iterator[Callable[[Settings], LiveWorker]]:
    """Start real worker processes; all are stopped at the end of the test."""
    workers: list[LiveWorker] = []

    def start(settings: Settings) -> LiveWorker:
        worker = start_worker(settings, tmp_path / f"worker-{len(workers)}.log")
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


@dataclass
class LivePortal:
    """A portal served over real HTTP on a free local port."""

    url: str
    server: object
    headers: dict[str, str] = field(default_factory=dict)  # e.g. an API token: {"Authorization": "Bearer ..."}


@pytest.fixture
def live_portal_factory() -> Iterator[Callable[[Settings], LivePortal]]:
    """Serve ``create_app(settings)`` with werkzeug in a background thread."""
    from werkzeug.serving import make_server

    from portal import create_app

    servers = []

    def start(settings: Settings) -> LivePortal:
        server = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append(server)
        return LivePortal(url=f"http://127.0.0.1:{server.server_port}", server=server)

    yield start
    for server in servers:
        server.shutdown()


def api_token(settings: Settings, username: str = "e2e-admin", role: str = "admin") -> str:
    """Create an account on ``settings``' database and return an API token for it."""
    from core.auth import create_user, issue_token
    from core.db import Database

    database = Database(settings)
    try:
        with database.transaction() as session:
            return issue_token(session, create_user(session, username, "e2e password, long enough", role), "e2e")[1]
    finally:
        database.dispose()

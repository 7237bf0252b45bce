"""Shared pieces of the benchmarks: test images, the original one-image-at-a-time loop, and the real system
(a temporary PostgreSQL + Redis deployment, gunicorn portal and `celery -A worker worker` processes)."""

from __future__ import annotations

import io
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
import sqlalchemy as sa
import torch
from PIL import Image

from core import registry
from core.auth import create_user, issue_token
from core.config import Settings, load_settings
from core.db import Database
from core.migrate import upgrade
from core.ml.modelio import create_model, save_weights
from core.preprocessing import default_preprocessing
from core.registry import ModelSpec

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_XRAYS = Path(os.environ.get("TRIAGE_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data")) / "xrays"


def machine_line() -> str:
    """One line naming the CPU, cores and torch build, printed with every result."""
    cpu = platform.processor() or "cpu"
    try:
        model = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}; {os.cpu_count()} cores; {gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def source_images(count: int, split: str = "test") -> list[Path]:
    """Real radiographs from ../shared/data/xrays, cycling when more are asked for than exist."""
    files = sorted((SHARED_XRAYS / split).glob("*/*.jpg"))
    if not files:
        raise SystemExit(f"no radiographs under {SHARED_XRAYS / split}; set TRIAGE_SHARED_DATA")
    return [files[i % len(files)] for i in range(count)]


def jpeg_bytes(path: Path, size: tuple[int, int], quality: int = 90, salt: int = 0) -> bytes:
    """The radiograph at ``path`` resized to ``size`` as JPEG bytes (``salt`` makes copies distinct).

    The salt changes a corner pixel in all three channels, so the picture stays grey like every
    radiograph in ../shared/data (R = G = B).
    """
    image = Image.open(path).convert("RGB").resize(size, Image.BILINEAR)
    if salt:
        array = np.asarray(image).copy()
        array[0, 0, :] = salt % 256
        array[0, 1, :] = (salt // 256) % 256
        image = Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def make_jpegs(count: int, size: tuple[int, int] = (512, 512)) -> list[bytes]:
    """``count`` distinct JPEGs of ``size`` made from the real radiographs."""
    return [jpeg_bytes(path, size, salt=index + 1) for index, path in enumerate(source_images(count))]


def original_loop(model: torch.nn.Module, images: list[bytes], image_size: int = 224) -> np.ndarray:
    """The original project's inference: one image at a time, PIL -> Resize -> ToTensor -> Normalize."""
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    outputs = []
    model.eval()
    with torch.no_grad():
        for data in images:
            image = Image.open(io.BytesIO(data)).convert("RGB")
            tensor = transform(image).unsqueeze(0)
            outputs.append(torch.softmax(model(tensor), dim=1)[0].numpy())
    return np.stack(outputs)


def git_revision() -> str:
    """The commit the benchmark ran on."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def settings_env(settings: Settings) -> dict[str, str]:
    """This process's environment with every ``TRIAGE_*`` variable replaced by ``settings``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TRIAGE_")}
    env.update({f"TRIAGE_{key.upper()}": str(value) for key, value in settings.model_dump().items() if value is not None})
    return env


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``condition`` until it is truthy; exit naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise SystemExit(f"timed out waiting for {what}")


def start_worker(env: dict[str, str], log_path: Path, hostname: str = "bench", node: str | None = None) -> subprocess.Popen[bytes]:
    """Start a real `celery -A worker worker` with ``env``; returns once it is ready.

    Its pool children are ``TRIAGE_WORKER_CONCURRENCY`` in ``env`` (default one), as in production.

    The worker leads its own process group (:func:`kill_group` kills it whole). ``node`` is its
    node name as given to ``-n`` (e.g. ``a@%h``); by default ``{hostname}-{this pid}@%h``. The log
    is appended to, so a restarted node keeps one log; readiness counts the ready lines.
    """
    readies = log_path.read_text(errors="replace").count(" ready.") if log_path.exists() else 0
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel", "INFO",
         "--without-gossip", "--without-mingle", "--hostname", node or f"{hostname}-{os.getpid()}@%h"],
        cwd=PROJECT_ROOT, env=env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )

    def ready() -> bool:
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited with {worker.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}")
        return log_path.read_text(errors="replace").count(" ready.") > readies

    try:
        wait_until(ready, 120, "the worker")
    except BaseException:
        kill_group(worker)
        raise
    return worker


POSTGRES_ADMIN = os.environ.get("TRIAGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Deployment:
    """The production deployment made for one benchmark run: settings, database, model, API token."""

    settings: Settings
    db: Database
    spec: ModelSpec
    #: An API token of an uploader account ("Authorization: Bearer ...").
    token: str
    #: Scratch folder of the run (data dir, logs), removed afterwards.
    workdir: Path

    @property
    def env(self) -> dict[str, str]:
        """The environment that makes a portal or worker process see exactly these settings."""
        return settings_env(self.settings)

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers that authenticate an API call with the run's token."""
        return {"Authorization": f"Bearer {self.token}"}


@contextmanager
def deployment(
    arch: str, image_size: int, redis_url: str, threshold: float = 0.0, database_url: str | None = None, **settings_values: object,
) -> Iterator[Deployment]:
    """PostgreSQL + Redis with a promoted random-weight ``arch`` model and an uploader's API token.

    A temporary database is created (and dropped afterwards) unless ``database_url`` names an empty
    one the caller owns; the Redis database index of ``redis_url`` is emptied before and after.
    ``settings_values`` are further settings (runtime, batch size, ...).
    """
    import redis

    admin = sa.create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    name = None
    if database_url is None:
        name = f"triage_bench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        database_url = POSTGRES_ADMIN.rsplit("/", 1)[0] + "/" + name
    broker = redis.Redis.from_url(redis_url)
    tmp = tempfile.TemporaryDirectory(prefix="triage-bench-")
    db = None
    try:
        broker.flushdb()
        workdir = Path(tmp.name)
        values: dict[str, object] = {"max_upload_mb": 4096, "secret_key": "bench-secret-key-not-for-production", **settings_values}
        settings = load_settings({}, data_dir=workdir, database_url=database_url, broker_url=redis_url, **values)
        upgrade(settings.database_url)
        db = Database(settings)
        labels = ["comminuted_fracture", "no_fracture", "simple_fracture"]
        weights = save_weights(create_model(arch, len(labels)), workdir / "w.safetensors")
        with db.transaction() as session:
            version = registry.register_version(
                session, settings, weights, name=f"bench {arch}", architecture=arch, labels=labels,
                preprocessing=default_preprocessing(image_size), threshold=threshold,
            )
            registry.promote(session, version.id)
            spec = registry.ModelSpec.from_version(version)
            _, token = issue_token(session, create_user(session, "bench", "bench-password-123", "uploader"), "bench")
        yield Deployment(settings, db, spec, token, workdir)
    finally:
        if db is not None:
            db.dispose()
        if name is not None:
            with admin.connect() as connection:
                connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        broker.flushdb()
        broker.close()
        tmp.cleanup()


class Processes:
    """Child processes of a benchmark (each leads its own process group); all stopped on exit."""

    def __init__(self) -> None:
        self._items: list[subprocess.Popen[bytes]] = []

    def add(self, process: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        """Stop ``process`` (and its process group) when the block ends; returns it."""
        self._items.append(process)
        return process

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *_: object) -> None:
        for process in self._items:
            if process.poll() is None:
                process.terminate()
        for process in self._items:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            kill_group(process)  # whatever is left of it (a pool child, a timed-out main process)


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``process`` and every process of its group at once (an OOM kill or power loss), and reap it."""
    _signal_group(process, signal.SIGKILL)
    process.wait()


def group_pids(process: subprocess.Popen[bytes]) -> set[int]:
    """The ids of the processes in ``process``'s process group (a worker: its main process and pool children)."""
    found = subprocess.run(["pgrep", "-g", str(process.pid)], capture_output=True, text=True).stdout.split()
    return {int(pid) for pid in found}


def start_portal(env: dict[str, str], workers: int = 1, threads: int = 4) -> tuple[subprocess.Popen[bytes], str]:
    """Serve the portal with gunicorn on a free port, in its own process group: (process, base URL), once it answers."""
    port = free_port()
    portal = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", str(workers), "--threads", str(threads),
         "--timeout", "600", "portal:create_app()"],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if portal.poll() is not None:
            raise SystemExit(f"the portal exited with {portal.returncode}")
        try:
            return requests.get(f"{url}/healthz", timeout=10).ok
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or still booting
            return False

    try:
        wait_until(up, 180, "the portal")
    except BaseException:
        kill_group(portal)
        raise
    return portal, url


def upload_study(url: str, headers: dict[str, str], name: str, files: list[tuple[str, bytes]]) -> int:
    """POST ``files`` (name, bytes) as one study through the HTTP API; returns the study's id."""
    response = requests.post(
        f"{url}/api/studies", headers=headers, data={"name": name},
        files=[("files", (file_name, data, "image/jpeg")) for file_name, data in files], timeout=3600,
    )
    response.raise_for_status()
    return int(response.json()["id"])

"""Shared fixtures: settings on a temporary data folder, migrated databases, a tiny model, services.

Tests that need PostgreSQL, Redis or the shared real images (``../shared/data``) skip with a reason
that says how to enable them; under CI (``CI=true``) a missing one is an error instead, so nothing
is silently skipped there.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.config import Settings, load_settings
from core.db import Database
from core.migrate import upgrade

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("TRIAGE_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
XRAYS = SHARED_DATA / "xrays"
DICOM_DIR = SHARED_DATA / "dicom"
POSTGRES_ADMIN_URL = os.environ.get("TRIAGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_TEST_URL = os.environ.get("TRIAGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TINY_ARCH = "test_efficientnet"
#: Not the public default, which settings with PostgreSQL or Redis refuse.
TEST_SECRET_KEY = "test-secret-key-not-for-production"


def service_missing(reason: str) -> None:
    """Skip (locally) or fail (in CI) a test whose external service or shared data is absent."""
    if IN_CI:
        pytest.fail(f"{reason} (CI must provide it)")
    pytest.skip(reason)


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    """Settings on ``data_dir`` with test-friendly sizes; environment variables are ignored."""
    values: dict[str, object] = {
        "data_dir": data_dir, "chunk_size": 8, "batch_size": 8, "device": "cpu", "torch_threads": 1, "secret_key": TEST_SECRET_KEY,
    }
    values.update(overrides)
    return load_settings({}, **values)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Embedded settings (SQLite file + filesystem broker) on a fresh temporary folder."""
    return make_settings(tmp_path / "var")


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    """The settings' SQLite database, migrated to head."""
    upgrade(settings.database_url)
    database = Database(settings)
    yield database
    database.dispose()


@pytest.fixture(scope="session")
def xrays_dir() -> Path:
    """The real radiographs in ../shared/data/xrays (skips when absent; fails under CI)."""
    if not XRAYS.is_dir():
        service_missing(f"real radiographs not found at {XRAYS}; set TRIAGE_SHARED_DATA to the shared data folder")
    return XRAYS


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    """The real DICOM files in ../shared/data/dicom (skips when absent; fails under CI)."""
    if not DICOM_DIR.is_dir():
        service_missing(f"DICOM samples not found at {DICOM_DIR}; set TRIAGE_SHARED_DATA to the shared data folder")
    return DICOM_DIR


def xray_sample(xrays: Path, count: int, split: str = "test") -> list[Path]:
    """``count`` real radiographs from ``split``, alternating the classes, in a stable order."""
    per_class = [sorted((xrays / split / name).glob("*.jpg")) for name in sorted(os.listdir(xrays / split))]
    files: list[Path] = []
    for index in range(count):
        group = per_class[index % len(per_class)]
        files.append(group[index // len(per_class)])
    return files


def real_subset(xrays: Path, out: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """A balanced subset of the real radiographs (symlinks); val/test images whose original
    (the file name before Roboflow's ``.rf.`` suffix) is in the train subset are left out."""
    rng = random.Random(seed)
    used: set[str] = set()
    for split in ("train", "val", "test"):
        for label in sorted(os.listdir(xrays / split)):
            files = sorted((xrays / split / label).glob("*.jpg"))
            rng.shuffle(files)
            chosen = [f for f in files if f.name.split(".rf.")[0] not in used][: counts[split]]
            if split == "train":
                used.update(f.name.split(".rf.")[0] for f in chosen)
            (out / split / label).mkdir(parents=True)
            for f in chosen:
                (out / split / label / f.name).symlink_to(f)
    return out


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A random-init tiny timm model saved as safetensors, with its serving metadata (2 labels)."""
    import torch

    from core.ml.modelio import create_model, save_weights
    from core.preprocessing import default_preprocessing

    torch.manual_seed(0)
    labels = ["fracture", "no_fracture"]
    model = create_model(TINY_ARCH, num_classes=len(labels))
    path = save_weights(model, tmp_path_factory.mktemp("weights") / "tiny.safetensors")
    return {
        "weights_file": path,
        "architecture": TINY_ARCH,
        "labels": labels,
        "preprocessing": default_preprocessing(image_size=64),
        "threshold": 0.9,
    }


def register_tiny_model(db: Database, settings: Settings, tiny_weights: dict[str, object], promote: bool = True) -> int:
    """Register (and by default promote) the tiny model; returns its version id."""
    from core import registry

    with db.transaction() as session:
        version = registry.register_version(session, settings, name="tiny test model", **tiny_weights)  # type: ignore[arg-type]
        if promote:
            registry.promote(session, version.id)
        return version.id


def deploy_tiny_model(settings: Settings, tiny_weights: dict[str, object]) -> tuple[Database, int]:
    """Migrate ``settings``' database and register + promote the tiny model: (database, version id)."""
    upgrade(settings.database_url)
    database = Database(settings)
    return database, register_tiny_model(database, settings, tiny_weights)


@pytest.fixture
def production_model(db: Database, settings: Settings, tiny_weights: dict[str, object]) -> int:
    """Id of a promoted tiny model version in the test database."""
    return register_tiny_model(db, settings, tiny_weights)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """URL of a new, empty PostgreSQL database, dropped afterwards."""
    import sqlalchemy as sa

    # pre-ping: a test may restart PostgreSQL, which cuts the pooled connection dropping the database needs
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with admin.connect() as connection:
            name = f"triage_test_{uuid.uuid4().hex[:10]}"
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        service_missing(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL} ({exc.orig}); start it or set TRIAGE_TEST_POSTGRES_URL")
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    yield url
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """URL of a Redis database index reserved for tests, emptied before and after."""
    import redis

    client = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError as exc:
        service_missing(f"Redis not reachable at {REDIS_TEST_URL} ({exc}); start it or set TRIAGE_TEST_REDIS_URL")
    yield REDIS_TEST_URL
    client.flushdb()
    client.close()


def saved_image(pil_format: str, *shades: int, size: tuple[int, int] = (96, 80)) -> bytes:
    """An image file made by Pillow in ``pil_format``: one flat grey frame per shade (several: a multi-frame file)."""
    import io

    from PIL import Image

    mode = "RGB" if pil_format == "MPO" else "L"  # Pillow writes MPO from RGB frames only
    frames = [Image.new(mode, size, (shade,) * len(mode)) for shade in shades or (90,)]
    buffer = io.BytesIO()
    options = {"save_all": True, "append_images": frames[1:]} if len(frames) > 1 else {}
    frames[0].save(buffer, pil_format, **options)
    return buffer.getvalue()

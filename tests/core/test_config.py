"""Settings come from TRIAGE_* variables; a bad value stops start-up naming the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.config import ConfigError, load_settings
from core.logs import log_level
from tests.conftest import PROJECT_ROOT


def test_defaults_are_the_embedded_deployment(tmp_path: Path) -> None:
    settings = load_settings({"TRIAGE_DATA_DIR": str(tmp_path)})
    assert settings.database_url == f"sqlite:///{tmp_path / 'triage.db'}"
    assert settings.broker_url == "filesystem://"
    assert settings.storage_dir == tmp_path / "images"
    assert settings.is_embedded


def test_two_settings_switch_to_postgres_and_redis() -> None:
    settings = load_settings({
        "TRIAGE_DATABASE_URL": "postgresql+psycopg://u@db/triage",
        "TRIAGE_BROKER_URL": "redis://redis:6379/0",
        "TRIAGE_BATCH_SIZE": "128",
        "TRIAGE_SECRET_KEY": "a-long-random-production-key",
    })
    assert settings.database_url.startswith("postgresql")
    assert settings.broker_url == "redis://redis:6379/0"
    assert settings.batch_size == 128
    assert not settings.is_embedded


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TRIAGE_BATCH_SIZE", "lots"),
        ("TRIAGE_BATCH_SIZE", "0"),
        ("TRIAGE_DEVICE", "tpu"),
        ("TRIAGE_DATABASE_URL", "mysql://x/y"),
        ("TRIAGE_BROKER_URL", "kafka://x"),
        ("TRIAGE_SECRET_KEY", "short"),
    ],
)
def test_bad_value_names_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings({variable: value})
    assert variable in str(error.value)


@pytest.mark.parametrize(
    "server", [{"TRIAGE_DATABASE_URL": "postgresql+psycopg://u@db/triage"}, {"TRIAGE_BROKER_URL": "redis://redis:6379/0"}]
)
def test_the_public_default_secret_key_is_refused_outside_the_embedded_default(server: dict[str, str]) -> None:
    """It keys sessions and the patient-ID hash: fine for the demo, refused with PostgreSQL or Redis."""
    with pytest.raises(ConfigError, match="TRIAGE_SECRET_KEY is the public default .* set TRIAGE_SECRET_KEY to a long random value"):
        load_settings(server)
    assert load_settings({**server, "TRIAGE_SECRET_KEY": "a-long-random-production-key"}).secret_key == "a-long-random-production-key"


def test_the_log_level_is_the_setting_with_the_clis_quiet_default_when_unset() -> None:
    assert log_level(load_settings({})) == "INFO"
    assert log_level(load_settings({}), unset_default="WARNING") == "WARNING"
    assert log_level(load_settings({"TRIAGE_LOG_LEVEL": "DEBUG"}), unset_default="WARNING") == "DEBUG"


def test_worker_start_up_fails_loudly_on_a_bad_setting(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "TRIAGE_DATA_DIR": str(tmp_path), "TRIAGE_CHUNK_SIZE": "-3", "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run([sys.executable, "-c", "import worker"], env=env, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    assert result.returncode != 0
    assert "TRIAGE_CHUNK_SIZE" in result.stderr


def test_admin_cli_reports_a_bad_setting_in_one_line(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "TRIAGE_DATA_DIR": str(tmp_path), "TRIAGE_DEVICE": "gpu", "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run([sys.executable, "-m", "admin.cli", "model", "list"], env=env, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: Invalid setting(s): TRIAGE_DEVICE")
    assert "Traceback" not in result.stderr

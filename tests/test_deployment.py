"""docker-compose.yml and the Dockerfile agree with the code's real entry points and settings."""

from __future__ import annotations

import importlib
import re
import tomllib

import pytest
import yaml

from core.config import ENV_PREFIX, Settings, load_settings
from tests.conftest import PROJECT_ROOT

COMPOSE = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    return dict(env)


def test_compose_has_the_five_services() -> None:
    assert {"redis", "postgres", "migrate", "portal", "worker", "scheduler"} <= set(SERVICES)


def test_scheduler_runs_the_reconciler_beat() -> None:
    import worker

    command = SERVICES["scheduler"]["command"]
    assert command[:4] == ["celery", "-A", "worker", "beat"]
    schedule = worker.app.conf.beat_schedule
    assert any(entry["task"] == "triage.reconcile" for entry in schedule.values())
    assert "triage.reconcile" in worker.app.tasks


def test_every_triage_variable_in_compose_is_a_real_setting() -> None:
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    for name, service in SERVICES.items():
        for key in _environment(service):
            if key.startswith(ENV_PREFIX):
                assert key in fields, f"{name} sets unknown setting {key}"


def test_compose_settings_validate() -> None:
    env = {k: v for k, v in _environment(SERVICES["worker"]).items() if "${" not in str(v)}
    settings = load_settings({**env, "TRIAGE_SECRET_KEY": "x" * 32})
    assert settings.database_url.startswith("postgresql") and settings.broker_url.startswith("redis://")


def test_migrations_run_before_the_portal_and_worker() -> None:
    assert SERVICES["migrate"]["command"] == ["triage", "db", "upgrade"]
    for name in ("portal", "worker"):
        assert SERVICES[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_console_script_in_compose_exists() -> None:
    scripts = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["triage"].split(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_portal_command_names_the_app_factory() -> None:
    command = SERVICES["portal"]["command"]
    assert command[0] == "gunicorn"
    target = command[-1]
    module, call = target.split(":")
    factory = re.fullmatch(r"(\w+)\(\)", call)
    assert factory, target
    assert callable(getattr(importlib.import_module(module), factory.group(1)))


def test_worker_command_starts_the_celery_app_with_a_gpu() -> None:
    worker = SERVICES["worker"]
    command = worker["command"]
    assert command[:4] == ["celery", "-A", "worker", "worker"]
    module = importlib.import_module(command[2])
    assert "triage.classify_chunk" in module.app.tasks
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_images_and_models_are_on_one_shared_volume() -> None:
    for name in ("portal", "worker", "migrate", "scheduler"):
        env = _environment(SERVICES[name])
        data_dir = env["TRIAGE_DATA_DIR"]
        mounts = {m.split(":")[1]: m.split(":")[0] for m in SERVICES[name]["volumes"]}
        assert mounts.get(data_dir) == "triage-data", name
    assert "triage-data" in COMPOSE["volumes"]


@pytest.mark.parametrize("line", [l for l in (PROJECT_ROOT / "Dockerfile").read_text().splitlines() if l.startswith("COPY ")])
def test_dockerfile_copies_paths_that_exist(line: str) -> None:
    *sources, _target = line.split()[1:]
    for source in sources:
        assert (PROJECT_ROOT / source).exists(), source


def test_readme_settings_table_matches_the_settings() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `(TRIAGE_\w+)` \|", readme, flags=re.MULTILINE))
    actual = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert documented == actual, f"undocumented: {actual - documented}; stale: {documented - actual}"

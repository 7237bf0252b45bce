"""docker-compose.yml and the Dockerfile agree with the code's real entry points and settings; the
README's map names every module, and the project's modules import each other without a circle."""

from __future__ import annotations

import ast
import importlib
import re
import tomllib
from pathlib import Path

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


#: The top-level packages of the product (pyproject.toml ships these).
PACKAGES = ("core", "portal", "worker", "trainer", "admin")


def test_pyproject_and_dockerfile_ship_every_package() -> None:
    include = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(include) == sorted(f"{package}*" for package in PACKAGES)
    copied = {line.split()[1] for line in (PROJECT_ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")}
    assert set(PACKAGES) <= copied


def test_the_version_is_written_in_one_place() -> None:
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "core.__version__"}


def test_readme_architecture_map_names_every_module() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme.split("\n## Architecture\n", 1)[1].split("\n## ", 1)[0]
    modules = sorted(
        path.relative_to(PROJECT_ROOT).as_posix()
        for folder in ("core", "core/ml", "admin")
        for path in (PROJECT_ROOT / folder).glob("*.py")
        if path.name != "__init__.py"
    )
    missing = [module for module in modules if f"`{module}`" not in section]
    assert not missing, f"README.md's Architecture map lacks {missing}: add one line for each"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in it (module level and inside functions)."""
    files = {_module_name(path): path for package in PACKAGES for path in (PROJECT_ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package of this module
                    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join([*package[: len(package) - node.level + 1], *([node.module] if node.module else [])])
                # `from package import module` imports the module; `from module import name`, the module
                imported.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names)
        graph[name] = {module for module in imported if module in files and module != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle a depth-first walk meets, each as the modules along it."""
    found: list[list[str]] = []
    on_path: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        on_path.append(module)
        for imported in sorted(graph[module]):
            if imported in on_path:
                found.append(on_path[on_path.index(imported):] + [imported])
            elif imported not in done:
                visit(imported)
        on_path.pop()
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module)
    return found


def test_the_import_graph_finds_a_circle_when_there_is_one() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_project_modules_import_each_other_without_a_circle() -> None:
    """Layers only point down: no module imports, even inside a function, one that imports it back."""
    graph = _import_graph()
    assert "core.ml.runtimes" in graph["core.ml.pipeline"]  # the walk sees real imports
    cycles = _cycles(graph)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_core_imports_none_of_the_packages_above_it() -> None:
    graph = _import_graph()
    upward = {(module, imported) for module, imports in graph.items() if module.split(".")[0] == "core"
              for imported in imports if imported.split(".")[0] != "core"}
    assert not upward, f"core imports upward: {sorted(upward)}"


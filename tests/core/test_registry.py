"""Model registry: register from safetensors or an original-project .pth, list, promote."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import registry
from core.config import Settings
from core.db import Database
from core.ml.modelio import WeightsError, create_model, load_state_dict_file
from core.ml.predict import Predictor
from core.storage import sha256_file
from tests.conftest import PROJECT_ROOT
from tests.e2e.conftest import settings_env

LABELS = ["comminuted_fracture", "no_fracture", "simple_fracture"]


def test_register_stores_weights_by_sha256_and_promote_is_exclusive(db: Database, settings: Settings, tiny_weights: dict) -> None:
    with db.transaction() as session:
        first = registry.register_version(session, settings, name="a", **tiny_weights)
        second = registry.register_version(session, settings, name="b", **tiny_weights)
        assert registry.production_version(session) is None
        registry.promote(session, first.id)
        registry.promote(session, second.id)
        assert registry.production_version(session).id == second.id
        assert [v.id for v in registry.list_versions(session)] == [second.id, first.id]
        stored = registry.weights_path(settings, first.weights_sha256)
        assert stored.is_file() and sha256_file(stored) == first.weights_sha256
        assert stored.is_relative_to(settings.models_dir)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": ["only_one"]}, "labels"),
        ({"labels": ["a", "a"]}, "labels"),
        ({"threshold": 1.5}, "threshold"),
        # The stored JSON form is read back at the boundary (Preprocessing.from_dict), never registered as it is.
        ({"preprocessing": {"input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}},
         "preprocessing must be a core.preprocessing.Preprocessing"),
    ],
)
def test_invalid_metadata_is_refused_with_the_field_named(db: Database, settings: Settings, tiny_weights: dict, change: dict, message: str) -> None:
    with db.transaction() as session, pytest.raises(registry.RegistryError, match=message):
        registry.register_version(session, settings, name="bad", **{**tiny_weights, **change})


def test_promote_unknown_version_is_a_clear_error(db: Database) -> None:
    with db.transaction() as session, pytest.raises(registry.RegistryError, match="no model version #999"):
        registry.promote(session, 999)


def test_original_project_state_dict_is_imported_and_serves_identically(db: Database, settings: Settings, tmp_path: Path) -> None:
    """The original project did timm.create_model(..., num_classes=3) then torch.save(state_dict)."""
    torch.manual_seed(1)
    original = create_model("test_efficientnet", num_classes=3).eval()
    checkpoint = tmp_path / "best_model.pth"
    torch.save(original.state_dict(), checkpoint)

    result = subprocess.run(
        [sys.executable, "-m", "admin.cli", "model", "register", "--weights", str(checkpoint), "--arch", "test_efficientnet",
         "--labels", ",".join(LABELS), "--image-size", "64", "--threshold", "0.6", "--promote"],
        env=settings_env(settings), capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    with db.transaction() as session:
        version = registry.production_version(session)
        assert version is not None and version.labels == LABELS and version.threshold == 0.6
        spec = registry.ModelSpec.from_version(version)
    predictor = Predictor(spec, registry.weights_path(settings, spec.weights_sha256), device="cpu")
    batch = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        expected = torch.softmax(original(batch), dim=1).numpy()
    assert abs(predictor.predict_tensor(batch) - expected).max() < 1e-5


def test_an_unknown_interpolation_is_refused_at_registration(db: Database, settings: Settings, tmp_path: Path) -> None:
    """Refused by `triage model register` with the name and the choices, before anything is stored."""
    checkpoint = tmp_path / "model.pth"
    torch.save(create_model("test_efficientnet", num_classes=3).state_dict(), checkpoint)
    result = subprocess.run(
        [sys.executable, "-m", "admin.cli", "model", "register", "--weights", str(checkpoint), "--arch", "test_efficientnet",
         "--labels", ",".join(LABELS), "--interpolation", "lanczoz"],
        env=settings_env(settings), capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300,
    )
    assert result.returncode == 1
    assert "unknown preprocessing interpolation 'lanczoz'; use one of nearest" in result.stderr
    with db.transaction() as session:
        assert registry.list_versions(session) == []


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path: Path) -> None:
    checkpoint = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Path("/etc/passwd")}, checkpoint)
    with pytest.raises(WeightsError, match="weights-only"):
        load_state_dict_file(checkpoint)


def test_weights_for_another_architecture_are_refused(db: Database, settings: Settings, tmp_path: Path) -> None:
    checkpoint = tmp_path / "other.pth"
    torch.save(create_model("test_efficientnet", num_classes=3).state_dict(), checkpoint)
    result = subprocess.run(
        [sys.executable, "-m", "admin.cli", "model", "register", "--weights", str(checkpoint), "--arch", "test_convnext", "--labels", ",".join(LABELS)],
        env=settings_env(settings), capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300,
    )
    assert result.returncode == 1
    # one clear line, no traceback (log lines of the level TRIAGE_LOG_LEVEL asks for may come before it)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: weights do not fit the architecture"), result.stderr[-600:]
    assert "Traceback" not in result.stderr

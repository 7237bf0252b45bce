"""Training runs end to end on CPU: synthetic set learned, resume is exact, real radiographs, registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import select

from core.config import Settings
from core.db import Database
from core.ml.pipeline import PredictorCache, classify_chunk
from core.models import Image, ImageStatus, ModelVersion, Review
from core.studies import add_upload, create_study
from trainer.config import resolve_config
from trainer.datacheck import LeakageError, check_dataset
from trainer.export import export_reviews
from trainer.synthetic import generate_dataset
from tests.conftest import real_subset
from trainer.train import TrainingError, register_run, run_training

ARCH = "test_resnet"


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """150 synthetic images per class at 64 px."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, per_class=150, image_size=64, seed=0)
    return root


def test_tiny_model_learns_the_synthetic_set(synthetic_dir: Path, tmp_path: Path, db: Database, settings: Settings) -> None:
    config = resolve_config(ARCH, overrides={"image_size": 64, "epochs": 12})
    result = run_training(synthetic_dir, config, tmp_path / "run")

    assert result.metrics["test"]["accuracy"] >= 0.95, result.metrics["test"]["confusion_matrix"]
    assert all(row["train_images_per_second"] > 0 for row in result.metrics["history"])
    assert result.metrics["train_images_per_second"] > 0 and result.metrics["minutes_per_epoch"] > 0
    assert result.datacheck is not None and not result.datacheck.has_leakage
    for name in ("model.safetensors", "metrics.json", "config.yaml", "datacheck.json", "confusion_matrix.png", "reliability.png", "learning_curves.png"):
        assert (tmp_path / "run" / name).is_file(), name
    assert result.extra["synthetic_data"] is True
    version_id = register_run(result, db, settings, "synthetic demo", promote=True, demo=True)
    with db.transaction() as session:
        version = session.get(ModelVersion, version_id)
        assert version.is_production and version.is_demo and "demo" in version.display_name
        assert version.labels == ["comminuted_fracture", "no_fracture", "simple_fracture"]
        assert version.temperature == pytest.approx(result.temperature)
        assert version.extra["data_fingerprint"] == result.extra["data_fingerprint"]
        assert version.metrics["test"]["accuracy"] >= 0.95


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_killed_run_resumes_to_the_same_weights(tmp_path: Path, ema_decay: float) -> None:
    data = tmp_path / "data"
    generate_dataset(data, per_class=16, image_size=32, seed=1)
    config = resolve_config(ARCH, overrides={"image_size": 32, "epochs": 3, "batch_size": 8, "early_stopping_patience": 10, "ema_decay": ema_decay})

    full = run_training(data, config, tmp_path / "full", check=False)

    class Killed(Exception):
        pass

    def kill_after_first(epoch: int, _: dict[str, float]) -> None:
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        run_training(data, config, tmp_path / "resumed", check=False, on_epoch_end=kill_after_first)
    resumed = run_training(data, config, tmp_path / "resumed", check=False, resume=True)

    a, b = load_file(str(full.weights_file)), load_file(str(resumed.weights_file))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["val_loss"] for h in full.metrics["history"]] == [h["val_loss"] for h in resumed.metrics["history"]]
    # the last epoch's weights differ from the first's, so equality is not trivial
    assert len(full.metrics["history"]) == 3
    checkpoint = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    if ema_decay:  # the moving average, not the last step's weights, is validated and registered
        assert any(not torch.equal(checkpoint["ema"][k], checkpoint["model"][k]) for k in checkpoint["model"])
        if checkpoint["best"]["epoch"] == 3:
            assert all(torch.equal(a[k], checkpoint["ema"][k]) for k in a)
    else:
        assert checkpoint["ema"] is None

    other = resolve_config(ARCH, overrides={"image_size": 32, "epochs": 3, "batch_size": 8, "lr": 0.1})
    with pytest.raises(TrainingError, match="different settings"):
        run_training(data, other, tmp_path / "resumed", check=False, resume=True)


def test_nan_loss_stops_with_a_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_dataset(data, per_class=8, image_size=32, seed=2)
    config = resolve_config(ARCH, overrides={"image_size": 32, "epochs": 2, "lr": 1e30})
    with pytest.raises(TrainingError, match="loss became nan|loss became inf"):
        run_training(data, config, tmp_path / "run", check=False)


def test_check_reports_the_same_image_with_two_labels(xrays_dir: Path) -> None:
    report = check_dataset(xrays_dir / "train")
    conflicts = [c for c in report.label_conflicts if c["kind"] == "exact"]
    assert len(conflicts) == 1
    assert sorted(conflicts[0]["labels"]) == ["fracture", "no_fracture"]
    assert {Path(f).name for f in conflicts[0]["files"]} == {"image1_33_png.rf.c18074a7456977d3557e11d2194a869e.jpg"}
    assert report.counts == {"train": {"fracture": 1238, "no_fracture": 1217}}


def test_leaking_copies_are_dropped_from_train_and_val_or_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_dataset(data, per_class=8, image_size=32, seed=3)
    leaked = next((data / "train" / "no_fracture").iterdir())
    (data / "test" / "no_fracture" / "copy.png").write_bytes(leaked.read_bytes())
    # a mirrored, brightened copy is a near duplicate
    from PIL import Image, ImageEnhance, ImageOps

    other = next((data / "train" / "simple_fracture").iterdir())
    ImageEnhance.Brightness(ImageOps.mirror(Image.open(other))).enhance(1.15).save(data / "val" / "simple_fracture" / "mirror.png")
    report = check_dataset(data)
    assert len(report.cross_split_exact) == 1
    assert any(p["b"].endswith("mirror.png") or p["a"].endswith("mirror.png") for p in report.near_duplicates)
    # of each leaking pair the copy in the earlier split goes: train before val before test
    assert {f"train/no_fracture/{leaked.name}", f"train/simple_fracture/{other.name}"} <= report.files_to_drop()["train"]
    assert "test" not in report.files_to_drop()  # the test split stays whole
    refuse = resolve_config(ARCH, overrides={"image_size": 32, "epochs": 1, "leakage": "refuse"})
    with pytest.raises(LeakageError, match="leakage: drop"):
        run_training(data, refuse, tmp_path / "refused")

    result = run_training(data, resolve_config(ARCH, overrides={"image_size": 32, "epochs": 1}), tmp_path / "run")
    dropped = result.extra["dropped_for_leakage"]
    assert result.extra["leakage"] == "drop" and dropped["train"] >= 2
    train_count = sum(result.extra["counts"]["train"].values())
    assert train_count == sum(1 for p in (data / "train").rglob("*.png")) - dropped["train"]
    assert sum(result.extra["counts"]["test"].values()) == sum(1 for p in (data / "test").rglob("*.png"))


def test_real_radiographs_beat_chance_and_register_a_version_the_worker_uses(
    xrays_dir: Path, tmp_path: Path, db: Database, settings: Settings
) -> None:
    data = real_subset(xrays_dir, tmp_path / "xrays", {"train": 150, "val": 50, "test": 75})
    # the cpu recipe shortened to CI's budget (the full one is measured in bench/README.md)
    config = resolve_config(recipe="cpu", overrides={"image_size": 128, "epochs": 3})
    result = run_training(data, config, tmp_path / "run")
    accuracy = result.metrics["test"]["accuracy"]
    assert result.metrics["test"]["n"] == 150
    # with n=150 chance gives 0.5 +- 0.041 (AUC 0.5 +- 0.047): both bounds are 2.5-3 deviations above it
    assert accuracy >= 0.6, f"test accuracy {accuracy:.3f} on a balanced subset (chance 0.5)"
    assert result.metrics["test"]["auc_macro_ovr"] >= 0.65
    version_id = register_run(result, db, settings, "real xrays smoke", promote=True)

    files = sorted((data / "test").glob("*/*.jpg"))[:6]
    with db.transaction() as session:
        version = session.get(ModelVersion, version_id)
        study = create_study(session, "trainer test", version)
        ids = [add_upload(session, settings, study, f.name, f.read_bytes()).id for f in files]
        study_id = study.id
    report = classify_chunk(db, settings, PredictorCache(settings), study_id, ids)
    assert report.predicted == 6 and report.study_done
    with db.transaction() as session:
        for image in session.scalars(select(Image).where(Image.study_id == study_id)):
            assert image.status == ImageStatus.DONE
            (prediction,) = image.predictions
            assert prediction.model_version_id == version_id
            assert prediction.label in ("fracture", "no_fracture")
            unsure = prediction.confidence < result.threshold
            unfamiliar = prediction.unfamiliar_score is not None and prediction.unfamiliar_score > result.metrics["unfamiliar"]["cut"]
            assert prediction.flagged == (unsure or unfamiliar)
            assert prediction.flag_kind == ("unfamiliar" if unfamiliar else "unsure" if unsure else None)

    from trainer.evaluate import evaluate_version

    evaluated, labels = evaluate_version(db, settings, version_id, data)
    assert labels == ["fracture", "no_fracture"]
    assert evaluated["accuracy"] == pytest.approx(accuracy)
    assert evaluated["confusion_matrix"] == result.metrics["test"]["confusion_matrix"]


def test_export_reviews_writes_label_folders(db: Database, settings: Settings, production_model: int, xrays_dir: Path, tmp_path: Path) -> None:
    from tests.conftest import xray_sample

    files = xray_sample(xrays_dir, 3)
    with db.transaction() as session:
        version = session.get(ModelVersion, production_model)
        study = create_study(session, "reviewed", version)
        images = [add_upload(session, settings, study, f"../../evil/{f.name}", f.read_bytes()) for f in files]
        session.add_all([
            Review(image_id=images[0].id, label="no_fracture", reviewer_name="a"),
            Review(image_id=images[0].id, label="fracture", reviewer_name="b"),  # the latest counts
            Review(image_id=images[1].id, label="no_fracture", reviewer_name="a"),
        ])
    counts = export_reviews(db, settings, tmp_path / "export")
    assert counts == {"fracture": 1, "no_fracture": 1}
    exported = sorted(p.relative_to(tmp_path / "export").as_posix() for p in (tmp_path / "export").glob("*/*"))
    assert len(exported) == 2 and exported[0].startswith("fracture/") and exported[1].startswith("no_fracture/")
    assert (tmp_path / "export" / exported[0]).read_bytes() == files[0].read_bytes()
    assert "evil" not in "".join(exported)
    assert (tmp_path / "export" / "reviews.csv").is_file()

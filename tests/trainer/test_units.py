"""Fast trainer checks: calibration, threshold choice, synthetic data, preprocessing parity, CLI errors."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from core.imaging import decode_image
from core.ml.predict import Predictor
from core.registry import ModelSpec
from tests.conftest import TINY_ARCH, xray_sample
from core.stats import clopper_pearson_upper
from trainer.calibrate import choose_threshold, fit_temperature, flag_stats, point_estimate_threshold, softmax
from trainer.config import resolve_config
from trainer.data import Sample, eval_tensors
from trainer.evaluate import expected_calibration_error
from trainer.synthetic import CLASSES, MARKER_FILE, generate_dataset


def _calibrated_logits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is calibrated by construction (labels drawn from the probabilities)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, size=(n, 3))
    probs = softmax(logits)
    targets = np.array([rng.choice(3, p=row) for row in probs])
    return logits, targets


def test_temperature_undoes_overconfidence_and_lowers_ece() -> None:
    logits, targets = _calibrated_logits(4000)
    overconfident = logits * 3.0
    temperature = fit_temperature(overconfident, targets)
    assert temperature == pytest.approx(3.0, rel=0.15)
    before = expected_calibration_error(softmax(overconfident), targets)
    after = expected_calibration_error(softmax(overconfident, temperature), targets)
    assert after < before / 3
    assert after < 0.03
    # already calibrated logits keep a temperature near 1
    assert fit_temperature(logits, targets) == pytest.approx(1.0, rel=0.15)


def test_ece_is_zero_for_perfect_confident_predictions_and_large_for_wrong_ones() -> None:
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.0)
    assert expected_calibration_error(probs, np.array([1, 0])) == pytest.approx(1.0)


def test_certified_threshold_bounds_the_error_and_is_stricter_than_the_point_estimate() -> None:
    logits, targets = _calibrated_logits(3000, seed=1)
    probs = softmax(logits)
    choice = choose_threshold(probs, targets, "error", target_error=0.05)
    coverage, error, _ = flag_stats(probs, targets, choice.threshold)
    assert choice.met and choice.bound <= 0.05 and error <= choice.bound
    assert (coverage, error) == pytest.approx((choice.coverage, choice.error_unflagged))
    assert 0.05 < coverage < 1.0
    # the bound is the exact one-sided binomial bound at level 1 - delta on the unflagged images
    kept = probs.max(axis=1) >= choice.threshold
    wrong = int((probs.argmax(axis=1) != targets)[kept].sum())
    assert choice.bound == pytest.approx(clopper_pearson_upper(wrong, int(kept.sum()), 0.05))
    # fixed sequence: the next candidate (2.5 % more images unflagged) fails the target, or none is left
    confidence = np.sort(probs.max(axis=1))[::-1]
    following = confidence[min(int(kept.sum()) + 75, 3000) - 1]
    if following < choice.threshold:
        more = probs.max(axis=1) >= following
        more_wrong = int((probs.argmax(axis=1) != targets)[more].sum())
        assert clopper_pearson_upper(more_wrong, int(more.sum()), 0.05) > 0.05
    # the old point estimate leaves more images unflagged: it promises only what val showed
    point = point_estimate_threshold(probs.max(axis=1), probs.argmax(axis=1) == targets, 0.05)
    assert point < choice.threshold
    # a target no threshold can certify on these images flags everything, and says so
    assert not choose_threshold(probs, targets, "error", target_error=0.005).met


def test_threshold_for_flag_rate_target() -> None:
    logits, targets = _calibrated_logits(1000, seed=2)
    probs = softmax(logits)
    choice = choose_threshold(probs, targets, "flag_rate", target_flag_rate=0.25)
    _, _, flag_rate = flag_stats(probs, targets, choice.threshold)
    assert choice.met and 0.24 <= flag_rate <= 0.25


def test_unreachable_error_target_flags_everything() -> None:
    probs = np.array([[0.6, 0.4], [0.7, 0.3]])
    choice = choose_threshold(probs, np.array([1, 1]), "error", target_error=0.01)
    assert choice.threshold == 1.0 and not choice.met


def test_synthetic_set_is_deterministic_marked_and_split(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", per_class=10, image_size=48, seed=3)
    generate_dataset(tmp_path / "b", per_class=10, image_size=48, seed=3)
    generate_dataset(tmp_path / "c", per_class=10, image_size=48, seed=4)

    def digest(root: Path) -> str:
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.glob("*/*/*.png")))).hexdigest()

    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    assert "NOT real radiographs" in (tmp_path / "a" / MARKER_FILE).read_text()
    assert sorted(a) == ["test", "train", "val"]
    assert all(sorted(per_class) == list(CLASSES) for per_class in a.values())
    assert sum(a[s][CLASSES[0]] for s in a) == 10


def test_worker_preprocessing_equals_evaluation_preprocessing(xrays_dir: Path) -> None:
    """The tensor the worker's Predictor makes from an upload is the tensor evaluation uses."""
    preprocessing = resolve_config(TINY_ARCH, overrides={"image_size": 72}).preprocessing()
    files = xray_sample(xrays_dir, 4)
    evaluated, _, _ = eval_tensors([Sample(path, 0) for path in files], preprocessing)
    spec = ModelSpec(1, TINY_ARCH, ["fracture", "no_fracture"], preprocessing, 0.5, 1.0, "0" * 64)
    from core.ml.modelio import create_model

    predictor = Predictor.from_model(spec, create_model(TINY_ARCH, 2), device="cpu")
    served = predictor.preprocess([decode_image(path.read_bytes(), 60_000_000) for path in files])
    assert served.shape == (4, 3, 72, 72)
    assert torch.equal(served, evaluated)


def test_config_precedence(tmp_path: Path) -> None:
    config_file = tmp_path / "recipe.yaml"
    config_file.write_text("lr: 0.0005\nepochs: 3\naugmentation: {hflip_p: 0.0}\n")
    config = resolve_config("convnextv2_base.fcmae_ft_in22k_in1k", config_file, {"epochs": 7, "image_size": None})
    assert (config.batch_size, config.drop_rate) == (16, 0.2)  # preset
    assert config.lr == 0.0005 and config.augmentation["hflip_p"] == 0.0  # file
    assert config.augmentation["rotation_degrees"] == 25.0  # default kept
    assert config.epochs == 7 and config.image_size == 224  # flag beats file; None ignored
    default = resolve_config("tf_efficientnetv2_s.in21k_ft_in1k")
    assert (default.lr, default.weight_decay, default.batch_size, default.seed, default.epochs) == (1e-4, 1e-5, 32, 42, 30)
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1\n")
    from trainer.config import ConfigFileError

    with pytest.raises(ConfigFileError, match="learning_rate"):
        resolve_config(TINY_ARCH, bad)
    for name, value in (("freeze_stages", -1), ("ema_decay", 1.0)):
        with pytest.raises(ConfigFileError, match=name):
            resolve_config(TINY_ARCH, overrides={name: value})


def test_unreachable_hub_gives_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import timm

    from trainer.__main__ import main

    real = timm.create_model

    def offline(name: str, pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setenv("TRIAGE_DATA_DIR", str(tmp_path / "var"))
    generate_dataset(tmp_path / "data", per_class=6, image_size=32, seed=0)
    code = main(["train", "--data", str(tmp_path / "data"), "--arch", TINY_ARCH, "--image-size", "32", "--epochs", "1",
                 "--pretrained", "hub", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "--pretrained none" in err[0] and "Traceback" not in err[0]


def test_dicom_without_a_suffix_is_found_by_content(tmp_path: Path, dicom_dir: Path) -> None:
    from trainer.data import image_files

    folder = tmp_path / "train" / "no_fracture"
    folder.mkdir(parents=True)
    (folder / "IM000001").write_bytes((dicom_dir / "RG3_UNCR.dcm").read_bytes())
    (folder / "notes").write_bytes(b"not an image")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    assert [p.name for p in image_files(folder)] == ["IM000001"]


ALLOCATION_LOOP = """
import resource, sys
import numpy as np
if sys.argv[1] == "reuse":
    from trainer.allocator import reuse_freed_memory
    assert reuse_freed_memory()
np.ones(8 << 20)  # warm-up: the first block is faulted in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    np.ones(8 << 20)  # 64 MB made and freed, as a training step makes and frees activations
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_training_reuses_freed_memory_instead_of_faulting_it_in_again() -> None:
    import subprocess
    import sys

    def page_faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", ALLOCATION_LOOP, mode], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[2])
        return int(done.stdout.split()[-1])

    # by default every 64 MB block is mapped afresh and faulted in again (about 10,000 faults here,
    # fewer than its 16,000 pages where the kernel maps ahead); with reuse the heap keeps it
    assert page_faults("default") > 2_000
    assert page_faults("reuse") < 200


def test_epoch_speed_is_the_mean_images_per_second_and_minutes_per_epoch() -> None:
    from trainer.train import epoch_speed

    history = [{"seconds": 60.0, "train_images_per_second": 100.0}, {"seconds": 120.0, "train_images_per_second": 300.0}]
    assert epoch_speed(history) == {"train_images_per_second": 200.0, "minutes_per_epoch": 1.5}
    # A resumed run's rows from before images/s was recorded count for minutes only.
    assert epoch_speed([{"seconds": 30.0}, *history]) == {"train_images_per_second": 200.0, "minutes_per_epoch": round(210 / 3 / 60, 3)}
    assert epoch_speed([]) == {"train_images_per_second": None, "minutes_per_epoch": None}


def test_frozen_stages_keep_their_weights_while_later_layers_learn() -> None:
    import timm
    from trainer.train import TrainingError, freeze_early_stages

    torch.manual_seed(0)
    model = timm.create_model(TINY_ARCH, num_classes=3)
    freeze_early_stages(model, 1)
    stem_before = model.conv_stem.weight.detach().clone()
    first_before = next(model.blocks[0].parameters()).detach().clone()
    second_before = next(model.blocks[1].parameters()).detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    assert model.conv_stem.weight.grad is None and torch.equal(model.conv_stem.weight, stem_before)
    assert torch.equal(next(model.blocks[0].parameters()), first_before)
    assert not torch.equal(next(model.blocks[1].parameters()), second_before)
    with pytest.raises(TrainingError, match="freeze_stages=99"):
        freeze_early_stages(timm.create_model(TINY_ARCH, num_classes=3), 99)

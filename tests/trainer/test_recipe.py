"""The cpu recipe, reduced to fit CI: pretrained weights from the package must beat random ones.

The full recipe (all of ../shared/data/xrays, 272 px, 10 epochs, about 23 minutes on two cores)
is measured in bench/README.md; here the same recipe runs on a small balanced subset for two
epochs, once from the package's ImageNet weights and once from random weights, same seed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import real_subset
from trainer.config import resolve_config
from trainer.train import run_training


@pytest.mark.slow
def test_reduced_cpu_recipe_beats_the_same_run_from_random_weights(xrays_dir: Path, tmp_path: Path) -> None:
    data = real_subset(xrays_dir, tmp_path / "xrays", {"train": 120, "val": 40, "test": 80})
    reduced = {"image_size": 128, "epochs": 2}
    pretrained = run_training(data, resolve_config(recipe="cpu", overrides=reduced), tmp_path / "pretrained")
    scratch = run_training(data, resolve_config(recipe="cpu", overrides={**reduced, "pretrained": "none"}), tmp_path / "scratch")
    assert pretrained.config.arch == "tf_efficientnet_lite1" and pretrained.config.pretrained == "package"
    auc_pretrained = pretrained.metrics["test"]["auc"]
    auc_scratch = scratch.metrics["test"]["auc"]
    assert pretrained.metrics["test"]["n"] == 160
    assert auc_pretrained >= auc_scratch + 0.05, (auc_pretrained, auc_scratch)
    assert auc_pretrained >= 0.62, auc_pretrained  # chance: 0.5 +- 0.046 on 160 images

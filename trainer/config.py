"""The training recipe as data: defaults, per-architecture presets, YAML overrides.

Precedence (later wins): :class:`TrainConfig` defaults < :data:`ARCH_PRESETS` for the chosen
architecture < a YAML file < command-line flags. The resolved config is saved with every run and
recorded with the registered model version.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.ml.transforms import DEFAULT_AUGMENTATION
from core.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

log = logging.getLogger(__name__)

#: Settings the original fracture project used for its two architectures.
ARCH_PRESETS: dict[str, dict[str, Any]] = {
    "tf_efficientnetv2_s.in21k_ft_in1k": {"batch_size": 32},
    "convnextv2_base.fcmae_ft_in22k_in1k": {"batch_size": 16, "drop_rate": 0.2},
}
#: timm's tiny ``test_*`` models train from scratch (demos, tests): smaller batches, higher lr.
PREFIX_PRESETS: dict[str, dict[str, Any]] = {"test_": {"batch_size": 16, "lr": 3e-3}}

#: Named recipes (``--recipe NAME``): whole, measured training setups.
RECIPES: dict[str, dict[str, Any]] = {
    # Fine-tunes ImageNet weights from an installed package (no hub) on a 2-core CPU in under 30
    # minutes: EfficientNet-Lite1 at 272 px with a zeroed new head, the stem and first three stages
    # frozen (their backward pass, the costliest at full resolution, skipped), AdamW with a one-cycle
    # schedule, flips and small rotations only, every training image once an epoch (classes weighted
    # in the loss). Lite1 raised test AUC from 0.947 (Lite0 at 224 px) to 0.961. Measured in
    # bench/README.md ("Training recipe cpu").
    "cpu": {
        "arch": "tf_efficientnet_lite1",
        "pretrained": "package",
        "image_size": 272,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "batch_size": 32,
        "epochs": 10,
        "freeze_stages": 3,
        "balance": "loss",
        "lr": 6e-4,
        "weight_decay": 1e-2,
        "optimizer": "adamw",
        "schedule": "onecycle",
        "warmup_fraction": 0.15,
        "drop_rate": 0.2,
        "early_stopping_patience": 100,
        "augmentation": {
            "rotation_degrees": 10.0, "hflip_p": 0.5, "brightness": 0.15, "contrast": 0.15,
            "affine_scale": [0.9, 1.1], "affine_translate": 0.05, "affine_shear": 0.0, "blur_p": 0.0,
        },
    },
}


def arch_preset(arch: str) -> dict[str, Any]:
    """Preset settings for ``arch`` (exact name first, then name prefix)."""
    if arch in ARCH_PRESETS:
        return dict(ARCH_PRESETS[arch])
    for prefix, preset in PREFIX_PRESETS.items():
        if arch.startswith(prefix):
            return dict(preset)
    return {}


class ConfigFileError(ValueError):
    """A config file that cannot be read or names unknown settings."""


@dataclass
class TrainConfig:
    """Every knob of a training run; the defaults reproduce the original project's recipe."""

    arch: str = "tf_efficientnetv2_s.in21k_ft_in1k"
    recipe: str | None = None  # the named recipe these settings started from, if any
    pretrained: str = "none"  # "none", "package", "hub", or a path to a .safetensors/.pth file
    image_size: int = 224
    interpolation: str = "bilinear"
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    batch_size: int = 32
    epochs: int = 30
    lr: float = 1e-4
    weight_decay: float = 1e-5
    drop_rate: float = 0.0
    freeze_stages: int = 0  # keep the stem and the first N stages at their pretrained weights (0: train all)
    optimizer: str = "adam"  # "adam" or "adamw"
    schedule: str = "plateau"  # "plateau" (ReduceLROnPlateau on val accuracy) or "onecycle"
    warmup_fraction: float = 0.15  # onecycle: share of the steps spent warming up
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # > 0: validate, keep and register an exponential moving average of the weights
    plateau_factor: float = 0.5
    plateau_patience: int = 3
    min_lr: float = 1e-7
    early_stopping_patience: int = 5
    seed: int = 42
    balance: str = "sampler"  # "sampler" (weighted sampler), "loss" (class weights) or "none"
    augmentation: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_AUGMENTATION))
    leakage: str = "drop"  # cross-split duplicates: "drop" from train/val, "refuse" to train, or "allow"
    threshold_target: str = "error"  # "error": certified error among unflagged <= target_error; "flag_rate"
    target_error: float = 0.05
    delta: float = 0.05  # the certificate holds with probability >= 1 - delta
    unfamiliar_quantile: float = 0.975  # the unfamiliar cut: this quantile of validation scores
    target_flag_rate: float = 0.1
    ece_bins: int = 15
    max_per_class: int | None = None  # subsample each split/class (quick runs); None: all
    num_workers: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for name, allowed in (("optimizer", ("adam", "adamw")), ("schedule", ("plateau", "onecycle")), ("leakage", ("drop", "refuse", "allow"))):
            if getattr(self, name) not in allowed:
                raise ConfigFileError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0.0 < self.delta < 1.0 or not 0.5 <= self.unfamiliar_quantile < 1.0:
            raise ConfigFileError("delta must be in (0, 1) and unfamiliar_quantile in [0.5, 1)")
        if self.balance not in ("sampler", "loss", "none"):
            raise ConfigFileError(f"balance must be sampler, loss or none, got {self.balance!r}")
        if self.threshold_target not in ("error", "flag_rate"):
            raise ConfigFileError(f"threshold_target must be error or flag_rate, got {self.threshold_target!r}")
        if self.freeze_stages < 0:
            raise ConfigFileError(f"freeze_stages must be >= 0, got {self.freeze_stages}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigFileError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.image_size < 16 or self.batch_size < 1 or self.epochs < 1:
            raise ConfigFileError("image_size >= 16, batch_size >= 1 and epochs >= 1 are required")
        if not 0.0 <= self.target_error < 1.0 or not 0.0 <= self.target_flag_rate <= 1.0:
            raise ConfigFileError("target_error must be in [0, 1) and target_flag_rate in [0, 1]")
        unknown = set(self.augmentation) - set(DEFAULT_AUGMENTATION)
        if unknown:
            raise ConfigFileError(f"unknown augmentation setting(s): {', '.join(sorted(unknown))}")
        self.augmentation = {**DEFAULT_AUGMENTATION, **self.augmentation}

    def preprocessing(self) -> Preprocessing:
        """The serving preprocessing that travels with the model version.

        Raises:
            core.preprocessing.PreprocessingError: an unknown interpolation, a mean or std per channel missing.
        """
        return Preprocessing.build([3, self.image_size, self.image_size], self.mean, self.std, self.interpolation)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for YAML/JSON and the registry."""
        return dataclasses.asdict(self)


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML mapping of overrides.

    Raises:
        ConfigFileError: when the file is not a YAML mapping or names unknown settings.
    """
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigFileError(f"cannot read config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path} must hold a mapping of settings")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(data) - known
    if unknown:
        raise ConfigFileError(f"config file {path}: unknown setting(s) {', '.join(sorted(unknown))}")
    return data


def resolve_config(
    arch: str | None = None,
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    recipe: str | None = None,
) -> TrainConfig:
    """Defaults < named recipe < preset for the architecture < config file < explicit overrides.

    Raises:
        ConfigFileError: on an unknown recipe or invalid settings.
    """
    file_values = read_config_file(config_file) if config_file else {}
    cli_values = {key: value for key, value in (overrides or {}).items() if value is not None}
    recipe = recipe or file_values.get("recipe")
    if recipe is not None and recipe not in RECIPES:
        raise ConfigFileError(f"unknown recipe {recipe!r}; known: {', '.join(sorted(RECIPES))}")
    recipe_values = dict(RECIPES[recipe]) if recipe else {}
    chosen_arch = cli_values.get("arch") or arch or file_values.get("arch") or recipe_values.get("arch") or TrainConfig.arch
    values: dict[str, Any] = {"recipe": recipe}
    values.update(recipe_values)
    values.update(arch_preset(chosen_arch))
    values.update(file_values)
    values.update(cli_values)
    values["arch"] = chosen_arch
    augmentation = {**recipe_values.get("augmentation", {})}
    if "augmentation" in file_values and isinstance(file_values["augmentation"], dict):
        augmentation.update(file_values["augmentation"])
    values["augmentation"] = {**DEFAULT_AUGMENTATION, **augmentation}
    try:
        return TrainConfig(**values)
    except TypeError as exc:
        raise ConfigFileError(f"invalid settings: {exc}") from None


def save_config(config: TrainConfig, path: Path) -> Path:
    """Write the resolved config as YAML (readable back with ``--config``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=True))
    return path

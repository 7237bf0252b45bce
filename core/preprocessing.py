"""A model version's preprocessing as one typed, torch-free value, validated when it is made.

The preprocessing travels with each model version (input size, mean, std, interpolation), so
serving never copies constants from training. The trainer makes it from its config, the registry
stores it (:meth:`Preprocessing.to_dict`, the JSON kept in ``model_versions.preprocessing``) and
reads it back (:meth:`Preprocessing.from_dict`), and :mod:`core.ml.transforms` turns it into
the torchvision transform. A value that cannot serve (an unknown interpolation, a mean per channel
missing) is refused here, at registration, not first inside the worker.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Resize interpolations a version may name: torchvision's ``InterpolationMode`` values (each has a
#: PIL filter). ``tests/core/test_preprocessing.py`` checks the two lists agree.
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
#: The keys of the stored JSON form.
KEYS = ("input_size", "mean", "std", "interpolation")


class PreprocessingError(ValueError):
    """A preprocessing that cannot serve; the message names the field."""


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input: squash-resize to ``input_size``, then normalise.

    Attributes:
        input_size: ``(channels, height, width)`` of the model input.
        mean: one normalisation mean per channel.
        std: one normalisation standard deviation per channel (all positive).
        interpolation: the resize filter, one of :data:`INTERPOLATIONS`.
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        size = self.input_size
        if not (isinstance(size, tuple) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)):
            raise PreprocessingError(f"preprocessing input_size must be [channels, height, width], got {list(size)!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != size[0] or not all(isinstance(v, float) and math.isfinite(v) for v in values):
                raise PreprocessingError(f"preprocessing {name} must have one value per channel, got {list(values)!r}")
        if not all(v > 0 for v in self.std):
            raise PreprocessingError(f"preprocessing std must be positive, got {list(self.std)!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise PreprocessingError(
                f"unknown preprocessing interpolation {self.interpolation!r}; use one of {', '.join(INTERPOLATIONS)}"
            )

    @classmethod
    def build(
        cls, input_size: Sequence[Any], mean: Sequence[Any], std: Sequence[Any], interpolation: str = "bilinear"
    ) -> "Preprocessing":
        """A preprocessing from loose numbers (lists, strings of digits), converted and then validated.

        Raises:
            PreprocessingError: when a value is not a number or the result cannot serve.
        """
        try:
            return cls(
                input_size=tuple(int(v) for v in input_size),  # type: ignore[arg-type]
                mean=tuple(float(v) for v in mean),
                std=tuple(float(v) for v in std),
                interpolation=str(interpolation),
            )
        except (TypeError, ValueError) as exc:
            if isinstance(exc, PreprocessingError):
                raise
            raise PreprocessingError(f"preprocessing values must be numbers: {exc}") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Preprocessing":
        """Read the stored JSON form (keys :data:`KEYS`; other keys are ignored).

        Raises:
            PreprocessingError: when a key is missing or a value cannot serve.
        """
        missing = [key for key in KEYS if key not in data]
        if missing:
            raise PreprocessingError(f"preprocessing config lacks {', '.join(missing)}")
        return cls.build(data["input_size"], data["mean"], data["std"], data["interpolation"])

    def to_dict(self) -> dict[str, Any]:
        """The stored JSON form: ``{"input_size": [c, h, w], "mean": [...], "std": [...], "interpolation": name}``."""
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @property
    def channels(self) -> int:
        """Channels of the model input."""
        return self.input_size[0]

    @property
    def height(self) -> int:
        """Height of the model input in pixels."""
        return self.input_size[1]

    @property
    def width(self) -> int:
        """Width of the model input in pixels."""
        return self.input_size[2]


def default_preprocessing(image_size: int = 224, interpolation: str = "bilinear") -> Preprocessing:
    """The original project's preprocessing: squash-resize to an RGB square, ImageNet mean/std."""
    return Preprocessing.build([3, image_size, image_size], IMAGENET_MEAN, IMAGENET_STD, interpolation)

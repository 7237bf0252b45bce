"""Image preprocessing built from a model version's own :class:`~core.preprocessing.Preprocessing`, shared by trainer and worker.

The preprocessing travels with each model version (input size, mean, std, interpolation), so
serving never copies constants from training; this module turns it into torchvision steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import pil_modes_mapping

from core.imaging import Resize
from core.preprocessing import Preprocessing

#: Training-time augmentation of the original fracture project; every key can be overridden.
DEFAULT_AUGMENTATION: dict[str, Any] = {
    "rotation_degrees": 25.0,
    "hflip_p": 0.5,
    "brightness": 0.2,
    "contrast": 0.2,
    "affine_scale": [0.9, 1.1],
    "affine_translate": 0.1,
    "affine_shear": 10.0,
    "blur_p": 0.1,
    "blur_kernel": 3,
}


def jpeg_draft_size(preprocessing: Preprocessing) -> tuple[int, int]:
    """Smallest size a JPEG may be decoded at (DCT-domain downscaling) before the model's resize.

    Twice the input size, so the final antialiased resize still does most of the reduction and the
    result stays close to a full decode; a 2000x2500 radiograph still decodes at 1/4 scale for 224.
    """
    return (2 * preprocessing.width, 2 * preprocessing.height)


@dataclass(frozen=True)
class DecodeOptions:
    """How the worker decodes an image for the model: a full RGB decode, or the fast JPEG path."""

    #: Smallest size a JPEG may be decoded at in the DCT domain (``None``: full size).
    draft_size: tuple[int, int] | None = None
    #: Decode JPEG luminance only (grey ``L`` picture), repeated into the model's channels.
    grey: bool = False
    #: Resize while decoding (``None``: the full picture). The transform's own resize of a picture
    #: already at its size is a copy, so the model input is the same.
    resize: Resize | None = None


def decode_options(preprocessing: Preprocessing, fast_jpeg_decode: bool) -> DecodeOptions:
    """The worker's decode for a version: full RGB, or (``TRIAGE_FAST_JPEG_DECODE``) draft + grey.

    Either way the picture is resized to the model's input while it is decoded
    (:func:`input_resize`), so a huge image is never converted at full size; the tensor is bit for
    bit what the version's transform makes of the full picture.

    The fast path decodes JPEGs at no less than :func:`jpeg_draft_size` and as luminance only; for
    a radiograph (grey content) at up to twice the input size that is exactly the full decode, and
    for a large one labels agree with it on >= 99.5 % of xrays/test (bench/README.md).
    """
    if not fast_jpeg_decode:
        return DecodeOptions(resize=input_resize(preprocessing))
    return DecodeOptions(draft_size=jpeg_draft_size(preprocessing), grey=True, resize=input_resize(preprocessing))


def input_resize(preprocessing: Preprocessing) -> Resize:
    """The first step of :func:`build_transform` (resize to the input size) as a decoder's :class:`Resize`."""
    return Resize((preprocessing.width, preprocessing.height), pil_modes_mapping[interpolation_mode(preprocessing)])


class RepeatGreyChannel:
    """Tensor step: a one-channel (grey) image becomes ``channels`` identical channels.

    A grey picture resized and then repeated equals the RGB picture with R = G = B resized: the
    resize treats each channel alike, so the fast grey path feeds the model the same numbers for
    a radiograph at a third of the resize work.
    """

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[1, H, W]`` -> ``[channels, H, W]``; anything else passes unchanged."""
        if tensor.shape[0] == 1 and self.channels != 1:
            return tensor.repeat(self.channels, 1, 1)
        return tensor

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channels={self.channels})"


def interpolation_mode(preprocessing: Preprocessing) -> InterpolationMode:
    """The resize interpolation a version's preprocessing names, as torchvision's mode (validated names only)."""
    return InterpolationMode(preprocessing.interpolation)


def build_transform(
    preprocessing: Preprocessing, training: bool = False, augmentation: dict[str, Any] | None = None
) -> T.Compose:
    """PIL RGB (or grey ``L``) image -> normalised float tensor ``[C, H, W]``.

    Args:
        preprocessing: a model version's preprocessing (input size, mean, std, interpolation).
        training: add the on-the-fly augmentation (never for validation, test or serving).
        augmentation: overrides of :data:`DEFAULT_AUGMENTATION` when ``training``.
    """
    steps: list[Any] = [
        T.Resize((preprocessing.height, preprocessing.width), interpolation=interpolation_mode(preprocessing), antialias=True)
    ]
    if training:
        aug = {**DEFAULT_AUGMENTATION, **(augmentation or {})}
        steps += [
            T.RandomRotation(aug["rotation_degrees"]),
            T.RandomHorizontalFlip(aug["hflip_p"]),
            T.ColorJitter(brightness=aug["brightness"], contrast=aug["contrast"]),
            T.RandomAffine(
                degrees=0,
                translate=(aug["affine_translate"], aug["affine_translate"]),
                scale=tuple(aug["affine_scale"]),
                shear=aug["affine_shear"],
            ),
            T.RandomApply([T.GaussianBlur(aug["blur_kernel"])], p=aug["blur_p"]),
        ]
    steps += [
        T.ToTensor(), RepeatGreyChannel(preprocessing.channels), T.Normalize(list(preprocessing.mean), list(preprocessing.std))
    ]
    return T.Compose(steps)


def preprocess_batch(images: list[Image.Image], transform: T.Compose) -> torch.Tensor:
    """Stack transformed images into one batch tensor ``[N, C, H, W]``."""
    return torch.stack([transform(image) for image in images])

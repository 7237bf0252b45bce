"""The "unfamiliar image" score: how far an image's features lie from the training radiographs.

A model is most confidently wrong on images unlike anything it was trained on (a photograph, a
chest film for a wrist model, a blank frame), so the top probability alone cannot flag them. At
training time the penultimate features of the training split are summarised by class-conditional
means and one shared covariance (Ledoit–Wolf shrinkage); an image's score is its smallest squared
Mahalanobis distance to a class mean (Lee et al. 2018; FRODO, Çallı et al. 2019). The cut is a high
quantile of the validation images' scores, so about ``1 - quantile`` of in-distribution images
are flagged. The score comes from the same forward pass as the logits: every runtime returns both.

The reference is stored with the model version as safetensors, by sha256, like the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from sklearn.covariance import LedoitWolf

FORMAT = "mahalanobis-shared-covariance-v1"


class ReferenceError(ValueError):
    """A reference file that cannot be read or does not fit the model's features."""


@dataclass(frozen=True)
class UnfamiliarReference:
    """Class means ``[C, D]``, shared precision ``[D, D]``, and the cut above which images are unfamiliar."""

    means: np.ndarray
    precision: np.ndarray
    cut: float
    quantile: float
    #: Input checks fitted on the training images (None: not fitted, e.g. an older reference):
    #: the most colour a training image showed (with a margin), and the least detail (halved).
    colour_max: float | None = None
    detail_min: float | None = None

    @property
    def feature_dim(self) -> int:
        """Length of the feature vector the reference expects."""
        return int(self.means.shape[1])

    def scores(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Smallest squared Mahalanobis distance of each row of ``features`` ``[N, D]`` to a class mean.

        Raises:
            ReferenceError: when the feature length differs from the reference's.
        """
        x = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        x = x.astype(np.float64, copy=False).reshape(len(x), -1)
        if x.shape[1] != self.feature_dim:
            raise ReferenceError(f"features have {x.shape[1]} values; the reference expects {self.feature_dim}")
        projected = x @ self.precision  # [N, D]
        own = np.einsum("nd,nd->n", projected, x)  # x' P x
        cross = projected @ self.means.T  # x' P mu_c
        centre = np.einsum("cd,cd->c", self.means @ self.precision, self.means)  # mu_c' P mu_c
        distances = own[:, None] - 2.0 * cross + centre[None, :]
        return np.maximum(distances.min(axis=1), 0.0)

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
        """Write the reference as safetensors (float64 arrays; the cut and quantile as scalars)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "means": np.ascontiguousarray(self.means, dtype=np.float64),
                "precision": np.ascontiguousarray(self.precision, dtype=np.float64),
                "cut": np.array([self.cut], dtype=np.float64),
                "quantile": np.array([self.quantile], dtype=np.float64),
                **({} if self.colour_max is None or self.detail_min is None else {
                    "colour_max": np.array([self.colour_max], dtype=np.float64),
                    "detail_min": np.array([self.detail_min], dtype=np.float64),
                }),
            },
            str(path),
            metadata={"format": FORMAT},
        )
        return path

    @classmethod
    def load(cls, path: Path) -> "UnfamiliarReference":
        """Read a reference written by :meth:`save`.

        Raises:
            ReferenceError: when the file is unreadable or not such a reference.
        """
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise ReferenceError(f"cannot read unfamiliar-image reference {Path(path).name}: {exc}") from None
        missing = {"means", "precision", "cut", "quantile"} - set(tensors)
        if missing:
            raise ReferenceError(f"{Path(path).name} is not an unfamiliar-image reference (lacks {', '.join(sorted(missing))})")
        means, precision = tensors["means"], tensors["precision"]
        if means.ndim != 2 or precision.shape != (means.shape[1], means.shape[1]):
            raise ReferenceError(f"{Path(path).name}: means {means.shape} and precision {precision.shape} do not fit")
        inputs = {key: float(tensors[key][0]) for key in ("colour_max", "detail_min") if key in tensors}
        return cls(means, precision, float(tensors["cut"][0]), float(tensors["quantile"][0]), **inputs)


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


def fit_reference(
    train_features: np.ndarray,
    train_targets: np.ndarray,
    val_features: np.ndarray,
    quantile: float = 0.975,
    train_inputs: torch.Tensor | None = None,
) -> UnfamiliarReference:
    """Fit class means and a shrunk shared covariance on training features; cut at a validation quantile.

    Args:
        train_features: ``[N, D]`` penultimate features of the training split (no augmentation).
        train_targets: ``[N]`` class indices.
        val_features: ``[M, D]`` features of validation images, which set the cut.
        quantile: share of validation images left unflagged by the cut.
        train_inputs: the preprocessed training images, for the input checks (colour, detail).

    Raises:
        ReferenceError: with fewer than two training images of a present class or no validation images.
    """
    x = np.asarray(train_features, dtype=np.float64)
    y = np.asarray(train_targets)
    classes = sorted(set(int(c) for c in y))
    if len(x) < 2 or not classes or len(val_features) == 0:
        raise ReferenceError("fitting an unfamiliar-image reference needs training and validation features")
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    precision = LedoitWolf(assume_centered=True).fit(centred).get_precision()
    provisional = UnfamiliarReference(means, precision, cut=float("inf"), quantile=quantile)
    val_scores = provisional.scores(val_features)
    cut = float(np.quantile(val_scores, quantile))
    colour_max = detail_min = None
    if train_inputs is not None and len(train_inputs):
        colour, detail = input_statistics(train_inputs)
        colour_max = float(colour.max()) + COLOUR_MARGIN
        detail_min = float(np.quantile(detail, 0.001)) / 2
    return UnfamiliarReference(means, precision, cut=cut, quantile=quantile, colour_max=colour_max, detail_min=detail_min)

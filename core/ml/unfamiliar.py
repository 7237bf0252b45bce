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

    def is_unfamiliar(self, scores: np.ndarray) -> np.ndarray:
        """Boolean mask: scores beyond the cut."""
        return np.asarray(scores) > self.cut

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
        return cls(means, precision, float(tensors["cut"][0]), float(tensors["quantile"][0]))


def fit_reference(
    train_features: np.ndarray, train_targets: np.ndarray, val_features: np.ndarray, quantile: float = 0.975
) -> UnfamiliarReference:
    """Fit class means and a shrunk shared covariance on training features; cut at a validation quantile.

    Args:
        train_features: ``[N, D]`` penultimate features of the training split (no augmentation).
        train_targets: ``[N]`` class indices.
        val_features: ``[M, D]`` features of validation images, which set the cut.
        quantile: share of validation images left unflagged by the cut.

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
    return UnfamiliarReference(means, precision, cut=cut, quantile=quantile)

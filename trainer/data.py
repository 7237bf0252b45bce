"""Folder data sets ``DIR/{train,val,test}/<class>/*`` and class balancing in the loader.

Labels are the class folder names of the train split in sorted order. Images are decoded with
:func:`core.imaging.decode_image` (the worker's decoder). Validation and test images go through the
very transform the worker applies (``build_transform(preprocessing, training=False)``) and are never
augmented; training images get the on-the-fly augmentation only.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, WeightedRandomSampler

from core.imaging import ImageDecodeError, decode_image, is_dicom
from core.ml.transforms import build_transform
from core.preprocessing import Preprocessing
from core.storage import sha256_file

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".dcm", ".dicom", ".bmp", ".tif", ".tiff", ".webp"}
SPLITS = ("train", "val", "test")
DEFAULT_MAX_PIXELS = 60_000_000


class DataError(ValueError):
    """A data folder that does not have the expected layout; the message says what is wrong."""


@dataclass(frozen=True)
class Sample:
    """One image file and its class index."""

    path: Path
    label: int


def _looks_like_image(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    # PACS exports often name files IM000001 or 1.2.840…: recognise DICOM by its preamble.
    with open(path, "rb") as handle:
        return is_dicom(handle.read(132))


def image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (by suffix, or DICOM by content), sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and _looks_like_image(p))


def class_names(data_dir: Path, split: str = "train") -> list[str]:
    """Sorted class folder names of ``data_dir/split``.

    Raises:
        DataError: when the split folder is missing or has fewer than two classes.
    """
    folder = Path(data_dir) / split
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist: expected DIR/{{train,val,test}}/<class>/*.jpg|png|dcm")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(names) < 2:
        raise DataError(f"{folder} must hold at least two class folders, found {names}")
    return names


def list_samples(
    data_dir: Path, split: str, labels: list[str], max_per_class: int | None = None, seed: int = 0
) -> list[Sample]:
    """The samples of one split; with ``max_per_class``, a deterministic random subset per class.

    Raises:
        DataError: when the split has a class folder that is not among ``labels``.
    """
    folder = Path(data_dir) / split
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist")
    present = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = set(present) - set(labels)
    if unknown:
        raise DataError(f"{folder} has class folder(s) {sorted(unknown)} not among the labels {labels}")
    samples: list[Sample] = []
    for index, label in enumerate(labels):
        class_dir = folder / label
        files = image_files(class_dir) if class_dir.is_dir() else []
        if max_per_class is not None and len(files) > max_per_class:
            rng = np.random.default_rng([seed, index, len(files)])
            chosen = sorted(rng.choice(len(files), size=max_per_class, replace=False))
            files = [files[i] for i in chosen]
        samples.extend(Sample(path, index) for path in files)
    return samples


def class_counts(samples: list[Sample], num_classes: int) -> list[int]:
    """Number of samples per class index."""
    counts = Counter(sample.label for sample in samples)
    return [counts.get(index, 0) for index in range(num_classes)]


def class_weights(samples: list[Sample], num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights (mean 1 over present classes) for a weighted loss."""
    counts = torch.tensor(class_counts(samples, num_classes), dtype=torch.float64)
    weights = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights.float()


def weighted_sampler(samples: list[Sample], num_classes: int, generator: torch.Generator) -> WeightedRandomSampler:
    """A sampler drawing every class equally often (with replacement), one epoch = len(samples)."""
    counts = class_counts(samples, num_classes)
    per_sample = torch.tensor([1.0 / counts[s.label] for s in samples], dtype=torch.double)
    return WeightedRandomSampler(per_sample, num_samples=len(samples), replacement=True, generator=generator)


def decode_file(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image file exactly as the worker decodes an upload (``core.imaging.decode_image``)."""
    return decode_image(Path(path).read_bytes(), max_pixels, draft_size=draft_size)


class TrainingDataset(Dataset[tuple[torch.Tensor, int]]):
    """Training images with on-the-fly augmentation.

    Decoded images are kept in memory, reduced to at most ``cache_scale`` times the input size
    (the transform resizes them to the input size anyway), so each file is decoded once per run.
    """

    def __init__(
        self,
        samples: list[Sample],
        preprocessing: Preprocessing,
        augmentation: dict[str, Any] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        cache_scale: float = 2.0,
        augment: bool = True,
    ) -> None:
        self.samples = samples
        self.transform = build_transform(preprocessing, training=augment, augmentation=augmentation)
        side = int(max(preprocessing.height, preprocessing.width) * cache_scale)
        self._cache_side = side
        self._max_pixels = max_pixels
        self._cache: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> Image.Image:
        """The decoded (and reduced) image of sample ``index``."""
        cached = self._cache.get(index)
        if cached is None:
            cached = decode_file(self.samples[index].path, self._max_pixels, draft_size=(self._cache_side, self._cache_side))
            if max(cached.size) > self._cache_side:
                cached = cached.copy()
                cached.thumbnail((self._cache_side, self._cache_side), Image.BILINEAR)
            self._cache[index] = cached
        return cached

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.image(index)), self.samples[index].label


def readable_samples(samples: list[Sample], max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """Split samples into readable ones and ``(path, reason)`` for files that cannot be decoded."""
    good: list[Sample] = []
    bad: list[tuple[Path, str]] = []
    for sample in samples:
        try:
            decode_file(sample.path, max_pixels, draft_size=(64, 64))
        except (ImageDecodeError, OSError) as exc:
            bad.append((sample.path, str(exc)))
        else:
            good.append(sample)
    return good, bad


def eval_tensors(
    samples: list[Sample], preprocessing: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 2
) -> tuple[torch.Tensor, torch.Tensor, list[Sample]]:
    """Decode and preprocess evaluation images exactly as the worker does; never augmented.

    Returns:
        ``(images [N, C, H, W], targets [N], kept samples)``; unreadable files are left out with a
        warning (the data-set check reports them).
    """
    transform = build_transform(preprocessing, training=False)

    def load(sample: Sample) -> torch.Tensor | None:
        try:
            return transform(decode_file(sample.path, max_pixels))
        except (ImageDecodeError, OSError) as exc:
            log.warning("skipping unreadable %s: %s", sample.path, exc)
            return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        tensors = list(pool.map(load, samples))
    kept = [(t, s) for t, s in zip(tensors, samples) if t is not None]
    if not kept:
        return torch.zeros((0, *preprocessing.input_size)), torch.zeros(0, dtype=torch.long), []
    images = torch.stack([t for t, _ in kept])
    targets = torch.tensor([s.label for _, s in kept], dtype=torch.long)
    return images, targets, [s for _, s in kept]


def dataset_fingerprint(data_dir: Path, samples_by_split: dict[str, list[Sample]]) -> str:
    """sha256 over (split, class index, relative path, file sha256) of every sample used."""
    digest = hashlib.sha256()
    for split in sorted(samples_by_split):
        for sample in sorted(samples_by_split[split], key=lambda s: str(s.path)):
            relative = sample.path.relative_to(data_dir) if sample.path.is_relative_to(data_dir) else sample.path
            digest.update(f"{split}\0{sample.label}\0{relative.as_posix()}\0{sha256_file(sample.path)}\n".encode())
    return digest.hexdigest()

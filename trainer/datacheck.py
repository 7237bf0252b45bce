"""Data-set check before training: counts, unreadable files, duplicates, leakage, label conflicts.

* exact duplicates (same sha256 of the file bytes) within and across splits;
* near duplicates across splits: a DCT perceptual hash of a 32x32 grey thumbnail, compared with both
  the other image and its mirror, so it survives the training augmentations that matter here
  (horizontal flip, small rotations, brightness/contrast changes, re-encoding);
* identical (or near-identical) images carrying different labels.

Cross-split duplicates mean the test split does not measure generalisation (the original project's
99.58% was measured on augmented copies of training images); training refuses them unless told.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.fft import dctn

from core.imaging import ImageDecodeError, decode_image
from trainer.data import DEFAULT_MAX_PIXELS, SPLITS, image_files

log = logging.getLogger(__name__)

#: Hamming distance (of 63 bits) at or below which two images are near-duplicate candidates.
NEAR_DUPLICATE_BITS = 8
#: Candidates are confirmed when their brightness/contrast-normalised 48x48 thumbnails (or one and
#: the other's mirror) correlate at least this much. Measured on ../shared/data/xrays: different
#: originals reached at most 0.957; on the synthetic set (all bones look alike) at most 0.967.
NEAR_DUPLICATE_CORRELATION = 0.97
THUMB = 48


class LeakageError(RuntimeError):
    """The same (or nearly the same) image is in more than one split."""


def _bits(grey32: np.ndarray) -> np.ndarray:
    coefficients = dctn(grey32, norm="ortho")[:8, :8].flatten()[1:]  # drop the DC term (brightness)
    return coefficients > np.median(coefficients)


def perceptual_hashes(image: Image.Image) -> tuple[int, int]:
    """``(hash, hash of the mirror image)`` as 63-bit integers (DCT hash of a 32x32 grey thumbnail)."""
    grey = np.asarray(image.convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float64)
    packed = [int("".join("1" if b else "0" for b in _bits(array)), 2) for array in (grey, grey[:, ::-1])]
    return packed[0], packed[1]


def normalised_thumbnail(image: Image.Image) -> np.ndarray:
    """A 48x48 grey thumbnail with zero mean and unit variance (brightness/contrast removed)."""
    grey = np.asarray(image.convert("L").resize((THUMB, THUMB), Image.BILINEAR), dtype=np.float32)
    return (grey - grey.mean()) / (grey.std() + 1e-6)


def hamming(a: int, b: int) -> int:
    """Number of differing bits."""
    return (a ^ b).bit_count()


@dataclass
class FileInfo:
    """One image file of the data set."""

    path: Path
    split: str
    label: str
    sha256: str
    phash: int | None = None
    phash_mirror: int | None = None
    thumb: np.ndarray | None = field(default=None, repr=False)
    error: str | None = None


@dataclass
class DataCheckReport:
    """Findings of :func:`check_dataset`; paths are relative to the data folder."""

    root: Path
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    exact_duplicates: list[dict[str, Any]] = field(default_factory=list)
    near_duplicates: list[dict[str, Any]] = field(default_factory=list)
    label_conflicts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cross_split_exact(self) -> list[dict[str, Any]]:
        """Exact duplicate groups that span more than one split."""
        return [group for group in self.exact_duplicates if len(set(group["splits"])) > 1]

    @property
    def has_leakage(self) -> bool:
        """Whether any image (exactly or nearly) appears in more than one split."""
        return bool(self.cross_split_exact or self.near_duplicates)

    def files_to_drop(self) -> dict[str, set[str]]:
        """Files (relative paths, per split) to leave out so that no split leaks into a later one.

        Of each cross-split exact group or near-duplicate pair, the copies in the earlier split are
        dropped (train before val before test: the test split stays whole, so its figures stay
        comparable); identical images carrying different labels are dropped from train and val.
        """
        rank = {split: index for index, split in enumerate(SPLITS)}
        drop: dict[str, set[str]] = {split: set() for split in SPLITS}

        def split_of(path: str) -> str:
            return path.split("/", 1)[0]

        for group in self.cross_split_exact:
            keep = max(group["splits"], key=lambda split: rank.get(split, -1))
            for path, split in zip(group["files"], group["splits"]):
                if split != keep and split in drop:
                    drop[split].add(path)
        for pair in self.near_duplicates:
            a, b = pair["a"], pair["b"]
            earlier = a if rank.get(split_of(a), -1) < rank.get(split_of(b), -1) else b
            if split_of(earlier) in drop:
                drop[split_of(earlier)].add(earlier)
        for conflict in self.label_conflicts:
            for path in conflict["files"]:
                if split_of(path) in ("train", "val"):
                    drop[split_of(path)].add(path)
        return {split: files for split, files in drop.items() if files}

    def leakage_summary(self) -> str:
        """One phrase: how many cross-split groups of each kind."""
        return f"{len(self.cross_split_exact)} exact duplicate group(s) and {len(self.near_duplicates)} near-duplicate pair(s) across splits"

    def summary(self) -> dict[str, Any]:
        """Counts of each finding (stored with the model version)."""
        return {
            "counts": self.counts,
            "unreadable": len(self.unreadable),
            "exact_duplicate_groups": len(self.exact_duplicates),
            "cross_split_exact_groups": len(self.cross_split_exact),
            "near_duplicate_pairs_across_splits": len(self.near_duplicates),
            "label_conflicts": len(self.label_conflicts),
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, as plain data for JSON."""
        return {
            "root": str(self.root),
            "summary": self.summary(),
            "unreadable": [{"file": f, "reason": r} for f, r in self.unreadable],
            "exact_duplicates": self.exact_duplicates,
            "near_duplicates_across_splits": self.near_duplicates,
            "label_conflicts": self.label_conflicts,
        }

    def summary_lines(self) -> list[str]:
        """Human-readable report lines."""
        lines = []
        for split, per_class in self.counts.items():
            lines.append(f"{split}: " + ", ".join(f"{label}={n}" for label, n in per_class.items()) + f" (total {sum(per_class.values())})")
        lines.append(f"unreadable files: {len(self.unreadable)}")
        lines += [f"  {f}: {r}" for f, r in self.unreadable[:20]]
        lines.append(f"exact duplicate groups: {len(self.exact_duplicates)} ({len(self.cross_split_exact)} across splits)")
        lines += [f"  {', '.join(g['files'])}" for g in self.exact_duplicates[:20]]
        lines.append(f"near duplicates across splits: {len(self.near_duplicates)}")
        lines += [f"  {p['a']} ~ {p['b']} (hash distance {p['distance']}, correlation {p['correlation']})" for p in self.near_duplicates[:20]]
        lines.append(f"identical images with different labels: {len(self.label_conflicts)}")
        lines += [f"  {', '.join(c['files'])} ({c['kind']}: labels {', '.join(c['labels'])})" for c in self.label_conflicts[:20]]
        lines.append("LEAKAGE: " + self.leakage_summary() if self.has_leakage else "no cross-split leakage found")
        return lines


def discover(root: Path) -> list[tuple[str, str, Path]]:
    """``(split, label, path)`` of every image under ``root``.

    ``root`` is either a data set (``root/{train,val,test}/<class>/*``) or one split
    (``root/<class>/*``), whose split is then named after the folder.
    """
    root = Path(root)
    splits = [s for s in SPLITS if (root / s).is_dir()]
    if splits:
        split_dirs = [(s, root / s) for s in splits]
    else:
        split_dirs = [(root.name, root)]
    found = []
    for split, folder in split_dirs:
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found.extend((split, class_dir.name, path) for path in image_files(class_dir))
    return found


def _inspect(split: str, label: str, path: Path, max_pixels: int) -> FileInfo:
    data = path.read_bytes()
    info = FileInfo(path, split, label, hashlib.sha256(data).hexdigest())
    try:
        image = decode_image(data, max_pixels, draft_size=(64, 64))
    except ImageDecodeError as exc:
        info.error = str(exc)
        return info
    info.phash, info.phash_mirror = perceptual_hashes(image)
    info.thumb = normalised_thumbnail(image)
    return info


def similarity(a: FileInfo, b: FileInfo) -> float:
    """Correlation of two normalised thumbnails, the better of direct and mirrored."""
    assert a.thumb is not None and b.thumb is not None
    direct = float((a.thumb * b.thumb).mean())
    mirrored = float((a.thumb[:, ::-1] * b.thumb).mean())
    return max(direct, mirrored)


def check_dataset(
    root: Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    near_bits: int = NEAR_DUPLICATE_BITS,
    min_correlation: float = NEAR_DUPLICATE_CORRELATION,
    workers: int = 2,
) -> DataCheckReport:
    """Check every image under ``root`` and return the findings (nothing is changed on disk).

    Near duplicates: perceptual-hash distance at most ``near_bits`` (mirror-aware), confirmed by a
    thumbnail correlation of at least ``min_correlation``.
    """
    root = Path(root).resolve()
    entries = discover(root)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        infos = list(pool.map(lambda e: _inspect(e[0], e[1], e[2], max_pixels), entries))
    rel = lambda p: p.relative_to(root).as_posix()  # noqa: E731
    report = DataCheckReport(root=root)
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for info in infos:
        counts[info.split][info.label] += 1
    report.counts = {split: dict(sorted(c.items())) for split, c in counts.items()}
    report.unreadable = [(rel(i.path), i.error or "") for i in infos if i.error]

    by_sha: dict[str, list[FileInfo]] = defaultdict(list)
    for info in infos:
        by_sha[info.sha256].append(info)
    for digest, group in sorted(by_sha.items(), key=lambda kv: rel(kv[1][0].path)):
        if len(group) > 1:
            report.exact_duplicates.append(
                {"sha256": digest, "files": [rel(i.path) for i in group], "splits": [i.split for i in group], "labels": [i.label for i in group]}
            )
            if len({i.label for i in group}) > 1:
                report.label_conflicts.append({"kind": "exact", "files": [rel(i.path) for i in group], "labels": sorted({i.label for i in group})})

    # near duplicates: one representative per exact group; compare every pair (vectorised)
    reps = [group[0] for group in by_sha.values() if group[0].phash is not None]
    if len(reps) > 1:
        hashes = np.array([r.phash for r in reps], dtype=np.uint64)
        mirrors = np.array([r.phash_mirror for r in reps], dtype=np.uint64)
        splits = np.array([r.split for r in reps])
        labels = np.array([r.label for r in reps])
        for i in range(len(reps) - 1):
            rest = slice(i + 1, None)
            direct = _popcount(hashes[rest] ^ hashes[i])
            mirrored = _popcount(hashes[rest] ^ mirrors[i])
            distance = np.minimum(direct, mirrored)
            for offset in np.nonzero(distance <= near_bits)[0]:
                j = i + 1 + int(offset)
                correlation = similarity(reps[i], reps[j])
                if correlation < min_correlation:
                    continue
                pair = {"a": rel(reps[i].path), "b": rel(reps[j].path), "distance": int(distance[offset]), "correlation": round(correlation, 4)}
                if splits[i] != splits[j]:
                    report.near_duplicates.append(pair)
                if labels[i] != labels[j] and correlation >= 0.995:
                    report.label_conflicts.append({"kind": "near-identical", "files": [pair["a"], pair["b"]], "labels": sorted({str(labels[i]), str(labels[j])})})
    return report


_POPCOUNT8 = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)


def _popcount(values: np.ndarray) -> np.ndarray:
    """Bit count of each uint64."""
    return _POPCOUNT8[values.view(np.uint8).reshape(-1, 8)].sum(axis=1)

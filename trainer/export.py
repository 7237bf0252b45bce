"""Export the portal's reviewed images as a data-set folder ``DIR/<label>/...``.

The latest review of each image counts. Bytes come from the content-addressed image store; file
names are ``<image id>_<sha256 prefix>.<ext>`` (never the uploader's file name), and a
``reviews.csv`` manifest records where each file came from.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

from sqlalchemy import select

from core.config import Settings
from core.db import Database
from core.imaging import ImageDecodeError, inspect_image, is_dicom
from core.models import Image, Review
from core.storage import image_store

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_label(label: str) -> str:
    """A label usable as one folder name (no separators, no dot-only names)."""
    cleaned = _SAFE.sub("_", label).strip("._")
    if not cleaned:
        raise ValueError(f"label {label!r} cannot be a folder name")
    return cleaned


def export_reviews(db: Database, settings: Settings, out: Path) -> dict[str, int]:
    """Write every reviewed image under ``out/<label>/``; returns counts per label.

    Images whose stored bytes are missing are skipped with a warning.
    """
    out = Path(out)
    store = image_store(settings)
    counts: dict[str, int] = {}
    with db.transaction() as session:
        latest: dict[int, Review] = {}
        for review in session.scalars(select(Review).order_by(Review.image_id, Review.created_at, Review.id)):
            latest[review.image_id] = review
        rows = []
        for image_id, review in sorted(latest.items()):
            image = session.get(Image, image_id)
            if image is None or image.storage_key is None:
                continue
            try:
                data = store.read(image.storage_key)
            except FileNotFoundError:
                log.warning("image #%d: stored bytes missing, not exported", image_id)
                continue
            if is_dicom(data):
                suffix = "dcm"
            else:
                try:
                    suffix = {"jpeg": "jpg"}.get(fmt := inspect_image(data, settings.max_image_pixels).format, fmt)
                except ImageDecodeError as exc:
                    log.warning("image #%d is not a usable image (%s), not exported", image_id, exc)
                    continue
            label = safe_label(review.label)
            folder = out / label
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{image.id}_{(image.sha256 or 'unknown')[:12]}.{suffix}"
            target.write_bytes(data)
            counts[label] = counts.get(label, 0) + 1
            rows.append([target.relative_to(out).as_posix(), image.id, image.study_id, review.label, review.reviewer_name, review.created_at.isoformat(), image.filename])
    if rows:
        with open(out / "reviews.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "image_id", "study_id", "label", "reviewer", "reviewed_at", "original_filename"])
            writer.writerows(rows)
    log.info("exported %d reviewed images to %s", sum(counts.values()), out)
    return counts

"""Classify one chunk of a study's images: the worker's whole job, as a plain function.

decode (threads, one batch ahead) -> preprocess -> batched forward -> write predictions.
A file that cannot be decoded fails alone; its batch and study go on.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from PIL import Image as PILImage

from core.config import Settings
from core.db import Database
from core.imaging import ImageDecodeError, decode_image
from core.ml.predict import Predictor
from core.models import Image, Study
from core.registry import ModelSpec, weights_path
from core.storage import ContentStore
from core.studies import claim_images, fail_image, finish_study_if_complete, image_store, save_predictions

log = logging.getLogger(__name__)


@dataclass
class ChunkReport:
    """What one chunk did: counts for logs and tests."""

    study_id: int
    predicted: int = 0
    failed: int = 0
    skipped: int = 0
    study_done: bool = False


class PredictorCache:
    """Loaded predictors of this process, keyed by (version id, weights sha256); bounded LRU."""

    def __init__(self, settings: Settings, capacity: int = 2) -> None:
        self.settings = settings
        self.capacity = capacity
        self._items: OrderedDict[tuple[int, str], Predictor] = OrderedDict()

    def get(self, spec: ModelSpec) -> Predictor:
        """The predictor for ``spec``, loading it on first use in this process."""
        key = spec.cache_key
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        predictor = Predictor(
            spec,
            weights_path(self.settings, spec.weights_sha256),
            device=self.settings.device,
            batch_size=self.settings.batch_size,
        )
        self._items[key] = predictor
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return predictor


DecodeOutcome = PILImage.Image | ImageDecodeError


def _decode_one(store: ContentStore, key: str | None, max_pixels: int) -> DecodeOutcome:
    if key is None:
        return ImageDecodeError("no stored bytes for this image")
    try:
        data = store.read(key)
    except FileNotFoundError:
        return ImageDecodeError("stored image file is missing from the image store")
    try:
        return decode_image(data, max_pixels)
    except ImageDecodeError as exc:
        return exc


def decoded_batches(
    images: Sequence[Image], store: ContentStore, batch_size: int, max_pixels: int, workers: int
) -> Iterator[list[tuple[Image, DecodeOutcome]]]:
    """Yield batches of (image row, decoded picture or error), decoding the next batch ahead."""
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:

        def submit(batch: Sequence[Image]) -> list[tuple[Image, Future[DecodeOutcome]]]:
            return [(row, pool.submit(_decode_one, store, row.storage_key, max_pixels)) for row in batch]

        pending = submit(batches[0]) if batches else []
        for index in range(len(batches)):
            following = submit(batches[index + 1]) if index + 1 < len(batches) else []
            yield [(row, future.result()) for row, future in pending]
            pending = following


def classify_chunk(db: Database, settings: Settings, cache: PredictorCache, study_id: int, image_ids: Sequence[int]) -> ChunkReport:
    """Classify the unfinished images of one chunk with the study's model version.

    Idempotent: images already done or failed are skipped, and a prediction for an (image,
    version) pair is written at most once, so a redelivered task changes nothing.
    """
    report = ChunkReport(study_id=study_id)
    with db.transaction() as session:
        study = session.get(Study, study_id)
        if study is None:
            log.warning("study %s no longer exists; dropping chunk of %d images", study_id, len(image_ids))
            return report
        chunk = claim_images(session, study_id, image_ids, settings.max_image_attempts)
        spec = ModelSpec.from_version(study.model_version)
        report.failed += len(chunk.gave_up)
        report.skipped = len(image_ids) - len(chunk.images) - len(chunk.gave_up)
        work = [(image.id, image.storage_key) for image in chunk.images]
    if work:
        predictor = cache.get(spec)
        store = image_store(settings)
        decode_workers = max(1, min(8, os.cpu_count() or 1))
        with db.transaction() as session:
            rows = [session.get(Image, image_id) for image_id, _ in work]
            for batch in decoded_batches(rows, store, settings.batch_size, settings.max_image_pixels, decode_workers):
                good = [(row, picture) for row, picture in batch if not isinstance(picture, ImageDecodeError)]
                for row, picture in batch:
                    if isinstance(picture, ImageDecodeError):
                        fail_image(row, str(picture))
                        report.failed += 1
                results = predictor.predict_images([picture for _, picture in good]) if good else []
                save_predictions(session, spec.version_id, [(row, result) for (row, _), result in zip(good, results)])
                report.predicted += len(results)
                session.commit()
    with db.transaction() as session:
        report.study_done = finish_study_if_complete(session, study_id)
    return report

"""Classify one chunk of a study's images: the worker's whole job, as a plain function.

decode (threads, one batch ahead) -> preprocess -> batched forward -> write predictions.
A file that cannot be decoded fails alone; its batch and study go on.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image as PILImage

from core.audit_sampling import audit_ids
from core.config import Settings
from core.db import Database
from core.imaging import ImageDecodeError, decode_image
from core.ml.heatmap import store_heatmaps
from core.ml.predict import Predictor, load_predictor
from core.ml.transforms import DecodeOptions, decode_options
from core.models import Study
from core.registry import ModelSpec
from core.storage import ContentStore
from core.studies import ClaimedImage, claim_images, fail_image, finish_study_if_complete, image_store, save_predictions

log = logging.getLogger(__name__)

#: Batches decoded ahead of the model.
LOOKAHEAD_BATCHES = 2


@dataclass
class ChunkReport:
    """What one chunk did, and where its time went (seconds), for logs, tests and benchmarks."""

    study_id: int
    predicted: int = 0
    failed: int = 0
    skipped: int = 0
    study_done: bool = False
    seconds: dict[str, float] = field(default_factory=lambda: {"load": 0.0, "decode_wait": 0.0, "model": 0.0, "database": 0.0, "heatmaps": 0.0})


class PredictorCache:
    """Loaded predictors of this process, keyed by (version id, weights sha256, runtime); bounded LRU."""

    def __init__(self, settings: Settings, capacity: int = 2) -> None:
        self.settings = settings
        self.capacity = capacity
        self._items: OrderedDict[tuple[int, str, str], Predictor] = OrderedDict()

    def get(self, spec: ModelSpec) -> Predictor:
        """The predictor for ``spec``, loading it on first use in this process."""
        key = (*spec.cache_key, self.settings.runtime)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        predictor = load_predictor(spec, self.settings)
        self._items[key] = predictor
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return predictor


@dataclass
class DecodedImage:
    """One image ready for the model: the decoded picture and, when asked for, its input tensor."""

    picture: PILImage.Image
    tensor: torch.Tensor | None = None
    #: Seconds this image took to decode and preprocess (in its decoding thread).
    seconds: float = 0.0


DecodeOutcome = DecodedImage | ImageDecodeError


def _decode_one(
    store: ContentStore, key: str | None, max_pixels: int, options: DecodeOptions, transform: Callable[[PILImage.Image], torch.Tensor] | None
) -> DecodeOutcome:
    if key is None:
        return ImageDecodeError("no stored bytes for this image")
    try:
        data = store.read(key)
    except FileNotFoundError:
        return ImageDecodeError("stored image file is missing from the image store")
    started = time.perf_counter()
    try:
        picture = decode_image(data, max_pixels, draft_size=options.draft_size, grey=options.grey)
    except ImageDecodeError as exc:
        return exc
    tensor = transform(picture) if transform is not None else None
    return DecodedImage(picture, tensor, time.perf_counter() - started)


def batch_slices(count: int, batch_size: int) -> list[slice]:
    """Batches for ``count`` images: a short first batch, then full ones.

    Nothing overlaps the decoding of a chunk's first batch, so it is a quarter of ``batch_size``:
    the model starts after a few images are ready while the threads decode the next full batch.
    """
    first = min(count, max(1, batch_size // 4))
    bounds = [0, *range(first, count, batch_size), count] if count else [0]
    return [slice(start, stop) for start, stop in zip(bounds, bounds[1:])]


def decoded_batches(
    images: Sequence[ClaimedImage],
    store: ContentStore,
    batch_size: int,
    max_pixels: int,
    workers: int,
    options: DecodeOptions = DecodeOptions(),
    transform: Callable[[PILImage.Image], torch.Tensor] | None = None,
) -> Iterator[list[tuple[ClaimedImage, DecodeOutcome]]]:
    """Yield batches of (image row, decoded image or error), working ahead in threads.

    Decoding and, with ``transform``, preprocessing run in the thread pool (PIL and torch release
    the GIL), so they overlap the model's forward pass on the previous batch.
    """
    batches = [images[part] for part in batch_slices(len(images), batch_size)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:

        def submit(batch: Sequence[ClaimedImage]) -> list[tuple[ClaimedImage, Future[DecodeOutcome]]]:
            return [(row, pool.submit(_decode_one, store, row.storage_key, max_pixels, options, transform)) for row in batch]

        # Two batches in flight: the pool keeps decoding while the caller runs the model on one
        # batch and writes the previous one's results to the database.
        pending = deque(submit(batch) for batch in batches[:LOOKAHEAD_BATCHES])
        for index in range(len(batches)):
            current = pending.popleft()
            if index + LOOKAHEAD_BATCHES < len(batches):
                pending.append(submit(batches[index + LOOKAHEAD_BATCHES]))
            yield [(row, future.result()) for row, future in current]


def classify_chunk(db: Database, settings: Settings, cache: PredictorCache, study_id: int, image_ids: Sequence[int]) -> ChunkReport:
    """Classify the unfinished images of one chunk with the study's model version.

    Idempotent: images already done or failed are skipped, and a prediction for an (image,
    version) pair is written at most once, so a redelivered task changes nothing.
    """
    report = ChunkReport(study_id=study_id)
    clock = time.perf_counter()
    with db.transaction() as session:
        study = session.get(Study, study_id)
        if study is None:
            log.warning("study %s no longer exists; dropping chunk of %d images", study_id, len(image_ids))
            return report
        chunk = claim_images(session, study_id, image_ids, settings.max_image_attempts)
        spec = ModelSpec.from_version(study.model_version)
        report.failed += len(chunk.gave_up)
        report.skipped = len(image_ids) - len(chunk.images) - len(chunk.gave_up)
    report.seconds["database"] += time.perf_counter() - clock
    if chunk.images:
        clock = time.perf_counter()
        predictor = cache.get(spec)
        report.seconds["load"] += time.perf_counter() - clock
        options = decode_options(spec.preprocessing, settings.fast_jpeg_decode)
        decode_workers = max(1, min(8, os.cpu_count() or 1))
        with db.transaction() as session:
            batches = decoded_batches(
                chunk.images, image_store(settings), settings.batch_size, settings.max_image_pixels, decode_workers, options, predictor.transform
            )
            while True:
                clock = time.perf_counter()
                batch = next(batches, None)
                report.seconds["decode_wait"] += time.perf_counter() - clock
                if batch is None:
                    break
                good = [(row, decoded) for row, decoded in batch if isinstance(decoded, DecodedImage)]
                for row, picture in batch:
                    if isinstance(picture, ImageDecodeError):
                        fail_image(session, row.id, str(picture))
                        report.failed += 1
                clock = time.perf_counter()
                results = predictor.predict_preprocessed([decoded.tensor for _, decoded in good]) if good else []
                model_seconds = time.perf_counter() - clock
                report.seconds["model"] += model_seconds
                # Per image: its own decode time, and its share of the batch's forward pass.
                seconds = {row.id: (decoded.seconds, model_seconds / len(good)) for row, decoded in good}
                clock = time.perf_counter()
                audited = audit_ids(settings.secret_key, spec.version_id, settings.audit_rate,
                                    [(row.id, result.flagged) for (row, _), result in zip(good, results)])
                save_predictions(session, spec.version_id, [(row, result) for (row, _), result in zip(good, results)],
                                 audit_ids=audited, seconds=seconds)
                session.commit()
                report.seconds["database"] += time.perf_counter() - clock
                report.predicted += len(results)
                # Heat maps (Grad-CAM) for this batch's flagged images only, after their predictions are saved.
                flagged = [(row, decoded.picture) for (row, decoded), result in zip(good, results) if result.flagged]
                if flagged:
                    clock = time.perf_counter()
                    store_heatmaps(session, settings, predictor, spec.version_id, flagged)
                    report.seconds["heatmaps"] += time.perf_counter() - clock
    clock = time.perf_counter()
    with db.transaction() as session:
        report.study_done = finish_study_if_complete(session, study_id)
    report.seconds["database"] += time.perf_counter() - clock
    return report

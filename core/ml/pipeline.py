"""Classify one chunk of a study's images: the worker's whole job, as a plain function.

decode (threads, batches ahead) -> preprocess -> batched forward -> write predictions.
A file that cannot be decoded fails alone; its batch and study go on.

Memory is bounded by pixels, not by images: a picture is resized to the model's input while it
is decoded (never converted at full size: :class:`core.imaging.Resize`), the decode threads
together hold at most ``TRIAGE_DECODE_PIXEL_BUDGET`` full-resolution pixels at once
(:class:`core.ml.decoding.PixelBudget`), and once an image is preprocessed the decode window keeps only its model
input and its size, never its picture.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.audit_sampling import audit_ids
from core.config import Settings
from core.db import Database
from core.imaging import ImageDecodeError
from core.ml.decoding import DecodedImage, PixelBudget, decoded_batches
from core.ml.devices import decode_threads
from core.ml.gpu_decode import device_batches_for
from core.ml.heatmap import store_heatmaps
from core.ml.predict import Predictor
from core.ml.runtimes import load_predictor
from core.ml.transforms import decode_options
from core.models import Study
from core.registry import ModelSpec
from core.storage import ContentStore, image_store
from core.leases import process_identity
from core.studies import (
    ClaimedChunk, ClaimedImage, charge_attempt, claim_images, fail_image, finish_study_if_complete, save_predictions,
)

log = logging.getLogger(__name__)



@dataclass
class ChunkReport:
    """What one chunk did, and where its time went (seconds), for logs, tests and benchmarks."""

    study_id: int
    predicted: int = 0
    failed: int = 0
    skipped: int = 0
    #: Images classified one at a time because a worker died while they were in flight.
    isolated: int = 0
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


def isolating_suspects(db: Database, settings: Settings, chunk: ClaimedChunk, owner: str) -> Iterator[list[ClaimedImage]]:
    """The groups of images to classify: the chunk's first tries together, then each suspect alone.

    The caller classifies and saves a group before asking for the next one, and a suspect's attempt
    is counted and committed just before it is yielded, so nothing else is in flight while a
    suspect is decoded: if the worker dies again, the crash is charged to that one image. After
    :func:`core.studies.gives_up_after` attempts it alone is failed; the rest of the chunk is classified.
    """
    if chunk.images:
        yield chunk.images
    for suspect in chunk.suspects:
        with db.transaction() as session:
            still_mine = charge_attempt(session, suspect.id, owner, settings.lease_s)
        if still_mine:  # else its lease ran out and another worker took it over
            log.info("image %s was in flight when a worker died: classifying it alone", suspect.id)
            yield [suspect]


class _CrashingStore(ContentStore):
    """Testing only (``TRIAGE_TEST_CRASH_ON_SHA256``): reading one image kills this process, as a decoder crash would."""

    def __init__(self, root: Path, poison_sha256: str) -> None:
        super().__init__(root)
        self.poison_key = self.key_for(poison_sha256)

    def read(self, key: str) -> bytes:
        if key == self.poison_key:
            log.error("TRIAGE_TEST_CRASH_ON_SHA256: killing this worker process on image %s", key)
            os.kill(os.getpid(), signal.SIGKILL)
        return super().read(key)


def _image_store(settings: Settings) -> ContentStore:
    if settings.test_crash_on_sha256:
        assert settings.storage_dir is not None
        return _CrashingStore(settings.storage_dir, settings.test_crash_on_sha256)
    return image_store(settings)


def classify_chunk(
    db: Database, settings: Settings, cache: PredictorCache, study_id: int, image_ids: Sequence[int], owner: str | None = None
) -> ChunkReport:
    """Classify the unfinished images of one chunk with the study's model version.

    Idempotent: images already done or failed are skipped, and a prediction for an (image,
    version) pair is written at most once, so a redelivered task changes nothing. The images are
    claimed for ``owner`` (default: this process; see :mod:`core.leases`). After a worker died on
    this chunk, its unfinished images are classified one at a time (:func:`isolating_suspects`).
    """
    owner = owner or process_identity()
    report = ChunkReport(study_id=study_id)
    clock = time.perf_counter()
    with db.transaction() as session:
        study = session.get(Study, study_id)
        if study is None:
            log.warning("study %s no longer exists; dropping chunk of %d images", study_id, len(image_ids))
            return report
        chunk = claim_images(session, study_id, image_ids, settings.max_image_attempts, owner, settings.lease_s)
        spec = ModelSpec.from_version(study.model_version)
        report.failed += len(chunk.gave_up)
        report.isolated = len(chunk.suspects)
        report.skipped = len(image_ids) - len(chunk.images) - len(chunk.suspects) - len(chunk.gave_up)
    report.seconds["database"] += time.perf_counter() - clock
    for group in isolating_suspects(db, settings, chunk, owner):
        clock = time.perf_counter()
        predictor = cache.get(spec)
        report.seconds["load"] += time.perf_counter() - clock
        options = decode_options(spec.preprocessing, settings.fast_jpeg_decode)
        decode_workers = decode_threads(settings)
        # On CUDA, JPEGs decode in batches on the GPU (core.ml.gpu_decode); else in CPU threads.
        make_batches = device_batches_for(predictor, settings) or decoded_batches
        with db.transaction() as session:
            batches = make_batches(
                group, _image_store(settings), settings.batch_size, settings.max_image_pixels, decode_workers, options,
                predictor.transform, PixelBudget(settings.decode_pixel_budget),
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
                flagged = [(row, decoded.tensor, decoded.size) for (row, decoded), result in zip(good, results) if result.flagged]
                if flagged:
                    clock = time.perf_counter()
                    store_heatmaps(session, settings, predictor, spec.version_id, flagged)
                    report.seconds["heatmaps"] += time.perf_counter() - clock
    clock = time.perf_counter()
    with db.transaction() as session:
        report.study_done = finish_study_if_complete(session, study_id)
    report.seconds["database"] += time.perf_counter() - clock
    return report

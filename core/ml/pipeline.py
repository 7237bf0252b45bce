"""Classify one chunk of a study's images: the worker's whole job, as a plain function.

decode (threads, batches ahead) -> preprocess -> batched forward -> write predictions.
A file that cannot be decoded fails alone; its batch and study go on.

Memory is bounded by pixels, not by images: a picture is resized to the model's input while it
is decoded (never converted at full size: :class:`core.imaging.Resize`), the decode threads
together hold at most ``TRIAGE_DECODE_PIXEL_BUDGET`` full-resolution pixels at once
(:class:`PixelBudget`), and once an image is preprocessed the decode window keeps only its model
input and its size, never its picture.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

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
from core.leases import process_identity
from core.studies import (
    ClaimedChunk, ClaimedImage, charge_attempt, claim_images, fail_image, finish_study_if_complete, image_store, save_predictions,
)

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


class PixelBudget:
    """Full-resolution pixels that the decode threads may hold at once: a weighted semaphore.

    Each image takes its width x height (from its header, before any pixel is decoded) and gives it
    back once it is preprocessed. Images are admitted in the order they ask, so a huge image is not
    starved by small ones; one larger than the whole budget waits until it can decode alone.
    """

    def __init__(self, pixels: int) -> None:
        if pixels < 1:
            raise ValueError(f"a pixel budget must be positive, not {pixels}")
        self.capacity = pixels
        #: Pixels held now, and the most ever held at once (for tests and logs).
        self.in_use = 0
        self.peak = 0
        self._condition = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    @property
    def waiting(self) -> int:
        """Requests queued and not yet admitted."""
        with self._condition:
            return self._next_ticket - self._serving

    def acquire(self, pixels: int) -> int:
        """Wait until ``pixels`` (at most the whole budget) fit, in arrival order; returns what was taken."""
        weight = min(max(pixels, 0), self.capacity)
        with self._condition:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._condition.wait_for(lambda: self._serving == ticket and self.in_use + weight <= self.capacity)
            self._serving += 1
            self.in_use += weight
            self.peak = max(self.peak, self.in_use)
            self._condition.notify_all()
        return weight

    def release(self, weight: int) -> None:
        """Give back what :meth:`acquire` took."""
        with self._condition:
            self.in_use -= weight
            self._condition.notify_all()

    @contextmanager
    def reservation(self) -> Iterator["Reservation"]:
        """A :class:`Reservation` to pass to ``decode_image(admit=...)``; leaving gives its pixels back."""
        reservation = Reservation(self)
        try:
            yield reservation
        finally:
            self.release(reservation.taken)


class Reservation:
    """``admit(width, height)`` for :func:`core.imaging.decode_image`: waits for the pixels, notes the size."""

    def __init__(self, budget: PixelBudget) -> None:
        self.budget = budget
        self.taken = 0
        #: The image's full (width, height), from its header.
        self.size: tuple[int, int] | None = None

    def __call__(self, width: int, height: int) -> None:
        """Wait until ``width`` x ``height`` pixels fit in the budget."""
        self.size = (width, height)
        self.taken += self.budget.acquire(width * height)


@dataclass
class DecodedImage:
    """One image ready for the model: its input tensor and its full size, not its picture.

    The decode window holds one of these per image for several batches, so it keeps only what the
    model and the heat map need: the tensor (also Grad-CAM's input: the very numbers the model
    classified) and the image's width and height (the heat map's shape). The decoded picture is
    kept only when no transform was given, for a caller that preprocesses it itself.
    """

    tensor: torch.Tensor | None
    #: The image's full (width, height), from its header.
    size: tuple[int, int]
    #: Seconds this image took to decode and preprocess (in its decoding thread).
    seconds: float = 0.0
    picture: PILImage.Image | None = None


DecodeOutcome = DecodedImage | ImageDecodeError


def _decode_one(
    store: ContentStore,
    key: str | None,
    max_pixels: int,
    options: DecodeOptions,
    transform: Callable[[PILImage.Image], torch.Tensor] | None,
    budget: PixelBudget,
) -> DecodeOutcome:
    if key is None:
        return ImageDecodeError("no stored bytes for this image")
    try:
        data = store.read(key)
    except FileNotFoundError:
        return ImageDecodeError("stored image file is missing from the image store")
    started = time.perf_counter()
    try:
        with budget.reservation() as reservation:
            picture = decode_image(
                data, max_pixels, draft_size=options.draft_size, grey=options.grey, resize=options.resize, admit=reservation
            )
            size = reservation.size or picture.size
            if transform is None:
                return DecodedImage(None, size, time.perf_counter() - started, picture)
            tensor = transform(picture)
            del picture  # freed before its pixels go back to the budget
    except ImageDecodeError as exc:
        return exc
    return DecodedImage(tensor, size, time.perf_counter() - started)


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
    budget: PixelBudget | None = None,
) -> Iterator[list[tuple[ClaimedImage, DecodeOutcome]]]:
    """Yield batches of (image row, decoded image or error), working ahead in threads.

    Decoding and, with ``transform``, preprocessing run in the thread pool (PIL and torch release
    the GIL), so they overlap the model's forward pass on the previous batch. ``budget`` bounds the
    full-resolution pixels being decoded at once (default: one image at the pixel limit,
    ``max_pixels``); with ``transform`` a yielded image holds its tensor, not its picture.
    """
    budget = budget or PixelBudget(max_pixels)
    batches = [images[part] for part in batch_slices(len(images), batch_size)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:

        def submit(batch: Sequence[ClaimedImage]) -> list[tuple[ClaimedImage, Future[DecodeOutcome]]]:
            return [(row, pool.submit(_decode_one, store, row.storage_key, max_pixels, options, transform, budget)) for row in batch]

        # Two batches in flight: the pool keeps decoding while the caller runs the model on one
        # batch and writes the previous one's results to the database.
        pending = deque(submit(batch) for batch in batches[:LOOKAHEAD_BATCHES])
        for index in range(len(batches)):
            current = pending.popleft()
            if index + LOOKAHEAD_BATCHES < len(batches):
                pending.append(submit(batches[index + LOOKAHEAD_BATCHES]))
            yield [(row, future.result()) for row, future in current]


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
        decode_workers = max(1, min(8, os.cpu_count() or 1))
        with db.transaction() as session:
            batches = decoded_batches(
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

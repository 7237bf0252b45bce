"""The decode window: stored images decoded and preprocessed in threads, batches ahead of the model.

Memory is bounded by pixels, not by images: the decode threads together hold at most a
:class:`PixelBudget` of full-resolution pixels at once, a picture is resized to the model's input
while it is decoded, and once preprocessed an image keeps only its model input and its size
(:class:`DecodedImage`). :mod:`core.ml.pipeline` runs the model on what this yields;
:mod:`core.ml.gpu_decode` decodes on the GPU and falls back to :func:`decode_one` here.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image as PILImage

from core.imaging import ImageDecodeError, decode_image
from core.ml.transforms import DecodeOptions
from core.storage import ContentStore
from core.studies import ClaimedImage

#: Batches decoded ahead of the model.
LOOKAHEAD_BATCHES = 2


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


def decode_one(
    store: ContentStore,
    key: str | None,
    max_pixels: int,
    options: DecodeOptions,
    transform: Callable[[PILImage.Image], torch.Tensor] | None,
    budget: PixelBudget,
) -> DecodeOutcome:
    """Read, decode within ``budget`` and (with ``transform``) preprocess one stored image; an error is returned, not raised."""
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
            return [(row, pool.submit(decode_one, store, row.storage_key, max_pixels, options, transform, budget)) for row in batch]

        # Two batches in flight: the pool keeps decoding while the caller runs the model on one
        # batch and writes the previous one's results to the database.
        pending = deque(submit(batch) for batch in batches[:LOOKAHEAD_BATCHES])
        for index in range(len(batches)):
            current = pending.popleft()
            if index + LOOKAHEAD_BATCHES < len(batches):
                pending.append(submit(batches[index + LOOKAHEAD_BATCHES]))
            yield [(row, future.result()) for row, future in current]

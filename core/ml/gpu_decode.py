"""Decode JPEGs in batches on the model's device and resize them there: decode that keeps up with a GPU.

On a CUDA worker the CPU decoder (:mod:`core.imaging`, a few hundred images/s per core) cannot
feed the model. Here the files of a batch are decoded together by nvJPEG
(``torchvision.io.decode_jpeg(device="cuda")``), resized on the GPU with the version's own
interpolation (antialiased, rounded to 8 bits as Pillow does) and normalised with its mean and
std, so the tensors are the CPU path's within a grey level or so and labels agree
(tests/worker/test_gpu_decode.py; bench/gpu.py measures it on the GPU).

The device decoder takes only what it reads like the CPU path: 8-bit baseline or extended
sequential Huffman JPEGs with one (grey) or three (YCbCr) components, ending with their end-of-image
marker, within the pixel limit. Everything else (progressive, lossless or arithmetic-coded JPEG,
CMYK/YCCK, RGB-coded JPEG, 12-bit, PNG and the other formats, DICOM, a truncated or corrupt file,
or a file nvJPEG refuses) goes to the CPU decoder one by one (:func:`device_decode_refusal` says
why), where it decodes as before or fails alone with the CPU path's message.

Every function takes its ``device``: tests run the whole batch path on ``cpu``.
"""

from __future__ import annotations

import functools
import logging
import struct
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from core.config import Settings
from core.imaging import is_dicom, sniff_format
from core.ml.decoding import LOOKAHEAD_BATCHES, DecodedImage, PixelBudget, batch_slices, decode_one, decoded_batches
from core.ml.transforms import DecodeOptions, interpolation_mode
from core.preprocessing import Preprocessing
from core.storage import ContentStore
from core.studies import ClaimedImage

log = logging.getLogger(__name__)

#: Full-resolution pixels decoded on the device in one nvJPEG call (about 0.8 GB as 8-bit RGB).
DEVICE_GROUP_PIXELS = 1 << 28

#: Start-of-frame markers the device decoder reads (Huffman, sequential); the others by name.
_DEVICE_FRAMES = {0xC0: "baseline", 0xC1: "extended sequential"}
_OTHER_FRAMES = {
    0xC2: "progressive", 0xC3: "lossless", 0xC5: "hierarchical", 0xC6: "hierarchical progressive",
    0xC7: "hierarchical lossless", 0xC9: "arithmetic-coded", 0xCA: "arithmetic-coded progressive",
    0xCB: "arithmetic-coded lossless", 0xCD: "hierarchical arithmetic-coded", 0xCE: "hierarchical arithmetic-coded",
    0xCF: "hierarchical arithmetic-coded",
}
#: Markers with no length field.
_STANDALONE = {0x01, *range(0xD0, 0xD9)}


@dataclass(frozen=True)
class JpegHeader:
    """What a JPEG's markers say before its scan: frame type, size, components."""

    frame: int
    precision: int
    width: int
    height: int
    components: int
    #: Component ids in frame order (``R``, ``G``, ``B`` marks an RGB-coded file).
    component_ids: tuple[int, ...]
    #: The Adobe APP14 colour transform (0: none, i.e. RGB or CMYK; 1: YCbCr; 2: YCCK), if present.
    adobe_transform: int | None = None


def read_jpeg_header(data: bytes) -> JpegHeader | None:
    """Parse a JPEG's markers up to its start of frame; None when it is no JPEG or the header is broken."""
    if not data.startswith(b"\xff\xd8"):
        return None
    position, adobe = 2, None
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _STANDALONE:
            position += 2
            continue
        length = struct.unpack(">H", data[position + 2 : position + 4])[0]
        segment = data[position + 4 : position + 2 + length]
        if length < 2 or len(segment) != length - 2 or marker == 0xDA:  # truncated, or a scan before any frame
            return None
        if marker == 0xEE and segment.startswith(b"Adobe") and len(segment) >= 12:
            adobe = segment[11]
        if marker in _DEVICE_FRAMES or marker in _OTHER_FRAMES:
            if len(segment) < 6:
                return None
            precision, height, width, components = segment[0], *struct.unpack(">HH", segment[1:5]), segment[5]
            ids = tuple(segment[6 + 3 * k] for k in range(components) if 6 + 3 * k < len(segment))
            return JpegHeader(marker, precision, width, height, components, ids, adobe)
        position += 2 + length
    return None


def device_decode_refusal(data: bytes, max_pixels: int, header: JpegHeader | None = None) -> str | None:
    """Why the device decoder leaves this file to the CPU decoder; None when it takes it.

    The rules: a DICOM file, another format than JPEG, a JPEG whose header cannot be read, a frame
    other than 8-bit baseline/extended sequential Huffman (progressive, lossless, arithmetic,
    hierarchical, 12-bit), other than one or three components (CMYK/YCCK), three components coded as
    RGB rather than YCbCr, a size of zero or over ``max_pixels``, or no end-of-image marker at the
    end (truncated). The CPU decoder reads what it can of these and fails the rest with its message.
    """
    if is_dicom(data):
        return "DICOM file"
    header = header or read_jpeg_header(data)
    if header is None:
        kind = sniff_format(data[:132])
        return "JPEG with an unreadable header" if kind == "jpeg" else f"{(kind or 'unknown').upper()} file, not JPEG"
    if header.frame not in _DEVICE_FRAMES:
        return f"{_OTHER_FRAMES[header.frame]} JPEG"
    if header.precision != 8:
        return f"{header.precision}-bit JPEG"
    if header.components == 4:
        return "CMYK/YCCK JPEG (4 components)"
    if header.components not in (1, 3):
        return f"JPEG with {header.components} components"
    if header.components == 3 and (header.adobe_transform == 0 or header.component_ids == (ord("R"), ord("G"), ord("B"))):
        return "RGB-coded JPEG (no YCbCr)"
    if header.width == 0 or header.height == 0:
        return "JPEG without its size in the frame header"
    if header.width * header.height > max_pixels:
        return "over the pixel limit"
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return "no end-of-image marker (truncated?)"
    return None


def _tensor_interpolation(preprocessing: Preprocessing) -> InterpolationMode:
    """The version's interpolation for tensors; Pillow's nearest is torchvision's nearest-exact."""
    mode = interpolation_mode(preprocessing)
    return InterpolationMode.NEAREST_EXACT if mode == InterpolationMode.NEAREST else mode


def _decode_group(files: list[torch.Tensor], mode: ImageReadMode, device: torch.device) -> list[torch.Tensor | str]:
    """nvJPEG (or libjpeg on ``cpu``) for a group of files; a file it refuses gets the error message."""
    try:
        return list(decode_jpeg(files, mode=mode, device=device))
    except RuntimeError:  # one bad file fails the call: find which, one by one
        pass
    decoded: list[torch.Tensor | str] = []
    for file in files:
        try:
            decoded.append(decode_jpeg(file, mode=mode, device=device))
        except RuntimeError as exc:
            decoded.append(f"device decoder: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return decoded


def decode_on_device(
    datas: Sequence[bytes], preprocessing: Preprocessing, device: torch.device | str, grey: bool = False, max_pixels: int = 60_000_000,
) -> list[torch.Tensor | str]:
    """Each file's model input ``[C, H, W]`` on ``device``, or why it is left to the CPU decoder.

    Args:
        datas: the files' bytes.
        preprocessing: the version's config (input size, interpolation, mean, std).
        device: where to decode, resize and normalise (``cuda`` in the worker; ``cpu`` in tests).
        grey: decode luminance only (``TRIAGE_FAST_JPEG_DECODE``), as the CPU fast path does.
        max_pixels: the pixel limit; larger files go to the CPU decoder, which refuses them.

    Grey (one-component) files decode as one channel and are repeated into the model's channels
    after the resize, as the CPU path does.
    """
    device = torch.device(device)
    channels, height, width = preprocessing.input_size
    interpolation = _tensor_interpolation(preprocessing)
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    outputs: list[torch.Tensor | str] = []
    groups: dict[ImageReadMode, list[int]] = {ImageReadMode.GRAY: [], ImageReadMode.RGB: []}
    headers = [read_jpeg_header(data) for data in datas]
    for index, (data, header) in enumerate(zip(datas, headers)):
        refusal = device_decode_refusal(data, max_pixels, header)
        outputs.append(refusal or "")
        if refusal is None and header is not None:
            groups[ImageReadMode.GRAY if grey or header.components == 1 else ImageReadMode.RGB].append(index)
    for mode, indices in groups.items():
        resized: dict[int, torch.Tensor] = {}
        for part in _pixel_groups(indices, [headers[i] for i in indices]):
            files = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in part]
            for index, picture in zip(part, _decode_group(files, mode, device)):
                if isinstance(picture, str):
                    outputs[index] = picture
                else:
                    resized[index] = F.resize(picture, [height, width], interpolation=interpolation, antialias=True)
        if resized:
            batch = torch.stack(list(resized.values())).float().div_(255.0)
            if batch.shape[1] == 1 and channels != 1:
                batch = batch.expand(-1, channels, -1, -1)
            batch = (batch - mean) / std
            for index, tensor in zip(resized, batch.unbind(0)):
                outputs[index] = tensor
    return outputs


def _pixel_groups(indices: list[int], headers: list[JpegHeader | None]) -> Iterator[list[int]]:
    """``indices`` in order, cut into groups of at most :data:`DEVICE_GROUP_PIXELS` full-size pixels each."""
    group: list[int] = []
    pixels = 0
    for index, header in zip(indices, headers):
        size = header.width * header.height if header else 0
        if group and pixels + size > DEVICE_GROUP_PIXELS:
            yield group
            group, pixels = [], 0
        group.append(index)
        pixels += size
    if group:
        yield group


def device_decoded_batches(
    images: Sequence[ClaimedImage],
    store: ContentStore,
    batch_size: int,
    max_pixels: int,
    workers: int,
    options: DecodeOptions = DecodeOptions(),
    transform: Callable[[Any], torch.Tensor] | None = None,
    budget: Any = None,
    *,
    preprocessing: Preprocessing,
    device: torch.device | str,
) -> Iterator[list[tuple[ClaimedImage, Any]]]:
    """:func:`core.ml.decoding.decoded_batches` with each batch decoded on ``device``; same arguments and yield.

    A batch is read and decoded on the device in one pool thread, the next one ahead while the
    model runs; the files the device decoder leaves (:func:`device_decode_refusal`) are decoded by
    the CPU path's own code in the other pool threads, within the pixel ``budget``. Without a
    ``transform`` (a caller that wants pictures, not tensors) this is the CPU path.
    """
    if transform is None:
        yield from decoded_batches(images, store, batch_size, max_pixels, workers, options, transform, budget)
        return
    budget = budget or PixelBudget(max_pixels)
    batches = [images[part] for part in batch_slices(len(images), batch_size)]
    # One thread per batch in flight, the rest for the CPU fallbacks those batches hand out.
    with ThreadPoolExecutor(max_workers=max(workers, LOOKAHEAD_BATCHES + 1), thread_name_prefix="decode") as pool:

        def cpu(row: ClaimedImage) -> Future[Any]:
            return pool.submit(decode_one, store, row.storage_key, max_pixels, options, transform, budget)

        def decode_batch(rows: Sequence[ClaimedImage]) -> list[Any]:
            started = time.perf_counter()
            datas: dict[int, bytes] = {}
            for index, row in enumerate(rows):
                try:
                    if row.storage_key is not None:
                        datas[index] = store.read(row.storage_key)
                except FileNotFoundError:
                    pass  # the CPU path reports it, in its words
            decoded = dict(zip(datas, decode_on_device(list(datas.values()), preprocessing, device, options.grey, max_pixels)))
            fallbacks = {index: cpu(row) for index, row in enumerate(rows) if not isinstance(decoded.get(index), torch.Tensor)}
            reasons = Counter(str(decoded.get(index, "not readable")) for index in fallbacks)
            if reasons:
                log.debug("%d of %d images decoded on the CPU: %s", len(fallbacks), len(rows), dict(reasons))
            on_device = len(rows) - len(fallbacks)
            seconds = (time.perf_counter() - started) / max(on_device, 1)
            outcomes = []
            for index, row in enumerate(rows):
                if index in fallbacks:
                    outcomes.append(fallbacks[index].result())
                else:
                    header = read_jpeg_header(datas[index])
                    assert header is not None, "a file decoded on the device has a header"
                    outcomes.append(DecodedImage(decoded[index], (header.width, header.height), seconds))
            return outcomes

        pending = deque(pool.submit(decode_batch, batch) for batch in batches[:LOOKAHEAD_BATCHES])
        for index, batch in enumerate(batches):
            current = pending.popleft()
            if index + LOOKAHEAD_BATCHES < len(batches):
                pending.append(pool.submit(decode_batch, batches[index + LOOKAHEAD_BATCHES]))
            yield list(zip(batch, current.result()))


def device_batches_for(predictor: Any, settings: Settings) -> Callable[..., Iterator[list[tuple[ClaimedImage, Any]]]] | None:
    """The batch decoder for ``predictor``: :func:`device_decoded_batches` on its CUDA device, else None (the CPU path).

    Taken when the predictor runs on CUDA and ``TRIAGE_GPU_DECODE`` is on.
    """
    device = getattr(predictor, "device", None)
    if not settings.gpu_decode or not isinstance(device, torch.device) or device.type != "cuda":
        return None
    return functools.partial(device_decoded_batches, preprocessing=predictor.spec.preprocessing, device=device)

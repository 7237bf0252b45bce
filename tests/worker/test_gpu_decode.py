"""The GPU JPEG path: which files it takes, and that it feeds the model what the CPU path does.

The batch path is the worker's own code run with ``device="cpu"`` (libjpeg instead of nvJPEG);
bench/gpu.py runs the same comparison on a GPU.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import Settings
from core.imaging import ImageDecodeError, decode_image
from core.ml.gpu_decode import decode_on_device, device_batches_for, device_decode_refusal, device_decoded_batches, read_jpeg_header
from core.ml.modelio import create_model
from core.ml.decoding import DecodedImage, decoded_batches
from core.ml.predict import Predictor
from core.ml.transforms import build_transform, decode_options
from core.preprocessing import default_preprocessing
from core.registry import ModelSpec
from core.storage import ContentStore
from core.studies import ClaimedImage
from tests.conftest import DICOM_DIR, XRAYS

PREPROCESSING = default_preprocessing(224)
#: One grey level after normalisation by the smallest ImageNet std, plus float slack.
ONE_GREY_LEVEL = 1.0 / 255 / min(PREPROCESSING.std) + 1e-5


def _encode(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG" if options.pop("jpeg", True) else "PNG", **options)
    return buffer.getvalue()


def _radiograph(mode: str = "RGB", size: tuple[int, int] = (300, 260)) -> Image.Image:
    path = sorted((XRAYS / "test" / "fracture").glob("*.jpg"))[0]
    return Image.open(path).convert(mode).resize(size)


def _patch_frame(data: bytes, marker: int | None = None, precision: int | None = None, ids: bytes | None = None) -> bytes:
    """The JPEG with its start-of-frame marker, precision or component ids changed (header rules only)."""
    start = data.index(b"\xff\xc0")
    patched = bytearray(data)
    if marker is not None:
        patched[start + 1] = marker
    if precision is not None:
        patched[start + 4] = precision
    if ids is not None:
        for k, value in enumerate(ids):
            patched[start + 10 + 3 * k] = value
    return bytes(patched)


def test_baseline_grey_and_colour_jpegs_decode_on_the_device() -> None:
    for mode in ("L", "RGB"):
        data = _encode(_radiograph(mode))
        assert device_decode_refusal(data, 10**8) is None
        header = read_jpeg_header(data)
        assert header is not None and (header.width, header.height, header.components) == (300, 260, 1 if mode == "L" else 3)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: _encode(_radiograph(), progressive=True), "progressive JPEG"),
        (lambda: _encode(_radiograph("CMYK")), "CMYK/YCCK JPEG (4 components)"),
        (lambda: _encode(_radiograph(), jpeg=False), "PNG file, not JPEG"),
        (lambda: (DICOM_DIR / "RG3_UNCR.dcm").read_bytes(), "DICOM file"),
        (lambda: _encode(_radiograph())[:-200], "no end-of-image marker (truncated?)"),
        (lambda: _encode(_radiograph())[:40], "JPEG with an unreadable header"),
        (lambda: b"not an image at all", "UNKNOWN file, not JPEG"),
        (lambda: _patch_frame(_encode(_radiograph()), precision=12), "12-bit JPEG"),
        (lambda: _patch_frame(_encode(_radiograph()), marker=0xC9), "arithmetic-coded JPEG"),
        (lambda: _patch_frame(_encode(_radiograph()), marker=0xC3), "lossless JPEG"),
        (lambda: _patch_frame(_encode(_radiograph()), ids=b"RGB"), "RGB-coded JPEG (no YCbCr)"),
    ],
)
def test_what_the_device_decoder_leaves_to_the_cpu_decoder(make, reason: str) -> None:  # type: ignore[no-untyped-def]
    data = make()
    assert device_decode_refusal(data, 10**8) == reason
    assert decode_on_device([data], PREPROCESSING, "cpu") == [reason]


def test_files_over_the_pixel_limit_go_to_the_cpu_decoder_which_refuses_them() -> None:
    data = _encode(_radiograph())
    assert device_decode_refusal(data, 300 * 260 - 1) == "over the pixel limit"
    with pytest.raises(ImageDecodeError, match="pixels"):
        decode_image(data, 300 * 260 - 1)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch thread: on a small shared machine, torch's thread pool fighting the others costs minutes here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _test_files(step: int = 6) -> list[bytes]:
    """Every ``step``-th radiograph of xrays/test, both classes, as stored."""
    files = sorted((XRAYS / "test").glob("*/*.jpg"))[::step]
    assert len(files) >= 120
    return [path.read_bytes() for path in files]


def _cpu_path(datas: list[bytes]) -> list[torch.Tensor]:
    transform, options = build_transform(PREPROCESSING), decode_options(PREPROCESSING, False)
    return [transform(decode_image(data, 10**8, resize=options.resize)) for data in datas]


@pytest.mark.usefixtures("one_torch_thread")
def test_the_device_path_feeds_the_model_what_the_cpu_path_does_and_labels_agree() -> None:
    datas = _test_files()
    device = decode_on_device(datas, PREPROCESSING, "cpu")
    assert all(isinstance(tensor, torch.Tensor) for tensor in device), "every test radiograph is a baseline JPEG"
    cpu = _cpu_path(datas)
    difference = torch.stack([a - b for a, b in zip(device, cpu)]).abs()  # type: ignore[operator]
    assert float(difference.max()) <= ONE_GREY_LEVEL
    assert float(difference.mean()) < 0.01 * ONE_GREY_LEVEL

    torch.manual_seed(0)
    labels = ["fracture", "no_fracture"]
    spec = ModelSpec(1, "test_efficientnet", labels, PREPROCESSING, 0.5, 1.0, "")
    predictor = Predictor.from_model(spec, create_model("test_efficientnet", num_classes=2), device="cpu", batch_size=64)
    device_labels = [r.label for r in predictor.predict_preprocessed(device)]  # type: ignore[arg-type]
    cpu_labels = [r.label for r in predictor.predict_preprocessed(cpu)]
    assert np.mean([a == b for a, b in zip(device_labels, cpu_labels)]) >= 0.995


def test_batches_mix_device_and_cpu_decodes_and_fail_bad_files_alone(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "images")
    files = {
        "grey": _encode(_radiograph("L")),
        "colour": _encode(_radiograph()),
        "progressive": _encode(_radiograph(), progressive=True),
        "png": _encode(_radiograph(), jpeg=False),
        "truncated": _encode(_radiograph())[:-300],
        "dicom": (DICOM_DIR / "RG3_UNCR.dcm").read_bytes(),
        "corrupt": b"\xff\xd8\xff\xe0" + b"\x00" * 64,
    }
    rows = [ClaimedImage(index, store.put_bytes(data)[1]) for index, data in enumerate(files.values())]
    rows += [ClaimedImage(len(rows), None), ClaimedImage(len(rows) + 1, "ab/" + "0" * 62)]  # no bytes; missing file
    transform, options = build_transform(PREPROCESSING), decode_options(PREPROCESSING, False)

    def outcomes(batches) -> list[object]:  # type: ignore[no-untyped-def]
        return [outcome for batch in batches for _, outcome in batch]

    device = outcomes(device_decoded_batches(rows, store, 4, 10**8, 2, options, transform, preprocessing=PREPROCESSING, device="cpu"))
    cpu = outcomes(decoded_batches(rows, store, 4, 10**8, 2, options, transform))
    assert len(device) == len(cpu) == len(rows)
    for name, d, c in zip([*files, "no bytes", "missing"], device, cpu):
        assert type(d) is type(c), name
        if isinstance(c, ImageDecodeError):
            assert str(d) == str(c), name
        else:
            assert isinstance(d, DecodedImage) and isinstance(c, DecodedImage)
            assert d.size == c.size, name
            assert float((d.tensor - c.tensor).abs().max()) <= ONE_GREY_LEVEL, name  # type: ignore[operator]
    assert [type(o).__name__ for o in device].count("DecodedImage") == 5  # grey, colour, progressive, png, dicom


def test_the_worker_takes_the_device_path_only_on_cuda_and_when_enabled(settings: Settings) -> None:
    spec = SimpleNamespace(preprocessing=PREPROCESSING)
    assert device_batches_for(SimpleNamespace(device=torch.device("cpu"), spec=spec), settings) is None
    assert device_batches_for(SimpleNamespace(device=torch.device("cuda"), spec=spec), settings) is not None
    off = settings.model_copy(update={"gpu_decode": False})
    assert device_batches_for(SimpleNamespace(device=torch.device("cuda"), spec=spec), off) is None

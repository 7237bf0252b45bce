"""The decode window under huge images: bounded pixels in flight, no picture kept after preprocessing."""

from __future__ import annotations

import gc
import io
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image as PILImage
from sqlalchemy import select

from core.config import Settings
from core.db import Database
from core.imaging import decode_image
from core.ml.decoding import DecodedImage, PixelBudget, decoded_batches
from core.ml.pipeline import PredictorCache, classify_chunk
from core.ml.transforms import build_transform, decode_options
from core.preprocessing import default_preprocessing
from core.models import Image, ImageStatus, ModelVersion
from core.storage import ContentStore, heatmap_store
from core.studies import ClaimedImage, add_upload, create_study
from tests.conftest import xray_sample
from tests.e2e.conftest import wait_for

PREPROCESSING = default_preprocessing(image_size=64)


def _png(image: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _upscaled_rgba(path: Path, size: tuple[int, int]) -> bytes:
    """A real radiograph blown up to ``size`` as an RGBA PNG (opaque: the same picture as its RGB)."""
    return _png(PILImage.open(path).convert("RGBA").resize(size, PILImage.BILINEAR))


def _large_pictures(bound: tuple[int, int]) -> set[int]:
    """Ids of the live PIL images wider or taller than ``bound``."""
    gc.collect()
    # type(), not isinstance(): the latter asks every object for its __class__, and some torch shims warn.
    return {id(o) for o in gc.get_objects() if issubclass(type(o), PILImage.Image) and (o.width > bound[0] or o.height > bound[1])}


def _decode_all(blobs: list[bytes], tmp_path: Path, budget: PixelBudget) -> list[DecodedImage]:
    """The worker's decode window over ``blobs``, every outcome kept."""
    store = ContentStore(tmp_path / "store")
    rows = [ClaimedImage(index, store.put_bytes(data)[1]) for index, data in enumerate(blobs)]
    options = decode_options(PREPROCESSING, fast_jpeg_decode=False)
    outcomes = []
    for batch in decoded_batches(rows, store, 4, 60_000_000, 2, options, build_transform(PREPROCESSING), budget):
        outcomes += [decoded for _, decoded in batch]
    assert all(isinstance(decoded, DecodedImage) for decoded in outcomes), outcomes
    return outcomes


def test_pixel_budget_admits_in_arrival_order_and_never_holds_more_than_its_capacity() -> None:
    budget = PixelBudget(10)
    first = budget.acquire(6)
    admitted: list[str] = []

    def take(name: str, pixels: int) -> None:
        weight = budget.acquire(pixels)
        admitted.append(name)
        budget.release(weight)

    big = threading.Thread(target=take, args=("big", 6))
    big.start()
    wait_for(lambda: budget.waiting == 1, 10, "the big request to queue")
    small = threading.Thread(target=take, args=("small", 1))
    small.start()
    wait_for(lambda: budget.waiting == 2, 10, "the small request to queue")
    # 1 pixel would fit next to the 6 held, but the small request arrived after the big one.
    assert admitted == [] and budget.in_use == 6
    budget.release(first)
    big.join(10)
    small.join(10)
    assert admitted == ["big", "small"]
    assert budget.in_use == 0 and budget.peak <= 10
    # An image larger than the whole budget is admitted alone.
    assert budget.acquire(25) == 10
    budget.release(10)


def test_decode_window_holds_no_picture_after_preprocessing_and_bounds_pixels_in_flight(tmp_path: Path, xrays_dir: Path) -> None:
    paths = xray_sample(xrays_dir, 6)
    huge = [_png(PILImage.new("RGBA", (4200, 4200))) for _ in range(3)]  # 17.6 M pixels each, all zeros
    ordinary = [path.read_bytes() for path in paths]
    budget = PixelBudget(20_000_000)  # room for one huge image and some ordinary ones
    bound = (64, 64)  # the model's input
    before = _large_pictures(bound)

    outcomes = _decode_all(huge + ordinary, tmp_path, budget)

    assert 4200 * 4200 <= budget.peak <= budget.capacity and budget.in_use == 0
    assert [decoded.size for decoded in outcomes[:3]] == [(4200, 4200)] * 3
    assert all(decoded.picture is None and decoded.tensor.shape == (3, 64, 64) for decoded in outcomes)
    # Every outcome is still held here, so nothing of the decode window can hide a bigger picture.
    assert _large_pictures(bound) - before == set()


def test_ordinary_radiographs_give_the_very_tensors_of_the_simple_path(tmp_path: Path, xrays_dir: Path, settings: Settings) -> None:
    """The model input equals PIL -> RGB -> the version's transform, to the bit."""
    paths = xray_sample(xrays_dir, 10)
    outcomes = _decode_all([p.read_bytes() for p in paths], tmp_path, PixelBudget(settings.decode_pixel_budget))
    transform = build_transform(PREPROCESSING)
    for path, decoded in zip(paths, outcomes):
        with PILImage.open(path) as picture:
            assert torch.equal(decoded.tensor, transform(picture.convert("RGB")))
            assert decoded.size == picture.size


def test_huge_radiographs_give_the_very_tensors_of_a_full_decode(tmp_path: Path, xrays_dir: Path) -> None:
    """A huge RGBA PNG is never converted at full size, yet its model input is the full decode's."""
    paths = xray_sample(xrays_dir, 3)
    blobs = [_upscaled_rgba(path, (2500, 3100)) for path in paths]

    outcomes = _decode_all(blobs, tmp_path, PixelBudget(8_000_000))

    transform = build_transform(PREPROCESSING)
    for data, decoded in zip(blobs, outcomes):
        assert torch.equal(decoded.tensor, transform(decode_image(data, 10**8)))


def test_a_7745_square_rgba_png_classifies_with_a_heat_map_of_its_own_shape(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    hostile = _png(PILImage.new("RGBA", (7745, 7745)))  # under the 60 M pixel limit, about 240 MB as RGBA
    files = {"zeros.png": hostile, **{p.name: p.read_bytes() for p in xray_sample(xrays_dir, 3)}}
    with db.transaction() as session:
        version = session.scalars(select(ModelVersion).where(ModelVersion.is_production.is_(True))).one()
        study = create_study(session, "hostile", version)
        ids = [add_upload(session, settings, study, name, data).id for name, data in files.items()]
        study_id = study.id

    report = classify_chunk(db, settings, PredictorCache(settings), study_id, ids)

    assert report.predicted == 4 and report.failed == 0 and report.study_done
    with db.transaction() as session:
        image = session.scalars(select(Image).where(Image.id == ids[0])).one()
        assert image.status == ImageStatus.DONE, image.error
        (prediction,) = image.predictions
        assert prediction.flagged  # the random tiny model is unsure of it (under its 0.9 threshold)
        heat_map = PILImage.open(io.BytesIO(heatmap_store(settings).read(prediction.heatmap_key)))
        assert heat_map.size == (512, 512)  # from the image's own size, not from the 64 px model input


@pytest.mark.parametrize("pixels", [0, -5])
def test_a_pixel_budget_must_be_positive(pixels: int) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        PixelBudget(pixels)

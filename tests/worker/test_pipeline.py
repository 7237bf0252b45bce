"""The chunk classifier run in-process against a real SQLite database and a real tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.config import Settings
from core.db import Database
from core.ml.pipeline import PredictorCache, classify_chunk
from core.models import Image, ImageStatus, ModelVersion, Prediction, Study, StudyStatus
from core.studies import add_upload, create_study
from tests.conftest import xray_sample


def _study_with_files(db: Database, settings: Settings, files: dict[str, bytes]) -> tuple[int, list[int]]:
    with db.transaction() as session:
        version = session.scalars(select(ModelVersion).where(ModelVersion.is_production.is_(True))).one()
        study = create_study(session, "pipeline test", version)
        ids = [add_upload(session, settings, study, name, data).id for name, data in files.items()]
        return study.id, ids


def test_chunk_classifies_every_good_image_and_fails_bad_ones_alone(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    good = {path.name: path.read_bytes() for path in xray_sample(xrays_dir, 10)}
    truncated = next(iter(good.values()))[:3000]
    files = {**good, "truncated.jpg": truncated, "notes.jpg": b"this is a text file, not a radiograph\n", "empty.jpg": b""}
    study_id, ids = _study_with_files(db, settings, files)

    report = classify_chunk(db, settings, PredictorCache(settings), study_id, ids)

    assert report.predicted == len(good)
    assert report.study_done
    with db.transaction() as session:
        images = {image.filename: image for image in session.scalars(select(Image).where(Image.study_id == study_id))}
        for name in good:
            assert images[name].status == ImageStatus.DONE, images[name].error
            (prediction,) = images[name].predictions
            assert prediction.model_version_id == production_model
            assert abs(sum(prediction.probabilities.values()) - 1.0) < 1e-5
            assert prediction.label in ("fracture", "no_fracture")
            assert prediction.flagged == (prediction.confidence < 0.9)
        assert images["truncated.jpg"].status == ImageStatus.FAILED
        assert "truncated" in images["truncated.jpg"].error
        assert images["notes.jpg"].status == ImageStatus.FAILED
        assert "not an image" in images["notes.jpg"].error
        assert images["empty.jpg"].status == ImageStatus.FAILED
        assert "empty file" in images["empty.jpg"].error
        assert session.get(Study, study_id).status == StudyStatus.DONE


def test_redelivered_chunk_leaves_exactly_one_prediction_per_image(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    files = {path.name: path.read_bytes() for path in xray_sample(xrays_dir, 6)}
    study_id, ids = _study_with_files(db, settings, files)
    cache = PredictorCache(settings)

    first = classify_chunk(db, settings, cache, study_id, ids)
    # A redelivery after a crash between writing and acknowledging: reset the status as if the
    # worker had died before its final commit, then run the same task again.
    with db.transaction() as session:
        for image in session.scalars(select(Image).where(Image.id.in_(ids[:3]))):
            image.status = ImageStatus.PROCESSING
    second = classify_chunk(db, settings, cache, study_id, ids)

    assert first.predicted == 6
    assert second.skipped == 3
    with db.transaction() as session:
        per_image = dict(
            session.execute(select(Prediction.image_id, func.count()).where(Prediction.image_id.in_(ids)).group_by(Prediction.image_id)).all()
        )
        assert per_image == {image_id: 1 for image_id in ids}
        assert all(image.status == ImageStatus.DONE for image in session.scalars(select(Image).where(Image.id.in_(ids))))


def test_image_that_keeps_killing_the_worker_is_failed_after_bounded_attempts(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    files = {path.name: path.read_bytes() for path in xray_sample(xrays_dir, 2)}
    study_id, ids = _study_with_files(db, settings, files)
    with db.transaction() as session:
        poison = session.get(Image, ids[0])
        poison.attempts = settings.max_image_attempts
        poison.status = ImageStatus.PROCESSING

    report = classify_chunk(db, settings, PredictorCache(settings), study_id, ids)

    assert report.predicted == 1 and report.failed == 1
    with db.transaction() as session:
        poison = session.get(Image, ids[0])
        assert poison.status == ImageStatus.FAILED
        assert "gave up after" in poison.error
        assert not poison.predictions


@pytest.mark.parametrize("fast_jpeg_decode", [False, True], ids=["full-decode", "fast-jpeg"])
def test_worker_probabilities_equal_the_simple_one_image_path(
    db: Database, settings: Settings, production_model: int, tiny_weights: dict, xrays_dir: Path, fast_jpeg_decode: bool
) -> None:
    """Threads, batching and bulk writes change nothing: same numbers as PIL -> transform -> model.

    With TRIAGE_FAST_JPEG_DECODE the simple path's picture is the draft, luminance-only decode
    converted to RGB: the worker's grey picture repeated into three channels must give the same numbers.
    """
    import torch
    from PIL import Image as PILImage
    from torchvision import transforms

    from core.imaging import decode_image
    from core.ml.modelio import create_model, load_state_dict_file, load_weights
    from core.ml.transforms import jpeg_draft_size

    settings = settings.model_copy(update={"fast_jpeg_decode": fast_jpeg_decode})
    paths = xray_sample(xrays_dir, 10)
    study_id, ids = _study_with_files(db, settings, {p.name: p.read_bytes() for p in paths})
    classify_chunk(db, settings, PredictorCache(settings), study_id, ids)

    model = load_weights(create_model(tiny_weights["architecture"], 2), load_state_dict_file(tiny_weights["weights_file"])).eval()
    preprocessing = tiny_weights["preprocessing"]
    simple = transforms.Compose([
        transforms.Resize((preprocessing.height, preprocessing.width)),
        transforms.ToTensor(),
        transforms.Normalize(list(preprocessing.mean), list(preprocessing.std)),
    ])
    by_name = {path.name: path for path in paths}
    with db.transaction() as session:
        for image in session.scalars(select(Image).where(Image.id.in_(ids))):
            if fast_jpeg_decode:
                draft = jpeg_draft_size(tiny_weights["preprocessing"])
                picture = decode_image(by_name[image.filename].read_bytes(), 10**8, draft_size=draft, grey=True).convert("RGB")
            else:
                picture = PILImage.open(by_name[image.filename]).convert("RGB")
            with torch.inference_mode():
                expected = torch.softmax(model(simple(picture).unsqueeze(0)), dim=1)[0].numpy()
            (prediction,) = image.predictions
            got = [prediction.probabilities[label] for label in tiny_weights["labels"]]
            assert max(abs(a - b) for a, b in zip(got, expected)) <= 1e-4


@pytest.mark.parametrize(("count", "batch_size"), [(0, 32), (1, 32), (8, 32), (9, 32), (64, 32), (130, 32), (7, 1), (5, 2)])
def test_batches_cover_every_image_once_with_a_short_first_batch(count: int, batch_size: int) -> None:
    from core.ml.decoding import batch_slices

    parts = batch_slices(count, batch_size)
    covered = [index for part in parts for index in range(count)[part]]
    assert covered == list(range(count))
    assert all(0 < part.stop - part.start <= batch_size for part in parts)
    if count > batch_size:
        assert parts[0].stop - parts[0].start == max(1, batch_size // 4)
        assert all(part.stop - part.start == batch_size for part in parts[1:-1])


def test_claiming_counts_the_attempt_and_refreshes_updated_at_for_the_reconciler(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    """The reconciler re-enqueues images idle too long by updated_at: a claim must reset that clock."""
    from datetime import datetime, timezone

    from sqlalchemy import update

    from core.studies import claim_images

    files = {path.name: path.read_bytes() for path in xray_sample(xrays_dir, 3)}
    study_id, ids = _study_with_files(db, settings, files)
    long_ago = datetime(2020, 1, 1, tzinfo=timezone.utc)
    with db.transaction() as session:
        session.execute(update(Image).where(Image.id.in_(ids)).values(updated_at=long_ago))
        session.execute(update(Image).where(Image.id == ids[2]).values(status=ImageStatus.DONE))
    with db.transaction() as session:
        chunk = claim_images(session, study_id, ids, max_attempts=3)
    assert [image.id for image in chunk.images] == ids[:2] and chunk.gave_up == []
    with db.transaction() as session:
        rows = {image.id: image for image in session.scalars(select(Image).where(Image.id.in_(ids)))}
        for image_id in ids[:2]:
            assert rows[image_id].status == ImageStatus.PROCESSING and rows[image_id].attempts == 1
            assert rows[image_id].updated_at.replace(tzinfo=timezone.utc) > long_ago
        assert rows[ids[2]].attempts == 0 and rows[ids[2]].status == ImageStatus.DONE
        assert session.get(Study, study_id).status == StudyStatus.PROCESSING


def test_each_prediction_records_its_decode_seconds_and_its_share_of_the_model_time(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    files = {path.name: path.read_bytes() for path in xray_sample(xrays_dir, 10)}  # batches of 2 and 8
    study_id, ids = _study_with_files(db, settings, files)

    report = classify_chunk(db, settings, PredictorCache(settings), study_id, ids)

    with db.transaction() as session:
        predictions = session.scalars(select(Prediction).where(Prediction.image_id.in_(ids)).order_by(Prediction.image_id)).all()
        assert len(predictions) == 10
        assert all(p.decode_seconds is not None and p.decode_seconds > 0 for p in predictions)
        assert all(p.model_seconds is not None and p.model_seconds > 0 for p in predictions)
        # The batch's forward pass is shared out equally among its images, so the shares add up to the model time.
        assert len({p.model_seconds for p in predictions[:2]}) == 1 and len({p.model_seconds for p in predictions[2:]}) == 1
        assert abs(sum(p.model_seconds for p in predictions) - report.seconds["model"]) < 1e-6


def test_after_a_crash_each_unfinished_image_is_tried_alone_with_its_attempt_counted_first(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    """Nothing else is in flight while a suspect is tried, so a crash can be charged to it alone."""
    from sqlalchemy import update

    from core.leases import process_identity
    from core.ml.pipeline import isolating_suspects
    from core.studies import claim_images

    files = {path.name: path.read_bytes() for path in xray_sample(xrays_dir, 5)}
    study_id, ids = _study_with_files(db, settings, files)
    suspects = ids[2:]
    with db.transaction() as session:  # in flight when a worker died, then re-queued by the reconciler
        session.execute(update(Image).where(Image.id.in_(suspects)).values(attempts=1))
    with db.transaction() as session:
        chunk = claim_images(session, study_id, ids, settings.max_image_attempts)

    def attempts() -> list[int]:
        with db.transaction() as session:
            return list(session.scalars(select(Image.attempts).where(Image.id.in_(ids)).order_by(Image.id)))

    groups = isolating_suspects(db, settings, chunk, process_identity())
    assert [image.id for image in next(groups)] == ids[:2] and attempts() == [1, 1, 1, 1, 1]
    assert [image.id for image in next(groups)] == [suspects[0]] and attempts() == [1, 1, 2, 1, 1]
    assert [image.id for image in next(groups)] == [suspects[1]] and attempts() == [1, 1, 2, 2, 1]


def test_a_redelivered_chunk_classifies_its_suspects_one_by_one(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    from sqlalchemy import update

    files = {path.name: path.read_bytes() for path in xray_sample(xrays_dir, 5)}
    study_id, ids = _study_with_files(db, settings, files)
    with db.transaction() as session:  # in flight when a worker died, then re-queued by the reconciler
        session.execute(update(Image).where(Image.id.in_(ids[2:])).values(attempts=1))

    report = classify_chunk(db, settings, PredictorCache(settings), study_id, ids)

    assert report.predicted == 5 and report.isolated == 3 and report.study_done
    with db.transaction() as session:
        rows = session.scalars(select(Image).where(Image.id.in_(ids)).order_by(Image.id)).all()
        assert [row.attempts for row in rows] == [1, 1, 2, 2, 2]
        assert {row.status for row in rows} == {ImageStatus.DONE}

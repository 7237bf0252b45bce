"""The unfamiliar-image flag: fitted at training, stored by sha256, computed by every runtime.

The model is the one ``scripts/run`` trains as its demo (test_resnet on the synthetic set), so the
first test is also the product's promise about the demo: real radiographs are not its world.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core import registry
from core.config import Settings
from core.db import Database
from core.imaging import decode_image
from core.ml.onnx_runtime import OnnxPredictor
from core.ml.predict import FLAG_UNFAMILIAR
from core.ml.quantize import quantize_int8
from core.ml.runtimes import load_predictor
from core.ml.unfamiliar import ReferenceError, UnfamiliarReference
from core.storage import sha256_file
from tests.conftest import xray_sample
from trainer.config import resolve_config
from trainer.synthetic import generate_dataset
from trainer.train import RunResult, register_run, run_training


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    """The demo recipe of ``triage demo``: test_resnet, 64 px, 12 epochs on synthetic images."""
    root = tmp_path_factory.mktemp("unfamiliar")
    generate_dataset(root / "data", per_class=150, image_size=64, seed=0)
    config = resolve_config("test_resnet", overrides={"image_size": 64, "epochs": 12})
    return run_training(root / "data", config, root / "run")


def _registered(db: Database, settings: Settings, run: RunResult) -> registry.ModelSpec:
    version_id = register_run(run, db, settings, "demo with reference", promote=True, demo=True)
    with db.transaction() as session:
        return registry.ModelSpec.from_version(registry.get_version(session, version_id))


def _photographs() -> list[Image.Image]:
    """Ordinary pictures that are not radiographs: scikit-image's sample photographs and drawings."""
    data = pytest.importorskip("skimage.data")
    names = ["astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
             "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina",
             "rocket", "text"]
    pictures = []
    for name in names:
        array = np.asarray(getattr(data, name)())
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        pictures.append(Image.fromarray(array.astype(np.uint8)).convert("RGB"))
    return pictures


def test_demo_model_flags_real_radiographs_and_photographs_as_unfamiliar(
    demo_run: RunResult, db: Database, settings: Settings, xrays_dir: Path
) -> None:
    spec = _registered(db, settings, demo_run)
    predictor = load_predictor(spec, settings)  # the CPU default: ONNX Runtime fp32
    assert isinstance(predictor, OnnxPredictor)
    synthetic = [decode_image(p.read_bytes(), 10**8) for p in sorted((Path(demo_run.extra["data_dir"]) / "test").glob("*/*.png"))]
    radiographs = [decode_image(p.read_bytes(), 10**8) for p in xray_sample(xrays_dir, 60)]
    photographs = _photographs()

    def unfamiliar_share(images: list[Image.Image]) -> float:
        results = predictor.predict_images(images)
        assert all(r.unfamiliar_score is not None for r in results)
        assert all((r.flag_kind == FLAG_UNFAMILIAR) == r.flag_reason.startswith("Unfamiliar") for r in results if r.flagged)
        return sum(r.flag_kind == FLAG_UNFAMILIAR for r in results) / len(results)

    assert unfamiliar_share(radiographs) >= 0.95
    assert unfamiliar_share(photographs) >= 0.95
    # its own kind of image stays familiar: about 1 - quantile (2.5 %) of held-out synthetic images
    assert unfamiliar_share(synthetic) <= 0.15
    assert demo_run.metrics["test"]["unfamiliar_rate"] <= 0.15


def test_reference_round_trips_through_the_registry_and_is_checked(
    demo_run: RunResult, db: Database, settings: Settings
) -> None:
    spec = _registered(db, settings, demo_run)
    assert demo_run.reference_file is not None
    assert spec.reference_sha256 == sha256_file(demo_run.reference_file)
    fitted = UnfamiliarReference.load(demo_run.reference_file)
    served = load_predictor(spec, settings.model_copy(update={"runtime": "torch"})).reference
    assert served is not None
    assert len(served.layers) == len(fitted.layers) > 1  # the stages' channel means and the penultimate features
    for served_layer, fitted_layer in zip(served.layers, fitted.layers):
        assert np.array_equal(served_layer.means, fitted_layer.means) and np.array_equal(served_layer.precision, fitted_layer.precision)
        assert served_layer.scale == fitted_layer.scale
    assert served.cut == fitted.cut == pytest.approx(demo_run.metrics["unfamiliar"]["cut"])
    with db.transaction() as session:
        stored = registry.get_version(session, spec.version_id)
        assert stored.metrics["unfamiliar"]["quantile"] == pytest.approx(0.975)
        assert stored.metrics["guarantee"]["delta"] == pytest.approx(0.05)

    path = registry.reference_path(settings, spec.reference_sha256)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ReferenceError, match="missing or altered"):
        load_predictor(spec, settings.model_copy(update={"runtime": "torch"}))


def test_every_runtime_returns_the_score_from_its_one_forward_pass(
    demo_run: RunResult, db: Database, settings: Settings, xrays_dir: Path
) -> None:
    spec = _registered(db, settings, demo_run)
    torch_predictor = load_predictor(spec, settings.model_copy(update={"runtime": "torch"}))
    onnx_predictor = load_predictor(spec, settings.model_copy(update={"runtime": "onnx"}))
    pictures = [decode_image(p.read_bytes(), 10**8) for p in xray_sample(xrays_dir, 8)]
    pictures += [decode_image(p.read_bytes(), 10**8) for p in sorted((Path(demo_run.extra["data_dir"]) / "val").glob("*/*.png"))[:8]]
    batch = torch_predictor.preprocess(pictures)
    torch_logits, torch_features = torch_predictor.predict_outputs(batch)
    onnx_logits, onnx_features = onnx_predictor.predict_outputs(batch)
    assert np.abs(torch_logits - onnx_logits).max() <= 1e-4
    torch_scores = torch_predictor.unfamiliar_scores(torch_features)
    onnx_scores = onnx_predictor.unfamiliar_scores(onnx_features)
    assert np.allclose(torch_scores, onnx_scores, rtol=1e-3, atol=1e-3)
    cut = torch_predictor.reference.cut
    assert np.array_equal(torch_scores > cut, onnx_scores > cut)

    build = quantize_int8(settings, spec, pictures, batch_size=4, min_speedup=0.0)
    assert build.installed
    int8 = load_predictor(spec, settings.model_copy(update={"runtime": "onnx-int8"}))
    int8_results = int8.predict_preprocessed(list(batch))
    assert all(r.unfamiliar_score is not None for r in int8_results)
    # int8 features are close enough to keep every clearly unfamiliar radiograph unfamiliar
    clear = torch_scores > 2 * cut
    assert all(r.flag_kind == FLAG_UNFAMILIAR for r, is_clear in zip(int8_results, clear) if is_clear)
    # The served int8 runtime (fp32 deciding the images near the cut or the threshold) flags as fp32
    # does at least as often as int8 alone.
    assert isinstance(int8, OnnxPredictor) and int8.second_opinion is not None
    fp32_flags = [(r.label, r.flag_kind) for r in onnx_predictor.predict_preprocessed(list(batch))]
    int8.second_opinion, second_opinion = None, int8.second_opinion
    alone_flags = [(r.label, r.flag_kind) for r in int8.predict_preprocessed(list(batch))]
    int8.second_opinion = second_opinion
    served_flags = [(r.label, r.flag_kind) for r in int8_results]
    assert sum(map(tuple.__eq__, served_flags, fp32_flags)) >= sum(map(tuple.__eq__, alone_flags, fp32_flags))


def test_colour_pictures_and_blank_frames_are_unfamiliar_from_their_pixels(
    demo_run: RunResult, db: Database, settings: Settings, xrays_dir: Path
) -> None:
    spec = _registered(db, settings, demo_run)
    predictor = load_predictor(spec, settings)
    reference = predictor.reference
    assert reference is not None and reference.colour_max is not None and reference.detail_min is not None
    radiographs = [decode_image(p.read_bytes(), 10**8) for p in xray_sample(xrays_dir, 8)]
    blank = [Image.new("RGB", (256, 256), (v, v, v)) for v in (0, 128, 255)]
    rng = np.random.default_rng(0)
    tinted = [Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))]
    problems = reference.input_problems(predictor.preprocess(radiographs + blank + tinted))
    # grey radiographs are never "colour"; this demo model, trained on busier synthetic pictures,
    # may find some too plain ("featureless"), which is its world, not theirs
    assert "a colour picture, not a radiograph" not in problems[:8]
    assert problems[8:11] == ["nearly featureless (blank or flat)"] * 3
    assert problems[11] == "a colour picture, not a radiograph"
    results = predictor.predict_images(blank + tinted)
    assert all(r.flag_kind == FLAG_UNFAMILIAR and r.flag_reason.startswith("Unfamiliar image: ") for r in results)
    # the checks travel with the reference file
    loaded = UnfamiliarReference.load(demo_run.reference_file)
    assert (loaded.colour_max, loaded.detail_min) == (reference.colour_max, reference.detail_min)


def test_references_of_the_first_format_still_score_as_before(tmp_path: Path) -> None:
    """Versions registered before the layered reference keep their flags: penultimate columns, unscaled."""
    from safetensors.numpy import save_file

    from core.ml.unfamiliar import PENULTIMATE_FORMAT, fit_reference

    rng = np.random.default_rng(0)
    means = rng.normal(size=(2, 4))
    precision = np.diag([1.0, 2.0, 3.0, 4.0])
    path = tmp_path / "v1.safetensors"
    save_file({"means": means, "precision": precision, "cut": np.array([7.0]), "quantile": np.array([0.975])},
              str(path), metadata={"format": PENULTIMATE_FORMAT})
    reference = UnfamiliarReference.load(path)
    penultimate = rng.normal(size=(5, 4))
    expected = np.min([np.einsum("nd,de,ne->n", penultimate - m, precision, penultimate - m) for m in means], axis=0)
    # today's features put the stages' channel means in front of the penultimate features
    features = np.concatenate([rng.normal(size=(5, 3)), penultimate], axis=1)
    assert np.allclose(reference.scores(features), expected)
    assert reference.cut == 7.0
    with pytest.raises(ReferenceError, match="expects 4"):
        reference.scores(penultimate[:, :3])

    # a layered reference reads exactly its width, and its layers must add up to the features
    layered = fit_reference(features, np.array([0, 1, 0, 1, 0]), features, layer_sizes=[3, 4])
    with pytest.raises(ReferenceError, match="expects 7"):
        layered.scores(np.concatenate([features, features[:, :1]], axis=1))
    with pytest.raises(ReferenceError, match="do not add up"):
        fit_reference(features, np.array([0, 1, 0, 1, 0]), features, layer_sizes=[3, 3])
    layered.save(tmp_path / "v2.safetensors")
    assert np.allclose(UnfamiliarReference.load(tmp_path / "v2.safetensors").scores(features), layered.scores(features))

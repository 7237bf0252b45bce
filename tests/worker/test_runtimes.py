"""Every runtime is built from the registered version, cached by its sha256, and agrees with torch."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core import registry
from core.config import Settings
from core.db import Database
from core.imaging import decode_image
from core.ml.onnx_runtime import OnnxPredictor, RuntimeUnavailable, SecondOpinion, runtime_path, top_log_odds
from core.ml.pipeline import PredictorCache
from core.ml.predict import Predictor
from core.ml.runtimes import load_predictor
from tests.conftest import PROJECT_ROOT, register_tiny_model, xray_sample
from tests.e2e.conftest import settings_env


def _spec(db: Database, version_id: int) -> registry.ModelSpec:
    with db.transaction() as session:
        return registry.ModelSpec.from_version(registry.get_version(session, version_id))


def _batch(xrays_dir: Path, predictor: Predictor, count: int = 12) -> torch.Tensor:
    images = [decode_image(p.read_bytes(), 10**8) for p in xray_sample(xrays_dir, count)]
    return predictor.preprocess(images)


def _export(net: torch.nn.Module, target: Path, outputs: tuple[str, ...] = ("logits",)) -> Path:
    """A small torch module as the product exports models: opset 17, dynamic batch, input named ``input``."""
    axes = {name: {0: "batch"} for name in ("input", *outputs)}
    torch.onnx.export(net, (torch.zeros(1, 3, 16, 16),), str(target), input_names=["input"], output_names=list(outputs),
                      dynamic_axes=axes, opset_version=17, dynamo=False)
    return target


def _qdq(fp32_file: Path, target: Path, inputs: np.ndarray, keep_float: list[str]) -> Path:
    """``fp32_file`` quantized as ``triage model quantize`` does it (QDQ, per channel, U8S8), calibrated on ``inputs``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([inputs[i : i + 4] for i in range(0, len(inputs), 4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {"input": batch}

    quantize_static(str(fp32_file), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, nodes_to_exclude=keep_float)
    return target


def test_onnx_fp32_matches_torch_and_is_cached_per_version(
    db: Database, settings: Settings, production_model: int, tiny_weights: dict, xrays_dir: Path, tmp_path: Path
) -> None:
    spec = _spec(db, production_model)
    torch_settings = settings.model_copy(update={"runtime": "torch"})
    torch_predictor = load_predictor(spec, torch_settings)
    assert not isinstance(torch_predictor, OnnxPredictor)
    onnx_settings = settings.model_copy(update={"runtime": "onnx"})
    onnx_predictor = load_predictor(spec, onnx_settings)
    assert isinstance(onnx_predictor, OnnxPredictor)
    batch = _batch(xrays_dir, torch_predictor)
    assert np.abs(onnx_predictor.predict_tensor(batch) - torch_predictor.predict_tensor(batch)).max() <= 1e-4

    # Another version (other weights) gets its own artifact; the first one's is never reused.
    torch.manual_seed(3)
    from core.ml.modelio import create_model, save_weights

    other_file = save_weights(create_model(spec.architecture, len(spec.labels)), tmp_path / "other.safetensors")
    other_id = register_tiny_model(db, settings, {**tiny_weights, "weights_file": other_file}, promote=False)
    other_spec = _spec(db, other_id)
    assert runtime_path(settings, other_spec, "onnx") != runtime_path(settings, spec, "onnx")
    cache = PredictorCache(onnx_settings)
    first, second = cache.get(spec), cache.get(other_spec)
    assert first is cache.get(spec) and first is not second
    assert np.abs(second.predict_tensor(batch) - load_predictor(other_spec, torch_settings).predict_tensor(batch)).max() <= 1e-4


def test_int8_runtime_is_built_by_the_cli_and_then_served(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    spec = _spec(db, production_model)
    int8_settings = settings.model_copy(update={"runtime": "onnx-int8"})
    try:
        load_predictor(spec, int8_settings)
    except RuntimeUnavailable as exc:
        assert f"triage model quantize {production_model}" in str(exc)
    else:
        raise AssertionError("int8 runtime served before it was built")

    result = subprocess.run(
        [sys.executable, "-m", "admin.cli", "model", "quantize", str(production_model), "--calibration", str(xrays_dir / "val"),
         "--count", "16", "--min-agreement", "0", "--min-speedup", "0"],
        env=settings_env(settings), cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "held-out images" in result.stdout and "installed at" in result.stdout
    assert "Collecting tensor data" not in result.stdout  # ONNX Runtime's calibration progress is not the user's business
    predictor = load_predictor(spec, int8_settings)
    assert isinstance(predictor, OnnxPredictor)
    reference = load_predictor(spec, settings.model_copy(update={"runtime": "torch"}))
    batch = _batch(xrays_dir, reference)
    int8, fp32 = predictor.predict_tensor(batch), reference.predict_tensor(batch)
    assert np.allclose(int8.sum(axis=1), 1.0, atol=1e-5)
    # A quantized model approximates the float one; a broken quantization (wrong scales, wrong
    # input layout) would be far off.
    assert np.abs(int8 - fp32).max() < 0.1


def test_auto_runtime_serves_onnx_on_cpu_with_a_torch_twin_for_heat_maps(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    spec = _spec(db, production_model)
    predictor = load_predictor(spec, settings.model_copy(update={"runtime": "auto", "device": "cpu"}))
    assert isinstance(predictor, OnnxPredictor)
    reference = load_predictor(spec, settings.model_copy(update={"runtime": "torch"}))
    batch = _batch(xrays_dir, reference, count=4)
    assert predictor.model is not None  # loaded on demand for Grad-CAM
    with torch.inference_mode():
        twin = torch.softmax(predictor.model(batch), dim=1).numpy()
    assert np.abs(twin - reference.predict_tensor(batch)).max() <= 1e-5


def test_int8_build_picks_the_percentile_by_held_out_agreement_and_refuses_a_poor_one(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    """The reported agreement is the served int8 model's, measured on the images it was not calibrated on."""
    from core.ml.onnx_runtime import ensure_fp32
    from core.ml.quantize import calibration_images, quantize_int8
    from core.ml.transforms import build_transform
    import onnxruntime as ort

    spec = _spec(db, production_model)
    images = calibration_images(xrays_dir / "val", 24)
    # What a build killed two days ago (out of memory, say) left beside the runtimes goes; nothing else does.
    killed_build = runtime_path(settings, spec, "onnx-int8").parent / ".building-killed.onnx"
    killed_build.parent.mkdir(parents=True, exist_ok=True)
    killed_build.write_bytes(b"half a model")
    os.utime(killed_build, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    # Speed is not what this test is about (tiny models can be slower in int8): min_speedup=0.
    build = quantize_int8(settings, spec, images, percentiles=(99.0, 99.999), min_speedup=0.0)
    assert not killed_build.exists() and runtime_path(settings, spec, "onnx").exists()
    assert build.installed and build.path == runtime_path(settings, spec, "onnx-int8") and build.path.exists()
    assert set(build.tried) == {(p, w) for p in (99.0, 99.999) for w in ("int8", "uint8")}
    assert build.agreement == build.tried[(build.percentile, build.weights)]

    transform = build_transform(spec.preprocessing)
    held_out = np.stack([transform(image).numpy() for image in images[1::2]])
    assert build.held_out == len(held_out) == 12

    def labels(path: Path) -> np.ndarray:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"input": held_out})[0].argmax(1)

    assert float((labels(build.path) == labels(ensure_fp32(settings, spec))).mean()) == build.agreement

    # The installed file carries the margins of its second opinion, measured on the held-out images.
    assert build.second_opinion is not None and build.second_opinion.log_odds_margin > 1e-5
    metadata = ort.InferenceSession(str(build.path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert SecondOpinion.from_metadata(metadata) == build.second_opinion
    assert set(build.asked) == set(build.tried) and all(0.0 <= share <= 1.0 for share in build.asked.values())

    # With threshold 0 fp32 flags nothing, so "same label, still unflagged" is plain agreement.
    unflagging = quantize_int8(settings, dataclasses.replace(spec, threshold=0.0), images, percentiles=(build.percentile,),
                               weight_types=(build.weights,), min_speedup=0.0)
    assert unflagging.unflagged == 12 and unflagging.unflagged_kept == round(build.agreement * 12)

    # Asking for more agreement than any candidate reached installs nothing and removes the old one.
    refused = quantize_int8(settings, spec, images, percentiles=(99.999,), min_agreement=1.01, min_speedup=0.0)
    assert not refused.installed and not runtime_path(settings, spec, "onnx-int8").exists()
    assert "below 101.0%" in refused.refused_because and refused.second_opinion is None

    # A candidate must also be as fast as asked, timed against fp32 on the same held-out images.
    assert set(build.speedups) == set(build.tried) and all(speedup > 0 for speedup in build.speedups.values())
    slow = quantize_int8(settings, spec, images, percentiles=(99.999,), weight_types=("int8",), min_speedup=1e6)
    assert not slow.installed and not runtime_path(settings, spec, "onnx-int8").exists()
    assert slow.refused_because.startswith("no candidate is 1e+06x as fast as fp32")
    int8_settings = settings.model_copy(update={"runtime": "onnx-int8"})
    try:
        load_predictor(spec, int8_settings)
    except RuntimeUnavailable:
        pass
    else:
        raise AssertionError("a refused int8 runtime was served")


def test_outside_its_margins_int8_decides_as_fp32_does_and_inside_them_fp32_decides() -> None:
    """The second opinion's rule, on outputs drawn like a model's and its int8 copy's (no model needed)."""
    rng = np.random.default_rng(7)
    temperature, threshold = 1.5, 0.8
    fp32_logits = rng.normal(0, 4.0, (4000, 3))
    int8_logits = fp32_logits + rng.normal(0, 0.1, fp32_logits.shape)
    fp32_relative = rng.lognormal(-0.4, 0.35, len(fp32_logits))
    int8_relative = fp32_relative + rng.normal(0, 0.02, len(fp32_logits))

    def decisions(logits: np.ndarray, relative: np.ndarray) -> list[tuple[int | None, bool]]:
        """The triage decision: the label of an image accepted without review (None: reviewed), flagged unfamiliar."""
        probabilities = torch.softmax(torch.from_numpy(logits) / temperature, dim=1).numpy()
        unfamiliar = relative > 1.0
        accepted = (probabilities.max(axis=1) >= threshold) & ~unfamiliar
        labels = probabilities.argmax(axis=1).tolist()
        return [(label if ok else None, strange) for label, ok, strange in zip(labels, accepted.tolist(), unfamiliar.tolist())]

    # Log-odds of the top class match the probabilities they stand for.
    top = torch.softmax(torch.from_numpy(fp32_logits) / temperature, dim=1).numpy().max(axis=1)
    assert np.allclose(top_log_odds(fp32_logits, temperature), np.log(top / (1 - top)))

    held_out = slice(0, 500)  # the images the quantizer measures the margins on
    margins = SecondOpinion.measured(int8_logits[held_out], fp32_logits[held_out], temperature,
                                     int8_relative[held_out], fp32_relative[held_out])
    change = (int8_logits[held_out] - fp32_logits[held_out]) / temperature
    assert margins.log_odds_margin == pytest.approx(np.quantile(change.max(axis=1) - change.min(axis=1), 0.95))
    asked = margins.needed(int8_logits, temperature, threshold, int8_relative)
    served = np.where(asked[:, None], fp32_logits, int8_logits), np.where(asked, fp32_relative, int8_relative)
    expected, alone, given = decisions(fp32_logits, fp32_relative), decisions(int8_logits, int8_relative), decisions(*served)
    # About one image in twenty deviates beyond the margins, and only those also near a decision can
    # change it; int8 alone changes dozens.
    assert sum(a != b for a, b in zip(given, expected)) <= 4 < 30 < sum(a != b for a, b in zip(alone, expected))
    assert asked.mean() < 0.3  # only the images near a decision run twice

    # A threshold of 1.0 flags every image for review and 0 none, so confidence never needs fp32's opinion then.
    assert not margins.needed(int8_logits, temperature, 1.0).any() and not margins.needed(int8_logits, temperature, 0.0).any()
    assert SecondOpinion.from_metadata(margins.metadata()) == margins
    assert SecondOpinion.from_metadata({}) is None  # an int8 file built before second opinions serves int8 alone


def test_a_served_int8_runtime_hands_fp32_exactly_the_images_its_margins_select(
    db: Database, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    from core.ml.quantize import calibration_images, quantize_int8

    spec = _spec(db, production_model)
    quantize_int8(settings, spec, calibration_images(xrays_dir / "val", 16), percentiles=(99.999,), weight_types=("int8",),
                  min_speedup=0.0)
    int8_settings = settings.model_copy(update={"runtime": "onnx-int8"})
    served, alone = load_predictor(spec, int8_settings), load_predictor(spec, int8_settings)
    assert isinstance(served, OnnxPredictor) and isinstance(alone, OnnxPredictor)
    assert served.second_opinion is not None  # read from the installed file
    fp32 = served.second_opinion[1]
    alone.second_opinion = None
    batch = _batch(xrays_dir, served, count=24)
    alone_logits, alone_features = alone.predict_outputs(batch)
    fp32_logits, fp32_features = fp32.predict_outputs(batch)
    assert np.abs(alone_logits - fp32_logits).max() > 0  # int8 rounding shows
    # A threshold and margins that put about half of these images near the threshold, so both kinds occur.
    confidence = torch.softmax(torch.from_numpy(alone_logits) / spec.temperature, dim=1).max(dim=1).values.numpy()
    threshold = float(np.median(confidence))
    served.spec = dataclasses.replace(spec, threshold=threshold)
    distance = np.abs(top_log_odds(alone_logits, spec.temperature) - np.log(threshold / (1 - threshold)))
    margins = SecondOpinion(log_odds_margin=float(np.median(distance)), score_margin=0.0)
    served.second_opinion = (margins, fp32)
    relative_scores = None if alone.reference is None else alone.reference.relative_scores(alone_features)
    asked = margins.needed(alone_logits, spec.temperature, threshold, relative_scores)
    assert 0 < asked.sum() < len(batch)

    logits, features = served.predict_outputs(batch)
    assert np.array_equal(logits[~asked], alone_logits[~asked]) and np.array_equal(features[~asked], alone_features[~asked])
    assert np.allclose(logits[asked], fp32_logits[asked], atol=1e-5) and np.allclose(features[asked], fp32_features[asked], atol=1e-5)
    assert served.second_opinions_asked == int(asked.sum())


def test_onnx_sessions_take_their_share_of_the_cores_and_do_not_spin(
    db: Database, settings: Settings, production_model: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.ml import devices

    monkeypatch.setattr(devices, "usable_cores", lambda: 8)
    spec = _spec(db, production_model)
    torch_threads = torch.get_num_threads()
    try:
        shared = load_predictor(spec, settings.model_copy(update={"runtime": "onnx", "torch_threads": 0, "worker_concurrency": 4}))
        options = shared.session.get_session_options()
        assert options.intra_op_num_threads == 2  # 8 cores among 4 pool children
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert torch.get_num_threads() == 2
        pinned = load_predictor(spec, settings.model_copy(update={"runtime": "onnx", "torch_threads": 3}))
        assert pinned.session.get_session_options().intra_op_num_threads == 3
    finally:
        torch.set_num_threads(torch_threads)


def test_pad_sizes_computed_from_shapes_are_kept_out_of_int8(tmp_path: Path) -> None:
    """TF-style "same" padding computes its sizes in the graph; quantizing them would shift the windows."""
    import onnx
    from onnx import TensorProto, helper

    from core.ml.quantize import pad_size_nodes

    const = lambda name, values: helper.make_node("Constant", [], [name], name=name, value=helper.make_tensor(  # noqa: E731
        name, TensorProto.FLOAT, [len(values)], values))
    nodes = [
        helper.make_node("Shape", ["input"], ["shape"], name="shape"),
        helper.make_node("Cast", ["shape"], ["shape_f"], name="cast_f", to=TensorProto.FLOAT),
        const("two", [2.0, 2.0, 2.0, 2.0]),
        helper.make_node("Div", ["shape_f", "two"], ["half"], name="div"),
        helper.make_node("Ceil", ["half"], ["ceil"], name="ceil"),
        const("sub", [1.0, 1.0, 1.0, 1.0]),
        helper.make_node("Sub", ["ceil", "sub"], ["size"], name="sizes"),
        helper.make_node("Concat", ["size", "size"], ["pads_f"], name="concat", axis=0),
        helper.make_node("Cast", ["pads_f"], ["pads"], name="cast_i", to=TensorProto.INT64),
        helper.make_node("Pad", ["input", "pads"], ["padded"], name="pad"),
        helper.make_node("Relu", ["padded"], ["output"], name="relu"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    found = set(pad_size_nodes(tmp_path / "m.onnx"))
    assert found == {"shape", "cast_f", "two", "div", "ceil", "sub", "sizes", "concat", "cast_i"}
    assert not found & {"pad", "relu"}  # the activations themselves are still quantized


def test_the_stem_convolution_and_its_padding_are_kept_out_of_int8(tmp_path: Path) -> None:
    """The input's grey levels do not sit on an int8 grid; the first convolution must see them exactly."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from core.ml.quantize import stem_nodes

    weights = numpy_helper.from_array(np.ones((2, 3, 3, 3), dtype=np.float32), "w")
    pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64), "pads")
    nodes = [
        helper.make_node("Shape", ["input"], ["shape"], name="shape"),  # what TF-style padding sizes start from
        helper.make_node("Pad", ["input", "pads"], ["padded"], name="stem_pad"),
        helper.make_node("Conv", ["padded", "w"], ["stem"], name="stem_conv"),
        helper.make_node("Relu", ["stem"], ["act"], name="act"),
        helper.make_node("Conv", ["act", "w2"], ["output"], name="second_conv"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        initializer=[weights, pads, numpy_helper.from_array(np.ones((2, 2, 1, 1), dtype=np.float32), "w2")],
    )
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    assert stem_nodes(tmp_path / "m.onnx") == ["stem_pad", "stem_conv"]

    # An input that feeds more than one node has no single stem: nothing is kept out.
    graph.node.append(helper.make_node("Relu", ["input"], ["side"], name="side"))
    onnx.save(helper.make_model(graph), tmp_path / "branch.onnx")
    assert stem_nodes(tmp_path / "branch.onnx") == []


def test_a_convolution_kept_in_float_stays_float_in_the_served_session(tmp_path: Path) -> None:
    """ONNX Runtime must not re-quantize, per tensor, the weights of a node the quantizer left in float.

    A depthwise convolution whose channels' weights differ by orders of magnitude (as batch norm
    folding makes them) is kept in float between quantized neighbours. The served session must
    compute what the QDQ graph says (ONNX Runtime with every rewrite off), not erase the small channels.
    """
    import onnx
    import onnxruntime as ort

    from core.ml.onnx_runtime import inference_session

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.expand = torch.nn.Conv2d(3, 8, 1)
            self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.project = torch.nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.project(self.depthwise(torch.relu(self.expand(x)))).mean(dim=(2, 3))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # channel scales from 1e-3 to 1e0
        net.depthwise.weight.mul_(torch.logspace(-3, 0, 8).view(8, 1, 1, 1))
    fp32_file = _export(net, tmp_path / "fp32.onnx")
    depthwise = [node.name for node in onnx.load(str(fp32_file)).graph.node if "depthwise" in node.name]
    assert len(depthwise) == 1
    inputs = np.random.default_rng(0).random((16, 3, 16, 16), dtype=np.float32)
    int8_file = _qdq(fp32_file, tmp_path / "int8.onnx", inputs, depthwise)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    qdq = ort.InferenceSession(str(int8_file), plain, providers=["CPUExecutionProvider"]).run(["logits"], {"input": inputs})[0]
    served = inference_session(int8_file).run(["logits"], {"input": inputs})[0]
    fp32 = inference_session(fp32_file).run(["logits"], {"input": inputs})[0]
    scale = float(np.abs(fp32).max())
    assert float(np.abs(qdq - fp32).max()) < 0.02 * scale  # the QDQ graph itself is close to fp32 (0.4 % here)
    # The served session computes that graph (identical here; fused integer kernels may round apart).
    # Re-quantizing the float depthwise weights per tensor put it 0.22 % of the scale away.
    assert float(np.abs(served - qdq).max()) < 0.0005 * scale


def test_an_early_convolution_that_amplifies_int8_rounding_is_kept_in_float_with_the_layers_before_it(tmp_path: Path) -> None:
    """Large weights feeding a narrow ReLU6 window turn the rounding of their input into big errors.

    Such a convolution's noise gain (input step times weight norm, over output step) stands out;
    kept in float together with what feeds it (so its input is exact, not only its weights), the
    int8 model is much closer to fp32 than quantized throughout.
    """
    import onnx

    from core.ml.onnx_runtime import inference_session
    from core.ml.quantize import MAX_NOISE_GAIN, float_prefix, noise_gains

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = torch.nn.Conv2d(3, 8, 1)
            self.loud = torch.nn.Conv2d(8, 8, 1)
            self.last = torch.nn.Conv2d(8, 4, 1)
            self.late = torch.nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hidden = torch.nn.functional.relu6(self.first(x))
            return self.late(torch.relu(self.last(torch.nn.functional.relu6(self.loud(hidden))))).flatten(1)

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        # Correlated hidden channels (a shared part and a small own part each) read by large weights that
        # sum to zero, as batch-norm folding makes them where a channel varies little: the output stays
        # in ReLU6's window while the input's independent rounding errors add up.
        net.first.weight.copy_(1 / 3 + 0.05 * torch.randn(8, 3, 1, 1))
        net.first.bias.zero_()
        zero_sum = torch.randn(8, 8)
        net.loud.weight.copy_(40 * (zero_sum - zero_sum.mean(dim=1, keepdim=True)).view(8, 8, 1, 1))
        net.loud.bias.fill_(3.0)
    fp32_file = _export(net, tmp_path / "fp32.onnx")
    inputs = np.random.default_rng(0).random((16, 3, 16, 16), dtype=np.float32)
    quantized = lambda name, keep_float: _qdq(fp32_file, tmp_path / name, inputs, keep_float)  # noqa: E731

    everything = quantized("all.onnx", [])
    gains = noise_gains(everything)
    assert set(gains) == {"/first/Conv", "/loud/Conv", "/last/Conv", "/late/Conv"}
    assert gains["/loud/Conv"] > MAX_NOISE_GAIN > max(gain for name, gain in gains.items() if name != "/loud/Conv")

    prefix = float_prefix(everything, fp32_file, reach=0.5)
    assert {"/first/Conv", "/loud/Conv"} <= set(prefix) and not {"/last/Conv", "/late/Conv"} & set(prefix)
    kinds = {node.name: node.op_type for node in onnx.load(str(fp32_file)).graph.node}
    assert {kinds[name] for name in prefix} == {"Conv", "Clip", "Constant"}  # what feeds it (ReLU6 and its bounds), not what follows
    # Beyond its reach (here: the first convolution only), a loud convolution is left quantized.
    assert float_prefix(everything, fp32_file, reach=0.25) == []

    def error(path: Path) -> float:
        run = lambda f: inference_session(f).run(["logits"], {"input": inputs})[0]  # noqa: E731  (as the worker serves it)
        return float(np.sqrt(np.mean((run(path) - run(fp32_file)) ** 2)))

    quantized_error, prefix_error, alone_error = error(everything), error(quantized("prefix.onnx", prefix)), error(quantized("alone.onnx", ["/loud/Conv"]))
    assert prefix_error < 0.5 * quantized_error
    assert prefix_error < alone_error  # in float but reading a rounded input, it keeps most of the error


def test_the_features_are_gathered_in_float_so_small_layers_keep_their_resolution(tmp_path: Path) -> None:
    """The feature vector puts layers of very different sizes side by side; one int8 scale for all crushes the small ones."""
    import onnx

    from core.ml.onnx_runtime import inference_session
    from core.ml.quantize import feature_only_nodes

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.early = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.late = torch.nn.Conv2d(8, 16, 3, padding=1)
            self.head = torch.nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            early = torch.relu(self.early(x))
            penultimate = torch.relu(self.late(early)).mean(dim=(2, 3))
            return self.head(penultimate), torch.cat([early.mean(dim=(2, 3)), penultimate], dim=1)

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # an early stage whose channel means are a hundredth of the penultimate features'
        net.early.weight.mul_(0.01)
        net.early.bias.mul_(0.01)
        net.late.weight.mul_(100.0)
    fp32_file = _export(net, tmp_path / "fp32.onnx", ("logits", "features"))
    kinds = {node.name: node.op_type for node in onnx.load(str(fp32_file)).graph.node}
    gathering = feature_only_nodes(fp32_file)
    assert {kinds[name] for name in gathering} == {"ReduceMean", "Concat"}  # the early means and the concatenation
    assert not any(kinds[name] in ("Conv", "Gemm") for name in gathering)  # nothing the logits need
    inputs = np.random.default_rng(0).random((16, 3, 16, 16), dtype=np.float32)

    def early_error(name: str, keep_float: list[str]) -> float:
        path = _qdq(fp32_file, tmp_path / name, inputs, keep_float)
        run = lambda f: inference_session(f).run(["features"], {"input": inputs})[0][:, :8]  # noqa: E731
        reference = run(fp32_file)
        return float(np.sqrt(np.mean((run(path) - reference) ** 2)) / np.sqrt(np.mean(reference**2)))

    quantized, gathered_in_float = early_error("all.onnx", []), early_error("gathered.onnx", gathering)
    assert gathered_in_float < 0.05 < quantized


def test_the_builds_timing_keeps_the_faster_of_two_runs_of_the_whole_held_out_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """One timed run is at the mercy of the machine's other work; the build keeps the faster of two."""
    from core.ml import quantize

    class Session:
        """Stands in for an ONNX Runtime session: logits and features computed from the input."""

        def __init__(self) -> None:
            self.batch_sizes: list[int] = []

        def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            batch = feeds["input"]
            self.batch_sizes.append(len(batch))
            outputs = {"logits": batch.sum(axis=(2, 3)), "features": batch.mean(axis=(2, 3))}
            return [outputs[name] for name in names]

    readings = iter([100.0, 105.0, 200.0, 202.5])  # the first timed run takes 5 s, the second 2.5 s
    monkeypatch.setattr(quantize.time, "perf_counter", lambda: next(readings))
    session = Session()
    batch = np.random.default_rng(0).random((70, 3, 4, 4), dtype=np.float32)
    logits, features, seconds = quantize._timed_outputs(session, batch, chunk=32)
    assert seconds == 2.5
    assert session.batch_sizes == [32] + [32, 32, 6] * 2  # a warm-up chunk, then the whole batch twice
    np.testing.assert_allclose(logits, batch.sum(axis=(2, 3)), rtol=1e-6)
    np.testing.assert_allclose(features, batch.mean(axis=(2, 3)), rtol=1e-6)


def test_the_quantizers_chatter_is_kept_off_the_console_and_its_clipped_biases_counted(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """ONNX Runtime prints calibration progress and warns once per clipped bias (33 times on the recipe model)."""
    import logging

    from core.ml.quantize import _quiet_quantizer

    with caplog.at_level(logging.INFO), _quiet_quantizer() as clipped:
        print("Collecting tensor data and making histogram ...")
        for name in ("a", "b"):
            logging.warning(f"Quantized bias `{name}` exceeds the range of a int32. The bias scale is too small.")
        logging.warning("something else ONNX Runtime has to say")
    logging.warning("Quantized bias `c` exceeds the range of a int32. The bias scale is too small.")  # after: shown again

    assert clipped.count == 2
    assert capsys.readouterr().out == ""
    assert [record.getMessage()[:18] for record in caplog.records] == ["something else ONN", "Quantized bias `c`"]

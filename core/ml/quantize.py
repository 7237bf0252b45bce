"""Int8 static quantization of a registered version's ONNX model, calibrated on real images.

The int8 model is calibrated on real images (the validation split) with QDQ static quantization,
per-channel weights and percentile activation ranges, the percentile chosen by label agreement with
fp32 on held-out images; build it once with ``triage model quantize``, which reports that agreement.
The same held-out images measure how far int8's logits and unfamiliar scores stray from
fp32's; those margins are stored in the int8 file, and the served runtime asks fp32 about the images
that lie within them of a decision (:class:`core.ml.onnx_runtime.SecondOpinion`).
:mod:`core.ml.onnx_runtime` serves what this module builds.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from core.config import Settings
from core.files import remove_stale_temporaries, sibling_temp_path
from core.imaging import ImageDecodeError, decode_image
from core.ml.onnx_runtime import (
    BUILDING_PREFIX, RuntimeUnavailable, SecondOpinion, ensure_fp32, inference_session, runtime_path,
)
from core.ml.predict import load_reference, probabilities_from_logits, spec_reference_file
from core.ml.transforms import build_transform
from core.ml.unfamiliar import UnfamiliarReference
from core.registry import ModelSpec

log = logging.getLogger(__name__)


def calibration_images(folder: Path, limit: int) -> list[Image.Image]:
    """Up to ``limit`` decodable images from ``folder`` (recursively, sorted, spread over classes)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("."))
    step = max(1, len(files) // max(1, limit))
    images: list[Image.Image] = []
    for path in files[::step]:
        try:
            images.append(decode_image(path.read_bytes(), max_pixels=200_000_000))
        except ImageDecodeError:
            continue
        if len(images) >= limit:
            break
    if not images:
        raise RuntimeUnavailable(f"no decodable calibration images under {folder}")
    return images


def _confidence(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Top probability per row after the version's temperature, as the worker computes it."""
    return probabilities_from_logits(torch.from_numpy(logits), temperature).max(dim=1).values.numpy()


#: Activation-range percentiles tried by :func:`quantize_int8`; the held-out images pick one.
CANDIDATE_PERCENTILES = (99.9, 99.99, 99.999)
#: Weight types tried with each percentile. Signed weights (U8S8) are ONNX Runtime's default and
#: fastest, but on x86 CPUs without VNNI (AVX2 only, as on this project's VM) its u8 x s8 products
#: can saturate in 16 bits; unsigned weights (U8U8) avoid that. On the recipe-cpu model here U8U8
#: agreed with fp32 on 96.4 % of the test images against 95.6 % for U8S8 (bench/README.md).
WEIGHT_TYPES = ("int8", "uint8")


@dataclass(frozen=True)
class Int8Build:
    """The int8 runtime built for a version and how well it agrees with fp32 on held-out images."""

    path: Path
    percentile: float
    #: the weight type chosen (one of :data:`WEIGHT_TYPES`)
    weights: str
    agreement: float
    held_out: int
    #: label agreement on the held-out images for every (percentile, weight type) tried
    tried: dict[tuple[float, str], float]
    #: False when the agreement was below ``min_agreement``: nothing was written to ``path``
    installed: bool
    #: held-out images fp32 leaves unflagged (confident enough and, with a reference, familiar: no review) ...
    unflagged: int = 0
    #: ... and on how many of them the chosen int8 model alone gives the same label and leaves them unflagged too
    unflagged_kept: int = 0
    #: fp32's time over each candidate's on the held-out images (> 1: int8 is faster), per (percentile, weight type),
    #: the candidate's time including the fp32 runs of its second opinion
    speedups: dict[tuple[float, str], float] = field(default_factory=dict)
    #: share of the held-out images each candidate hands to fp32 (:class:`SecondOpinion`)
    asked: dict[tuple[float, str], float] = field(default_factory=dict)
    #: the margins stored with the installed runtime (None when nothing was installed)
    second_opinion: SecondOpinion | None = None
    #: why nothing was installed ("" when it was)
    refused_because: str = ""
    #: nodes kept in float because an early convolution amplifies int8 rounding too much (:func:`float_prefix`)
    float_prefix: tuple[str, ...] = ()

    @property
    def speedup(self) -> float:
        """The chosen candidate's speed-up over fp32 on the held-out images, second opinions included (0: not measured)."""
        return self.speedups.get((self.percentile, self.weights), 0.0)

    @property
    def asked_share(self) -> float:
        """The share of held-out images the chosen candidate hands to fp32."""
        return self.asked.get((self.percentile, self.weights), 0.0)


class _ClippedBiases(logging.Filter):
    """Counts, and keeps off the console, ONNX Runtime's one warning per bias clipped to int32.

    ONNX Runtime widens a weight's scale so that its bias fits int32 only for symmetric (signed)
    weights; with unsigned weights, channels whose folded weights are near zero (batch norm gamma
    near 0) get their bias clipped, one root-logger warning each (33 on the recipe model).
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop) for a clipped-bias warning, which is counted; True for anything else."""
        if "exceeds the range of a int32" in record.getMessage():
            self.count += 1
            return False
        return True


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[_ClippedBiases]:
    """Run ONNX Runtime's quantizer without its progress prints; yields the clipped-bias count."""
    clipped = _ClippedBiases()
    root = logging.getLogger()
    root.addFilter(clipped)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield clipped
    finally:
        root.removeFilter(clipped)


def _outputs(session: Any, batch: np.ndarray, chunk: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Logits and features of ``batch`` through an ONNX session, ``chunk`` images at a time."""
    parts = [session.run(["logits", "features"], {"input": batch[i : i + chunk]}) for i in range(0, len(batch), chunk)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _timed_outputs(
    session: Any, batch: np.ndarray, chunk: int = 32, runs: int = 2
) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`_outputs` of ``batch`` and the fastest of ``runs`` timings, after a warm-up run of one chunk.

    A session's first run of a batch size allocates and plans; without the warm-up, whichever
    session happened to run first would look slower and the fp32-to-int8 speed-up would depend on
    call order. One timed run is at the mercy of whatever else the machine does at that moment
    (the build's verdict on the recipe model swung between 0.72x and 1.04x); the fastest of two is
    what the runtime can do.
    """
    session.run(["logits"], {"input": batch[:chunk]})
    seconds = []
    for _ in range(max(runs, 1)):
        clock = time.perf_counter()
        logits, features = _outputs(session, batch, chunk)
        seconds.append(time.perf_counter() - clock)
    return logits, features, min(seconds)


def _accepted(logits: np.ndarray, features: np.ndarray, spec: ModelSpec, reference: UnfamiliarReference | None) -> np.ndarray:
    """Which images the worker's rule leaves unflagged: confident enough and, with a reference, familiar."""
    accepted = _confidence(logits, spec.temperature) >= spec.threshold
    if reference is not None:
        accepted &= reference.scores(features) <= reference.cut
    return accepted


def pad_size_nodes(model_path: Path) -> list[str]:
    """Names of the nodes that compute a ``Pad``'s sizes from tensor shapes (TF-style "same" padding).

    timm's ``tf_*`` models pad stride-2 convolutions by amounts computed in the graph (Shape,
    Gather, Div, Ceil, ..., Concat). Quantizing those small float vectors rounds a pad of 1 to
    0.99, which the cast to int64 makes 0: every stride-2 window shifts by a pixel. They must stay
    in float. On the recipe-cpu model, keeping them so raised int8's label agreement with fp32 on
    the test split from 94.9 % to 96.3 % (bench/README.md).
    """
    import onnx

    model = onnx.load(str(model_path))
    producers = {output: node for node in model.graph.node for output in node.output}
    found: dict[str, None] = {}
    pending = [name for node in model.graph.node if node.op_type == "Pad" for name in node.input[1:] if name]
    while pending:
        node = producers.get(pending.pop())
        if node is None or node.name in found:
            continue
        found[node.name] = None
        if node.op_type != "Shape":  # a shape is where the sizes start; its input is the activation
            pending.extend(name for name in node.input if name)
    return list(found)


#: Operators that may stand between the network's input and its first convolution (TF-style padding).
_STEM_PASSTHROUGH = ("Pad", "Identity", "Cast")


def stem_nodes(model_path: Path) -> list[str]:
    """Names of the first convolution and the nodes between it and the network's input (its padding).

    The input is an 8-bit picture already, but not on a grid int8 can hold: mean = std = 0.5
    puts its 256 grey levels half a step away from any integer zero point, so quantizing it moves
    every pixel by up to half a level, and by the same amount wherever the grey is the same. The
    stem's weights, with batch norm folded in, are large and see three identical channels, so that
    error does not average out: on the recipe-cpu model the stem's output was off by 1.3 on values
    averaging 2.2. The stem costs a few per cent of the network's operations; kept in float, label
    agreement with fp32 rose from 97.7 to 99.2 % on held-out val and from 96.1 to 97.5 % on test
    (bench/README.md).
    """
    import onnx

    model = onnx.load(str(model_path))
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = [value.name for value in model.graph.input if value.name not in initializers]
    path: list[str] = []
    tensor = inputs[0] if len(inputs) == 1 else None
    while tensor is not None:
        following = [node for node in consumers.get(tensor, []) if node.op_type != "Shape"]  # shapes read no values
        if len(following) != 1:
            return []
        node = following[0]
        path.append(node.name)
        if node.op_type == "Conv":
            return path
        if node.op_type not in _STEM_PASSTHROUGH:
            return []
        tensor = node.output[0]
    return []


def feature_only_nodes(model_path: Path, features: str = "features", logits: str = "logits") -> list[str]:
    """Names of the nodes that compute only the ``features`` output (none of them feeds the logits).

    The features are the channel means of several stages side by side with the penultimate layer
    (:func:`core.ml.modelio.logits_and_features`), of very different sizes. Quantized, the final
    ``Concat`` gives all of them one int8 scale, and the small stages' means round to a few levels:
    on the recipe model the first stage's distances to the unfamiliar reference then correlated only
    0.68 with fp32's (1.000 gathered in float), and even with its reference rescaled on all 615 val
    images int8 flagged 4.8 % of the test images unfamiliar against fp32's 2.6 % (bench/README.md).
    In float these means and the concatenation cost nothing measurable.
    """
    import onnx

    model = onnx.load(str(model_path))
    producers = {output: node for node in model.graph.node for output in node.output}
    only = _upstream_nodes(producers, features) - _upstream_nodes(producers, logits)
    return [node.name for node in model.graph.node if node.name in only]


def _upstream_nodes(producers: dict[str, Any], tensor: str) -> set[str]:
    """Names of the nodes that ``tensor`` depends on, its producer included (``producers``: tensor name -> ONNX node)."""
    found: set[str] = set()
    pending = [tensor]
    while pending:
        node = producers.get(pending.pop())
        if node is None or node.name in found:
            continue
        found.add(node.name)
        pending.extend(name for name in node.input if name)
    return found


#: Noise gain above which an early convolution is kept in float, with the layers before it (:func:`float_prefix`).
MAX_NOISE_GAIN = 6.0


def noise_gains(qdq_model_path: Path) -> dict[str, float]:
    """How much each quantized convolution amplifies its input's int8 rounding, in its own output steps.

    For output channel ``c`` with weights ``w_c``, rounding the input to steps of ``s_in`` adds
    noise whose size in the output is about ``s_in * |w_c|`` (uniform rounding noise, summed over
    the taps), while the output itself is rounded to steps of ``s_out``. Their ratio, as a root
    mean square over the channels, is the gain: near 1 both roundings cost alike; far above it, the
    input's rounding swamps the output. Batch-norm folding gives some early convolutions of
    EfficientNet-Lite large weights that then feed a narrow ReLU6 window: on the recipe model the
    first depthwise convolution and the first expansion of stage 1 had gains of 10, the next
    highest 4 (bench/README.md). Keeping such a convolution in float helps only when its input is
    exact as well (:func:`float_prefix`). Only convolutions with quantized input, weights and output count.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(qdq_model_path))
    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    readers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    gains: dict[str, float] = {}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        source, weight = producers.get(node.input[0]), producers.get(node.input[1])
        output = [reader for reader in readers.get(node.output[0], []) if reader.op_type == "QuantizeLinear"]
        if not (source and weight and output and source.op_type == weight.op_type == "DequantizeLinear"
                and weight.input[0] in constants and source.input[1] in constants and output[0].input[1] in constants):
            continue
        levels = constants[weight.input[0]].astype(np.float64)
        scales = np.asarray(constants[weight.input[1]], dtype=np.float64).reshape(-1, *[1] * (levels.ndim - 1))
        norms = np.sqrt(((levels * scales) ** 2).reshape(len(levels), -1).sum(axis=1))
        gain = float(constants[source.input[1]]) * norms / float(constants[output[0].input[1]])
        gains[node.name] = float(np.sqrt(np.mean(gain**2)))
    return gains


#: Share of the network's convolutions (from the input) within which a high-gain one pulls the layers before it into float.
FLOAT_PREFIX_REACH = 0.25


def float_prefix(qdq_model_path: Path, float_model_path: Path, max_gain: float = MAX_NOISE_GAIN,
                 reach: float = FLOAT_PREFIX_REACH) -> list[str]:
    """The first layers of the network to keep in float, up to its last early high-gain convolution.

    Among the first ``reach`` of the convolutions (graph order), the last whose :func:`noise_gains`
    on the fully quantized ``qdq_model_path`` exceed ``max_gain`` is kept in float with every node
    it depends on in ``float_model_path``: a convolution left in float still reads a rounded input
    when the layer before it is quantized, so the whole chain from the input must stay float for it
    to see exact values. Later layers are left alone, whatever their gain: keeping them would cost
    most of int8's speed. On the recipe model this kept the first block and the first expansion of
    stage 1 (6 of 63 convolutions) and raised the logits' signal-to-noise ratio against fp32 from
    18 to 28 dB on held-out images (bench/README.md). Empty when no early convolution is loud.
    """
    import onnx

    gains = noise_gains(qdq_model_path)
    model = onnx.load(str(float_model_path))
    convolutions = [node.name for node in model.graph.node if node.op_type == "Conv"]
    early = convolutions[: max(1, int(len(convolutions) * reach))]
    loud = [name for name in early if gains.get(name, 0.0) > max_gain]
    if not loud:
        return []
    last = next(node for node in model.graph.node if node.name == loud[-1])
    kept = _upstream_nodes({output: node for node in model.graph.node for output in node.output}, last.output[0])
    return [node.name for node in model.graph.node if node.name in kept]


#: Age after which a runtime build's temporary file is taken for the leftover of a killed build (a build takes minutes).
STALE_BUILD_S = 24 * 3600.0


def _add_metadata(onnx_file: Path, properties: dict[str, str]) -> None:
    """Add (or overwrite) metadata properties of an ONNX file in place; ONNX Runtime sessions read them back."""
    import onnx

    model = onnx.load(str(onnx_file))
    existing = {prop.key: prop.value for prop in model.metadata_props}
    onnx.helper.set_model_props(model, existing | properties)
    onnx.save(model, str(onnx_file))


def quantize_int8(
    settings: Settings, spec: ModelSpec, images: Sequence[Image.Image], batch_size: int = 8,
    percentiles: Sequence[float] = CANDIDATE_PERCENTILES, min_agreement: float = 0.0,
    weight_types: Sequence[str] = WEIGHT_TYPES, min_speedup: float = 1.0,
) -> Int8Build:
    """Build the int8 (QDQ, per-channel, static) ONNX model of ``spec`` and measure it against fp32.

    Every other image calibrates the activation ranges; the rest are held out. For each candidate
    percentile of the activation histograms (outliers beyond it are clipped) an int8 model is built
    and its labels compared with the fp32 model's on the held-out images; the one that keeps most
    of the images fp32 accepts without review accepted with the same label (then: agrees most) is
    installed, unless its agreement is below ``min_agreement`` (then no int8 runtime is written,
    and an older one of the same version is removed). Only candidates at least ``min_speedup``
    times as fast as fp32 on the held-out images (timed on this machine) can be chosen: ONNX
    Runtime's kernels for unsigned int8 weights, for one, ran slower than fp32 here (bench/README.md). The right percentile depends on the model:
    on a briefly trained tf_efficientnetv2_s, 99.9 to 99.999 moved test agreement from 90 % to 80 %
    (bench/README.md). Each candidate repeats the calibration pass: an offline command, so the
    simple public ONNX Runtime API is preferred to sharing one histogram between candidates.
    The stem, TF-style pad sizes, the nodes that only gather the features (:func:`feature_only_nodes`)
    and the network's first layers up to an early convolution that amplifies int8 rounding too much
    (:func:`float_prefix`, found on a first candidate) stay in float.

    Each candidate's deviations from fp32 on the held-out images (logits, unfamiliar scores) set its
    :class:`SecondOpinion` margins, stored in the installed file: the served runtime hands the
    images within them of a decision to fp32, so a candidate's speed is timed with those fp32 runs
    counted. The version's own unfamiliar reference serves int8 too.

    Raises:
        RuntimeUnavailable: fewer than two images (nothing to hold out).
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(images) < 2:
        raise RuntimeUnavailable("int8 quantization needs at least two images: one to calibrate, one to check")
    transform = build_transform(spec.preprocessing, training=False)
    tensors = np.stack([transform(image).numpy() for image in images])
    calibration, held_out = tensors[0::2], tensors[1::2]

    # ONNX Runtime's histogram calibrators stack the batches, so they must all have one size.
    size = max(d for d in range(1, min(batch_size, len(calibration)) + 1) if len(calibration) % d == 0)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches: Iterator[np.ndarray] = iter([calibration[i : i + size] for i in range(0, len(calibration), size)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {"input": batch}

    target = runtime_path(settings, spec, "onnx-int8")
    for leftover in remove_stale_temporaries(target.parent, BUILDING_PREFIX, STALE_BUILD_S):
        log.info("removed %s, left by a build that was killed", leftover)
    fp32 = ensure_fp32(settings, spec)
    unfamiliar_reference = load_reference(spec_reference_file(spec, settings))
    fp32_session = inference_session(fp32)
    fp32_logits, fp32_features, fp32_seconds = _timed_outputs(fp32_session, held_out)
    reference = fp32_logits.argmax(1)
    fp32_relative_scores = None if unfamiliar_reference is None else unfamiliar_reference.relative_scores(fp32_features)
    unflagged = _accepted(fp32_logits, fp32_features, spec, unfamiliar_reference)
    kept: dict[tuple[float, str], int] = {}
    prepared = sibling_temp_path(target, prefix=BUILDING_PREFIX, suffix=".onnx")
    candidates: dict[tuple[float, str], Path] = {}
    tried: dict[tuple[float, str], float] = {}
    speedups: dict[tuple[float, str], float] = {}
    asked: dict[tuple[float, str], float] = {}
    margins: dict[tuple[float, str], SecondOpinion] = {}
    quant_types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    keys = [(percentile, weights) for weights in weight_types for percentile in percentiles]

    def build(key: tuple[float, str], keep_float: list[str]) -> Path:
        candidate = candidates[key] = sibling_temp_path(target, prefix=BUILDING_PREFIX, suffix=".onnx")
        with _quiet_quantizer() as clipped:
            quantize_static(
                str(prepared), str(candidate), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                weight_type=quant_types[key[1]], activation_type=QuantType.QUInt8,
                calibrate_method=CalibrationMethod.Percentile, extra_options={"CalibPercentile": key[0]},
                nodes_to_exclude=keep_float,
            )
        if clipped.count:  # one line per candidate instead of one per bias
            log.warning("int8 candidate of version %s, percentile %s, %s weights: ONNX Runtime clipped %d convolution "
                        "biases to the int32 range (its held-out agreement below shows what that costs)",
                        spec.version_id, *key, clipped.count)
        return candidate

    try:
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        keep_float = pad_size_nodes(prepared) + stem_nodes(prepared) + feature_only_nodes(prepared)
        # The first candidate shows which early convolutions amplify int8 rounding too much.
        prefix = [name for name in float_prefix(build(keys[0], keep_float), prepared) if name not in keep_float]
        if prefix:
            candidates.pop(keys[0]).unlink(missing_ok=True)
            keep_float += prefix
        for key in keys:
            percentile, weights = key
            candidate = candidates.get(key) or build(key, keep_float)
            logits, features, seconds = _timed_outputs(inference_session(candidate), held_out)
            relative_scores = None if unfamiliar_reference is None else unfamiliar_reference.relative_scores(features)
            margins[key] = SecondOpinion.measured(logits, fp32_logits, spec.temperature, relative_scores, fp32_relative_scores)
            asked[key] = float(margins[key].needed(logits, spec.temperature, spec.threshold, relative_scores).mean())
            # The served runtime runs fp32 again on the images it asks about.
            speedups[key] = fp32_seconds / max(seconds + asked[key] * fp32_seconds, 1e-9)
            tried[key] = float((logits.argmax(1) == reference).mean())
            kept[key] = int((unflagged & (logits.argmax(1) == reference) & _accepted(logits, features, spec, unfamiliar_reference)).sum())
            log.info("int8 candidate of version %s, percentile %s, %s weights: label agreement %.2f%% on %d held-out images; "
                     "asks fp32 about %.1f%% of them (margins %s); %.2fx fp32's speed with those", spec.version_id, percentile,
                     weights, 100 * tried[key], len(held_out), 100 * asked[key], margins[key], speedups[key])
        # What matters for triage first: the images fp32 accepts without review keep their label and
        # stay accepted; then agreement on all held-out images; remaining ties go to signed weights
        # (faster) and the highest percentile (least clipping, ONNX Runtime's default behaviour).
        # A candidate slower than asked is never chosen while a fast enough one exists.
        order = sorted(tried, key=lambda k: (k[1] != weight_types[0], -k[0]))
        best = max(order, key=lambda k: (speedups[k] >= min_speedup, kept[k], tried[k]))
        refused_because = ""
        if speedups[best] < min_speedup:
            refused_because = (f"no candidate is {min_speedup:g}x as fast as fp32 on this machine "
                               f"(the best reached {max(speedups.values()):.2f}x)")
        elif tried[best] < min_agreement:
            refused_because = f"its label agreement {tried[best]:.1%} is below {min_agreement:.1%}"
        installed = not refused_because
        if installed:
            _add_metadata(candidates[best], margins[best].metadata())
            candidates.pop(best).replace(target)
        else:
            target.unlink(missing_ok=True)
    finally:
        prepared.unlink(missing_ok=True)
        for leftover in candidates.values():
            leftover.unlink(missing_ok=True)
    log.info("int8 runtime of version %s: percentile %s, %s weights, %d calibration images, %d early nodes in float, %s",
             spec.version_id, *best, len(calibration), len(prefix), "installed" if installed else f"not installed: {refused_because}")
    return Int8Build(target, best[0], best[1], tried[best], len(held_out), tried, installed, int(unflagged.sum()), kept[best],
                     speedups=speedups, asked=asked, second_opinion=margins[best] if installed else None,
                     refused_because=refused_because, float_prefix=tuple(prefix))

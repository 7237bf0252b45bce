"""The GPU node, measured in one prepared run (issue 14): engine, decode, end to end, bf16 vs fp32, utilisation.

    python -m bench.gpu --data .gpudata/xrays --out "$OUT"          # on the device machine (bench/gpu.sh)
    .venv/bin/python -m bench.gpu --cpu --data ../shared/data/xrays --out /tmp/gpu-dry   # dry run, tiny sizes

Sections, each written to ``<out>/gpu.json`` as soon as it is done (a section that fails records
its error and the run goes on, so one short GPU lease always returns what it measured):

* ``gpu``: nvidia-smi and what torch sees.
* ``engine``: for each architecture, precision (fp32, bf16 autocast; channels_last on CUDA) and
  batch size: images/s model-only (preprocessed tensors already on the device, the product's
  forward pass) and with decode (JPEGs from the content store through the worker's batch decoder:
  nvJPEG on CUDA, :mod:`core.ml.gpu_decode`), plus the CPU decode path once for comparison.
* ``agreement``: bf16-vs-fp32 labels on every image of ``<data>/test`` (CPU decode path).
* ``gpu_decode``: the device decode path against the CPU path on the same images: largest tensor
  difference and label agreement.
* ``e2e``: the real system on the embedded default (SQLite, serverless broker): HTTP upload to a
  gunicorn portal -> broker -> ``celery -A worker worker`` -> database, images/s end to end and
  for the worker alone.
* ``utilisation``: GPU utilisation sampled by ``nvidia-smi`` in a background thread, per section.
* ``train`` (``--train-epochs``): the trainer's CUDA path on ``<data>`` (needs train/val/test),
  images/s and minutes per epoch from the run's metrics.

Random weights unless ``--weights`` names a trained model (label agreement means most for one).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import PROJECT_ROOT, git_revision, machine_line
from core.files import atomic_write_bytes

log = logging.getLogger("bench.gpu")

LABELS = ["fracture", "no_fracture"]


@dataclass(frozen=True)
class Plan:
    """The sizes of one run: the full GPU run, or the tiny ``--cpu`` dry run."""

    device: str
    archs: tuple[str, ...]
    image_size: int
    batch_sizes: tuple[int, ...]
    engine_images: int
    agreement_images: int | None
    e2e_images: int
    e2e_batch_size: int
    e2e_chunk_size: int


GPU_PLAN = Plan("cuda", ("tf_efficientnetv2_s", "convnextv2_base"), 224, (64, 128, 256, 512), 2048, None, 4096, 256, 512)
CPU_PLAN = Plan("cpu", ("test_efficientnet",), 64, (4, 8), 8, 16, 8, 8, 8)


class Report:
    """The run's JSON report, rewritten after every section."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = dict(header)
        self.write()

    def write(self) -> None:
        """Write the report as it stands (atomically)."""
        atomic_write_bytes(self.path, json.dumps(self.data, indent=2, default=str).encode())

    @contextmanager
    def section(self, name: str, sampler: "GpuSampler") -> Iterator[dict[str, Any]]:
        """Record a section: its results, seconds, GPU utilisation; an error is recorded, not raised."""
        result: dict[str, Any] = {}
        started = time.monotonic()
        log.info("section %s ...", name)
        try:
            yield result
            result.setdefault("status", "ok")
        except Exception as exc:  # one failing section must not lose the rest of a GPU lease
            log.exception("section %s failed", name)
            result.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
        result["seconds"] = round(time.monotonic() - started, 2)
        self.data[name] = result
        self.data.setdefault("utilisation", {})[name] = sampler.summary(started, time.monotonic())
        self.write()
        log.info("section %s: %s in %.1f s", name, result["status"], result["seconds"])


class GpuSampler:
    """GPU utilisation (%) and memory (MiB) from ``nvidia-smi`` every ``interval`` seconds, in a background thread."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float, float]] = []
        self.available = shutil.which("nvidia-smi") is not None
        self._process: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "GpuSampler":
        """Start sampling (nothing happens without nvidia-smi)."""
        if self.available:
            self._process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 f"--loop-ms={int(self.interval * 1000)}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )
            self._thread = threading.Thread(target=self._read, name="gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            try:
                utilisation, memory = (float(v) for v in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.monotonic(), utilisation, memory))

    def stop(self) -> None:
        """Stop sampling."""
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def summary(self, start: float, end: float) -> dict[str, Any]:
        """Mean and share of samples >= 80 % busy between ``start`` and ``end`` (monotonic seconds)."""
        if not self.available:
            return {"available": False}
        window = [(u, m) for t, u, m in list(self.samples) if start <= t <= end]
        if not window:
            return {"available": True, "samples": 0}
        busy = np.array([u for u, _ in window])
        return {"available": True, "samples": len(window), "mean_percent": round(float(busy.mean()), 1),
                "share_at_least_80_percent": round(float((busy >= 80).mean()), 3), "peak_memory_mib": max(m for _, m in window)}


def check_gpu(plan: Plan) -> dict[str, Any]:
    """What the machine has: nvidia-smi's table, torch's view of CUDA, package versions."""
    import timm
    import torchvision

    result: dict[str, Any] = {
        "machine": machine_line(), "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "timm": timm.__version__, "cuda_available": torch.cuda.is_available(),
        "cpu_cores": os.cpu_count(),
    }
    if shutil.which("nvidia-smi"):
        result["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        result.update(device_name=properties.name, memory_gib=round(properties.total_memory / 2**30, 1),
                      multiprocessors=properties.multi_processor_count, bf16_supported=torch.cuda.is_bf16_supported(),
                      device_count=torch.cuda.device_count())
    elif plan.device == "cuda":
        raise RuntimeError("no CUDA device: run with --cpu for a dry run")
    return result


def salted_jpeg(data: bytes, salt: int) -> bytes:
    """The JPEG with a comment segment after its start marker: a distinct file (sha256) that decodes to the same pixels."""
    comment = f"bench copy {salt}".encode()
    return data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]


def test_files(data_dir: Path, count: int | None = None) -> tuple[list[bytes], list[int]]:
    """The radiographs of ``data_dir/test`` (cycled with distinct salts up to ``count``) and their class index."""
    files = sorted((data_dir / "test").glob("*/*.jpg"))
    if not files:
        raise SystemExit(f"no radiographs under {data_dir / 'test'}: pass --data (see bench/README.md, 'GPU node')")
    count = len(files) if count is None else count
    datas, classes = [], []
    for index in range(count):
        path = files[index % len(files)]
        raw = path.read_bytes()
        datas.append(raw if index < len(files) else salted_jpeg(raw, index))
        classes.append(LABELS.index(path.parent.name) if path.parent.name in LABELS else -1)
    return datas, classes


@dataclass
class Bench:
    """Shared state of a run: the plan, a scratch folder, the device and the loaded models."""

    plan: Plan
    data_dir: Path
    workdir: Path
    weights: dict[str, Path] = field(default_factory=dict)
    #: Monotonic time after which the engine section measures no further configuration (the rest of
    #: the budget is kept for agreement and the end-to-end run).
    engine_deadline: float = float("inf")

    @property
    def device(self) -> torch.device:
        """Where the models run."""
        return torch.device(self.plan.device)

    def settings(self, **values: object) -> Any:
        """Settings on the scratch folder (embedded default) with ``values``."""
        from core.config import load_settings

        base = {"data_dir": self.workdir / "data", "device": self.plan.device, "max_upload_mb": 4096,
                "secret_key": "bench-secret-key-not-for-production"}
        return load_settings({}, **{**base, **values})

    def spec(self, arch: str) -> Any:
        """A model spec for ``arch`` at the plan's input size."""
        from core.preprocessing import default_preprocessing
        from core.registry import ModelSpec

        return ModelSpec(1, arch, list(LABELS), default_preprocessing(self.plan.image_size), 0.0, 1.0, "")

    def predictor(self, arch: str, precision: str, batch_size: int) -> Any:
        """The product's PyTorch predictor for ``arch`` (``--weights`` or seeded random weights) in ``precision``."""
        from core.ml.modelio import create_model, load_state_dict_file, load_weights
        from core.ml.predict import Predictor

        torch.manual_seed(0)
        model = create_model(arch, num_classes=len(LABELS))
        if arch in self.weights:
            model = load_weights(model, load_state_dict_file(self.weights[arch]))
        predictor = Predictor.from_model(self.spec(arch), model, device=self.plan.device, batch_size=batch_size)
        predictor.cuda_autocast = torch.bfloat16 if precision == "bf16" else None
        return predictor


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only_rate(predictor: Any, batch_size: int, images: int) -> float:
    """Images/s of the product's forward pass on preprocessed tensors already on the device."""
    spec = predictor.spec.preprocessing
    batch = torch.randn(batch_size, *spec.input_size, device=predictor.device)
    predictor.predict_outputs(batch)  # warm-up: kernels chosen, memory pooled
    synchronize(predictor.device)
    steps = max(1, images // batch_size)
    started = time.perf_counter()
    for _ in range(steps):
        predictor.predict_outputs(batch)
    synchronize(predictor.device)
    return steps * batch_size / (time.perf_counter() - started)


def with_decode_rate(bench: Bench, predictor: Any, keys: list[str], on_device: bool) -> float:
    """Images/s from stored JPEGs to logits through the worker's batch decoder (device or CPU path)."""
    from core.ml.devices import decode_threads
    from core.ml.gpu_decode import device_batches_for
    from core.ml.decoding import decoded_batches
    from core.ml.transforms import decode_options
    from core.storage import ContentStore
    from core.studies import ClaimedImage

    settings = bench.settings(batch_size=predictor.batch_size, gpu_decode=on_device)
    store = ContentStore(settings.storage_dir)
    make_batches = device_batches_for(predictor, settings) or decoded_batches
    options = decode_options(predictor.spec.preprocessing, False)

    def run(count: int) -> float:
        rows = [ClaimedImage(index, key) for index, key in enumerate(keys[:count])]
        started = time.perf_counter()
        for batch in make_batches(rows, store, predictor.batch_size, settings.max_image_pixels, decode_threads(settings), options,
                                  predictor.transform):
            predictor.predict_outputs(torch.stack([decoded.tensor for _, decoded in batch]))
        synchronize(predictor.device)
        return count / (time.perf_counter() - started)

    run(min(len(keys), predictor.batch_size))  # warm-up
    return run(len(keys))


def store_files(bench: Bench, datas: list[bytes]) -> list[str]:
    """Put ``datas`` in the scratch content store; their keys."""
    from core.storage import ContentStore

    store = ContentStore(bench.settings().storage_dir)
    return [store.put_bytes(data)[1] for data in datas]


def run_engine(bench: Bench, result: dict[str, Any]) -> None:
    """Model-only and with-decode images/s per architecture, precision and batch size."""
    plan = bench.plan
    keys = store_files(bench, test_files(bench.data_dir, plan.engine_images)[0])
    rows: list[dict[str, Any]] = result.setdefault("rows", [])
    for arch in plan.archs:
        for precision in ("fp32", "bf16"):
            for batch_size in plan.batch_sizes:
                if time.monotonic() > bench.engine_deadline:
                    result.setdefault("skipped_for_time", []).append(f"{arch} {precision} batch {batch_size}")
                    continue
                predictor = bench.predictor(arch, precision, batch_size)
                row = {"arch": arch, "precision": precision, "batch_size": batch_size, "channels_last": predictor.device.type == "cuda",
                       "model_only_images_per_s": round(model_only_rate(predictor, batch_size, plan.engine_images), 1),
                       "with_decode_images_per_s": round(with_decode_rate(bench, predictor, keys, on_device=True), 1)}
                rows.append(row)
                log.info("engine %s", row)
                del predictor
                if bench.device.type == "cuda":
                    torch.cuda.empty_cache()
        # The CPU decode path once per architecture (bf16, the largest batch), for comparison.
        predictor = bench.predictor(arch, "bf16", plan.batch_sizes[-1])
        result.setdefault("cpu_decode_path", []).append({
            "arch": arch, "precision": "bf16", "batch_size": plan.batch_sizes[-1],
            "with_decode_images_per_s": round(with_decode_rate(bench, predictor, keys, on_device=False), 1),
        })


def _labels(predictor: Any, tensors: list[torch.Tensor]) -> np.ndarray:
    """Top label index per preprocessed image, in the predictor's batches."""
    logits = predictor.predict_logits(torch.stack(tensors))
    return logits.argmax(1)


def cpu_path_tensors(preprocessing: Any, datas: list[bytes]) -> list[torch.Tensor]:
    """The CPU decode path's model inputs (the worker's own decode and transform)."""
    from concurrent.futures import ThreadPoolExecutor

    from core.imaging import decode_image
    from core.ml.transforms import build_transform, decode_options

    transform, options = build_transform(preprocessing), decode_options(preprocessing, False)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(lambda data: transform(decode_image(data, 10**9, resize=options.resize)), datas))


def run_agreement(bench: Bench, result: dict[str, Any]) -> None:
    """bf16 vs fp32 labels, and the device decode path vs the CPU one, on ``<data>/test``."""
    from core.ml.gpu_decode import decode_on_device

    datas, classes = test_files(bench.data_dir, bench.plan.agreement_images)
    cpu = cpu_path_tensors(bench.spec(bench.plan.archs[0]).preprocessing, datas)  # every architecture has the plan's input
    for arch in bench.plan.archs:
        fp32, bf16 = bench.predictor(arch, "fp32", 256), bench.predictor(arch, "bf16", 256)
        preprocessing = fp32.spec.preprocessing
        labels_fp32, labels_bf16 = _labels(fp32, cpu), _labels(bf16, cpu)
        device = decode_on_device(datas, preprocessing, bench.device)
        decoded = [i for i, t in enumerate(device) if isinstance(t, torch.Tensor)]
        difference = max((float((device[i].cpu() - cpu[i]).abs().max()) for i in decoded), default=None)  # type: ignore[union-attr]
        labels_device = _labels(bf16, [device[i] for i in decoded]) if decoded else np.array([])  # type: ignore[misc]
        known = np.array(classes) >= 0
        result[arch] = {
            "images": len(datas),
            "weights": str(bench.weights.get(arch, "random (seed 0)")),
            "bf16_vs_fp32_label_agreement": round(float((labels_fp32 == labels_bf16).mean()), 5),
            "fp32_accuracy": round(float((labels_fp32[known] == np.array(classes)[known]).mean()), 4) if known.any() else None,
            "gpu_decode": {
                "decoded_on_device": len(decoded),
                "left_to_cpu": len(datas) - len(decoded),
                "max_abs_tensor_difference": difference,
                "label_agreement_with_cpu_path_bf16": round(float((labels_device == labels_bf16[decoded]).mean()), 5) if decoded else None,
            },
        }
        log.info("agreement %s %s", arch, result[arch])


def run_e2e(bench: Bench, result: dict[str, Any], out: Path) -> None:
    """The real system on the embedded default: portal upload -> broker -> celery worker -> database."""
    from bench.common import Deployment
    from bench.e2e import run_system
    from core import registry
    from core.auth import create_user, issue_token
    from core.db import Database
    from core.migrate import upgrade
    from core.ml.modelio import create_model, save_weights
    from core.preprocessing import default_preprocessing

    plan = bench.plan
    arch = plan.archs[0]
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()  # the worker process needs the memory this one cached
    settings = bench.settings(
        data_dir=bench.workdir / "e2e", batch_size=plan.e2e_batch_size, chunk_size=plan.e2e_chunk_size, runtime="torch",
    )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    db = Database(settings)
    try:
        torch.manual_seed(0)
        weights = bench.weights.get(arch) or save_weights(create_model(arch, len(LABELS)), bench.workdir / "e2e-weights.safetensors")
        with db.transaction() as session:
            version = registry.register_version(
                session, settings, weights, name=f"bench.gpu {arch}", architecture=arch, labels=list(LABELS),
                preprocessing=default_preprocessing(plan.image_size), threshold=0.0,
            )
            registry.promote(session, version.id)
            spec = registry.ModelSpec.from_version(version)
            _, token = issue_token(session, create_user(session, "bench", "bench-password-123", "uploader"), "bench")
        datas = test_files(bench.data_dir, plan.e2e_images)[0]
        files = [(f"img{index:05d}.jpg", data) for index, data in enumerate(datas)]
        run = run_system(Deployment(settings, db, spec, token, settings.data_dir), files)
        result.update(
            arch=arch, precision="bf16" if bench.device.type == "cuda" else "fp32", images=run.images, batch_size=plan.e2e_batch_size,
            chunk_size=plan.e2e_chunk_size, database=settings.database_url.split(":")[0], broker=settings.broker_url.split(":")[0],
            end_to_end_images_per_s=round(run.rate, 1), end_to_end_seconds=round(run.seconds, 2),
            upload_seconds=round(run.upload_seconds, 2), worker_alone_images_per_s=round(run.images / max(run.worker_seconds, 1e-9), 1),
            worker_seconds=round(run.worker_seconds, 2), worker_stages=run.stages, counts=run.counts,
        )
        log_file = settings.data_dir / "worker.log"
        if log_file.is_file():
            shutil.copy(log_file, out / "worker.log")
        if run.counts.get("done") != run.images:
            raise RuntimeError(f"not every image was classified: {run.counts}")
    finally:
        db.dispose()


def run_training(bench: Bench, result: dict[str, Any], args: argparse.Namespace) -> None:
    """One short run of the real trainer (``python -m trainer train``) on ``--data``; its speed from metrics.json."""
    if args.train_epochs <= 0:
        result["status"] = "skipped (--train-epochs 0)"
        return
    if not all((bench.data_dir / split).is_dir() for split in ("train", "val", "test")):
        result["status"] = f"skipped: {bench.data_dir} has no train/val/test splits (bench/gpu_data.sh --train)"
        return
    run_dir = bench.workdir / "train"
    command = [sys.executable, "-m", "trainer", "train", "--data", str(bench.data_dir), "--arch", args.train_arch,
               "--epochs", str(args.train_epochs), "--image-size", str(bench.plan.image_size), "--out", str(run_dir)]
    if args.train_per_class:
        command += ["--max-per-class", str(args.train_per_class)]
    result["command"] = " ".join(command)
    try:
        completed = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=args.train_minutes * 60)
    except subprocess.TimeoutExpired as exc:
        result.update(status="timed out", log_tail=str(exc.stdout or "")[-3000:] + str(exc.stderr or "")[-3000:])
        return
    result["log_tail"] = (completed.stdout + completed.stderr)[-3000:]
    if completed.returncode != 0:
        raise RuntimeError(f"the trainer exited with {completed.returncode}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result.update({key: metrics.get(key) for key in ("train_images_per_second", "minutes_per_epoch", "epochs_run", "train_seconds")})
    result["test_accuracy"] = metrics["test"]["accuracy"]
    result["history"] = metrics["history"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU with tiny sizes (every step, no GPU)")
    parser.add_argument("--data", type=Path, default=Path(".gpudata/xrays"), help="folder with test/<class>/*.jpg (and train/val for --train-epochs)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "test-output/gpu")), help="where gpu.json and gpu.log go ($OUT)")
    parser.add_argument("--sections", default="gpu,engine,agreement,e2e,train", help="comma-separated sections to run")
    parser.add_argument("--weights", action="append", default=[], metavar="ARCH=FILE",
                        help="trained weights (safetensors) for an architecture, e.g. tf_efficientnetv2_s=.gpudata/model.safetensors")
    parser.add_argument("--train-epochs", type=int, default=0, help="also train this many epochs (0: no training)")
    parser.add_argument("--train-arch", default="tf_efficientnetv2_s")
    parser.add_argument("--train-per-class", type=int, default=0, help="images per class and split for training (0: all)")
    parser.add_argument("--train-minutes", type=float, default=3.0, help="the training run is stopped after this")
    parser.add_argument("--budget-minutes", type=float, default=7.5,
                        help="whole run; the engine section stops starting new configurations after 40 %% of it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the sections and write ``gpu.json`` (and ``gpu.log``) to ``--out``."""
    args = parse_args(argv)
    plan = CPU_PLAN if args.cpu else GPU_PLAN
    if args.cpu:
        torch.set_num_threads(1)  # tiny sizes: speed means nothing here, and a small shared machine stays usable
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(out / "gpu.log")], force=True)
    sections = [s for s in args.sections.split(",") if s]
    report = Report(out / "gpu.json", {
        "issue": 14, "started_at": datetime.now(timezone.utc).isoformat(), "commit": git_revision(), "dry_run": args.cpu,
        "plan": plan.__dict__, "data": str(args.data), "sections": sections,
    })
    sampler = GpuSampler().start()
    workdir = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    bench = Bench(plan, args.data.resolve(), workdir, {k: Path(v) for k, v in (w.split("=", 1) for w in args.weights)})
    started = time.monotonic()
    bench.engine_deadline = started + 0.4 * args.budget_minutes * 60
    steps: dict[str, Callable[[dict[str, Any]], None]] = {
        "gpu": lambda result: result.update(check_gpu(plan)),
        "engine": lambda result: run_engine(bench, result),
        "agreement": lambda result: run_agreement(bench, result),
        "e2e": lambda result: run_e2e(bench, result, out),
        "train": lambda result: run_training(bench, result, args),
    }
    try:
        for name in sections:
            with report.section(name, sampler) as result:
                steps[name](result)
    finally:
        sampler.stop()
        report.data.setdefault("utilisation", {})["whole_run"] = sampler.summary(started, time.monotonic())
        report.data["total_seconds"] = round(time.monotonic() - started, 1)
        report.write()
        shutil.rmtree(workdir, ignore_errors=True)
    failed = [name for name in sections if report.data.get(name, {}).get("status") == "error"]
    log.info("done in %.0f s; failed sections: %s; report %s", report.data["total_seconds"], failed or "none", out / "gpu.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

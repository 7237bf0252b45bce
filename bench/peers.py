"""Our worker end to end vs a peer, Ray Data batch inference, on the same images and ONNX model, in one run.

    .venv/bin/python -m pip install -e ".[bench]"     # Ray Data: a benchmark extra, never a runtime dependency
    .venv/bin/python -m bench.peers [--images 512] [--arch tf_efficientnet_lite0]

The same real radiographs (spread over xrays/test and xrays/val) and the same fp32 ONNX file (the
one the worker serves) go through:

- our path, end to end: HTTP upload to the gunicorn portal -> Redis -> `celery -A worker worker`
  -> PostgreSQL (:func:`bench.e2e.run_system`; a temporary database and Redis db 11);
- the peer, in process: ``ray.data.from_items`` -> ``map_batches`` with an actor pool (one actor
  per core, ONNX Runtime with the cores shared out), each actor decoding and preprocessing with
  the worker's own functions (:func:`core.imaging.decode_image`, the version's
  :func:`core.ml.transforms.build_transform`) and the same temperature softmax.

Prints images/s for both and, per image, decode + preprocessing, model and the rest. Random weights:
the figures are about speed; the two paths' labels are compared as a check that they did the same work.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from bench.common import SHARED_XRAYS, deployment, git_revision, machine_line
from bench.e2e import run_system
from core.models import Image, Prediction
from core.preprocessing import Preprocessing
from core.registry import ModelSpec

REDIS_URL = os.environ.get("TRIAGE_BENCH_PEERS_REDIS_URL", "redis://127.0.0.1:6379/11")
RAY_MISSING = 'Ray Data is not installed: it is a benchmark extra. Install it with\n    .venv/bin/python -m pip install -e ".[bench]"'


def peer_images(count: int) -> list[Path]:
    """``count`` real radiographs spread evenly over xrays/test and xrays/val (both classes of each)."""
    pool = sorted(path for split in ("test", "val") for path in (SHARED_XRAYS / split).glob("*/*.jpg"))
    if count > len(pool):
        raise SystemExit(f"only {len(pool)} radiographs in xrays/test and xrays/val")
    return [pool[index * len(pool) // count] for index in range(count)]


class OnnxBatchClassifier:
    """Ray Data actor: decode, preprocess and classify a batch with ONNX Runtime, as the worker would.

    Returns, per image, its probabilities and, per batch (repeated on each row), the seconds spent
    decoding + preprocessing and in the forward pass and the batch's start and end (wall clock).
    """

    def __init__(self, onnx_file: str, preprocessing: Preprocessing, temperature: float, max_pixels: int, threads: int) -> None:
        import onnxruntime as ort
        import torch

        from core.ml.transforms import build_transform, decode_options

        torch.set_num_threads(threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(onnx_file, options, providers=["CPUExecutionProvider"])
        self.transform = build_transform(preprocessing)
        self.options = decode_options(preprocessing, fast_jpeg_decode=False)
        self.temperature = temperature
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Classify one batch of ``{"name", "data"}`` rows."""
        import torch

        from core.imaging import decode_image
        from core.ml.predict import probabilities_from_logits

        started = time.time()
        clock = time.perf_counter()
        tensors = []
        for data in batch["data"]:
            picture = decode_image(bytes(data), self.max_pixels, draft_size=self.options.draft_size, grey=self.options.grey,
                                   resize=self.options.resize)
            tensors.append(self.transform(picture))
        inputs = torch.stack(tensors).numpy()
        decode_seconds = time.perf_counter() - clock
        clock = time.perf_counter()
        (logits,) = self.session.run(["logits"], {"input": inputs})
        model_seconds = time.perf_counter() - clock
        probabilities = probabilities_from_logits(torch.from_numpy(logits).float(), self.temperature).numpy()
        rows = len(tensors)
        return {
            "name": batch["name"], "probabilities": probabilities,
            "decode_seconds": np.full(rows, decode_seconds), "model_seconds": np.full(rows, model_seconds),
            "started": np.full(rows, started), "ended": np.full(rows, time.time()),
        }


def _start_ray(tries: int = 3) -> None:
    """``ray.init`` on this machine's cores, tried again when the node fails to start.

    Ray's raylet gives its dashboard agent a fixed 15 s to write its port file and aborts after
    that (ray-project/ray#65983): on a loaded 2-core machine the first start can miss it.
    """
    import ray

    for attempt in range(1, tries + 1):
        try:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
            return
        except Exception as exc:  # Ray raises a bare Exception for "the current node timed out during startup"
            ray.shutdown()
            if attempt == tries or "timed out during startup" not in str(exc):
                raise
            print(f"Ray's node did not start (try {attempt} of {tries}): {exc}; trying again", file=sys.stderr)


def run_ray(files: list[tuple[str, bytes]], onnx_file: Path, spec: ModelSpec, max_pixels: int, batch_size: int, actors: int) -> dict[str, Any]:
    """Classify ``files`` with Ray Data (``map_batches`` on an actor pool of ``actors``); timings and probabilities."""
    import ray

    threads = max(1, (os.cpu_count() or 1) // actors)
    _start_ray()
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        start = time.perf_counter()
        dataset = ray.data.from_items([{"name": name, "data": data} for name, data in files]).map_batches(
            OnnxBatchClassifier, batch_size=batch_size, batch_format="numpy", num_cpus=(os.cpu_count() or 1) / actors,
            compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={"onnx_file": str(onnx_file), "preprocessing": spec.preprocessing, "temperature": spec.temperature,
                                   "max_pixels": max_pixels, "threads": threads},
        )
        rows = dataset.take_all()
        wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    batches = {(row["started"], row["ended"]): (row["decode_seconds"], row["model_seconds"]) for row in rows}
    return {
        "wall": wall,
        # From the first batch's start to the last batch's end: the actors' model loads and Ray's start-up left out.
        "steady": max(end for _, end in batches) - min(start for start, _ in batches),
        "decode": sum(decode for decode, _ in batches.values()),
        "model": sum(model for _, model in batches.values()),
        "probabilities": {row["name"]: np.asarray(row["probabilities"]) for row in rows},
        "actors": actors,
        "threads": threads,
    }


def main(argv: list[str] | None = None) -> int:
    """Run both paths and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--arch", default="tf_efficientnet_lite0", help="timm architecture, random weights")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=128, help="our worker: images per queued task")
    parser.add_argument("--actors", type=int, default=os.cpu_count() or 1, help="Ray Data actor pool size (default: one per core)")
    parser.add_argument("--worker-concurrency", type=int, default=1,
                        help="our worker: pool children (TRIAGE_WORKER_CONCURRENCY); each gets its share of the cores")
    parser.add_argument("--decode-threads", type=int, default=0, help="our worker: TRIAGE_DECODE_THREADS (0: its share of the cores)")
    parser.add_argument("--skip-ray", action="store_true", help="measure our path only (e.g. to compare worker settings)")
    args = parser.parse_args(argv)
    if not args.skip_ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise SystemExit(RAY_MISSING) from None
    print(f"machine: {machine_line()}; commit {git_revision()}")

    paths = peer_images(args.images)
    files = [(f"{index:04d}-{path.name}", path.read_bytes()) for index, path in enumerate(paths)]
    with deployment(args.arch, args.image_size, REDIS_URL, runtime="onnx", batch_size=args.batch_size, chunk_size=args.chunk_size,
                    worker_concurrency=args.worker_concurrency, decode_threads=args.decode_threads) as run:
        from core.ml.onnx_runtime import ensure_fp32

        onnx_file = ensure_fp32(run.settings, run.spec)  # the file the worker serves
        peer = None if args.skip_ray else run_ray(files, onnx_file, run.spec, run.settings.max_image_pixels, args.batch_size, args.actors)
        ours = run_system(run, files)
        with run.db.transaction() as session:
            stored = session.execute(
                select(Image.filename, Prediction.probabilities, Prediction.decode_seconds, Prediction.model_seconds)
                .join(Prediction, Prediction.image_id == Image.id).where(Image.study_id.in_(ours.study_ids))
            ).all()

    n = len(files)
    children = args.worker_concurrency
    our_decode = 1000 * sum(row[2] for row in stored) / n
    our_model = 1000 * sum(row[3] for row in stored) / n
    our_elapsed = 1000 * ours.seconds / n
    print(f"{n} real radiographs (xrays/test + val), {args.arch}@{args.image_size}, ONNX Runtime fp32 (the same file), batch {args.batch_size}")
    print(f"ours, end to end (HTTP upload -> Redis -> worker with {children} pool child(ren) -> PostgreSQL): {ours.rate:7.1f} images/s  "
          f"({ours.seconds:.1f} s; done {ours.counts['done']}, failed {ours.counts['failed']}); worker alone {n / ours.worker_seconds:.1f} images/s")
    if peer is not None:
        print(f"Ray Data {peer['actors']} actors x {peer['threads']} thread(s), in process: {n / peer['steady']:7.1f} images/s steady "
              f"(first batch start -> last batch end, {peer['steady']:.1f} s); {n / peer['wall']:.1f} images/s for the whole job "
              f"({peer['wall']:.1f} s with start-up)")
        print(f"ours end to end / Ray Data steady: {ours.rate / (n / peer['steady']):.2f}x")
    print("per image (ms)            elapsed  decode+preprocess  model  rest")
    print(f"ours, end to end         {our_elapsed:8.2f} {our_decode:18.2f} {our_model:6.2f} {our_elapsed * children - our_model:5.2f}"
          f"   ({children} child(ren) side by side, decode in threads beside the model; rest = elapsed x children - model: "
          "upload, decode waits, database, broker)")
    if peer is not None:
        labels = run.spec.labels
        ours_probabilities = {name: np.array([probabilities[label] for label in labels]) for name, probabilities, _, _ in stored}
        agree = np.mean([ours_probabilities[name].argmax() == peer["probabilities"][name].argmax() for name in ours_probabilities])
        diff = max(float(np.abs(ours_probabilities[name] - peer["probabilities"][name]).max()) for name in ours_probabilities)
        ray_decode, ray_model = 1000 * peer["decode"] / n, 1000 * peer["model"] / n
        ray_rest = 1000 * peer["steady"] * peer["actors"] / n - ray_decode - ray_model
        print(f"Ray Data, steady         {1000 * peer['steady'] / n:8.2f} {ray_decode:18.2f} {ray_model:6.2f} {ray_rest:5.2f}"
              f"   ({peer['actors']} actors side by side, each decoding then running its batch; rest = actor time outside both: scheduling, transfers, idle)")
        print(f"same labels on {agree:.1%} of the images; max |p_ours - p_ray| = {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End to end through the real system vs the in-process engine, measured in one run.

    .venv/bin/python -m bench.e2e [--arch tf_efficientnetv2_s] [--images 512] [--runtime torch]
    .venv/bin/python -m bench.e2e --runtime standin --images 4096 --fast-jpeg   # system ceiling

Starts a real `celery -A worker worker` and the portal under gunicorn on PostgreSQL + Redis (the
production deployment; a temporary database and Redis db 14, removed afterwards), uploads the
images over HTTP with an API token, waits until the study is done, and reports images/s end to
end, the engine's images/s on the same images, and where the worker's time went (from its
per-chunk timing log lines). `--runtime standin` replaces the model by one that costs nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import requests

from bench.common import (
    Deployment, Processes, deployment, git_revision, machine_line, make_jpegs, original_loop, start_portal, start_worker,
    upload_study, wait_until,
)
from bench.engine import run_engine
from core import registry
from core.models import Study
from core.ml.modelio import create_model, load_state_dict_file
from core.ml.runtimes import load_predictor
from core.ml.transforms import decode_options
from core.storage import ContentStore

REDIS_URL = os.environ.get("TRIAGE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
TIMING = re.compile(r"timing (.*)$")


@dataclass
class SystemRun:
    """What one pass through the real system measured."""

    images: int
    #: First upload started -> the worker finished the last study (its ``finished_at``).
    seconds: float
    #: Time spent in the HTTP uploads (store, database rows, enqueue).
    upload_seconds: float
    #: First upload returned -> last study finished: Redis -> worker -> PostgreSQL.
    worker_seconds: float
    #: The worker's own time per stage, summed over its chunks (from its timing log lines).
    stages: dict[str, float]
    #: Images done and failed over all studies.
    counts: dict[str, int]
    study_ids: list[int]
    #: Worker resident memory (MB, main + pool): after warm-up, then after each upload and each finished study.
    rss_after_warmup: float
    rss_samples: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Images per second end to end."""
        return self.images / self.seconds


def _rss_mb(worker: subprocess.Popen[bytes]) -> float:
    pids = [worker.pid, *map(int, subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True).stdout.split())]
    total_kb = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total_kb += int(line.split()[1])
    return total_kb / 1024


def run_system(run: Deployment, files: list[tuple[str, bytes]], studies: int = 1) -> SystemRun:
    """Upload ``files`` as ``studies`` studies to a gunicorn portal with one `celery -A worker worker`, and wait.

    The portal and worker run on ``run``'s deployment and are stopped afterwards. The worker is
    warmed first with a one-image study per pool child (a production worker has its model loaded).
    """
    log_path = run.workdir / "worker.log"
    with Processes() as processes:
        portal, url = start_portal(run.env)
        processes.add(portal)
        worker = processes.add(start_worker(run.env, log_path))

        def study_done(study_id: int) -> bool:
            return requests.get(f"{url}/api/studies/{study_id}", headers=run.headers, timeout=30).json()["status"] == "done"

        # One single-image study per pool child, sent together: each idle child takes one.
        warm = [upload_study(url, run.headers, f"warm-up {child}", files[:1]) for child in range(run.settings.worker_concurrency)]
        wait_until(lambda: all(study_done(study_id) for study_id in warm), 600, "warm-up")
        warm_lines = len(log_path.read_text(errors="replace").splitlines())

        rss_after_warmup = _rss_mb(worker)
        rss_samples: list[float] = []
        start = time.perf_counter()
        started_at = datetime.now(timezone.utc)
        first_upload_returned_at: datetime | None = None
        uploaded = 0.0
        study_ids = []
        for index in range(studies):
            clock = time.perf_counter()
            study_ids.append(upload_study(url, run.headers, f"bench {index}", files))
            uploaded += time.perf_counter() - clock
            first_upload_returned_at = first_upload_returned_at or datetime.now(timezone.utc)
            rss_samples.append(_rss_mb(worker))
        for study_id in study_ids:
            # Poll like the study page does (about once a second), not in a tight loop that would
            # steal CPU from the worker on a small machine.
            wait_until(lambda: study_done(study_id), 7200, f"study {study_id}", interval=1.0)
            rss_samples.append(_rss_mb(worker))
        counts = {"done": 0, "failed": 0}
        for study_id in study_ids:
            status = requests.get(f"{url}/api/studies/{study_id}", headers=run.headers, timeout=30).json()["counts"]
            counts = {k: counts[k] + status[k] for k in counts}
    # The spans end when the worker finished the last study (its finished_at), not when a poll
    # happened to notice, so the polling interval does not count against the system.
    with run.db.transaction() as session:
        finished_at = max(session.get(Study, study_id).finished_at for study_id in study_ids)
    if finished_at.tzinfo is None:  # SQLite (the embedded default) reads back naive UTC
        finished_at = finished_at.replace(tzinfo=timezone.utc)
    assert first_upload_returned_at is not None
    total = min(time.perf_counter() - start, (finished_at - started_at).total_seconds())
    stages: dict[str, float] = defaultdict(float)
    for line in log_path.read_text(errors="replace").splitlines()[warm_lines:]:
        match = TIMING.search(line)
        if match:
            for part in match.group(1).split():
                stage, value = part.split("=")
                stages[stage] += float(value.rstrip("s"))
    return SystemRun(
        images=len(files) * studies, seconds=total, upload_seconds=uploaded,
        worker_seconds=(finished_at - first_upload_returned_at).total_seconds(), stages=dict(stages), counts=counts,
        study_ids=study_ids, rss_after_warmup=rss_after_warmup, rss_samples=rss_samples,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tf_efficientnetv2_s")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--runtime", default="torch", choices=["torch", "onnx", "onnx-int8", "standin"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--fast-jpeg", action="store_true", help="TRIAGE_FAST_JPEG_DECODE=true")
    parser.add_argument("--no-engine", action="store_true", help="skip the in-process engine comparison")
    parser.add_argument("--loop-images", type=int, default=64,
                        help="images for the original one-image-at-a-time loop baseline (0: skip)")
    parser.add_argument("--studies", type=int, default=1, help="upload this many studies of --images each")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="flag threshold; 0 flags nothing (classification only), 1 flags everything (every image gets a Grad-CAM heat map)")
    args = parser.parse_args(argv)
    print(f"machine: {machine_line()}; commit {git_revision()}")

    with deployment(
        args.arch, args.image_size, REDIS_URL, threshold=args.threshold, runtime=args.runtime, batch_size=args.batch_size,
        chunk_size=args.chunk_size, fast_jpeg_decode=args.fast_jpeg,
    ) as run:
        settings, spec = run.settings, run.spec
        if args.runtime == "onnx-int8":
            from bench.common import SHARED_XRAYS
            from core.ml.quantize import calibration_images, quantize_int8

            quantize_int8(settings, spec, calibration_images(SHARED_XRAYS / "val", 64))

        images = make_jpegs(args.images)
        loop_rate = None
        if args.loop_images and args.runtime != "standin":
            model = create_model(args.arch, len(spec.labels)).eval()
            model.load_state_dict(load_state_dict_file(registry.weights_path(settings, spec.weights_sha256)))
            original_loop(model, images[:2], args.image_size)
            clock = time.perf_counter()
            original_loop(model, images[: args.loop_images], args.image_size)
            loop_rate = min(args.loop_images, len(images)) / (time.perf_counter() - clock)
            del model
        engine_rate = None
        if not args.no_engine:
            store = ContentStore(run.workdir / "engine-store")
            keys = [store.put_bytes(data)[1] for data in images]
            predictor = load_predictor(spec, settings)
            options = decode_options(spec.preprocessing, args.fast_jpeg)
            run_engine(predictor, store, keys[: args.batch_size], args.batch_size, options)
            _, seconds = run_engine(predictor, store, keys, args.batch_size, options)
            engine_rate = len(keys) / seconds
            del predictor

        system = run_system(run, [(f"img{i:05d}.jpg", data) for i, data in enumerate(images)], args.studies)
        total, rate, counts = system.seconds, system.rate, system.counts
        print(f"runtime {args.runtime}, threshold {args.threshold}, {args.arch}@{args.image_size}, {system.images} JPEGs 512x512 in {args.studies} studies, batch {args.batch_size}, chunk {args.chunk_size}, fast jpeg {args.fast_jpeg}")
        print(f"end to end (HTTP upload -> Redis -> worker -> PostgreSQL): {rate:8.1f} images/s  ({total:.1f} s; upload {system.upload_seconds:.1f} s; done {counts['done']}, failed {counts['failed']})")
        if args.studies == 1:
            print(f"worker alone (upload returned -> study finished: Redis -> worker -> PostgreSQL): {system.images / system.worker_seconds:8.1f} images/s  ({system.worker_seconds:.1f} s)")
        if engine_rate:
            print(f"in-process engine, same images:                          {engine_rate:8.1f} images/s  -> end to end = {rate / engine_rate:.0%} of engine")
        if loop_rate:
            print(f"original one-image loop (PyTorch fp32, batch 1):         {loop_rate:8.1f} images/s  -> end to end = {rate / loop_rate:.2f}x the loop")
        other = total - system.upload_seconds - sum(system.stages.values())
        print("where the time went (s): upload+store+enqueue {:.2f}; worker: {}; broker/queue/idle {:.2f}".format(
            system.upload_seconds, ", ".join(f"{k} {v:.2f}" for k, v in system.stages.items()), max(0.0, other)))
        rss = system.rss_samples
        print(f"worker resident memory (MB, main + pool): after warm-up {system.rss_after_warmup:.0f}, "
              f"after first study {rss[args.studies]:.0f}, at the end {rss[-1]:.0f}, peak {max(rss):.0f}; "
              f"growth from first study to end {rss[-1] / rss[args.studies] - 1:+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

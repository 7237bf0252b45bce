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
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import requests
import sqlalchemy as sa

from bench.common import PROJECT_ROOT, git_revision, machine_line, make_jpegs, original_loop, settings_env, start_worker, wait_until
from bench.engine import run_engine
from core import registry
from core.auth import create_user, issue_token
from core.config import load_settings
from core.db import Database
from core.migrate import upgrade
from core.models import Study
from core.ml.modelio import create_model, load_state_dict_file, save_weights
from core.ml.predict import load_predictor
from core.ml.transforms import decode_options, default_preprocessing
from core.storage import ContentStore

POSTGRES_ADMIN = os.environ.get("TRIAGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TRIAGE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
TIMING = re.compile(r"timing (.*)$")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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

    admin = sa.create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    name = f"triage_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    processes: list[subprocess.Popen[bytes]] = []
    tmp = tempfile.TemporaryDirectory()
    try:
        settings = load_settings(
            {}, data_dir=Path(tmp.name), database_url=POSTGRES_ADMIN.rsplit("/", 1)[0] + "/" + name, broker_url=REDIS_URL,
            runtime=args.runtime, batch_size=args.batch_size, chunk_size=args.chunk_size, fast_jpeg_decode=args.fast_jpeg,
            max_upload_mb=4096, secret_key="bench-secret-key-not-for-production",
        )
        import redis

        redis.Redis.from_url(REDIS_URL).flushdb()
        upgrade(settings.database_url)
        db = Database(settings)
        labels = ["comminuted_fracture", "no_fracture", "simple_fracture"]
        weights = save_weights(create_model(args.arch, len(labels)), Path(tmp.name) / "w.safetensors")
        with db.transaction() as session:
            version = registry.register_version(
                session, settings, weights, name=f"bench {args.arch}", architecture=args.arch, labels=labels,
                preprocessing=default_preprocessing(args.image_size), threshold=args.threshold,
            )
            registry.promote(session, version.id)
            spec = registry.ModelSpec.from_version(version)
            user = create_user(session, "bench", "bench-password-123", "uploader")
            _, token = issue_token(session, user, "bench")
        if args.runtime == "onnx-int8":
            from bench.common import SHARED_XRAYS
            from core.ml.onnx_runtime import calibration_images, quantize_int8

            quantize_int8(settings, spec, calibration_images(SHARED_XRAYS / "val", 64))

        images = make_jpegs(args.images)
        loop_rate = None
        if args.loop_images and args.runtime != "standin":
            model = create_model(args.arch, len(labels)).eval()
            model.load_state_dict(load_state_dict_file(registry.weights_path(settings, spec.weights_sha256)))
            original_loop(model, images[:2], args.image_size)
            clock = time.perf_counter()
            original_loop(model, images[: args.loop_images], args.image_size)
            loop_rate = min(args.loop_images, len(images)) / (time.perf_counter() - clock)
            del model
        engine_rate = None
        if not args.no_engine:
            store = ContentStore(Path(tmp.name) / "engine-store")
            keys = [store.put_bytes(data)[1] for data in images]
            predictor = load_predictor(spec, settings)
            options = decode_options(spec.preprocessing, args.fast_jpeg)
            run_engine(predictor, store, keys[: args.batch_size], args.batch_size, options)
            _, seconds = run_engine(predictor, store, keys, args.batch_size, options)
            engine_rate = len(keys) / seconds
            del predictor

        log_path = Path(tmp.name) / "worker.log"
        env = settings_env(settings)
        port = _free_port()
        portal = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "4",
             "--timeout", "600", "portal:create_app()"],
            cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        processes.append(portal)
        worker = start_worker(env, log_path)
        processes.append(worker)

        def portal_up() -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok
            except requests.ConnectionError:
                return False

        wait_until(portal_up, 60, "the portal")
        # Warm the worker's model cache with a tiny study, as a production worker would be warm.
        headers = {"Authorization": f"Bearer {token}"}
        warm = requests.post(f"http://127.0.0.1:{port}/api/studies", headers=headers, data={"name": "warm-up"},
                             files=[("files", ("w.jpg", images[0], "image/jpeg"))], timeout=600).json()["id"]
        wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/api/studies/{warm}", headers=headers, timeout=30).json()["status"] == "done", 600, "warm-up")
        warm_lines = len(log_path.read_text(errors="replace").splitlines())

        def worker_rss_mb() -> float:
            pids = [worker.pid, *map(int, subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True).stdout.split())]
            total_kb = 0
            for pid in pids:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total_kb += int(line.split()[1])
            return total_kb / 1024

        def study_done(study_id: int) -> bool:
            return requests.get(f"http://127.0.0.1:{port}/api/studies/{study_id}", headers=headers, timeout=30).json()["status"] == "done"

        rss_after_warmup = worker_rss_mb()
        rss_samples: list[float] = []
        start = time.perf_counter()
        started_at = datetime.now(timezone.utc)
        first_upload_returned_at: datetime | None = None
        uploaded = 0.0
        study_ids = []
        for index in range(args.studies):
            clock = time.perf_counter()
            response = requests.post(
                f"http://127.0.0.1:{port}/api/studies", headers=headers, data={"name": f"bench {index}"},
                files=[("files", (f"img{i:05d}.jpg", data, "image/jpeg")) for i, data in enumerate(images)], timeout=3600,
            )
            response.raise_for_status()
            uploaded += time.perf_counter() - clock
            first_upload_returned_at = first_upload_returned_at or datetime.now(timezone.utc)
            study_ids.append(response.json()["id"])
            rss_samples.append(worker_rss_mb())
        for study_id in study_ids:
            # Poll like the study page does (about once a second), not in a tight loop that would
            # steal CPU from the worker on a small machine.
            wait_until(lambda: study_done(study_id), 7200, f"study {study_id}", interval=1.0)
            rss_samples.append(worker_rss_mb())
        # The spans end when the worker finished the last study (its finished_at), not when a poll
        # happened to notice, so the polling interval does not count against the system.
        with db.transaction() as session:
            finished_at = max(session.get(Study, study_id).finished_at for study_id in study_ids)
        total = min(time.perf_counter() - start, (finished_at - started_at).total_seconds())
        worker_span = (finished_at - first_upload_returned_at).total_seconds()
        counts = {"done": 0, "failed": 0}
        for study_id in study_ids:
            status = requests.get(f"http://127.0.0.1:{port}/api/studies/{study_id}", headers=headers, timeout=30).json()["counts"]
            counts = {k: counts[k] + status[k] for k in counts}
        stages: dict[str, float] = defaultdict(float)
        for line in log_path.read_text(errors="replace").splitlines()[warm_lines:]:
            match = TIMING.search(line)
            if match:
                for part in match.group(1).split():
                    stage, value = part.split("=")
                    stages[stage] += float(value.rstrip("s"))
        total_images = args.images * args.studies
        rate = total_images / total
        print(f"runtime {args.runtime}, threshold {args.threshold}, {args.arch}@{args.image_size}, {total_images} JPEGs 512x512 in {args.studies} studies, batch {args.batch_size}, chunk {args.chunk_size}, fast jpeg {args.fast_jpeg}")
        print(f"end to end (HTTP upload -> Redis -> worker -> PostgreSQL): {rate:8.1f} images/s  ({total:.1f} s; upload {uploaded:.1f} s; done {counts['done']}, failed {counts['failed']})")
        if args.studies == 1:
            print(f"worker alone (upload returned -> study finished: Redis -> worker -> PostgreSQL): {total_images / worker_span:8.1f} images/s  ({worker_span:.1f} s)")
        if engine_rate:
            print(f"in-process engine, same images:                          {engine_rate:8.1f} images/s  -> end to end = {rate / engine_rate:.0%} of engine")
        if loop_rate:
            print(f"original one-image loop (PyTorch fp32, batch 1):         {loop_rate:8.1f} images/s  -> end to end = {rate / loop_rate:.2f}x the loop")
        worker_busy = sum(stages.values())
        other = total - uploaded - worker_busy
        print("where the time went (s): upload+store+enqueue {:.2f}; worker: {}; broker/queue/idle {:.2f}".format(
            uploaded, ", ".join(f"{k} {v:.2f}" for k, v in stages.items()), max(0.0, other)))
        print(f"worker resident memory (MB, main + pool): after warm-up {rss_after_warmup:.0f}, "
              f"after first study {rss_samples[args.studies]:.0f}, at the end {rss_samples[-1]:.0f}, peak {max(rss_samples):.0f}; "
              f"growth from first study to end {rss_samples[-1] / rss_samples[args.studies] - 1:+.1%}")
        db.dispose()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

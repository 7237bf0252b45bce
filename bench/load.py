"""Load test of the production deployment, with one worker node killed and restarted mid-run.

    .venv/bin/python -m bench.load [--uploads 20] [--per-upload 100] [--arch tf_efficientnet_lite0]

On PostgreSQL + Redis (a temporary database and Redis db 12, removed afterwards): the portal under
gunicorn, two worker nodes as two `celery -A worker worker` processes (`-n a@%h`, `-n b@%h`), and
``--uploads`` concurrent HTTP uploads (API token) of ``--per-upload`` real radiographs each, once
both nodes have their model loaded (one-image warm-up studies, not counted). Once a
share of the images is done (``--kill-at``) and node b holds claimed images, node b's whole process
group (main process and pool child) is SIGKILLed and started again. Then it checks, in the
database, that every image finished with exactly one prediction (0 lost, 0 duplicated; exit status
1 otherwise) and prints images/s and the p50/p95 time from the start of an upload to its study's
``finished_at``. Random weights: the figures are about the system, not accuracy.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sqlalchemy import func, select

from bench.common import (
    Deployment, Processes, deployment, git_revision, group_pids, kill_group, machine_line, source_images, start_portal,
    start_worker, upload_study, wait_until,
)
from core.models import Image, ImageStatus, Prediction, Study, StudyStatus

REDIS_URL = os.environ.get("TRIAGE_BENCH_LOAD_REDIS_URL", "redis://127.0.0.1:6379/12")
PREDICTED = re.compile(r": (\d+) predicted, ")


@dataclass
class Upload:
    """One upload: its study and when its HTTP request started and returned."""

    study_id: int
    started_at: datetime
    returned_at: datetime


@dataclass
class Kill:
    """The kill of node b: when, how far the run was, and what b held."""

    at: datetime
    done_before: int
    held: int
    restarted_at: datetime


def _upload(url: str, headers: dict[str, str], name: str, files: list[tuple[str, bytes]]) -> Upload:
    started = datetime.now(timezone.utc)
    study_id = upload_study(url, headers, name, files)
    return Upload(study_id, started, datetime.now(timezone.utc))


#: The load's studies (not the warm-up's).
LOAD_STUDIES = select(Study.id).where(Study.name.startswith("load ")).scalar_subquery()


def _warm_up(run: Deployment, url: str, file: tuple[str, bytes], logs: dict[str, Path]) -> int:
    """Upload one-image studies, one at a time, until every node has classified one; returns how many.

    Production workers have their model loaded; idle nodes take turns on the queue (Redis serves
    the longest-waiting consumer first), so this usually takes two studies.
    """
    studies: list[int] = []

    def every_node_warm() -> bool:
        if all(PREDICTED.search(path.read_text(errors="replace")) for path in logs.values()):
            return True
        with run.db.transaction() as session:
            if not studies or session.get(Study, studies[-1]).status == StudyStatus.DONE:
                studies.append(upload_study(url, run.headers, f"warm-up {len(studies)}", [file]))
        return False

    wait_until(every_node_warm, 600, "every worker node to classify a warm-up image", interval=0.2)
    return len(studies)


def _done_images(run: Deployment) -> int:
    with run.db.transaction() as session:
        return session.scalar(
            select(func.count()).select_from(Image).where(Image.status == ImageStatus.DONE, Image.study_id.in_(LOAD_STUDIES))
        ) or 0


def _held_by(run: Deployment, pids: set[int]) -> int:
    """Images claimed (``processing``) by one of ``pids`` on this host (lease owner ``host:pid:nonce``)."""
    with run.db.transaction() as session:
        owners = session.execute(
            select(Image.claimed_by, func.count()).where(Image.status == ImageStatus.PROCESSING).group_by(Image.claimed_by)
        ).all()
    return sum(count for owner, count in owners if owner and int(owner.split(":")[1]) in pids)


def _kill_and_restart(
    run: Deployment, processes: Processes, victim: subprocess.Popen[bytes], log_path: Path, total: int, kill_at: float,
) -> Kill:
    """Wait until ``kill_at`` of the images are done and the victim node holds images; SIGKILL its group; start it again."""
    def ready() -> bool:
        if _done_images(run) >= total:
            raise SystemExit("every image finished before node b could be killed; upload more images or lower --kill-at")
        return _done_images(run) >= kill_at * total and _held_by(run, group_pids(victim)) > 0

    wait_until(ready, 1800, "node b to hold claimed images", interval=0.02)
    pids = group_pids(victim)
    kill_group(victim)
    at = datetime.now(timezone.utc)
    done, held = _done_images(run), _held_by(run, pids)
    processes.add(start_worker(run.env, log_path, node="b@%h"))
    return Kill(at, done, held, datetime.now(timezone.utc))


def _predictions_per_image(run: Deployment) -> dict[int, int]:
    """Predictions per image of the load's studies, counted in the database (0: lost, 2 or more: duplicated)."""
    with run.db.transaction() as session:
        return dict(session.execute(
            select(Image.id, func.count(Prediction.id)).outerjoin(Prediction, Prediction.image_id == Image.id)
            .where(Image.study_id.in_(LOAD_STUDIES)).group_by(Image.id)
        ).all())


def _all_studies_done(run: Deployment, uploads: int) -> bool:
    with run.db.transaction() as session:
        done = session.scalar(select(func.count()).select_from(Study).where(Study.id.in_(LOAD_STUDIES), Study.status == StudyStatus.DONE))
        return (done or 0) >= uploads


def main(argv: list[str] | None = None) -> int:
    """Run the load test, print its figures; exit status 1 if an image was lost, duplicated or failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=20, help="concurrent HTTP uploads (one study each)")
    parser.add_argument("--per-upload", type=int, default=100, help="real radiographs per upload")
    parser.add_argument("--arch", default="tf_efficientnet_lite0", help="timm architecture, random weights")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--runtime", default="onnx", choices=["torch", "onnx", "standin"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=32, help="images per queued task")
    parser.add_argument("--threads-per-worker", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="model threads in each worker node (TRIAGE_TORCH_THREADS)")
    parser.add_argument("--portal-workers", type=int, default=2, help="gunicorn worker processes (4 threads each)")
    parser.add_argument("--kill-at", type=float, default=0.3, help="kill node b once this share of the images is done")
    parser.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                        help="start on cold nodes: their first chunks include loading the model (the kill then lands while b loads it)")
    parser.add_argument("--redis-url", default=REDIS_URL, help="a Redis database index of its own (emptied before and after)")
    parser.add_argument("--database-url", default=None, help="an empty PostgreSQL database to use (default: a temporary one)")
    args = parser.parse_args(argv)
    print(f"machine: {machine_line()}; commit {git_revision()}")

    total = args.uploads * args.per_upload
    paths = source_images(total, split="train")
    files = [(f"{index:05d}-{path.name}", path.read_bytes()) for index, path in enumerate(paths)]
    with deployment(
        args.arch, args.image_size, args.redis_url, database_url=args.database_url, runtime=args.runtime,
        batch_size=args.batch_size, chunk_size=args.chunk_size, torch_threads=args.threads_per_worker,
    ) as run:
        if args.runtime == "onnx":  # exported once here, as `triage model promote` would leave it, not by two nodes at once
            from core.ml.onnx_runtime import ensure_fp32

            ensure_fp32(run.settings, run.spec)
        logs = {node: run.workdir / f"worker-{node}.log" for node in ("a", "b")}
        with Processes() as processes:
            portal, url = start_portal(run.env, workers=args.portal_workers)
            processes.add(portal)
            processes.add(start_worker(run.env, logs["a"], node="a@%h"))
            victim = processes.add(start_worker(run.env, logs["b"], node="b@%h"))
            warm_studies = _warm_up(run, url, files[0], logs) if args.warm_up else 0
            warm_lines = {node: len(path.read_text(errors="replace").splitlines()) for node, path in logs.items()}
            with ThreadPoolExecutor(max_workers=args.uploads) as pool:
                futures = [
                    pool.submit(_upload, url, run.headers, f"load {index}", files[index * args.per_upload:(index + 1) * args.per_upload])
                    for index in range(args.uploads)
                ]
                kill = _kill_and_restart(run, processes, victim, logs["b"], total, args.kill_at)
                uploads = [future.result() for future in futures]
            wait_until(lambda: _all_studies_done(run, args.uploads), 3600, "every study to finish", interval=0.5)
        with run.db.transaction() as session:
            finished = {study.id: study.finished_at for study in session.scalars(select(Study).where(Study.id.in_(LOAD_STUDIES)))}
            statuses = Counter(session.scalars(select(Image.status).where(Image.study_id.in_(LOAD_STUDIES))).all())
        per_image = _predictions_per_image(run)
        lines = {node: "\n".join(path.read_text(errors="replace").splitlines()[warm_lines[node]:]) for node, path in logs.items()}
        predicted = {node: sum(int(match.group(1)) for match in PREDICTED.finditer(text)) for node, text in lines.items()}
        recovered = sum(text.count("re-enqueued") for text in lines.values())

    lost = sum(1 for count in per_image.values() if count == 0)
    duplicated = sum(1 for count in per_image.values() if count > 1)
    latencies = np.array([(finished[upload.study_id] - upload.started_at).total_seconds() for upload in uploads])
    upload_seconds = np.array([(upload.returned_at - upload.started_at).total_seconds() for upload in uploads])
    first_start = min(upload.started_at for upload in uploads)
    last_done = max(finished[upload.study_id] for upload in uploads)
    span = (last_done - first_start).total_seconds()
    print(f"{args.arch}@{args.image_size}, runtime {args.runtime}, {args.uploads} concurrent uploads x {args.per_upload} real radiographs "
          f"(xrays/train), chunk {args.chunk_size}, batch {args.batch_size}, 2 worker nodes x {args.threads_per_worker} model thread(s), "
          f"portal: gunicorn {args.portal_workers} x 4 threads")
    print(f"both nodes warm first ({warm_studies} one-image warm-up studies, not counted)" if args.warm_up else "cold nodes: no warm-up")
    print(f"node b SIGKILLed (main + pool child) {(kill.at - first_start).total_seconds():.1f} s after the first upload started, "
          f"with {kill.done_before}/{total} images done and {kill.held} claimed by it; restarted and ready in "
          f"{(kill.restarted_at - kill.at).total_seconds():.1f} s; last study done {(last_done - kill.at).total_seconds():.1f} s after the kill")
    print(f"predicted by node a {predicted['a']}, by node b {predicted['b']} (both lives); watchdog lines 're-enqueued': {recovered}")
    print(f"images: {len(per_image)} of {total} recorded; statuses {', '.join(f'{s.value} {n}' for s, n in sorted(statuses.items()))}; "
          f"exactly one prediction: {sum(1 for c in per_image.values() if c == 1)}; {lost} lost, {duplicated} duplicated")
    print(f"throughput: {total / span:.1f} images/s ({total} images in {span:.1f} s, first upload started -> last study done)")
    print(f"upload start -> study done: p50 {np.percentile(latencies, 50):.1f} s, p95 {np.percentile(latencies, 95):.1f} s, "
          f"max {latencies.max():.1f} s; the HTTP upload itself p50 {np.percentile(upload_seconds, 50):.1f} s, "
          f"max {upload_seconds.max():.1f} s")
    ok = len(per_image) == total and lost == 0 and duplicated == 0 and statuses == Counter({ImageStatus.DONE: total})
    print("OK: every image has exactly one prediction" if ok else "FAILED: images lost, duplicated or not done")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

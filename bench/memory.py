"""Peak resident memory of the worker's pool child per chunk of hostile and of large images.

    .venv/bin/python -m bench.memory [--arch tf_efficientnetv2_s] [--pngs 64] [--jpegs 64]
    .venv/bin/python -m bench.memory --decode-pixel-budget 1000000000000   # no pixel budget

Starts a real `celery -A worker worker` (one pool child) on an embedded SQLite database and the
filesystem broker, warms it with two chunks of ordinary 512x512 JPEGs (model loaded, its memory
at steady state), then queues one chunk of 7745x7745 all-zero RGBA PNGs (233 KB each, under the 60-megapixel
limit) and one chunk of 2000x2500 JPEGs made from the real radiographs. Before each chunk the
child's peak (VmHWM) is reset (``/proc/PID/clear_refs``); after it the peak is read and set
against the child's resident memory before the chunk (idle). The worker's labels are compared with
the plain path (full decode -> transform -> the same model, in this process). Random weights: the
figures are about memory, not accuracy. Target: peak growth <= 400 MB per chunk of 64.
"""

from __future__ import annotations

import argparse
import io
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select

from bench.common import git_revision, jpeg_bytes, machine_line, make_jpegs, settings_env, source_images, start_worker, wait_until
from core import registry
from core.config import Settings, load_settings
from core.db import Database
from core.imaging import decode_image
from core.migrate import upgrade
from core.ml.modelio import create_model, save_weights
from core.ml.runtimes import load_predictor
from core.preprocessing import default_preprocessing
from core.models import Image, ImageStatus, ModelVersion, Study
from core.queue import enqueue_images, make_celery
from core.studies import add_upload, create_study

TARGET_MB = 400


def hostile_png(side: int) -> bytes:
    """An all-zero RGBA PNG ``side`` x ``side``: a few hundred KB that decode to ``4 * side**2`` bytes."""
    buffer = io.BytesIO()
    PILImage.new("RGBA", (side, side)).save(buffer, "PNG")
    return buffer.getvalue()


def with_text_chunk(png: bytes, text: str) -> bytes:
    """``png`` with a tEXt chunk after its header: distinct bytes (stored apart), the same pixels."""
    body = b"Comment\x00" + text.encode("latin-1")
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    end_of_header = 8 + 4 + 4 + 13 + 4  # signature, IHDR length, type, data, CRC
    return png[:end_of_header] + chunk + png[end_of_header:]


def child_pid(parent: int) -> int:
    """The worker's one pool child."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    if len(children) != 1:
        raise SystemExit(f"expected one pool child of the worker {parent}, found {children}")
    return int(children[0])


def memory_mb(pid: int) -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` (peak resident) of ``pid`` in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def reset_peak(pid: int) -> None:
    """Reset ``pid``'s peak resident memory (VmHWM) to its current resident memory."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def run_chunk(db: Database, settings: Settings, name: str, files: list[tuple[str, bytes]]) -> tuple[int, float]:
    """Record ``files`` as one study, queue it, wait until it is finished; returns (study id, seconds)."""
    with db.transaction() as session:
        version = session.scalars(select(ModelVersion).where(ModelVersion.is_production.is_(True))).one()
        study = create_study(session, name, version)
        ids = [add_upload(session, settings, study, filename, data).id for filename, data in files]
        study_id = study.id
    started = time.perf_counter()
    enqueue_images(make_celery(settings, main="bench"), study_id, ids, settings.chunk_size)

    def finished() -> bool:
        with db.transaction() as session:
            return session.get(Study, study_id).finished_at is not None

    wait_until(finished, 3600, f"study {name}", interval=0.5)
    return study_id, time.perf_counter() - started


def worker_labels(db: Database, study_id: int) -> tuple[list[str | None], Counter[str]]:
    """Each image's label in upload order (None when it failed), and the count of each status."""
    with db.transaction() as session:
        images = session.scalars(select(Image).where(Image.study_id == study_id).order_by(Image.id)).all()
        labels = [image.predictions[0].label if image.predictions else None for image in images]
        return labels, Counter(ImageStatus(image.status).value for image in images)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print each chunk's idle and peak resident memory of the pool child."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tf_efficientnetv2_s")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx", "standin"])
    parser.add_argument("--pngs", type=int, default=64, help="all-zero RGBA PNGs in the hostile chunk")
    parser.add_argument("--png-side", type=int, default=7745)
    parser.add_argument("--jpegs", type=int, default=64, help="2000x2500 JPEGs in the large chunk")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--decode-pixel-budget", type=int, help="TRIAGE_DECODE_PIXEL_BUDGET (default: the setting's)")
    args = parser.parse_args(argv)
    print(f"machine: {machine_line()}; commit {git_revision()} (+ working tree)")

    with tempfile.TemporaryDirectory() as tmp:
        overrides: dict[str, object] = {}
        if args.decode_pixel_budget is not None:
            overrides["decode_pixel_budget"] = args.decode_pixel_budget
        settings = load_settings(
            {}, data_dir=Path(tmp), runtime=args.runtime, batch_size=args.batch_size, chunk_size=max(args.pngs, args.jpegs, 64), **overrides,
        )
        upgrade(settings.database_url)
        db = Database(settings)
        labels = ["comminuted_fracture", "no_fracture", "simple_fracture"]
        weights = save_weights(create_model(args.arch, len(labels)), Path(tmp) / "w.safetensors")
        with db.transaction() as session:
            version = registry.register_version(
                session, settings, weights, name=f"bench {args.arch}", architecture=args.arch, labels=labels,
                preprocessing=default_preprocessing(args.image_size), threshold=0.0,
            )
            registry.promote(session, version.id)
            spec = registry.ModelSpec.from_version(version)
        print(f"{args.arch}@{args.image_size}, runtime {args.runtime}, batch {settings.batch_size}, "
              f"decode budget {settings.decode_pixel_budget:,} pixels")

        png = hostile_png(args.png_side)
        # title -> (files, whether every file has the same pixels)
        chunks = {
            f"{args.pngs} x {args.png_side}x{args.png_side} RGBA PNG ({len(png) / 1024:.0f} KB, all zeros)":
                ([(f"zeros{i:03d}.png", with_text_chunk(png, f"copy {i}")) for i in range(args.pngs)], True),
            f"{args.jpegs} x 2000x2500 JPEG (radiographs)":
                ([(f"large{i:03d}.jpg", jpeg_bytes(path, (2000, 2500), salt=i + 1)) for i, path in enumerate(source_images(args.jpegs))], False),
        }
        log_path = Path(tmp) / "worker.log"
        worker = start_worker(settings_env(settings), log_path, hostname="bench-memory")
        try:
            # Warm up as a production worker would be: model loaded and at its steady memory. ONNX Runtime
            # plans a batch shape's memory on its first run and allocates the plan on the second (about
            # +140 MB for batch 32 here), so two chunks of ordinary images.
            ordinary = make_jpegs(64)
            for warm_up in range(2):
                run_chunk(db, settings, f"warm-up {warm_up}", [(f"w{warm_up}-{i:03d}.jpg", data) for i, data in enumerate(ordinary)])
            child = child_pid(worker.pid)
            results = []
            for title, (files, same_pixels) in chunks.items():
                if not files:
                    continue
                time.sleep(2)  # let the warm-up's or the previous chunk's threads wind down
                idle = memory_mb(child)["VmRSS"]
                reset_peak(child)
                study_id, seconds = run_chunk(db, settings, title, files)
                peak = memory_mb(child)["VmHWM"]
                if child_pid(worker.pid) != child:
                    raise SystemExit("the pool child was replaced during the chunk: its peak is lost (see the worker log)")
                got, statuses = worker_labels(db, study_id)
                results.append((title, files, same_pixels, idle, peak, seconds, got, statuses))
        finally:
            worker.terminate()
            worker.wait(timeout=60)

        predictor = load_predictor(spec, settings)
        print(f"{'chunk':<58} {'idle MB':>8} {'peak MB':>8} {'growth':>8}  {'s':>6}  result")
        for title, files, same_pixels, idle, peak, seconds, got, statuses in results:
            # The plain path: full decode at full resolution, the version's transform, the same model.
            blobs = [files[0][1]] if same_pixels else [data for _, data in files]
            expected = []
            for start in range(0, len(blobs), 16):
                pictures = [decode_image(data, settings.max_image_pixels) for data in blobs[start : start + 16]]
                probabilities = predictor.predict_tensor(predictor.preprocess(pictures))
                expected += [spec.labels[int(index)] for index in np.argmax(probabilities, axis=1)]
                del pictures
            if same_pixels:
                expected = expected * len(files)
            same = sum(a == b for a, b in zip(got, expected))
            growth = peak - idle
            verdict = "ok" if growth <= TARGET_MB else "OVER"
            print(f"{title:<58} {idle:8.0f} {peak:8.0f} {growth:+8.0f}  {seconds:6.1f}  {verdict} (target +{TARGET_MB}); "
                  f"{dict(statuses)}; labels equal to the full-decode path: {same}/{len(files)}")
        db.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())

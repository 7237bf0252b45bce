"""Shared pieces of the benchmarks: test images and the original one-image-at-a-time loop."""

from __future__ import annotations

import io
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.config import Settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_XRAYS = Path(os.environ.get("TRIAGE_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data")) / "xrays"


def machine_line() -> str:
    """One line naming the CPU, cores and torch build, printed with every result."""
    cpu = platform.processor() or "cpu"
    try:
        model = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}; {os.cpu_count()} cores; {gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def source_images(count: int, split: str = "test") -> list[Path]:
    """Real radiographs from ../shared/data/xrays, cycling when more are asked for than exist."""
    files = sorted((SHARED_XRAYS / split).glob("*/*.jpg"))
    if not files:
        raise SystemExit(f"no radiographs under {SHARED_XRAYS / split}; set TRIAGE_SHARED_DATA")
    return [files[i % len(files)] for i in range(count)]


def jpeg_bytes(path: Path, size: tuple[int, int], quality: int = 90, salt: int = 0) -> bytes:
    """The radiograph at ``path`` resized to ``size`` as JPEG bytes (``salt`` makes copies distinct).

    The salt changes a corner pixel in all three channels, so the picture stays grey like every
    radiograph in ../shared/data (R = G = B).
    """
    image = Image.open(path).convert("RGB").resize(size, Image.BILINEAR)
    if salt:
        array = np.asarray(image).copy()
        array[0, 0, :] = salt % 256
        array[0, 1, :] = (salt // 256) % 256
        image = Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def make_jpegs(count: int, size: tuple[int, int] = (512, 512)) -> list[bytes]:
    """``count`` distinct JPEGs of ``size`` made from the real radiographs."""
    return [jpeg_bytes(path, size, salt=index + 1) for index, path in enumerate(source_images(count))]


def original_loop(model: torch.nn.Module, images: list[bytes], image_size: int = 224) -> np.ndarray:
    """The original project's inference: one image at a time, PIL -> Resize -> ToTensor -> Normalize."""
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    outputs = []
    model.eval()
    with torch.no_grad():
        for data in images:
            image = Image.open(io.BytesIO(data)).convert("RGB")
            tensor = transform(image).unsqueeze(0)
            outputs.append(torch.softmax(model(tensor), dim=1)[0].numpy())
    return np.stack(outputs)


def git_revision() -> str:
    """The commit the benchmark ran on."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def settings_env(settings: Settings) -> dict[str, str]:
    """This process's environment with every ``TRIAGE_*`` variable replaced by ``settings``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TRIAGE_")}
    env.update({f"TRIAGE_{key.upper()}": str(value) for key, value in settings.model_dump().items() if value is not None})
    return env


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``condition`` until it is truthy; exit naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise SystemExit(f"timed out waiting for {what}")


def start_worker(env: dict[str, str], log_path: Path, hostname: str = "bench") -> subprocess.Popen[bytes]:
    """Start a real `celery -A worker worker` (one pool child) with ``env``; returns once it is ready."""
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel", "INFO", "--concurrency", "1",
         "--without-gossip", "--without-mingle", "--hostname", f"{hostname}-{os.getpid()}@%h"],
        cwd=PROJECT_ROOT, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
    )

    def ready() -> bool:
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited with {worker.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}")
        return " ready." in log_path.read_text(errors="replace")

    wait_until(ready, 120, "the worker")
    return worker

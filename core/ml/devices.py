"""What each worker process takes of its node: its own GPU, and its share of the CPU cores.

``celery -A worker worker`` with ``TRIAGE_WORKER_CONCURRENCY=N`` forks N pool children. On a node
with N GPUs each child pins its own one, chosen from the child's pool index: it sets
``CUDA_VISIBLE_DEVICES`` to that one GPU before anything in it touches CUDA, so every ``cuda``
device in the child (PyTorch, ONNX Runtime, nvJPEG) is that GPU, and it logs which one it took.
The choice itself (:func:`assign_device`) is plain logic, tested without a GPU.

The parent never touches CUDA (CUDA does not survive a fork): it neither imports torch here nor
counts GPUs; each child counts them through NVML (``torch.cuda.device_count`` initialises no
CUDA context).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from core.config import Settings

log = logging.getLogger(__name__)

VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class DeviceAssignment:
    """The GPU one pool child takes, and how many children take each GPU."""

    #: Pool index of the child (0 for the first).
    child: int
    #: The GPU, as ``CUDA_VISIBLE_DEVICES`` names it (an index or a UUID).
    device: str
    #: Every GPU the children take in turn, in order.
    devices: tuple[str, ...]
    #: How many of the ``concurrency`` children share this GPU (1: it has it alone).
    sharing: int

    def describe(self) -> str:
        """One log line: which child took which GPU, and whether it shares it."""
        shared = f", shared with {self.sharing - 1} other pool child(ren)" if self.sharing > 1 else ""
        return f"pool child {self.child} uses GPU {self.device} ({VISIBLE_DEVICES}={self.device}) of {','.join(self.devices)}{shared}"


def parse_device_list(value: str | None) -> tuple[str, ...]:
    """``"0, 1,GPU-ab"`` -> ``("0", "1", "GPU-ab")``; empty or None -> ``()``."""
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


def assign_device(child: int, concurrency: int, configured: Sequence[str], visible: Sequence[str], count: int) -> DeviceAssignment | None:
    """The GPU pool child ``child`` of ``concurrency`` takes: entry ``child mod n`` of the candidates.

    Args:
        child: the child's pool index (Celery's prefork pool numbers its children from 0 and gives
            a replaced child the index of the one it replaces).
        concurrency: pool children of this worker (``TRIAGE_WORKER_CONCURRENCY``).
        configured: ``TRIAGE_CUDA_DEVICES`` entries; when given, they are the candidates.
        visible: the worker's own ``CUDA_VISIBLE_DEVICES`` entries (set by a container runtime or
            a scheduler); the candidates when nothing is configured.
        count: GPUs the worker sees; with neither list, the candidates are ``0 .. count-1``.

    Returns:
        None when there is no GPU to take (a CPU node); else the assignment. More children than
        GPUs share them in turn (``sharing`` says how many per GPU).

    Raises:
        ValueError: for a negative child index or a concurrency below 1.
    """
    if child < 0 or concurrency < 1:
        raise ValueError(f"child index {child} / concurrency {concurrency}: need an index >= 0 and concurrency >= 1")
    candidates = tuple(configured) or tuple(visible) or tuple(str(index) for index in range(count))
    if not candidates:
        return None
    slot = child % len(candidates)
    sharing = len(range(slot, max(concurrency, child + 1), len(candidates)))
    return DeviceAssignment(child, candidates[slot], candidates, sharing)


def pool_child_index() -> int | None:
    """This process's index in Celery's prefork pool (None outside a pool child)."""
    from billiard.process import current_process

    index = getattr(current_process(), "index", None)
    return index if isinstance(index, int) else None


def pin_pool_child(settings: Settings, child: int | None = None) -> DeviceAssignment | None:
    """In a freshly forked pool child: take this child's own GPU before anything touches CUDA.

    Sets ``CUDA_VISIBLE_DEVICES`` to the one GPU :func:`assign_device` gives this child and logs
    it. Does nothing on a CPU-only worker (``TRIAGE_DEVICE=cpu``), outside a pool child, or where
    no GPU is present. Returns the assignment, if any.
    """
    child = pool_child_index() if child is None else child
    if settings.device == "cpu" or child is None:
        return None
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        log.warning("pool child %s: CUDA was initialised before the fork; it keeps the GPU it has", child)
        return None
    import torch

    visible = parse_device_list(os.environ.get(VISIBLE_DEVICES))
    configured = parse_device_list(settings.cuda_devices)
    # With a list to choose from, NVML's count is not needed (it already reflects that list).
    count = 0 if configured or visible else torch.cuda.device_count()
    assignment = assign_device(child, settings.worker_concurrency, configured, visible, count)
    if assignment is None:
        log.info("pool child %s: no GPU on this node; it runs on the CPU", child)
        return None
    os.environ[VISIBLE_DEVICES] = assignment.device
    (log.warning if assignment.sharing > 1 else log.info)("%s", assignment.describe())
    return assignment


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def decode_thread_count(configured: int, cores: int, concurrency: int) -> int:
    """Threads (decode or model) for one worker process: ``configured``, or (0) its share of the node's ``cores``.

    The node's cores are divided among the ``concurrency`` worker processes, at least one each,
    so N processes decoding at once keep every core busy without oversubscribing them.
    """
    if configured > 0:
        return configured
    return max(1, cores // max(1, concurrency))


def decode_threads(settings: Settings) -> int:
    """Decode threads for this worker process, from ``TRIAGE_DECODE_THREADS`` and the node."""
    return decode_thread_count(settings.decode_threads, usable_cores(), settings.worker_concurrency)


def model_threads(settings: Settings) -> int:
    """CPU threads for the forward pass (PyTorch or ONNX Runtime), from ``TRIAGE_TORCH_THREADS`` and the node.

    0 (the default) shares the node's cores among the ``TRIAGE_WORKER_CONCURRENCY`` pool children,
    so two single-threaded children on a two-core node do not oversubscribe it.
    """
    return decode_thread_count(settings.torch_threads, usable_cores(), settings.worker_concurrency)

"""Decode and RLE-encode in worker processes (``--cpu-processes``), past the GIL of the actor.

With ``ComputeConfig.cpu_processes = N > 0`` each :class:`~pipeline.worker.LabelWorker` owns
a :class:`CpuProcesses` pool of N processes, started with the ``forkserver`` method (never a
plain ``fork`` of an actor that runs threads). The actor still reads the bytes (its
filesystem objects stay in one process), sends them to a child, and gets back the decoded
``[H, W, 3]`` uint8 array; after the engine, the result's arrays go to a child that returns
the finished row. The worker keeps its own bounds (at most ``batch_size *
prefetch_batches`` images submitted ahead of the engine), so the pool's queue is bounded too.

Failure rules are the worker's: a bad image is an error row (decided in the child, by the
same :func:`~pipeline.decode.decode_image`); a ``MemoryError`` in a child is re-raised in the
actor and fails the attempt; a child that dies (killed, out of memory) breaks the pool: the
attempt fails with :class:`CpuProcessDied` (the scheduler retries the shard) and the worker
starts a fresh pool. Children run one thread each (``OMP_NUM_THREADS`` and friends = 1) and
exit by themselves when the actor is gone. The forkserver imports this module and the
actor's main module (guarded by ``__name__ == "__main__"``, as Ray's worker is) once; the
children are forked from it with both loaded.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .decode import DecodedImage, decode_image
from .encode import encode_result, to_numpy
from .readers import RawImage

#: Where decoded pixels travel from a child to its actor (a memory-backed file system), when
#: it exists; else they are pickled through the pool's pipe.
PIXEL_DIR = "/dev/shm"  # noqa: S108 - files are created with mkstemp-like unique names

#: Environment variables that cap the threads of numeric libraries in a child.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class CpuProcessDied(RuntimeError):
    """A decode/encode process of this worker died: the shard attempt fails and is retried."""


@dataclass(frozen=True)
class ArrayResult:
    """An engine result reduced to numpy arrays (what a child needs to encode a row).

    Attributes:
        labels: ``[H, W]`` integer class indices.
        mask_scores, presence: ``[C]`` floats.
        confidence: ``[H, W]`` float32, or None.
    """

    labels: np.ndarray
    mask_scores: np.ndarray
    presence: np.ndarray
    confidence: np.ndarray | None = None

    @classmethod
    def of(cls, result: Any, confidence: bool) -> ArrayResult:
        """Copy a result's arrays off torch (and off the device); a label map whose values
        fit travels as uint8/uint16 (the same runs, an eighth or a quarter of the bytes)."""
        value = getattr(result, "confidence", None) if confidence else None
        return cls(_narrow(to_numpy(result.labels)), to_numpy(result.mask_scores),
                   to_numpy(result.presence), None if value is None else to_numpy(value))


@dataclass(frozen=True)
class PixelFile:
    """Decoded pixels left by a child in :data:`PIXEL_DIR` for its actor to take.

    Attributes:
        path: the file (raw ``[H, W, 3]`` uint8 bytes).
        shape: ``(H, W, 3)``.
    """

    path: str
    shape: tuple[int, ...]

    def take(self) -> np.ndarray:
        """The pixels (the file is removed)."""
        try:
            return np.fromfile(self.path, dtype=np.uint8).reshape(self.shape)
        finally:
            os.unlink(self.path)


def _narrow(labels: np.ndarray) -> np.ndarray:
    if labels.dtype.kind not in "iu" or labels.itemsize <= 2 or labels.size == 0:
        return labels
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high > np.iinfo(np.uint16).max:
        return labels
    return labels.astype(np.uint8 if high <= np.iinfo(np.uint8).max else np.uint16)


def decode_to_file(data: bytes, max_image_pixels: int, prefix: str) -> DecodedImage:
    """:func:`~pipeline.decode.decode_image` in a child; the pixels of an ``ok`` image go to
    a :class:`PixelFile` (``rgb`` holds it) instead of through the pool's pipe."""
    decoded = decode_image(data, max_image_pixels)
    if decoded.rgb is not None and prefix:
        fd, path = tempfile.mkstemp(prefix=prefix, dir=PIXEL_DIR)
        with os.fdopen(fd, "wb") as out:
            out.write(np.ascontiguousarray(decoded.rgb).data)
        decoded.rgb = PixelFile(path, decoded.rgb.shape)
    return decoded


def taken(decoded: DecodedImage) -> DecodedImage:
    """A decoded image with its pixels in memory (taken from their file, if any)."""
    if isinstance(decoded.rgb, PixelFile):
        decoded.rgb = decoded.rgb.take()
    return decoded


def resolve_processes(setting: int | str, cpus: float | None) -> int:
    """Processes to start for ``cpu_processes``.

    Args:
        setting: a count (0: decode in threads), or ``auto``: the actor's CPUs minus one
            (the actor's own thread feeds the engine), 0 when that leaves fewer than 2.
        cpus: CPUs Ray assigned to the actor (None outside Ray: this machine's CPUs).
    """
    if setting != "auto":
        return int(setting)
    share = int(cpus) if cpus else (os.cpu_count() or 1)
    return share - 1 if share - 1 >= 2 else 0


class CpuProcesses:
    """A pool of decode/encode processes owned by one worker."""

    def __init__(self, processes: int, max_image_pixels: int) -> None:
        """Start nothing yet: the pool starts its processes on first use.

        Args:
            processes: pool size (>= 1).
            max_image_pixels: decompression-bomb limit applied in the children.
        """
        self.processes, self.max_image_pixels = processes, max_image_pixels
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._prefix = f"{PIXEL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-" \
            if os.path.isdir(PIXEL_DIR) else ""

    def pool(self) -> ProcessPoolExecutor:
        """The live pool (started, or restarted after a child died)."""
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("forkserver")
                # imported once in the forkserver, which children are forked from
                context.set_forkserver_preload(["__main__", "pipeline.cpu_pool"])
                self._pool = ProcessPoolExecutor(
                    self.processes, mp_context=context, initializer=_init_child,
                    initargs=(os.getpid(), self.max_image_pixels, self._prefix))
            return self._pool

    def decode(self, data: bytes) -> Future:
        """``Future[DecodedImage]`` of :func:`~pipeline.decode.decode_image` in a child (its
        pixels may be a :class:`PixelFile`: see :func:`taken`)."""
        return self.pool().submit(decode_to_file, data, self.max_image_pixels,
                                  self._prefix)

    def encode(self, shard_id: str, item: RawImage, decoded: DecodedImage, result: Any,
               num_classes: int, confidence: bool) -> Future:
        """``Future[dict]``: the row of an engine result, encoded in a child."""
        light = RawImage(item.key, item.source_uri, image_id=item.image_id)
        return self.pool().submit(encode_result, shard_id, light, decoded,
                                  ArrayResult.of(result, confidence), num_classes, confidence)

    def pids(self) -> list[int]:
        """Process ids of the live children (tests)."""
        with self._lock:
            return list(self._pool._processes) if self._pool else []  # noqa: SLF001

    def restart(self) -> None:
        """Drop the pool if it is broken (a child died); the next use starts a fresh one. A
        pool started since (by another shard of this worker) is kept."""
        with self._lock:
            pool = self._pool
            if pool is None or not getattr(pool, "_broken", True):
                return
            self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the children (waits for them) and remove pixel files nobody took."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

        _remove_pixel_files(self._prefix)


def _init_child(owner_pid: int, max_image_pixels: int, prefix: str) -> None:
    """Runs first in every child: one thread per numeric library, the pixel limit, and a
    watcher that ends the child when the actor that owns it is gone."""
    for name in THREAD_VARIABLES:
        os.environ[name] = "1"
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, max_image_pixels)
    started = _start_time(owner_pid)
    threading.Thread(target=_watch_owner, args=(owner_pid, started, prefix),
                     daemon=True).start()


def _watch_owner(pid: int, started: str | None, prefix: str,
                 interval_s: float = 0.5) -> None:
    """Exit once the owner is gone, removing the pixel files it left. Its pid is watched,
    not this child's parent: forkserver children keep the forkserver alive, and each one is
    a child of the forkserver."""
    while _start_time(pid) == started and started != "gone":
        time.sleep(interval_s)
    _remove_pixel_files(prefix)
    os._exit(0)


PIXEL_PREFIX = "cass-pixels-"


def remove_stale_pixel_files(directory: str = PIXEL_DIR) -> int:
    """Delete pixel files whose actor (the pid in their name) is gone: ``ray.kill`` ends an
    actor and its children at once, before they can clean up. Returns how many."""
    def stale(name: str) -> bool:
        if not name.startswith(PIXEL_PREFIX):
            return False
        pid = name[len(PIXEL_PREFIX):].split("-", 1)[0]
        return pid.isdigit() and _start_time(int(pid)) == "gone"

    return _remove_files(directory, stale)


def _remove_pixel_files(prefix: str) -> None:
    if prefix:
        _remove_files(PIXEL_DIR, lambda name: name.startswith(prefix))


def _remove_files(directory: str, wanted: Callable[[str], bool]) -> int:
    """Delete the files of ``directory`` whose names are ``wanted``; returns how many (a
    missing directory, or a file another process removed first, counts as nothing)."""
    try:
        names = os.listdir(directory)
    except OSError:  # no such directory here: pixels went through the pipe
        return 0
    removed = 0
    for name in filter(wanted, names):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
            removed += 1
    return removed


def _start_time(pid: int) -> str | None:
    """The start time of a live process (a zombie is gone; a reused pid has another start
    time), ``"gone"`` when it is not running; None where ``/proc`` is missing and the
    process exists."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return "gone"
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "gone"
        return None
    return "gone" if fields[0] in ("Z", "X") else fields[19]

"""The per-shard work of one engine worker: read -> decode -> label -> encode -> write.

:class:`LabelWorker` is a plain class (tested without Ray); :mod:`pipeline.runner` wraps it
as a Ray actor. Decoding and RLE encoding run on a thread pool (or, with ``cpu_processes``,
in processes: :mod:`pipeline.cpu_pool`) so the engine does not wait for them; the engine
itself is called under a lock, so two shards can be in flight per worker (one decoding or
writing while the other uses the engine). Queues are bounded: at most ``batch_size *
prefetch_batches`` decoded images ahead of the engine, and at most ``2 * batch_size`` results
waiting for encoding.

Engine failures are sorted by cause. An image the engine refuses (``ImageInputError``) is an
``engine_error`` row. Any other failure of a batch (a CUDA error, ``MemoryError``, a bug) is
not the images' fault: on a shard's first launch it raises :class:`EngineFault`, which fails
the attempt (the driver replaces the worker and retries the shard). From the second launch
on, a failing batch is isolated by running its images one at a time, and an image that fails
alone becomes an ``engine_error`` row, unless every image of a batch of several fails alone,
or ``MAX_FAULT_STREAK`` images in a row fail alone on this worker (a device that broke: with
``--batch-size 1`` every call is one image), and then the engine is at fault and the attempt
fails again.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from PIL import Image

from schemas.io import open_uri

from .config import ComputeConfig, EngineSpec, IOConfig
from .cpu_pool import (
    CpuProcessDied,
    CpuProcesses,
    remove_stale_pixel_files,
    resolve_processes,
    taken,
)
from .decode import DecodedImage, decode_image, max_encoded_bytes
from .encode import encode_result, failure_row
from .engine import build_engine, choose_device, set_engine_vocabulary
from .lease import check_holder
from .memory import peak_rss_bytes
from .progress import ShardCounts, shard_counts
from .readers import RawImage, iter_raw_images
from .record import weight_differences
from .shards import ShardSpec
from .spool import RowSpool, remove_stale_spools
from .writer import write_shard

Item = tuple[RawImage, DecodedImage]


#: Images in a row that fail alone, not because of the image, before the engine is blamed.
MAX_FAULT_STREAK = 3


class EngineFault(RuntimeError):
    """The engine failed for a reason that is not about the images: the shard attempt fails
    (it is retried on another worker) instead of writing error rows."""


def is_image_error(exc: BaseException) -> bool:
    """Whether an engine exception is about the image itself (``ImageInputError``; matched by
    name so that the driver never imports the engine)."""
    return any(cls.__name__ == "ImageInputError" for cls in type(exc).__mro__)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, picklable.

    Attributes:
        engine: how to build the engine.
        io: input/output configuration (storage options travel here, never logged).
        compute: batch size, threads, prefetch.
        fingerprint: the run fingerprint written into every completion record.
        run_metadata: JSON for the Parquet file metadata (categories, vocabulary hash, run).
        run_id: the run's id (names its tables); when set, a shard is certified only while
            this run holds the output's lease (see :mod:`pipeline.lease`).
    """

    engine: EngineSpec
    io: IOConfig
    compute: ComputeConfig
    fingerprint: str
    run_metadata: Mapping = field(default_factory=dict)
    run_id: str = ""


class LabelWorker:
    """Holds one engine and labels whole shards."""

    def __init__(self, spec: WorkerSpec, text_embeddings: Any = None,
                 run_metadata: Mapping | None = None) -> None:
        """Build the engine on this worker's device.

        Args:
            spec: the worker's configuration.
            text_embeddings: shared embeddings to adopt (replacement workers); None leaves
                them to :meth:`compute_text_embeddings` or :meth:`prepare`.
            run_metadata: Parquet file metadata of this run (else ``spec.run_metadata``).
        """
        self.spec = spec
        self.gpu_ids, cpus = _ray_resources()
        _limit_threads(cpus)
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, spec.io.max_image_pixels)
        self.device = choose_device(spec.engine.device, self.gpu_ids)
        self.engine = build_engine(spec.engine, self.device)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(spec.compute.decode_threads, "cass-decode")
        processes = resolve_processes(spec.compute.cpu_processes, cpus)
        self._cpu = CpuProcesses(processes, spec.io.max_image_pixels) if processes else None
        self._in_fs, _ = open_uri(spec.io.input_uri, spec.io.storage_options)
        self._out_fs, self._out_root = open_uri(spec.io.output_uri, spec.io.storage_options)
        self._run_metadata = dict(spec.run_metadata)
        remove_stale_spools()  # left by workers killed mid-shard on this node
        remove_stale_pixel_files()  # left by decode processes of killed workers
        self.engine_seconds = 0.0
        self._fault_streak = 0  # images in a row that failed alone, not about the image
        self._live: dict[str, ShardCounts] = {}
        self._beats: dict[str, int] = {}
        self._live_lock = threading.Lock()
        if text_embeddings is not None:
            self.prepare(text_embeddings, run_metadata)

    # ------------------------------------------------------------------ setup
    def describe(self) -> dict:
        """Identity of this worker: process, node, GPUs, device, engine weights."""
        return {
            "pid": os.getpid(), "host": os.uname().nodename, "gpu_ids": list(self.gpu_ids),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": self.device, "weights_info": getattr(self.engine, "weights_info", {}),
        }

    def compute_text_embeddings(self, as_bytes: bool = False) -> Any:
        """Embed the vocabulary the driver parsed (done once per job, on one worker).

        Args:
            as_bytes: return them pickled, so that the driver can own a copy without
                importing the engine (a copy that outlives this worker's node).
        """
        with self._lock:
            embeddings = set_engine_vocabulary(self.engine, self.spec.engine)
        return pickle.dumps(embeddings) if as_bytes else embeddings

    def prepare(self, text_embeddings: Any, run_metadata: Mapping | None = None) -> bool:
        """Adopt shared text embeddings (or their pickle from this run's driver) and the file
        metadata of this run."""
        if isinstance(text_embeddings, bytes):
            text_embeddings = pickle.loads(text_embeddings)  # noqa: S301 - our own workers'
        if run_metadata is not None:
            expected = run_metadata.get("run", {}).get("models") or {}
            changed = weight_differences(expected, getattr(self.engine, "weights_info", {}))
            if changed:
                raise RuntimeError(f"this worker's weights differ from the run's "
                                   f"({', '.join(changed)}); the staged copies of the weight "
                                   "files differ between nodes")
            self._run_metadata = dict(run_metadata)
        with self._lock:
            set_engine_vocabulary(self.engine, self.spec.engine, text_embeddings)
        return True

    def progress(self) -> dict[str, dict]:
        """``{shard_id: {"images", "expected", "beat"}}`` of the shards in progress: images
        labelled so far, the shard's estimated image count (None: not known yet), and a
        counter that moves whenever the shard makes progress (started, an image finished,
        writing started), so a driver that sees it stand still knows it is stuck. Counted
        in memory as images finish; the driver asks every few seconds."""
        with self._live_lock:
            out = {}
            for shard_id, beat in self._beats.items():
                counts = self._live.get(shard_id)
                images = counts.images if counts else 0
                out[shard_id] = {"images": images, "beat": beat,
                                 "expected": counts.expected() if counts else None}
            return out

    def peak_memory_bytes(self) -> int:
        """Peak resident memory of this process."""
        return peak_rss_bytes()

    def close(self) -> None:
        """Stop this worker's decode threads and processes (an actor's children also end by
        themselves when the actor dies)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._cpu is not None:
            self._cpu.close()

    # ------------------------------------------------------------------ work
    def process_shard(self, shard: ShardSpec, max_images: int | None = None,
                      attempt: int = 0) -> dict:
        """Label a shard and write its table and completion record.

        Args:
            shard: the shard.
            max_images: stop after this many images (``--limit``); the record says
                ``truncated`` when images were left out.
            attempt: the shard's launch number in this run (0: first launch): names its
                table, and from 1 on failing batches are isolated.

        Returns:
            The completion record, plus ``engine_seconds`` spent in the engine.

        Raises:
            EngineFault: the engine failed for a reason that is not about the images.
        """
        started = time.monotonic()
        engine_before = self.engine_seconds
        self._beat(shard.shard_id)
        counts = self._live.setdefault(shard.shard_id, shard_counts(shard, self._in_fs,
                                                                    max_images))
        items = counts.count(iter_raw_images(shard, self._in_fs, self.spec.io.image_column,
                                             self.spec.io.id_column,
                                             max_encoded_bytes(self.spec.io.max_image_pixels)))
        if max_images is not None:
            items = islice(items, max_images + 1)
        spool = RowSpool(self._run_metadata)
        try:
            truncated = False
            for row in self.iter_rows(shard.shard_id, items, isolate=attempt > 0):
                if max_images is not None and spool.num_rows >= max_images:
                    truncated = True
                    break
                spool.add(row)
            rows = spool.close()
            counts.known = counts.images
            self._beat(shard.shard_id)
            extra = {"source_uri": shard.source_uri, "fingerprint": self.spec.fingerprint,
                     "input_fingerprint": shard.fingerprint, "truncated": truncated,
                     "worker": {"pid": os.getpid(), "device": self.device}}
            record = write_shard(self._out_fs, self._out_root, shard.shard_id, rows,
                                 self._run_metadata, extra, self.spec.run_id or "local",
                                 attempt, self._fence)
        finally:
            spool.discard()
            with self._live_lock:
                self._live.pop(shard.shard_id, None)
                self._beats.pop(shard.shard_id, None)
        return {**record, "seconds": time.monotonic() - started,
                "engine_seconds": self.engine_seconds - engine_before}

    def _fence(self) -> None:
        """Certify only while this run holds the output's lease (no-op without a run id)."""
        if self.spec.run_id:
            check_holder(self._out_fs, self._out_root, self.spec.run_id)

    def label_items(self, shard_id: str, items: Iterable[RawImage],
                    isolate: bool = False) -> list[dict]:
        """Rows for raw images, in input order (see :meth:`iter_rows`)."""
        return list(self.iter_rows(shard_id, items, isolate))

    def iter_rows(self, shard_id: str, items: Iterable[RawImage],
                  isolate: bool = False) -> Iterator[dict]:
        """Rows for raw images, in input order, as they are finished (at most a few batches
        of them are in memory).

        Args:
            isolate: run a failing batch one image at a time and write the images that fail
                alone as error rows (a retried shard); else such a failure raises.

        Raises:
            EngineFault: see the module docstring.
            CpuProcessDied: a decode/encode process died (the pool is restarted).
        """
        try:
            yield from self._rows(shard_id, items, isolate)
        except BrokenProcessPool as exc:
            if self._cpu is not None:
                self._cpu.restart()
            raise CpuProcessDied(f"a decode/encode process of this worker died "
                                 f"(--cpu-processes): {exc}") from exc

    def _rows(self, shard_id: str, items: Iterable[RawImage], isolate: bool) -> Iterator[dict]:
        compute = self.spec.compute
        decoded = map(_resolved, _ordered_map(self._pool, self._load_and_decode, items,
                                              compute.batch_size * compute.prefetch_batches))
        pending: deque[Future] = deque()
        self._live.setdefault(shard_id, ShardCounts())
        for batch in _batched(decoded, compute.batch_size):
            for future in self._label_batch(shard_id, batch, isolate):
                future.add_done_callback(lambda _, sid=shard_id: self._count_row(sid))
                pending.append(future)
            while len(pending) > 2 * compute.batch_size:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def _count_row(self, shard_id: str) -> None:
        with self._live_lock:
            if shard_id in self._live:
                self._live[shard_id].images += 1
            if shard_id in self._beats:
                self._beats[shard_id] += 1

    def _beat(self, shard_id: str) -> None:
        with self._live_lock:
            self._beats[shard_id] = self._beats.get(shard_id, 0) + 1

    def _load_and_decode(self, item: RawImage) -> tuple[RawImage, DecodedImage | Future]:
        if item.error is not None:
            return item, DecodedImage(None, None, None, *item.error)
        try:
            data = item.load(self._in_fs)
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            return item, DecodedImage(None, None, None, "read_error", f"{type(exc).__name__}: "
                                      f"{exc}")
        item.data = None
        if self._cpu is not None:
            return item, self._cpu.decode(data)
        return item, decode_image(data, self.spec.io.max_image_pixels)

    def _label_batch(self, shard_id: str, batch: list[Item], isolate: bool) -> list[Future]:
        ok = [(item, dec) for item, dec in batch if dec.status == "ok"]
        results = iter(self._segment([dec.rgb for _, dec in ok], isolate))
        futures = []
        num_classes = self.engine.vocabulary.num_classes
        for item, dec in batch:
            if dec.status != "ok":
                futures.append(_done(failure_row(shard_id, item, dec, dec.status, dec.error)))
                continue
            result = next(results)
            dec.rgb = None
            confidence = self.spec.io.confidence
            if self._cpu is not None and not isinstance(result, Exception):
                futures.append(self._cpu.encode(shard_id, item, dec, result, num_classes,
                                                confidence))
            else:
                futures.append(self._pool.submit(encode_result, shard_id, item, dec, result,
                                                 num_classes, confidence))
        return futures

    def _segment(self, images: list, isolate: bool = False) -> list:
        """Engine results (or the exception of an image that failed alone), one per image.

        Raises:
            EngineFault: the batch failed for a reason that is not about its images.
        """
        if not images:
            return []
        with self._lock:
            started = time.monotonic()
            try:
                return self.engine.segment(images, return_logits=False, return_probs=False)
            except Exception as exc:  # noqa: BLE001 - sorted by cause below
                if not (isolate or is_image_error(exc)):
                    raise _fault(exc, len(images)) from exc
                results = [self._segment_one(image) for image in images]
            finally:
                self.engine_seconds += time.monotonic() - started
        faults = [r for r in results if isinstance(r, Exception) and not is_image_error(r)]
        if faults and (not isolate or len(faults) == len(images) > 1):
            raise _fault(faults[0], len(images), len(faults)) from faults[0]
        for result in results:
            is_fault = isinstance(result, Exception) and not is_image_error(result)
            self._fault_streak = self._fault_streak + 1 if is_fault else 0
            if self._fault_streak >= MAX_FAULT_STREAK:
                self._fault_streak = 0
                raise _fault(result, len(images), len(faults)) from result
        return results

    def _segment_one(self, image: Any) -> Any:
        try:
            return self.engine.segment([image], return_logits=False, return_probs=False)[0]
        except Exception as exc:  # noqa: BLE001 - the caller decides: error row or fault
            return exc


def _fault(exc: BaseException, batch: int, alone: int | None = None) -> EngineFault:
    where = f"a batch of {batch} image(s)" if alone is None else \
        f"{alone} of {batch} image(s) run one at a time"
    return EngineFault(f"engine failed on {where}, not because of an image: "
                       f"{type(exc).__name__}: {str(exc)[:300]}")


def _resolved(pair: tuple[RawImage, DecodedImage | Future]) -> Item:
    """An item and its decoded image (waiting for a decode process when it has one)."""
    item, decoded = pair
    return item, taken(decoded.result()) if isinstance(decoded, Future) else decoded


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _ordered_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable,
                 ahead: int) -> Iterator:
    """``map(fn, items)`` on a pool, in order, with at most ``ahead`` calls outstanding."""
    window: deque[Future] = deque()
    for item in items:
        window.append(pool.submit(fn, item))
        if len(window) >= ahead:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


def _batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _ray_resources() -> tuple[list, float | None]:
    """GPU ids and CPUs assigned to this process by Ray (``[], None`` outside Ray)."""
    try:
        import ray
    except ImportError:
        return [], None
    if not ray.is_initialized():
        return [], None
    try:
        assigned = ray.get_runtime_context().get_assigned_resources()
    except AssertionError:  # a driver, not a Ray worker: nothing assigned
        return [], None
    return list(ray.get_gpu_ids()), assigned.get("CPU")


def _limit_threads(cpus: float | None) -> None:
    """Match torch's intra-op threads to the CPUs Ray gave this actor."""
    if not cpus:
        return
    import torch

    torch.set_num_threads(max(1, int(cpus)))

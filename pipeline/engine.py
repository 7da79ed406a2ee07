"""A picklable recipe for the engine, built inside each actor on its own device.

The driver never loads model weights: it ships an :class:`EngineSpec` to the actors, the
first actor computes the vocabulary's text embeddings once, and the others adopt them through
the Ray object store (``set_vocabulary(text_embeddings=...)``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from schemas.uris import public_uri

from .stub import StubOptions, StubSegmenter

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "cass-labeler")


@dataclass(frozen=True)
class EngineSpec:
    """How to build the engine.

    Attributes:
        config: the engine's ``CassConfig`` (preset values, vocabulary file).
        clip_weights, dino_weights: weight paths or URLs (staged once per node); None uses
            the engine's default (official weights through the hubs).
        random_weights: seed for random weights (smoke runs; recorded in the output).
        device: ``auto`` (the actor's GPU if it has one, else CPU), ``cpu`` or ``cuda``.
        dtype: engine dtype name (``float16``, ``bfloat16``, ``float32``, ``auto``) or None
            for the engine's default (float32 on CPU, float16 on GPUs).
        storage_options: fsspec options for weight URLs (never recorded).
        stub: build the fast stub engine instead (tests, benchmarks).
        cache_dir: node-local directory for staged weights.
    """

    config: Any
    clip_weights: str | None = None
    dino_weights: str | None = None
    random_weights: int | None = None
    device: str = "auto"
    dtype: str | None = None
    storage_options: Mapping = field(default_factory=dict)
    stub: StubOptions | None = None
    cache_dir: str = DEFAULT_CACHE_DIR

    def __post_init__(self) -> None:
        if self.random_weights is not None and (self.clip_weights or self.dino_weights):
            raise ValueError("--random-weights cannot be combined with --clip/--dino-weights")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError("device must be auto, cpu or cuda")
        if self.dtype not in (None, "float32", "float16", "bfloat16", "auto"):
            raise ValueError("dtype must be float32, float16, bfloat16 or auto")

    def identity(self) -> dict:
        """What determines the labels, as JSON (for run records and the resume check)."""
        return {
            "engine": "stub" if self.stub is not None else "cass",
            "config": self.config.to_dict(),
            "clip_weights": public_uri(self.clip_weights),
            "dino_weights": public_uri(self.dino_weights),
            "random_weights": self.random_weights,
            "dtype": self.dtype,
            "stub": self.stub.to_dict() if self.stub is not None else None,
        }


def choose_device(requested: str, gpu_ids: list) -> str:
    """``cuda`` when asked or when the actor holds a GPU and CUDA works, else ``cpu``."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if gpu_ids and torch.cuda.is_available() else "cpu"


def build_engine(spec: EngineSpec, device: str) -> Any:
    """Build the segmenter described by ``spec`` on ``device`` (inside an actor)."""
    if spec.stub is not None:
        return StubSegmenter(spec.config, spec.stub)

    from cass_engine import build_segmenter
    from cass_engine.weights import WeightsError

    try:
        with _quiet_hub_logs():
            return build_segmenter(
                spec.config,
                clip_weights=stage_weights(spec.clip_weights, spec.cache_dir,
                                           spec.storage_options),
                dino_weights=stage_weights(spec.dino_weights, spec.cache_dir,
                                           spec.storage_options),
                random_weights=spec.random_weights, device=device, dtype=spec.dtype,
                storage_options=dict(spec.storage_options) or None,
            )
    except WeightsError as exc:  # its message says it all: no chained library tracebacks
        raise WeightsError(str(exc)) from None  # in the worker's log


@contextlib.contextmanager
def _quiet_hub_logs() -> Iterator[None]:
    """The hubs' per-retry warnings stay out of the job's log while the engine is built: a
    failed download ends in one WeightsError that says what to pass instead."""
    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    hub.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.setLevel(level)


def stage_weights(uri: str | None, cache_dir: str, storage_options: Mapping) -> str | None:
    """Copy a remote weight file to the node-local cache once; local paths pass through.

    Concurrent actors on one node serialise on a lock file, so the first downloads and the
    others reuse the file.
    """
    if uri is None or "://" not in uri or uri.startswith("file://"):
        return uri
    directory = Path(cache_dir) / "weights"
    directory.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(uri.encode()).hexdigest()[:16] + "-" + Path(urlsplit(uri).path).name
    target = directory / name
    with open(str(target) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            _download(uri, target, storage_options)
    return str(target)


def _download(uri: str, target: Path, storage_options: Mapping) -> None:
    from schemas.io import open_output

    from .storage import retry

    fs, path = open_output(uri, storage_options)
    partial = target.with_suffix(target.suffix + ".partial")
    retry(lambda: fs.get_file(path, str(partial)), f"download weights {public_uri(uri)}")
    partial.replace(target)

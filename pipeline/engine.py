"""A picklable recipe for the engine, built inside each actor on its own device.

The driver never loads model weights: it ships an :class:`EngineSpec` to the actors, the
first actor computes the vocabulary's text embeddings once, and the others adopt them through
the Ray object store (``set_vocabulary(text_embeddings=...)``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from cass_engine.staging import check_weight_choice
from schemas.uris import public_uri

from .stub import StubOptions, StubSegmenter


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
        cache_dir: the engine's cache root on each node (staged weights in ``weights/``,
            text embeddings in ``text/``); None: ``$CASS_CACHE_DIR`` or
            ``~/.cache/cass_engine`` of the worker.
    """

    config: Any
    clip_weights: str | None = None
    dino_weights: str | None = None
    random_weights: int | None = None
    device: str = "auto"
    dtype: str | None = None
    storage_options: Mapping = field(default_factory=dict)
    stub: StubOptions | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        check_weight_choice(self.clip_weights, self.dino_weights, self.random_weights)
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
        stage_engine_weights(spec)
        with _quiet_hub_logs():
            return build_segmenter(
                spec.config, clip_weights=spec.clip_weights, dino_weights=spec.dino_weights,
                random_weights=spec.random_weights, device=device, dtype=spec.dtype,
                storage_options=dict(spec.storage_options) or None, cache_dir=spec.cache_dir,
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


def stage_engine_weights(spec: EngineSpec) -> None:
    """Stage the spec's weight URLs into the node's cache (the engine's one stager, under its
    per-node lock), retrying transient storage errors; the engine then finds them staged and
    records the URL (without credentials) and the file's sha256, never the cache path."""
    from cass_engine.staging import stage_weights, weights_dir

    from .storage import retry

    for uri in (spec.clip_weights, spec.dino_weights):
        if uri is not None:
            stage_weights(uri, weights_dir(spec.cache_dir), dict(spec.storage_options),
                          retry=retry)

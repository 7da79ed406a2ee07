"""The engine, built inside each actor on its own device from a picklable recipe.

The driver never loads model weights: it ships a :class:`pipeline.config.EngineSpec` (with
the vocabulary it parsed, and its hash) to the actors, the first actor computes the
vocabulary's text embeddings once, and the others adopt them through the Ray object store.
:func:`set_engine_vocabulary` checks on every worker that what it uses has the driver's hash.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from .config import EngineSpec
from .stub import StubSegmenter


def choose_device(requested: str, gpu_ids: list) -> str:
    """``cuda`` when asked or when the actor holds a GPU and CUDA works, else ``cpu``."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if gpu_ids and torch.cuda.is_available() else "cpu"


def build_engine(spec: EngineSpec, device: str) -> Any:
    """Build the segmenter described by ``spec`` on ``device`` (inside an actor)."""
    if spec.stub is not None:
        return StubSegmenter(spec.config, spec.stub, spec.vocabulary)

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


def set_engine_vocabulary(engine: Any, spec: EngineSpec, text_embeddings: Any = None) -> Any:
    """Give ``engine`` the vocabulary the driver parsed: embed ``spec.vocabulary``, or adopt
    ``text_embeddings`` computed by another worker. Never reads the vocabulary file.

    Returns:
        The text embeddings in use (picklable, to share with other workers).

    Raises:
        RuntimeError: the vocabulary received, the embeddings adopted or the engine's
            vocabulary afterwards does not have the driver's ``spec.vocabulary_hash``.
    """
    if text_embeddings is None:
        _check_vocabulary_hash(spec.vocabulary, spec, "the vocabulary this worker received")
        text_embeddings = engine.set_vocabulary(spec.vocabulary)
    else:
        _check_vocabulary_hash(text_embeddings.vocabulary, spec, "the shared text embeddings")
        engine.set_vocabulary(text_embeddings=text_embeddings)
    _check_vocabulary_hash(engine.vocabulary, spec, "the engine's vocabulary")
    return text_embeddings


def _check_vocabulary_hash(vocabulary: Any, spec: EngineSpec, what: str) -> None:
    got = vocabulary.content_hash()
    if got != spec.vocabulary_hash:
        raise RuntimeError(f"{what} has vocabulary hash {got[:12]}..., not the run's "
                           f"{spec.vocabulary_hash[:12]}... (parsed by the driver)")


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

"""A fast stand-in for the CASS engine with the same interface (tests and benchmarks).

Labels are a deterministic function of the pixels: ``class = (mean RGB * C) // 256``, so tests
can recompute the expected label map of any image. Options simulate slow engines, engine
errors and dying workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class StubOptions:
    """Behaviour of the stub engine.

    Attributes:
        seconds_per_image: simulated compute time per image.
        fail_on_height: raise (an engine error) for images of this height.
        die_on_height: kill the worker process for images of this height (every time).
        die_after_images: kill the worker process after this many images, once per run
            (a marker file in ``marker_dir`` records that it happened).
        hang_on_height: block forever (a hung accelerator call) on images of this height.
        oom_after_images: raise ``MemoryError`` (a transient engine fault, not about any image)
            after this many images, once per run (marker ``stub-oom`` in ``marker_dir``).
        startup_seconds: time the engine takes to build (slow weight staging).
        marker_dir: directory for the ``die_after_images`` marker.
    """

    seconds_per_image: float = 0.0
    fail_on_height: int | None = None
    die_on_height: int | None = None
    die_after_images: int | None = None
    hang_on_height: int | None = None
    oom_after_images: int | None = None
    startup_seconds: float = 0.0
    marker_dir: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def stub_labels(image: np.ndarray, num_classes: int) -> np.ndarray:
    """The stub's label map of an ``[H, W, 3]`` uint8 image: ``[H, W]`` int64 in 0..C-1."""
    gray = image.astype(np.uint16).sum(axis=2) // 3
    return (gray.astype(np.int64) * num_classes) // 256


def stub_confidence(image: np.ndarray, num_classes: int) -> np.ndarray:
    """``[H, W]`` float32 stub confidence: 0.5 at the low edge of a pixel's class bin of mean
    RGB, rising to 1 at its high edge (a deterministic function of the pixels, for tests)."""
    gray = image.astype(np.int64).sum(-1) // 3
    within = (gray * num_classes) % 256
    return (0.5 + 0.5 * within / 255.0).astype(np.float32)


@dataclass
class StubTextEmbeddings:
    """Picklable stand-in for the engine's TextEmbeddings."""

    vocabulary: Any
    digest: str


@dataclass
class StubResult:
    """Same fields as the engine's SegmentationResult (torch tensors)."""

    labels: Any
    mask_scores: Any
    presence: Any
    pixel_fraction: Any
    prior: Any = None
    logits: Any = None
    probs: Any = None
    confidence: Any = None


class StubSegmenter:
    """Engine-compatible segmenter: ``set_vocabulary`` once, ``segment`` per batch."""

    def __init__(self, config: Any, options: StubOptions, vocabulary: Any = None) -> None:
        """Build the stub (after ``options.startup_seconds``).

        Args:
            config: the engine's ``CassConfig``.
            options: the stub's behaviour.
            vocabulary: what ``set_vocabulary()`` without arguments uses (a worker's: the one
                the driver parsed); None reads the config's file, as the engine does.
        """
        time.sleep(options.startup_seconds)
        self.config = config
        self.options = options
        self._default_vocabulary = vocabulary
        self._text: StubTextEmbeddings | None = None
        self._images_seen = 0
        # like the real engine's, a content hash the resume checks compare
        digest = hashlib.sha256(repr(sorted(options.to_dict().items())).encode()).hexdigest()
        self.weights_info = {"engine": "stub", "stub": options.to_dict(), "sha256": digest}

    @property
    def vocabulary(self) -> Any:
        if self._text is None:
            self.set_vocabulary()
        return self._text.vocabulary

    def set_vocabulary(self, vocabulary: Any = None, *,
                       text_embeddings: StubTextEmbeddings | None = None) -> StubTextEmbeddings:
        if text_embeddings is None:
            vocabulary = (vocabulary or self._default_vocabulary
                          or self.config.load_vocabulary())
            text_embeddings = StubTextEmbeddings(vocabulary, vocabulary.content_hash())
        self._text = text_embeddings
        return text_embeddings

    def segment(self, images: Sequence[np.ndarray], return_logits: bool = False,
                return_probs: bool = False) -> list[StubResult]:
        num_classes = self.vocabulary.num_classes
        results = []
        for image in images:
            self._before_image(image)
            results.append(_stub_result(np.asarray(image), num_classes))
        return results

    def _before_image(self, image: np.ndarray) -> None:
        opts = self.options
        self._images_seen += 1
        if opts.seconds_per_image:
            time.sleep(opts.seconds_per_image)
        if opts.die_on_height is not None and image.shape[0] == opts.die_on_height:
            _die()
        if opts.hang_on_height is not None and image.shape[0] == opts.hang_on_height:
            threading.Event().wait()
        if opts.fail_on_height is not None and image.shape[0] == opts.fail_on_height:
            raise RuntimeError(f"stub engine failure on an image of height {image.shape[0]}")
        if opts.die_after_images is not None and self._images_seen > opts.die_after_images:
            if _claim_marker(opts.marker_dir):
                _die()
        if opts.oom_after_images is not None and self._images_seen > opts.oom_after_images:
            if _claim_marker(opts.marker_dir, "stub-oom"):
                raise MemoryError("stub engine: out of memory (simulated)")


def _stub_result(image: np.ndarray, num_classes: int) -> StubResult:
    import torch

    labels = stub_labels(image, num_classes)
    counts = np.bincount(labels.ravel(), minlength=num_classes)[:num_classes]
    fraction = (counts / labels.size).astype(np.float32)
    scores = np.where(counts > 0, 0.5 + 0.5 * np.arange(num_classes) / num_classes, 0.0)
    presence = 0.05 + 0.9 * fraction
    return StubResult(
        labels=torch.from_numpy(labels),
        mask_scores=torch.from_numpy(scores.astype(np.float32)),
        presence=torch.from_numpy(presence.astype(np.float32)),
        pixel_fraction=torch.from_numpy(fraction),
        confidence=torch.from_numpy(stub_confidence(image, num_classes)),
    )


def _claim_marker(marker_dir: str | None, name: str = "stub-died") -> bool:
    """True for the first caller across processes (creates the marker file)."""
    if marker_dir is None:
        return True
    path = Path(marker_dir) / name
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)

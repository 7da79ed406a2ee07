"""The k images with the lowest per-image mIoU, kept with small copies of their masks.

Only ``k`` entries are held at any time, each with ground truth and prediction subsampled
(nearest) to at most ``max_side`` pixels per side, so memory stays bounded on any dataset.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ImageRef:
    """Where an evaluated image came from (for reports and overlays).

    Attributes:
        image_id: the labels' image id (or the benchmark sample id).
        source_uri: URI of the image file or of the shard holding it, if known.
        key: member name within the shard, if any.
    """

    image_id: str
    source_uri: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class WorstEntry:
    """One kept image: its score, reference, original size and subsampled masks."""

    miou: float
    ref: ImageRef
    hw: tuple[int, int]
    gt_eval: np.ndarray = field(repr=False)
    pred_eval: np.ndarray = field(repr=False)


def subsample(array: np.ndarray, max_side: int) -> np.ndarray:
    """Nearest-neighbour subsampling by an integer step so that both sides are <= max_side."""
    step = max(1, math.ceil(max(array.shape[:2]) / max_side))
    return np.ascontiguousarray(array[::step, ::step])


class WorstImages:
    """Keeps the ``k`` lowest-mIoU images (ties: the earlier image is kept).

    Args:
        k: number of images to keep (0 disables).
        max_side: side cap of the kept masks.
    """

    def __init__(self, k: int, max_side: int = 320) -> None:
        self.k = k
        self.max_side = max_side
        self._heap: list[tuple[float, int, WorstEntry]] = []
        self._counter = itertools.count()

    def offer(self, miou: float, ref: ImageRef, gt_eval: np.ndarray, pred_eval: np.ndarray) -> None:
        """Consider one image; images with an undefined mIoU (NaN) are never ranked."""
        if self.k <= 0 or math.isnan(miou):
            return
        order = -next(self._counter)
        if len(self._heap) == self.k and -self._heap[0][0] <= miou:
            return
        entry = WorstEntry(miou, ref, tuple(gt_eval.shape), subsample(gt_eval, self.max_side),
                           subsample(pred_eval, self.max_side))
        heapq.heappush(self._heap, (-miou, order, entry))
        if len(self._heap) > self.k:
            heapq.heappop(self._heap)

    def entries(self) -> list[WorstEntry]:
        """Kept images, worst first."""
        items = sorted(self._heap, key=lambda item: (-item[0], -item[1]))
        return [entry for _, _, entry in items]

"""Average precision of image-level presence scores, accumulated with bounded memory.

For every evaluated ground-truth category and every matched image we get a score in [0, 1]
(the labels' ``presence`` value; with several classes mapped to one category, their maximum)
and a binary truth (the category has at least one non-ignored ground-truth pixel in the image).

AP is the step-wise area under the precision-recall curve, as scikit-learn's
``average_precision_score``: ``AP = sum_k (R_k - R_{k-1}) P_k`` over decreasing score
thresholds, tied scores forming one threshold, no interpolation. A category without any
positive image has no AP (NaN) and is left out of the macro mean ``presence_mAP``.

Memory: scores are not stored; each is rounded to float16 (relative precision 2^-11, about
0.05 %) and counted in a per-category histogram over the 15361 float16 values of [0, 1]
(positives and negatives apart, uint32). Scores closer than that rounding become ties; AP is
otherwise exact. The histogram costs 123 KB per category whatever the number of images.
"""

from __future__ import annotations

import numpy as np

NUM_BINS = int(np.float16(1.0).view(np.uint16)) + 1  # float16 bit patterns of 0.0 .. 1.0


def score_bins(scores: np.ndarray) -> np.ndarray:
    """Monotone bin index of each score (float16 bit pattern of the clipped score)."""
    clipped = np.clip(np.nan_to_num(np.asarray(scores, dtype=np.float32), nan=0.0), 0.0, 1.0)
    return clipped.astype(np.float16).view(np.uint16).astype(np.int64)


def bin_scores() -> np.ndarray:
    """``[NUM_BINS]`` float: the score each bin stands for."""
    return np.arange(NUM_BINS, dtype=np.uint16).view(np.float16).astype(np.float64)


class PresenceAccumulator:
    """Per-category histograms of presence scores for positive and negative images.

    Args:
        num_categories: number of ground-truth categories ``G``.
    """

    def __init__(self, num_categories: int) -> None:
        self.hist = np.zeros((num_categories, NUM_BINS, 2), dtype=np.uint32)
        self.num_images = 0

    def add(self, scores: np.ndarray, present: np.ndarray, mask: np.ndarray) -> None:
        """Count one image.

        Args:
            scores: ``[G]`` presence scores.
            present: ``[G]`` bool ground-truth presence.
            mask: ``[G]`` bool, categories to count (evaluated and scored).
        """
        cats = np.flatnonzero(mask)
        bins = score_bins(scores[cats])
        np.add.at(self.hist, (cats, bins, present[cats].astype(np.int64)), 1)
        self.num_images += 1

    def num_positives(self) -> np.ndarray:
        """``[G]`` int64: images where each category is present."""
        return self.hist[:, :, 1].sum(axis=1, dtype=np.int64)

    def average_precision(self) -> np.ndarray:
        """``[G]`` AP in [0, 1]; NaN for categories without positive images."""
        return np.array([_ap(self.hist[g]) for g in range(self.hist.shape[0])])

    def pr_curve(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Precision and recall at each distinct threshold of category ``g``, high to low."""
        tp, fp = _cumulative(self.hist[g])
        positives = tp[-1] if tp.size else 0
        if positives == 0:
            return np.zeros(0), np.zeros(0)
        return tp / (tp + fp), tp / positives


def _cumulative(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative true and false positives at the occupied thresholds, high to low."""
    descending = hist[::-1].astype(np.int64)
    occupied = descending.sum(axis=1) > 0
    tp = np.cumsum(descending[:, 1])[occupied]
    fp = np.cumsum(descending[:, 0])[occupied]
    return tp, fp


def _ap(hist: np.ndarray) -> float:
    tp, fp = _cumulative(hist)
    if tp.size == 0 or tp[-1] == 0:
        return float("nan")
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    gains = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(gains * precision))

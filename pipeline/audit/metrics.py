"""Semantic-segmentation metrics with the mmsegmentation conventions, accumulated in a stream.

Conventions (those of mmseg's ``IoUMetric`` / ``intersect_and_union``):

- Pixels whose ground truth is the ignore index (255) are dropped before counting, whatever
  is predicted there.
- Per class, intersection, prediction area and ground-truth area are summed over the *whole
  dataset* (int64) before any division; union = pred + gt - intersection.
- IoU_c = intersection_c / union_c and Acc_c = intersection_c / gt_c. A ratio with a zero
  denominator is NaN: IoU is NaN only for a class that neither occurs in the ground truth nor
  is predicted anywhere (a class predicted but absent from the ground truth has IoU 0 and
  *counts*); Acc is NaN for a class without ground-truth pixels.
- mIoU and mAcc are ``nanmean`` over the evaluated classes (mmseg rounds to 2 decimals of
  percent; we keep full precision and round only in reports). aAcc = sum of intersections /
  sum of ground-truth pixels.

With a category mapping (see :mod:`pipeline.audit.categories`) the evaluated classes are the
mapped ground-truth categories; the extra OTHER index takes part in unions (false positives on
unmapped ground truth, misses by unmapped predictions) but is neither averaged nor part of aAcc.
For a benchmark (identity mapping, every class mapped, no OTHER pixels) the numbers equal
mmseg's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import AuditError

#: Ignore value of ground-truth label files (mask PNGs).
IGNORE_INDEX = 255
#: Ignore value inside the audit: readers turn :data:`IGNORE_INDEX` (and COCO's ignored pixels)
#: into -1, so that category 255 of a large vocabulary stays a category.
IGNORED = -1


def confusion_for_image(gt_eval: np.ndarray, pred_eval: np.ndarray, num_eval: int) -> np.ndarray:
    """Confusion counts of one image in the evaluation space.

    Args:
        gt_eval: ``[H, W]`` int ground truth in ``0..num_eval-1``, or :data:`IGNORED`.
        pred_eval: ``[H, W]`` int predictions in ``0..num_eval-1``.
        num_eval: size of the evaluation space ``E``.

    Returns:
        ``[E, E]`` int64, rows ground truth, columns prediction.
    """
    valid = gt_eval != IGNORED
    flat = gt_eval[valid].astype(np.int64) * num_eval + pred_eval[valid].astype(np.int64)
    counts = np.bincount(flat, minlength=num_eval * num_eval)
    return counts.reshape(num_eval, num_eval)


def check_gt_values(gt: np.ndarray, num_gt: int, where: str) -> None:
    """Raise if a ground-truth label is outside ``0..num_gt-1`` and not :data:`IGNORED`."""
    bad = (gt != IGNORED) & ((gt < 0) | (gt >= num_gt))
    if bad.any():
        value = int(gt[bad][0])
        raise AuditError(
            f"{where}: label value {value} is outside the {num_gt} ground-truth classes "
            f"(0..{num_gt - 1}, {IGNORE_INDEX} = ignore); check the class list and label format"
        )


@dataclass(frozen=True)
class ClassScores:
    """Per-class totals and ratios over the evaluated classes.

    Attributes:
        intersect, union, gt_pixels, pred_pixels: ``[G]`` int64 totals.
        iou, acc: ``[G]`` float64 fractions, NaN where undefined or the class is not evaluated.
    """

    intersect: np.ndarray
    union: np.ndarray
    gt_pixels: np.ndarray
    pred_pixels: np.ndarray
    iou: np.ndarray
    acc: np.ndarray


def class_scores(confusion: np.ndarray, evaluated: list[int]) -> ClassScores:
    """Per-class IoU and accuracy from an ``[E, E]`` confusion matrix (mmseg rule above)."""
    intersect = np.diag(confusion)[:-1].astype(np.int64)
    gt_pixels = confusion.sum(axis=1)[:-1].astype(np.int64)
    pred_pixels = confusion.sum(axis=0)[:-1].astype(np.int64)
    union = gt_pixels + pred_pixels - intersect
    keep = np.zeros(len(intersect), dtype=bool)
    keep[evaluated] = True
    iou = _ratio(intersect, union, keep)
    acc = _ratio(intersect, gt_pixels, keep)
    return ClassScores(intersect, union, gt_pixels, pred_pixels, iou, acc)


def _ratio(num: np.ndarray, den: np.ndarray, keep: np.ndarray) -> np.ndarray:
    out = np.full(len(num), np.nan)
    ok = keep & (den > 0)
    out[ok] = num[ok] / den[ok]
    return out


def nanmean_or_nan(values: np.ndarray) -> float:
    """``np.nanmean`` without the warning; NaN when every value is NaN."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def summary(confusion: np.ndarray, evaluated: list[int]) -> dict[str, float]:
    """mIoU, mAcc, aAcc as fractions in [0, 1] (NaN when undefined)."""
    scores = class_scores(confusion, evaluated)
    gt_total = int(scores.gt_pixels[evaluated].sum()) if evaluated else 0
    hit_total = int(scores.intersect[evaluated].sum()) if evaluated else 0
    return {
        "mIoU": nanmean_or_nan(scores.iou),
        "mAcc": nanmean_or_nan(scores.acc),
        "aAcc": hit_total / gt_total if gt_total else float("nan"),
    }


def image_miou(confusion: np.ndarray, evaluated: list[int]) -> float:
    """Mean IoU of one image over the evaluated classes present in its ground truth or
    prediction (NaN when none is)."""
    return nanmean_or_nan(class_scores(confusion, evaluated).iou)


class ConfusionAccumulator:
    """Sums per-image confusion matrices over a dataset (int64, bounded memory ``E x E``).

    Args:
        num_eval: size of the evaluation space ``E`` (ground-truth categories + OTHER).
        evaluated: ground-truth indices that enter the means.
    """

    def __init__(self, num_eval: int, evaluated: list[int]) -> None:
        self.num_eval = num_eval
        self.evaluated = list(evaluated)
        self.confusion = np.zeros((num_eval, num_eval), dtype=np.int64)
        self.num_images = 0

    def add(self, gt_eval: np.ndarray, pred_eval: np.ndarray) -> np.ndarray:
        """Count one image; returns its own ``[E, E]`` confusion matrix."""
        if gt_eval.shape != pred_eval.shape:
            raise ValueError(f"shapes differ: gt {gt_eval.shape} vs prediction {pred_eval.shape}")
        image = confusion_for_image(gt_eval, pred_eval, self.num_eval)
        self.confusion += image
        self.num_images += 1
        return image

    def scores(self) -> ClassScores:
        return class_scores(self.confusion, self.evaluated)

    def summary(self) -> dict[str, float]:
        return summary(self.confusion, self.evaluated)

"""Streaming evaluation of (ground truth, prediction) pairs: the audit's and benchmarks' core.

One :class:`Evaluator` holds only fixed-size state (an ``E x E`` confusion matrix, presence
histograms, the k worst images), so any number of images can pass through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .categories import CategoryMapping
from .coco_segm import CocoSegmAccumulator
from .errors import AuditError
from .metrics import IGNORED, ClassScores, ConfusionAccumulator, check_gt_values, image_miou
from .presence import PresenceAccumulator
from .worst import ImageRef, WorstEntry, WorstImages

#: Prediction value for a pixel no annotation covers.
UNCOVERED = -1


@dataclass(frozen=True)
class EvaluationResult:
    """Everything a report needs, as plain arrays and numbers (fractions, not percent).

    Attributes:
        mapping: the category mapping used.
        num_images: images evaluated.
        summary: ``{"mIoU", "mAcc", "aAcc"}``.
        scores: per-category totals and ratios.
        confusion: ``[E, E]`` int64, rows ground truth, columns prediction; last = OTHER.
        presence_ap: ``[G]`` AP per category (NaN: no positives or no scores), or ``None``
            when no image had presence scores.
        presence_positives: ``[G]`` images where each category is present.
        presence: the accumulator (for PR curves), or ``None``.
        worst: worst images, worst first.
        coco: COCOeval AP numbers in percent, or ``None`` when not requested.
        ignored_pixels: ground-truth pixels with the ignore label.
    """

    mapping: CategoryMapping
    num_images: int
    summary: dict[str, float]
    scores: ClassScores
    confusion: np.ndarray
    presence_ap: np.ndarray | None
    presence_positives: np.ndarray
    presence: PresenceAccumulator | None
    worst: list[WorstEntry]
    coco: dict[str, float] | None
    ignored_pixels: int


class Evaluator:
    """Accumulates metrics over images in the ground-truth category space.

    Args:
        mapping: vocabulary classes -> ground-truth categories.
        worst_k: number of worst images to keep for the report.
        coco_ap: also collect regions for COCOeval segm AP (memory grows with the dataset).
    """

    def __init__(self, mapping: CategoryMapping, worst_k: int = 8, coco_ap: bool = False) -> None:
        self.mapping = mapping
        self.evaluated = mapping.mapped_gt
        self._pred_lut = mapping.pred_lookup()
        self._gt_lut = mapping.gt_lookup()
        self._class_to_gt = np.asarray([-1 if g is None else g for g in mapping.class_to_gt])
        self.confusion = ConfusionAccumulator(mapping.num_eval, self.evaluated)
        self.presence = PresenceAccumulator(mapping.num_gt)
        self.worst = WorstImages(worst_k)
        self.coco = CocoSegmAccumulator() if coco_ap else None
        self._eval_mask = np.zeros(mapping.num_gt, dtype=bool)
        self._eval_mask[self.evaluated] = True
        self.ignored_pixels = 0

    def add(
        self,
        ref: ImageRef,
        gt: np.ndarray,
        pred: np.ndarray,
        presence: np.ndarray | None = None,
        class_scores: np.ndarray | None = None,
    ) -> float:
        """Evaluate one image.

        Args:
            ref: image reference (id and source) for reports.
            gt: ``[H, W]`` int ground-truth category indices, :data:`IGNORED` = ignore.
            pred: ``[H, W]`` int vocabulary class indices, :data:`UNCOVERED` = no prediction.
            presence: ``[K]`` presence scores of the classes, if the labels have them.
            class_scores: ``[K]`` region scores of the classes (COCO AP), NaN when absent.

        Returns:
            The image's own mIoU (fraction; NaN if no evaluated category is involved).

        Raises:
            AuditError: sizes differ or labels are out of range.
        """
        gt_eval, pred_eval = self._to_eval(ref, gt, pred)
        confusion = self.confusion.add(gt_eval, pred_eval)
        self.ignored_pixels += int(gt_eval.size - confusion.sum())
        miou = image_miou(confusion, self.evaluated)
        self.worst.offer(miou, ref, gt_eval, pred_eval)
        present = confusion.sum(axis=1)[:-1] > 0
        if presence is not None:
            self._add_presence(ref, np.asarray(presence, dtype=np.float64), present)
        if self.coco is not None:
            self.coco.add(gt_eval, pred_eval, self._region_scores(class_scores), self.evaluated)
        return miou

    def _to_eval(self, ref: ImageRef, gt: np.ndarray, pred: np.ndarray):
        if gt.shape != pred.shape:
            raise AuditError(f"image {ref.image_id}: ground truth is {gt.shape[0]}x{gt.shape[1]} "
                             f"but the prediction is {pred.shape[0]}x{pred.shape[1]} (HxW)")
        check_gt_values(gt, self.mapping.num_gt, f"ground truth of image {ref.image_id}")
        num_classes = len(self._pred_lut) - 1
        if pred.size and (pred.min() < UNCOVERED or pred.max() >= num_classes):
            raise AuditError(f"image {ref.image_id}: predicted class outside 0..{num_classes - 1}")
        ignored = gt == IGNORED
        gt_eval = np.where(ignored, IGNORED, self._gt_lut[np.where(ignored, 0, gt)])
        pred_eval = self._pred_lut[np.where(pred == UNCOVERED, num_classes, pred)]
        return gt_eval, pred_eval

    def _add_presence(self, ref: ImageRef, presence: np.ndarray, present: np.ndarray) -> None:
        if presence.shape != self._class_to_gt.shape:
            raise AuditError(f"image {ref.image_id}: {presence.size} presence scores for "
                             f"{self._class_to_gt.size} classes")
        per_gt = self._max_per_gt(presence)
        self.presence.add(per_gt, present, self._eval_mask & ~np.isnan(per_gt))

    def _max_per_gt(self, values: np.ndarray) -> np.ndarray:
        """``[G]``: max of ``values`` over the classes mapped to each category (NaN: none)."""
        out = np.full(self.mapping.num_gt, -np.inf)
        mapped = self._class_to_gt >= 0
        finite = mapped & ~np.isnan(values)
        np.maximum.at(out, self._class_to_gt[finite], values[finite])
        out[np.isinf(out)] = np.nan
        return out

    def _region_scores(self, class_scores: np.ndarray | None) -> dict[int, float]:
        if class_scores is None:
            return {}
        per_gt = self._max_per_gt(np.asarray(class_scores, dtype=np.float64))
        return {g: float(s) for g, s in enumerate(per_gt) if not np.isnan(s)}

    def result(self) -> EvaluationResult:
        """The metrics so far."""
        have_presence = self.presence.num_images > 0
        return EvaluationResult(
            mapping=self.mapping,
            num_images=self.confusion.num_images,
            summary=self.confusion.summary(),
            scores=self.confusion.scores(),
            confusion=self.confusion.confusion.copy(),
            presence_ap=self._presence_ap() if have_presence else None,
            presence_positives=self.presence.num_positives(),
            presence=self.presence if have_presence else None,
            worst=self.worst.entries(),
            coco=self.coco.evaluate(self.evaluated) if self.coco is not None else None,
            ignored_pixels=self.ignored_pixels,
        )

    def _presence_ap(self) -> np.ndarray:
        ap = self.presence.average_precision()
        ap[~self._eval_mask] = np.nan
        return ap

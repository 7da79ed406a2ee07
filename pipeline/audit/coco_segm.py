"""Optional COCO-style segmentation AP (pycocotools ``COCOeval``, ``iouType="segm"``).

Regions are per (image, category): the ground-truth "instance" of category ``g`` in an image
is the set of its pixels (``iscrowd`` 0, ignored pixels left out), and the predicted region is
the set of pixels predicted as ``g`` (classes mapped to one category merged), scored with the
highest annotation score among those classes (1.0 when the source has no scores). This
measures how well per-class regions are found and ranked, not instance separation.

Memory: the regions of every image are kept as compressed RLE until the end (COCOeval needs
them all); enable it for held-out sets, not for millions of images.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools import mask as coco_mask


def _rle(mask: np.ndarray) -> dict:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


class CocoSegmAccumulator:
    """Collects per-(image, category) regions and runs COCOeval at the end."""

    def __init__(self) -> None:
        self.images: list[dict] = []
        self.gt_annotations: list[dict] = []
        self.detections: list[dict] = []

    def add(self, gt_eval: np.ndarray, pred_eval: np.ndarray, scores: dict[int, float],
            evaluated: list[int]) -> None:
        """One image in the evaluation space.

        Args:
            gt_eval: ``[H, W]`` ground truth (-1 ignored).
            pred_eval: ``[H, W]`` predictions.
            scores: evaluation index -> score of the predicted region.
            evaluated: categories taking part.
        """
        image_id = len(self.images) + 1
        height, width = gt_eval.shape
        self.images.append({"id": image_id, "height": height, "width": width})
        for g in evaluated:
            self._add_gt(image_id, gt_eval == g, g)
            predicted = (pred_eval == g) & (gt_eval >= 0)
            if predicted.any():
                self.detections.append({"image_id": image_id, "category_id": g + 1,
                                        "segmentation": _rle(predicted),
                                        "score": float(scores.get(g, 1.0))})

    def _add_gt(self, image_id: int, mask: np.ndarray, g: int) -> None:
        if not mask.any():
            return
        rle = _rle(mask)
        self.gt_annotations.append({
            "id": len(self.gt_annotations) + 1, "image_id": image_id, "category_id": g + 1,
            "segmentation": rle, "area": float(mask.sum()), "iscrowd": 0,
            "bbox": [float(v) for v in coco_mask.toBbox(rle)],
        })

    def evaluate(self, evaluated: list[int]) -> dict[str, float]:
        """AP, AP50 and AP75 in percent (NaN when there is no ground-truth region)."""
        if not self.gt_annotations:
            return {"AP": float("nan"), "AP50": float("nan"), "AP75": float("nan")}
        if not self.detections:
            return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = {"images": self.images, "annotations": self.gt_annotations,
                          "categories": [{"id": g + 1, "name": str(g)} for g in evaluated]}
            gt.createIndex()
            dt = gt.loadRes(self.detections)
            run = COCOeval(gt, dt, iouType="segm")
            run.evaluate()
            run.accumulate()
            run.summarize()
        stats = [float("nan") if v < 0 else 100.0 * float(v) for v in run.stats[:3]]
        return {"AP": stats[0], "AP50": stats[1], "AP75": stats[2]}

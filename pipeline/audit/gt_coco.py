"""COCO JSON ground truth (instances or stuff), painted into semantic label maps.

Segmentations may be polygons, uncompressed RLE (``counts`` a list) or compressed RLE
(``counts`` a string). Rules, all deterministic:

- Categories are ordered by COCO id; label value ``g`` is the ``g``-th category.
- Overlaps: an image's annotations are painted largest first (pixel area of the decoded
  mask; equal areas in increasing annotation id), so where masks overlap the *smaller*
  annotation wins (small objects stay visible) and between equal areas the higher id wins.
  The order in the file plays no part. Crowd annotations (``iscrowd: 1``) are painted like
  the others.
- Pixels that no annotation covers: with ``unlabeled="background"`` (default) they belong to a
  category named ``background`` (the JSON's own if it has one, else one appended after the
  others), so predictions there count as false positives; with ``unlabeled="ignore"`` they
  are ignored (use this for stuff-only files whose unlabeled pixels carry no meaning).

The JSON is loaded whole (as pycocotools does); label maps are decoded one image at a time.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from pycocotools import mask as coco_mask

from .categories import GtCategory, normalize_name
from .errors import AuditError
from .gt_base import GroundTruth, GtImage
from .metrics import IGNORED
from .sources import name_aliases, read_json

UNLABELED_CHOICES = ("background", "ignore")


class CocoGroundTruth(GroundTruth):
    """Ground truth from a COCO JSON file.

    Args:
        uri: path or fsspec URI of the JSON.
        storage_options: fsspec options.
        unlabeled: ``"background"`` or ``"ignore"`` (see module docstring).
    """

    def __init__(self, uri: str, storage_options: Mapping | None = None,
                 unlabeled: str = "background") -> None:
        super().__init__()
        if unlabeled not in UNLABELED_CHOICES:
            raise AuditError(f"unlabeled must be one of {UNLABELED_CHOICES}, got {unlabeled!r}")
        self.uri = uri
        data = read_json(uri, storage_options, "COCO ground truth")
        _check_layout(data, uri)
        self.categories, self._index_of_id = _categories(data["categories"], uri)
        self._fill = self._unlabeled_index(unlabeled)
        self._images = _images(data["images"], uri)
        self._annotations = _group_annotations(data["annotations"], self._images, uri)
        for image_id, image in self._images.items():
            aliases = [str(image_id), *name_aliases(str(image.get("file_name", "")))]
            self.index.add(str(image_id), aliases)
        self.description = f"COCO JSON {uri} ({len(self._images)} images)"

    def _unlabeled_index(self, unlabeled: str) -> int:
        if unlabeled == "ignore":
            return IGNORED
        for g, cat in enumerate(self.categories):
            if normalize_name(cat.name) == "background":
                return g
        self.categories.append(GtCategory("background", (), None))
        return len(self.categories) - 1

    def load(self, key: str) -> GtImage:
        image = self._images[int(key)]
        height, width = int(image["height"]), int(image["width"])
        label = np.full((height, width), self._fill, dtype=np.int64)
        painted = []
        for ann in self._annotations.get(int(key), []):
            mask = decode_segmentation(ann.get("segmentation"), height, width,
                                       f"{self.uri}: annotation {ann.get('id')}")
            painted.append((-int(mask.sum()), int(ann.get("id", 0)), ann, mask))
        for _, _, ann, mask in sorted(painted, key=lambda item: (item[0], item[1])):
            label[mask] = self._category_index(ann)
        return GtImage(key, label, None)


    def _category_index(self, ann: dict) -> int:
        try:
            return self._index_of_id[int(ann["category_id"])]
        except (KeyError, TypeError, ValueError):
            raise AuditError(f"{self.uri}: annotation {ann.get('id')} has unknown category_id "
                             f"{ann.get('category_id')!r}") from None


def decode_segmentation(seg: object, height: int, width: int, where: str) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> bool ``[H, W]``.

    Raises:
        AuditError: malformed, or its size differs from the image's.
    """
    if isinstance(seg, list):
        rle = _polygons_to_rle(seg, height, width, where)
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        rle = _dict_to_rle(seg, height, width, where)
    else:
        raise AuditError(f"{where}: segmentation must be polygons or an RLE dict")
    return coco_mask.decode(rle).astype(bool)


def _polygons_to_rle(polygons: list, height: int, width: int, where: str) -> dict:
    for poly in polygons:
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
            raise AuditError(f"{where}: a polygon needs an even number (>= 6) of coordinates")
    if not polygons:
        return coco_mask.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
    return coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))


def _dict_to_rle(seg: dict, height: int, width: int, where: str) -> dict:
    size = [int(v) for v in seg["size"]]
    if size != [height, width]:
        raise AuditError(f"{where}: mask size {size[0]}x{size[1]} does not match the image "
                         f"size {height}x{width} (HxW)")
    counts = seg["counts"]
    if isinstance(counts, list):
        if sum(counts) != height * width:
            raise AuditError(f"{where}: uncompressed RLE covers {sum(counts)} pixels, "
                             f"the image has {height * width}")
        return coco_mask.frPyObjects(seg, height, width)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": size, "counts": counts}


def _check_layout(data: object, uri: str) -> None:
    if not isinstance(data, dict):
        raise AuditError(f"COCO ground truth {uri}: expected a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise AuditError(f"COCO ground truth {uri}: missing list {key!r}")


def _categories(entries: list, uri: str) -> tuple[list[GtCategory], dict[int, int]]:
    try:
        ordered = sorted(entries, key=lambda c: int(c["id"]))
        cats = [GtCategory(str(c["name"]), tuple(c.get("synonyms") or ()), int(c["id"]))
                for c in ordered]
    except (KeyError, TypeError, ValueError):
        raise AuditError(f"COCO ground truth {uri}: every category needs an id and a name") \
            from None
    return cats, {c.source_id: g for g, c in enumerate(cats)}


def _images(entries: list, uri: str) -> dict[int, dict]:
    images = {}
    for image in entries:
        try:
            image_id = int(image["id"])
            if int(image["height"]) <= 0 or int(image["width"]) <= 0:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise AuditError(f"COCO ground truth {uri}: image entry {image!r:.80} needs an id "
                             "and a positive height and width") from None
        if image_id in images:
            raise AuditError(f"COCO ground truth {uri}: duplicate image id {image_id}")
        images[image_id] = image
    return images


def _group_annotations(entries: list, images: dict, uri: str) -> dict[int, list[dict]]:
    grouped: dict[int, list[dict]] = {}
    for ann in entries:
        image_id = int(ann.get("image_id", -1)) if isinstance(ann, dict) else -1
        if image_id not in images:
            raise AuditError(f"COCO ground truth {uri}: annotation {ann.get('id')!r} refers to "
                             f"unknown image id {image_id}")
        grouped.setdefault(image_id, []).append(ann)
    return grouped

"""Mask <-> COCO RLE helpers, and label maps <-> per-class annotations.

Conventions:
    - A label map is an integer array ``[H, W]`` of class indices ``0..C-1`` (the engine's
      ``labels`` output at the input image size).
    - Category ids follow COCO, which reserves id 0: ``category_id = class_index + 1`` unless an
      explicit ``category_ids`` sequence (indexed by class) is given.
    - Masks are COCO *compressed* RLE: ``{"size": [h, w], "counts": str}`` with the counts as a
      str (pycocotools returns bytes; we decode to ASCII so the value is JSON- and Arrow-ready).
    - ``bbox`` is ``[x, y, w, h]`` in pixels (float64), ``area`` the pixel count (int).
    - The annotations of one image tile it exactly: every pixel lies in exactly one mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from pycocotools import mask as coco_mask

ScoreSource = Mapping[int, float] | Sequence[float] | np.ndarray


def default_category_ids(num_classes: int) -> list[int]:
    """COCO ids for class indices ``0..num_classes-1``: ``class_index + 1``."""
    return list(range(1, num_classes + 1))


def mask_to_rle(mask: np.ndarray) -> dict:
    """Encode one binary mask as COCO compressed RLE.

    Args:
        mask: ``[H, W]`` array of any numeric or bool type (non-zero = inside).

    Returns:
        ``{"size": [H, W], "counts": str}``.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    rle = coco_mask.encode(np.asfortranarray((mask != 0).astype(np.uint8)))
    return _clean_rle(rle)


def rle_to_mask(rle: Mapping) -> np.ndarray:
    """Decode COCO compressed RLE (counts as str or bytes) to a bool ``[H, W]`` mask."""
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    size = [int(v) for v in rle["size"]]
    return coco_mask.decode({"size": size, "counts": counts}).astype(bool)


def label_map_to_annotations(
    labels: np.ndarray,
    scores: ScoreSource,
    category_ids: Sequence[int] | None = None,
) -> list[dict]:
    """One annotation per class present in a label map.

    Args:
        labels: ``[H, W]`` integer class indices in ``0..C-1``.
        scores: per-class score (mean class probability inside the mask), either a mapping
            ``class_index -> score`` or a ``[C]`` sequence/array.
        category_ids: category id of each class index; default ``class_index + 1``.

    Returns:
        Annotations sorted by category id, each ``{"category_id", "segmentation", "area",
        "bbox", "score"}``; their masks tile the image exactly.
    """
    labels = _check_label_map(labels)
    present, rles, areas, boxes = _encode_runs(labels)
    ids = _category_ids_for(present, category_ids)
    out = []
    for i, class_index in enumerate(present.tolist()):
        out.append({
            "category_id": int(ids[i]),
            "segmentation": _clean_rle(rles[i]),
            "area": int(areas[i]),
            "bbox": [float(v) for v in boxes[i]],
            "score": _score_of(scores, class_index),
        })
    return sorted(out, key=lambda a: a["category_id"])


def annotations_to_label_map(
    annotations: Sequence[Mapping],
    height: int,
    width: int,
    category_ids: Sequence[int] | None = None,
) -> np.ndarray:
    """Rebuild the label map from annotations (exact inverse of ``label_map_to_annotations``).

    Args:
        annotations: annotations with ``category_id`` and RLE ``segmentation``.
        height, width: image size in pixels.
        category_ids: category id of each class index; default ``class_index + 1``.

    Returns:
        ``[H, W]`` int64 class indices.

    Raises:
        ValueError: a mask has the wrong size, masks overlap, leave pixels uncovered, or a
            category id is unknown.
    """
    to_class = _class_index_lookup(category_ids)
    out = np.full((height, width), -1, dtype=np.int64)
    for ann in annotations:
        cid = int(ann["category_id"])
        if cid not in to_class:
            raise ValueError(f"unknown category_id {cid}")
        mask = rle_to_mask(ann["segmentation"])
        if mask.shape != (height, width):
            raise ValueError(f"mask size {mask.shape} != image size {(height, width)}")
        if (out[mask] != -1).any():
            raise ValueError(f"mask of category {cid} overlaps another mask")
        out[mask] = to_class[cid]
    if (out == -1).any():
        raise ValueError(f"masks leave {int((out == -1).sum())} pixel(s) uncovered")
    return out


def label_map_to_rles(labels: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """COCO compressed RLE of ``labels == c`` for every class present, in one pass.

    The label map is read once in column-major order (COCO's) and cut into runs of equal
    value; each class's counts are the gaps between its runs and their lengths, and
    pycocotools turns those counts into its compressed strings. The result is bit-exact with
    ``pycocotools.mask.encode`` of each binary mask, without building one mask per class.

    Args:
        labels: ``[H, W]`` integer class indices >= 0 (any integer dtype).

    Returns:
        ``present``: ``[K]`` sorted class indices present (uint8, uint16 or the label map's
        own dtype, whichever is narrowest), and their RLEs as pycocotools returns them
        (``{"size": [H, W], "counts": bytes}``).
    """
    present, rles, _, _ = _encode_runs(labels)
    return present, rles


def _encode_runs(labels: np.ndarray) -> tuple[np.ndarray, list[dict], np.ndarray, np.ndarray]:
    """``label_map_to_rles`` plus each class's area ``[K]`` int64 and COCO bbox ``[K, 4]``
    float64 (``[x, y, w, h]``), computed from the runs as pycocotools' ``area``/``toBbox``
    compute them from the RLE (a run that crosses a column spans all rows)."""
    height, width = labels.shape
    flat = _compact(np.asarray(labels)).ravel(order="F")
    cuts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], cuts))
    ends = np.concatenate((cuts, [flat.size]))
    values = flat[starts]
    order = np.argsort(values, kind="stable")  # runs grouped by class, in pixel order
    values, starts, ends = values[order], starts[order], ends[order]
    present, first = np.unique(values, return_index=True)
    bounds = np.append(first, len(values))
    uncompressed = []
    for i in range(len(present)):
        s, e = starts[bounds[i]:bounds[i + 1]], ends[bounds[i]:bounds[i + 1]]
        gaps = s - np.concatenate(([0], e[:-1]))
        counts = np.stack([gaps, e - s], axis=1).ravel()
        if e[-1] < flat.size:
            counts = np.append(counts, flat.size - e[-1])
        uncompressed.append({"size": [height, width], "counts": counts.astype(np.uint32)})
    areas = np.add.reduceat(ends - starts, first)
    x0, x1 = starts // height, (ends - 1) // height
    crosses = x0 != x1
    y0 = np.where(crosses, 0, starts % height)
    y1 = np.where(crosses, height - 1, (ends - 1) % height)
    xs, xe = np.minimum.reduceat(x0, first), np.maximum.reduceat(x1, first)
    ys, ye = np.minimum.reduceat(y0, first), np.maximum.reduceat(y1, first)
    boxes = np.stack([xs, ys, xe - xs + 1, ye - ys + 1], axis=1).astype(np.float64)
    return present, coco_mask.frPyObjects(uncompressed, height, width), areas, boxes


def _compact(labels: np.ndarray) -> np.ndarray:
    """The label map in the narrowest unsigned type that holds it (uint8 or uint16), which
    makes the run-cutting passes several times cheaper than on int64; values are unchanged."""
    if labels.dtype.itemsize <= 2 and labels.dtype.kind == "u":
        return labels
    top = int(labels.max())
    if top < 256:
        return labels.astype(np.uint8)
    return labels.astype(np.uint16) if top < 65536 else labels


def _check_label_map(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty [H, W] array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.min() < 0:
        raise ValueError("labels must be class indices >= 0")
    return labels


def _category_ids_for(present: np.ndarray, category_ids: Sequence[int] | None) -> list[int]:
    if category_ids is None:
        return [int(c) + 1 for c in present]
    if int(present.max()) >= len(category_ids):
        raise ValueError(
            f"label {int(present.max())} has no category id ({len(category_ids)} given)"
        )
    return [int(category_ids[int(c)]) for c in present]


def _class_index_lookup(category_ids: Sequence[int] | None) -> dict[int, int]:
    if category_ids is None:
        return _DefaultLookup()
    return {int(cid): index for index, cid in enumerate(category_ids)}


class _DefaultLookup(dict):
    """``category_id -> class_index`` for the default ``id = index + 1`` convention."""

    def __contains__(self, cid: object) -> bool:
        return isinstance(cid, int) and cid >= 1

    def __getitem__(self, cid: int) -> int:
        return cid - 1


def _score_of(scores: ScoreSource, class_index: int) -> float:
    if isinstance(scores, Mapping):
        value = scores.get(class_index, 0.0)
    else:
        value = scores[class_index]
    return float(value)


def _clean_rle(rle: Mapping) -> dict:
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(v) for v in rle["size"]], "counts": counts}

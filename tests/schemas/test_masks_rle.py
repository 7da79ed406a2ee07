"""One-pass multi-class RLE (schemas.masks.label_map_to_rles) against pycocotools, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from schemas.masks import label_map_to_annotations, label_map_to_rles


def _per_class_reference(labels: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    present = np.unique(labels)
    rles = [coco_mask.encode(np.asfortranarray((labels == c).astype(np.uint8)))
            for c in present]
    return present, rles


def _blocky(seed: int, hw: tuple[int, int], classes: int, dtype) -> np.ndarray:
    """Label map with long runs (blocks), single pixels and runs that wrap across columns."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, classes, size=(max(1, hw[0] // 4), max(1, hw[1] // 3)))
    labels = np.kron(small, np.ones((4, 3), dtype=np.int64))[:hw[0], :hw[1]]
    labels = np.pad(labels, ((0, hw[0] - labels.shape[0]), (0, hw[1] - labels.shape[1])),
                    mode="edge")
    noise = rng.random(hw) < 0.05
    labels[noise] = rng.integers(0, classes, size=int(noise.sum()))
    return labels.astype(dtype)


CASES = [
    ("blocky uint8", _blocky(0, (37, 53), 7, np.uint8)),
    ("blocky uint16, many classes", _blocky(1, (64, 48), 300, np.uint16)),
    ("blocky int64", _blocky(2, (20, 31), 3, np.int64)),
    ("noise int32", np.random.default_rng(3).integers(0, 5, size=(17, 23)).astype(np.int32)),
    ("one class", np.full((9, 11), 4, dtype=np.int64)),
    ("one row", np.array([[0, 0, 2, 2, 2, 0, 1]], dtype=np.uint8)),
    ("one column", np.array([[3], [3], [1], [3]], dtype=np.uint8)),
    ("one pixel", np.array([[6]], dtype=np.uint8)),
    ("class at both ends", np.array([[1, 0, 0], [0, 0, 1]], dtype=np.uint8)),
]


@pytest.mark.parametrize("name, labels", CASES, ids=[c[0] for c in CASES])
def test_one_pass_rle_is_bit_exact_with_per_class_pycocotools(name, labels):
    present, rles = label_map_to_rles(labels)
    want_present, want = _per_class_reference(labels)
    np.testing.assert_array_equal(present, want_present)
    assert [r["counts"] for r in rles] == [r["counts"] for r in want], name
    assert all(list(r["size"]) == list(labels.shape) for r in rles)
    np.testing.assert_array_equal(coco_mask.area(rles), coco_mask.area(want))


@pytest.mark.parametrize("name, labels", CASES, ids=[c[0] for c in CASES])
def test_annotation_area_and_bbox_equal_pycocotools(name, labels):
    anns = label_map_to_annotations(labels, np.ones(int(labels.max()) + 1))
    _, want = _per_class_reference(labels)
    assert [a["area"] for a in anns] == coco_mask.area(want).tolist(), name
    assert [a["bbox"] for a in anns] == coco_mask.toBbox(want).tolist(), name
    assert all(isinstance(v, float) for a in anns for v in a["bbox"])


def test_one_pass_rle_decodes_back_to_the_label_map():
    labels = _blocky(5, (45, 60), 12, np.uint16)
    present, rles = label_map_to_rles(labels)
    rebuilt = np.full(labels.shape, -1, dtype=np.int64)
    for c, rle in zip(present, rles, strict=True):
        mask = coco_mask.decode(rle).astype(bool)
        assert (rebuilt[mask] == -1).all()
        rebuilt[mask] = c
    np.testing.assert_array_equal(rebuilt, labels)


def test_annotations_are_the_same_for_every_integer_dtype():
    labels = _blocky(6, (30, 40), 9, np.int64)
    want = label_map_to_annotations(labels, np.linspace(0, 1, 9))
    for dtype in (np.uint8, np.uint16, np.int32):
        assert label_map_to_annotations(labels.astype(dtype), np.linspace(0, 1, 9)) == want

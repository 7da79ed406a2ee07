"""Ground-truth readers: COCO JSON (polygons / RLE / uncompressed RLE, overlap rule), mask
folders, our own Parquet schema; malformed inputs give clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from support.audit_data import failed_row, ok_row, write_labels_output

from pipeline.audit import AuditError
from pipeline.audit.gt_coco import CocoGroundTruth
from pipeline.audit.gt_masks import MaskFolderGroundTruth, load_class_list
from pipeline.audit.gt_parquet import ParquetGroundTruth
from pipeline.audit.metrics import IGNORED
from pipeline.audit.sources import AliasIndex, load_source_image, name_aliases

I = IGNORED


def _block(rows: slice, cols: slice, hw=(6, 8)) -> np.ndarray:
    mask = np.zeros(hw, dtype=np.uint8)
    mask[rows, cols] = 1
    return mask


def _compressed(mask: np.ndarray) -> dict:
    rle = coco_mask.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _uncompressed(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            counts.append(run)
            value, run = pixel, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def _coco(tmp_path, annotations, categories=None, name="gt.json"):
    data = {
        "images": [{"id": 7, "file_name": "photos/img7.jpg", "height": 6, "width": 8}],
        "categories": categories or [{"id": 3, "name": "cat"}, {"id": 1, "name": "dog"}],
        "annotations": annotations,
    }
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


EXPECTED = np.array([  # dog = 0, cat = 1, background = 2 (appended)
    [0, 0, 0, 0, 0, 0, 2, 2],
    [0, 0, 0, 0, 0, 0, 2, 2],
    [0, 0, 1, 1, 1, 0, 2, 2],
    [0, 0, 1, 1, 1, 0, 2, 2],
    [2, 2, 1, 1, 1, 2, 0, 0],
    [2, 2, 1, 1, 1, 2, 0, 0],
])


def _three_formats():
    return [
        {"id": 1, "image_id": 7, "category_id": 3, "segmentation":
         _compressed(_block(slice(2, 6), slice(2, 5)))},
        {"id": 2, "image_id": 7, "category_id": 1, "segmentation": [[0, 0, 6, 0, 6, 4, 0, 4]]},
        {"id": 3, "image_id": 7, "category_id": 1, "iscrowd": 1, "segmentation":
         _uncompressed(_block(slice(4, 6), slice(6, 8)))},
    ]


def test_coco_polygons_rle_uncompressed_and_smaller_wins(tmp_path):
    gt = CocoGroundTruth(_coco(tmp_path, _three_formats()))
    assert [c.name for c in gt.categories] == ["dog", "cat", "background"]
    np.testing.assert_array_equal(gt.load("7").label_map, EXPECTED)
    assert gt.match(["nothing", "img7"]) == "7"
    assert gt.match(["photos/img7.jpg"]) == "7"


def test_coco_equal_areas_higher_id_wins_and_unlabeled_ignore(tmp_path):
    anns = [{"id": 11, "image_id": 7, "category_id": 1,
             "segmentation": _compressed(_block(slice(0, 2), slice(1, 3)))},
            {"id": 10, "image_id": 7, "category_id": 3,
             "segmentation": _compressed(_block(slice(0, 2), slice(0, 2)))}]
    gt = CocoGroundTruth(_coco(tmp_path, anns), unlabeled="ignore")
    label = gt.load("7").label_map
    assert label[0].tolist() == [1, 0, 0, I, I, I, I, I]
    assert [c.name for c in gt.categories] == ["dog", "cat"]


def test_coco_uses_its_own_background_category(tmp_path):
    cats = [{"id": 1, "name": "dog"}, {"id": 5, "name": "Background"}]
    gt = CocoGroundTruth(_coco(tmp_path, [], categories=cats))
    assert len(gt.categories) == 2
    assert (gt.load("7").label_map == 1).all()


@pytest.mark.parametrize("content, message", [
    (None, "COCO ground truth not found"),
    ("{\"images\": [", "is not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ("{\"images\": []}", "missing list 'annotations'"),
])
def test_coco_malformed_files(tmp_path, content, message):
    path = tmp_path / "gt.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(AuditError, match=message):
        CocoGroundTruth(str(path))


def test_coco_mask_size_mismatch_and_bad_annotations(tmp_path):
    wrong = [{"id": 1, "image_id": 7, "category_id": 1,
              "segmentation": _compressed(np.ones((4, 4), np.uint8))}]
    gt = CocoGroundTruth(_coco(tmp_path, wrong))
    with pytest.raises(AuditError, match="mask size 4x4 does not match the image size 6x8"):
        gt.load("7")
    unknown_image = [{"id": 1, "image_id": 99, "category_id": 1, "segmentation": []}]
    with pytest.raises(AuditError, match="unknown image id 99"):
        CocoGroundTruth(_coco(tmp_path, unknown_image))
    bad_polygon = [{"id": 1, "image_id": 7, "category_id": 1, "segmentation": [[1, 2, 3]]}]
    with pytest.raises(AuditError, match="polygon needs"):
        CocoGroundTruth(_coco(tmp_path, bad_polygon)).load("7")
    unknown_cat = [{"id": 4, "image_id": 7, "category_id": 42,
                    "segmentation": [[0, 0, 2, 0, 2, 2]]}]
    with pytest.raises(AuditError, match="unknown category_id 42"):
        CocoGroundTruth(_coco(tmp_path, unknown_cat)).load("7")


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def test_mask_folder_with_nested_names_reduce_zero_label_and_aliases(tmp_path):
    root = tmp_path / "masks"
    _png(root / "city" / "a_gt.png", np.array([[0, 1, 255, 3]], np.uint8))
    _png(root / "b_gt.png", np.array([[2, 2]], np.uint8))
    (root / "notes.txt").write_text("not a mask")
    (tmp_path / "classes.txt").write_text("road\nperson, pedestrian\ncar\n")
    classes = load_class_list(str(tmp_path / "classes.txt"))
    assert classes[1].synonyms == ("pedestrian",)
    gt = MaskFolderGroundTruth(str(root), classes, suffix="_gt.png", reduce_zero_label=True)
    assert gt.keys() == ["b", "city/a"]
    assert gt.load("city/a").label_map.tolist() == [[I, 0, I, 2]]
    assert gt.match(["x/a.jpg", "a"]) == "city/a"
    plain = MaskFolderGroundTruth(str(root), classes, suffix="_gt.png")
    assert plain.load("city/a").label_map.tolist() == [[0, 1, I, 3]]


def test_mask_folder_errors(tmp_path):
    with pytest.raises(AuditError, match="folder not found"):
        MaskFolderGroundTruth(str(tmp_path / "missing"), [])
    root = tmp_path / "m"
    _png(root / "rgb.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(AuditError, match="needs a class list"):
        MaskFolderGroundTruth(str(root))
    (root / "classes.txt").write_text("a\nb\n")
    gt = MaskFolderGroundTruth(str(root))
    with pytest.raises(AuditError, match="mode RGB; expected a single-channel"):
        gt.load("rgb")
    (root / "broken.png").write_bytes(b"not a png")
    with pytest.raises(AuditError, match="not a readable image"):
        MaskFolderGroundTruth(str(root)).load("broken")
    with pytest.raises(AuditError, match="no \\*_x.png mask files"):
        MaskFolderGroundTruth(str(root), suffix="_x.png")
    with pytest.raises(AuditError, match="class list not found: .*nope.txt"):
        load_class_list(str(tmp_path / "nope.txt"))


def test_palette_masks_give_indices(tmp_path):
    image = Image.fromarray(np.array([[0, 15, 255]], np.uint8), "P")
    image.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    image.save(tmp_path / "p.png")
    (tmp_path / "classes.txt").write_text("\n".join(str(i) for i in range(20)))
    gt = MaskFolderGroundTruth(str(tmp_path))
    assert gt.load("p").label_map.tolist() == [[0, 15, I]]


def test_parquet_ground_truth_in_our_schema(tmp_path):
    labels = np.array([[0, 1], [2, 2]])
    rows = [ok_row("a.jpg", labels, 3), failed_row("b.jpg")]
    write_labels_output(str(tmp_path / "gt"), {"s0": rows}, [["road"], ["car", "auto"], ["sky"]])
    gt = ParquetGroundTruth(str(tmp_path / "gt"))
    assert [c.name for c in gt.categories] == ["road", "car", "sky"]
    assert gt.categories[1].synonyms == ("auto",)
    assert gt.keys() == ["s0/a.jpg"] and gt.not_ok == ["s0/b.jpg"]
    assert gt.match(["other/a.jpg", "a"]) == "s0/a.jpg"
    np.testing.assert_array_equal(gt.load("s0/a.jpg").label_map, labels)


def test_alias_index_ambiguous_names_match_nothing():
    index = AliasIndex()
    index.add("1", name_aliases("x/a.jpg"))
    index.add("2", name_aliases("y/a.jpg"))
    assert index.match(["a.jpg", "a"]) is None
    assert index.match(["a", "y/a.jpg"]) == "2"
    assert index.match(["1"]) == "1"
    with pytest.raises(ValueError, match="duplicate"):
        index.add("1", [])


def test_load_source_image_from_file_and_tar(tmp_path):
    import tarfile

    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        tar.add(tmp_path / "img.png", arcname="inner/img.png")
    np.testing.assert_array_equal(load_source_image(str(tmp_path / "img.png"), None), pixels)
    # the key as the labeling job writes it: the member name without its extension
    from_tar = load_source_image(str(tmp_path / "shard.tar"), "inner/img",
                                 image_id="shard/inner/img")
    np.testing.assert_array_equal(from_tar, pixels)
    assert load_source_image(str(tmp_path / "missing.png"), None) is None
    assert load_source_image(str(tmp_path / "shard.tar"), "inner/img.png",
                             image_id="shard/inner/img.png") is None  # a member name, no key

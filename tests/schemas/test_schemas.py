"""Tests of the output contract: masks <-> RLE, row validation, Parquet metadata, COCO export."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO

from schemas import (
    SCHEMA_VERSION,
    Category,
    RowError,
    annotations_to_label_map,
    categories_from_classes,
    coco_dict,
    error_row,
    label_map_to_annotations,
    label_schema,
    make_row,
    mask_to_rle,
    parse_run_metadata,
    rle_to_mask,
    rows_to_table,
    run_metadata,
    validate_row,
    write_coco_json,
)
from schemas.io import iter_label_rows, read_label_table, read_run_record

NUM_CLASSES = 5


def _random_label_map(seed: int, hw: tuple[int, int], num_classes: int) -> np.ndarray:
    """Blocky random label map [H, W] int64 using only some of the classes."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, num_classes, size=(hw[0] // 4 + 1, hw[1] // 4 + 1))
    return np.kron(coarse, np.ones((4, 4), dtype=np.int64))[: hw[0], : hw[1]]


def _row(labels: np.ndarray, key: str = "a.jpg", num_classes: int = NUM_CLASSES) -> dict:
    scores = np.linspace(0.1, 0.9, num_classes)
    anns = label_map_to_annotations(labels, scores)
    h, w = labels.shape
    return make_row(shard_id="s0", source_uri="s3://b/s0.tar", key=key, width=w, height=h,
                    annotations=anns, presence=[0.5] * num_classes,
                    num_categories=num_classes)


@pytest.mark.parametrize("hw", [(1, 1), (7, 13), (64, 48)])
def test_label_map_round_trip_is_exact(hw):
    labels = _random_label_map(0, hw, NUM_CLASSES)
    anns = label_map_to_annotations(labels, np.ones(NUM_CLASSES))
    back = annotations_to_label_map(anns, *hw, category_ids=None)
    np.testing.assert_array_equal(back, labels)
    assert sum(a["area"] for a in anns) == hw[0] * hw[1]


def test_absent_classes_get_no_annotation_and_ids_are_index_plus_one():
    labels = np.zeros((10, 10), dtype=np.int64)
    labels[2:5, 3:9] = 3
    anns = label_map_to_annotations(labels, {0: 0.25, 3: 0.75})
    assert [a["category_id"] for a in anns] == [1, 4]
    assert anns[1]["bbox"] == [3.0, 2.0, 6.0, 3.0]
    assert anns[1]["area"] == 18
    assert anns[1]["score"] == 0.75
    np.testing.assert_array_equal(annotations_to_label_map(anns, 10, 10), labels)


def test_single_class_image():
    labels = np.full((5, 8), 2, dtype=np.int32)
    anns = label_map_to_annotations(labels, [0.0, 0.0, 0.5])
    assert len(anns) == 1 and anns[0]["area"] == 40
    assert anns[0]["bbox"] == [0.0, 0.0, 8.0, 5.0]
    np.testing.assert_array_equal(annotations_to_label_map(anns, 5, 8), labels)


def test_custom_category_ids_round_trip():
    labels = _random_label_map(1, (20, 30), 3)
    ids = [10, 20, 30]
    anns = label_map_to_annotations(labels, np.ones(3), category_ids=ids)
    assert {a["category_id"] for a in anns} <= set(ids)
    np.testing.assert_array_equal(annotations_to_label_map(anns, 20, 30, ids), labels)


def test_many_classes_more_than_one_chunk():
    labels = (np.arange(30 * 40).reshape(30, 40) % 23).astype(np.int64)
    anns = label_map_to_annotations(labels, np.full(23, 0.5))
    assert len(anns) == 23
    np.testing.assert_array_equal(annotations_to_label_map(anns, 30, 40), labels)


def test_rle_counts_are_str_and_decode_back():
    mask = np.zeros((6, 9), dtype=bool)
    mask[1:4, 2:7] = True
    rle = mask_to_rle(mask)
    assert isinstance(rle["counts"], str) and rle["size"] == [6, 9]
    np.testing.assert_array_equal(rle_to_mask(rle), mask)
    np.testing.assert_array_equal(rle_to_mask({**rle, "counts": rle["counts"].encode()}), mask)


def test_inverse_rejects_gaps_and_overlaps():
    labels = np.zeros((4, 4), dtype=np.int64)
    labels[:2] = 1
    anns = label_map_to_annotations(labels, np.ones(2))
    with pytest.raises(ValueError, match="uncovered"):
        annotations_to_label_map(anns[:1], 4, 4)
    with pytest.raises(ValueError, match="overlaps"):
        annotations_to_label_map(anns + anns[:1], 4, 4)
    with pytest.raises(ValueError, match="size"):
        annotations_to_label_map(anns, 4, 5)


def test_label_map_rejects_bad_input():
    with pytest.raises(ValueError):
        label_map_to_annotations(np.zeros((2, 2), dtype=np.float32), [1.0])
    with pytest.raises(ValueError):
        label_map_to_annotations(np.full((2, 2), -1), [1.0])
    with pytest.raises(ValueError):
        label_map_to_annotations(np.zeros((3,), dtype=np.int64), [1.0])


def test_make_row_is_valid_and_round_trips_through_parquet(tmp_path):
    labels = _random_label_map(2, (16, 24), NUM_CLASSES)
    rows = [_row(labels), error_row(shard_id="s0", source_uri="s3://b/s0.tar", key="bad.jpg",
                                    status="decode_error", error="cannot identify image")]
    cats = categories_from_classes([("sky", "clouds"), ("tree",), ("road",), ("car",), ("cat",)])
    meta = run_metadata(cats, "abc123", {"preset": "coco_stuff"})
    pq.write_table(rows_to_table(rows, meta), tmp_path / "s0.parquet")
    table, got = read_label_table(str(tmp_path / "s0.parquet"))
    assert table.schema.equals(label_schema(), check_metadata=False)
    assert got["schema_version"] == SCHEMA_VERSION
    assert got["categories"][0] == Category(1, "sky", ("sky", "clouds"))
    assert got["vocabulary_hash"] == "abc123" and got["run"] == {"preset": "coco_stuff"}
    back = table.to_pylist()
    assert back[1]["status"] == "decode_error" and back[1]["annotations"] is None
    np.testing.assert_array_equal(
        annotations_to_label_map(back[0]["annotations"], 16, 24), labels)


def test_schema_has_version_and_field_metadata():
    schema = label_schema()
    assert schema.metadata[b"cass.schema_version"] == SCHEMA_VERSION.encode()
    ann = schema.field("annotations").type.value_type
    assert b"x, y, w, h" in ann.field("bbox").metadata[b"convention"]
    assert parse_run_metadata(None)["categories"] == []


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.update(status="weird"), "status"),
        (lambda r: r.update(width=0), "width"),
        (lambda r: r.update(error="oops"), "error"),
        (lambda r: r.update(presence=[0.5] * 3), "presence"),
        (lambda r: r.update(presence=[1.5] * NUM_CLASSES), "presence"),
        (lambda r: r["annotations"].pop(), "areas"),
        (lambda r: r["annotations"][0].update(category_id=0), "category_id"),
        (lambda r: r["annotations"][0].update(category_id=99), "category_id"),
        (lambda r: r["annotations"][0].update(score=float("nan")), "score"),
        (lambda r: r["annotations"][0]["segmentation"].update(size=[1, 1]), "size"),
        (lambda r: r["annotations"][0]["segmentation"].update(counts=b"x"), "counts"),
        (lambda r: r["annotations"][0].update(bbox=[0, 0]), "bbox"),
        (lambda r: r.update(annotations=[]), "annotation"),
        (lambda r: r.update(key=""), "key"),
    ],
)
def test_make_row_rejects_bad_rows(change, message):
    row = _row(_random_label_map(3, (8, 8), NUM_CLASSES))
    change(row)
    with pytest.raises(RowError, match=message):
        validate_row(row, num_categories=NUM_CLASSES)


def test_make_row_validates():
    row = _row(_random_label_map(3, (8, 8), NUM_CLASSES))
    with pytest.raises(RowError, match="width"):
        make_row(**{k: row[k] for k in ("shard_id", "source_uri", "key", "height",
                                         "annotations", "presence")}, width=-1)
    with pytest.raises(RowError, match="presence"):
        make_row(**{k: row[k] for k in ("shard_id", "source_uri", "key", "height", "width",
                                         "annotations")}, presence=[0.1], num_categories=5)


def test_error_row_validation():
    with pytest.raises(RowError, match="status"):
        error_row(shard_id="s", source_uri="u", key="k", status="ok", error="x")
    with pytest.raises(RowError, match="message"):
        error_row(shard_id="s", source_uri="u", key="k", status="too_large", error="")
    row = error_row(shard_id="s", source_uri="u", key="k", status="too_large", error="big",
                    width=100000, height=100000)
    assert row["image_id"] == "s/k" and row["width"] == 100000


def _coco_rows() -> tuple[list[dict], list[np.ndarray], list[Category]]:
    maps = [_random_label_map(s, (20 + s, 30), NUM_CLASSES) for s in range(3)]
    rows = [_row(m, key=f"{i}.jpg") for i, m in enumerate(maps)]
    rows.insert(1, error_row(shard_id="s0", source_uri="u", key="x.png", status="empty",
                             error="zero bytes"))
    cats = categories_from_classes([(f"class{i}",) for i in range(NUM_CLASSES)])
    return rows, maps, cats


def test_coco_export_loads_in_pycocotools_and_masks_match(tmp_path):
    rows, maps, cats = _coco_rows()
    data = coco_dict(rows, cats)
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(data))
    coco = COCO(str(path))
    assert len(coco.getImgIds()) == 3 and len(coco.getCatIds()) == NUM_CLASSES
    for image_id, labels in zip(sorted(coco.getImgIds()), maps, strict=True):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert all(a["iscrowd"] == 0 for a in anns)
        rebuilt = np.full(labels.shape, -1)
        for ann in anns:
            rebuilt[coco.annToMask(ann).astype(bool)] = ann["category_id"] - 1
        np.testing.assert_array_equal(rebuilt, labels)


def test_streamed_coco_json_equals_in_memory_dict():
    rows, _, cats = _coco_rows()
    buffer = io.StringIO()
    counts = write_coco_json(iter(rows), cats, buffer, info={"v": 1})
    assert json.loads(buffer.getvalue()) == coco_dict(rows, cats, info={"v": 1})
    assert counts["images"] == 3


def test_iter_label_rows_only_completed_shards_and_run_record(tmp_path):
    labels = _random_label_map(4, (8, 8), NUM_CLASSES)
    (tmp_path / "labels").mkdir()
    (tmp_path / "_done").mkdir()
    for shard in ("b", "a", "c"):
        pq.write_table(rows_to_table([_row(labels, key=f"{shard}{i}") for i in range(3)]),
                       tmp_path / "labels" / f"{shard}.parquet")
    for shard in ("a", "b"):
        (tmp_path / "_done" / f"{shard}.json").write_text("{}")
    (tmp_path / "run.json").write_text(json.dumps({"categories": []}))
    keys = [r["key"] for r in iter_label_rows(str(tmp_path), batch_size=2, columns=["key"])]
    assert keys == ["a0", "a1", "a2", "b0", "b1", "b2"]
    assert read_run_record(str(tmp_path)) == {"categories": []}
    with pytest.raises(FileNotFoundError):
        read_run_record(str(tmp_path / "nothing"))


def test_schemas_import_no_torch_or_ray():
    code = ("import sys, schemas, schemas.io, schemas.coco; "
            "bad = [m for m in ('torch', 'ray') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_mask_to_rle_treats_every_non_zero_value_as_inside():
    from schemas.masks import mask_to_rle, rle_to_mask

    for inside in (256, 0.5, -1, True):
        mask = np.zeros((4, 5), dtype=np.asarray(inside).dtype)
        mask[1:3, 2] = inside
        decoded = rle_to_mask(mask_to_rle(mask))
        assert decoded.sum() == 2 and decoded[1, 2] and decoded[2, 2], inside

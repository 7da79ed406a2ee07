"""jobs/review.py without a server, sending work out: brush RLE, ranking, tasks, labeling
config, contact sheet and the review record; images read through the pipeline readers
(local, cloud, unreadable), public URIs in records, random weights, confidence maps."""

from __future__ import annotations

import base64
import io
import json
import random
import re
import tarfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support.audit_data import ok_row, write_labels_output
from support.review import (
    CLASSES,
    label_map,
    make_scene,
    one_line_error,
    png_bytes,
    run_review,
    scene_rows,
)

from jobs.review import main as review_main
from pipeline.review.brush import BrushError, decode_brush, encode_brush
from pipeline.review.ranking import disagreement, top_k, uncertainty
from schemas.masks import rle_to_mask


# ---------------------------------------------------------------------- brush RLE
@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (40, 30), (300, 260)])
def test_brush_round_trip_random_and_long_runs(hw):
    rng = np.random.default_rng(hw[0])
    for mask in (rng.random(hw) > 0.5, np.ones(hw, bool), np.zeros(hw, bool),
                 rng.random(hw) > 0.97):
        assert np.array_equal(decode_brush(encode_brush(mask), *hw), mask)


def test_brush_decode_rejects_malformed_data():
    rle = encode_brush(np.ones((4, 4), bool))
    with pytest.raises(BrushError, match="holds 64 values, the 4x5 image needs 80"):
        decode_brush(rle, 4, 5)
    with pytest.raises(BrushError, match="ends in the middle"):
        decode_brush(encode_brush(np.eye(8, dtype=bool))[:10], 8, 8)
    with pytest.raises(BrushError, match="bytes"):
        decode_brush([0, 1, 999], 4, 4)
    with pytest.raises(BrushError, match="list"):
        decode_brush("AAAA", 4, 4)
    with pytest.raises(BrushError, match="more than"):
        decode_brush([0] * 10_000, 4, 4)


# ---------------------------------------------------------------------- ranking
def scene_rows(scene: dict) -> list[dict]:
    from schemas.io import iter_label_rows

    return list(iter_label_rows(scene["labels"]))


def test_ranking_is_deterministic_and_independent_of_row_order(tmp_path):
    rows = scene_rows(make_scene(tmp_path))
    shuffled = rows[::-1]
    random.Random(3).shuffle(shuffled)
    for by in ("uncertainty", "disagreement", "random"):
        first = [r.image_id for r in top_k(rows, 4, by, 3, seed=7)]
        again = [r.image_id for r in top_k(shuffled, 4, by, 3, seed=7)]
        assert first == again and len(first) == 4, by
    assert "s0/broken.png" not in {r.image_id for r in top_k(rows, 20, "uncertainty", 3)}
    seeds = {tuple(r.image_id for r in top_k(rows, 4, "random", 3, seed=s)) for s in range(5)}
    assert len(seeds) > 1  # the seed matters
    # the mask scores decide: tar and Parquet rows have the lowest scores
    by_uncertainty = [r.image_id for r in top_k(rows, 4, "uncertainty", 3)]
    assert set(by_uncertainty) == {"t0/sub/img6", "t0/sub/img7", "p0/00000000", "p0/00000001"}
    ties = [r.image_id for r in top_k([dict(r, image_id=f"x{i}") for i, r in
                                       enumerate([rows[0]] * 6)], 3, "uncertainty", 3, seed=1)]
    assert ties == [r.image_id for r in top_k([dict(rows[0], image_id=f"x{i}")
                                               for i in reversed(range(6))], 3, "uncertainty",
                                              3, seed=1)]


def test_scores_follow_their_definitions():
    labels = np.zeros((4, 5), np.int64)
    labels[:, 3:] = 1
    row = ok_row("a", labels, 3, [0.6, 0.4, 0.0], scores=[0.8, 0.5, 0.1])
    assert uncertainty(row, 3) == pytest.approx(1 - (12 * 0.8 + 8 * 0.5) / 20)
    assert disagreement(row, 3) == pytest.approx(0.0)
    row = ok_row("b", labels, 3, [0.0, 0.0, 1.0])
    assert disagreement(row, 3) == pytest.approx(1.0)


# ---------------------------------------------------------------------- the job's files
def test_review_writes_tasks_config_and_sheet(tmp_path, capsys):
    scene = make_scene(tmp_path)
    assert run_review(scene, "--top", "5") == 0
    out = Path(scene["out"])
    tasks = json.loads((out / "tasks.json").read_text())
    assert [t["data"]["cass_rank"] for t in tasks] == [1, 2, 3, 4, 5]
    rows = {r["image_id"]: r for r in scene_rows(scene)}
    kinds = set()
    for task in tasks:
        row = rows[task["data"]["cass_image_id"]]
        kinds.add(row["source_uri"].rsplit(".", 1)[-1])
        uri = task["data"]["image"]
        assert uri.startswith("data:image/png;base64,")
        photo = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
        name = Path(row["key"]).stem if row["shard_id"] != "p0" else \
            f"img{8 + int(row['key'])}"
        assert np.array_equal(photo, scene["photos"][name])
        prediction = task["predictions"][0]
        assert 0 <= prediction["score"] <= 1
        names = {1: "background", 2: "cat & dog", 3: "sky <blue>"}
        for ann, region in zip(row["annotations"], prediction["result"], strict=True):
            assert region["value"]["brushlabels"] == [names[ann["category_id"]]]
            mask = decode_brush(region["value"]["rle"], region["original_height"],
                                region["original_width"])
            assert np.array_equal(mask, rle_to_mask(ann["segmentation"]))
    assert kinds == {"tar", "parquet", "png"}
    config = ElementTree.fromstring((out / "labeling_config.xml").read_text())
    assert [e.get("value") for e in config.iter("Label")] == ["background", "cat & dog",
                                                              "sky <blue>"]
    sheet = (out / "contact_sheet.html").read_text()
    assert len(re.findall(r'src="data:image/png;base64,', sheet)) == 5
    assert "sky <blue>" not in sheet and "http://" not in sheet and "https://" not in sheet
    assert "selected 5 images" in capsys.readouterr().out


def test_rerun_and_exclude_reviewed(tmp_path):
    scene = make_scene(tmp_path)
    assert run_review(scene, "--top", "4", "--by", "random", "--seed", "5") == 0
    out = Path(scene["out"])
    first = [t["data"]["cass_image_id"] for t in json.loads((out / "tasks.json").read_text())]
    assert run_review(scene, "--top", "4", "--by", "random", "--seed", "5") == 0
    assert first == [t["data"]["cass_image_id"]
                     for t in json.loads((out / "tasks.json").read_text())]
    assert run_review(scene, "--top", "4", "--by", "random", "--seed", "5",
                      "--exclude-reviewed") == 0
    second = [t["data"]["cass_image_id"] for t in json.loads((out / "tasks.json").read_text())]
    assert len(second) == 4 and not set(first) & set(second)
    record = json.loads((out / "reviewed.json").read_text())
    assert [b["image_ids"] for b in record["batches"]] == [first, first, second]
    assert run_review(scene, "--top", "4", "--exclude-reviewed") == 0  # 10 ok images, 8 sent
    rest = {t["data"]["cass_image_id"] for t in json.loads((out / "tasks.json").read_text())}
    everything = {r["image_id"] for r in scene_rows(scene) if r["status"] == "ok"}
    assert rest == everything - set(first) - set(second) and len(rest) == 2


def test_review_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    scene = make_scene(tmp_path)
    assert review_main(["--labels", str(tmp_path / "nowhere"), "--top", "2", "--out",
                        scene["out"]]) == 2
    assert "no completed label files" in one_line_error(capsys, "review: error: ")
    assert run_review(scene, "--top", "0") == 2
    one_line_error(capsys, "review: error: --top")
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    assert run_review(scene, "--top", "2", "--label-studio-url", "http://127.0.0.1:9",
                      "--project", "x") == 2
    assert "LABEL_STUDIO_API_KEY" in one_line_error(capsys, "review: error: ")
    Path(scene["out"]).mkdir()
    (Path(scene["out"]) / "reviewed.json").write_text('{"batches": [3]}')
    assert run_review(scene, "--top", "2", "--exclude-reviewed") == 2
    assert "is not a review record" in one_line_error(capsys, "review: error: ")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "not-a-real-token")
    assert run_review(scene, "--top", "2", "--label-studio-url", "http://127.0.0.1:9",
                      "--project", "x") == 2
    err = one_line_error(capsys, "review: error: cannot reach Label Studio")
    assert "not-a-real-token" not in err


def test_cloud_images_by_url_or_embedded(tmp_path, s3_bucket, s3_server):
    """Loose images in S3 are referenced by their s3:// URL (Label Studio presigns it through
    a connected source storage); --embed-images reads them and embeds them instead."""
    fs = s3_server.filesystem()
    photo = (np.random.default_rng(2).random((12, 16, 3)) * 255).astype(np.uint8)
    fs.pipe(f"{s3_bucket}/photos/a.png", png_bytes(photo))
    uri = f"s3://{s3_bucket}/photos/a.png"
    labels = tmp_path / "out"
    write_labels_output(str(labels), {"s0": [ok_row("a.png", label_map(0), 3,
                                                    source_uri=uri)]}, CLASSES)
    options = json.dumps(s3_server.storage_options)
    out = tmp_path / "review"
    args = ["--labels", str(labels), "--top", "1", "--out", str(out),
            "--storage-options", options]
    assert review_main(args) == 0
    assert json.loads((out / "tasks.json").read_text())[0]["data"]["image"] == uri
    assert review_main([*args, "--embed-images"]) == 0
    embedded = json.loads((out / "tasks.json").read_text())[0]["data"]["image"]
    data = base64.b64decode(embedded.split(",", 1)[1])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), photo)
    assert "cannot read" not in (out / "contact_sheet.html").read_text()


def test_unreadable_image_is_reported_not_sent(tmp_path, capsys):
    scene = make_scene(tmp_path)
    (tmp_path / "shard.tar").write_bytes(b"this is no tar archive")  # img6, img7 (top 2)
    assert run_review(scene, "--top", "3") == 0
    err = capsys.readouterr().err
    assert err.count("review: warning: no image for t0/sub/img") == 2
    out = Path(scene["out"])
    tasks = json.loads((out / "tasks.json").read_text())
    assert len(tasks) == 1 and tasks[0]["data"]["cass_image_id"].startswith("p0/")
    record = json.loads((out / "reviewed.json").read_text())
    assert record["batches"][0]["image_ids"] == [t["data"]["cass_image_id"] for t in tasks]
    sheet = (out / "contact_sheet.html").read_text()
    assert sheet.count("<figure>") == 3 and "cannot read" in sheet


# ---------------------------------------------------------------------- review fixes
def _row_for(key: str, i: int, shard_id: str, uri: Path, scores, image_id=None,
             confidence=None) -> dict:
    from schemas.labels import make_row
    from schemas.masks import label_map_to_annotations

    labels = label_map(i)
    return make_row(shard_id=shard_id, source_uri=str(uri), key=key, width=16, height=12,
                    annotations=label_map_to_annotations(labels, np.asarray(scores)),
                    presence=[0.3, 0.4, 0.3], num_categories=3, image_id=image_id,
                    confidence=confidence)


def _with_run_record(labels: Path, **extra) -> None:
    path = labels / "run.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **extra}))


def _task_photos(out: Path) -> dict[str, np.ndarray]:
    tasks = json.loads((out / "tasks.json").read_text())
    return {t["data"]["cass_image_id"]: np.asarray(Image.open(io.BytesIO(base64.b64decode(
        t["data"]["image"].split(",", 1)[1])))) for t in tasks}


def test_images_come_through_the_pipeline_readers_matched_on_image_id(tmp_path):
    """.pq shards are shards, repeated Parquet ids and tar keys that took a suffix or the full
    member name get their own row's image (not the first row of that key)."""
    rng = np.random.default_rng(5)
    photos = [(rng.random((12, 16, 3)) * 255).astype(np.uint8) for _ in range(5)]
    pq_path = tmp_path / "shard.pq"
    pq.write_table(pa.table({"image": [png_bytes(photos[0]), png_bytes(photos[1])],
                             "id": ["same", "same"]}), pq_path)
    tar_path = tmp_path / "x.tar"
    with tarfile.open(tar_path, "w") as archive:
        for name, photo in (("x.png", photos[2]), ("x.jpg", photos[3])):
            data = png_bytes(photo)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    low = [0.1, 0.1, 0.1]
    rows = {"p0": [_row_for("same", 0, "p0", pq_path, low),
                   _row_for("same", 1, "p0", pq_path, low, image_id="p0/same~1")],
            "t0": [_row_for("x", 2, "t0", tar_path, low), _row_for("x.jpg", 3, "t0", tar_path,
                                                                   low)]}
    labels = tmp_path / "out"
    write_labels_output(str(labels), rows, CLASSES)
    _with_run_record(labels, io={"image_column": "image", "id_column": "id"})
    out = tmp_path / "review"
    assert review_main(["--labels", str(labels), "--top", "4", "--out", str(out)]) == 0
    got = _task_photos(out)
    expected = {"p0/same": 0, "p0/same~1": 1, "t0/x": 2, "t0/x.jpg": 3}
    assert set(got) == set(expected)
    for image_id, index in expected.items():
        assert np.array_equal(got[image_id], photos[index]), image_id


def test_contact_sheet_decodes_only_allowed_formats_within_the_pixel_bound():
    from pipeline.review.sheet import decode_photo

    photo = (np.random.default_rng(1).random((12, 16, 3)) * 255).astype(np.uint8)
    ppm = io.BytesIO()
    Image.fromarray(photo).save(ppm, format="PPM")  # Pillow reads it; the pipeline does not
    assert decode_photo(ppm.getvalue()) is None
    assert np.array_equal(decode_photo(png_bytes(photo)), photo)
    assert decode_photo(png_bytes(photo), max_pixels=100) is None  # 192 pixels > 100


def test_records_and_sheet_show_public_uris(tmp_path):
    from pipeline.review.session import ReviewConfig, _batch_record, _write_files

    config = ReviewConfig(labels="s3://AKIAKEY:topsecret@bucket/out?X-Amz-Signature=sig",
                          out_dir=str(tmp_path / "r"), top=1,
                          label_studio_url="http://me:pw@127.0.0.1:8080/?token=tok",
                          project="p")
    record = json.dumps(_batch_record(config, [], {"id": 1, "title": "p"}, None))
    _write_files(config, [], [], [], {"loaded": {}, "missing": {}, "max_pixels": 10}, None)
    sheet = (tmp_path / "r" / "contact_sheet.html").read_text()
    for text in (record, sheet):
        for secret in ("topsecret", "AKIAKEY", "sig", "pw", "tok"):
            assert secret not in text
    assert "bucket/out" in sheet and "127.0.0.1:8080" in record


def test_random_weights_are_recorded(tmp_path):
    scene = make_scene(tmp_path)
    _with_run_record(Path(scene["labels"]), engine={"random_weights": 3})
    assert run_review(scene, "--top", "2") == 0
    out = Path(scene["out"])
    tasks = json.loads((out / "tasks.json").read_text())
    assert all("random-weights-3" in t["predictions"][0]["model_version"] for t in tasks)
    assert "Random weights</b> (seed 3)" in (out / "contact_sheet.html").read_text()
    assert json.loads((out / "reviewed.json").read_text())["batches"][0]["random_weights"] == 3
    (tmp_path / "plain").mkdir()
    plain = make_scene(tmp_path / "plain")
    assert run_review(plain, "--top", "1") == 0
    assert "random" not in json.loads((Path(plain["out"]) / "tasks.json").read_text())[0][
        "predictions"][0]["model_version"]


def test_storage_options_from_a_file(tmp_path):
    scene = make_scene(tmp_path)
    options = tmp_path / "options.json"
    options.write_text("{}")
    assert run_review(scene, "--top", "1", "--storage-options", f"@{options}") == 0


def test_uncertainty_uses_the_confidence_map_when_rows_have_one(tmp_path):
    from schemas.confidence import encode_confidence

    doubtful = np.full((12, 16), 0.9, np.float32)
    doubtful[:6] = 0.3  # half the pixels below 0.5
    sure = np.full((12, 16), 0.95, np.float32)
    path = tmp_path / "a.png"
    rows = [_row_for("a", 0, "s0", path, [0.99, 0.99, 0.99], confidence=encode_confidence(
                doubtful)),
            _row_for("b", 1, "s0", path, [0.1, 0.1, 0.1], confidence=encode_confidence(sure))]
    assert uncertainty(rows[0], 3) == pytest.approx(0.5)
    assert uncertainty(rows[1], 3) == pytest.approx(0.0)
    assert [r.image_id for r in top_k(rows, 2, "uncertainty", 3)] == ["s0/a", "s0/b"]
    assert uncertainty(dict(rows[0], confidence=b"not a png"), 3) == 1.0

"""jobs/audit.py end to end on small outputs: report files, embedded plots, unmatched images,
--fail-under, and one-line errors with a non-zero exit status."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import REPO  # noqa: E402
from support.audit_data import failed_row, ok_row, write_labels_output

from jobs.audit import main

CLASSES = [["background", "sky"], ["cat", "kitty"], ["dog"]]


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _scene(tmp_path: Path) -> dict[str, str]:
    """Labels (3 shards, one incomplete) and mask ground truth with unmatched images."""
    gt_a = np.zeros((8, 8), np.uint8)
    gt_a[:4] = 1
    gt_a[0, 0] = 255
    pred_a = np.zeros((8, 8), np.int64)
    pred_a[:4, :4] = 1
    pred_a[4:, :2] = 2
    gt_b = np.full((6, 6), 2, np.uint8)
    photo = tmp_path / "photos" / "a.png"
    _save(photo, np.full((8, 8, 3), 200, np.uint8))
    labels = tmp_path / "out"
    write_labels_output(str(labels), {
        "s0": [ok_row("a.jpg", pred_a, 3, [0.1, 0.9, 0.2], source_uri=str(photo)),
               ok_row("b.jpg", np.full((6, 6), 2), 3, [0.2, 0.3, 0.8]), failed_row("c.jpg")],
        "s1": [ok_row("extra.jpg", np.zeros((6, 6), np.int64), 3, shard_id="s1")],
    }, CLASSES)
    write_labels_output(str(labels), {"s2": [ok_row("late.jpg", np.zeros((2, 2), np.int64), 3)]},
                        CLASSES, complete=False)
    gt = tmp_path / "gt"
    _save(gt / "a.png", gt_a)
    _save(gt / "b.png", gt_b)
    _save(gt / "lonely.png", gt_b)
    _save(gt / "c.png", gt_b)  # its labels row failed: reported as failed, not unmatched
    (gt / "classes.txt").write_text("background\ncat\ndog\n")
    return {"labels": str(labels), "gt": str(gt), "report": str(tmp_path / "report")}


def _run(paths: dict, *extra: str) -> int:
    return main(["--labels", paths["labels"], "--ground-truth", paths["gt"],
                 "--report", paths["report"], "--no-progress", *extra])


def _embedded_pngs(html: str) -> list[Image.Image]:
    blobs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in blobs]


def test_report_files_metrics_and_embedded_plots(tmp_path, capsys):
    paths = _scene(tmp_path)
    assert _run(paths, "--fail-under", "50") == 0
    report = Path(paths["report"])
    for name in ("metrics.json", "report.md", "report.html", "confusion_matrix.csv",
                 "unmatched.tsv"):
        assert (report / name).stat().st_size > 0, name
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["num_images"] == 2
    assert metrics["mIoU"] == pytest.approx(100 * (0.5 + 15 / 31 + 36 / 44) / 3, abs=1e-3)
    assert metrics["aAcc"] == pytest.approx(100 * (24 + 15 + 36) / 99, abs=1e-3)
    assert metrics["per_class"]["cat"] == {
        "iou": pytest.approx(100 * 15 / 31, abs=1e-3), "acc": pytest.approx(100 * 15 / 31,
                                                                             abs=1e-3),
        "gt_pixels": 31, "pred_pixels": 15, "presence_ap": 100.0, "presence_positives": 1,
        "mapped_from": ["cat"]}
    assert metrics["presence_mAP"] == pytest.approx(100 * (0.5 + 1 + 1) / 3, abs=1e-3)
    unmatched = metrics["unmatched"]
    assert (unmatched["ground_truth"], unmatched["predictions"], unmatched["failed_predictions"],
            unmatched["incomplete_shards"]) == (1, 1, 1, 1)
    assert unmatched["examples"]["ground_truth"] == ["lonely"]
    assert unmatched["examples"]["predictions"] == ["s1/extra.jpg"]
    tsv = (report / "unmatched.tsv").read_text()
    assert "failed_predictions\ts0/c.jpg\tdecode_error" in tsv
    html = (report / "report.html").read_text()
    assert "http://" not in html and "https://" not in html
    images = _embedded_pngs(html)
    assert len(images) == 3 + 2  # IoU bars, confusion, PR curves, 2 worst-image overlays
    with_photo, without_photo = images[3], images[4]  # a.jpg is worst; b.jpg has no photo
    assert with_photo.width / with_photo.height > without_photo.width / without_photo.height
    assert "mIoU" in (report / "report.md").read_text()
    out = capsys.readouterr().out
    assert "images 2" in out and "unmatched: ground truth 1, predictions 1" in out


def test_fail_under_gives_exit_status_one(tmp_path, capsys):
    paths = _scene(tmp_path)
    assert _run(paths, "--fail-under", "99.5") == 1
    assert "below --fail-under 99.5" in capsys.readouterr().err


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("audit: error: ")
    return err


def test_missing_labels_bad_json_and_size_mismatch(tmp_path, capsys):
    paths = _scene(tmp_path)
    assert _run({**paths, "labels": str(tmp_path / "nowhere")}) == 2
    assert "no completed label files" in _one_line_error(capsys)
    bad = tmp_path / "bad.json"
    bad.write_text("{\"images\": [}")
    assert _run({**paths, "gt": str(bad)}) == 2
    assert "is not valid JSON" in _one_line_error(capsys)
    assert _run({**paths, "gt": str(tmp_path / "missing.json")}) == 2
    assert "COCO ground truth not found" in _one_line_error(capsys)
    _save(Path(paths["gt"]) / "b.png", np.full((5, 6), 2, np.uint8))
    assert _run(paths) == 2
    assert "ground truth is 5x6 but the prediction is 6x6" in _one_line_error(capsys)
    assert _run(paths, "--category-map", str(tmp_path / "map.json")) == 2
    assert "category map not found" in _one_line_error(capsys)
    assert _run(paths, "--storage-options", "{bad") == 2
    err = _one_line_error(capsys)
    assert "--storage-options: JSON is not valid JSON" in err and "{bad" not in err
    assert _run(paths, "--storage-options", f"@{tmp_path / 'no-such-options.json'}") == 2
    assert "cannot read the storage options file" in _one_line_error(capsys)


def test_storage_options_from_a_file(tmp_path, capsys):
    paths = _scene(tmp_path)
    options = tmp_path / "options.json"
    options.write_text(json.dumps({"auto_mkdir": True}))
    assert _run(paths, "--storage-options", f"@{options}") == 0
    options.write_text("[1, 2]")
    assert _run(paths, "--storage-options", f"@{options}") == 2
    assert "must be a JSON object" in _one_line_error(capsys)


def test_math_text_class_names_in_the_calibration_plot(tmp_path, capsys):
    """A class name with ``$...$`` is drawn literally; it neither crashes the audit nor is a
    "below the bar" exit 1."""
    from schemas.confidence import encode_confidence
    from schemas.labels import make_row
    from schemas.masks import label_map_to_annotations

    names = [["background"], [r"x $\foo$ y"]]
    pred = np.zeros((6, 6), np.int64)
    pred[:3] = 1
    row = make_row(shard_id="s0", source_uri="mem://none/a", key="a", width=6, height=6,
                   annotations=label_map_to_annotations(pred, np.full(2, 0.5)),
                   presence=[0.5, 0.5], confidence=encode_confidence(np.full((6, 6), 0.7,
                                                                             np.float32)))
    labels = tmp_path / "out"
    write_labels_output(str(labels), {"s0": [row]}, names)
    gt = tmp_path / "gt"
    _save(gt / "a.png", pred.astype(np.uint8))
    (gt / "classes.txt").write_text("background\n" + names[1][0] + "\n")
    report = tmp_path / "report"
    assert main(["--labels", str(labels), "--ground-truth", str(gt), "--report", str(report),
                 "--no-progress", "--calibrate-precision", "0.5"]) == 0
    assert (report / "calibration.png").read_bytes()[:4] == b"\x89PNG"


def test_unexpected_value_error_is_a_one_line_exit_two(tmp_path, capsys, monkeypatch):
    import jobs.audit as audit_job

    def broken(config):
        raise ValueError("malformed thing\nTraceback detail")

    monkeypatch.setattr(audit_job, "run_audit", broken)
    assert _run(_scene(tmp_path)) == 2
    assert "bad input: malformed thing" in _one_line_error(capsys)


def test_coco_ground_truth_with_mapping_file_and_coco_ap(tmp_path):
    paths = _scene(tmp_path)
    rle = {"size": [8, 8], "counts": [0, 64]}  # uncompressed RLE: every pixel
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "height": 8, "width": 8}],
            "categories": [{"id": 17, "name": "feline"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 17, "segmentation": rle}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    (tmp_path / "map.json").write_text(json.dumps({"kitty": 17, "sky": None}))
    code = _run({**paths, "gt": str(tmp_path / "coco.json")}, "--category-map",
                str(tmp_path / "map.json"), "--coco-ap")
    assert code == 0
    metrics = json.loads((Path(paths["report"]) / "metrics.json").read_text())
    assert list(metrics["per_class"]) == ["feline"]
    assert metrics["per_class"]["feline"]["iou"] == pytest.approx(100 * 16 / 64)
    assert metrics["mapping"]["unmapped_classes"] == ["background", "dog"]
    assert metrics["mapping"]["unmapped_gt_categories"] == ["background"]
    assert metrics["coco_segm"]["AP50"] == 0.0  # IoU 0.25 is below every COCO threshold
    assert metrics["unmatched"]["predictions"] == 2  # b.jpg and extra.jpg


def test_parquet_ground_truth_is_detected_and_self_audit_is_perfect(tmp_path):
    paths = _scene(tmp_path)
    assert _run({**paths, "gt": paths["labels"]}) == 0
    metrics = json.loads((Path(paths["report"]) / "metrics.json").read_text())
    assert metrics["mIoU"] == 100.0 and metrics["aAcc"] == 100.0
    assert metrics["num_images"] == 3
    assert metrics["unmatched"]["ground_truth_not_ok"] == 1  # c.jpg is an error row
    assert metrics["unmatched"]["failed_predictions"] == 1
    assert "labels-schema Parquet" in metrics["sources"]["ground_truth"]


def test_command_line_entry_point_runs_as_a_script(tmp_path):
    paths = _scene(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "audit.py"), "--labels",
                           paths["labels"], "--ground-truth", paths["gt"], "--report",
                           paths["report"]], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "audit: rows: 4" in proc.stderr  # progress on stderr; s2 is incomplete
    assert "mIoU" in proc.stdout


def test_image_suffix_matches_cityscapes_style_names(tmp_path):
    labels = tmp_path / "out"
    key = "frankfurt_000000_000294_leftImg8bit.png"
    write_labels_output(str(labels), {"s0": [ok_row(key, np.zeros((2, 2), np.int64), 3)]},
                        CLASSES)
    gt = tmp_path / "gtFine" / "val"
    _save(gt / "frankfurt" / "frankfurt_000000_000294_gtFine_labelTrainIds.png",
          np.zeros((2, 2), np.uint8))
    (tmp_path / "classes.txt").write_text("background\ncat\ndog\n")
    paths = {"labels": str(labels), "gt": str(gt), "report": str(tmp_path / "r")}
    common = ("--gt-classes", str(tmp_path / "classes.txt"), "--mask-suffix",
              "_gtFine_labelTrainIds.png")
    assert _run(paths, *common) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["num_images"] == 0 and metrics["unmatched"]["predictions"] == 1
    assert _run(paths, *common, "--image-suffix", "_leftImg8bit.png") == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["num_images"] == 1 and metrics["mIoU"] == 100.0


def test_audit_reads_and_writes_object_storage(tmp_path, s3_server, s3_bucket):
    """Labels, mask ground truth and the report all on a real S3 server (SeaweedFS)."""
    options = s3_server.storage_options
    fs = s3_server.filesystem()
    labels = f"s3://{s3_bucket}/out"
    write_labels_output(labels, {"s0": [ok_row("a.jpg", np.ones((3, 4), np.int64), 3)]},
                        CLASSES, storage_options=options)
    buffer = io.BytesIO()
    Image.fromarray(np.ones((3, 4), np.uint8)).save(buffer, format="PNG")
    fs.pipe(f"{s3_bucket}/gt/a.png", buffer.getvalue())
    fs.pipe(f"{s3_bucket}/gt/classes.txt", b"background\ncat\ndog\n")
    paths = {"labels": labels, "gt": f"s3://{s3_bucket}/gt",
             "report": f"s3://{s3_bucket}/report"}
    assert _run(paths, "--storage-options", json.dumps(options)) == 0
    metrics = json.loads(fs.cat(f"{s3_bucket}/report/metrics.json"))
    assert metrics["num_images"] == 1 and metrics["mIoU"] == 100.0
    assert fs.size(f"{s3_bucket}/report/report.html") > 1000


def test_incomplete_shards_counts_shards_without_a_record(tmp_path):
    """Losing or late attempts of a completed shard are normal under the fenced contract;
    only shard ids without any completion record are incomplete."""
    import shutil

    from pipeline.audit.predictions import open_labels

    labels = tmp_path / "out"
    write_labels_output(str(labels), {"s0": [ok_row("a.jpg", np.zeros((2, 2), np.int64), 3)],
                                      "s1": [ok_row("b.jpg", np.zeros((2, 2), np.int64), 3)]},
                        CLASSES)
    objects = labels / "labels"
    for late in ("s0.20261201T101010Z-abc123-1", "s0.20261201T090909Z-def456-0",
                 "s1.20261201T101010Z-abc123-3", "s3.20261201T101010Z-abc123-0",
                 "s3.20261201T101010Z-abc123-1", "s1.extra.20261201T101010Z-abc123-0"):
        shutil.copy(objects / "s0.parquet", objects / f"{late}.parquet")
    write_labels_output(str(labels), {"s2": [ok_row("c.jpg", np.zeros((2, 2), np.int64), 3)]},
                        CLASSES, complete=False)
    assert open_labels(str(labels)).incomplete_shards == ["s1.extra", "s2", "s3"]


def test_derived_files_carry_public_uris_only(tmp_path):
    labels = "memory://reader:SECRET1@audit-creds/out?token=SECRET2"
    pred = np.zeros((4, 4), np.int64)
    write_labels_output(labels, {"s0": [ok_row("a.jpg", pred, 3)]}, CLASSES)
    gt = tmp_path / "gt"
    _save(gt / "a.png", pred.astype(np.uint8))
    (gt / "classes.txt").write_text("background\ncat\ndog\n")
    report = tmp_path / "report"
    assert main(["--labels", labels, "--ground-truth", str(gt), "--report", str(report),
                 "--no-progress", "--calibrate-precision", "0.5"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["sources"]["labels"] == "memory://***@audit-creds/out"
    for path in report.iterdir():
        assert b"SECRET" not in path.read_bytes(), path.name

"""Calibrated ignore: thresholds.json from the audit against a brute-force recomputation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.audit_data import write_labels_output

from jobs import audit as audit_job
from pipeline.audit.calibration import CalibrationAccumulator, lowest_level
from pipeline.audit.metrics import IGNORED
from schemas.confidence import dequantize, encode_confidence, quantize, resolve_levels
from schemas.labels import make_row
from schemas.masks import label_map_to_annotations

VOCAB = [["cat"], ["dog"], ["car"]]
GT_CLASSES = ["cat", "dog", "car", "tree"]  # tree: no vocabulary class predicts it
TARGET = 0.8


def scene(seed: int = 0, images: int = 3) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """``(key, gt, pred, confidence)``: noisy predictions, more confident where right."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(images):
        gt = rng.integers(0, 4, (20, 30))
        gt[rng.random(gt.shape) < 0.1] = 255
        pred = np.where(rng.random(gt.shape) < 0.35, rng.integers(0, 3, gt.shape),
                        np.clip(gt, 0, 2))
        right = pred == gt
        conf = np.where(right, 0.5 + 0.5 * rng.random(gt.shape), 0.2 + 0.7 * rng.random(gt.shape))
        out.append((f"img{i}", gt, pred, conf.astype(np.float32)))
    return out


def write_scene(root: Path, items) -> tuple[Path, Path]:
    rows = []
    for key, _, pred, conf in items:
        anns = label_map_to_annotations(pred, np.full(3, 0.5))
        rows.append(make_row(shard_id="s0", source_uri=f"mem://none/{key}", key=key,
                             width=pred.shape[1], height=pred.shape[0], annotations=anns,
                             presence=[0.5] * 3, confidence=encode_confidence(conf)))
    labels = root / "labels_out"
    write_labels_output(str(labels), {"s0": rows}, VOCAB)
    gt_dir = root / "gt"
    gt_dir.mkdir()
    (gt_dir / "classes.txt").write_text("\n".join(GT_CLASSES) + "\n")
    for key, gt, _, _ in items:
        Image.fromarray(gt.astype(np.uint8), mode="L").save(gt_dir / f"{key}.png")
    return labels, gt_dir


def brute_force(items, k: int | None, target: float) -> tuple[float | None, float | None]:
    """Lowest threshold (level / 255) whose precision reaches ``target``, and its recall."""
    gt = np.concatenate([g.ravel() for _, g, _, _ in items])
    pred = np.concatenate([p.ravel() for _, _, p, _ in items])
    conf = dequantize(quantize(np.concatenate([c.ravel() for _, _, _, c in items])))
    valid = gt != 255
    for level in range(256):
        t = level / 255
        kept = valid & (conf >= np.float32(t) - 1e-7) & (pred == k if k is not None else True)
        if kept.sum() == 0:
            continue
        precision = (pred[kept] == gt[kept]).mean()
        if precision >= target:
            positives = valid & (gt == k) if k is not None else valid
            return t, (pred[kept] == gt[kept]).sum() / positives.sum()
    return None, None


def test_thresholds_json_matches_brute_force(tmp_path, capsys):
    items = scene()
    labels, gt_dir = write_scene(tmp_path, items)
    code = audit_job.main(["--labels", str(labels), "--ground-truth", str(gt_dir),
                           "--report", str(tmp_path / "rep"), "--no-progress",
                           "--calibrate-precision", str(TARGET)])
    assert code == 0
    assert "calibrated thresholds (precision 0.8)" in capsys.readouterr().out
    doc = json.loads((tmp_path / "rep" / "thresholds.json").read_text())
    assert doc["target_precision"] == TARGET and doc["levels"] == 256
    for k, (name,) in enumerate(VOCAB):
        threshold, recall = brute_force(items, k, TARGET)
        entry = doc["classes"][name]
        assert entry["reached"] is True and entry["index"] == k
        assert entry["threshold"] == pytest.approx(threshold, abs=1e-6)
        assert entry["recall"] == pytest.approx(recall, abs=1e-6)
        assert entry["precision"] >= TARGET
    threshold, _ = brute_force(items, None, TARGET)
    assert doc["global"]["threshold"] == pytest.approx(threshold, abs=1e-6)
    # an export with this file keeps exactly the levels the brute force found
    levels = resolve_levels([n for (n,) in VOCAB], thresholds=doc)
    for k, (name,) in enumerate(VOCAB):
        assert levels[k] == round(brute_force(items, k, TARGET)[0] * 255)
        assert levels[k] == doc["classes"][name]["level"]
    assert (tmp_path / "rep" / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    assert "Calibrated ignore thresholds" in (tmp_path / "rep" / "report.md").read_text()
    assert "Calibrated ignore thresholds" in (tmp_path / "rep" / "report.html").read_text()


def test_unreachable_and_unjudged_classes():
    acc = CalibrationAccumulator([0, None], num_gt=2)
    gt = np.array([[0, 1, 1, IGNORED]])
    pred = np.array([[0, 0, 1, 0]])
    levels = np.array([[250, 250, 10, 0]], dtype=np.uint8)
    acc.add(gt, pred, levels)
    curves = acc.curves(0)
    assert curves["judged"] == 2  # the ignored pixel and the unmapped class are not judged
    assert acc.unjudged == 1
    assert curves["precision"][0] == 0.5 and lowest_level(curves["precision"], 0.9) is None
    assert acc.curves(1)["judged"] == 0


def test_calibration_needs_confidence(tmp_path):
    from support.audit_data import ok_row

    labels = tmp_path / "plain"
    write_labels_output(str(labels), {"s0": [ok_row("img0", np.zeros((4, 4), int), 3)]}, VOCAB)
    gt_dir = tmp_path / "gt"
    gt_dir.mkdir()
    (gt_dir / "classes.txt").write_text("cat\n")
    Image.fromarray(np.zeros((4, 4), np.uint8), mode="L").save(gt_dir / "img0.png")
    assert audit_job.main(["--labels", str(labels), "--ground-truth", str(gt_dir), "--report",
                           str(tmp_path / "rep"), "--no-progress",
                           "--calibrate-precision", "0.9"]) == 0
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert metrics["num_images"] == 1 and metrics["mIoU"] == 100.0  # still evaluated
    doc = json.loads((tmp_path / "rep" / "thresholds.json").read_text())
    assert doc["rows_without_confidence"] == 1
    assert doc["rows_without_confidence_examples"] == ["s0/img0"]
    assert doc["classes"]["cat"]["reached"] is None  # never judged

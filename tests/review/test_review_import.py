"""Corrections coming back: Label Studio exports read as audit ground truth (latest
annotation wins, bad exports are one-line errors), and each imported batch recorded in
reviewed.json before the next."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support.review import CLASSES, label_map, make_scene, one_line_error, run_review, scene_rows

from jobs.audit import main as audit_main
from pipeline.review.brush import encode_brush


# ---------------------------------------------------------------------- corrections back
def _export_task(image_id: str, labels: np.ndarray, names: list[str], **extra) -> dict:
    height, width = labels.shape
    result = [{"id": f"r{c}", "type": "brushlabels", "from_name": "label", "to_name": "image",
               "original_width": width, "original_height": height,
               "value": {"format": "rle", "rle": encode_brush(labels == c),
                         "brushlabels": [names[c]]}} for c in np.unique(labels)]
    annotation = {"id": 1, "result": result, "was_cancelled": False,
                  "updated_at": "2026-01-02T00:00:00Z"}
    return {"id": 7, "data": {"image": "data:image/png;base64,AAAA", "cass_image_id": image_id},
            "annotations": [annotation], **extra}


def test_label_studio_export_as_ground_truth(tmp_path):
    scene = make_scene(tmp_path)
    rows = {r["image_id"]: r for r in scene_rows(scene)}
    gt = label_map(0)
    gt[5:8, 6:10] = 2  # 12 pixels of "cat & dog" corrected to "sky <blue>"
    names = ["background", "cat & dog", "sky <blue>"]
    stale = _export_task("s0/img1.png", label_map(1), names)
    stale["annotations"][0].update(updated_at="2025-01-01T00:00:00Z", id=5)
    cancelled = dict(_export_task("s0/img1.png", np.zeros((12, 16), np.int64), names)
                     ["annotations"][0], was_cancelled=True, updated_at="2027-01-01T00:00:00Z")
    task1 = _export_task("s0/img1.png", label_map(1), names)
    task1["annotations"] += [stale["annotations"][0], cancelled]
    export = [_export_task("s0/img0.png", gt, names), task1,
              {"id": 9, "data": {"cass_image_id": "s0/img2.png"}, "annotations": []}]
    report = tmp_path / "report"
    assert _audit_export(scene, tmp_path, json.dumps(export), report) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["num_images"] == 2
    assert metrics["unmatched"]["predictions"] == len(rows) - 1 - 2  # minus failed, reviewed
    confusion = (report / "confusion_matrix.csv").read_text().splitlines()
    header = confusion[0].split(",")
    cells = {(line.split(",")[0], name): int(value) for line in confusion[1:]
             for name, value in zip(header[1:], line.split(",")[1:], strict=True)}
    off_diagonal = {k: v for k, v in cells.items() if k[0] != k[1] and v}
    assert off_diagonal == {("sky <blue>", "cat & dog"): 12}


def _audit_export(scene: dict, tmp_path: Path, export_text: str, report: Path) -> int:
    """The audit's exit status against a Label Studio export file holding ``export_text``."""
    path = tmp_path / "export.json"
    path.write_text(export_text)
    return audit_main(["--labels", scene["labels"], "--gt-format", "labelstudio",
                       "--ground-truth", str(path), "--report", str(report), "--no-progress"])


@pytest.mark.parametrize("content, message", [
    ('{"tasks": []}', "expected a JSON list of tasks"),
    ("[1]", "is not an object"),
    ('[{"id": 3, "annotations": [{"result": [{"type": "brushlabels", "original_width": 4, '
     '"original_height": 4, "value": {"rle": [1, 2], "brushlabels": ["cat & dog"]}}]}], '
     '"data": {"cass_image_id": "s0/img0.png"}}]', "shorter than its header"),
    ('[{"id": 3, "annotations": [{"result": [{"type": "brushlabels", "original_width": 99999, '
     '"original_height": 99999, "value": {"rle": [], "brushlabels": ["x"]}}]}], '
     '"data": {"cass_image_id": "s0/img0.png"}}]', "invalid image size"),
    ('[{"id": 3, "annotations": [{"result": [{"type": "brushlabels", "value": {}}]}]}]',
     "no brushlabels name"),
    ("[{", "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_bad_label_studio_exports_are_one_line_errors(tmp_path, capsys, content, message):
    scene = make_scene(tmp_path)
    assert _audit_export(scene, tmp_path, content, tmp_path / "r") == 2
    assert message in one_line_error(capsys, "audit: error: ")


def test_each_imported_batch_is_recorded_before_the_next(tmp_path, monkeypatch):
    """A failure in the second import request leaves the first batch in reviewed.json, so
    --exclude-reviewed does not send it again."""
    from pipeline.review import client as client_module
    from pipeline.review.tasks import labeling_config
    from schemas.labels import categories_from_classes

    scene = make_scene(tmp_path)
    posts = []

    def fake_json(self, method, path, **kwargs):
        if method == "GET" and path == "/api/projects":
            return {"results": []}
        if method == "GET":
            return {"id": 5, "title": "t",
                    "label_config": labeling_config(categories_from_classes(CLASSES))}
        posts.append(json.loads(kwargs["data"]))
        if len(posts) == 2:
            raise client_module.LabelStudioError("Label Studio POST failed: HTTP 500")
        return {"task_count": len(posts[-1])}

    monkeypatch.setattr(client_module.LabelStudioClient, "_json", fake_json)
    monkeypatch.setattr(client_module, "IMPORT_BATCH_BYTES", 1)  # one task per request
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "legacy-token")
    args = ("--top", "3", "--label-studio-url", "http://127.0.0.1:9", "--project", "5")
    assert run_review(scene, *args) == 2
    record = json.loads((Path(scene["out"]) / "reviewed.json").read_text())
    first = posts[0][0]["data"]["cass_image_id"]
    assert [b["image_ids"] for b in record["batches"]] == [[first]]
    assert record["batches"][0]["label_studio"]["project_id"] == 5
    posts.clear()
    assert run_review(scene, *args, "--exclude-reviewed") == 2
    assert posts[0][0]["data"]["cass_image_id"] != first


def test_duplicate_image_tasks_keep_the_latest_annotation(tmp_path, capsys):
    from pipeline.audit.gt_labelstudio import LabelStudioGroundTruth

    scene = make_scene(tmp_path)
    names = ["background", "cat & dog", "sky <blue>"]
    corrected = label_map(0)
    corrected[5:8, 6:10] = 2
    old = _export_task("s0/img0.png", label_map(0), names)
    old["annotations"][0]["updated_at"] = "2025-01-01T00:00:00Z"
    new = _export_task("s0/img0.png", corrected, names, id=8)
    export = [new, old]  # the latest one first: order must not matter
    gt = LabelStudioGroundTruth(export, "e")
    assert gt.duplicate_tasks == 1 and "1 duplicate" in gt.description
    assert np.array_equal(gt.load("s0/img0.png").label_map, corrected)
    report = tmp_path / "report"
    assert _audit_export(scene, tmp_path, json.dumps(export), report) == 0
    assert json.loads((report / "metrics.json").read_text())["num_images"] == 1

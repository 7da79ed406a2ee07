"""The review loop against the real thing: Label Studio's own brush converter and a live
Label Studio server (see tests/support/labelstudio.py): push tasks with predictions, correct one
annotation as a reviewer would, pull the export, audit, and see exactly the corrected pixels."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import requests
from support.labelstudio import ensure_venv, label_studio  # noqa: F401 - fixture
from support.review import make_scene, one_line_error, scene_rows

from jobs.audit import main as audit_main
from jobs.review import main as review_main
from pipeline.review.brush import decode_brush, encode_brush

_CONVERTER = """
import json, sys
import numpy as np
from label_studio_sdk.converter import brush
data = np.load(sys.argv[1])
ours = json.load(open(sys.argv[2]))
out = {"theirs": [], "theirs_decode_ours": [], "raw": [], "raw_alpha": []}
for name in sorted(k for k in data.files if k.startswith("mask")):
    mask = data[name]
    out["theirs"].append([int(v) for v in brush.mask2rle(mask.astype(np.uint8) * 255)])
    decoded = brush.decode_rle(ours[name]).reshape(mask.shape[0], mask.shape[1], 4)
    out["theirs_decode_ours"].append(decoded[:, :, 3].astype(bool).tolist())
rgba = data["rgba"]
out["raw"] = [int(v) for v in brush.encode_rle(rgba.ravel())]
json.dump(out, open(sys.argv[3], "w"))
"""


def _real_mask() -> np.ndarray:
    from skimage import data, filters

    coins = data.coins()
    return coins > filters.threshold_otsu(coins)  # the coins of a real photograph


def test_brush_rle_matches_label_studio_converter(tmp_path):
    venv, _ = ensure_venv()
    rng = np.random.default_rng(11)
    masks = {"mask0_real": _real_mask(), "mask1_ones": np.ones((180, 200), bool),
             "mask2_empty": np.zeros((7, 9), bool)}
    for i, (hw, p) in enumerate([((1, 1), 0.5), ((13, 17), 0.5), ((64, 48), 0.9),
                                 ((120, 90), 0.2)]):
        masks[f"mask{3 + i}_random"] = rng.random(hw) < p
    rgba = rng.integers(0, 3, size=(20, 30, 4)).astype(np.uint8) * 100  # literal blocks too
    np.savez(tmp_path / "masks.npz", rgba=rgba, **masks)
    (tmp_path / "ours.json").write_text(json.dumps({k: encode_brush(m)
                                                    for k, m in masks.items()}))
    (tmp_path / "check.py").write_text(_CONVERTER)
    subprocess.run([str(venv / "bin" / "python"), str(tmp_path / "check.py"),
                    str(tmp_path / "masks.npz"), str(tmp_path / "ours.json"),
                    str(tmp_path / "out.json")], check=True, timeout=300)
    out = json.loads((tmp_path / "out.json").read_text())
    for (name, mask), theirs, decoded in zip(sorted(masks.items()), out["theirs"],
                                             out["theirs_decode_ours"], strict=True):
        assert np.array_equal(decode_brush(theirs, *mask.shape), mask), name  # theirs -> ours
        assert np.array_equal(np.asarray(decoded, bool), mask), name  # ours -> theirs
    alpha = decode_brush(out["raw"], 20, 30)
    assert np.array_equal(alpha, rgba[:, :, 3] > 0)


def _api(server, method: str, path: str, **kwargs):
    response = requests.request(method, server.url + path, timeout=60,
                                headers={"Authorization": f"Token {server.token}"}, **kwargs)
    response.raise_for_status()
    return response.json()


def _confusion(report: Path) -> dict:
    lines = (report / "confusion_matrix.csv").read_text().splitlines()
    header = lines[0].split(",")
    return {(line.split(",")[0], name): int(value) for line in lines[1:]
            for name, value in zip(header[1:], line.split(",")[1:], strict=True)}


def test_push_correct_export_audit(tmp_path, label_studio, monkeypatch, capsys):  # noqa: F811
    scene = make_scene(tmp_path)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    assert review_main(["--labels", scene["labels"], "--top", "3", "--out", scene["out"],
                        "--label-studio-url", label_studio.url, "--project", "nightly"]) == 0
    assert "imported 3 tasks" in capsys.readouterr().out
    project = next(p for p in _api(label_studio, "GET", "/api/projects")["results"]
                   if p["title"] == "nightly")
    assert "cat &amp; dog" in project["label_config"]
    tasks = _api(label_studio, "GET", "/api/tasks",
                 params={"project": project["id"], "fields": "all"})["tasks"]
    assert len(tasks) == 3
    task = _api(label_studio, "GET", f"/api/tasks/{tasks[0]['id']}")
    rows = {r["image_id"]: r for r in scene_rows(scene)}
    row = rows[task["data"]["cass_image_id"]]
    result = task["predictions"][0]["result"]
    # the reviewer repaints a 3x4 block of "cat & dog" as "sky <blue>"
    height, width = int(row["height"]), int(row["width"])
    masks = {r["value"]["brushlabels"][0]: decode_brush(r["value"]["rle"], height, width)
             for r in result}
    block = np.zeros((height, width), bool)
    block[6:9, 10:14] = True
    assert masks["cat & dog"][block].all()
    masks["cat & dog"] &= ~block
    masks["sky <blue>"] |= block
    corrected = [dict(r, value=dict(r["value"], rle=encode_brush(masks[r["value"]
                                                                         ["brushlabels"][0]])))
                 for r in result]
    _api(label_studio, "POST", f"/api/tasks/{task['id']}/annotations",
         json={"result": corrected, "was_cancelled": False})
    # a second project run appends to the same project (reused by title)
    assert review_main(["--labels", scene["labels"], "--top", "2", "--out", scene["out"],
                        "--exclude-reviewed", "--label-studio-url", label_studio.url,
                        "--project", str(project["id"])]) == 0
    report = tmp_path / "report"
    assert audit_main(["--labels", scene["labels"], "--label-studio-url", label_studio.url,
                       "--project", "nightly", "--report", str(report), "--no-progress",
                       "--fail-under", "50"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["num_images"] == 1
    assert metrics["unmatched"]["predictions"] == len(rows) - 2  # the failed row and this one
    off_diagonal = {k: v for k, v in _confusion(report).items() if k[0] != k[1] and v}
    assert off_diagonal == {("sky <blue>", "cat & dog"): 12}
    assert len(_api(label_studio, "GET", "/api/tasks",
                    params={"project": project["id"]})["tasks"]) == 5


def test_bad_server_input_is_one_line(tmp_path, label_studio, monkeypatch, capsys):  # noqa: F811
    scene = make_scene(tmp_path)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    args = ["--labels", scene["labels"], "--top", "2", "--out", scene["out"],
            "--label-studio-url", label_studio.url]
    assert review_main([*args, "--project", "987654"]) == 2
    assert "no Label Studio project '987654'" in one_line_error(capsys, "review: error: ")
    audit = ["--labels", scene["labels"], "--label-studio-url", label_studio.url,
             "--report", str(tmp_path / "r"), "--no-progress"]
    assert audit_main([*audit, "--project", "no such project"]) == 2
    assert "no Label Studio project" in one_line_error(capsys, "audit: error: ")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "wrong-token-0123456789")
    assert review_main([*args, "--project", "x"]) == 2
    err = one_line_error(capsys, "review: error: ")
    assert "rejected the API token (HTTP 401)" in err and "wrong-token" not in err
    assert audit_main([*audit, "--project", "1"]) == 2
    assert "rejected the API token" in one_line_error(capsys, "audit: error: ")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    other = _api(label_studio, "POST", "/api/projects", json={
        "title": "boxes", "label_config": '<View><Image name="image" value="$image"/>'
        '<BrushLabels name="label" toName="image"><Label value="background"/></BrushLabels>'
        '</View>'})
    assert review_main([*args, "--project", str(other["id"])]) == 2
    err = one_line_error(capsys, "review: error: ")
    assert "has no brush label for 'cat & dog', 'sky <blue>'" in err
    assert not (Path(scene["out"]) / "reviewed.json").exists()  # nothing was sent


def test_personal_access_token(tmp_path, label_studio, monkeypatch, capsys):  # noqa: F811
    """A personal access token (a JWT refresh token) is exchanged for an access token."""
    created = _api(label_studio, "POST", "/api/token/")
    token = created.get("token") or created.get("refresh")
    assert token and token.count(".") == 2
    scene = make_scene(tmp_path)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", token)
    assert review_main(["--labels", scene["labels"], "--top", "1", "--out", scene["out"],
                        "--label-studio-url", label_studio.url, "--project", "pat"]) == 0
    assert "imported 1 tasks" in capsys.readouterr().out

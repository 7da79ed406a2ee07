"""Exports (png, hf, coco) loaded by their consumers, categories.json, provenance, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.contract import label_in_process
from support.images import encode, exif_rotated_jpeg, photo, tar_bytes, write_vocabulary

from cass_engine import CassConfig
from jobs import audit as audit_job
from jobs import export as export_job
from jobs import export_coco
from pipeline.config import ComputeConfig, EngineSpec, IOConfig, JobConfig
from pipeline.decode import decode_image
from pipeline.exports import ExportError, safe_relative_path
from pipeline.stub import StubOptions, stub_confidence, stub_labels
from schemas.confidence import level_of, quantize

CLASSES = ["sky, clouds", "tree", "person, man", "road", "building"]
from support import REPO  # noqa: E402


def source_images() -> dict[str, dict[str, bytes]]:
    """Two tar shards; one member is corrupt, one sits in a sub-folder, one is EXIF-rotated."""
    return {
        "a.tar": {"img0.png": encode(photo("astronaut", 48)),
                  "sub/img1.jpg": encode(photo("coffee", 40), "JPEG"),
                  "rotated.jpg": exif_rotated_jpeg(photo("chelsea", 40)),
                  "corrupt.jpg": b"\xff\xd8\xff" + bytes(range(256))},
        "b.tar": {"img2.png": encode(photo("rocket", 44)),
                  "img3.png": encode(photo("camera", 36)),
                  "img4.png": encode(photo("coins", 30))},
    }


def label(root: Path, confidence: bool = True) -> Path:
    """Label the sources with the stub engine (seeded 'random weights' recorded)."""
    (root / "in").mkdir(parents=True)
    for name, members in source_images().items():
        (root / "in" / name).write_bytes(tar_bytes(members))
    vocab = write_vocabulary(root / "vocab.txt", CLASSES)
    engine = EngineSpec(CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab)),
                        random_weights=0, stub=StubOptions())
    io_cfg = IOConfig(str(root / "in"), str(root / "out"), confidence=confidence)
    label_in_process(JobConfig(io_cfg, ComputeConfig(batch_size=2), engine), release=False)
    return root / "out"


def expected_maps() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``key -> (rgb, labels, confidence)`` as the stub engine labels the ok images."""
    out = {}
    for members in source_images().values():
        for name, data in members.items():
            decoded = decode_image(data, 1 << 26)
            if decoded.status == "ok":
                key = name.rsplit(".", 1)[0]
                out[key] = (decoded.rgb, stub_labels(decoded.rgb, 5),
                            stub_confidence(decoded.rgb, 5))
    return out


def image_id(key: str) -> str:
    """The ``image_id`` (``<shard_id>/<key>``) of a key of :func:`source_images`: the name of
    its ``png`` export file."""
    return ("a/" if key in ("img0", "sub/img1", "rotated") else "b/") + key


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    return label(tmp_path_factory.mktemp("labelled"))


def export(labels: Path | str, fmt: str, out: Path | str, *extra: str) -> int:
    return export_job.main(["--labels", str(labels), "--format", fmt, "--out", str(out),
                            "--no-progress", *extra])


def audit(labels: Path, gt: Path, report: Path, *extra: str) -> dict:
    code = audit_job.main(["--labels", str(labels), "--ground-truth", str(gt), "--gt-format",
                           "masks", "--report", str(report), "--no-progress", *extra])
    assert code == 0
    return json.loads((report / "metrics.json").read_text())


def test_job_writes_categories_next_to_the_labels(labelled):
    doc = json.loads((labelled / "categories.json").read_text())
    assert doc["id2label"] == {"0": "sky", "1": "tree", "2": "person", "3": "road",
                               "4": "building"}
    assert doc["categories"][2] == {"index": 2, "id": 3, "name": "person",
                                    "synonyms": ["person", "man"]}
    assert doc["random_weights"] == 0


def test_png_export_is_perfect_ground_truth_for_the_same_labels(labelled, tmp_path, capsys):
    out = tmp_path / "png"
    assert export(labelled, "png", out) == 0
    assert "error rows 1" in capsys.readouterr().out
    expected = expected_maps()
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert files == sorted(f"{image_id(k)}.png" for k in expected)
    for key, (_, labels, _) in expected.items():
        with Image.open(out / f"{image_id(key)}.png") as image:
            assert image.mode == "L"
            np.testing.assert_array_equal(np.asarray(image), labels)
    assert (out / "classes.txt").read_text().splitlines() == CLASSES
    assert json.loads((out / "id2label.json").read_text())["4"] == "building"
    summary = json.loads((out / "export.json").read_text())
    assert summary["written"] == len(expected) and summary["error_rows"] == 1
    assert summary["error_row_list"][0][0] == "a/corrupt"
    assert summary["provenance"]["random_weights"] == 0
    metrics = audit(labelled, out, tmp_path / "report")
    assert metrics["mIoU"] == 100.0 and metrics["aAcc"] == 100.0
    assert metrics["num_images"] == len(expected) and metrics["pixels"]["ignored"] == 0
    assert metrics["sources"]["random_weights"] == 0
    assert "Random weights" in (tmp_path / "report" / "report.md").read_text()


def test_png_export_ignores_exactly_the_pixels_below_the_threshold(labelled, tmp_path):
    out = tmp_path / "png"
    assert export(labelled, "png", out, "--ignore-below", "0.75") == 0
    ignored = 0
    for key, (_, labels, conf) in expected_maps().items():
        below = quantize(conf) < level_of(0.75)
        got = np.asarray(Image.open(out / f"{image_id(key)}.png"))
        np.testing.assert_array_equal(got == 255, below)
        np.testing.assert_array_equal(got[~below], labels[~below])
        ignored += int(below.sum())
    assert 0 < ignored
    metrics = audit(labelled, out, tmp_path / "report")
    assert metrics["mIoU"] == 100.0 and metrics["pixels"]["ignored"] == ignored


def test_png_export_with_a_thresholds_file(labelled, tmp_path):
    doc = {"global": {"threshold": 0.6, "reached": True},
           "classes": {"sky": {"threshold": 0.9, "reached": True},
                       "tree": {"threshold": None, "reached": False}}}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    out = tmp_path / "png"
    assert export(labelled, "png", out, "--thresholds", str(tmp_path / "t.json")) == 0
    for key, (_, labels, conf) in expected_maps().items():
        level = quantize(conf)
        keep = np.where(labels == 0, level >= level_of(0.9),
                        np.where(labels == 1, False, level >= level_of(0.6)))
        got = np.asarray(Image.open(out / f"{image_id(key)}.png"))
        np.testing.assert_array_equal(got != 255, keep)


def test_hf_export_loads_with_datasets_and_matches_the_png_export(labelled, tmp_path):
    import datasets
    assert export(labelled, "hf", tmp_path / "hf", "--ignore-below", "0.7") == 0
    assert export(labelled, "png", tmp_path / "png", "--ignore-below", "0.7") == 0
    loaded = datasets.load_dataset(str(tmp_path / "hf"), cache_dir=str(tmp_path / "cache"))
    rows = list(loaded["train"])
    expected = expected_maps()
    assert sorted(r["image_id"] for r in rows) == sorted(image_id(k) for k in expected)
    for row in rows:
        key = row["image_id"].split("/", 1)[1]
        png = np.asarray(Image.open(tmp_path / "png" / f"{row['image_id']}.png"))
        np.testing.assert_array_equal(np.asarray(row["label"]), png)
        np.testing.assert_array_equal(np.asarray(row["confidence"]),
                                      quantize(expected[key][2]))
        rgb = np.asarray(row["image"].convert("RGB"))
        if key == "sub/img1":  # the JPEG's own bytes are kept
            assert rgb.shape == expected[key][0].shape
        else:
            np.testing.assert_array_equal(rgb, expected[key][0])
    id2label = json.loads((tmp_path / "hf" / "id2label.json").read_text())
    assert id2label["2"] == "person"


def test_coco_export_and_the_export_coco_alias_record_random_weights(labelled, tmp_path):
    from pycocotools.coco import COCO

    assert export(labelled, "coco", tmp_path / "coco") == 0
    assert export_coco.main(["--labels", str(labelled), "--out", str(tmp_path / "c.json")]) == 0
    first = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    assert first == json.loads((tmp_path / "c.json").read_text())
    assert first["info"]["random_weights"] == 0
    assert [c["name"] for c in first["categories"]][:2] == ["sky", "tree"]
    assert len(COCO(str(tmp_path / "c.json")).getImgIds()) == len(expected_maps())
    summary = json.loads((tmp_path / "coco" / "export.json").read_text())
    assert summary["error_rows"] == 1


def test_bad_input_is_one_line_and_exit_2(labelled, tmp_path, capsys):
    assert export(tmp_path / "nothing", "png", tmp_path / "o1") == 2
    assert export(labelled, "png", labelled) == 2  # not empty
    assert export(labelled, "coco", tmp_path / "o2", "--ignore-below", "0.5") == 2
    assert export(labelled, "png", tmp_path / "o3", "--ignore-below", "1.5") == 2
    (tmp_path / "bad.json").write_text("{")
    assert export(labelled, "png", tmp_path / "o4", "--thresholds",
                  str(tmp_path / "bad.json")) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 5 and all(line.startswith("export.py: error:") for line in lines)


def test_thresholds_on_labels_without_confidence_list_every_row(tmp_path):
    labels = label(tmp_path / "plain", confidence=False)
    out = tmp_path / "png"
    assert export(labels, "png", out, "--ignore-below", "0.5") == 0
    summary = json.loads((out / "export.json").read_text())
    assert summary["written"] == 0 and summary["skipped"] == len(expected_maps())
    assert "no confidence" in summary["skipped_list"][0][1]


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a/../../b", "a//b", "C:/x", "", "."])
def test_unsafe_keys_never_become_paths(key):
    with pytest.raises(ExportError, match="unsafe key"):
        safe_relative_path(key)


def test_safe_keys_keep_their_folders():
    assert safe_relative_path("sub/dir/img") == "sub/dir/img"
    assert safe_relative_path("sub\\img") == "sub/img"


def test_export_runs_as_a_script(labelled, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "export.py"), "--labels",
                           str(labelled), "--format", "png", "--out", str(tmp_path / "p")],
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "wrote 6 images (png)" in done.stdout
    assert "export png: rows" in done.stderr  # progress


def test_label_job_stores_confidence_only_when_asked(tmp_path, vocab_file):
    from jobs.label import build_parser, job_from_args

    base = ["--vocab", str(vocab_file), "--input", str(tmp_path / "in"),
            "--output", str(tmp_path / "o")]
    assert job_from_args(build_parser().parse_args(base)).io.confidence is False
    job = job_from_args(build_parser().parse_args([*base, "--confidence"]))
    assert job.io.confidence is True and job.io.public_dict()["confidence"] is True


def test_exports_and_reader_work_on_object_storage(labelled, tmp_path):
    import fsspec

    from pipeline.dataset import LabelDataset

    mem = fsspec.filesystem("memory")
    for path in labelled.rglob("*"):
        if path.is_file():
            mem.pipe(f"/i10-labels/{path.relative_to(labelled)}", path.read_bytes())
    assert export("memory://i10-labels", "png", "memory://i10-png") == 0
    for key, (_, labels, _) in expected_maps().items():
        with mem.open(f"/i10-png/{image_id(key)}.png", "rb") as f:
            np.testing.assert_array_equal(np.asarray(Image.open(f)), labels)
    assert export("memory://i10-labels", "hf", "memory://i10-hf") == 0
    assert len(mem.glob("/i10-hf/data/*.parquet")) == 2
    assert len(list(LabelDataset("memory://i10-labels"))) == len(expected_maps())


def test_rows_whose_source_is_gone_are_listed_not_dropped(tmp_path):
    labels = label(tmp_path / "gone")
    (tmp_path / "gone" / "in" / "b.tar").unlink()
    out = tmp_path / "hf"
    assert export(labels, "hf", out) == 0
    summary = json.loads((out / "export.json").read_text())
    assert summary["written"] == 3 and summary["error_rows"] == 1
    skipped = dict(summary["skipped_list"])
    assert sorted(skipped) == ["b/img2", "b/img3", "b/img4"]
    assert all("source unreadable" in reason for reason in skipped.values())


def test_keys_repeating_across_shards_get_one_file_each_and_audit_perfectly(tmp_path):
    """Parquet inputs without --id-column have keys 00000000... in every shard: the export
    names files by image id, and the audit of the export matches every row to its own file."""
    from support.audit_data import ok_row, write_labels_output

    maps = {f"s{s}": [np.full((4, 5), (s + k) % 2, int) for k in range(2)] for s in range(3)}
    for shard, arrays in maps.items():
        arrays[0][0, : int(shard[1]) + 1] = 1 - arrays[0][0, 0]  # every image differs
    write_labels_output(str(tmp_path / "labels"), {
        shard: [ok_row(f"{k:08d}", a, 2, shard_id=shard) for k, a in enumerate(arrays)]
        for shard, arrays in maps.items()}, [["a"], ["b"]])
    assert export(tmp_path / "labels", "png", tmp_path / "png") == 0
    summary = json.loads((tmp_path / "png" / "export.json").read_text())
    assert summary["written"] == 6 and summary["skipped"] == 0
    for shard, arrays in maps.items():
        for k, array in enumerate(arrays):
            got = np.asarray(Image.open(tmp_path / "png" / shard / f"{k:08d}.png"))
            np.testing.assert_array_equal(got, array)
    metrics = audit(tmp_path / "labels", tmp_path / "png", tmp_path / "report")
    assert metrics["num_images"] == 6 and metrics["mIoU"] == 100.0
    assert metrics["unmatched"]["ground_truth"] == 0 and metrics["unmatched"]["predictions"] == 0


def test_unsafe_and_unwritable_names_are_listed_and_the_export_completes(tmp_path):
    from support.audit_data import ok_row, write_labels_output

    long_key = "k" * 300  # ENAMETOOLONG on every common filesystem
    write_labels_output(str(tmp_path / "labels"), {
        "s0": [ok_row("x", np.zeros((4, 5), int), 2, shard_id="s0"),
               ok_row(long_key, np.zeros((4, 5), int), 2, shard_id="s0")],
        "s1": [ok_row("x", np.ones((4, 5), int), 2, shard_id="s1"),
               ok_row("../../evil", np.ones((4, 5), int), 2, shard_id="s1")]}, [["a"], ["b"]])
    assert export(tmp_path / "labels", "png", tmp_path / "png") == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "png" / "s0" / "x.png")), 0)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "png" / "s1" / "x.png")), 1)
    summary = json.loads((tmp_path / "png" / "export.json").read_text())
    assert summary["written"] == 2
    reasons = dict(summary["skipped_list"])
    assert "unsafe key" in reasons["s1/../../evil"]
    assert "cannot write" in reasons[f"s0/{long_key}"]
    assert not (tmp_path / "evil.png").exists()


def test_derived_files_carry_public_uris_only(labelled, tmp_path):
    import fsspec

    labels = "memory://reader:SECRET1@i10-creds/out?token=SECRET2"
    mem, root = fsspec.core.url_to_fs(labels)
    for path in labelled.rglob("*"):
        if path.is_file():
            mem.pipe(f"{root}/{path.relative_to(labelled)}", path.read_bytes())
    for fmt in ("png", "hf", "coco"):
        out = tmp_path / fmt
        assert export(labels, fmt, out) == 0
        summary = json.loads((out / "export.json").read_text())
        assert summary["provenance"]["labels"] == "memory://***@i10-creds/out"
        for path in out.rglob("*"):
            if path.is_file():
                assert b"SECRET" not in path.read_bytes(), path
    thresholds = "memory://i10-creds/t.json?sig=SECRET3"
    mem.pipe(fsspec.core.url_to_fs(thresholds)[1], json.dumps(
        {"classes": {}, "global": {"threshold": 0.5, "reached": True}}).encode())
    out = "memory://writer:SECRET4@i10-creds/png2?sig=SECRET5"
    assert export(labels, "png", out, "--thresholds", thresholds) == 0
    assert b"SECRET" not in mem.cat(f"{fsspec.core.url_to_fs(out)[1]}/export.json")

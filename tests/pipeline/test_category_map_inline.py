"""``jobs/audit.py --category-map`` takes inline JSON as well as a file (path or URL), like
``--storage-options``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.contract import label_in_process
from support.images import encode, photos, write_vocabulary

from cass_engine import CassConfig
from jobs.audit import main as audit_main
from pipeline.config import ComputeConfig, EngineSpec, IOConfig, JobConfig, is_inline_json
from pipeline.stub import StubOptions

CLASSES = ["sky, clouds", "tree", "road"]


@pytest.fixture(scope="module")
def labels(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small labels output of the stub engine (in-process worker, no Ray)."""
    root = tmp_path_factory.mktemp("labelled")
    (root / "in").mkdir(parents=True)
    for i, array in enumerate(photos(2, 32)):
        (root / "in" / f"im{i}.png").write_bytes(encode(array))
    vocab = write_vocabulary(root / "vocab.txt", CLASSES)
    engine = EngineSpec(CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab)),
                        stub=StubOptions())
    label_in_process(JobConfig(IOConfig(str(root / "in"), str(root / "out")),
                               ComputeConfig(batch_size=2), engine))
    return str(root / "out")


def _audit(labels: str, report: Path, category_map: str) -> dict:
    code = audit_main(["--labels", labels, "--ground-truth", labels, "--gt-format", "parquet",
                       "--report", str(report), "--no-progress", "--category-map",
                       category_map])
    assert code == 0
    return json.loads((report / "metrics.json").read_text())["mapping"]


def test_inline_json_category_map_maps_like_the_same_file(labels, tmp_path):
    mapping = {"tree": None, "road": "road"}
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    from_file = _audit(labels, tmp_path / "r1", str(tmp_path / "map.json"))
    inline = _audit(labels, tmp_path / "r2", json.dumps(mapping))
    assert inline == from_file
    assert "tree" in inline["unmapped_classes"]


def test_bad_inline_category_map_is_a_one_line_error(labels, tmp_path, capsys):
    code = audit_main(["--labels", labels, "--ground-truth", labels, "--gt-format", "parquet",
                       "--report", str(tmp_path / "r"), "--no-progress",
                       "--category-map", '{"tree": '])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "inline JSON" in err and "not valid JSON" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("text, inline", [
    ('{"a": 1}', True), ('  {"a": 1}', True), ("map.json", False), ("s3://b/map.json", False),
    ("@map.json", False),
])
def test_is_inline_json(text, inline):
    assert is_inline_json(text) is inline

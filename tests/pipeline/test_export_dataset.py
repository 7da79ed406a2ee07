"""The dataset reader: samples, sharding over workers x ranks, error rows, empty outputs."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import REPO  # noqa: E402
from support.contract import label_in_process
from support.images import encode, photo, write_vocabulary
from test_export import expected_maps, label

from cass_engine import CassConfig
from pipeline import dataset as dataset_module
from pipeline.config import ComputeConfig, EngineSpec, IOConfig, JobConfig
from pipeline.dataset import LabelDataset
from pipeline.stub import StubOptions, stub_labels
from schemas.confidence import MAX_QUANTISATION_ERROR, level_of, quantize


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    return label(tmp_path_factory.mktemp("dataset"))


def ids(ds: LabelDataset) -> list[str]:
    return [sample[3] for sample in ds]


def test_samples_are_image_label_confidence(labelled):
    ds = LabelDataset(str(labelled), ignore_below=0.7, with_ids=True)
    expected = expected_maps()
    seen = 0
    for image, label_map, confidence, image_id in ds:
        rgb, labels, conf = expected[image_id.split("/", 1)[1]]
        assert image.dtype == np.uint8 and image.shape == rgb.shape
        np.testing.assert_array_equal(image, rgb)
        assert label_map.dtype == np.uint8 and confidence.dtype == np.float32
        below = quantize(conf) < level_of(0.7)
        np.testing.assert_array_equal(label_map == 255, below)
        np.testing.assert_array_equal(label_map[~below], labels[~below])
        assert np.abs(confidence - conf).max() <= MAX_QUANTISATION_ERROR + 1e-6
        seen += 1
    assert seen == len(expected)
    assert ds.skipped == [("a/corrupt", ds.skipped[0][1])]
    assert len(list(ds)) == len(expected) and len(ds.skipped) == 1  # per epoch
    assert ds.id2label[4] == "building"


@pytest.mark.parametrize("workers, ranks", [(2, 2), (1, 2), (3, 1)])
def test_every_row_once_across_workers_and_ranks(labelled, monkeypatch, workers, ranks):
    got: Counter = Counter()
    for rank in range(ranks):
        for worker in range(workers):
            monkeypatch.setattr(dataset_module, "_worker", lambda w=worker: (w, workers))
            got.update(ids(LabelDataset(str(labelled), rank=rank, world_size=ranks,
                                        with_ids=True)))
    assert len(got) == len(expected_maps()) and set(got.values()) == {1}


def test_torch_dataloader_workers_on_two_ranks_read_every_row_once(labelled):
    import torch

    class Ids(torch.utils.data.IterableDataset):
        def __init__(self, rank: int) -> None:
            self.ds = LabelDataset(str(labelled), rank=rank, world_size=2, with_ids=True)

        def __iter__(self):
            return (sample[3] for sample in self.ds)

    got: Counter = Counter()
    for rank in range(2):
        loader = torch.utils.data.DataLoader(Ids(rank), batch_size=None, num_workers=2)
        got.update(list(loader))
    assert len(got) == len(expected_maps()) and set(got.values()) == {1}


def test_empty_output_yields_nothing(tmp_path):
    (tmp_path / "labels").mkdir()
    ds = LabelDataset(str(tmp_path))
    assert list(ds) == [] and ds.class_names == []


def test_without_confidence_it_is_nan_and_thresholds_raise(tmp_path):
    labels = label(tmp_path / "plain", confidence=False)
    samples = list(LabelDataset(str(labels)))
    assert len(samples) == len(expected_maps())
    assert all(np.isnan(conf).all() for _, _, conf in samples)
    doc = {"classes": {}, "global": {"threshold": 0.5, "reached": True}}
    for asked in ({"ignore_below": 0.5}, {"thresholds": doc}):
        with pytest.raises(ValueError, match="no stored confidence"):
            LabelDataset(str(labels), **asked)


def test_thresholds_on_a_schema_1_0_output_without_run_record_raise(tmp_path):
    from support.audit_data import ok_row, write_labels_output

    root = tmp_path / "old"
    write_labels_output(str(root), {"s0": [ok_row("x", np.zeros((2, 2), int), 2)]},
                        [["a"], ["b"]])
    (root / "run.json").unlink()
    path = next((root / "labels").glob("*.parquet"))
    table = pq.read_table(path)
    pq.write_table(table.drop(["confidence"]).replace_schema_metadata(table.schema.metadata),
                   path)
    assert len(list(LabelDataset(str(root)))) == 0  # its source is gone: skipped, no error
    with pytest.raises(ValueError, match="no stored confidence"):
        LabelDataset(str(root), ignore_below=0.5)


def test_parquet_shards_are_joined_by_their_id_column(tmp_path):
    images = {f"id-{i}": photo(name, 40) for i, name in enumerate(["astronaut", "coffee"])}
    (tmp_path / "in").mkdir()
    table = pa.table({"image": [encode(v) for v in images.values()], "name": list(images)})
    pq.write_table(table, tmp_path / "in" / "part.parquet")
    vocab = write_vocabulary(tmp_path / "vocab.txt", ["a", "b", "c"])
    engine = EngineSpec(CassConfig.from_preset("voc21", vocabulary_path=str(vocab)),
                        stub=StubOptions())
    io_cfg = IOConfig(str(tmp_path / "in"), str(tmp_path / "out"), id_column="name",
                      confidence=True)
    label_in_process(JobConfig(io_cfg, ComputeConfig(batch_size=2), engine), release=False)
    got = {i: (image, lab) for image, lab, _, i in LabelDataset(str(tmp_path / "out"),
                                                                with_ids=True)}
    assert sorted(got) == ["part/id-0", "part/id-1"]
    for key, rgb in images.items():
        image, lab = got[f"part/{key}"]
        np.testing.assert_array_equal(image, rgb)
        np.testing.assert_array_equal(lab, stub_labels(rgb, 3))


def test_readme_training_example_runs(labelled):
    readme = (REPO / "README.md").read_text()
    code = re.search(r"<!-- training-example -->\n```python\n(.*?)```", readme, re.S).group(1)
    assert len(code.splitlines()) <= 30
    namespace: dict = {}
    exec(compile(code.replace('"out/demo"', repr(str(labelled))), "README", "exec"), namespace)
    assert np.isfinite(namespace["loss"].item())


def test_the_reader_imports_neither_torch_nor_ray():
    import subprocess
    import sys

    code = ("import sys, pipeline.dataset, schemas.confidence; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_thresholds_file_uri(labelled, tmp_path):
    import json

    doc = {"global": {"threshold": 0.8, "reached": True}, "classes": {}}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    by_file = list(LabelDataset(str(labelled), thresholds=str(tmp_path / "t.json")))
    by_value = list(LabelDataset(str(labelled), ignore_below=0.8))
    assert len(by_file) == len(by_value) > 0
    for (_, a, _), (_, b, _) in zip(by_file, by_value, strict=True):
        np.testing.assert_array_equal(a, b)

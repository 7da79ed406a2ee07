"""The vocabulary is parsed once, on the driver, and travels to the workers with its hash.

Workers never open the vocabulary path: a file edited or deleted after the driver parsed it
(or present only on the head node) changes nothing, and a worker refuses a vocabulary or text
embeddings whose hash is not the one the driver recorded.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
from support.images import encode, photos, write_vocabulary

from cass_engine import CassConfig, Vocabulary, load_vocabulary
from pipeline.config import ComputeConfig, EngineSpec, IOConfig, JobConfig
from pipeline.decode import decode_image
from pipeline.plan import plan_job
from pipeline.runner import execute_plan
from pipeline.stub import StubOptions, stub_labels
from pipeline.worker import LabelWorker, WorkerSpec
from schemas import annotations_to_label_map
from schemas.io import iter_label_rows, read_run_record

CLASSES = ["sky, clouds", "tree", "person, man", "road", "building"]
EDITED = ["cat", "dog", "grass"]


def _inputs(tmp_path: Path, count: int = 3) -> dict[str, bytes]:
    (tmp_path / "in").mkdir()
    images = {}
    for i, array in enumerate(photos(count, 40)):
        images[f"im{i}.png"] = encode(array)
        (tmp_path / "in" / f"im{i}.png").write_bytes(images[f"im{i}.png"])
    return images


def _job(tmp_path: Path, vocab: Path, **compute: object) -> JobConfig:
    config = CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab))
    io_cfg = IOConfig(str(tmp_path / "in"), str(tmp_path / "out"), images_per_shard=2)
    compute_cfg = ComputeConfig(**{"batch_size": 2, "progress_interval_s": 0.5, "actors": 1,
                                   **compute})
    return JobConfig(io_cfg, compute_cfg, EngineSpec(config, stub=StubOptions()))


def _assert_labelled_with(out: Path, images: dict[str, bytes], num_classes: int) -> None:
    rows = list(iter_label_rows(str(out)))
    assert sorted(r["key"] for r in rows) == sorted(images)
    for row in rows:
        assert row["status"] == "ok", row["error"]
        assert len(row["presence"]) == num_classes
        expected = stub_labels(decode_image(images[row["key"]], 10**8).rgb, num_classes)
        got = annotations_to_label_map(row["annotations"], row["height"], row["width"])
        np.testing.assert_array_equal(got, expected)


def test_vocabulary_edited_after_planning_labels_with_the_drivers_classes(ray_cpus, tmp_path):
    images = _inputs(tmp_path)
    vocab = write_vocabulary(tmp_path / "vocab.txt", CLASSES)
    driver_hash = load_vocabulary(vocab).content_hash()
    plan = plan_job(_job(tmp_path, vocab))
    write_vocabulary(vocab, EDITED)  # edited between the driver's parse and the workers
    summary = execute_plan(plan, emit=lambda _: None)
    assert summary.status == "complete", summary.record.get("error")
    _assert_labelled_with(tmp_path / "out", images, len(CLASSES))
    record = read_run_record(str(tmp_path / "out"))
    assert record["vocabulary_hash"] == driver_hash
    assert [c["name"] for c in record["categories"]] == ["sky", "tree", "person", "road",
                                                         "building"]


def test_vocabulary_missing_on_the_workers_still_labels(ray_cpus, tmp_path):
    images = _inputs(tmp_path, 2)
    vocab = write_vocabulary(tmp_path / "vocab.txt", CLASSES)
    plan = plan_job(_job(tmp_path, vocab))
    vocab.unlink()  # the path exists only where the driver ran
    summary = execute_plan(plan, emit=lambda _: None)
    assert summary.status == "complete", summary.record.get("error")
    _assert_labelled_with(tmp_path / "out", images, len(CLASSES))


def test_engine_spec_carries_the_parsed_vocabulary_and_its_hash(tmp_path):
    vocab = write_vocabulary(tmp_path / "vocab.txt", CLASSES)
    spec = EngineSpec(CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab)))
    parsed = load_vocabulary(vocab)
    assert spec.vocabulary.classes == parsed.classes
    assert spec.vocabulary_hash == parsed.content_hash()
    vocab.unlink()
    shipped = pickle.loads(pickle.dumps(spec))  # what a worker receives: no file needed
    assert shipped.vocabulary == spec.vocabulary
    assert shipped.vocabulary_hash == spec.vocabulary_hash
    other = write_vocabulary(tmp_path / "other.txt", EDITED)
    replaced = dataclasses.replace(spec, config=CassConfig.from_preset(
        "coco_stuff", vocabulary_path=str(other)))  # a new config: its own vocabulary
    assert replaced.vocabulary.classes == load_vocabulary(other).classes


def test_unreadable_vocabulary_is_a_config_error(tmp_path):
    from pipeline.config import ConfigError

    config = CassConfig.from_preset("coco_stuff", vocabulary_path=str(tmp_path / "nope.txt"))
    with pytest.raises(ConfigError, match="vocabulary.*not found"):
        EngineSpec(config)


def _worker(tmp_path: Path, spec: EngineSpec) -> LabelWorker:
    io_cfg = IOConfig(str(tmp_path / "in"), str(tmp_path / "out"))
    return LabelWorker(WorkerSpec(spec, io_cfg, ComputeConfig(batch_size=2), "fp"))


def test_worker_uses_the_shipped_vocabulary_not_the_file(tmp_path):
    _inputs(tmp_path, 1)
    vocab = write_vocabulary(tmp_path / "vocab.txt", CLASSES)
    spec = EngineSpec(CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab)),
                      stub=StubOptions())
    write_vocabulary(vocab, EDITED)
    worker = _worker(tmp_path, pickle.loads(pickle.dumps(spec)))
    embeddings = worker.compute_text_embeddings()
    assert worker.engine.vocabulary.classes == spec.vocabulary.classes
    assert embeddings.vocabulary.content_hash() == spec.vocabulary_hash


def test_stub_worker_labels_without_the_file_even_before_set_vocabulary(tmp_path):
    images = _inputs(tmp_path, 2)
    vocab = write_vocabulary(tmp_path / "vocab.txt", CLASSES)
    job = _job(tmp_path, vocab)
    plan = plan_job(job)
    vocab.unlink()
    worker = LabelWorker(WorkerSpec(job.engine, job.io, job.compute, plan.fingerprint,
                                    plan.file_metadata({})))
    for shard in plan.todo:  # no compute_text_embeddings/prepare: the stub's lazy default
        worker.process_shard(shard)
    plan.release()
    _assert_labelled_with(tmp_path / "out", images, len(CLASSES))


def test_worker_refuses_a_vocabulary_that_does_not_match_its_hash(tmp_path):
    _inputs(tmp_path, 1)
    vocab = write_vocabulary(tmp_path / "vocab.txt", CLASSES)
    spec = EngineSpec(CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab)),
                      stub=StubOptions())
    tampered = pickle.loads(pickle.dumps(spec))
    object.__setattr__(tampered, "vocabulary", Vocabulary((("cat",), ("dog",))))
    worker = _worker(tmp_path, tampered)
    with pytest.raises(RuntimeError, match="vocabulary hash"):
        worker.compute_text_embeddings()


def test_worker_refuses_text_embeddings_of_another_vocabulary(tmp_path):
    _inputs(tmp_path, 1)
    first = write_vocabulary(tmp_path / "vocab.txt", CLASSES)
    second = write_vocabulary(tmp_path / "other.txt", EDITED)
    spec = EngineSpec(CassConfig.from_preset("coco_stuff", vocabulary_path=str(first)),
                      stub=StubOptions())
    other = dataclasses.replace(spec, config=CassConfig.from_preset(
        "coco_stuff", vocabulary_path=str(second)))
    embeddings = _worker(tmp_path, other).compute_text_embeddings(as_bytes=True)
    worker = _worker(tmp_path, spec)
    with pytest.raises(RuntimeError, match="vocabulary hash"):
        worker.prepare(embeddings)
    assert worker.prepare(_worker(tmp_path, spec).compute_text_embeddings(as_bytes=True))

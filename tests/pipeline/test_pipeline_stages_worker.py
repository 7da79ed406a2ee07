"""The label worker as a plain object (no Ray): one shard labelled exactly, engine faults
and refused images, odd names, size limits, damaged pages, storage errors while writing."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.images import PIXEL_LIMIT, edge_case_images, encode, photo, tar_bytes, write_images

from cass_engine import CassConfig
from pipeline import storage, writer
from pipeline.config import ComputeConfig, EngineSpec, IOConfig
from pipeline.decode import decode_image
from pipeline.readers import iter_raw_images, tar_key
from pipeline.shards import list_shards
from pipeline.spool import SpooledTable
from pipeline.stub import StubOptions, stub_labels
from pipeline.worker import LabelWorker, WorkerSpec
from schemas import SCHEMA_VERSION, annotations_to_label_map
from schemas.completion import certified_labels
from schemas.io import open_uri, read_label_table


# ---------------------------------------------------------------------- worker
def _certified(out: Path, shard_id: str) -> str:
    """The labels object that the shard's completion record certifies."""
    [found] = [c for c in certified_labels(*open_uri(str(out))) if c.shard_id == shard_id]
    return found.path


def _worker(tmp_path: Path, vocab: Path, stub: StubOptions | None = None,
            **io_options) -> LabelWorker:
    config = CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab))
    engine = EngineSpec(config, stub=stub or StubOptions())
    io_cfg = IOConfig(str(tmp_path / "in"), str(tmp_path / "out"), max_image_pixels=PIXEL_LIMIT,
                      **io_options)
    spec = WorkerSpec(engine, io_cfg, ComputeConfig(batch_size=3), "fingerprint-1",
                      {"schema_version": "1.0"})
    return LabelWorker(spec)


def test_worker_labels_a_shard_exactly_and_writes_record_last(tmp_path, vocab_file,
                                                              monkeypatch):
    cases = edge_case_images()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "s.tar").write_bytes(tar_bytes({k: v for k, (v, _) in cases.items()}))
    writes = []
    original, create = storage.put_bytes, writer.create_object
    monkeypatch.setattr("pipeline.writer.put_bytes",
                        lambda fs, path, data: (writes.append(path), original(fs, path, data)))
    monkeypatch.setattr("pipeline.writer.create_object",
                        lambda fs, path, data: (writes.append(path), create(fs, path, data))[1])
    upload = SpooledTable.upload  # the rows streamed to a spool file are uploaded whole
    monkeypatch.setattr(SpooledTable, "upload",
                        lambda self, fs, path: (writes.append(path), upload(self, fs, path)))
    worker = _worker(tmp_path, vocab_file)
    shard = list_shards(worker.spec.io)[0]
    record = worker.process_shard(shard)
    assert [Path(p).parent.name for p in writes] == ["labels", "_done"]
    assert writes[0].endswith("/labels/s.local-0.parquet") and record["labels"] == (
        "labels/s.local-0.parquet")
    table, meta = read_label_table(_certified(tmp_path / "out", "s"))
    rows = {r["key"]: r for r in table.to_pylist()}
    assert set(rows) == {tar_key(k) for k in cases}
    for name, (data, expected) in cases.items():
        row = rows[tar_key(name)]
        assert row["status"] == expected, (name, row["error"])
        if expected == "ok":
            labels = annotations_to_label_map(row["annotations"], row["height"], row["width"])
            np.testing.assert_array_equal(
                labels, stub_labels(decode_image(data, PIXEL_LIMIT).rgb, 5))
            assert len(row["presence"]) == 5
    assert record["num_images"] == len(cases) and record["fingerprint"] == "fingerprint-1"
    done = json.loads((tmp_path / "out" / "_done" / "s.json").read_text())
    assert done["sha256"] == record["sha256"] and done["num_errors"] == 5
    assert meta["schema_version"] == SCHEMA_VERSION


def test_engine_failure_on_one_image_fails_the_attempt_then_is_isolated_on_retry(
        tmp_path, vocab_file):
    from pipeline.worker import EngineFault

    (tmp_path / "in").mkdir()
    for name, side in (("a.png", 96), ("b.png", 50), ("c.png", 70)):
        (tmp_path / "in" / name).write_bytes(encode(photo("astronaut", side)))
    worker = _worker(tmp_path, vocab_file, StubOptions(fail_on_height=50))
    shard = list_shards(worker.spec.io)[0]
    with pytest.raises(EngineFault, match="not because of an image: RuntimeError"):
        worker.process_shard(shard)  # first launch: no error rows, nothing written
    assert not (tmp_path / "out" / "labels").exists()
    record = worker.process_shard(shard, attempt=1)  # a retry: the batch is run one by one
    table, _ = read_label_table(_certified(tmp_path / "out", "images-000000"))
    statuses = [r["status"] for r in table.to_pylist()]
    assert statuses == ["ok", "engine_error", "ok"] and record["attempt"] == 1


def test_transient_engine_faults_are_never_error_rows(tmp_path, vocab_file):
    from pipeline.worker import EngineFault

    (tmp_path / "in").mkdir()
    for i in range(7):
        (tmp_path / "in" / f"im{i}.png").write_bytes(encode(photo("coffee", 40 + i)))
    worker = _worker(tmp_path, vocab_file,
                     StubOptions(oom_after_images=4, marker_dir=str(tmp_path)))
    shard = list_shards(worker.spec.io)[0]
    with pytest.raises(EngineFault, match="MemoryError"):  # in the second batch of three
        worker.process_shard(shard)
    assert not (tmp_path / "out" / "labels").exists()
    worker.process_shard(shard, attempt=1)  # the fault is gone: every image labelled
    table, _ = read_label_table(_certified(tmp_path / "out", "images-000000"))
    assert [r["status"] for r in table.to_pylist()] == ["ok"] * 7

    class BrokenEngine:  # a device that fails every call, even for one image
        vocabulary = worker.engine.vocabulary

        def segment(self, images, **_):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    worker.engine = BrokenEngine()
    with pytest.raises(EngineFault, match="3 of 3 image.*run one at a time.*CUDA error"):
        worker.process_shard(shard, attempt=2)  # a retry: isolation shows it is not an image


def test_a_broken_device_is_blamed_on_a_retry_even_one_image_at_a_time(tmp_path, vocab_file):
    from pipeline.worker import MAX_FAULT_STREAK, EngineFault

    (tmp_path / "in").mkdir()
    for i in range(6):
        (tmp_path / "in" / f"im{i}.png").write_bytes(encode(photo("coffee", 40 + i)))
    worker = _worker(tmp_path, vocab_file)
    worker.spec = dataclasses.replace(worker.spec, compute=ComputeConfig(batch_size=1))
    stub = worker.engine
    calls = []

    class StickyFault:  # one image labels, then the device fails every call for good
        vocabulary = stub.vocabulary

        def segment(self, images, **kwargs):
            calls.append(len(images))
            if len(calls) > 1:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return stub.segment(images, **kwargs)

    worker.engine = StickyFault()
    with pytest.raises(EngineFault, match="CUDA error"):
        worker.process_shard(list_shards(worker.spec.io)[0], attempt=1)  # a retry (isolating)
    assert not (tmp_path / "out" / "_done").exists()  # no shard of engine_error rows certified
    assert len(calls) <= 1 + 2 * MAX_FAULT_STREAK  # blamed after a few images, not all of them


def test_images_the_engine_refuses_are_error_rows_on_the_first_attempt(tmp_path, vocab_file):
    from cass_engine import ImageInputError

    (tmp_path / "in").mkdir()
    for i in range(4):
        (tmp_path / "in" / f"im{i}.png").write_bytes(encode(photo("coffee", 40 + i)))
    worker = _worker(tmp_path, vocab_file)
    stub = worker.engine

    class PickyEngine:
        vocabulary = stub.vocabulary

        def segment(self, images, **kwargs):
            if any(image.shape[1] == 41 for image in images):  # width 41
                raise ImageInputError("too elongated")
            return stub.segment(images, **kwargs)

    worker.engine = PickyEngine()
    worker.process_shard(list_shards(worker.spec.io)[0])
    table, _ = read_label_table(_certified(tmp_path / "out", "images-000000"))
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "engine_error", "ok", "ok"]
    assert "too elongated" in rows[1]["error"]


def test_undecodable_names_and_odd_decoder_failures_are_rows_not_failed_shards(
        tmp_path, vocab_file, monkeypatch):
    import struct

    good = encode(photo("coffee", 40))
    (tmp_path / "in").mkdir()
    raw = lambda name: name.decode("utf-8", "surrogateescape")  # noqa: E731
    members = {raw(b"caf\xe9.png"): good, raw(b"caf\xe8.png"): good, "plain.png": good}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    (tmp_path / "in" / raw(b"shard-\xff.tar")).write_bytes(buffer.getvalue())
    worker = _worker(tmp_path, vocab_file)
    shard = list_shards(worker.spec.io)[0]
    worker.process_shard(shard)
    table, _ = read_label_table(_certified(tmp_path / "out", shard.shard_id))
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]
    assert len({r["image_id"] for r in rows}) == 3
    assert rows[0]["key"] == "caf\ufffd" and "\ufffd" in rows[0]["source_uri"]

    def broken_exif(image):
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr("cass_engine.images.ImageOps.exif_transpose", broken_exif)
    decoded = decode_image(good, PIXEL_LIMIT)
    assert decoded.status == "decode_error" and "unpack requires" in decoded.error


def test_objects_too_big_to_be_an_allowed_image_are_not_read(tmp_path, vocab_file):
    from pipeline.decode import max_encoded_bytes

    limit = max_encoded_bytes(1000)  # --max-image-pixels 1000
    big = os.urandom(limit + 1)
    small = encode(photo("coffee", 24))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.tar").write_bytes(tar_bytes({"big.png": big, "ok.png": small}))
    worker = _worker(tmp_path, vocab_file)
    worker.spec = dataclasses.replace(
        worker.spec, io=dataclasses.replace(worker.spec.io, max_image_pixels=1000))
    worker.process_shard(list_shards(worker.spec.io)[0])
    rows = read_label_table(_certified(tmp_path / "out", "a"))[0].to_pylist()
    assert [(r["key"], r["status"]) for r in rows] == [("big", "too_large"), ("ok", "ok")]
    assert f"{limit + 1} bytes exceeds the limit of {limit}" in rows[0]["error"]
    (tmp_path / "in" / "a.tar").unlink()
    (tmp_path / "in" / "big.png").write_bytes(big)
    (tmp_path / "in" / "ok.png").write_bytes(small)
    shard = list_shards(worker.spec.io)[0]
    items = list(iter_raw_images(shard, worker._in_fs, max_bytes=limit))
    assert items[0].error[0] == "too_large" and items[0].path is None
    assert items[1].error is None and items[1].load(worker._in_fs) == small


def test_damaged_parquet_pages_end_the_shard_with_an_error_row(tmp_path, vocab_file):
    (tmp_path / "in").mkdir()
    blobs = [encode(photo("coins", 24 + i % 8)) for i in range(64)]
    path = tmp_path / "in" / "part.parquet"
    pq.write_table(pa.table({"image": blobs}), path, row_group_size=32, use_dictionary=False)
    data = bytearray(path.read_bytes())
    start = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data[start + 20:start + 2000] = b"\xff" * 1980  # the second row group's page header
    path.write_bytes(bytes(data))
    worker = _worker(tmp_path, vocab_file)
    worker.process_shard(list_shards(worker.spec.io)[0])
    table, _ = read_label_table(_certified(tmp_path / "out", "part"))
    rows = table.to_pylist()
    assert len(rows) == 33 and [r["status"] for r in rows[:32]] == ["ok"] * 32
    assert rows[-1]["status"] == "decode_error" and "from row 32" in rows[-1]["error"]
    assert (tmp_path / "out" / "_done" / "part.json").exists()


def test_storage_errors_during_write_are_retried(tmp_path, vocab_file, monkeypatch):
    write_images(tmp_path / "in", ["a.png"])
    worker = _worker(tmp_path, vocab_file)
    real_put, failures = worker._out_fs.put_file, []

    def flaky_put(lpath, rpath, **kwargs):  # the spooled table's upload, as to an object store
        if len(failures) < 2:
            failures.append(rpath)
            raise ConnectionResetError("reset")
        worker._out_fs.makedirs(rpath.rsplit("/", 1)[0], exist_ok=True)  # stores have no dirs
        return real_put(lpath, rpath, **kwargs)

    monkeypatch.setattr(worker._out_fs, "put_file", flaky_put)
    monkeypatch.setattr("pipeline.spool.is_local", lambda fs: False)
    monkeypatch.setattr(storage.random, "uniform", lambda a, b: 0.01)
    worker.process_shard(list_shards(worker.spec.io)[0])
    assert len(failures) == 2 and all("/labels/images-000000." in p for p in failures)
    assert (tmp_path / "out" / "_done" / "images-000000.json").exists()


def test_memory_error_while_decoding_fails_the_attempt_not_the_image(tmp_path, vocab_file,
                                                                    monkeypatch):
    write_images(tmp_path / "in", ["a.png", "b.png"])
    worker = _worker(tmp_path, vocab_file)

    def short_of_memory(data, max_image_pixels):
        raise MemoryError

    monkeypatch.setattr("pipeline.decode._decode", short_of_memory)
    with pytest.raises(MemoryError):
        worker.process_shard(list_shards(worker.spec.io)[0])
    assert not (tmp_path / "out" / "_done").exists()  # no error rows certified

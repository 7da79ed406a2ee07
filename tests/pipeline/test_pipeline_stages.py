"""Pipeline stages as plain functions (no Ray): decode, list, read, retry, label, write, plan."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support.images import edge_case_images, encode, photo, photos, tar_bytes, write_vocabulary

from cass_engine import CassConfig
from cass_engine.staging import stage_weights
from pipeline import storage, writer
from pipeline.config import (
    ComputeConfig,
    ConfigError,
    EngineSpec,
    IOConfig,
    JobConfig,
    OutputPolicy,
)
from pipeline.decode import decode_image
from pipeline.engine import stage_engine_weights
from pipeline.plan import StartupError, plan_job
from pipeline.readers import iter_raw_images, tar_key
from pipeline.record import OutputConflict, check_compatible
from pipeline.shards import InputError, ShardSpec, list_shards, safe_shard_id
from pipeline.spool import SpooledTable
from pipeline.stub import StubOptions, stub_labels
from pipeline.worker import LabelWorker, WorkerSpec
from schemas import SCHEMA_VERSION, annotations_to_label_map
from schemas.completion import certified_labels
from schemas.io import open_uri, read_label_table
from schemas.uris import redact

LIMIT = 1_000_000


# ---------------------------------------------------------------------- decode
@pytest.mark.parametrize("name", sorted(edge_case_images()))
def test_decode_edge_cases(name):
    data, expected = edge_case_images()[name]
    decoded = decode_image(data, LIMIT)
    assert decoded.status == expected, decoded.error
    if expected == "ok":
        assert decoded.rgb.dtype == np.uint8 and decoded.rgb.ndim == 3
        assert decoded.rgb.shape == (decoded.height, decoded.width, 3)
    else:
        assert decoded.rgb is None and decoded.error


def test_decode_mode_conversions_are_exact():
    rgb = photo("astronaut", 48)
    gray = decode_image(encode(Image.fromarray(rgb).convert("L")), LIMIT).rgb
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    alpha = decode_image(encode(Image.fromarray(rgb).convert("RGBA")), LIMIT).rgb
    np.testing.assert_array_equal(alpha, rgb)
    values = (np.arange(32 * 40, dtype=np.uint16).reshape(32, 40) * 50)
    gray16 = decode_image(encode(Image.fromarray(values)), LIMIT).rgb
    np.testing.assert_array_equal(gray16[..., 0], (values >> 8).astype(np.uint8))


def test_decode_applies_exif_orientation():
    image = np.zeros((40, 20, 3), dtype=np.uint8)
    image[:10] = 255  # white band at the top
    pil = Image.fromarray(image)
    exif = pil.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    decoded = decode_image(encode(pil, "JPEG", exif=exif.tobytes(), quality=100), LIMIT)
    assert (decoded.height, decoded.width) == (20, 40)
    assert decoded.rgb[:, -10:].mean() > 200 and decoded.rgb[:, :10].mean() < 50


def test_decode_too_large_is_checked_from_the_header():
    decoded = decode_image(encode(np.zeros((100, 100, 3), dtype=np.uint8)), 5000)
    assert decoded.status == "too_large" and (decoded.width, decoded.height) == (100, 100)
    assert decode_image(encode(np.zeros((50, 100, 3), dtype=np.uint8)), 5000).status == "ok"


# ---------------------------------------------------------------------- listing
def _write_images(root: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(photos(i + 1)[-1]))


def test_image_files_grouped_in_stable_sorted_shards(tmp_path):
    _write_images(tmp_path / "in", ["b.png", "a.png", "sub/c.jpg", "sub/a.png", "z.png"])
    (tmp_path / "in" / "notes.txt").write_text("ignored")
    io_cfg = IOConfig(str(tmp_path / "in"), str(tmp_path / "out"), images_per_shard=2)
    shards = list_shards(io_cfg)
    assert [s.shard_id for s in shards] == ["images-000000", "images-000001", "images-000002"]
    assert [k for s in shards for k in s.keys] == ["a.png", "b.png", "sub/a.png", "sub/c.jpg",
                                                   "z.png"]
    assert list_shards(io_cfg) == shards
    # --limit is applied while labelling, so the groups (and resume) do not depend on it
    limited = list_shards(dataclasses.replace(io_cfg, limit=3))
    assert limited == shards


def test_listing_formats_globs_and_errors(tmp_path):
    (tmp_path / "tars").mkdir()
    for name in ("s-1.tar", "s-0.tar"):
        (tmp_path / "tars" / name).write_bytes(tar_bytes({"k.png": encode(photo("coins"))}))
    shards = list_shards(IOConfig(str(tmp_path / "tars"), str(tmp_path / "out")))
    assert [(s.shard_id, s.kind) for s in shards] == [("s-0", "webdataset"),
                                                      ("s-1", "webdataset")]
    globbed = list_shards(IOConfig(str(tmp_path / "tars" / "*-1.tar"), str(tmp_path / "o")))
    assert [s.shard_id for s in globbed] == ["s-1"]
    (tmp_path / "tars" / "x.parquet").write_bytes(b"")
    with pytest.raises(InputError, match="mixes"):
        list_shards(IOConfig(str(tmp_path / "tars"), str(tmp_path / "out")))
    forced = list_shards(IOConfig(str(tmp_path / "tars"), str(tmp_path / "o"),
                                  input_format="parquet"))
    assert [s.shard_id for s in forced] == ["x"]
    with pytest.raises(InputError, match="does not exist"):
        list_shards(IOConfig(str(tmp_path / "missing"), str(tmp_path / "out")))


def test_shard_ids_are_safe_and_unique():
    assert safe_shard_id("shard-000", "shard-000.tar") == "shard-000"
    assert safe_shard_id("dir/part", "dir/part.tar") == "dir__part"
    weird = safe_shard_id("../a b?", "../a b?.tar")
    assert "/" not in weird and " " not in weird and ".." not in weird.split("-")[0]
    assert weird != safe_shard_id("../a b!", "../a b!.tar")


# ---------------------------------------------------------------------- readers
def test_tar_member_names_never_become_paths(tmp_path, monkeypatch):
    png = encode(photo("coins", 32))
    members = {"../../evil.png": png, "/abs/x.png": png, "dir/ok.jpg": png,
               "dir/ok.json": b"{}"}
    shard_file = tmp_path / "shard.tar"
    shard_file.write_bytes(tar_bytes(members, symlink="link.png"))
    work = tmp_path / "cwd" / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = sorted(p for p in tmp_path.rglob("*"))
    fs, _ = open_uri(str(shard_file))
    shard = ShardSpec("shard", "webdataset", (str(shard_file),), (), str(shard_file), "fp")
    items = list(iter_raw_images(shard, fs))
    assert [i.key for i in items] == ["../../evil", "/abs/x", "dir/ok"]
    assert all(i.data == png for i in items)
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert tar_key("a/b.c.jpg") == "a/b.c"


def test_damaged_archives_yield_an_error_item(tmp_path):
    good = tar_bytes({f"{i}.png": encode(photo("coins", 32)) for i in range(3)})
    (tmp_path / "cut.tar").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.tar").write_bytes(b"not a tar file" * 100)
    fs, _ = open_uri(str(tmp_path))
    for name, min_good in (("cut.tar", 1), ("junk.tar", 0)):
        shard = ShardSpec(name, "webdataset", (str(tmp_path / name),), (), name, "fp")
        items = list(iter_raw_images(shard, fs))
        assert items[-1].error is not None and items[-1].error[0] == "decode_error"
        assert items[-1].key == name and len(items) - 1 >= min_good


def test_parquet_reader_binary_struct_and_ids(tmp_path):
    png = encode(photo("camera", 32))
    table = pa.table({"img": [png, None, png], "name": ["x", "y", "z"]})
    pq.write_table(table, tmp_path / "p.parquet")
    hf = pa.table({"image": [{"bytes": png, "path": "a.png"}]})
    pq.write_table(hf, tmp_path / "hf.parquet")
    fs, _ = open_uri(str(tmp_path))
    shard = ShardSpec("p", "parquet", (str(tmp_path / "p.parquet"),), (), "p", "fp")
    items = list(iter_raw_images(shard, fs, "img", "name"))
    assert [(i.key, len(i.data)) for i in items] == [("x", len(png)), ("y", 0), ("z", len(png))]
    shard = ShardSpec("hf", "parquet", (str(tmp_path / "hf.parquet"),), (), "hf", "fp")
    assert [(i.key, i.data) for i in iter_raw_images(shard, fs)] == [("00000000", png)]


# ---------------------------------------------------------------------- storage
def test_retry_transient_errors_then_succeed_and_permanent_fail_fast():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert storage.retry(flaky, "flaky", base_delay_s=0.01) == "ok" and len(calls) == 3
    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        storage.retry(missing, "missing", base_delay_s=0.01)
    assert len(calls) == 1
    assert storage.is_transient(OSError("SlowDown: please reduce your request rate"))
    assert not storage.is_transient(PermissionError("AccessDenied"))


# ---------------------------------------------------------------------- worker
def _certified(out: Path, shard_id: str) -> str:
    """The labels object that the shard's completion record certifies."""
    [found] = [c for c in certified_labels(*open_uri(str(out))) if c.shard_id == shard_id]
    return found.path


def _worker(tmp_path: Path, vocab: Path, stub: StubOptions | None = None,
            **io_options) -> LabelWorker:
    config = CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab))
    engine = EngineSpec(config, stub=stub or StubOptions())
    io_cfg = IOConfig(str(tmp_path / "in"), str(tmp_path / "out"), max_image_pixels=LIMIT,
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
            np.testing.assert_array_equal(labels, stub_labels(decode_image(data, LIMIT).rgb, 5))
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
    decoded = decode_image(good, LIMIT)
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
    _write_images(tmp_path / "in", ["a.png"])
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


# ---------------------------------------------------------------------- plan / record
def _plan(job: JobConfig) -> object:
    """Plan a job and give its output's lease back (the plan is inspected, not run)."""
    plan = plan_job(job)
    plan.release()
    return plan


def _job(tmp_path: Path, vocab: Path, **io_options) -> JobConfig:
    config = CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab))
    io_cfg = IOConfig(str(tmp_path / "in"), str(tmp_path / "out"), **io_options)
    return JobConfig(io_cfg, ComputeConfig(), EngineSpec(config, stub=StubOptions()))


def test_plan_fails_fast_with_clear_messages(tmp_path, vocab_file):
    with pytest.raises(StartupError, match="does not exist"):
        _plan(_job(tmp_path, vocab_file))
    _write_images(tmp_path / "in", ["a.png"])
    with pytest.raises(ConfigError, match="vocabulary"):  # parsed with the engine spec
        _job(tmp_path, tmp_path / "no-such-vocab.txt")
    pq.write_table(pa.table({"x": [b"1"]}), tmp_path / "in" / "a.parquet")
    with pytest.raises(StartupError, match="column 'image'"):
        _plan(_job(tmp_path, vocab_file, input_format="parquet"))
    assert not (tmp_path / "out").exists()


def test_storage_backend_not_installed_is_a_clear_startup_error(tmp_path, vocab_file,
                                                                monkeypatch):
    from fsspec.registry import known_implementations

    monkeypatch.setitem(known_implementations, "nosuchfs",
                        {"class": "nosuchfs_backend.FileSystem",
                         "err": "Install nosuchfs-backend to access nosuchfs://"})
    job = JobConfig(IOConfig("nosuchfs://bucket/in", str(tmp_path / "out")), ComputeConfig(),
                    _job(tmp_path, vocab_file).engine)
    with pytest.raises(StartupError, match=r"list the input nosuchfs://bucket/in: .*"
                                           r"Install nosuchfs-backend"):
        _plan(job)


def test_repeated_vocabulary_words_are_recorded(tmp_path):
    _write_images(tmp_path / "in", ["a.png"])
    vocab = write_vocabulary(tmp_path / "v.txt", ["cat, kitty", "dog", "kitty", "bed", "bed"])
    plan = _plan(_job(tmp_path, vocab))
    assert plan.record["vocabulary_repeats"] == ["kitty", "bed"]


def test_plan_refuses_to_mix_vocabularies_unless_overwrite(tmp_path, vocab_file):
    _write_images(tmp_path / "in", ["a.png"])
    plan = _plan(_job(tmp_path, vocab_file))
    assert [s.shard_id for s in plan.todo] == ["images-000000"]
    other = write_vocabulary(tmp_path / "other.txt", ["cat", "dog"])
    with pytest.raises(StartupError, match="vocabulary_hash"):
        _plan(_job(tmp_path, other))
    (tmp_path / "out" / "labels").mkdir()
    (tmp_path / "out" / "labels" / "old.parquet").write_bytes(b"x")
    plan = _plan(_job(tmp_path, other, overwrite=True))
    assert not (tmp_path / "out" / "labels").exists()
    assert plan.record["categories"][1]["name"] == "dog"
    with pytest.raises(StartupError, match="confidence: false -> true"):  # rows would mix
        _plan(_job(tmp_path, other, confidence=True))


def test_replacement_worker_with_other_weights_refuses_to_label(tmp_path, vocab_file):
    _write_images(tmp_path / "in", ["a.png"])
    job = _job(tmp_path, vocab_file)
    worker = LabelWorker(WorkerSpec(job.engine, job.io, job.compute, "fp"))
    text = worker.compute_text_embeddings()
    run = {"run": {"models": {**worker.engine.weights_info, "sha256": "0" * 64}}}
    with pytest.raises(RuntimeError, match=r"weights differ from the run's \(sha256\)"):
        worker.prepare(text, run)
    assert worker.prepare(text, {"run": {"models": worker.engine.weights_info}})


def test_damaged_records_never_block_a_resume(tmp_path, vocab_file):
    _write_images(tmp_path / "in", ["a.png", "b.png"])
    plan = _plan(_job(tmp_path, vocab_file, images_per_shard=1))
    worker = LabelWorker(WorkerSpec(plan.job.engine, plan.job.io, plan.job.compute,
                                    plan.fingerprint))
    worker.prepare(worker.compute_text_embeddings())
    for shard in plan.todo:
        worker.process_shard(shard)
    assert sorted(_plan(_job(tmp_path, vocab_file, images_per_shard=1)).skipped) == [
        "images-000000", "images-000001"]
    done = tmp_path / "out" / "_done" / "images-000001.json"
    done.write_text(done.read_text()[:20])  # a crash mid-write on a disk without atomic writes
    again = _plan(_job(tmp_path, vocab_file, images_per_shard=1))
    assert list(again.skipped) == ["images-000000"]
    assert [s.shard_id for s in again.todo] == ["images-000001"]
    (tmp_path / "out" / "run.json").write_text('{"status": "runn')
    with pytest.raises(StartupError, match="run.json is unreadable.*--overwrite"):
        _plan(_job(tmp_path, vocab_file, images_per_shard=1))
    fresh = _plan(_job(tmp_path, vocab_file, images_per_shard=1, overwrite=True))
    assert len(fresh.todo) == 2


def _label_all(tmp_path: Path, vocab: Path, **io_options) -> object:
    plan = _plan(_job(tmp_path, vocab, **io_options))
    worker = LabelWorker(WorkerSpec(plan.job.engine, plan.job.io, plan.job.compute,
                                    plan.fingerprint))
    worker.prepare(worker.compute_text_embeddings())
    for shard in plan.todo:
        worker.process_shard(shard)
    plan.release()
    return plan


def test_regrouped_image_files_are_labelled_once(tmp_path, vocab_file):
    from schemas.io import iter_label_rows

    _write_images(tmp_path / "in", [f"im{i}.png" for i in range(5)])
    _label_all(tmp_path, vocab_file, images_per_shard=2)  # groups 0..2
    with pytest.raises(StartupError, match=r"input\.images_per_shard: 2 -> 3"):
        _plan(_job(tmp_path, vocab_file, images_per_shard=3))  # another input identity
    (tmp_path / "in" / "im4.png").unlink()  # now groups 0..1
    plan = _label_all(tmp_path, vocab_file, images_per_shard=2)
    assert plan.record["stale_shards"] == {"removed": ["images-000002"], "kept": []}
    keys = sorted(r["key"] for r in iter_label_rows(str(tmp_path / "out")))
    assert keys == [f"im{i}.png" for i in range(4)]
    assert not list((tmp_path / "out" / "labels").glob("images-000002.*"))
    (tmp_path / "in" / "im1.png").unlink()  # both groups change
    plan = _label_all(tmp_path, vocab_file, images_per_shard=2)
    assert [s.shard_id for s in plan.todo] == ["images-000000", "images-000001"]
    keys = sorted(r["key"] for r in iter_label_rows(str(tmp_path / "out")))
    assert keys == ["im0.png", "im2.png", "im3.png"]
    assert len(list((tmp_path / "out" / "labels").iterdir())) == 2  # no stale table left
    plan = _label_all(tmp_path, vocab_file, images_per_shard=3, overwrite=True)
    assert [s.shard_id for s in plan.todo] == ["images-000000"]
    keys = sorted(r["key"] for r in iter_label_rows(str(tmp_path / "out")))
    assert keys == ["im0.png", "im2.png", "im3.png"]


def test_coco_export_is_written_whole_or_not_at_all(tmp_path, vocab_file, monkeypatch, capsys):
    from pycocotools.coco import COCO

    from jobs import export_coco

    _write_images(tmp_path / "in", ["a.png", "b.png"])
    _label_all(tmp_path, vocab_file)  # run.json is written by the plan
    out = tmp_path / "coco" / "labels.json"
    assert export_coco.main(["--labels", str(tmp_path / "out"), "--out", str(out)]) == 0
    assert len(COCO(str(out)).dataset["images"]) == 2

    def broken(rows, categories, fp, info=None):
        fp.write('{"images": [')
        raise OSError("disk full")

    monkeypatch.setattr(export_coco, "write_coco_json", broken)
    again = tmp_path / "coco" / "again.json"
    assert export_coco.main(["--labels", str(tmp_path / "out"), "--out", str(again)]) == 2
    assert "disk full" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "coco").iterdir()) == ["labels.json"]
    assert export_coco.main(["--labels", str(tmp_path / "nowhere"), "--out", str(again)]) == 2


def test_local_writes_are_all_or_nothing(tmp_path, monkeypatch):
    import fsspec

    fs = fsspec.filesystem("file")
    target = str(tmp_path / "d" / "x.json")
    storage.put_bytes(fs, target, b"first")
    monkeypatch.setattr(storage.os, "replace", lambda a, b: (_ for _ in ()).throw(
        OSError("killed before the rename")))
    with pytest.raises(OSError, match="killed"):
        storage.put_bytes(fs, target, b"second, longer")
    assert (tmp_path / "d" / "x.json").read_bytes() == b"first"
    assert [p.name for p in (tmp_path / "d").iterdir() if p.suffix == ".json"] == ["x.json"]


def test_check_compatible_needs_a_record_for_existing_shards():
    check_compatible(None, {}, "fp", has_shards=False)
    with pytest.raises(OutputConflict, match="no run.json"):
        check_compatible(None, {}, "fp", has_shards=True)
    with pytest.raises(OutputConflict, match="gamma: 0.2 -> 0.3"):
        check_compatible({"fingerprint": "a", "identity": {"config": {"gamma": 0.2}}},
                         {"config": {"gamma": 0.3}}, "b", has_shards=True)


# ---------------------------------------------------------------------- config / CLI
def test_config_validation_and_redaction():
    with pytest.raises(ConfigError, match="images_per_shard"):
        IOConfig("in", "out", images_per_shard=0)
    with pytest.raises(ConfigError, match="differ"):
        IOConfig("s3://b/x", "s3://b/x/")
    with pytest.raises(ConfigError, match="batch_size"):
        ComputeConfig(batch_size=0)
    with pytest.raises(ValueError, match="random"):
        EngineSpec(CassConfig(), clip_weights="a.pt", random_weights=0)
    options = {"endpoint_url": "http://h", "key": "AKIA", "secret": "s3cr3t",
               "client_kwargs": {"aws_session_token": "T0KEN-VALUE"}}
    public = json.dumps(IOConfig("in", "out", storage_options=options).public_dict())
    assert "s3cr3t" not in public and "AKIA" not in public and "T0KEN-VALUE" not in public
    assert redact(options)["endpoint_url"] == "http://h"


def test_cli_flags_only_override_dataclass_defaults(vocab_file):
    from jobs.label import build_parser, job_from_args

    base = ["--input", "in", "--output", "out", "--vocab", str(vocab_file)]
    job = job_from_args(build_parser().parse_args(base))
    cwd = os.getcwd()  # relative local paths: against the directory the command runs in
    assert job.io == IOConfig(f"{cwd}/in", f"{cwd}/out") and job.compute == ComputeConfig()
    assert job.policy == OutputPolicy()
    flags = ["--wait-for-lease", "30", "--lease-ttl", "10", "--verify", "--output-is-shared"]
    assert job_from_args(build_parser().parse_args(base + flags)).policy == OutputPolicy(
        wait_for_lease_s=30.0, lease_ttl_s=10.0, verify=True, output_is_shared=True)
    job = job_from_args(build_parser().parse_args(base + ["--batch-size", "4", "--format",
                                                          "parquet", "--random-weights", "3"]))
    assert job.compute.batch_size == 4 and job.compute.actors is None
    assert job.io.input_format == "parquet" and job.engine.random_weights == 3
    assert job.engine.dtype is None  # the engine's faithful default
    auto = job_from_args(build_parser().parse_args(base + ["--dtype", "auto"]))
    assert auto.engine.dtype == "auto" and auto.engine.identity()["dtype"] == "auto"
    with pytest.raises(ValueError, match="dtype must be"):
        EngineSpec(job.engine.config, dtype="bf16")
    help_text = " ".join(build_parser().format_help().split())
    for option in ("--images-per-shard", "--storage-options", "--limit", "--actors",
                   "--gpus-per-actor", "--batch-size", "--max-image-pixels", "--preset"):
        assert option in help_text
    assert f"(default: {IOConfig('i', 'o').images_per_shard})" in help_text
    assert f"(default: {ComputeConfig().stall_timeout_s:g})" in help_text
    stall = lambda value: job_from_args(  # noqa: E731
        build_parser().parse_args(base + ["--stall-timeout", value])).compute.stall_timeout_s
    assert stall("30") == 30.0 and stall("0") is None
    with pytest.raises(ConfigError, match="stall-timeout"):
        stall("-1")


def test_progress_lines_count_images_and_do_not_repeat_on_force():
    from pipeline.progress import Progress

    lines: list[str] = []
    progress = Progress(2, 1, interval_s=3600.0, emit=lines.append)
    progress._last = time.monotonic()  # the first periodic line is not due for an hour
    record = {"num_images": 4, "num_ok": 3, "num_annotations": 7,
              "errors_by_status": {"decode_error": 1}}
    progress.maybe_report()
    assert lines == []
    progress.shard_done(record)
    progress.maybe_report(force=True)
    progress.maybe_report(force=True)  # nothing new: no second identical line
    assert len(lines) == 1
    assert re.match(r"\[cass-label\] shards 1/2 \(skipped 1, failed 0, retries 0\) \| images 4"
                    r" \| [\d.]+ img/s \| errors 1 \| elapsed 0:00:\d\d \| ETA 0:00:\d\d$",
                    lines[0]), lines[0]
    progress.shard_done(record)
    progress.maybe_report(force=True)
    assert len(lines) == 2 and "shards 2/2" in lines[1] and "images 8" in lines[1]
    totals = progress.totals()
    assert totals["images"] == 8 and totals["images_ok"] == 6 and totals["shards"] == 3


def test_waiting_retry_gets_a_worker_before_the_fresh_shards_run_out():
    from types import SimpleNamespace

    from ray.exceptions import RayError

    from pipeline.scheduler import Scheduler

    class Actor:
        def __init__(self, slot: int) -> None:
            self.process_shard = SimpleNamespace(
                remote=lambda shard, cap, attempt, slot=slot: (slot, shard.shard_id, attempt))

    spec = lambda i: ShardSpec(f"s{i}", "webdataset", (f"s{i}.tar",), (), "u", "fp")  # noqa: E731
    plan = SimpleNamespace(todo=[spec(i) for i in range(20)],
                           job=SimpleNamespace(compute=ComputeConfig(), io=IOConfig("i", "o")))
    pool = SimpleNamespace(actors=[Actor(0), Actor(1)], generation=[0, 0], ready=[True, True])
    progress = SimpleNamespace(shards_done=0, shard_done=lambda record: None,
                               shard_retried=lambda shard_id, reason: None)
    scheduler = Scheduler(pool, plan, progress)
    scheduler.submit()
    assert [scheduler.load(0), scheduler.load(1)] == [2, 2] and len(scheduler.queued()) == 16

    def finish(slot: int, outcome: object = None) -> None:  # one shard of this worker ends
        ref = next(launch.ref for launch in scheduler.in_flight() if launch.slot == slot)
        scheduler.on_result(ref, outcome or {"num_images": 1})

    failing = next(launch for launch in scheduler.in_flight() if launch.slot == 1)
    finish(1, RayError("the task raised"))  # this shard waits for a retry
    assert scheduler.retrying() == [failing.shard_id]
    assert scheduler.attempts(failing.shard_id) == 1
    scheduler.submit()  # the retry is waiting: one worker stops taking fresh shards
    drained = scheduler.draining
    assert drained is not None and len(scheduler.queued()) == 16 - (drained == 0)
    for _ in range(scheduler.load(drained)):  # its shards in flight finish, no new ones
        assert len(scheduler.queued()) == 16 - (drained == 0) and scheduler.retrying()
        finish(drained)
        scheduler.submit()
    running = [(launch.shard_id, launch.attempt) for launch in scheduler.in_flight()
               if launch.slot == drained]
    assert running == [(failing.shard_id, 1)] and scheduler.runs_alone(drained)
    assert scheduler.queued() and scheduler.draining is None


def test_limit_budget_is_shared_by_the_shards_that_start_together():
    from types import SimpleNamespace

    from pipeline.scheduler import Scheduler

    class Actor:
        process_shard = SimpleNamespace(remote=lambda shard, cap, launch: object())

    spec = lambda i: ShardSpec(f"s{i}", "parquet", (f"s{i}.pq",), (), "u", "fp")  # noqa: E731
    plan = SimpleNamespace(todo=[spec(i) for i in range(9)],
                           job=SimpleNamespace(compute=ComputeConfig(),
                                               io=IOConfig("i", "o", limit=5)))
    scheduler = Scheduler(SimpleNamespace(actors=[Actor(), Actor()], generation=[0, 0],
                                          ready=[True, True]),
                          plan, progress=None)
    scheduler.submit()
    caps = sorted(launch.cap for launch in scheduler.in_flight())
    assert caps == [1, 1, 1, 2] and scheduler.budget_left == 0 and len(scheduler.queued()) == 5


def test_job_logs_library_errors_as_one_line():
    import logging

    from jobs.label import _OneLineFormatter

    try:
        raise ConnectionResetError("peer reset\nsecond line")
    except ConnectionResetError:
        record = logging.LogRecord("gcsfs", logging.ERROR, __file__, 1, "out of retries: %s",
                                   ("x",), exc_info=sys.exc_info())
    text = _OneLineFormatter().format(record)
    assert "\n" not in text and "Traceback" not in text
    assert text == ("[gcsfs] error: out of retries: x (ConnectionResetError: peer reset "
                    "second line)")


def test_import_rules():
    code = ("import sys, importlib; importlib.import_module(sys.argv[1]); "
            "print(sorted(m for m in ('ray', 'pyarrow', 'fsspec', 'torch') if m in sys.modules))")
    run = lambda mod: subprocess.run([sys.executable, "-c", code, mod], capture_output=True,  # noqa: E731
                                     text=True, check=True).stdout.strip()
    assert "ray" not in run("pipeline.worker")
    assert run("cass_engine") == "[]"  # public names load on first use
    assert run("cass_engine.segmenter") == "['torch']"
    # the job's driver (argument parsing, planning, scheduling) never loads the engine's torch
    assert "torch" not in run("jobs.label") and "torch" not in run("pipeline.runner")


def test_weights_are_staged_once_per_node(tmp_path, vocab_file, monkeypatch):
    import fsspec

    from cass_engine import staging

    with fsspec.open("memory://weights/clip.pt", "wb") as f:
        f.write(b"weights")
    config = CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab_file))
    spec = EngineSpec(config, clip_weights="memory://weights/clip.pt",
                      dino_weights="/local/dino.pth", cache_dir=str(tmp_path))
    calls = []
    real = staging._download
    monkeypatch.setattr(staging, "_download", lambda *a: (calls.append(a), real(*a)))
    stage_engine_weights(spec)
    stage_engine_weights(spec)
    assert len(calls) == 1 and calls[0][3] is not None  # copied once, with the job's retries
    first = stage_weights("memory://weights/clip.pt", str(tmp_path / "weights"))
    assert len(calls) == 1 and Path(first).read_bytes() == b"weights"
    assert os.path.dirname(first) == str(tmp_path / "weights")
    assert not (tmp_path / "weights" / "dino.pth").exists()  # local paths are not copied


def test_memory_error_while_decoding_fails_the_attempt_not_the_image(tmp_path, vocab_file,
                                                                    monkeypatch):
    _write_images(tmp_path / "in", ["a.png", "b.png"])
    worker = _worker(tmp_path, vocab_file)

    def short_of_memory(data, max_image_pixels):
        raise MemoryError

    monkeypatch.setattr("pipeline.decode._decode", short_of_memory)
    with pytest.raises(MemoryError):
        worker.process_shard(list_shards(worker.spec.io)[0])
    assert not (tmp_path / "out" / "_done").exists()  # no error rows certified

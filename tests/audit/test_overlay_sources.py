"""Audit overlays find the source image of a labels row as the labeling job named it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from support.images import encode, photo, tar_bytes, write_vocabulary

from cass_engine import CassConfig
from pipeline.audit.sources import load_source_image
from pipeline.config import ComputeConfig, EngineSpec, IOConfig
from pipeline.decode import decode_image
from pipeline.shards import list_shards
from pipeline.stub import StubOptions
from pipeline.worker import LabelWorker, WorkerSpec
from schemas.io import iter_label_rows


def _label(tmp_path: Path, **io_options) -> list[dict]:
    """Label ``tmp_path/in`` with the stub engine, as the job's workers do; the rows."""
    vocab = write_vocabulary(tmp_path / "vocab.txt", ["sky", "ground"])
    engine = EngineSpec(CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab)),
                        stub=StubOptions())
    io_cfg = IOConfig(str(tmp_path / "in"), str(tmp_path / "out"), max_image_pixels=10**6,
                      **io_options)
    worker = LabelWorker(WorkerSpec(engine, io_cfg, ComputeConfig(batch_size=2), "fp-1",
                                    {"schema_version": "1.0"}))
    for shard in list_shards(io_cfg):
        worker.process_shard(shard)
    return list(iter_label_rows(str(tmp_path / "out")))


def test_overlay_finds_webdataset_members_by_the_key_the_job_wrote(tmp_path):
    members = {"dir/one.png": encode(photo("astronaut", 32)),
               "two.jpg": encode(photo("coffee", 32), "JPEG"),
               "two.json": b"{}",  # same key, not an image: never picked
               "three.webp": encode(photo("chelsea", 32), "WEBP")}
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "shard.tar").write_bytes(tar_bytes(members))
    rows = _label(tmp_path)
    assert sorted(r["key"] for r in rows) == ["dir/one", "three", "two"]  # extensions stripped
    names = {"dir/one": "dir/one.png", "two": "two.jpg", "three": "three.webp"}
    for row in rows:
        assert row["status"] == "ok"
        got = load_source_image(row["source_uri"], row["key"], image_id=row["image_id"])
        assert got is not None, row["key"]
        np.testing.assert_array_equal(got, decode_image(members[names[row["key"]]], 10**6).rgb)
    shard = rows[0]["source_uri"]
    assert load_source_image(shard, "absent", image_id=rows[0]["shard_id"] + "/absent") is None


def test_overlay_finds_rows_of_repeated_parquet_ids(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [encode(photo(name, 32)) for name in ("astronaut", "coffee", "chelsea")]
    (tmp_path / "in").mkdir()
    table = pa.table({"id": ["same", "same", "other"], "image": images})
    pq.write_table(table, tmp_path / "in" / "part.parquet")
    rows = _label(tmp_path, id_column="id")
    assert [r["key"] for r in rows] == ["same", "same", "other"]
    assert len({r["image_id"] for r in rows}) == 3
    io = {"id_column": "id", "image_column": "image"}
    for row, data in zip(rows, images, strict=True):
        got = load_source_image(row["source_uri"], row["key"], image_id=row["image_id"],
                                source_io=io)
        np.testing.assert_array_equal(got, decode_image(data, 10**6).rgb)

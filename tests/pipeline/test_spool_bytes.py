"""Row groups of the spool are bounded by bytes as well as rows: rows carrying large
confidence maps are written out before a thousand of them pile up in memory."""

from __future__ import annotations

import pyarrow.parquet as pq

from pipeline.spool import RowSpool, row_payload_bytes
from schemas import error_row
from schemas.io import read_label_table


def _row(i: int, confidence: bytes | None = None) -> dict:
    row = error_row(shard_id="s", source_uri="u", key=f"k{i:04d}", status="empty", error="x")
    return {**row, "confidence": confidence}


def test_a_group_is_written_once_its_payload_reaches_the_byte_bound(tmp_path):
    heavy = b"\x89PNG" + bytes(300_000)  # stands in for a multi-megapixel confidence PNG
    assert row_payload_bytes(_row(0, heavy)) >= len(heavy)
    spool = RowSpool({"schema_version": "1.1"}, group_rows=1000, directory=str(tmp_path),
                     group_bytes=1_000_000)
    for i in range(10):
        spool.add(_row(i, heavy))
        assert spool.held_bytes < 1_000_000  # never a group's worth of bytes held
        assert len(spool._rows) <= 3
    table = spool.close()
    assert pq.ParquetFile(table.path).metadata.num_row_groups == 3  # 4 + 4 + 2 rows, by bytes
    read, _ = read_label_table(table.path)
    assert read.column("key").to_pylist() == [f"k{i:04d}" for i in range(10)]
    assert read.column("confidence").to_pylist()[0] == heavy
    spool.discard()


def test_light_rows_are_still_grouped_by_row_count(tmp_path):
    spool = RowSpool({"schema_version": "1.1"}, group_rows=100, directory=str(tmp_path))
    for i in range(250):
        spool.add(_row(i))
    table = spool.close()
    assert pq.ParquetFile(table.path).metadata.num_row_groups == 3
    spool.discard()

"""Write one shard's output: its Parquet table in one PUT, then its completion record.

The completion record (``OUTPUT/_done/<shard_id>.json``) is written only after the table
upload succeeded, so a record's existence means the table is complete. Records hold counts,
the table's byte size and SHA-256, and the run fingerprint.
"""

from __future__ import annotations

import collections
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import rows_to_table
from schemas.io import done_path, labels_path

from .spool import SpooledTable
from .storage import put_bytes

PARQUET_COMPRESSION = "zstd"


def table_bytes(rows: Sequence[Mapping], run_metadata: Mapping) -> bytes:
    """Serialise rows to Parquet bytes (schema and run metadata included)."""
    table = rows_to_table(rows, run_metadata)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=PARQUET_COMPRESSION)
    return sink.getvalue().to_pybytes()


def shard_counts(rows: Sequence[Mapping]) -> dict:
    """Image, ok, error and annotation counts of a shard, errors by kind."""
    errors = collections.Counter(r["status"] for r in rows if r["status"] != "ok")
    return {
        "num_images": len(rows),
        "num_ok": len(rows) - sum(errors.values()),
        "num_errors": sum(errors.values()),
        "num_annotations": sum(len(r["annotations"] or []) for r in rows),
        "errors_by_status": dict(sorted(errors.items())),
    }


def write_shard(fs: Any, root: str, shard_id: str, rows: Sequence[Mapping] | SpooledTable,
                run_metadata: Mapping, extra: Mapping) -> dict:
    """Upload the shard's table, then its completion record.

    Args:
        fs, root: output filesystem and root path.
        shard_id: the shard's id.
        rows: the shard's rows, in shard order, or their finished spool file (workers stream
            rows to one: :mod:`pipeline.spool`; ``run_metadata`` is then already in it).
        run_metadata: JSON stored in the Parquet file metadata.
        extra: more fields for the completion record (fingerprints, source, worker).

    Returns:
        The completion record.
    """
    if isinstance(rows, SpooledTable):
        rows.upload(fs, labels_path(root, shard_id))
        counts, size, digest = rows.counts, rows.num_bytes, rows.sha256
    else:
        data = table_bytes(rows, run_metadata)
        put_bytes(fs, labels_path(root, shard_id), data)
        counts, size, digest = shard_counts(rows), len(data), hashlib.sha256(data).hexdigest()
    record = {
        "shard_id": shard_id, **counts, "bytes": size, "sha256": digest,
        "written_at": _now(), **extra,
    }
    put_bytes(fs, done_path(root, shard_id), json.dumps(record, sort_keys=True).encode())
    return record


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

"""Write one shard's output: its Parquet table in one PUT, then its completion record.

Every attempt writes its own table, ``OUTPUT/labels/<shard_id>.<run_id>-<attempt>.parquet``,
so two attempts (a retry and a zombie, or two runs) never overwrite each other. The shard is
done only when its completion record ``OUTPUT/_done/<shard_id>.json`` is created, with a
conditional create (the first attempt wins), naming the exact table it certifies (its name,
byte size and SHA-256, the run id and attempt, the run fingerprint). An attempt that loses
the race, or whose run no longer holds the output's lease, deletes its own table; a table
that no record names is never read (and is removed by the next run's cleanup).
"""

from __future__ import annotations

import collections
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import rows_to_table
from schemas.completion import labels_object_name, record_labels_name
from schemas.io import done_path
from schemas.times import utc_timestamp

from .conditional import PreconditionFailed, create_object, read_object
from .spool import SpooledTable
from .storage import put_bytes, remove_object

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


class ShardSuperseded(RuntimeError):
    """The shard's completion record was created by a run with another fingerprint."""


def write_shard(fs: Any, root: str, shard_id: str, rows: Sequence[Mapping] | SpooledTable,
                run_metadata: Mapping, extra: Mapping, run_id: str = "local", attempt: int = 0,
                before_certify: Callable[[], None] | None = None) -> dict:
    """Upload the attempt's table, then certify it (conditional completion record).

    Args:
        fs, root: output filesystem and root path.
        shard_id: the shard's id.
        rows: the shard's rows, in shard order, or their finished spool file (workers stream
            rows to one: :mod:`pipeline.spool`; ``run_metadata`` is then already in it).
        run_metadata: JSON stored in the Parquet file metadata.
        extra: more fields for the completion record (fingerprints, source, worker).
        run_id, attempt: the writing run and the shard's attempt in it (name the table).
        before_certify: called right before the record is created (the lease check); an
            exception from it deletes the table and propagates.

    Returns:
        The completion record that holds: this attempt's, or (``superseded_attempt`` set)
        the one an earlier attempt of the same configuration created first.
    """
    name = labels_object_name(shard_id, run_id, attempt)
    if isinstance(rows, SpooledTable):
        rows.upload(fs, f"{root}/{name}")
        counts, size, digest = rows.counts, rows.num_bytes, rows.sha256
    else:
        data = table_bytes(rows, run_metadata)
        put_bytes(fs, f"{root}/{name}", data)
        counts, size, digest = shard_counts(rows), len(data), hashlib.sha256(data).hexdigest()
    record = {
        "shard_id": shard_id, **counts, "labels": name, "bytes": size, "sha256": digest,
        "run_id": run_id, "attempt": attempt,
        "written_at": utc_timestamp(), **extra,
    }
    return certify(fs, root, record, before_certify)


def certify(fs: Any, root: str, record: dict,
            before_certify: Callable[[], None] | None = None) -> dict:
    """Create the completion record of ``record["labels"]`` unless the shard has one.

    Raises:
        ShardSuperseded: the shard was certified by a run of another fingerprint.
    """
    shard_id, own = record["shard_id"], f"{root}/{record['labels']}"
    try:
        if before_certify is not None:
            before_certify()
        create_object(fs, done_path(root, shard_id), json.dumps(record, sort_keys=True).encode())
        return record
    except PreconditionFailed:
        winner = _existing(fs, root, shard_id)
    except BaseException:
        remove_object(fs, own)
        raise
    if winner is not None and record_labels_name(winner, shard_id) == record["labels"]:
        return record  # our own create, answered late and retried
    remove_object(fs, own)
    if winner is None or winner.get("fingerprint") != record.get("fingerprint"):
        raise ShardSuperseded(f"shard {shard_id} was certified meanwhile by another "
                              "configuration's run; rerun the job to relabel it")
    return {**winner, "superseded_attempt": record["attempt"]}


def _existing(fs: Any, root: str, shard_id: str) -> dict | None:
    found = read_object(fs, done_path(root, shard_id))
    try:
        return json.loads(found[0]) if found else None
    except ValueError:
        return None


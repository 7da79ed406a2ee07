"""Stream a shard's rows to a local Parquet spool file in row groups, then upload it whole.

A worker never holds more than one row group of a shard's rows (``group_rows``, default
1024, and ``group_bytes``, default 64 MiB of encoded masks, confidence maps and messages,
whichever comes first: with ``--confidence`` on multi-megapixel images a few rows already
weigh that much): each full group is encoded and appended to a temporary local file, whose size and
SHA-256 are known when it is closed. The finished file is uploaded in one piece
(``put_file``: a multipart upload on object stores; on local disks a copy to a temporary name
renamed into place), so the output object appears whole or not at all. Spool files carry
their process id; those of processes that no longer exist (workers killed mid-shard) are
removed when a worker starts (:func:`remove_stale_spools`).
"""

from __future__ import annotations

import collections
import contextlib
import glob
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.completion import PARTIAL_SUFFIX
from schemas.labels import label_schema, with_run_metadata

from .storage import is_local, retry

PARQUET_COMPRESSION = "zstd"
GROUP_ROWS = 1024
GROUP_BYTES = 64 * 2**20
SPOOL_PREFIX = "cass-spool-"


@dataclass
class SpooledTable:
    """A closed spool file and what the completion record says about it.

    Attributes:
        path: local path of the Parquet file.
        num_bytes: its size.
        sha256: hex SHA-256 of its bytes.
        counts: image, ok, error and annotation counts (as ``writer.shard_counts``).
    """

    path: str
    num_bytes: int
    sha256: str
    counts: dict = field(default_factory=dict)

    def upload(self, fs: Any, target: str) -> None:
        """Copy the file to ``target`` on ``fs``, whole or not at all, with retries."""
        if not is_local(fs):
            retry(lambda: fs.put_file(self.path, target), f"write {target}")
            return
        directory, name = target.rsplit("/", 1)
        os.makedirs(directory, exist_ok=True)
        partial = f"{directory}/.{name}.{os.getpid()}.{threading.get_ident()}{PARTIAL_SUFFIX}"
        try:
            shutil.copyfile(self.path, partial)
            os.replace(partial, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise


def row_payload_bytes(row: Mapping) -> int:
    """The bytes a label row holds beyond its fixed-size fields: RLE counts strings,
    bytes/str values (confidence PNG, error message, URIs) and presence/score lists."""
    total = 0
    for value in row.values():
        if isinstance(value, (bytes, str)):
            total += len(value)
        elif isinstance(value, (list, tuple)):
            total += 8 * len(value)
    for annotation in row.get("annotations") or ():
        total += len(annotation.get("segmentation", {}).get("counts") or "") + 64
    return total


class RowSpool:
    """Label rows -> a local Parquet file, one row group at a time (bounded memory)."""

    def __init__(self, run_metadata: Mapping, group_rows: int = GROUP_ROWS,
                 directory: str | None = None, group_bytes: int = GROUP_BYTES) -> None:
        """Open a spool file.

        Args:
            run_metadata: JSON stored in the Parquet file metadata (as ``rows_to_table``).
            group_rows: rows per row group (the most rows held in memory).
            directory: where the spool file lives (default: the temporary directory).
            group_bytes: a row group is also written once its rows' payload (RLE counts,
                confidence PNGs, messages; see :func:`row_payload_bytes`) reaches this.
        """
        schema = label_schema()
        self._schema = schema.with_metadata(with_run_metadata(schema, run_metadata))
        handle, self.path = tempfile.mkstemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-",
                                             suffix=".parquet", dir=directory)
        os.close(handle)
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(
            self.path, self._schema, compression=PARQUET_COMPRESSION)
        self._group_rows, self._group_bytes = group_rows, group_bytes
        self._rows: list[Mapping] = []
        self._held_bytes = 0
        self.num_rows = 0
        self._errors: collections.Counter = collections.Counter()
        self._annotations = 0

    def add(self, row: Mapping) -> None:
        """Append one row (written out when its row group is full)."""
        self._rows.append(row)
        self.num_rows += 1
        self._annotations += len(row["annotations"] or [])
        if row["status"] != "ok":
            self._errors[row["status"]] += 1
        self._held_bytes += row_payload_bytes(row)
        if len(self._rows) >= self._group_rows or self._held_bytes >= self._group_bytes:
            self._flush()

    @property
    def held_bytes(self) -> int:
        """Payload bytes of the rows not yet written out."""
        return self._held_bytes

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._schema))
            self._rows, self._held_bytes = [], 0

    def close(self) -> SpooledTable:
        """Write the last row group and the footer; returns the finished file."""
        self._flush()
        self._writer.close()
        self._writer = None
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            while block := f.read(2**20):
                digest.update(block)
        errors = sum(self._errors.values())
        counts = {"num_images": self.num_rows, "num_ok": self.num_rows - errors,
                  "num_errors": errors, "num_annotations": self._annotations,
                  "errors_by_status": dict(sorted(self._errors.items()))}
        return SpooledTable(self.path, os.path.getsize(self.path), digest.hexdigest(), counts)

    def discard(self) -> None:
        """Remove the spool file (after the upload, or when the shard failed)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._rows = []
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def remove_stale_spools(directory: str | None = None) -> int:
    """Delete spool files left by processes that are gone; returns how many."""
    removed = 0
    pattern = os.path.join(directory or tempfile.gettempdir(), f"{SPOOL_PREFIX}*-*.parquet")
    for path in glob.glob(pattern):
        pid = os.path.basename(path)[len(SPOOL_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                os.unlink(path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True

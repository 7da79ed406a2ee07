"""Reading a labeling output: its layout, label tables, streamed rows and the run record.

Output layout (``OUTPUT`` is any fsspec URI: local path, ``s3://bucket/prefix``, ``memory://``)::

    OUTPUT/run.json                                 run record (config, categories, totals)
    OUTPUT/_lease.json                              held by the run writing the output
    OUTPUT/labels/<shard_id>.<run_id>-<n>.parquet   label tables (one per shard attempt)
    OUTPUT/_done/<shard_id>.json                    completion record: names the one table
                                                    of the shard that is in the output

A shard is in the output only through its completion record (:mod:`schemas.completion`);
readers never read a label table that no record names (a late or losing attempt's write).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .labels import Category, parse_run_metadata

LABELS_DIR = "labels"
DONE_DIR = "_done"
RUN_RECORD = "run.json"
LABELS_SUFFIX = ".parquet"
DONE_SUFFIX = ".json"


def open_output(uri: str, storage_options: Mapping | None = None) -> tuple[Any, str]:
    """The fsspec filesystem and root path of an output or input URI."""
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(uri, **dict(storage_options or {}))
    return fs, root.rstrip("/")


def labels_path(root: str, shard_id: str) -> str:
    """Path (within the filesystem) of a shard's label table."""
    return f"{root}/{LABELS_DIR}/{shard_id}{LABELS_SUFFIX}"


def done_path(root: str, shard_id: str) -> str:
    """Path (within the filesystem) of a shard's completion record."""
    return f"{root}/{DONE_DIR}/{shard_id}{DONE_SUFFIX}"


def run_record_path(root: str) -> str:
    return f"{root}/{RUN_RECORD}"


def read_label_table(
    uri_or_path: str,
    filesystem: Any = None,
    storage_options: Mapping | None = None,
    columns: Sequence[str] | None = None,
) -> tuple[pa.Table, dict]:
    """Read one label Parquet file.

    Args:
        uri_or_path: a URI, or a path within ``filesystem`` when that is given.
        filesystem: an fsspec or pyarrow filesystem; resolved from the URI when ``None``.
        storage_options: fsspec options used when resolving the URI.
        columns: optional subset of columns.

    Returns:
        ``(table, metadata)``, metadata as from :func:`schemas.labels.parse_run_metadata`.
    """
    path = uri_or_path
    if filesystem is None:
        filesystem, path = open_output(uri_or_path, storage_options)
    with filesystem.open(path, "rb") as f:
        table = pq.read_table(f, columns=list(columns) if columns else None)
    return table, parse_run_metadata(table.schema.metadata)


def completed_shards(output_uri: str, storage_options: Mapping | None = None) -> list[str]:
    """Sorted shard ids that have a completion record."""
    fs, root = open_output(output_uri, storage_options)
    return _ids_in(fs, f"{root}/{DONE_DIR}", DONE_SUFFIX)


def list_label_files(
    output_uri: str,
    storage_options: Mapping | None = None,
    completed_only: bool = True,
) -> list[str]:
    """Sorted paths (within the output filesystem) of the label tables.

    ``completed_only``: the labels objects certified by completion records, in shard order
    (see :func:`schemas.completion.certified_labels`; raises ``OutputIntegrityError`` when a
    record does not hold or carries another fingerprint than ``run.json``); otherwise every
    labels object, certified or not.
    """
    from .completion import certified_labels

    fs, root = open_output(output_uri, storage_options)
    if completed_only:
        fingerprint = _record_fingerprint(fs, root)
        return [c.path for c in certified_labels(fs, root, fingerprint)]
    names = _ids_in(fs, f"{root}/{LABELS_DIR}", LABELS_SUFFIX)
    return [f"{root}/{LABELS_DIR}/{n}{LABELS_SUFFIX}" for n in names]


def _record_fingerprint(fs: Any, root: str) -> str | None:
    """The run fingerprint in ``run.json`` (None without one)."""
    path = run_record_path(root)
    fs.invalidate_cache(path)
    try:
        record = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    return record.get("fingerprint") if isinstance(record, dict) else None


def iter_label_rows(
    output_uri: str,
    storage_options: Mapping | None = None,
    columns: Sequence[str] | None = None,
    batch_size: int = 256,
    completed_only: bool = True,
) -> Iterator[dict]:
    """Stream rows (dicts) of every label table, shard by shard, batch by batch.

    Memory is bounded by one record batch of ``batch_size`` rows (plus Parquet read buffers).
    """
    fs, _ = open_output(output_uri, storage_options)
    for path in list_label_files(output_uri, storage_options, completed_only):
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            cols = list(columns) if columns else None
            for batch in parquet.iter_batches(batch_size=batch_size, columns=cols):
                yield from batch.to_pylist()


def read_run_record(output_uri: str, storage_options: Mapping | None = None) -> dict:
    """The parsed ``OUTPUT/run.json``.

    Raises:
        FileNotFoundError: the output has no run record.
    """
    fs, root = open_output(output_uri, storage_options)
    path = run_record_path(root)
    if not fs.exists(path):
        raise FileNotFoundError(f"no run record at {output_uri.rstrip('/')}/{RUN_RECORD}")
    with fs.open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def record_categories(record: Mapping) -> list[Category]:
    """The categories stored in a run record (or a parsed file metadata dict)."""
    return [c if isinstance(c, Category) else Category.from_dict(c)
            for c in record.get("categories", [])]


def _ids_in(fs: Any, directory: str, suffix: str) -> list[str]:
    fs.invalidate_cache(directory)
    try:
        names = fs.ls(directory, detail=False)
    except FileNotFoundError:
        return []
    ids = []
    for name in names:
        base = name.rstrip("/").rsplit("/", 1)[-1]
        if base.endswith(suffix):
            ids.append(base[: -len(suffix)])
    return sorted(ids)

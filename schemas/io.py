"""Reading a labeling output: its layout, label tables, streamed rows and the run record.

Output layout (``OUTPUT`` is any fsspec URI: local path, ``s3://bucket/prefix``, ``memory://``)::

    OUTPUT/run.json                                 run record (config, categories, totals)
    OUTPUT/categories.json                          category names (index, id, name,
                                                    synonyms), id2label
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
from .uris import public_uri

LABELS_DIR = "labels"
DONE_DIR = "_done"
RUN_RECORD = "run.json"
CATEGORIES_FILE = "categories.json"
LABELS_SUFFIX = ".parquet"
DONE_SUFFIX = ".json"


def open_uri(uri: str, storage_options: Mapping | None = None) -> tuple[Any, str]:
    """The fsspec filesystem and path of a URI (output, input, report, ground truth), with
    trailing slashes removed: the opener of the pipeline, audits, reviews and jobs (the
    engine, which imports only ``schemas.uris``, opens weight URLs in its stager)."""
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
        filesystem, path = open_uri(uri_or_path, storage_options)
    with filesystem.open(path, "rb") as f:
        table = pq.read_table(f, columns=list(columns) if columns else None)
    return table, parse_run_metadata(table.schema.metadata)


def completed_shards(output_uri: str, storage_options: Mapping | None = None) -> list[str]:
    """Sorted shard ids that have a completion record."""
    fs, root = open_uri(output_uri, storage_options)
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

    fs, root = open_uri(output_uri, storage_options)
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
    Columns a file lacks (``confidence`` in schema 1.0 files) are ``None``.
    """
    fs, _ = open_uri(output_uri, storage_options)
    for path in list_label_files(output_uri, storage_options, completed_only):
        yield from iter_file_rows(fs, path, columns, batch_size)


def iter_file_rows(fs: Any, path: str, columns: Sequence[str] | None = None,
                   batch_size: int = 256) -> Iterator[dict]:
    """Stream the rows of one label file; requested columns it lacks are ``None``."""
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        present = set(parquet.schema_arrow.names)
        cols = [c for c in columns if c in present] if columns else None
        missing = [c for c in columns if c not in present] if columns else []
        for batch in parquet.iter_batches(batch_size=batch_size, columns=cols):
            for row in batch.to_pylist():
                row.update(dict.fromkeys(missing))
                yield row


def categories_document(record: Mapping) -> dict:
    """The ``categories.json`` content for a run record (or parsed file metadata).

    ``categories``: ``{"index", "id", "name", "synonyms"}`` in vocabulary order (``index`` is
    the value in label maps, ``id = index + 1`` the COCO category id); ``id2label`` maps the
    index (as a string, the Hugging Face convention) to the name.
    """
    cats = record_categories(record)
    return {
        "schema_version": record.get("schema_version"),
        "vocabulary_hash": record.get("vocabulary_hash"),
        "random_weights": random_weights_of(record),
        "categories": [{"index": c.id - 1, **c.to_dict()} for c in cats],
        "id2label": {str(c.id - 1): c.name for c in cats},
    }


def random_weights_of(record: Mapping) -> int | None:
    """The random-weights seed a run record (or file metadata ``run``) says was used."""
    for holder in (record.get("identity"), record.get("engine"), record.get("run"),
                   (record.get("run") or {}).get("engine")):
        if isinstance(holder, Mapping) and holder.get("random_weights") is not None:
            return holder["random_weights"]
    return None


def output_provenance(output_uri: str, storage_options: Mapping | None = None) -> dict:
    """What derived files record about their source output.

    Returns:
        ``{"labels", "fingerprint", "preset", "vocabulary_hash", "schema_version",
        "random_weights", "categories": [Category]}`` from ``run.json``, else from the
        first label file's metadata.

    Raises:
        FileNotFoundError: neither a run record nor a label file.
    """
    try:
        record = read_run_record(output_uri, storage_options)
    except FileNotFoundError:
        files = list_label_files(output_uri, storage_options)
        if not files:
            raise
        fs, _ = open_uri(output_uri, storage_options)
        with fs.open(files[0], "rb") as f:
            meta = parse_run_metadata(pq.ParquetFile(f).schema_arrow.metadata)
        record = {**meta["run"], "categories": [c.to_dict() for c in meta["categories"]],
                  "vocabulary_hash": meta["vocabulary_hash"],
                  "schema_version": meta["schema_version"]}
    random = random_weights_of(record)
    return {
        "labels": public_uri(output_uri), "fingerprint": record.get("fingerprint"),
        "preset": record.get("preset"), "vocabulary_hash": record.get("vocabulary_hash"),
        "schema_version": record.get("schema_version"), "random_weights": random,
        "random_weights_note": (None if random is None else "labels made with seeded random "
                                "weights: meaningless masks (smoke run)"),
        "categories": record_categories(record),
    }


def read_run_record(output_uri: str, storage_options: Mapping | None = None) -> dict:
    """The parsed ``OUTPUT/run.json``.

    Raises:
        FileNotFoundError: the output has no run record.
    """
    fs, root = open_uri(output_uri, storage_options)
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

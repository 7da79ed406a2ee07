"""Source images read back from a run's inputs: one reader for exports, datasets, audit
overlays and review sheets.

A row names its image by ``source_uri`` (the image file, or the tar/Parquet shard holding
it), ``key`` and ``image_id``. Shards are read with the labeling job's own reader
(:func:`pipeline.readers.iter_raw_images`) and each item is matched on the ``image_id`` the
job gave it (``<shard_id>/<key>``, or the reader's own id for a repeated Parquet id; the
shard id is the part before the first ``/``, shard ids having no ``/``). So a tar member is
found by its key exactly as the job named it (member name without its final extension, only
members with an image extension taken), keys that took a ``~n`` suffix or the full member
name and rows of repeated Parquet ids find their own bytes, and member names are only ever
compared as strings, never used as paths. Image-file rows read their own file.

:class:`SourceReader` reads one image at a time, streaming a shard forward (rows of one label
file come in shard order; a key not found ahead is looked for once more from the start);
:func:`read_sources` reads a set of images in one pass per shard. Bytes are decoded by the
pipeline's decoder (:func:`pipeline.decode.decode_image`, the one image rule of
:mod:`cass_engine.images`), so pixels are exactly what the engine labelled. Memory holds one
label record batch and one image at a time. Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from schemas.io import iter_file_rows, list_label_files, open_uri, read_run_record
from schemas.labels import STATUS_OK, make_image_id

from .decode import decode_image, max_encoded_bytes
from .readers import RawImage, iter_raw_images
from .shards import PARQUET_EXTENSIONS, TAR_EXTENSIONS, ShardSpec
from .storage import read_bytes

DEFAULT_MAX_PIXELS = 1 << 28
#: Largest source image :func:`read_sources` reads by default (review tasks embed them).
MAX_SOURCE_BYTES = 64 * 1024 * 1024
CLOUD_SCHEMES = ("s3://", "gs://", "gcs://")


def source_kind(uri: str) -> str:
    """``webdataset``, ``parquet`` or ``images`` from a row's ``source_uri``."""
    lower = uri.lower()
    if lower.endswith(TAR_EXTENSIONS):
        return "webdataset"
    if lower.endswith(PARQUET_EXTENSIONS):
        return "parquet"
    return "images"


@dataclass(frozen=True)
class SourceRef:
    """Where one image's bytes live (a labels row's ``image_id``, ``source_uri``, ``key``).

    Attributes:
        shard_id: the row's shard id; empty: taken from ``image_id``.
    """

    image_id: str
    source_uri: str
    key: str
    shard_id: str = ""

    @property
    def kind(self) -> str:
        """``webdataset``, ``parquet`` or ``images`` (the pipeline's shard kinds)."""
        return source_kind(self.source_uri)

    @property
    def shard(self) -> str:
        """The shard id: given, or the part of ``image_id`` before its first ``/``."""
        return self.shard_id or self.image_id.split("/", 1)[0]

    @property
    def cloud_url(self) -> str | None:
        """The object URL when the image is its own object in S3 or GCS, else ``None``."""
        if self.kind == "images" and self.source_uri.startswith(CLOUD_SCHEMES):
            return self.source_uri.replace("gcs://", "gs://", 1)
        return None


class _ShardCursor:
    """Walks one tar/Parquet shard forward, finding items by ``image_id``."""

    def __init__(self, uri: str, shard_id: str, io: Mapping, storage_options: Mapping | None,
                 max_bytes: int | None) -> None:
        self.uri, self.shard_id = uri, shard_id
        self._fs, path = open_uri(uri, storage_options)
        self._spec = ShardSpec(shard_id, source_kind(uri), (path,), (), uri, "")
        self._columns = (io.get("image_column") or "image", io.get("id_column"))
        self._max_bytes = max_bytes
        self._items: Iterator[tuple[str, RawImage]] | None = None
        self.damage: str | None = None  # the shard's own read error, if one was met

    def scan(self) -> Iterator[tuple[str, RawImage]]:
        """``(image_id, item)`` for every image of the shard, in shard order."""
        for raw in iter_raw_images(self._spec, self._fs, *self._columns, self._max_bytes):
            if raw.error is not None and raw.error[0] == "decode_error":
                self.damage = f"cannot read {self.uri}: {raw.error[0]}: {raw.error[1]}"
                continue  # the archive itself is damaged (no image of its own)
            yield raw.image_id or make_image_id(self.shard_id, raw.key), raw

    def find(self, image_id: str) -> RawImage | None:
        for restart in (False, True):
            if self._items is None or restart:
                self._items = self.scan()
            for found, item in self._items:
                if found == image_id:
                    return item
        self._items = None
        return None


def _item_bytes(raw: RawImage) -> bytes | str:
    if raw.error is not None:
        return f"source {raw.error[0]}: {raw.error[1]}"
    return raw.data if raw.data is not None else b""


class SourceReader:
    """Encoded bytes of source images, one at a time (streams each shard forward).

    Args:
        io: the run record's ``io`` block (``image_column``, ``id_column``).
        storage_options: fsspec options for the source images.
        max_bytes: larger images are not read (an error message instead).
    """

    def __init__(self, io: Mapping | None = None, storage_options: Mapping | None = None,
                 max_bytes: int | None = MAX_SOURCE_BYTES) -> None:
        self.io = dict(io or {})
        self.storage_options = dict(storage_options or {})
        self.max_bytes = max_bytes
        self._cursor: _ShardCursor | None = None

    def read(self, ref: SourceRef) -> bytes | str:
        """The image's bytes, or a one-line reason why they could not be read."""
        try:
            if ref.kind == "images":
                return self._file(ref.source_uri)
            cursor = self._cursor_for(ref)
            raw = cursor.find(ref.image_id)
        except (OSError, ValueError) as exc:
            return f"source unreadable: {type(exc).__name__}: {exc}"
        if raw is None:
            return cursor.damage or f"key {ref.key!r} not found in {ref.source_uri}"
        return _item_bytes(raw)

    def _file(self, uri: str) -> bytes | str:
        fs, path = open_uri(uri, self.storage_options)
        size = fs.size(path) if self.max_bytes is not None else None
        if size is not None and size > self.max_bytes:
            return f"{uri} has {size} bytes (limit {self.max_bytes})"
        return read_bytes(fs, path)

    def _cursor_for(self, ref: SourceRef) -> _ShardCursor:
        cursor = self._cursor
        if cursor is None or (cursor.uri, cursor.shard_id) != (ref.source_uri, ref.shard):
            cursor = _ShardCursor(ref.source_uri, ref.shard, self.io, self.storage_options,
                                  self.max_bytes)
            self._cursor = cursor
        return cursor

    def read_many(self, refs: Iterable[SourceRef]) -> dict[str, bytes | str]:
        """Bytes (or the reason) of each image, ``image_id -> bytes | str``; one pass over
        each shard for all the images it holds, in any order."""
        by_source: dict[tuple[str, str], list[SourceRef]] = {}
        for ref in refs:
            by_source.setdefault((ref.source_uri, ref.shard), []).append(ref)
        out: dict[str, bytes | str] = {}
        for (uri, shard_id), group in by_source.items():
            if group[0].kind == "images":
                found = {r.image_id: self.read(r) for r in group}
            else:
                found = self._one_pass(uri, shard_id, {r.image_id for r in group})
            for ref in group:
                out[ref.image_id] = found.get(ref.image_id, f"{ref.key!r} not found in {uri}")
        return out

    def _one_pass(self, uri: str, shard_id: str, wanted: set[str]) -> dict[str, bytes | str]:
        out: dict[str, bytes | str] = {}
        try:
            cursor = _ShardCursor(uri, shard_id, self.io, self.storage_options, self.max_bytes)
            for image_id, raw in cursor.scan():
                if image_id in wanted and image_id not in out:
                    out[image_id] = _item_bytes(raw)
                    if len(out) == len(wanted):
                        return out
        except Exception as exc:  # noqa: BLE001 - any unreadable source is reported per image
            cursor_damage = f"cannot read {uri}: {type(exc).__name__}: {exc}"
            return {**{i: cursor_damage for i in wanted}, **out}
        if cursor.damage is not None:
            out.update({i: cursor.damage for i in wanted - set(out)})
        return out


def read_sources(refs: Iterable[SourceRef], storage_options: Mapping | None = None,
                 io: Mapping | None = None,
                 max_bytes: int | None = MAX_SOURCE_BYTES) -> dict[str, bytes | str]:
    """``image_id -> bytes`` (or a one-line reason) for each image, one pass per shard.

    Args:
        refs: the images.
        storage_options: fsspec options.
        io: the run record's ``io`` block (Parquet ``image_column`` / ``id_column``).
        max_bytes: larger images are not read.
    """
    return SourceReader(io, storage_options, max_bytes).read_many(refs)


def decode_source(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | str:
    """``[H, W, 3]`` uint8 RGB as the engine saw it, or a one-line reason."""
    decoded = decode_image(data, max_pixels)
    if decoded.status != STATUS_OK:
        return f"source image {decoded.status}: {decoded.error}"
    return decoded.rgb


@dataclass
class SourceItem:
    """One label row with its image.

    Attributes:
        row: the label row (requested columns).
        rgb: ``[H, W, 3]`` uint8 as the engine saw it; None for error rows or unreadable
            sources.
        data: the source's encoded bytes (None when ``rgb`` is None).
        error: why the image is missing for an ``ok`` row (None otherwise).
    """

    row: dict
    rgb: np.ndarray | None = None
    data: bytes | None = None
    error: str | None = None


class SourceJoin:
    """Streams ``SourceItem`` s for the label files of an output.

    Args:
        io: the run record's ``io`` block (``image_column``, ``id_column``).
        storage_options: fsspec options for the labels and the source images.
        max_pixels: decompression-bomb limit when decoding (default: the run's
            ``max_image_pixels``, else :data:`DEFAULT_MAX_PIXELS`).
    """

    def __init__(self, io: Mapping | None = None, storage_options: Mapping | None = None,
                 max_pixels: int | None = None) -> None:
        self.io = dict(io or {})
        self.storage_options = dict(storage_options or {})
        self.max_pixels = max_pixels or self.io.get("max_image_pixels") or DEFAULT_MAX_PIXELS
        self._reader = SourceReader(self.io, self.storage_options,
                                    max_encoded_bytes(self.max_pixels))

    def items(self, fs: Any, path: str, columns: Sequence[str] | None = None,
              want: Any = None) -> Iterator[SourceItem]:
        """Items of one label file, in row order.

        Args:
            fs, path: the label file.
            columns: label columns to read (``status``, ``key``, ``source_uri``, ``width``,
                ``height`` are always added).
            want: optional predicate on a row; rows it rejects are not read from the source
                (and not yielded).
        """
        base = ["image_id", "status", "error", "key", "source_uri", "width", "height"]
        cols = list(dict.fromkeys(base + list(columns or [])))
        for row in iter_file_rows(fs, path, cols):
            if want is not None and not want(row):
                continue
            if row["status"] != STATUS_OK:
                yield SourceItem(row)
                continue
            yield self._with_image(row)
        self._reader = SourceReader(self.io, self.storage_options,
                                    max_encoded_bytes(self.max_pixels))

    def _with_image(self, row: dict) -> SourceItem:
        ref = SourceRef(str(row["image_id"]), str(row["source_uri"]), str(row["key"]))
        data = self._reader.read(ref)
        if isinstance(data, str):
            return SourceItem(row, error=data)
        rgb = decode_source(data, self.max_pixels)
        if isinstance(rgb, str):
            return SourceItem(row, error=rgb)
        if rgb.shape[:2] != (row["height"], row["width"]):
            return SourceItem(row, error=f"source image is {rgb.shape[1]}x{rgb.shape[0]}, "
                              f"labels are {row['width']}x{row['height']}")
        return SourceItem(row, rgb, data)


def label_files(output_uri: str, storage_options: Mapping | None = None
                ) -> tuple[Any, list[str]]:
    """The output filesystem and its completed label files (one helper for every reader)."""
    fs, _ = open_uri(output_uri, storage_options)
    return fs, list_label_files(output_uri, storage_options)


def run_io(output_uri: str, storage_options: Mapping | None = None) -> dict:
    """The ``io`` block of an output's run record (``{}`` without a readable record): the
    Parquet columns and pixel limit its sources were read with."""
    try:
        return dict(read_run_record(output_uri, storage_options).get("io") or {})
    except (OSError, ValueError):
        return {}

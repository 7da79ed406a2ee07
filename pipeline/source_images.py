"""The source image of every label row, streamed: labels files joined with their input shards.

Rows of one label file come from one input shard, in shard order, so a tar or Parquet shard
is read once, front to back, alongside its rows (a key not found ahead is looked for once
more from the start, in case the order differs). Image-file rows read their own file. The
bytes go through the pipeline's own readers and decoder, so keys and pixels (EXIF
orientation, RGB conversion) are exactly what the engine labelled. Memory holds one label
record batch and one image at a time. Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from schemas.io import iter_file_rows, list_label_files, open_output
from schemas.labels import STATUS_OK

from .decode import decode_image
from .readers import RawImage, iter_raw_images
from .shards import PARQUET_EXTENSIONS, TAR_EXTENSIONS, ShardSpec
from .storage import read_bytes

DEFAULT_MAX_PIXELS = 1 << 28


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


def source_kind(uri: str) -> str:
    """``webdataset``, ``parquet`` or ``images`` from a row's ``source_uri``."""
    lower = uri.lower()
    if lower.endswith(TAR_EXTENSIONS):
        return "webdataset"
    if lower.endswith(PARQUET_EXTENSIONS):
        return "parquet"
    return "images"


class _ShardCursor:
    """Walks one tar/Parquet shard forward, finding members by key."""

    def __init__(self, uri: str, io: Mapping, storage_options: Mapping | None) -> None:
        self.uri = uri
        self._fs, path = open_output(uri, storage_options)
        self._spec = ShardSpec("export", source_kind(uri), (path,), (), uri, "")
        self._io = io
        self._items: Iterator[RawImage] | None = None

    def _open(self) -> Iterator[RawImage]:
        return iter_raw_images(self._spec, self._fs, self._io.get("image_column") or "image",
                               self._io.get("id_column"))

    def find(self, key: str) -> RawImage | None:
        for restart in (False, True):
            if self._items is None or restart:
                self._items = self._open()
            for item in self._items:
                if item.key == key:
                    return item
        self._items = None
        return None


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
        self._cursor: _ShardCursor | None = None

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
        self._cursor = None

    def _with_image(self, row: dict) -> SourceItem:
        try:
            raw = self._raw(row["source_uri"], row["key"])
        except (OSError, ValueError) as exc:
            return SourceItem(row, error=f"source unreadable: {type(exc).__name__}: {exc}")
        if raw is None:
            return SourceItem(row, error=f"key {row['key']!r} not found in {row['source_uri']}")
        if raw.error is not None:
            return SourceItem(row, error=f"source {raw.error[0]}: {raw.error[1]}")
        data = raw.data if raw.data is not None else b""
        decoded = decode_image(data, self.max_pixels)
        if decoded.status != STATUS_OK:
            return SourceItem(row, error=f"source image {decoded.status}: {decoded.error}")
        if (decoded.height, decoded.width) != (row["height"], row["width"]):
            return SourceItem(row, error=f"source image is {decoded.width}x{decoded.height}, "
                              f"labels are {row['width']}x{row['height']}")
        return SourceItem(row, decoded.rgb, data)

    def _raw(self, uri: str, key: str) -> RawImage | None:
        if source_kind(uri) == "images":
            fs, path = open_output(uri, self.storage_options)
            return RawImage(key, uri, data=read_bytes(fs, path))
        if self._cursor is None or self._cursor.uri != uri:
            self._cursor = _ShardCursor(uri, self.io, self.storage_options)
        return self._cursor.find(key)


def label_files(output_uri: str, storage_options: Mapping | None = None
                ) -> tuple[Any, list[str]]:
    """The output filesystem and its completed label files (one helper for every reader)."""
    fs, _ = open_output(output_uri, storage_options)
    return fs, list_label_files(output_uri, storage_options)

"""Read a shard's images as raw bytes, streaming: tar members, Parquet rows, or image files.

Archive member names are only ever used as *keys* (strings in the output); nothing is
extracted to the filesystem. Tar shards are read as a stream and member headers are dropped
once read; the keys seen so far are kept (to keep them unique) as 8-byte digests. A shard
file that is not a valid archive (corrupt, truncated, not a tar/Parquet file) yields one
error item for the archive itself, and the items read before the damage; the shard still
completes.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import make_image_id

from .shards import IMAGE_EXTENSIONS, ShardSpec, printable
from .storage import read_bytes, retry

PARQUET_BATCH_ROWS = 32
TAR_BLOCK_BYTES = 8 * 2**20


@dataclass
class RawImage:
    """One image's bytes (or where to fetch them), before decoding.

    Attributes:
        key: the image's key within its shard.
        source_uri: URI of the image file or of its shard.
        data: the encoded bytes, or None when ``path`` must be fetched (image files).
        path: object path to fetch lazily (image files), else None.
        error: ``(status, message)`` when the item could not be read at all.
        image_id: the row's ``image_id`` when it is not ``<shard_id>/<key>`` (a Parquet id
            that repeats in its shard: the key keeps the original id).
    """

    key: str
    source_uri: str
    data: bytes | None = None
    path: str | None = None
    error: tuple[str, str] | None = None
    image_id: str | None = None

    def load(self, fs: Any) -> bytes:
        """The bytes, fetching ``path`` (with retries) when needed."""
        if self.data is None and self.path is not None:
            self.data = read_bytes(fs, self.path)
        return self.data if self.data is not None else b""


def iter_raw_images(shard: ShardSpec, fs: Any, image_column: str = "image",
                    id_column: str | None = None,
                    max_bytes: int | None = None) -> Iterator[RawImage]:
    """Yield the shard's images in shard order.

    Args:
        max_bytes: tar members and image files larger than this become ``too_large`` error
            items without being read (Parquet cells arrive with their row group).
    """
    if shard.kind == "webdataset":
        yield from _iter_tar(shard, fs, max_bytes)
    elif shard.kind == "parquet":
        yield from _iter_parquet(shard, fs, image_column, id_column)
    elif shard.kind == "images":
        sizes = shard.sizes or (0,) * len(shard.paths)
        for path, key, size in zip(shard.paths, shard.keys, sizes, strict=True):
            uri = printable(fs.unstrip_protocol(path))
            if max_bytes is not None and size > max_bytes:
                yield RawImage(key, uri, error=_too_many_bytes(size, max_bytes))
            else:
                yield RawImage(key, uri, path=path)
    else:
        raise ValueError(f"unknown shard kind {shard.kind!r}")


def _too_many_bytes(size: int, max_bytes: int) -> tuple[str, str]:
    return ("too_large", f"{size} bytes exceeds the limit of {max_bytes} for one image "
            "(derived from --max-image-pixels); not read")


def _archive_key(shard: ShardSpec) -> str:
    return shard.paths[0].rsplit("/", 1)[-1]


class KeySet:
    """A set of keys in about 8 bytes each: 64-bit BLAKE2b digests, in a sorted array plus a
    small set of recent ones (a shard of millions of members stays small).

    Two distinct keys with the same digest (odds about n^2 / 2^65) would only make the second
    one take its full member name as key: keys stay unique.
    """

    def __init__(self, buffer: int = 65536) -> None:
        self._sorted = np.empty(0, dtype=np.uint64)
        self._recent: set[int] = set()
        self._buffer = buffer

    @staticmethod
    def _digest(key: str) -> int:
        data = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(data, "little")

    def __contains__(self, key: str) -> bool:
        digest = self._digest(key)
        if digest in self._recent:
            return True
        index = int(np.searchsorted(self._sorted, np.uint64(digest)))
        return index < len(self._sorted) and int(self._sorted[index]) == digest

    def add(self, key: str) -> None:
        self._recent.add(self._digest(key))
        if len(self._recent) >= self._buffer:
            recent = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
            self._sorted = np.union1d(self._sorted, recent)
            self._recent.clear()


def _iter_tar(shard: ShardSpec, fs: Any, max_bytes: int | None) -> Iterator[RawImage]:
    path = shard.paths[0]
    seen = KeySet()
    with retry(lambda: fs.open(path, "rb", block_size=TAR_BLOCK_BYTES), f"open {path}") as f:
        try:
            with tarfile.open(fileobj=f, mode="r|") as archive:
                while (member := archive.next()) is not None:
                    item = _tar_item(archive, member, shard, seen, max_bytes)
                    archive.members.clear()  # tarfile would keep every header otherwise
                    if item is not None:
                        yield item
                end = archive.offset
            if not _ends_cleanly(f, end):
                raise tarfile.ReadError(f"no end-of-archive marker at byte {end}")
        except (tarfile.TarError, EOFError, ValueError) as exc:
            yield RawImage(_archive_key(shard), shard.source_uri,
                           error=("decode_error", f"invalid or truncated tar archive: {exc}"))


def _ends_cleanly(f: Any, offset: int) -> bool:
    """Whether a zero block (end-of-archive marker) follows the last member.

    ``tarfile`` stops silently at a truncation or garbage between members; this tells a
    complete archive from a damaged one.
    """
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and block.count(0) == tarfile.BLOCKSIZE


def _tar_item(archive: tarfile.TarFile, member: tarfile.TarInfo, shard: ShardSpec,
              seen: KeySet, max_bytes: int | None = None) -> RawImage | None:
    """A tar member as a RawImage, or None for non-image members (json, txt, dirs...)."""
    name = member.name
    if not member.isfile() or not name.lower().endswith(IMAGE_EXTENSIONS):
        return None
    key = printable(tar_key(name))
    if key in seen:
        key = printable(name)
    base, n = key, 1
    while key in seen:  # distinct raw names that print alike
        n += 1
        key = f"{base}~{n}"
    seen.add(key)
    if max_bytes is not None and member.size > max_bytes:  # skipped unread by the stream
        return RawImage(key, shard.source_uri, error=_too_many_bytes(member.size, max_bytes))
    handle = archive.extractfile(member)
    data = handle.read() if handle is not None else b""
    return RawImage(key, shard.source_uri, data=data)


def tar_key(member_name: str) -> str:
    """WebDataset key of a member: its name without the final extension (a string only)."""
    directory, _, base = member_name.rpartition("/")
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return f"{directory}/{stem}" if directory else stem


def _iter_parquet(shard: ShardSpec, fs: Any, image_column: str,
                  id_column: str | None) -> Iterator[RawImage]:
    path = shard.paths[0]
    with retry(lambda: fs.open(path, "rb"), f"open {path}") as f:
        try:
            parquet = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as exc:
            yield RawImage(_archive_key(shard), shard.source_uri,
                           error=("decode_error", f"invalid Parquet file: {exc}"))
            return
        columns = [image_column] + ([id_column] if id_column else [])
        row, seen = 0, KeySet()  # bounded: ~8 bytes per row
        batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns)
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError, ValueError) as exc:
                yield RawImage(f"{_archive_key(shard)}#row{row}", shard.source_uri,
                               error=("decode_error", f"unreadable Parquet data from row {row} "
                                      f"on: {type(exc).__name__}: {exc}"))
                return
            if batch is None:
                return
            images = batch.column(image_column).to_pylist()
            ids = batch.column(id_column).to_pylist() if id_column else [None] * len(images)
            for value, ident in zip(images, ids, strict=True):
                key = str(ident) if ident is not None else f"{row:08d}"
                unique = _unique_key(key, row, seen)
                image_id = None if unique == key else make_image_id(shard.shard_id, unique)
                yield RawImage(key, shard.source_uri, data=image_bytes(value),
                               image_id=image_id)
                row += 1


def _unique_key(key: str, row: int, seen: KeySet) -> str:
    """``key``, or ``key~<row>`` (then ``~2``, ...) when an earlier row of the shard took it:
    repeated and null ``--id-column`` values still give unique, deterministic image ids
    (a null's key is its row number, which a real id may also be)."""
    unique, n = key, 1
    while unique in seen:
        unique = f"{key}~{row}" if n == 1 else f"{key}~{row}~{n}"
        n += 1
    seen.add(unique)
    return unique


def image_bytes(value: object) -> bytes:
    """Bytes of a Parquet image cell: binary, or a struct with ``bytes`` (Hugging Face)."""
    if value is None:
        return b""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return b""


def parquet_columns(fs: Any, path: str) -> list[str]:
    """Column names of a Parquet file (footer only)."""
    with retry(lambda: fs.open(path, "rb"), f"open {path}") as f:
        return list(pq.ParquetFile(f).schema_arrow.names)

"""The photographs behind labels rows: bytes from loose files, tar members or Parquet rows.

A row names its image by ``source_uri`` (the file, or the shard holding it) and ``key``
(the member stem in a tar shard, the id-column value or zero-padded row number in a Parquet
shard). Shards are read once for all the selected images they hold; tar members are streamed
and matched by the same key rule the labeling job uses (member names are never paths here).
Images larger than ``max_bytes`` are not read.
"""

from __future__ import annotations

import base64
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from schemas.io import open_output

MAX_IMAGE_BYTES = 64 * 1024 * 1024
CLOUD_SCHEMES = ("s3://", "gs://", "gcs://")
_MIME = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF8": "image/gif",
         b"BM": "image/bmp", b"II*\x00": "image/tiff", b"MM\x00*": "image/tiff"}


@dataclass(frozen=True)
class SourceRef:
    """Where one image's bytes live."""

    image_id: str
    source_uri: str
    key: str

    @property
    def kind(self) -> str:
        """``tar``, ``parquet`` or ``file``."""
        lower = self.source_uri.lower()
        if lower.endswith(".tar"):
            return "tar"
        if lower.endswith(".parquet"):
            return "parquet"
        return "file"

    @property
    def cloud_url(self) -> str | None:
        """The object URL when the image is its own object in S3 or GCS, else ``None``."""
        if self.kind == "file" and self.source_uri.startswith(CLOUD_SCHEMES):
            return self.source_uri.replace("gcs://", "gs://", 1)
        return None


def mime_type(data: bytes) -> str:
    """The image MIME type from its magic bytes (``application/octet-stream`` if unknown)."""
    for magic, mime in _MIME.items():
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def data_uri(data: bytes) -> str:
    """The image as a ``data:`` URI (Label Studio shows these like any image URL)."""
    return f"data:{mime_type(data)};base64," + base64.b64encode(data).decode("ascii")


def load_images(refs: Iterable[SourceRef], storage_options: Mapping | None = None,
                parquet_columns: tuple[str, str | None] = ("image", None),
                max_bytes: int = MAX_IMAGE_BYTES) -> dict[str, bytes | str]:
    """Bytes of each image, or a one-line reason why it could not be read.

    Args:
        refs: the images.
        storage_options: fsspec options.
        parquet_columns: ``(image_column, id_column)`` of Parquet input shards.
        max_bytes: larger images are not read.

    Returns:
        ``image_id -> bytes`` (or ``image_id -> str`` error message).
    """
    by_source: dict[str, list[SourceRef]] = {}
    for ref in refs:
        by_source.setdefault(ref.source_uri, []).append(ref)
    out: dict[str, bytes | str] = {}
    for uri, group in by_source.items():
        try:
            found = _read_source(uri, group, storage_options, parquet_columns, max_bytes)
        except Exception as error:  # noqa: BLE001 - any unreadable source is reported per image
            found = {r.image_id: f"cannot read {uri}: {type(error).__name__}: {error}"
                     for r in group}
        for ref in group:
            out[ref.image_id] = found.get(ref.image_id, f"{ref.key!r} not found in {uri}")
    return out


def _read_source(uri: str, group: list[SourceRef], options: Mapping | None,
                 columns: tuple[str, str | None], max_bytes: int) -> dict[str, bytes | str]:
    fs, path = open_output(uri, options)
    kind = group[0].kind
    if kind == "file":
        size = fs.size(path)
        if size is not None and size > max_bytes:
            return {r.image_id: f"{uri} has {size} bytes (limit {max_bytes})" for r in group}
        with fs.open(path, "rb") as f:
            data = f.read()
        return {r.image_id: data for r in group}
    with fs.open(path, "rb") as f:
        if kind == "tar":
            return _from_tar(f, group, max_bytes)
        return _from_parquet(f, group, columns, max_bytes)


def _from_tar(f, group: list[SourceRef], max_bytes: int) -> dict[str, bytes | str]:
    from pipeline.readers import tar_key
    from pipeline.shards import IMAGE_EXTENSIONS, printable

    wanted = {r.key: r.image_id for r in group}
    out: dict[str, bytes | str] = {}
    with tarfile.open(fileobj=f, mode="r|") as archive:
        for member in archive:
            if not member.isfile() or not member.name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            image_id = wanted.get(printable(tar_key(member.name))) or wanted.get(
                printable(member.name))
            if image_id is None or image_id in out:
                continue
            if member.size > max_bytes:
                out[image_id] = f"tar member has {member.size} bytes (limit {max_bytes})"
                continue
            handle = archive.extractfile(member)
            out[image_id] = handle.read() if handle is not None else b""
            if len(out) == len(wanted):
                break
    return out


def _from_parquet(f, group: list[SourceRef], columns: tuple[str, str | None],
                  max_bytes: int) -> dict[str, bytes | str]:
    import pyarrow.parquet as pq

    from pipeline.readers import image_bytes

    image_column, id_column = columns
    wanted = {r.key: r.image_id for r in group}
    out: dict[str, bytes | str] = {}
    parquet = pq.ParquetFile(f)
    names = [image_column] + ([id_column] if id_column else [])
    row = 0
    for batch in parquet.iter_batches(batch_size=64, columns=names):
        images = batch.column(image_column).to_pylist()
        ids = batch.column(id_column).to_pylist() if id_column else [None] * len(images)
        for value, ident in zip(images, ids, strict=True):
            key = str(ident) if ident is not None else f"{row:08d}"
            row += 1
            if key in wanted and wanted[key] not in out:
                data = image_bytes(value)
                out[wanted[key]] = data if len(data) <= max_bytes else \
                    f"Parquet image has {len(data)} bytes (limit {max_bytes})"
        if len(out) == len(wanted):
            break
    return out

"""The photographs behind labels rows, read through the pipeline's own readers.

A row names its image by ``source_uri`` (the file, or the shard holding it), ``shard_id`` and
``image_id``. Shards (tar, ``.parquet``/``.pq``) are streamed once for all the selected images
they hold with :func:`pipeline.readers.iter_raw_images`, and each item is matched on the
``image_id`` the labeling job gave it (``<shard_id>/<key>``, or the reader's own id for a
repeated Parquet id), so tar keys that took a ``~n`` suffix or the full member name, and rows
of repeated Parquet ids, find their own bytes. Image-file rows read their own file. Member
names are never paths here. Images larger than ``max_bytes`` are not read.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pipeline.readers import iter_raw_images
from pipeline.shards import ShardSpec
from pipeline.source_images import source_kind
from pipeline.storage import read_bytes
from schemas.io import open_output
from schemas.labels import make_image_id

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
    shard_id: str = ""

    @property
    def kind(self) -> str:
        """``webdataset``, ``parquet`` or ``images`` (the pipeline's shard kinds)."""
        return source_kind(self.source_uri)

    @property
    def cloud_url(self) -> str | None:
        """The object URL when the image is its own object in S3 or GCS, else ``None``."""
        if self.kind == "images" and self.source_uri.startswith(CLOUD_SCHEMES):
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
    by_source: dict[tuple[str, str], list[SourceRef]] = {}
    for ref in refs:
        by_source.setdefault((ref.source_uri, ref.shard_id), []).append(ref)
    out: dict[str, bytes | str] = {}
    for (uri, _), group in by_source.items():
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
    if kind == "images":
        size = fs.size(path)
        if size is not None and size > max_bytes:
            return {r.image_id: f"{uri} has {size} bytes (limit {max_bytes})" for r in group}
        data = read_bytes(fs, path)
        return {r.image_id: data for r in group}
    shard = ShardSpec(group[0].shard_id, kind, (path,), (), uri, "")
    wanted = {r.image_id for r in group}
    out: dict[str, bytes | str] = {}
    archive_error = None
    for raw in iter_raw_images(shard, fs, columns[0] or "image", columns[1], max_bytes):
        image_id = raw.image_id or make_image_id(shard.shard_id, raw.key)
        if image_id not in wanted or image_id in out:
            if raw.error is not None and raw.error[0] == "decode_error":
                archive_error = raw.error  # the shard itself is damaged
            continue
        if raw.error is not None:
            out[image_id] = f"{raw.error[0]}: {raw.error[1]}"
            continue
        data = raw.data if raw.data is not None else b""
        out[image_id] = data if len(data) <= max_bytes else \
            f"image has {len(data)} bytes (limit {max_bytes})"
        if len(out) == len(wanted):
            break
    if archive_error is not None:
        for image_id in wanted - set(out):
            out[image_id] = f"cannot read {uri}: {archive_error[0]}: {archive_error[1]}"
    return out

"""Small fsspec helpers shared by the readers: open URIs, read text/JSON/label PNGs, source
images (through :mod:`pipeline.source_images`), name aliases."""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Mapping
from typing import Any

import numpy as np

from schemas.io import open_uri

from .errors import AuditError


def read_bytes(uri: str, storage_options: Mapping | None = None, what: str = "file") -> bytes:
    """All bytes of a URI.

    Raises:
        AuditError: missing or unreadable, naming ``what`` and the URI.
    """
    try:
        fs, path = open_uri(uri, storage_options)
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise AuditError(f"{what} not found: {uri}") from None
    except (OSError, ValueError) as error:
        raise AuditError(f"cannot read {what} {uri}: {error}") from None


def read_text(uri: str, storage_options: Mapping | None = None, what: str = "file") -> str:
    """A UTF-8 text file (BOM tolerated)."""
    data = read_bytes(uri, storage_options, what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise AuditError(f"{what} {uri} is not UTF-8 text") from None


def read_json(uri: str, storage_options: Mapping | None = None, what: str = "JSON file") -> Any:
    """A JSON document, with the parse error position in the message."""
    text = read_text(uri, storage_options, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise AuditError(f"{what} {uri} is not valid JSON: {error}") from None


def decode_label_png(data: bytes, where: str) -> np.ndarray:
    """A single-channel label image (PNG: modes L, P, I, I;16) as ``[H, W]`` int64 values.

    Palette images give their indices (as mmseg's pillow backend does).
    """
    from PIL import UnidentifiedImageError

    from cass_engine.formats import open_image  # the decoders' allow-list

    try:
        with open_image(io.BytesIO(data)) as image:
            if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise AuditError(f"{where}: label image has mode {image.mode}; expected a "
                                 "single-channel (L, P or 16-bit) PNG of class indices")
            return np.asarray(image).astype(np.int64)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise AuditError(f"{where}: not a readable image ({error})") from None


def load_source_image(source_uri: str | None, key: str | None,
                      storage_options: Mapping | None = None, image_id: str | None = None,
                      source_io: Mapping | None = None) -> np.ndarray | None:
    """Best effort: the RGB image of a labels row, read and decoded as the labeling job did
    (:class:`pipeline.source_images.SourceReader`: tar members and Parquet rows matched on
    the row's ``image_id``; image files read whole).

    Args:
        source_uri, key, image_id: the row's columns (``image_id`` is needed for tar and
            Parquet sources; it names the shard and the item).
        source_io: the run record's ``io`` block (Parquet columns, ``max_image_pixels``).

    Returns:
        ``[H, W, 3]`` uint8, or ``None`` when it cannot be read (the report then shows masks
        only).
    """
    from pipeline.source_images import DEFAULT_MAX_PIXELS, SourceReader, SourceRef, decode_source

    if not source_uri:
        return None
    source_io = dict(source_io or {})
    ref = SourceRef(image_id or key or "", source_uri, key or "")
    try:
        data = SourceReader(source_io, storage_options).read(ref)
        rgb = data if isinstance(data, str) else decode_source(
            data, source_io.get("max_image_pixels") or DEFAULT_MAX_PIXELS)
    except Exception:  # noqa: BLE001 - overlays are optional; any failure means "no image"
        return None
    return None if isinstance(rgb, str) else rgb


def strip_suffix(name: str) -> str:
    """File name without its last extension: ``"a/b.x.jpg" -> "a/b.x"``."""
    base = posixpath.basename(name)
    stem = base.rsplit(".", 1)[0] if "." in base[1:] else base
    return name[: len(name) - len(base)] + stem


def name_aliases(name: str) -> list[str]:
    """Names an image may be known by: as given, its base name, both without extension."""
    name = name.replace("\\", "/")
    base = posixpath.basename(name)
    out = [name, base, strip_suffix(name), strip_suffix(base)]
    return list(dict.fromkeys(a for a in out if a))


class AliasIndex:
    """Alias -> canonical image key.

    Canonical keys always name their image. Another alias claimed by two different images is
    ambiguous and resolves to nothing (those images are then matched by their other aliases,
    or reported unmatched).
    """

    def __init__(self) -> None:
        self._aliases: dict[str, str | None] = {}
        self._keys: dict[str, None] = {}

    @property
    def keys(self) -> list[str]:
        """Canonical keys in insertion order."""
        return list(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: str, aliases: list[str]) -> None:
        """Register an image; raises ``ValueError`` on a duplicate canonical key."""
        if key in self._keys:
            raise ValueError(f"duplicate image key {key!r}")
        self._keys[key] = None
        for alias in aliases:
            if self._aliases.get(alias, key) != key:
                self._aliases[alias] = None
            else:
                self._aliases[alias] = key

    def match(self, candidates: list[str]) -> str | None:
        """The first candidate that is a canonical key or names exactly one image."""
        for alias in candidates:
            if alias in self._keys:
                return alias
            key = self._aliases.get(alias)
            if key is not None:
                return key
        return None

"""List input shards: WebDataset tars, Parquet files of image bytes, or groups of image files.

Shards are listed in a stable sorted order. A shard id names the output files, so it is made
of safe characters only (``[A-Za-z0-9._-]``); an id changed by that cleaning gets a short hash
of the original path to stay unique.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from schemas.io import open_uri

from .config import IOConfig
from .storage import retry, uri_of

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif",
                    ".ppm", ".pgm", ".pbm", ".jfif")
TAR_EXTENSIONS = (".tar",)
PARQUET_EXTENSIONS = (".parquet", ".pq")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: Ids of the groups of image files: positional, so they are reassigned when the files change.
IMAGE_GROUP_ID = re.compile(r"images-\d{6}")


class InputError(ValueError):
    """The input cannot be listed or has no shards."""


@dataclass(frozen=True)
class ShardSpec:
    """One input shard.

    Attributes:
        shard_id: output name of the shard (safe characters only).
        kind: ``webdataset``, ``parquet`` or ``images``.
        paths: object paths within the input filesystem (one for tar/parquet, the group's
            files for images).
        keys: for ``images``, the key of each path (path relative to the input root).
        source_uri: URI of the shard file, or the input root for image groups.
        fingerprint: changes when the shard's input changes (paths, sizes and versions:
            ETag, generation or modification time, whichever the store reports).
        sizes: for ``images``, the byte size of each path from the listing.
    """

    shard_id: str
    kind: str
    paths: tuple[str, ...]
    keys: tuple[str, ...]
    source_uri: str
    fingerprint: str
    sizes: tuple[int, ...] = ()


def list_shards(io: IOConfig) -> list[ShardSpec]:
    """List the input's shards in a stable order.

    Raises:
        InputError: missing input, nothing to label, or mixed formats with ``auto``.
        PermissionError: credentials rejected by the store.
    """
    fs, root = open_uri(io.input_uri, io.storage_options)
    files, versions = _list_files(fs, root, io.input_uri)
    kind = _detect_kind(files, io.input_format, io.input_uri)
    chosen = sorted(p for p in files if p.lower().endswith(_extensions(kind)))
    if not chosen:
        raise InputError(f"no {kind} files found under {io.input_uri}")
    base = _base_dir(root, io.input_uri)
    if kind == "images":
        return _image_groups(fs, base, chosen, files, io.images_per_shard, versions)
    return _file_shards(fs, base, chosen, files, kind, versions)


def _list_files(fs: Any, root: str, uri: str) -> tuple[dict[str, int], dict[str, str]]:
    """``{path: size}`` and ``{path: version}`` of every file under a prefix, matching a glob,
    or the single file."""
    if any(ch in root for ch in "*?["):
        found = retry(lambda: fs.glob(root, detail=True), f"list {uri}")
        found = {p: i for p, i in found.items() if i["type"] == "file"}
    else:
        fs.invalidate_cache(root)
        info = _info(fs, root, uri)
        found = ({root: info} if info["type"] == "file" else
                 retry(lambda: fs.find(root, detail=True), f"list {uri}"))
    if not found:
        raise InputError(f"input {uri} is empty or does not exist")
    return ({p: int(i.get("size") or 0) for p, i in found.items()},
            {p: _version(i) for p, i in found.items()})


def _version(info: dict) -> str:
    """What changes when an object is rewritten: ETag (S3), generation (GCS), else the
    modification time (local disks, memory)."""
    for name in ("ETag", "generation", "etag", "mtime", "LastModified", "updated", "created"):
        if info.get(name) is not None:
            return f"{name}={info[name]}"
    return ""


def _info(fs: Any, root: str, uri: str) -> dict:
    try:
        return retry(lambda: fs.info(root), f"stat {uri}")
    except FileNotFoundError:
        raise InputError(f"input {uri} does not exist") from None


def _detect_kind(files: dict[str, int], input_format: str, uri: str) -> str:
    if input_format != "auto":
        return input_format
    kinds = {k for k in ("webdataset", "parquet", "images")
             if any(p.lower().endswith(_extensions(k)) for p in files)}
    if len(kinds) > 1:
        raise InputError(f"input {uri} mixes {', '.join(sorted(kinds))} files; "
                         "choose one with --format")
    if not kinds:
        raise InputError(f"no images, .tar or .parquet files found under {uri}")
    return kinds.pop()


def _extensions(kind: str) -> tuple[str, ...]:
    return {"webdataset": TAR_EXTENSIONS, "parquet": PARQUET_EXTENSIONS,
            "images": IMAGE_EXTENSIONS}[kind]


def _base_dir(root: str, uri: str) -> str:
    """Directory that keys and shard ids are relative to."""
    if any(ch in root for ch in "*?["):
        return re.split(r"[*?\[]", root, maxsplit=1)[0].rsplit("/", 1)[0]
    return root


def _relative(path: str, base: str) -> str:
    if path == base:
        return path.rsplit("/", 1)[-1]
    prefix = base.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path.rsplit("/", 1)[-1]


def _file_shards(fs: Any, base: str, paths: list[str], sizes: dict[str, int],
                 kind: str, versions: dict[str, str]) -> list[ShardSpec]:
    shards, used = [], set()
    for path in paths:
        relative = _relative(path, base)
        shard_id = _unique(safe_shard_id(relative.rsplit(".", 1)[0], relative), used)
        fingerprint = _hash(f"{relative}:{sizes.get(path, 0)}:{versions.get(path, '')}")
        shards.append(ShardSpec(shard_id, kind, (path,), (), printable(uri_of(fs, path)),
                                fingerprint))
    return shards


def _image_groups(fs: Any, base: str, paths: list[str], sizes: dict[str, int],
                  per_shard: int, versions: dict[str, str]) -> list[ShardSpec]:
    shards = []
    for index, start in enumerate(range(0, len(paths), per_shard)):
        group = tuple(paths[start:start + per_shard])
        keys = tuple(printable(_relative(p, base)) for p in group)
        group_sizes = tuple(sizes.get(p, 0) for p in group)
        listing = "\n".join(f"{k}:{n}:{versions.get(p, '')}"
                            for k, n, p in zip(keys, group_sizes, group, strict=True))
        shards.append(ShardSpec(f"images-{index:06d}", "images", group, keys,
                                printable(uri_of(fs, base)), _hash(listing), group_sizes))
    return shards


def printable(text: str) -> str:
    """A key as valid UTF-8: bytes that were not (kept by ``surrogateescape`` when names are
    decoded) become U+FFFD, so that every key can be written to Parquet."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def safe_shard_id(name: str, original: str) -> str:
    """Clean a name into a shard id; append a hash of ``original`` when cleaning changed it."""
    flat = name.replace("/", "__")
    cleaned = _SAFE.sub("_", flat).strip("._") or "shard"
    if cleaned != flat:
        cleaned = f"{cleaned[:120]}-{_hash(original)[:8]}"
    return cleaned


def _unique(shard_id: str, used: set[str]) -> str:
    candidate, n = shard_id, 1
    while candidate in used:
        n += 1
        candidate = f"{shard_id}-{n}"
    used.add(candidate)
    return candidate


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()

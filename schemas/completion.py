"""Completion records: which labels object of a shard is the output's, and checking that it is.

A shard is in the output only through its completion record ``OUTPUT/_done/<shard_id>.json``,
created once (conditionally: the first writer wins) after its labels object was written. The
record names the exact object it certifies::

    {"shard_id": "...", "labels": "labels/<shard_id>.<run_id>-<attempt>.parquet",
     "bytes": 12345, "sha256": "...", "run_id": "...", "attempt": 0,
     "fingerprint": "<run fingerprint>", "num_images": ..., ...}

Labels objects that no record names (a zombie worker's late write, an attempt that lost the
race, an interrupted upload) are never read. Every reader of an output goes through
:func:`certified_labels`, which refuses an output whose records do not hold: a record that
cannot be parsed, names a missing object or one of another size (``verify_sha256``: other
contents), or was made with another run fingerprint than ``run.json``'s.

Records written before this contract (schema 1.0 outputs) have no ``labels`` field; they
certify ``labels/<shard_id>.parquet`` (checked for existence, and size when recorded).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .io import DONE_DIR, DONE_SUFFIX, LABELS_DIR, LABELS_SUFFIX

_NAME = re.compile(r"[A-Za-z0-9._-]+")


class OutputIntegrityError(ValueError):
    """An output's completion records do not match its labels objects or its run record."""


@dataclass(frozen=True)
class CertifiedShard:
    """One shard of an output.

    Attributes:
        shard_id: the shard.
        path: its certified labels object (path within the output filesystem).
        record: the completion record.
    """

    shard_id: str
    path: str
    record: dict


@dataclass
class OutputCheck:
    """What an output's completion records certify.

    Attributes:
        certified: ``{shard_id: CertifiedShard}`` of the records that hold.
        problems: ``{shard_id: reason}`` of the records that do not.
        uncertified: labels objects (paths) that no record names.
        objects: every labels object (paths).
    """

    certified: dict[str, CertifiedShard] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    uncertified: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)


def labels_object_name(shard_id: str, run_id: str, attempt: int) -> str:
    """Name (relative to the output root) of one attempt's labels object."""
    return f"{LABELS_DIR}/{shard_id}.{run_id}-{attempt}{LABELS_SUFFIX}"


def record_labels_name(record: Mapping, shard_id: str) -> str:
    """The labels object a record certifies (relative to the root).

    Raises:
        ValueError: the record names something outside ``labels/``.
    """
    name = record.get("labels")
    if name is None:  # schema 1.0 record
        return f"{LABELS_DIR}/{shard_id}{LABELS_SUFFIX}"
    base = str(name).removeprefix(f"{LABELS_DIR}/")
    if str(name) == base or not _NAME.fullmatch(base) or base in (".", ".."):
        raise ValueError(f"names {name!r}, not an object under {LABELS_DIR}/")
    return str(name)


def read_records(fs: Any, root: str) -> dict[str, dict | None]:
    """``{shard_id: record}`` of every completion record (None: not valid JSON).

    Raises:
        OSError: a record could not be read (other than having vanished since the listing);
            callers retry transient errors, so that a flaky read never counts as a bad record.
    """
    directory = f"{root}/{DONE_DIR}"
    names = _list(fs, directory)
    paths = {f"{directory}/{n}": n[: -len(DONE_SUFFIX)] for n in names if n.endswith(DONE_SUFFIX)}
    blobs = fs.cat(list(paths), on_error="return") if paths else {}
    out: dict[str, dict | None] = {}
    for path, shard_id in sorted(paths.items(), key=lambda kv: kv[1]):
        blob = blobs.get(path, blobs.get(fs.unstrip_protocol(path)))
        if isinstance(blob, FileNotFoundError):  # removed since the listing
            continue
        if isinstance(blob, BaseException):
            raise blob
        out[shard_id] = _parse(blob)
    return out


def _parse(blob: Any) -> dict | None:
    if not isinstance(blob, bytes):
        return None
    try:
        record = json.loads(blob)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


#: Suffix of a local upload in progress (``pipeline.spool``; renamed into place when whole).
PARTIAL_SUFFIX = ".partial"


def labels_sizes(fs: Any, root: str) -> dict[str, int]:
    """``{name relative to root: size}`` of every labels object under ``labels/``, and of
    the ``*.partial`` files of local uploads cut short (never certified: garbage)."""
    directory = f"{root}/{LABELS_DIR}"
    fs.invalidate_cache(directory)
    try:
        found = fs.ls(directory, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for info in found:
        if info.get("type") == "directory":
            continue
        base = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
        if base.endswith((LABELS_SUFFIX, PARTIAL_SUFFIX)):
            out[f"{LABELS_DIR}/{base}"] = int(info.get("size") or 0)
    return out


def check_output(fs: Any, root: str, fingerprint: str | None = None,
                 verify_sha256: bool = False,
                 records: Mapping[str, dict | None] | None = None) -> OutputCheck:
    """Check every completion record against the labels objects (and ``fingerprint``).

    Args:
        fs, root: the output filesystem and root path.
        fingerprint: the run fingerprint records must carry (None: not checked).
        verify_sha256: also read every certified object and compare its SHA-256.
        records: already read records (else read here).
    """
    records = read_records(fs, root) if records is None else records
    sizes = labels_sizes(fs, root)
    check = OutputCheck()
    named = set()
    for shard_id, record in records.items():
        reason, name = _problem(shard_id, record, sizes, fingerprint)
        if name is not None:
            named.add(name)
        if reason is None and verify_sha256:
            reason = _sha_problem(fs, f"{root}/{name}", record)
        if reason is None:
            check.certified[shard_id] = CertifiedShard(shard_id, f"{root}/{name}", dict(record))
        else:
            check.problems[shard_id] = reason
    check.uncertified = sorted(f"{root}/{n}" for n in sizes if n not in named)
    check.objects = sorted(f"{root}/{n}" for n in sizes)
    return check


def _problem(shard_id: str, record: dict | None, sizes: Mapping[str, int],
             fingerprint: str | None) -> tuple[str | None, str | None]:
    if record is None:
        return "its completion record is unreadable", None
    try:
        name = record_labels_name(record, shard_id)
    except ValueError as exc:
        return f"its completion record {exc}", None
    if fingerprint and record.get("fingerprint") and record["fingerprint"] != fingerprint:
        return (f"its completion record was made with another configuration (fingerprint "
                f"{str(record['fingerprint'])[:12]}, the output's is {fingerprint[:12]})"), name
    if name not in sizes:
        return f"its labels object {name} is missing", name
    if record.get("bytes") is not None and int(record["bytes"]) != sizes[name]:
        return (f"its labels object {name} has {sizes[name]} bytes, the record says "
                f"{record['bytes']}"), name
    return None, name


def _sha_problem(fs: Any, path: str, record: Mapping) -> str | None:
    expected = record.get("sha256")
    if not expected:
        return None
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        return f"its labels object {path} has other contents (SHA-256 differs)"
    return None


def certified_labels(fs: Any, root: str, fingerprint: str | None = None,
                     verify_sha256: bool = False) -> list[CertifiedShard]:
    """The certified labels objects of an output, in shard order: what readers read.

    Raises:
        OutputIntegrityError: any record does not hold (named, with the first reasons).
    """
    check = check_output(fs, root, fingerprint, verify_sha256)
    if check.problems:
        items = sorted(check.problems.items())
        listed = "; ".join(f"shard {sid}: {why}" for sid, why in items[:3])
        more = f" (and {len(items) - 3} more)" if len(items) > 3 else ""
        raise OutputIntegrityError(
            f"{len(items)} completion record(s) of {root} do not hold: {listed}{more}; "
            "rerun the labeling job on this output to relabel those shards")
    return [check.certified[sid] for sid in sorted(check.certified)]


def _list(fs: Any, directory: str) -> list[str]:
    fs.invalidate_cache(directory)
    try:
        found = fs.ls(directory, detail=False)
    except FileNotFoundError:
        return []
    return [str(p).rstrip("/").rsplit("/", 1)[-1] for p in found]

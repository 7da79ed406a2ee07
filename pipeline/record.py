"""The run record (``OUTPUT/run.json``), the run fingerprint and the resume/mixing checks.

The fingerprint is a hash of everything that determines the labels: engine kind and full
config, vocabulary hash, weight sources and random seed, schema version, and the input's
identity (URI, format, columns, pixel limit, listing rule, images per shard). An output holds
one fingerprint: a run with another is refused unless ``--overwrite``.

``run.json`` describes the output: ``totals`` are what its completion records certify
(cumulative over every run that wrote it), ``this_run`` counts the last invocation, and
``history`` lists every invocation (start, end, what it did, status, exit code).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from schemas import SCHEMA_VERSION, Category
from schemas.completion import CertifiedShard
from schemas.io import (
    CATEGORIES_FILE,
    DONE_DIR,
    LABELS_DIR,
    categories_document,
    run_record_path,
)
from schemas.times import utc_timestamp
from schemas.uris import public_uri

from .config import IOConfig
from .shards import IMAGE_EXTENSIONS, PARQUET_EXTENSIONS, TAR_EXTENSIONS, ShardSpec
from .storage import exists, put_bytes, read_bytes, remove_tree

#: Invocations kept in ``run.json``'s history.
HISTORY_LIMIT = 100
#: How input files are chosen and grouped (part of the input identity).
LISTING_RULE = "sorted files under the prefix, or matching the glob, by extension"


class OutputConflict(RuntimeError):
    """The output holds labels made with another vocabulary or engine configuration."""


class Terminated(KeyboardInterrupt):
    """The job received SIGTERM; handled like Ctrl-C (exit code 143 instead of 130)."""


#: Set by the SIGTERM handler: Ray's blocking calls turn any exception raised by a signal
#: handler into a plain KeyboardInterrupt, so the exception type alone cannot tell.
TERMINATED = threading.Event()


def is_termination(exc: BaseException) -> bool:
    """Whether an interrupt came from SIGTERM (rather than Ctrl-C / SIGINT)."""
    return isinstance(exc, Terminated) or TERMINATED.is_set()


def input_identity(io: IOConfig, kind: str) -> dict:
    """What identifies the input: a rerun with another identity is another run."""
    extensions = {"webdataset": TAR_EXTENSIONS, "parquet": PARQUET_EXTENSIONS,
                  "images": IMAGE_EXTENSIONS}[kind]
    identity = {"uri": public_uri(io.input_uri), "format": kind, "listing": LISTING_RULE,
                "extensions": list(extensions), "max_image_pixels": io.max_image_pixels}
    if kind == "parquet":
        identity.update(image_column=io.image_column, id_column=io.id_column)
    if kind == "images":
        identity["images_per_shard"] = io.images_per_shard
    return identity


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cass-labeler")
    except PackageNotFoundError:
        return "unknown"


def fingerprint_of(identity: Mapping) -> str:
    """SHA-256 of the canonical JSON of a run identity."""
    text = json.dumps({**identity, "schema_version": SCHEMA_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read_existing_record(fs: Any, root: str) -> dict | None:
    """The output's current run record, or None."""
    path = run_record_path(root)
    if not exists(fs, path):
        return None
    try:
        record = json.loads(read_bytes(fs, path).decode("utf-8"))
    except ValueError as exc:
        raise OutputConflict(f"its run.json is unreadable ({exc}); use --overwrite to start "
                             "the output afresh, or choose another --output") from None
    if not isinstance(record, dict):
        raise OutputConflict("its run.json is not a run record; use --overwrite or another "
                             "--output")
    return record


def write_record(fs: Any, root: str, record: Mapping) -> None:
    put_bytes(fs, run_record_path(root), json.dumps(record, indent=2, sort_keys=True).encode())
    # issue 10: category names next to the labels (OUTPUT/categories.json)
    if record.get("categories"):
        put_bytes(fs, f"{root}/{CATEGORIES_FILE}",
                  json.dumps(categories_document(record), indent=2, sort_keys=True).encode())


def check_compatible(existing: Mapping | None, identity: Mapping, fingerprint: str,
                     has_shards: bool) -> None:
    """Refuse to mix runs with different fingerprints in one output.

    Raises:
        OutputConflict: with the differing settings named.
    """
    if existing is None:
        if has_shards:
            raise OutputConflict("the output already has label shards but no run.json; "
                                 "use --overwrite to replace it or choose another --output")
        return
    if existing.get("fingerprint") == fingerprint:
        return
    differs = _differences(existing.get("identity", {}), identity)
    raise OutputConflict(
        "the output was labelled with a different configuration "
        f"({'; '.join(differs) or 'fingerprint differs'}); rerun with the same vocabulary, "
        "engine settings and input to resume, use --overwrite to replace the output, or choose "
        "another --output")


def check_same_weights(existing: Mapping | None, models: Mapping) -> None:
    """Refuse when the weight hashes differ from the existing output's.

    Raises:
        OutputConflict: a weight file with the same source has different contents.
    """
    if not existing or not existing.get("models"):
        return
    changed = weight_differences(existing["models"], models)
    if changed:
        raise OutputConflict(f"model weights differ from the existing output ({', '.join(changed)}"
                             "); use --overwrite or another --output")


def weight_differences(before: Mapping, after: Mapping) -> list[str]:
    """Names of the weight hashes present in both model descriptions that differ."""
    old, new = _hashes(before), _hashes(after)
    return sorted(k for k in old.keys() & new.keys() if old[k] != new[k])


def _hashes(tree: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            name = f"{prefix}{key}"
            if isinstance(value, str) and ("sha" in str(key) or "hash" in str(key)):
                out[name] = value
            else:
                out.update(_hashes(value, name + "."))
    return out


def _differences(before: Mapping, after: Mapping, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            out += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append(f"{prefix}{key}: {_short(old)} -> {_short(new)}")
    return out[:8]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 100 else text[:97] + "..."


def clear_output(fs: Any, root: str) -> None:
    """Delete an output's labels and completion records (``--overwrite``)."""
    for name in (DONE_DIR, LABELS_DIR):
        remove_tree(fs, f"{root}/{name}")


def shards_to_skip(shards: Iterable[ShardSpec], certified: Mapping[str, CertifiedShard],
                   fingerprint: str) -> dict[str, dict]:
    """Completion records of the input's shards that are done: certified (their labels object
    present with its size), same fingerprint and same input shard fingerprint, complete."""
    skip = {}
    for shard in shards:
        found = certified.get(shard.shard_id)
        if found is not None and _still_valid(found.record, shard, fingerprint):
            skip[shard.shard_id] = found.record
    return skip


def _still_valid(record: Mapping, shard: ShardSpec, fingerprint: str) -> bool:
    return (record.get("fingerprint") == fingerprint
            and record.get("input_fingerprint") == shard.fingerprint
            and not record.get("truncated"))


def output_totals(records: Iterable[Mapping], input_shards: int) -> dict:
    """What an output holds, summed over its certified completion records."""
    totals = {"shards": 0, "input_shards": input_shards, "images": 0, "images_ok": 0,
              "images_error": 0, "annotations": 0, "shards_truncated": 0}
    errors: dict[str, int] = {}
    for record in records:
        totals["shards"] += 1
        totals["images"] += int(record.get("num_images", 0))
        totals["images_ok"] += int(record.get("num_ok", 0))
        totals["images_error"] += int(record.get("num_errors", 0))
        totals["annotations"] += int(record.get("num_annotations", 0))
        totals["shards_truncated"] += bool(record.get("truncated"))
        for status, count in (record.get("errors_by_status") or {}).items():
            errors[status] = errors.get(status, 0) + int(count)
    totals["errors_by_status"] = dict(sorted(errors.items()))
    return totals


def history_entry(run_id: str, started_at: str, host: str, pid: int) -> dict:
    """The history entry of a starting invocation (completed by the runner at the end)."""
    return {"run_id": run_id, "started_at": started_at, "ended_at": None, "host": host,
            "pid": pid, "status": "running", "exit_code": None, "actions": []}


def previous_history(existing: Mapping | None) -> list[dict]:
    """The invocations recorded in an output's run record (older records: converted)."""
    if not existing:
        return []
    if isinstance(existing.get("history"), list):
        return [dict(h) for h in existing["history"] if isinstance(h, Mapping)]
    old = [dict(r) for r in existing.get("previous_runs", []) if isinstance(r, Mapping)]
    return old + [{k: existing.get(k) for k in ("status", "started_at", "ended_at")}]


def new_record(identity: Mapping, fingerprint: str, categories: list[Category],
               vocabulary: Any, io: Mapping, compute: Mapping, run_id: str = "local") -> dict:
    """The run record at the start of a run (status ``running``)."""
    return {
        "run_id": run_id,
        "schema_version": SCHEMA_VERSION,
        "package_version": package_version(),
        "status": "running",
        "fingerprint": fingerprint,
        "identity": dict(identity),
        "preset": identity["config"].get("preset"),
        "engine_config": identity["config"],
        "vocabulary_hash": vocabulary.content_hash(),
        "vocabulary_source": str(vocabulary.source),
        "categories": [c.to_dict() for c in categories],
        "io": dict(io),
        "compute": dict(compute),
        "models": {},
        "started_at": utc_timestamp(),
        "ended_at": None,
        "totals": {},
        "this_run": {},
        "history": [],
        "failed_shards": [],
    }

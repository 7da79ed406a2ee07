"""The run record (``OUTPUT/run.json``), the run fingerprint and the resume/mixing checks.

The fingerprint is a hash of everything that determines the labels: engine kind and full
config, vocabulary hash, weight sources and random seed, schema version. An output holds one
fingerprint: a run with another is refused unless ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from schemas import SCHEMA_VERSION, Category
from schemas.io import (  # CATEGORIES_FILE, categories_document: issue 10
    CATEGORIES_FILE,
    DONE_DIR,
    LABELS_DIR,
    categories_document,
    done_path,
    run_record_path,
)

from .shards import ShardSpec
from .storage import exists, put_bytes, read_bytes, remove_tree, retry


class OutputConflict(RuntimeError):
    """The output holds labels made with another vocabulary or engine configuration."""


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


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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
        f"({'; '.join(differs) or 'fingerprint differs'}); rerun with the same vocabulary and "
        "engine settings to resume, use --overwrite to replace the output, or choose another "
        "--output")


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
    return text if len(text) <= 40 else text[:37] + "..."


def clear_output(fs: Any, root: str) -> None:
    """Delete an output's labels and completion records (``--overwrite``)."""
    for name in (DONE_DIR, LABELS_DIR):
        remove_tree(fs, f"{root}/{name}")


def shards_to_skip(fs: Any, root: str, shards: Iterable[ShardSpec], done: set[str],
                   fingerprint: str) -> dict[str, dict]:
    """Completion records of shards that are done (``done``: ids with a completion record)
    with the same input and fingerprint."""
    wanted = {s.shard_id: s for s in shards if s.shard_id in done}
    if not wanted:
        return {}
    paths = {done_path(root, sid): sid for sid in wanted}
    blobs = retry(lambda: fs.cat(list(paths), on_error="omit"), "read completion records")
    skip = {}
    for path, blob in blobs.items():
        shard_id = paths.get(path) or paths.get(path.split("://", 1)[-1])
        try:
            record = json.loads(blob)
        except ValueError:  # cut short by a crash mid-write: the shard is redone
            continue
        if isinstance(record, dict) and _still_valid(record, wanted[shard_id], fingerprint):
            skip[shard_id] = record
    return skip


def _still_valid(record: Mapping, shard: ShardSpec, fingerprint: str) -> bool:
    return (record.get("fingerprint") == fingerprint
            and record.get("input_fingerprint") == shard.fingerprint
            and not record.get("truncated"))


def new_record(identity: Mapping, fingerprint: str, categories: list[Category],
               vocabulary: Any, io: Mapping, compute: Mapping) -> dict:
    """The run record at the start of a run (status ``running``)."""
    return {
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
        "started_at": now_iso(),
        "ended_at": None,
        "totals": {},
        "failed_shards": [],
    }

"""Everything checked before any engine work: vocabulary, input listing, output state.

:func:`plan_job` fails fast (clear message, no GPU touched) on an unreadable vocabulary, a
missing input, rejected credentials, a missing Parquet image column, or an output labelled
with another configuration. It writes the ``running`` run record, which also proves the
output is writable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from schemas import Category, categories_from_classes, run_metadata
from schemas.io import completed_shards, done_path, labels_path

from .config import ComputeConfig, IOConfig, public_uri
from .engine import EngineSpec
from .readers import parquet_columns
from .record import (
    OutputConflict,
    check_compatible,
    clear_output,
    fingerprint_of,
    new_record,
    read_existing_record,
    shards_to_skip,
    write_record,
)
from .shards import IMAGE_GROUP_ID, InputError, ShardSpec, list_shards
from .storage import filesystem, remove_tree


@dataclass(frozen=True)
class JobConfig:
    """A whole labeling job."""

    io: IOConfig
    compute: ComputeConfig
    engine: EngineSpec


@dataclass
class JobPlan:
    """What a run will do.

    Attributes:
        job: the configuration.
        shards: every input shard, in order.
        todo: shards to label in this run.
        skipped: completion records of shards already done.
        categories: output categories.
        identity, fingerprint: what determines the labels.
        existing: the output's previous run record, if any.
        record: the run record being written.
        out_fs, out_root: output filesystem and root path.
    """

    job: JobConfig
    shards: list[ShardSpec]
    todo: list[ShardSpec]
    skipped: dict[str, dict]
    categories: list[Category]
    identity: dict
    fingerprint: str
    existing: dict | None
    record: dict
    out_fs: Any
    out_root: str

    def file_metadata(self, models: dict) -> dict:
        """JSON stored in every Parquet file of this run."""
        run = {"fingerprint": self.fingerprint, "preset": self.identity["config"]["preset"],
               "engine": self.identity, "models": models,
               "package_version": self.record["package_version"]}
        return run_metadata(self.categories, self.record["vocabulary_hash"], run)


class StartupError(RuntimeError):
    """The job cannot start (bad input, vocabulary, credentials or output state)."""


def plan_job(job: JobConfig) -> JobPlan:
    """Check inputs and output, write the ``running`` run record, and list the work.

    Raises:
        StartupError: with a message naming the problem and the remedy.
    """
    vocabulary = _load_vocabulary(job.engine)
    identity = {**job.engine.identity(), "vocabulary_hash": vocabulary.content_hash()}
    fingerprint = fingerprint_of(identity)
    shards = _list_input(job.io)
    out_fs, out_root = _output(job.io)
    existing, done = _check_output(job.io, out_fs, out_root, identity, fingerprint)
    stale = _retire_stale_groups(job.io, out_fs, out_root, shards, done)
    skipped = shards_to_skip(out_fs, out_root, shards, done - set(stale["removed"]),
                             fingerprint)
    categories = categories_from_classes(vocabulary.classes)
    compute = dataclasses.asdict(job.compute)
    record = new_record(identity, fingerprint, categories, vocabulary, job.io.public_dict(),
                        compute)
    record["stale_shards"] = stale
    record["vocabulary_repeats"] = vocabulary.duplicate_queries()
    if existing and not job.io.overwrite:
        record["previous_runs"] = _history(existing)
        # the weight hashes the output was labelled with stay on record until a worker has
        # proved it holds the same, so a run that fails at start-up cannot drop them
        record["models"] = existing.get("models") or {}
    _guarded(lambda: write_record(out_fs, out_root, record), "write the run record to",
             job.io.output_uri)
    todo = [s for s in shards if s.shard_id not in skipped]
    return JobPlan(job, shards, todo, skipped, categories, identity, fingerprint, existing,
                   record, out_fs, out_root)


def _load_vocabulary(engine: EngineSpec) -> Any:
    try:
        return engine.config.load_vocabulary()
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot read the vocabulary: {exc}") from exc


def _list_input(io: IOConfig) -> list[ShardSpec]:
    shards = _guarded(lambda: list_shards(io), "list the input", io.input_uri)
    if shards[0].kind == "parquet":
        columns = _guarded(lambda: parquet_columns(_in_fs(io), shards[0].paths[0]),
                           "read the Parquet schema of", shards[0].source_uri)
        for name in (io.image_column, io.id_column):
            if name is not None and name not in columns:
                raise StartupError(f"column {name!r} not in {shards[0].source_uri} "
                                   f"(columns: {', '.join(columns)}); set --image-column / "
                                   "--id-column")
    return shards


def _in_fs(io: IOConfig) -> Any:
    return filesystem(io.input_uri, io.storage_options)[0]


def _output(io: IOConfig) -> tuple[Any, str]:
    return _guarded(lambda: filesystem(io.output_uri, io.storage_options), "open the output",
                    io.output_uri)


def _check_output(io: IOConfig, fs: Any, root: str, identity: dict,
                  fingerprint: str) -> tuple[dict | None, set[str]]:
    """The output's run record and its completed shard ids, after the mixing checks (and
    the clearing of ``--overwrite``)."""
    try:
        existing = _guarded(lambda: read_existing_record(fs, root), "read the output",
                            io.output_uri)
    except OutputConflict as exc:
        if not io.overwrite:
            raise StartupError(f"refusing to write to {public_uri(io.output_uri)}: {exc}") from exc
        existing = None
    if io.overwrite:
        _guarded(lambda: clear_output(fs, root), "clear the output", io.output_uri)
        return existing, set()
    done = set(_guarded(lambda: completed_shards(io.output_uri, io.storage_options),
                        "list the completed shards of", io.output_uri))
    try:
        check_compatible(existing, identity, fingerprint, bool(done))
    except OutputConflict as exc:
        raise StartupError(f"refusing to write to {public_uri(io.output_uri)}: {exc}") from exc
    return existing, done


def _retire_stale_groups(io: IOConfig, fs: Any, root: str, shards: list[ShardSpec],
                         done: set[str]) -> dict[str, list[str]]:
    """Done shards of the output that the input no longer has.

    Groups of image files are positional: after files were added, removed or
    ``--images-per-shard`` changed, a group id beyond the new listing would keep labels of
    images that the current groups label again (twice in the output). Their completion record
    (first) and table are removed. Other stale shards (an input file that is gone) are kept and
    listed.
    """
    stale = sorted(done - {s.shard_id for s in shards})
    grouped = shards[0].kind == "images"
    removed = [sid for sid in stale if grouped and IMAGE_GROUP_ID.fullmatch(sid)]
    for sid in removed:
        _guarded(lambda sid=sid: remove_tree(fs, done_path(root, sid)),
                 "remove a stale completion record from", io.output_uri)
        _guarded(lambda sid=sid: remove_tree(fs, labels_path(root, sid)),
                 "remove a stale label table from", io.output_uri)
    return {"removed": removed, "kept": [sid for sid in stale if sid not in removed]}


def _history(existing: dict) -> list[dict]:
    previous = list(existing.get("previous_runs", []))
    previous.append({k: existing.get(k) for k in ("status", "started_at", "ended_at", "totals")})
    return previous[-20:]


def _guarded(fn: Any, action: str, uri: str) -> Any:
    """Run a startup step; turn storage and input errors into a StartupError."""
    uri = public_uri(uri)
    try:
        return fn()
    except StartupError:
        raise
    except InputError as exc:
        raise StartupError(str(exc)) from exc
    except PermissionError as exc:
        raise StartupError(f"access denied when trying to {action} {uri}: check the "
                           f"credentials (--storage-options or AWS_* variables): {exc}") from exc
    except FileNotFoundError as exc:
        raise StartupError(f"cannot {action} {uri}: not found ({exc})") from exc
    except OSError as exc:
        raise StartupError(f"cannot {action} {uri}: {type(exc).__name__}: {exc}") from exc
    except ImportError as exc:  # fsspec names the package that implements the protocol
        raise StartupError(f"cannot {action} {uri}: no filesystem for this URI scheme "
                           f"is installed: {exc}") from exc

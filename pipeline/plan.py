"""Everything checked before any engine work: input listing, output state.

The vocabulary was parsed once, with the job's :class:`~pipeline.config.EngineSpec` (an
unreadable one is a ``ConfigError`` there); the plan's categories, vocabulary hash and
fingerprint come from that parse, and the workers get the same one. :func:`plan_job` fails
fast (clear message, no GPU touched) on a missing input, rejected credentials, a missing
Parquet image column, an output held by another run (its lease) or labelled with another
configuration or input. Holding the lease,
it verifies the completion records (a record whose labels object is missing, of another size
or, with ``--verify``, other contents means the shard is redone), removes what will be
redone and the labels objects no record names, and writes the ``running`` run record.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
from dataclasses import dataclass
from typing import Any

from schemas import Category, categories_from_classes, run_metadata
from schemas.completion import OutputCheck, check_output, read_records, record_labels_name
from schemas.io import done_path, open_uri
from schemas.times import utc_compact, utc_timestamp
from schemas.uris import public_uri

from .conditional import honours_conditional_create
from .config import IOConfig, JobConfig
from .lease import Lease, LeaseHeld, check_holder
from .readers import parquet_columns
from .record import (
    HISTORY_LIMIT,
    OutputConflict,
    check_compatible,
    check_same_weights,
    clear_output,
    fingerprint_of,
    history_entry,
    input_identity,
    new_record,
    output_totals,
    previous_history,
    read_existing_record,
    shards_to_skip,
    weight_differences,
    write_record,
)
from .shards import IMAGE_GROUP_ID, InputError, ShardSpec, list_shards
from .storage import remove_object, retry


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
        existing: the output's previous run record, if it has this run's fingerprint.
        record: the run record being written.
        out_fs, out_root: output filesystem and root path.
        run_id: this invocation's id (names its labels objects).
        lease: the output's lease, held until :meth:`release`.
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
    run_id: str = "local"
    lease: Lease | None = None

    def save_record(self) -> bool:
        """Write ``run.json`` while this run holds the lease; False (not written) otherwise."""
        if self.lease is not None:
            if self.lease.lost.is_set():
                return False
            try:
                check_holder(self.out_fs, self.out_root, self.run_id)
            except Exception:  # noqa: BLE001 - lease lost or unreadable: do not write
                return False
        write_record(self.out_fs, self.out_root, self.record)
        return True

    def check_weights(self, models: dict) -> None:
        """Compare the workers' weight hashes with the output's; with ``--overwrite``, an
        output made with other weights is cleared (this run relabels every shard).

        Raises:
            OutputConflict: the weights differ and ``--overwrite`` was not given.
        """
        before = (self.existing or {}).get("models") or {}
        changed = weight_differences(before, models) if self.skipped or before else []
        if not changed:
            return
        if not self.job.io.overwrite:
            check_same_weights(self.existing, models)
        clear_output(self.out_fs, self.out_root)
        self.todo, self.skipped = list(self.shards), {}
        self.record["history"][-1]["actions"].append(
            f"cleared the output (--overwrite): model weights differ ({', '.join(changed)})")

    def release(self) -> None:
        """Give the output's lease back (idempotent)."""
        if self.lease is not None:
            self.lease.release()

    def file_metadata(self, models: dict) -> dict:
        """JSON stored in every Parquet file of this run."""
        run = {"fingerprint": self.fingerprint, "preset": self.identity["config"]["preset"],
               "engine": self.identity, "models": models,
               "package_version": self.record["package_version"]}
        return run_metadata(self.categories, self.record["vocabulary_hash"], run)


class StartupError(RuntimeError):
    """The job cannot start (bad input, vocabulary, credentials or output state)."""


def new_run_id() -> str:
    """A unique, sortable id for one invocation: ``YYYYmmddTHHMMSSZ-<6 hex>``."""
    return utc_compact() + "-" + secrets.token_hex(3)


def plan_job(job: JobConfig) -> JobPlan:
    """Take the output's lease, check inputs and output, write the ``running`` run record,
    and list the work. The lease is held (and renewed) until :meth:`JobPlan.release`.

    Raises:
        StartupError: with a message naming the problem and the remedy (the lease is
            released; a refused run changes nothing in the output).
    """
    vocabulary = job.engine.vocabulary  # parsed once, with the spec; workers get this one
    shards = _list_input(job.io)
    identity = {**job.engine.identity(), "vocabulary_hash": job.engine.vocabulary_hash,
                "input": input_identity(job.io, shards[0].kind),
                "confidence": bool(job.io.confidence)}  # which rows carry confidence maps
    fingerprint = fingerprint_of(identity)
    out_fs, out_root = _output(job.io)
    run_id, started_at = new_run_id(), utc_timestamp()
    lease = Lease(out_fs, out_root, run_id, started_at, job.policy.lease_ttl_s)
    try:
        _guarded(lambda: lease.acquire(job.policy.wait_for_lease_s), "take the lease of",
                 job.io.output_uri)
    except LeaseHeld as exc:
        raise StartupError(f"refusing to write to {job.io.output_uri}: {exc}") from None
    lease.start_renewing()
    try:
        return _plan_holding_lease(job, vocabulary, shards, identity, fingerprint, out_fs,
                                   out_root, lease)
    except BaseException:
        lease.release()
        raise


def _plan_holding_lease(job: JobConfig, vocabulary: Any, shards: list[ShardSpec],
                        identity: dict, fingerprint: str, out_fs: Any, out_root: str,
                        lease: Lease) -> JobPlan:
    existing, records, actions = _check_output(job.io, out_fs, out_root, identity, fingerprint)
    if not _guarded(lambda: honours_conditional_create(out_fs, out_root),
                    "probe conditional writes on", job.io.output_uri):
        actions.append("warning: the output's store ignores conditional writes (S3 "
                       "If-None-Match / GCS ifGenerationMatch): overlapping runs and late "
                       "attempts are not excluded there; run one job per output at a time")
    check = _guarded(lambda: retry(lambda: check_output(
        out_fs, out_root, fingerprint, job.policy.verify, records), "check the completion "
        "records"), "check the completion records of", job.io.output_uri)
    stale = _stale_shards(shards, set(records))
    skipped = shards_to_skip(shards, check.certified, fingerprint)
    kept = {sid: check.certified[sid] for sid in stale["kept"] if sid in check.certified}
    redo = sorted(set(records) - set(skipped) - set(kept))
    actions += _clean(job.io, out_fs, out_root, check, redo, {**skipped, **{
        sid: c.record for sid, c in kept.items()}})
    categories = categories_from_classes(vocabulary.classes, vocabulary.class_names)
    record = new_record(identity, fingerprint, categories, vocabulary, job.io.public_dict(),
                        dataclasses.asdict(job.compute), lease.run_id)
    record.update(started_at=lease.started_at, stale_shards=stale,
                  vocabulary_repeats=vocabulary.duplicate_queries(),
                  totals=output_totals(list(skipped.values()) + [
                      c.record for c in kept.values()], len(shards)))
    same = existing if existing and existing.get("fingerprint") == fingerprint else None
    if same:
        # the weight hashes the output was labelled with stay on record until a worker has
        # proved it holds the same, so a run that fails at start-up cannot drop them
        record["models"] = existing.get("models") or {}
    entry = history_entry(lease.run_id, lease.started_at, socket.gethostname(), os.getpid())
    entry["actions"] = actions
    if lease.took_over is not None:
        entry["actions"].append(f"took over the expired lease of run {lease.took_over.run_id}")
    record["history"] = (previous_history(existing) + [entry])[-HISTORY_LIMIT:]
    _guarded(lambda: write_record(out_fs, out_root, record), "write the run record to",
             job.io.output_uri)
    todo = [s for s in shards if s.shard_id not in skipped]
    return JobPlan(job, shards, todo, skipped, categories, identity, fingerprint, same,
                   record, out_fs, out_root, lease.run_id, lease)


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
    return open_uri(io.input_uri, io.storage_options)[0]


def _output(io: IOConfig) -> tuple[Any, str]:
    return _guarded(lambda: open_uri(io.output_uri, io.storage_options), "open the output",
                    io.output_uri)


def _check_output(io: IOConfig, fs: Any, root: str, identity: dict, fingerprint: str
                  ) -> tuple[dict | None, dict[str, dict | None], list[str]]:
    """The output's run record, its completion records and what was done to it, after the
    mixing checks. ``--overwrite`` clears the output only when its fingerprint differs."""
    try:
        existing = _guarded(lambda: read_existing_record(fs, root), "read the output",
                            io.output_uri)
    except OutputConflict as exc:
        if not io.overwrite:
            raise StartupError(f"refusing to write to {public_uri(io.output_uri)}: {exc}") from exc
        existing = None
    records = _guarded(lambda: retry(lambda: read_records(fs, root), "read the completion "
                                     "records"), "list the completed shards of", io.output_uri)
    try:
        check_compatible(existing, identity, fingerprint, bool(records))
    except OutputConflict as exc:
        if not io.overwrite:
            raise StartupError(f"refusing to write to {public_uri(io.output_uri)}: {exc}") from exc
        _guarded(lambda: clear_output(fs, root), "clear the output", io.output_uri)
        return existing, {}, [f"cleared the output (--overwrite): {exc}"]
    return existing, records, []


def _stale_shards(shards: list[ShardSpec], done: set[str]) -> dict[str, list[str]]:
    """Done shards of the output that the input no longer has.

    Groups of image files are positional: after files were added, removed or
    ``--images-per-shard`` changed, a group id beyond the new listing would keep labels of
    images that the current groups label again (twice in the output): they are removed. Other
    stale shards (an input file that is gone) are kept and listed.
    """
    stale = sorted(done - {s.shard_id for s in shards})
    grouped = shards[0].kind == "images"
    removed = [sid for sid in stale if grouped and IMAGE_GROUP_ID.fullmatch(sid)]
    return {"removed": removed, "kept": [sid for sid in stale if sid not in removed]}


def _clean(io: IOConfig, fs: Any, root: str, check: OutputCheck, redo: list[str],
           keep: dict[str, dict]) -> list[str]:
    """Remove the completion records of shards to redo (first), then every labels object
    that no remaining record names. Returns what was done, for the history."""
    for sid in redo:
        _guarded(lambda sid=sid: remove_object(fs, done_path(root, sid)),
                 "remove an outdated completion record from", io.output_uri)
    named = {f"{root}/{record_labels_name(r, sid)}" for sid, r in keep.items()}
    garbage = sorted(set(check.objects) - named)
    for path in garbage:
        _guarded(lambda path=path: remove_object(fs, path), "remove an uncertified labels object "
                 "from", io.output_uri)
    actions = []
    broken = sorted(set(redo) & set(check.problems))
    if broken:
        actions.append(f"relabels {len(broken)} shard(s) whose records do not hold: "
                       + "; ".join(f"{sid}: {check.problems[sid]}" for sid in broken[:5]))
    if set(redo) - set(broken):
        actions.append(f"relabels {len(set(redo) - set(broken))} shard(s) whose input changed"
                       " or that were cut short")
    if garbage:
        actions.append(f"removed {len(garbage)} labels object(s) that no record certifies")
    return actions


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

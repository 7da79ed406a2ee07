"""Compose the stages on Ray: plan, actor pool, scheduling, progress, run record.

:func:`execute_plan` starts the worker pool (:mod:`pipeline.pool`), hands the shards to the
:class:`~pipeline.scheduler.Scheduler` (bounded in-flight work, retries, replacements, node
loss, stalls, lease loss) and writes the final run record (:mod:`pipeline.outcome`): shards
that keep failing are listed in ``run.json`` and the run ends ``incomplete`` (exit code 3).
``ray.init`` is the caller's job.

The output belongs to one run at a time: :func:`pipeline.plan.plan_job` takes its lease and
:func:`execute_plan` releases it, whatever happens. Each launch of a shard writes its own
labels object and certifies it with a conditional completion record (:mod:`pipeline.writer`),
so a retried shard whose first worker is still writing cannot appear twice.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable

from schemas.uris import public_uri

from .config import JobConfig
from .memory import peak_rss_bytes
from .outcome import (
    EXIT_BAD_CONFIG,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    RunSummary,
    abandon,
    check_output_placement,
    end_record,
    exit_code_of,
    finish,
)
from .plan import JobPlan, StartupError, plan_job
from .pool import WorkerPool, actor_resources
from .progress import Progress, emit_stderr
from .scheduler import Scheduler
from .worker import WorkerSpec

__all__ = ["EXIT_INCOMPLETE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_TERMINATED", "RunSummary",
           "abandon", "execute_plan", "exit_code_of", "run_job"]


def run_job(job: JobConfig, emit: Callable[[str], None] = emit_stderr) -> RunSummary:
    """Run a labeling job on the current Ray cluster (``ray.init`` done by the caller).

    Raises:
        StartupError: bad input, vocabulary, credentials, output state or resources;
            raised before any shard is labelled.
        KeyboardInterrupt: after recording the run as ``interrupted``.
    """
    return execute_plan(plan_job(job), emit)


def execute_plan(plan: JobPlan, emit: Callable[[str], None] = emit_stderr) -> RunSummary:
    """Label the shards of a checked plan (see :func:`pipeline.plan.plan_job`); the output's
    lease is released at the end, whatever happens.

    Raises:
        StartupError: the workers could not start, or a local output on a multi-node cluster.
        KeyboardInterrupt: (SIGINT, or :class:`pipeline.record.Terminated` for SIGTERM)
            after recording the run as ``interrupted``.
    """
    try:
        return _execute(plan, emit)
    except KeyboardInterrupt as exc:
        abandon(plan, "interrupted", exit_code_of(exc))  # if the scheduler did not record it
        raise
    finally:
        plan.release()


def _execute(plan: JobPlan, emit: Callable[[str], None]) -> RunSummary:
    job = plan.job
    progress = Progress(len(plan.todo), len(plan.skipped), job.compute.progress_interval_s, emit)
    emit(f"[cass-label] {len(plan.shards)} shard(s) in {public_uri(job.io.input_uri)}: "
         f"{len(plan.todo)} to label, {len(plan.skipped)} already done (run {plan.run_id})")
    for action in plan.record["history"][-1].get("actions", []):
        emit(f"[cass-label] {action}")
    repeats = plan.record.get("vocabulary_repeats") or []
    if repeats:
        emit(f"[cass-label] warning: the vocabulary lists {_first(map(repr, repeats))} more "
             "than once; classes sharing a word get identical scores for it")
    stale = plan.record.get("stale_shards") or {}
    if stale.get("removed"):
        emit(f"[cass-label] the image files changed since the last run: removed "
             f"{len(stale['removed'])} done group(s) beyond the new listing "
             f"({_first(stale['removed'])})")
    if stale.get("kept"):
        emit(f"[cass-label] warning: {len(stale['kept'])} done shard(s) in the output are no "
             f"longer in the input (kept): {_first(stale['kept'])}")
    if not plan.todo:
        return finish(plan, progress, [], _resources(None), 0)
    try:
        check_output_placement(plan)
        pool = _start_pool(plan, emit)
    except StartupError as exc:
        plan.record["error"] = str(exc)
        end_record(plan, "failed", EXIT_BAD_CONFIG, _resources(None))
        raise
    progress.total_shards, progress.skipped_shards = len(plan.todo), len(plan.skipped)
    progress.restart_clock()
    scheduler = Scheduler(pool, plan, progress)
    try:
        scheduler.run()
    except KeyboardInterrupt as exc:
        _close(plan, progress, scheduler, pool, "interrupted", exit_code_of(exc))
        raise
    except BaseException:
        pool.shutdown()
        raise
    return _close(plan, progress, scheduler, pool)


def _first(names: Iterable[str], count: int = 5) -> str:
    """The first ``count`` names, comma-separated, with ``...`` when there are more."""
    names = list(names)
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def _close(plan: JobPlan, progress: Progress, scheduler: Scheduler, pool: WorkerPool,
           status: str | None = None, exit_code: int | None = None) -> RunSummary:
    """Measure the actors, stop them, and write the final run record."""
    resources = _resources(pool)
    resources["workers_lost"] = scheduler.lost
    resources["workers_unplaced"] = len(pool.pending_refs())
    pool.shutdown()
    summary = finish(plan, progress, scheduler.failed, resources, scheduler.unscheduled,
                     status, exit_code)
    if scheduler.lost:
        progress.emit(f"[cass-label] {scheduler.lost} worker(s) lost during the run; "
                      f"{resources['workers_unplaced']} replacement(s) could not be placed")
    return summary


def _start_pool(plan: JobPlan, emit: Callable[[str], None]) -> WorkerPool:
    compute = plan.job.compute
    resources = actor_resources(compute.actors, compute.gpus_per_actor, compute.cpus_per_actor)
    spec = WorkerSpec(plan.job.engine, plan.job.io, compute, plan.fingerprint,
                      run_id=plan.run_id)
    pool = WorkerPool(plan, spec, resources)
    emit(f"[cass-label] starting {resources.num_actors} worker(s) (loading weights, text "
         "embeddings)")
    started = time.monotonic()
    try:
        plan.record["models"] = pool.start()
    except BaseException:
        pool.shutdown()
        raise
    emit(f"[cass-label] {resources.num_actors} worker(s) started in "
         f"{time.monotonic() - started:.0f} s")
    for info in pool.infos:
        emit(f"[cass-label] worker pid {info['pid']} on {info['host']}: device {info['device']}"
             f", GPUs {info['gpu_ids'] or '-'}")
    return pool


def _resources(pool: WorkerPool | None) -> dict:
    out: dict = {"driver_peak_memory_bytes": peak_rss_bytes()}
    if pool is not None:
        out["actors"] = dataclasses.asdict(pool.resources)
        out["workers"] = pool.infos
        out["worker_peak_memory_bytes"] = pool.peak_memory()
        out["worker_replacements"] = pool.replacements
    return out

"""Compose the stages on Ray: plan, actor pool, bounded scheduling, retries, run record.

The driver keeps at most ``shards_per_actor`` shards in flight per actor and waits on them
with ``ray.wait``. A shard whose actor died, or whose task raised, is retried up to
``max_attempts`` times; a retried shard runs alone on an idle actor, so a second death is
attributed to it alone. Dead actors are replaced. Shards that keep failing are listed in
``run.json`` and the run ends ``incomplete`` (exit code 3). ``ray.init`` is the caller's job.
"""

from __future__ import annotations

import dataclasses
import resource
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError

from .plan import JobConfig, JobPlan, StartupError, plan_job
from .pool import WorkerPool, actor_resources, error_reason
from .progress import Progress, emit_stderr
from .record import now_iso, write_record
from .shards import ShardSpec
from .worker import WorkerSpec

EXIT_OK = 0
EXIT_INCOMPLETE = 3
EXIT_INTERRUPTED = 130


@dataclass
class RunSummary:
    """Outcome of a run: ``complete``, ``limited``, ``incomplete`` or ``interrupted``."""

    status: str
    exit_code: int
    record: dict


def run_job(job: JobConfig, emit: Callable[[str], None] = emit_stderr) -> RunSummary:
    """Run a labeling job on the current Ray cluster (``ray.init`` done by the caller).

    Raises:
        StartupError: bad input, vocabulary, credentials, output state or resources;
            raised before any shard is labelled.
        KeyboardInterrupt: after recording the run as ``interrupted``.
    """
    return execute_plan(plan_job(job), emit)


def execute_plan(plan: JobPlan, emit: Callable[[str], None] = emit_stderr) -> RunSummary:
    """Label the shards of a checked plan (see :func:`pipeline.plan.plan_job`)."""
    job = plan.job
    progress = Progress(len(plan.todo), len(plan.skipped), job.compute.progress_interval_s, emit)
    emit(f"[cass-label] {len(plan.shards)} shard(s) in {job.io.input_uri}: "
         f"{len(plan.todo)} to label, {len(plan.skipped)} already done")
    if not plan.todo:
        return _finish(plan, progress, [], _resources(None), 0)
    try:
        pool = _start_pool(plan, emit)
    except StartupError as exc:
        plan.record.update(status="failed", error=str(exc), ended_at=now_iso())
        write_record(plan.out_fs, plan.out_root, plan.record)
        raise
    progress.restart_clock()
    scheduler = Scheduler(pool, plan, progress)
    try:
        scheduler.run()
    except KeyboardInterrupt:
        _close(plan, progress, scheduler, pool, "interrupted")
        raise
    except BaseException:
        pool.shutdown()
        raise
    return _close(plan, progress, scheduler, pool)


def _close(plan: JobPlan, progress: Progress, scheduler: Scheduler, pool: WorkerPool,
           status: str | None = None) -> RunSummary:
    """Measure the actors, stop them, and write the final run record."""
    resources = _resources(pool)
    pool.shutdown()
    return _finish(plan, progress, scheduler.failed, resources, scheduler.unscheduled, status)


def _start_pool(plan: JobPlan, emit: Callable[[str], None]) -> WorkerPool:
    compute = plan.job.compute
    resources = actor_resources(compute.actors, compute.gpus_per_actor, compute.cpus_per_actor)
    spec = WorkerSpec(plan.job.engine, plan.job.io, compute, plan.fingerprint)
    pool = WorkerPool(plan, spec, resources)
    try:
        plan.record["models"] = pool.start()
    except BaseException:
        pool.shutdown()
        raise
    for info in pool.infos:
        emit(f"[cass-label] worker pid {info['pid']} on {info['host']}: device {info['device']}"
             f", GPUs {info['gpu_ids'] or '-'}")
    return pool


def _finish(plan: JobPlan, progress: Progress, failed: list[dict], resources: dict,
            unscheduled: int, status: str | None = None) -> RunSummary:
    limited = unscheduled or progress.truncated
    status = status or ("incomplete" if failed else "limited" if limited else "complete")
    record = plan.record
    record.update(status=status, ended_at=now_iso(), totals=progress.totals(),
                  failed_shards=failed, unscheduled_shards=unscheduled)
    record["resources"] = resources
    write_record(plan.out_fs, plan.out_root, record)
    progress.live_images = 0
    progress.maybe_report(force=True)
    progress.emit(progress.summary(status, plan.job.io.output_uri))
    for shard in failed:
        progress.emit(f"[cass-label] failed shard {shard['shard_id']}: {shard['reasons'][-1]}")
    code = {"incomplete": EXIT_INCOMPLETE, "interrupted": EXIT_INTERRUPTED}.get(status, EXIT_OK)
    return RunSummary(status, code, record)


def _resources(pool: WorkerPool | None) -> dict:
    out: dict = {"driver_peak_memory_bytes": driver_peak_memory_bytes()}
    if pool is not None:
        out["actors"] = dataclasses.asdict(pool.resources)
        out["workers"] = pool.infos
        out["worker_peak_memory_bytes"] = pool.peak_memory()
        out["worker_replacements"] = pool.replacements
    return out


@dataclass
class _Task:
    shard: ShardSpec
    attempt: int = 0
    reasons: list[str] = field(default_factory=list)


@dataclass
class _Running:
    slot: int
    generation: int
    task: _Task
    cap: int | None


class Scheduler:
    """Feeds shards to the pool with bounded in-flight work, collects results, retries."""

    def __init__(self, pool: WorkerPool, plan: JobPlan, progress: Progress) -> None:
        compute = plan.job.compute
        self.pool, self.progress = pool, progress
        self.per_actor, self.max_attempts = compute.shards_per_actor, compute.max_attempts
        self.fresh = deque(_Task(s) for s in plan.todo)
        self.retries: deque[_Task] = deque()
        self.running: dict[Any, _Running] = {}
        self.load = [0] * len(pool.actors)
        self.solo: set[int] = set()
        self.failed: list[dict] = []
        self.max_replacements = len(pool.actors) * compute.max_attempts * 2
        limited = plan.job.io.limit is not None and plan.todo and plan.todo[0].kind != "images"
        self.budget = plan.job.io.limit if limited else None
        self.interval = compute.progress_interval_s

    def run(self) -> list[dict]:
        """Label every shard; returns the failed shards with their reasons."""
        while self.fresh or self.retries or self.running:
            self._submit()
            if not self.running:
                break
            ready, _ = ray.wait(list(self.running), num_returns=1,
                                timeout=min(self.interval, 5.0))
            for ref in ready:
                self._collect(ref)
            if self.progress.due():
                self.progress.live_images = self._live_images()
                self.progress.maybe_report()
        return self.failed

    def _live_images(self) -> int:
        """Images already labelled inside running shards (best effort, 1 s timeout)."""
        busy = {run.slot for run in self.running.values()}
        refs = [self.pool.actors[slot].live_images.remote() for slot in busy]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=1.0)
        try:
            return sum(ray.get(ready))
        except RayError:
            return 0

    @property
    def unscheduled(self) -> int:
        return len(self.fresh) + len(self.retries)

    def _submit(self) -> None:
        for slot in range(len(self.pool.actors)):
            while self.load[slot] < self.per_actor and slot not in self.solo:
                task = self._next_task(slot)
                if task is None:
                    break
                self._launch(slot, task)

    def _next_task(self, slot: int) -> _Task | None:
        if self.budget is not None and self.budget <= 0:
            return None
        if self.retries and self.load[slot] == 0:
            self.solo.add(slot)
            return self.retries.popleft()
        return self.fresh.popleft() if self.fresh else None

    def _launch(self, slot: int, task: _Task) -> None:
        cap = self.budget
        if cap is not None:
            self.budget -= cap
        ref = self.pool.actors[slot].process_shard.remote(task.shard, cap)
        self.running[ref] = _Running(slot, self.pool.generation[slot], task, cap)
        self.load[slot] += 1

    def _collect(self, ref: Any) -> None:
        run = self.running.pop(ref)
        self.load[run.slot] -= 1
        self.solo.discard(run.slot)
        try:
            record = ray.get(ref)
        except RayActorError as exc:
            self._actor_died(run)
            self._retry(run, f"worker died: {error_reason(exc)}")
        except RayError as exc:
            self._retry(run, error_reason(exc))
        else:
            self.progress.shard_done(record)
            if run.cap is not None:
                self.budget += run.cap - int(record["num_images"])

    def _actor_died(self, run: _Running) -> None:
        if self.pool.generation[run.slot] != run.generation:
            return
        if self.pool.replacements >= self.max_replacements:
            self._abandon("too many worker deaths")
            return
        self.pool.replace(run.slot)

    def _retry(self, run: _Running, reason: str) -> None:
        if run.cap is not None:
            self.budget += run.cap
        task = run.task
        task.attempt += 1
        task.reasons.append(reason)
        if task.attempt >= self.max_attempts:
            self._fail(task)
        else:
            self.progress.shard_retried(task.shard.shard_id, reason)
            self.retries.append(task)

    def _fail(self, task: _Task) -> None:
        self.progress.shard_failed(task.shard.shard_id, task.reasons[-1])
        self.failed.append({"shard_id": task.shard.shard_id,
                            "source_uri": task.shard.source_uri,
                            "attempts": task.attempt, "reasons": task.reasons})

    def _abandon(self, reason: str) -> None:
        while self.fresh or self.retries:
            task = (self.retries or self.fresh).popleft()
            task.reasons.append(reason)
            self._fail(task)


def driver_peak_memory_bytes() -> int:
    """Peak resident memory of this (driver) process."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

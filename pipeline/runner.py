"""Compose the stages on Ray: plan, actor pool, bounded scheduling, retries, run record.

The driver keeps at most ``shards_per_actor`` shards in flight per actor and waits on them
with ``ray.wait``. A shard whose actor died, or whose task raised, is retried up to
``max_attempts`` times; a retried shard runs alone on an idle actor, so a second death is
attributed to it alone (one busy actor gets no new shards until it is idle for it). Dead
actors are replaced. Shards that keep failing are listed in ``run.json`` and the run ends
``incomplete`` (exit code 3). ``ray.init`` is the caller's job.

A watchdog polls the workers' shard heartbeats; a shard in which nothing has finished for
``stall_timeout_s`` (a hung accelerator call, a storage read that never returns, a worker
that stopped answering) costs its worker: the worker is killed and replaced, the stalled
shard is retried (one attempt used) and the worker's other shards are requeued at no cost.

The output belongs to one run at a time: :func:`pipeline.plan.plan_job` takes its lease and
:func:`execute_plan` releases it, whatever happens. Each launch of a shard writes its own
labels object and certifies it with a conditional completion record (:mod:`pipeline.writer`),
so a retried shard whose first worker is still writing cannot appear twice.
:mod:`pipeline.outcome` writes the final run record.

Workers are killed (``ray.kill``, no restart) before any of their shards is launched again, so
no two launches of one shard are live at once as far as the driver knows; an unreachable
worker (``ActorUnavailableError``: "may or may not have been executed") is killed like a dead
one. Every launch carries its number (``attempt``) to the worker's writes. A replacement
worker gets shards only once it has answered (it may never be placed when its node is gone):
retries go to the live workers, and the run finishes on the survivors. An engine failure that
is not about the images (:class:`pipeline.worker.EngineFault`) fails the attempt and restarts
the worker. The replacement budget grows by one with every finished shard.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError

from schemas.uris import public_uri

from .config import JobConfig
from .outcome import (
    EXIT_BAD_CONFIG,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    RunSummary,
    abandon,
    check_output_placement,
    driver_peak_memory_bytes,
    end_record,
    exit_code_of,
    finish,
)
from .plan import JobPlan, StartupError, plan_job
from .pool import WorkerPool, actor_resources, error_reason
from .progress import Progress, emit_stderr
from .shards import ShardSpec
from .worker import EngineFault, WorkerSpec

__all__ = ["EXIT_INCOMPLETE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_TERMINATED", "RunSummary",
           "Scheduler", "abandon", "execute_plan", "exit_code_of", "run_job"]

#: Extra time a worker that has not answered once since a shard was sent to it (still
#: starting: importing, staging and loading weights) gets before the shard counts as stalled.
STARTUP_GRACE_S = 600.0


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
    try:
        plan.record["models"] = pool.start()
    except BaseException:
        pool.shutdown()
        raise
    for info in pool.infos:
        emit(f"[cass-label] worker pid {info['pid']} on {info['host']}: device {info['device']}"
             f", GPUs {info['gpu_ids'] or '-'}")
    return pool


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
    attempt: int = 0  # failed attempts (count against --max-attempts)
    launches: int = 0  # times sent to a worker (the ``attempt`` number of its writes)
    reasons: list[str] = field(default_factory=list)


@dataclass
class _Running:
    slot: int
    generation: int
    task: _Task
    cap: int | None
    launched_at: float = field(default_factory=time.monotonic)
    beat: int = -1
    beat_at: float | None = None  # last heartbeat change seen; None until the worker answers


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
        self.base_replacements = len(pool.actors) * compute.max_attempts * 2
        self.placement_timeout = compute.startup_timeout_s
        self.lost = 0  # workers that died or became unreachable during the run
        self.budget = plan.job.io.limit
        self.dead: set[int] = set()  # slots whose worker was not replaced (run abandoned)
        self.draining: int | None = None  # slot left to empty for a waiting retry
        self.abandoned: str | None = None
        self.lease = getattr(plan, "lease", None)  # lost to another run: nothing more runs
        self.interval = compute.progress_interval_s
        self.stall_timeout = compute.stall_timeout_s
        self.poll_every = min(self.interval, 10.0, (self.stall_timeout or 60.0) / 4)
        self._polled_at = time.monotonic()

    @property
    def max_replacements(self) -> int:
        """Worker replacements allowed so far: a base, plus one per finished shard (nodes
        preempted over a long night do not exhaust it; a worker-killing loop still stops)."""
        done = self.progress.shards_done if self.progress is not None else 0
        return self.base_replacements + done

    def _usable(self, slot: int) -> bool:
        """Whether a slot's worker may get shards (started, and not given up)."""
        return slot not in self.dead and self.pool.ready[slot]

    def run(self) -> list[dict]:
        """Label every shard; returns the failed shards with their reasons."""
        while self.fresh or self.retries or self.running:
            if self.lease is not None and self.lease.lost.is_set() and not self.abandoned:
                self._abandon("this run lost the output's lease to another run")
            self._submit()
            waits = list(self.running) + self.pool.pending_refs()
            if not waits:
                break
            ready, _ = ray.wait(waits, num_returns=1, timeout=min(self.poll_every, 5.0))
            for ref in ready:
                if ref in self.running:
                    self._collect(ref)
            self._check_pending()
            if time.monotonic() - self._polled_at >= self.poll_every:
                self._poll()
            if self.progress.due():
                self.progress.maybe_report()
        return self.failed

    def _poll(self) -> None:
        """Ask busy workers for live image counts and heartbeats (best effort, 1 s timeout);
        then restart the workers of stalled shards."""
        self._polled_at = time.monotonic()
        busy = sorted({run.slot for run in self.running.values()})
        calls = {slot: self.pool.actors[slot].progress.remote() for slot in busy}
        ready, _ = ray.wait(list(calls.values()), num_returns=len(calls), timeout=1.0)
        done, live = set(ready), 0
        now = time.monotonic()
        for slot, ref in calls.items():
            if ref not in done:
                continue
            try:
                images, beats = ray.get(ref)
            except RayError:
                continue
            live += images
            for run in self.running.values():
                if run.slot != slot:
                    continue
                beat = beats.get(run.task.shard.shard_id)
                if beat is not None and beat != run.beat:
                    run.beat, run.beat_at = beat, now
                elif run.beat_at is None:  # the worker is up: the shard's clock starts
                    run.beat_at = now
        self.progress.live_images = live
        if self.stall_timeout is None:
            return
        stalled = {run.slot for run in self.running.values() if self._idle(run, now) > 0}
        for slot in sorted(stalled):
            self._restart_stalled(slot, now)

    def _idle(self, run: _Running, now: float) -> float:
        """Seconds a running shard is past its stall deadline (<= 0: not stalled)."""
        if run.beat_at is None:
            return now - run.launched_at - self.stall_timeout - STARTUP_GRACE_S
        return now - run.beat_at - self.stall_timeout

    def _restart_stalled(self, slot: int, now: float) -> None:
        """Kill and replace a worker with a stalled shard; retry or requeue its shards."""
        for run in self._take_running(slot):
            if self._idle(run, now) > 0:
                idle = now - (run.beat_at or run.launched_at)
                self._retry(run, f"stalled: nothing finished for {idle:.0f} s "
                                 f"(--stall-timeout {self.stall_timeout:g}); worker restarted")
            else:
                self._requeue(run)
        self._replace_or_drop(slot, "too many worker restarts")

    def _take_running(self, slot: int) -> list[_Running]:
        """Remove every shard running on a slot from the running set (its worker is about to
        be killed)."""
        refs = [ref for ref, run in self.running.items() if run.slot == slot]
        runs = [self.running.pop(ref) for ref in refs]
        self.load[slot] -= len(runs)
        self.solo.discard(slot)
        return runs

    def _requeue(self, run: _Running) -> None:
        """Put a shard back at the front of the queue without using an attempt."""
        if run.cap is not None:
            self.budget += run.cap
        self.fresh.appendleft(run.task)

    def _replace_or_drop(self, slot: int, why: str) -> None:
        """Kill a slot's worker and start a replacement, or, with the replacement budget
        spent, kill it for good and stop scheduling."""
        if self.pool.replacements >= self.max_replacements:
            self.dead.add(slot)
            self.pool.kill(slot)
            self._abandon(why)
            return
        self.pool.replace(slot)

    def _check_pending(self) -> None:
        """Replacements that failed to start are replaced again; with no worker usable, give
        up once the oldest pending one has waited ``--startup-timeout``."""
        for slot, reason in self.pool.check_pending():
            self.lost += 1
            self.progress.emit(f"[cass-label] a replacement worker failed to start: {reason}")
            self._replace_or_drop(slot, "too many worker deaths")
        since = self.pool.pending_since()
        if since is None or self.abandoned is not None:
            return
        if any(self._usable(s) for s in range(len(self.pool.actors))):
            return
        if time.monotonic() - since > self.placement_timeout:
            self._abandon(f"no worker could be placed within {self.placement_timeout:g} s "
                          "(--startup-timeout) after the workers were lost")

    @property
    def unscheduled(self) -> int:
        return len(self.fresh) + len(self.retries)

    def _submit(self) -> None:
        self._choose_draining()
        for slot in range(len(self.pool.actors)):
            if not self._usable(slot):
                continue
            while self.load[slot] < self.per_actor and slot not in self.solo:
                task = self._next_task(slot)
                if task is None:
                    break
                self._launch(slot, task)

    def _choose_draining(self) -> None:
        """With retries waiting and no idle worker, stop feeding the least loaded worker so
        that it soon runs a retry alone (instead of every retry waiting for the end)."""
        live = [s for s in range(len(self.pool.actors)) if self._usable(s)]
        if not self.retries or not live:
            self.draining = None
        elif self.draining is None or self.draining not in live:
            self.draining = min(live, key=lambda s: self.load[s])

    def _next_task(self, slot: int) -> _Task | None:
        if self.budget is not None and self.budget <= 0:
            return None
        if self.retries and self.load[slot] == 0:
            self.solo.add(slot)
            if slot == self.draining:
                self.draining = None
            return self.retries.popleft()
        if slot == self.draining:
            return None
        return self.fresh.popleft() if self.fresh else None

    def _free_capacity(self) -> int:
        """Shards that could be launched right now (for sharing the --limit budget)."""
        return sum(max(0, self.per_actor - self.load[s]) for s in range(len(self.load))
                   if self._usable(s) and s not in self.solo and s != self.draining)

    def _launch(self, slot: int, task: _Task) -> None:
        cap = self.budget  # --limit: what is left, shared with the shards that can start now
        if cap is not None and task.shard.kind == "images":
            cap = min(cap, len(task.shard.paths))
        elif cap is not None:  # size unknown until read; unused budget comes back
            cap = -(-cap // max(1, self._free_capacity()))
        if cap is not None:
            self.budget -= cap
        ref = self.pool.actors[slot].process_shard.remote(task.shard, cap, task.launches)
        task.launches += 1
        self.running[ref] = _Running(slot, self.pool.generation[slot], task, cap)
        self.load[slot] += 1

    def _collect(self, ref: Any) -> None:
        run = self.running.pop(ref)
        self.load[run.slot] -= 1
        self.solo.discard(run.slot)
        try:
            record = ray.get(ref)
        except RayActorError as exc:
            gone = "unreachable" if isinstance(exc, ActorUnavailableError) else "died"
            self._lose_worker(run, f"worker {gone}: {error_reason(exc)}")
        except RayError as exc:
            if isinstance(getattr(exc, "cause", None), EngineFault):
                self._engine_fault(run, error_reason(exc))
            else:
                self._retry(run, error_reason(exc))
        else:
            self.progress.shard_done(record)
            if run.cap is not None:
                self.budget += run.cap - int(record["num_images"])

    def _lose_worker(self, run: _Running, reason: str) -> None:
        """A worker died or is unreachable (it may still run: a zombie). It is killed before
        any of its shards is retried; each of them is retried alone (one may be the cause)."""
        if self.pool.generation[run.slot] != run.generation:  # already killed and replaced
            self._retry(run, reason)
            return
        self.lost += 1
        for other in [run, *self._take_running(run.slot)]:
            self._retry(other, reason)
        self._replace_or_drop(run.slot, "too many worker deaths")

    def _engine_fault(self, run: _Running, reason: str) -> None:
        """The engine failed for a reason that is not about the images: the attempt fails
        and the worker (its device state is suspect, e.g. after a CUDA error) is restarted;
        its other shards are requeued at no cost."""
        if self.pool.generation[run.slot] != run.generation:
            self._retry(run, reason)
            return
        for other in self._take_running(run.slot):
            self._requeue(other)
        self._retry(run, reason + "; worker restarted")
        self._replace_or_drop(run.slot, "too many worker restarts")

    def _retry(self, run: _Running, reason: str) -> None:
        if run.cap is not None:
            self.budget += run.cap
        task = run.task
        task.attempt += 1
        task.reasons.append(reason)
        if self.abandoned is not None:
            task.reasons.append(self.abandoned)
            self._fail(task)
        elif task.attempt >= self.max_attempts:
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
        """Stop scheduling: fail every shard not yet running (running ones may finish)."""
        self.abandoned = reason
        while self.fresh or self.retries:
            task = (self.retries or self.fresh).popleft()
            task.reasons.append(reason)
            self._fail(task)

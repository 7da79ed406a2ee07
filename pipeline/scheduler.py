"""Scheduling policy: which shard runs on which worker, retries, replacements, giving up.

At most ``shards_per_actor`` shards are in flight per worker. A shard whose worker died, or
whose task raised, is retried up to ``max_attempts`` times, alone on an idle worker (so a
second death is attributed to it alone). A worker is killed (no restart) before any of its
shards is launched again, an unreachable one (``ActorUnavailableError``) like a dead one, and
replaced; a replacement gets shards only once it has answered (its node may be gone). The
replacement budget grows by one with every finished shard. A stalled shard
(:mod:`pipeline.watchdog`) or an engine fault that is not about the images
(:class:`pipeline.worker.EngineFault`) costs an attempt and restarts the worker; its other
shards are requeued at no cost. A run that lost the output's lease (its renewals failed, or
a worker met another holder when certifying: ``LeaseLost``) stops: every worker is killed.

Driven through :meth:`Scheduler.step` (or :meth:`submit`, :meth:`on_result`,
:meth:`check_workers`); :meth:`in_flight`, :meth:`queued`, :meth:`retrying`,
:meth:`attempts`, :meth:`load` and :meth:`live_workers` say what it decided.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError

from .lease import LeaseLost
from .plan import JobPlan
from .pool import WorkerPool, error_reason
from .progress import Progress
from .shards import ShardSpec
from .watchdog import Watchdog
from .worker import EngineFault

LEASE_LOST = "this run lost the output's lease to another run"


@dataclass(frozen=True)
class Launch:
    """One shard in flight.

    Attributes:
        ref: the Ray object ref of its result.
        slot: the worker slot it runs on.
        shard_id: the shard.
        attempt: its launch number in this run (the ``attempt`` of its writes; 0 first).
        cap: images it may label (``--limit`` budget), None without a limit.
    """

    ref: Any
    slot: int
    shard_id: str
    attempt: int
    cap: int | None


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
    launch: int = 0


class Scheduler:
    """Feeds shards to the pool with bounded in-flight work, collects results, retries."""

    def __init__(self, pool: WorkerPool, plan: JobPlan, progress: Progress) -> None:
        compute = plan.job.compute
        self.pool, self.progress = pool, progress
        self._per_actor, self._max_attempts = compute.shards_per_actor, compute.max_attempts
        self._tasks = {s.shard_id: _Task(s) for s in plan.todo}
        self._fresh = deque(self._tasks.values())
        self._retries: deque[_Task] = deque()
        self._running: dict[Any, _Running] = {}
        self._load = [0] * len(pool.actors)
        self._solo: set[int] = set()
        self.failed: list[dict] = []
        self._base_replacements = len(pool.actors) * compute.max_attempts * 2
        self._placement_timeout = compute.startup_timeout_s
        self.lost = 0  # workers that died or became unreachable during the run
        self._budget = plan.job.io.limit
        self._dead: set[int] = set()  # slots whose worker was not replaced (run abandoned)
        self._draining: int | None = None  # slot left to empty for a waiting retry
        self.abandoned: str | None = None
        self._lease = getattr(plan, "lease", None)  # lost to another run: nothing more runs
        stall = compute.stall_timeout_s
        self._watchdog = Watchdog(stall, min(compute.progress_interval_s, 10.0,
                                             (stall or 60.0) / 4))

    # ------------------------------------------------------------------ what it decided
    def in_flight(self) -> list[Launch]:
        """The shards running now, in launch order."""
        return [Launch(ref, r.slot, r.task.shard.shard_id, r.launch, r.cap)
                for ref, r in self._running.items()]

    def queued(self) -> list[str]:
        """Shards not yet launched, in the order they will be."""
        return [t.shard.shard_id for t in self._fresh]

    def retrying(self) -> list[str]:
        """Shards waiting for a retry (each will run alone on an idle worker)."""
        return [t.shard.shard_id for t in self._retries]

    def attempts(self, shard_id: str) -> int:
        """Failed attempts of a shard so far (they count against ``--max-attempts``)."""
        return self._tasks[shard_id].attempt

    def load(self, slot: int) -> int:
        """Shards in flight on a worker slot."""
        return self._load[slot]

    def live_workers(self) -> list[int]:
        """Slots whose worker may get shards (it answered and was not given up)."""
        return [s for s in range(len(self.pool.actors)) if self._usable(s)]

    def runs_alone(self, slot: int) -> bool:
        """Whether a slot runs a retried shard alone (it gets nothing else meanwhile)."""
        return slot in self._solo

    @property
    def draining(self) -> int | None:
        """The slot that gets no fresh shards until it is idle for a waiting retry."""
        return self._draining

    @property
    def budget_left(self) -> int | None:
        """Images of the ``--limit`` not yet given to a launch (None: no limit)."""
        return self._budget

    @property
    def unscheduled(self) -> int:
        return len(self._fresh) + len(self._retries)

    @property
    def max_replacements(self) -> int:
        """Worker replacements allowed so far: a base, plus one per finished shard (nodes
        preempted over a long night do not exhaust it; a worker-killing loop still stops)."""
        done = self.progress.shards_done if self.progress is not None else 0
        return self._base_replacements + done

    def _usable(self, slot: int) -> bool:
        return slot not in self._dead and self.pool.ready[slot]

    # ------------------------------------------------------------------ driving it
    def run(self) -> list[dict]:
        """Label every shard; returns the failed shards with their reasons."""
        while self.step():
            pass
        return self.failed

    def step(self, timeout_s: float = 5.0) -> bool:
        """Launch what can run, wait up to ``timeout_s`` for one result and handle it, check
        replacements and stalls, report progress. False when nothing is left to wait for."""
        if self._lease is not None and self._lease.lost.is_set() and not self.abandoned:
            self._stop(LEASE_LOST)
        if not (self._fresh or self._retries or self._running):
            return False
        self.submit()
        waits = list(self._running) + self.pool.pending_refs()
        if not waits:
            return False
        timeout_s = min(self._watchdog.poll_every_s, timeout_s)
        for ref in ray.wait(waits, num_returns=1, timeout=timeout_s)[0]:
            if ref in self._running:
                self.on_result(ref, _fetch(ref))
        self.check_workers()
        if self._watchdog.due():
            self._poll()
        if self.progress.due():
            self.progress.maybe_report()
        return True

    def submit(self) -> None:
        """Launch shards on every usable worker with free capacity."""
        self._choose_draining()
        for slot in range(len(self.pool.actors)):
            if not self._usable(slot):
                continue
            while self._load[slot] < self._per_actor and slot not in self._solo:
                task = self._next_task(slot)
                if task is None:
                    break
                self._launch(slot, task)

    def on_result(self, ref: Any, outcome: Mapping | BaseException) -> None:
        """Handle the end of a launch: its completion record, or the exception that fetching
        it raised (a Ray error: the worker died, is unreachable, or the task raised)."""
        run = self._running.pop(ref)
        self._watchdog.forget(ref)
        self._load[run.slot] -= 1
        self._solo.discard(run.slot)
        if isinstance(outcome, RayActorError):
            gone = "unreachable" if isinstance(outcome, ActorUnavailableError) else "died"
            self._lose_worker(run, f"worker {gone}: {error_reason(outcome)}")
        elif isinstance(outcome, BaseException):
            cause = getattr(outcome, "cause", outcome)
            if isinstance(cause, LeaseLost):
                self._lease_lost(run, error_reason(outcome))
            elif isinstance(cause, EngineFault):
                self._engine_fault(run, error_reason(outcome))
            else:
                self._retry(run, error_reason(outcome))
        else:
            self.progress.shard_done(outcome)
            if run.cap is not None:
                self._budget += run.cap - int(outcome["num_images"])

    def check_workers(self) -> None:
        """Replacements that failed to start are replaced again; with no worker usable, give
        up once the oldest pending one has waited ``--startup-timeout``."""
        for slot, reason in self.pool.check_pending():
            self.lost += 1
            self.progress.emit(f"[cass-label] a replacement worker failed to start: {reason}")
            self._replace_or_drop(slot, "too many worker deaths")
        since = self.pool.pending_since()
        if since is None or self.abandoned is not None:
            return
        if self.live_workers():
            return
        if time.monotonic() - since > self._placement_timeout:
            self._abandon(f"no worker could be placed within {self._placement_timeout:g} s "
                          "(--startup-timeout) after the workers were lost")

    # ------------------------------------------------------------------ stalls
    def _poll(self) -> None:
        """Live image counts for the progress line; restart the workers of stalled shards."""
        running = {ref: (r.slot, r.task.shard.shard_id) for ref, r in self._running.items()}
        self.progress.set_live(self._watchdog.poll(self.pool.actors, running))
        now = time.monotonic()
        stalled = {r.slot for ref, r in self._running.items()
                   if self._watchdog.overdue_s(ref, now) > 0}
        for slot in sorted(stalled):
            self._restart_stalled(slot, now)

    def _restart_stalled(self, slot: int, now: float) -> None:
        """Kill and replace a worker with a stalled shard; retry or requeue its shards."""
        refs = [ref for ref, run in self._running.items() if run.slot == slot]
        overdue = {ref: self._watchdog.overdue_s(ref, now) > 0 for ref in refs}
        idle = {ref: self._watchdog.idle_s(ref, now) for ref in refs}
        timeout = self._watchdog.stall_timeout_s
        for ref, run in zip(refs, self._take_running(slot), strict=True):
            if overdue[ref]:
                self._retry(run, f"stalled: nothing finished for {idle[ref]:.0f} s "
                                 f"(--stall-timeout {timeout:g}); worker restarted")
            else:
                self._requeue(run)
        self._replace_or_drop(slot, "too many worker restarts")

    # ------------------------------------------------------------------ launching
    def _choose_draining(self) -> None:
        """With retries waiting and no idle worker, stop feeding the least loaded worker so
        that it soon runs a retry alone (instead of every retry waiting for the end)."""
        live = self.live_workers()
        if not self._retries or not live:
            self._draining = None
        elif self._draining is None or self._draining not in live:
            self._draining = min(live, key=lambda s: self._load[s])

    def _next_task(self, slot: int) -> _Task | None:
        if self._budget is not None and self._budget <= 0:
            return None
        if self._retries and self._load[slot] == 0:
            self._solo.add(slot)
            if slot == self._draining:
                self._draining = None
            return self._retries.popleft()
        if slot == self._draining:
            return None
        return self._fresh.popleft() if self._fresh else None

    def _free_capacity(self) -> int:
        """Shards that could be launched right now (for sharing the --limit budget)."""
        return sum(max(0, self._per_actor - self._load[s]) for s in range(len(self._load))
                   if self._usable(s) and s not in self._solo and s != self._draining)

    def _launch(self, slot: int, task: _Task) -> None:
        cap = self._budget  # --limit: what is left, shared with the shards that can start now
        if cap is not None and task.shard.kind == "images":
            cap = min(cap, len(task.shard.paths))
        elif cap is not None:  # size unknown until read; unused budget comes back
            cap = -(-cap // max(1, self._free_capacity()))
        if cap is not None:
            self._budget -= cap
        ref = self.pool.actors[slot].process_shard.remote(task.shard, cap, task.launches)
        self._running[ref] = _Running(slot, self.pool.generation[slot], task, cap,
                                      task.launches)
        self._watchdog.launched(ref)
        task.launches += 1
        self._load[slot] += 1

    # ------------------------------------------------------------------ failures
    def _take_running(self, slot: int) -> list[_Running]:
        """Remove every shard running on a slot (its worker is about to be killed)."""
        refs = [ref for ref, run in self._running.items() if run.slot == slot]
        runs = [self._running.pop(ref) for ref in refs]
        for ref in refs:
            self._watchdog.forget(ref)
        self._load[slot] -= len(runs)
        self._solo.discard(slot)
        return runs

    def _requeue(self, run: _Running) -> None:
        """Put a shard back at the front of the queue without using an attempt."""
        if run.cap is not None:
            self._budget += run.cap
        self._fresh.appendleft(run.task)

    def _replace_or_drop(self, slot: int, why: str) -> None:
        """Kill a slot's worker and start a replacement, or, with the replacement budget
        spent, kill it for good and stop scheduling."""
        if self.pool.replacements >= self.max_replacements:
            self._dead.add(slot)
            self.pool.kill(slot)
            self._abandon(why)
            return
        self.pool.replace(slot)

    def _lose_worker(self, run: _Running, reason: str) -> None:
        """A worker died or is unreachable (it may still run: a zombie). It is killed before
        any of its shards is retried; each of them is retried alone (one may be the cause)."""
        if self.pool.generation[run.slot] != run.generation or run.slot in self._dead:
            self._retry(run, reason)  # already killed (and replaced, unless stopped)
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

    def _lease_lost(self, run: _Running, reason: str) -> None:
        """A worker found that this run no longer holds the output's lease: the run stops."""
        if self._lease is not None:
            self._lease.lost.set()
        run.task.reasons.append(reason)
        self._stop(LEASE_LOST, run)

    def _stop(self, reason: str, run: _Running | None = None) -> None:
        """Stop the run: kill every worker (nothing more is written or certified), fail the
        shards in flight and those not yet run."""
        self._abandon(reason)
        runs = [run] if run is not None else []
        for slot in range(len(self.pool.actors)):
            runs += self._take_running(slot)
            if slot not in self._dead:
                self._dead.add(slot)
                self.pool.kill(slot)
        for stopped in runs:
            stopped.task.attempt += 1
            stopped.task.reasons.append(reason)
            self._fail(stopped.task)

    def _retry(self, run: _Running, reason: str) -> None:
        if run.cap is not None:
            self._budget += run.cap
        task = run.task
        task.attempt += 1
        task.reasons.append(reason)
        if self.abandoned is not None:
            task.reasons.append(self.abandoned)
            self._fail(task)
        elif task.attempt >= self._max_attempts:
            self._fail(task)
        else:
            self.progress.shard_retried(task.shard.shard_id, reason)
            self._retries.append(task)

    def _fail(self, task: _Task) -> None:
        self.progress.shard_failed(task.shard.shard_id, task.reasons[-1])
        self.failed.append({"shard_id": task.shard.shard_id,
                            "source_uri": task.shard.source_uri,
                            "attempts": task.attempt, "reasons": task.reasons})

    def _abandon(self, reason: str) -> None:
        """Stop scheduling: fail every shard not yet running (running ones may finish)."""
        self.abandoned = reason
        while self._fresh or self._retries:
            task = (self._retries or self._fresh).popleft()
            task.reasons.append(reason)
            self._fail(task)


def _fetch(ref: Any) -> Mapping | BaseException:
    """A launch's completion record, or the Ray error that fetching it raised."""
    try:
        return ray.get(ref)
    except RayError as exc:
        return exc

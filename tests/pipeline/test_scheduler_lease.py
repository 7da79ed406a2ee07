"""The scheduler stops the run when a worker finds that the run lost the output's lease."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from ray.exceptions import RayTaskError

from pipeline.config import ComputeConfig, IOConfig
from pipeline.lease import LeaseLost
from pipeline.scheduler import LEASE_LOST, Scheduler
from pipeline.shards import ShardSpec


def _scheduler(events: list, num_shards: int = 6):
    class Actor:
        def __init__(self, slot: int) -> None:
            self.process_shard = SimpleNamespace(
                remote=lambda shard, cap, attempt, slot=slot: (slot, shard.shard_id, attempt))

    class Pool:
        actors, generation, ready, replacements = [Actor(0), Actor(1)], [0, 0], [True] * 2, 0

        def replace(self, slot: int) -> None:
            events.append(("replace", slot))

        def kill(self, slot: int) -> None:
            events.append(("kill", slot))
            self.ready[slot] = False

        def check_pending(self) -> list:
            return []

        def pending_since(self) -> None:
            return None

        def pending_refs(self) -> list:
            return []

    spec = lambda i: ShardSpec(f"s{i}", "webdataset", (f"s{i}.tar",), (), "u", "fp")  # noqa: E731
    plan = SimpleNamespace(todo=[spec(i) for i in range(num_shards)],
                           lease=SimpleNamespace(lost=threading.Event()),
                           job=SimpleNamespace(compute=ComputeConfig(), io=IOConfig("i", "o")))
    progress = SimpleNamespace(shards_done=0, retried=[], failed=[], emit=lambda line: None,
                               shard_done=lambda record: None, due=lambda: False)
    progress.shard_retried = lambda shard_id, reason: progress.retried.append(shard_id)
    progress.shard_failed = lambda shard_id, reason: progress.failed.append(shard_id)
    return Scheduler(Pool(), plan, progress), plan, progress


def test_lease_lost_raised_by_a_worker_stops_the_run_instead_of_a_retry():
    events: list = []
    scheduler, plan, progress = _scheduler(events)
    scheduler.submit()
    assert len(scheduler.in_flight()) == 4 and len(scheduler.queued()) == 2
    first = scheduler.in_flight()[0]
    error = RayTaskError("process_shard", "Traceback ...",
                         LeaseLost("run r-1 no longer holds the lease of the output"))
    scheduler.on_result(first.ref, error)
    assert plan.lease.lost.is_set()  # the run's outcome: lease lost (exit 3, no run.json)
    assert progress.retried == [] and scheduler.retrying() == []  # not an ordinary retry
    assert scheduler.in_flight() == [] and scheduler.queued() == []
    assert sorted(events) == [("kill", 0), ("kill", 1)]  # the pool stopped, nobody replaced
    assert sorted(progress.failed) == [f"s{i}" for i in range(6)]
    assert all(LEASE_LOST in failed["reasons"][-1] for failed in scheduler.failed)
    by_shard = {failed["shard_id"]: failed for failed in scheduler.failed}
    assert "no longer holds the lease" in by_shard[first.shard_id]["reasons"][0]
    assert scheduler.live_workers() == [] and scheduler.step() is False
    scheduler.submit()
    assert scheduler.in_flight() == []  # nothing is launched again


def test_lease_lost_by_the_driver_stops_the_workers_too():
    events: list = []
    scheduler, plan, progress = _scheduler(events, num_shards=3)
    scheduler.submit()
    plan.lease.lost.set()  # the renewals found another holder
    assert scheduler.step() is False
    assert sorted(events) == [("kill", 0), ("kill", 1)] and progress.retried == []
    assert sorted(f["shard_id"] for f in scheduler.failed) == ["s0", "s1", "s2"]

"""The scheduler stops the run when a worker finds that the run lost the output's lease."""

from __future__ import annotations

import calendar
import dataclasses
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from ray.exceptions import RayTaskError
from support.images import encode, photos

from cass_engine import CassConfig
from pipeline.config import ComputeConfig, EngineSpec, IOConfig, JobConfig, OutputPolicy
from pipeline.lease import LeaseLost, read_holder
from pipeline.runner import run_job
from pipeline.scheduler import LEASE_LOST, Scheduler
from pipeline.shards import ShardSpec
from pipeline.stub import StubOptions
from schemas.io import open_uri


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


def _image_job(tmp_path: Path, vocab: Path, **compute: object) -> JobConfig:
    """Eight PNG files in four groups; a stub engine labelling 0.3 s per image."""
    (tmp_path / "in").mkdir()
    for i, array in enumerate(photos(8, 40)):
        (tmp_path / "in" / f"im{i}.png").write_bytes(encode(array))
    config = CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab))
    return JobConfig(IOConfig(str(tmp_path / "in"), str(tmp_path / "out"), images_per_shard=2),
                     ComputeConfig(**{"batch_size": 2, "progress_interval_s": 0.2, **compute}),
                     EngineSpec(config, stub=StubOptions(seconds_per_image=0.3)),
                     policy=OutputPolicy(output_is_shared=True, lease_ttl_s=600.0))


def test_a_worker_that_meets_another_holder_stops_the_run(ray_cpus, tmp_path, vocab_file):
    job = _image_job(tmp_path, vocab_file, actors=1, shards_per_actor=1, max_attempts=3)
    out = tmp_path / "out"
    results: list = []
    runner = threading.Thread(target=lambda: results.append(run_job(job, emit=lambda _: None)))
    runner.start()
    deadline = time.monotonic() + 120
    while not list(out.glob("_done/*.json")):
        assert time.monotonic() < deadline and runner.is_alive(), "no shard was certified"
        time.sleep(0.05)
    fs, root = open_uri(str(out))
    holder = read_holder(fs, root)  # the driver renews every 150 s: it does not notice first
    thief = dataclasses.replace(holder, run_id="run-that-took-over", expires_at=time.time() + 600)
    (out / "_lease.json").write_bytes(thief.to_bytes())
    taken_at = time.time()
    runner.join(timeout=120)
    summary = results[0]
    assert summary.status == "incomplete" and summary.exit_code == 3
    assert summary.record["this_run"]["retries"] == 0  # stopped, not retried elsewhere
    assert any("no longer holds the lease" in " ".join(f["reasons"])
               for f in summary.record["failed_shards"])
    records = [json.loads(p.read_text()) for p in (out / "_done").glob("*.json")]
    assert 1 <= len(records) < 4
    late = [r for r in records
            if calendar.timegm(time.strptime(r["written_at"], "%Y-%m-%dT%H:%M:%SZ"))
            > taken_at + 1]
    assert late == []  # nothing certified after the takeover (1 s: record clock granularity)
    assert read_holder(fs, root).run_id == "run-that-took-over"  # left to its holder
    assert json.loads((out / "run.json").read_text())["status"] == "running"  # not its own

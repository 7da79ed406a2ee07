"""Fault injection for workers, scheduling and storage (stub engine, tens of images).

Every case checks from the output files alone that each input image is in the output exactly
once (by ``image_id`` over all completed shards): nothing lost, nothing duplicated.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
from ray.exceptions import ActorUnavailableError
from support.fault_proxy import FaultProxy, FaultRates
from support.images import encode, photos, tar_bytes
from support.stores import (
    S3Server,
    free_port,
    seaweed_command,
    seaweed_env,
    seaweed_internal_ports,
    stop_process,
)

from cass_engine import CassConfig
from pipeline.config import ComputeConfig, EngineSpec, IOConfig, JobConfig, OutputPolicy
from pipeline.runner import run_job
from pipeline.scheduler import Scheduler
from pipeline.shards import ShardSpec
from pipeline.storage import StorageError
from pipeline.stub import StubOptions
from schemas import SCHEMA_VERSION
from schemas.io import completed_shards, iter_label_rows, read_run_record


def _job(input_uri: str, output_uri: str, vocab: Path, options: dict | None = None,
         stub: StubOptions | None = None, io: dict | None = None, **compute) -> JobConfig:
    """A stub-engine job; a local output counts as shared (every test node is this machine)."""
    config = CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab))
    return JobConfig(
        IOConfig(input_uri, output_uri, max_image_pixels=1_000_000,
                 storage_options=options or {}, **(io or {})),
        ComputeConfig(**{"batch_size": 2, "progress_interval_s": 0.2, **compute}),
        EngineSpec(config, stub=stub or StubOptions()),
        policy=OutputPolicy(output_is_shared=True))


def _image_files(directory: Path, count: int) -> list[str]:
    """``count`` PNG files; returns the image ids they get with 2 images per shard."""
    directory.mkdir()
    names = [f"im{i:02d}.png" for i in range(count)]
    for name, array in zip(names, photos(count, 40), strict=True):
        (directory / name).write_bytes(encode(array))
    return [f"images-{i // 2:06d}/{name}" for i, name in enumerate(names)]


def _tar_shards(fs, prefix: str, shards: int, per_shard: int) -> list[str]:
    """WebDataset shards on a store; returns their image ids."""
    images, ids = iter(photos(shards * per_shard, 40)), []
    for s in range(shards):
        members = {f"k{s}-{i}.png": encode(next(images)) for i in range(per_shard)}
        fs.pipe_file(f"{prefix}/part-{s:02d}.tar", tar_bytes(members))
        ids += [f"part-{s:02d}/k{s}-{i}" for i in range(per_shard)]
    return ids


def _shards_done(line: str) -> int:
    match = re.search(r"shards (\d+)/", line)
    return int(match.group(1)) if match else -1


def assert_exactly_once(output: str, expected_ids: list[str], options: dict | None = None,
                        ok_only: bool = True) -> list[dict]:
    """Every input image is in the completed shards of the output exactly once."""
    rows = list(iter_label_rows(output, options))
    counts = Counter(r["image_id"] for r in rows)
    lost = sorted(set(expected_ids) - set(counts))
    duplicated = sorted(i for i, n in counts.items() if n > 1)
    assert not lost and not duplicated, f"lost {lost}, duplicated {duplicated}"
    assert set(counts) == set(expected_ids)
    shards = {i.split("/", 1)[0] for i in expected_ids}
    assert set(completed_shards(output, options)) == shards
    if ok_only:
        assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    return rows


# ---------------------------------------------------------------------- engine faults
def test_transient_engine_faults_are_retried_and_bad_images_isolated(ray_cpus, tmp_path,
                                                                     vocab_file):
    ids = _image_files(tmp_path / "in", 12)
    stub = StubOptions(oom_after_images=5, marker_dir=str(tmp_path))
    summary = run_job(_job(str(tmp_path / "in"), str(tmp_path / "oom"), vocab_file, stub=stub,
                           io={"images_per_shard": 2}, actors=2), emit=lambda _: None)
    assert (tmp_path / "stub-oom").exists()  # the fault happened once
    assert summary.status == "complete" and summary.record["this_run"]["retries"] == 1
    assert summary.record["totals"]["images_error"] == 0  # a MemoryError is no image's fault
    assert summary.record["resources"]["worker_replacements"] == 1
    assert_exactly_once(str(tmp_path / "oom"), ids)

    # an image on which the engine fails every time (RuntimeError, not ImageInputError):
    # its first attempt fails, the retry isolates it alone: one engine_error row, no more
    bad = tmp_path / "in" / "im05.png"
    bad.write_bytes(encode(photos(1, 40)[0][:37]))
    summary = run_job(_job(str(tmp_path / "in"), str(tmp_path / "bad"), vocab_file,
                           stub=StubOptions(fail_on_height=37), io={"images_per_shard": 2},
                           actors=2), emit=lambda _: None)
    assert summary.status == "complete" and summary.record["this_run"]["retries"] == 1
    rows = assert_exactly_once(str(tmp_path / "bad"), ids, ok_only=False)
    errors = {r["image_id"]: r["status"] for r in rows if r["status"] != "ok"}
    assert errors == {"images-000002/im05.png": "engine_error"}


# ---------------------------------------------------------------------- zombies
def test_unreachable_worker_is_killed_before_its_shards_run_again():
    events: list[tuple] = []

    class Actor:
        def __init__(self, slot: int) -> None:
            def launch(shard, cap, attempt, slot=slot):
                events.append(("launch", slot, shard.shard_id, attempt))
                return (slot, shard.shard_id, attempt)
            self.process_shard = SimpleNamespace(remote=launch)

    class Pool:
        actors, generation, ready, replacements = [Actor(0), Actor(1)], [0, 0], [True] * 2, 0

        def replace(self, slot: int) -> None:
            events.append(("kill", slot))
            self.generation[slot] += 1
            self.ready[slot] = False  # pending: never placed in this test

        def kill(self, slot: int) -> None:
            events.append(("kill", slot))

    spec = lambda i: ShardSpec(f"s{i}", "webdataset", (f"s{i}.tar",), (), "u", "fp")  # noqa: E731
    plan = SimpleNamespace(todo=[spec(i) for i in range(4)],
                           job=SimpleNamespace(compute=ComputeConfig(), io=IOConfig("i", "o")))
    progress = SimpleNamespace(shards_done=0, shard_retried=lambda *a: None,
                               shard_done=lambda record: None, emit=lambda line: None)
    scheduler = Scheduler(Pool(), plan, progress)
    scheduler.submit()
    zombie_refs = [launch.ref for launch in scheduler.in_flight() if launch.slot == 0]

    def outcome(ref):
        if ref[0] == 0:
            return ActorUnavailableError("The task may or may not have been executed", None)
        return {"num_images": 1}

    scheduler.on_result(zombie_refs[0], outcome(zombie_refs[0]))
    kill = events.index(("kill", 0))
    assert not any(launch.slot == 0 for launch in scheduler.in_flight())  # both taken back
    assert scheduler.lost == 1 and scheduler.retrying() == [r[1] for r in zombie_refs]
    assert all(scheduler.attempts(r[1]) == 1 for r in zombie_refs)
    for ref in [launch.ref for launch in scheduler.in_flight() if launch.slot == 1]:
        scheduler.on_result(ref, outcome(ref))  # the survivor finishes its shards ...
        scheduler.submit()  # ... and takes the retries, one at a time, never slot 0
        live = [launch.shard_id for launch in scheduler.in_flight()]
        assert len(live) == len(set(live))
    while scheduler.in_flight():
        ref = scheduler.in_flight()[0].ref
        scheduler.on_result(ref, outcome(ref))
        scheduler.submit()
    relaunched = [e for e in events[kill:] if e[0] == "launch"]
    retried = {e[2] for e in events[:kill] if e[0] == "launch" and e[1] == 0}
    assert {e[2] for e in relaunched} == retried and all(e[1] == 1 for e in relaunched)
    assert all(e[3] == 1 for e in relaunched)  # second launch: attempt 1 in its writes


def test_pending_workers_get_no_shard_and_the_run_gives_up_when_none_can_be_placed():
    class Pool:  # both workers lost; their replacements were never placed
        actors, generation, ready, replacements = [object(), object()], [1, 1], [False] * 2, 2

        def check_pending(self) -> list:
            return []

        def pending_since(self) -> float:
            return time.monotonic() - 5.0

    spec = lambda i: ShardSpec(f"s{i}", "webdataset", (f"s{i}.tar",), (), "u", "fp")  # noqa: E731
    plan = SimpleNamespace(todo=[spec(i) for i in range(3)],
                           job=SimpleNamespace(compute=ComputeConfig(startup_timeout_s=1.0),
                                               io=IOConfig("i", "o")))
    failed: list[str] = []
    progress = SimpleNamespace(shards_done=7, emit=lambda line: None,
                               shard_failed=lambda shard_id, reason: failed.append(shard_id))
    scheduler = Scheduler(Pool(), plan, progress)
    assert scheduler.max_replacements == 2 * 2 * 3 + 7  # grows with the finished shards
    scheduler.submit()
    assert not scheduler.in_flight()  # a worker that has not answered holds no shard
    assert scheduler.live_workers() == [] and scheduler.queued() == ["s0", "s1", "s2"]
    scheduler.check_workers()
    assert failed == ["s0", "s1", "s2"]
    assert "no worker could be placed within 1 s" in scheduler.failed[0]["reasons"][-1]


# ---------------------------------------------------------------------- node loss
@pytest.fixture
def two_nodes(ray_sessions):
    """A two-node Ray cluster on this machine, one logical GPU per node."""
    from ray.cluster_utils import Cluster

    ray_sessions.shutdown()
    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 2, "num_gpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.timeout(180)
def test_worker_node_killed_mid_run_finishes_on_the_survivor(two_nodes, tmp_path, vocab_file):
    cluster, worker_node = two_nodes
    ids = _image_files(tmp_path / "in", 24)
    killed: list[float] = []
    lines: list[str] = []

    def emit(line: str) -> None:
        lines.append(line)
        if not killed and _shards_done(line) >= 2:
            cluster.remove_node(worker_node, allow_graceful=False)
            killed.append(time.monotonic())

    job = _job(str(tmp_path / "in"), str(tmp_path / "out"), vocab_file,
               stub=StubOptions(seconds_per_image=0.2), io={"images_per_shard": 2},
               gpus_per_actor=1, cpus_per_actor=1)
    summary = run_job(job, emit=emit)
    assert killed, "the worker node was never killed:\n" + "\n".join(lines)
    assert summary.status == "complete", summary.record["failed_shards"]
    resources = summary.record["resources"]
    assert resources["workers_lost"] == 1 and resources["workers_unplaced"] == 1
    assert time.monotonic() - killed[0] < 60  # not waiting for a worker that cannot start
    retried = [line for line in lines if "will be retried: worker" in line]
    assert retried and all(re.search(r"worker (unreachable|died)", x) for x in retried)
    print("\n".join(retried))  # for the README table (pytest -s)
    assert_exactly_once(str(tmp_path / "out"), ids)


# ---------------------------------------------------------------------- storage faults
def test_s3_faults_through_a_proxy_lose_and_duplicate_nothing(ray_cpus, s3_server, vocab_file):
    bucket = s3_server.new_bucket()
    ids = _tar_shards(s3_server.filesystem(), f"{bucket}/in", shards=6, per_shard=4)
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    rates = FaultRates(slowdown_503=0.1, error_500=0.05, reset=0.05, stall=0.02, stall_s=1.0)
    proxy = FaultProxy(("127.0.0.1", port), rates, max_faults=40, lifetime_s=240, seed=8)
    options = {**s3_server.storage_options, "endpoint_url": proxy.endpoint_url}
    try:
        summary = run_job(_job(f"s3://{bucket}/in", f"s3://{bucket}/out", vocab_file, options,
                               actors=2), emit=lambda _: None)
    finally:
        proxy.stop()
    faults = sum(n for k, n in proxy.counts.items() if k != "requests")
    print(f"fault proxy: {dict(proxy.counts)}")  # for the README table (pytest -s)
    assert faults >= 5, proxy.counts  # the job's traffic did go through the proxy
    assert summary.status == "complete", summary.record["failed_shards"]
    assert_exactly_once(f"s3://{bucket}/out", ids, s3_server.storage_options)
    assert read_run_record(f"s3://{bucket}/out", s3_server.storage_options)["status"] == \
        "complete"


class _OwnSeaweed:
    """A SeaweedFS of this test alone (it gets killed), restartable on the same port/data."""

    def __init__(self, data_dir: Path) -> None:
        self.dir, self.port, self.internal = data_dir, free_port(), seaweed_internal_ports()
        self.server = S3Server(f"http://127.0.0.1:{self.port}")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = seaweed_command(self.dir, self.port, self.internal)
        log = open(self.dir / "weed.log", "ab")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(command, env=seaweed_env(), stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.server.filesystem().ls("")
                return
            except Exception:  # noqa: BLE001 - not up yet
                assert self.process.poll() is None, f"SeaweedFS exited (log: {self.dir})"
                assert time.monotonic() < deadline, "SeaweedFS did not start"
                time.sleep(0.3)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


@pytest.fixture
def own_seaweed(tmp_path):
    store = _OwnSeaweed(tmp_path / "weed")
    store.dir.mkdir()
    store.start()
    try:
        yield store
    finally:
        stop_process(store.process)


@pytest.mark.timeout(300)
def test_seaweedfs_killed_mid_run_and_restarted_then_rerun(ray_cpus, own_seaweed, vocab_file):
    store, server = own_seaweed, own_seaweed.server
    bucket = server.new_bucket()
    ids = _tar_shards(server.filesystem(), f"{bucket}/in", shards=8, per_shard=3)
    output = f"s3://{bucket}/out"
    job = _job(f"s3://{bucket}/in", output, vocab_file, server.storage_options,
               stub=StubOptions(seconds_per_image=0.1), actors=2, max_attempts=2)
    outage: list[threading.Thread] = []

    def emit(line: str) -> None:
        if not outage and _shards_done(line) >= 2:
            store.kill()  # mid-run: shards in flight, others waiting
            restart = threading.Thread(target=lambda: (time.sleep(3), store.start()))
            restart.start()
            outage.append(restart)

    try:
        first = run_job(job, emit=emit).status
    except StorageError as exc:  # the final run record could not be written
        first = f"raised {type(exc).__name__}"
    outage[0].join()
    print(f"SeaweedFS killed mid-run: first run {first}")  # for the README table (pytest -s)
    assert first in ("complete", "incomplete", "raised StorageError"), first
    again = run_job(job, emit=lambda _: None)
    assert again.status == "complete", again.record["failed_shards"]
    assert_exactly_once(output, ids, server.storage_options)


# ---------------------------------------------------------------------- bounded memory
def test_rows_are_spooled_in_row_groups_and_match_the_record(tmp_path):
    import hashlib

    import pyarrow.parquet as pq

    from pipeline.spool import RowSpool, remove_stale_spools
    from pipeline.writer import write_shard
    from schemas import error_row
    from schemas.io import read_label_table

    rows = [error_row(shard_id="s", source_uri="u", key=f"k{i:05d}",
                      status="decode_error" if i % 3 else "empty", error="x")
            for i in range(2500)]
    spool = RowSpool({"schema_version": "1.0"}, group_rows=1000, directory=str(tmp_path))
    for row in rows:
        spool.add(row)
        assert len(spool._rows) < 1000  # never more than one row group held
    table = spool.close()
    assert pq.ParquetFile(table.path).metadata.num_row_groups == 3
    fs = __import__("fsspec").filesystem("file")
    record = write_shard(fs, str(tmp_path / "out"), "s", table, {}, {})
    spool.discard()
    assert not os.path.exists(table.path)
    stale = tmp_path / f"cass-spool-{2**22 + 7}-x.parquet"  # above Linux's largest pid
    stale.write_bytes(b"left by a killed worker")
    live = tmp_path / f"cass-spool-{os.getpid()}-y.parquet"
    live.write_bytes(b"in use")
    assert remove_stale_spools(str(tmp_path)) == 1
    assert not stale.exists() and live.exists()
    labels = tmp_path / "out" / record["labels"]
    assert record["labels"] == "labels/s.local-0.parquet"
    data = labels.read_bytes()
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["bytes"] == len(data) and record["num_images"] == 2500
    assert record["errors_by_status"] == {"decode_error": 1666, "empty": 834}
    read, meta = read_label_table(str(labels))
    assert read.column("key").to_pylist() == [r["key"] for r in rows]
    assert meta["schema_version"] == SCHEMA_VERSION


def test_streaming_tar_reader_keeps_no_member_headers(tmp_path, monkeypatch):
    import tarfile

    import fsspec

    from pipeline.readers import iter_raw_images

    members = {f"m{i:03d}.{ext}": b"x" * 10 for i in range(60) for ext in ("png", "json")}
    (tmp_path / "a.tar").write_bytes(tar_bytes(members))
    kept: list[int] = []
    original = tarfile.TarFile.next
    monkeypatch.setattr(tarfile.TarFile, "next",
                        lambda self: (kept.append(len(self.members)), original(self))[1])
    shard = ShardSpec("a", "webdataset", (str(tmp_path / "a.tar"),), (), "u", "fp")
    items = list(iter_raw_images(shard, fsspec.filesystem("file")))
    assert len(items) == 60 and all(i.error is None for i in items)
    assert len(kept) > 120 and max(kept) <= 1  # one header at a time, not all 120


def test_key_set_is_exact_across_its_merges():
    from pipeline.readers import KeySet

    keys = KeySet(buffer=50)
    for i in range(0, 400, 2):
        keys.add(f"k{i}")
    assert all(f"k{i}" in keys for i in range(0, 400, 2))
    assert not any(f"k{i}" in keys for i in range(1, 400, 2))
    assert len(keys._sorted) == 200 and not keys._recent  # merged four times

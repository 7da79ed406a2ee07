"""Decode and encode in processes (``ComputeConfig.cpu_processes``): same rows as threads,
the same failure rules, and no process left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.child_hooks import out_of_memory
from support.images import edge_case_images, encode, photo, tar_bytes

from cass_engine import CassConfig
from pipeline.config import ComputeConfig, ConfigError, EngineSpec, IOConfig
from pipeline.cpu_pool import PIXEL_DIR, CpuProcessDied, CpuProcesses, resolve_processes
from pipeline.shards import list_shards
from pipeline.stub import StubOptions
from pipeline.worker import LabelWorker, WorkerSpec
from schemas.completion import certified_labels
from schemas.io import open_uri, read_label_table

LIMIT = 1_000_000


def _worker(tmp_path: Path, vocab: Path, out: str, processes: int | str,
            **io_options) -> LabelWorker:
    config = CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab))
    io_cfg = IOConfig(str(tmp_path / "in"), str(tmp_path / out), max_image_pixels=LIMIT,
                      **io_options)
    compute = ComputeConfig(batch_size=3, cpu_processes=processes)
    return LabelWorker(WorkerSpec(EngineSpec(config, stub=StubOptions()), io_cfg, compute,
                                  "fp", {"schema_version": "1.0"}))


def _mixed_shard(tmp_path: Path) -> dict:
    """A tar shard of good, corrupt, truncated, empty, too-large and EXIF-rotated images,
    plus photos of several sizes (the edge cases and their expected statuses)."""
    cases = {name: data for name, (data, _) in edge_case_images().items()}
    for i in range(12):
        cases[f"photo{i:02d}.jpg"] = encode(photo("coffee", 40 + 7 * i), "JPEG")
    (tmp_path / "in").mkdir(exist_ok=True)
    (tmp_path / "in" / "s.tar").write_bytes(tar_bytes(cases))
    return cases


def _rows(out: Path) -> list[dict]:
    [found] = certified_labels(*open_uri(str(out)))
    table, _ = read_label_table(found.path)
    return table.to_pylist()


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_processes_write_the_same_rows_as_threads(tmp_path, vocab_file):
    cases = _mixed_shard(tmp_path)
    tables = {}
    for processes in (0, 2):
        worker = _worker(tmp_path, vocab_file, f"out{processes}", processes, confidence=True)
        try:
            record = worker.process_shard(list_shards(worker.spec.io)[0])
            if processes:
                assert len(worker._cpu.pids()) == 2  # the work really ran in two children
                prefix = worker._cpu._prefix  # every decoded image's pixel file was taken
                assert prefix and not [n for n in os.listdir(PIXEL_DIR) if n.startswith(prefix)]
        finally:
            worker.close()
        assert record["num_images"] == len(cases)
        tables[processes] = _rows(tmp_path / f"out{processes}")
    threads, procs = tables[0], tables[2]
    statuses = {r["status"] for r in threads}
    assert {"ok", "decode_error", "empty", "too_large"} <= statuses
    assert sum(r["status"] == "ok" for r in threads) == 20
    assert procs == threads  # every column of every row, in the same order


def test_a_killed_child_fails_the_attempt_and_the_retry_completes(tmp_path, vocab_file,
                                                                  monkeypatch):
    cases = _mixed_shard(tmp_path)
    worker = _worker(tmp_path, vocab_file, "out", 2)
    shard = list_shards(worker.spec.io)[0]
    decode, calls, killed = CpuProcesses.decode, [], []

    def kill_a_child_midway(self, data):
        calls.append(1)
        if len(calls) == 6:
            killed.append(self.pids()[0])
            os.kill(killed[0], signal.SIGKILL)
        return decode(self, data)

    monkeypatch.setattr(CpuProcesses, "decode", kill_a_child_midway)
    try:
        with pytest.raises(CpuProcessDied, match="decode/encode process of this worker died"):
            worker.process_shard(shard)
        assert not (tmp_path / "out" / "_done").exists()  # nothing certified
        monkeypatch.setattr(CpuProcesses, "decode", decode)
        record = worker.process_shard(shard, attempt=1)  # a fresh pool
        healthy = worker._cpu.pids()
        assert killed[0] not in healthy
        worker._cpu.restart()  # a late restart (another shard's failure) keeps a healthy pool
        assert worker._cpu.pids() == healthy
    finally:
        worker.close()
    rows = _rows(tmp_path / "out")
    assert record["num_images"] == len(cases) == len(rows)
    assert sorted(r["key"] for r in rows) == sorted({r["key"] for r in rows})  # no duplicate


def test_memory_error_in_a_child_fails_the_attempt_not_the_image(tmp_path, vocab_file,
                                                                 monkeypatch):
    _mixed_shard(tmp_path)
    worker = _worker(tmp_path, vocab_file, "out", 1)
    monkeypatch.setattr("pipeline.cpu_pool.decode_to_file", out_of_memory)  # runs in the child
    try:
        with pytest.raises(MemoryError, match="no memory left"):
            worker.process_shard(list_shards(worker.spec.io)[0])
    finally:
        worker.close()
    assert not (tmp_path / "out" / "_done").exists()  # no error rows certified


def test_the_children_end_with_the_worker(tmp_path, vocab_file):
    _mixed_shard(tmp_path)
    worker = _worker(tmp_path, vocab_file, "out", 2)
    worker.process_shard(list_shards(worker.spec.io)[0])
    pids = worker._cpu.pids()
    assert len(pids) == 2 and not any(_gone(pid, 0.2) for pid in pids)  # kept across shards
    worker.close()
    assert all(_gone(pid) for pid in pids)


def test_the_children_end_when_their_actor_dies_without_closing(tmp_path):
    script = ("import os, sys\n"
              "from pipeline.cpu_pool import CpuProcesses\n"
              "pool = CpuProcesses(2, 10**6)\n"
              "assert pool.decode(sys.stdin.buffer.read()).result().status == 'ok'\n"
              "print(*pool.pids(), flush=True)\n"
              "os._exit(0)\n")
    done = subprocess.run([sys.executable, "-c", script], input=encode(photo("coffee", 32)),
                          capture_output=True, timeout=120, check=True)
    pids = [int(p) for p in done.stdout.split()]
    assert pids and all(_gone(pid) for pid in pids)


def test_cpu_processes_setting():
    assert resolve_processes(0, 8) == 0 and resolve_processes(3, None) == 3
    assert resolve_processes("auto", 8) == 7 and resolve_processes("auto", 2) == 0
    with pytest.raises(ConfigError, match="cpu_processes"):
        ComputeConfig(cpu_processes=-1)
    with pytest.raises(ConfigError, match="cpu_processes"):
        ComputeConfig(cpu_processes="many")


def test_cpu_processes_flag(tmp_path):
    from jobs.label import build_parser, job_from_args

    base = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    assert job_from_args(build_parser().parse_args(base)).compute.cpu_processes == 0
    for value, expected in (("3", 3), ("auto", "auto")):
        args = build_parser().parse_args([*base, "--cpu-processes", value])
        assert job_from_args(args).compute.cpu_processes == expected
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--cpu-processes", "-2"])


def test_a_ray_job_with_cpu_processes_labels_every_image(ray_cpus, tmp_path, vocab_file):
    from pipeline.config import JobConfig, OutputPolicy
    from pipeline.runner import run_job

    cases = _mixed_shard(tmp_path)
    config = CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab_file))
    job = JobConfig(IOConfig(str(tmp_path / "in"), str(tmp_path / "out"),
                             max_image_pixels=LIMIT),
                    ComputeConfig(actors=1, gpus_per_actor=0, batch_size=4, cpu_processes=2,
                                  progress_interval_s=0.5),
                    EngineSpec(config, stub=StubOptions()),
                    policy=OutputPolicy(output_is_shared=True))
    summary = run_job(job, emit=lambda _: None)  # the forkserver runs inside the actor
    assert summary.status == "complete"
    rows = _rows(tmp_path / "out")
    assert len(rows) == len(cases) and sum(r["status"] == "ok" for r in rows) == 20


def test_pixel_files_of_killed_actors_are_removed_when_a_worker_starts(tmp_path):
    from pipeline.cpu_pool import PIXEL_PREFIX, remove_stale_pixel_files

    stale = tmp_path / f"{PIXEL_PREFIX}{2**22 + 11}-abcd1234-x1"  # above Linux's largest pid
    live = tmp_path / f"{PIXEL_PREFIX}{os.getpid()}-abcd1234-x2"
    other = tmp_path / "unrelated-file"
    for path in (stale, live, other):
        path.write_bytes(b"pixels")
    assert remove_stale_pixel_files(str(tmp_path)) == 1
    assert not stale.exists() and live.exists() and other.exists()
    assert remove_stale_pixel_files(str(tmp_path / "missing")) == 0

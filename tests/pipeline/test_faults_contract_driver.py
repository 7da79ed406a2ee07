"""Fault injection against the output contract, the driver and its lease: signals to the
driver, an unexpected failure after planning, a lease lost mid-run, local outputs
(relative paths under `ray job submit`, multi-node clusters).

Each case injects one fault with real parts (SeaweedFS on loopback where storage matters, a
real local Ray, the stub engine, tens of images) and then checks from the files alone
(:mod:`support.fault_table`) that every input image is in the output exactly once, that the
completion records match ``run.json`` and that nothing uncertified is visible to readers.
Helpers shared by these files: :mod:`support.contract`.
"""

from __future__ import annotations

import calendar
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from support import REPO
from support.contract import certified_records, stub_job, upload_shards
from support.fault_table import assert_exactly_once, audit_output, fault_row
from support.images import encode, photos

from jobs import label as label_job
from pipeline.config import OutputPolicy
from pipeline.lease import read_holder
from pipeline.plan import StartupError
from pipeline.runner import run_job
from pipeline.stub import StubOptions
from schemas.io import open_uri, read_run_record

# ---------------------------------------------------------------------- signals
_DRIVER = """
import sys
from jobs import label
from pipeline.stub import StubOptions
label.StubOptions = lambda: StubOptions(seconds_per_image=0.25)
sys.exit(label.main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_to_the_driver_record_interrupted_and_a_rerun_completes(
        ray_cpus, tmp_path, vocab_file, monkeypatch, signum, code):
    (tmp_path / "in").mkdir()
    keys = []
    for i, array in enumerate(photos(16, 40)):
        (tmp_path / "in" / f"im{i:02d}.png").write_bytes(encode(array))
        keys.append(f"im{i:02d}.png")
    out = tmp_path / "out"
    argv = ["--engine", "stub", "--vocab", str(vocab_file), "--input", str(tmp_path / "in"),
            "--output", str(out), "--images-per-shard", "4", "--actors", "1",
            "--shards-per-actor", "1", "--progress-interval", "0.5"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, *argv], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not list((out / "_done").glob("*.json")):
            assert time.monotonic() < deadline and driver.poll() is None, driver.stdout.read()
            time.sleep(0.1)
        driver.send_signal(signum)
        log, _ = driver.communicate(timeout=90)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == code, log
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted" and record["history"][-1]["exit_code"] == code
    assert not (out / "_lease.json").exists()
    done = record["totals"]["shards"]  # certified before the signal
    assert 1 <= done < 4
    monkeypatch.setattr(label_job, "StubOptions", lambda: StubOptions(seconds_per_image=0.25))
    assert label_job.main(argv) == 0  # the same command, in this process's Ray
    record = json.loads((out / "run.json").read_text())
    assert record["this_run"]["shards_skipped"] == done
    assert [h["exit_code"] for h in record["history"]] == [code, 0]
    audit = audit_output(str(out), None, [f"images-{i // 4:06d}/{k}" for i, k in
                                          enumerate(keys)])
    assert_exactly_once(audit)
    name = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
    fault_row(f"{name} to the driver mid-run", 2, audit,
              f"exit {code}, run.json interrupted, lease released; rerun completes")


# ---------------------------------------------------------------------- lease lost
def test_an_unexpected_failure_after_planning_ends_the_run_and_frees_the_output(
        tmp_path, vocab_file, monkeypatch):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(encode(photos(1, 40)[0]))
    out = tmp_path / "out"
    argv = ["--engine", "stub", "--vocab", str(vocab_file), "--input", str(tmp_path / "in"),
            "--output", str(out), "--actors", "1"]

    def unreachable(address=None):
        raise ConnectionError("could not connect to ray://user:pw@10.0.0.9:10001?x=1")

    monkeypatch.setattr(label_job, "init_ray", unreachable)
    with pytest.raises(ConnectionError):
        label_job.main(argv)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and record["history"][-1]["exit_code"] == 1
    assert "ConnectionError" in record["error"] and "pw" not in record["error"]
    assert read_holder(*open_uri(str(out))) is None  # a cron retry is not refused


def test_a_run_that_loses_its_lease_stops_certifying(ray_cpus, s3_server, vocab_file):
    bucket = s3_server.new_bucket()
    fs = s3_server.filesystem()
    ids = upload_shards(fs, f"{bucket}/wds", num_shards=4, per_shard=4)
    output = f"s3://{bucket}/out"
    job = stub_job(f"s3://{bucket}/wds", output, vocab_file, s3_server,
                   StubOptions(seconds_per_image=0.3), OutputPolicy(lease_ttl_s=2.0), actors=1,
                   shards_per_actor=1, max_attempts=2)
    out_fs, root = open_uri(output, s3_server.storage_options)
    results: list = []
    runner = threading.Thread(target=lambda: results.append(run_job(job, emit=lambda _: None)))
    runner.start()
    deadline = time.monotonic() + 120
    while not certified_records(out_fs, root):
        assert time.monotonic() < deadline and runner.is_alive(), "the run did not start"
        time.sleep(0.1)
    holder = read_holder(out_fs, root)
    thief = dataclasses.replace(holder, run_id="run-that-took-over", expires_at=time.time() + 600)
    fs.pipe_file(f"{root}/_lease.json", thief.to_bytes())  # as if it expired and was taken
    taken_at = time.time()
    runner.join(timeout=120)
    summary = results[0]
    assert summary.status == "incomplete" and summary.exit_code == 3
    assert any("lost the output's lease" in " ".join(f["reasons"])
               for f in summary.record["failed_shards"])
    records = certified_records(out_fs, root)
    assert 1 <= len(records) < 4
    assert read_holder(out_fs, root).run_id == "run-that-took-over"  # not released by the loser
    assert read_run_record(output, s3_server.storage_options)["status"] == "running"  # not its
    late = [r for r in records.values()
            if calendar.timegm(time.strptime(r["written_at"], "%Y-%m-%dT%H:%M:%SZ"))
            > taken_at + 1]
    assert late == []  # nothing certified after the takeover (1 s: record clock granularity)
    fs.rm(f"{root}/_lease.json")  # the other run ends
    again = run_job(job, emit=lambda _: None)
    assert again.status == "complete"
    audit = audit_output(output, s3_server.storage_options, ids)
    assert_exactly_once(audit)
    fault_row("lease taken over mid-run (the run's renewals lost)", 2, audit,
              "loser stops certifying, exit 3, leaves run.json and lease alone; rerun completes")


# ---------------------------------------------------------------------- local outputs
def test_relative_local_paths_resolve_here_and_are_refused_under_ray_job_submit(
        tmp_path, vocab_file, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert label_job.local_path("out/run1", "--output") == str(tmp_path / "out" / "run1")
    assert label_job.local_path("s3://bucket/out", "--output") == "s3://bucket/out"
    job = json.dumps({"metadata": {"job_submission_id": "raysubmit_abc"}})
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", job)
    assert label_job.local_path("samples", "--input") == str(tmp_path / "samples")
    assert label_job.local_path("/shared/out", "--output") == "/shared/out"
    argv = ["--engine", "stub", "--vocab", str(vocab_file), "--input", "in", "--output",
            "out/run1"]
    assert label_job.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "job raysubmit_abc" in err and "temporary copy" in err
    assert not (tmp_path / "out").exists()


def test_local_output_on_a_multi_node_cluster_needs_output_is_shared(ray_cpus, tmp_path,
                                                                    vocab_file, monkeypatch):
    import pipeline.outcome

    (tmp_path / "in").mkdir()
    for i, array in enumerate(photos(3, 40)):
        (tmp_path / "in" / f"im{i}.png").write_bytes(encode(array))
    monkeypatch.setattr(pipeline.outcome, "live_node_count", lambda: 2)  # the driver's view
    job = stub_job(str(tmp_path / "in"), str(tmp_path / "out"), vocab_file)
    with pytest.raises(StartupError, match="local path and the cluster has 2 nodes.*"
                                           "--output-is-shared"):
        run_job(job, emit=lambda _: None)
    record = read_run_record(str(tmp_path / "out"))
    assert record["status"] == "failed" and record["history"][-1]["exit_code"] == 2
    assert not (tmp_path / "out" / "_lease.json").exists()
    shared = dataclasses.replace(job, policy=OutputPolicy(output_is_shared=True))
    assert run_job(shared, emit=lambda _: None).status == "complete"
    assert_exactly_once(audit_output(str(tmp_path / "out"), None,
                                     [f"images-000000/im{i}.png" for i in range(3)]))

"""Fault injection against the output contract: lease, fencing, certified records, resume.

Each case injects one fault with real parts (SeaweedFS on loopback where storage matters, a
real local Ray, the stub engine, tens of images) and then checks from the files alone
(:mod:`tests.fault_table`) that every input image is in the output exactly once, that the
completion records match ``run.json`` and that nothing uncertified is visible to readers.
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
from pathlib import Path

import pytest
from support import REPO
from support.fault_table import assert_exactly_once, audit_output, fault_row
from support.images import encode, photos, tar_bytes, write_vocabulary

from cass_engine import CassConfig
from jobs import export_coco
from jobs import label as label_job
from pipeline.conditional import (
    PreconditionFailed,
    create_object,
    honours_conditional_create,
    read_object,
    replace_object,
)
from pipeline.config import ComputeConfig, EngineSpec, IOConfig, JobConfig, OutputPolicy
from pipeline.lease import Lease, LeaseHeld, LeaseLost, check_holder, read_holder
from pipeline.plan import StartupError, plan_job
from pipeline.runner import run_job
from pipeline.stub import StubOptions
from pipeline.worker import LabelWorker, WorkerSpec
from schemas.completion import OutputIntegrityError, check_output
from schemas.io import list_label_files, open_uri, read_run_record


# ---------------------------------------------------------------------- helpers
def _upload(fs, prefix: str, num_shards: int = 3, per_shard: int = 4) -> set[str]:
    """Tar shards of PNG photos with a caption member each; returns the image ids."""
    images = iter(photos(num_shards * per_shard, max_side=40))
    ids = set()
    for s in range(num_shards):
        members = {}
        for i in range(per_shard):
            members[f"{s}{i:02d}.png"] = encode(next(images))
            members[f"{s}{i:02d}.json"] = b'{"caption": "x"}'
            ids.add(f"shard-{s:02d}/{s}{i:02d}")
        fs.pipe_file(f"{prefix}/shard-{s:02d}.tar", tar_bytes(members))
    return ids


def _job(input_uri: str, output_uri: str, vocab: Path, server=None,
         stub: StubOptions | None = None, policy: OutputPolicy | None = None,
         **compute: object) -> JobConfig:
    config = CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab))
    io_cfg = IOConfig(input_uri, output_uri, max_image_pixels=1_000_000,
                      storage_options=server.storage_options if server else {})
    compute_cfg = ComputeConfig(**{"batch_size": 4, "progress_interval_s": 0.5, **compute})
    return JobConfig(io_cfg, compute_cfg, EngineSpec(config, stub=stub or StubOptions()),
                     policy or OutputPolicy())


def _snapshot(fs, root: str) -> dict[str, str]:
    """``{path: ETag}`` of every object under the output (what "nothing changed" means)."""
    fs.invalidate_cache()
    return {p: str(i.get("ETag")) for p, i in fs.find(root, detail=True).items()}


def _records(fs, root: str) -> dict[str, dict]:
    return {sid: c.record for sid, c in check_output(fs, root).certified.items()}


# ---------------------------------------------------------------------- primitives
@pytest.fixture(params=["memory", "local", "s3"])
def store(request, tmp_path):
    """``(fs, root)`` of an empty output on each kind of store. (Not GCS: the test emulator
    ignores ``ifGenerationMatch``, so it cannot show a conditional create failing; gcsfs maps
    real GCS's 412 to ``FileExistsError``, which :mod:`pipeline.conditional` handles.)"""
    if request.param == "memory":
        yield open_uri(f"memory://lease-{time.monotonic_ns()}")
    elif request.param == "local":
        yield open_uri(str(tmp_path / "out"))
    else:
        server = request.getfixturevalue(f"{request.param}_server")
        yield open_uri(f"{request.param}://{server.new_bucket()}/out",
                          server.storage_options)


def test_conditional_create_and_replace_let_exactly_one_writer_win(store):
    fs, root = store
    path = f"{root}/x.json"
    token = create_object(fs, path, b"first")
    with pytest.raises(PreconditionFailed):
        create_object(fs, path, b"second")
    data, read_token = read_object(fs, path)
    assert data == b"first" and read_token == token
    newer = replace_object(fs, path, b"third", read_token)
    with pytest.raises(PreconditionFailed):  # a second replacer holding the old version
        replace_object(fs, path, b"fourth", read_token)
    assert read_object(fs, path) == (b"third", newer)


def test_local_create_stays_exclusive_without_hard_links(tmp_path, monkeypatch):
    import errno

    def no_links(src, dst):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    fs, root = open_uri(str(tmp_path / "out"))
    create_object(fs, f"{root}/x.json", b"first")
    with pytest.raises(PreconditionFailed):
        create_object(fs, f"{root}/x.json", b"second")
    assert (tmp_path / "out" / "x.json").read_bytes() == b"first"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.json"]


def test_stores_that_ignore_conditional_writes_are_detected(s3_server, gcs_server):
    fs, root = open_uri(f"s3://{s3_server.new_bucket()}/out", s3_server.storage_options)
    assert honours_conditional_create(fs, root)
    gcs, groot = open_uri(f"gs://{gcs_server.new_bucket()}/out", gcs_server.storage_options)
    assert not honours_conditional_create(gcs, groot)  # the emulator ignores the condition
    fs.invalidate_cache()
    gcs.invalidate_cache()
    left = fs.find(root) + gcs.find(groot)
    assert not [p for p in left if "probe" in p], left  # the probes are gone


def test_lease_is_exclusive_waits_and_is_taken_over_only_after_expiry(store):
    fs, root = store
    first = Lease(fs, root, "run-a", "2026-01-01T00:00:00Z", ttl_s=60)
    first.acquire()
    second = Lease(fs, root, "run-b", "2026-01-01T00:00:01Z", ttl_s=60)
    with pytest.raises(LeaseHeld, match=r"run run-a \(host .+, pid \d+, started "
                                        r"2026-01-01T00:00:00Z; lease expires in \d+ s\)"):
        second.acquire()
    threading.Timer(0.5, first.release).start()
    second.acquire(wait_s=20, poll_s=0.1)  # the holder lets go: the waiter gets it
    assert read_holder(fs, root).run_id == "run-b" and not first.renew()
    second.release()
    assert read_object(fs, f"{root}/_lease.json") is None

    stale = Lease(fs, root, "run-old", "2026-01-01T00:00:00Z", ttl_s=5,
                  clock=lambda: time.time() - 3600)  # its last renewal is an hour old
    stale.acquire()
    taker = Lease(fs, root, "run-new", "2026-01-01T01:00:00Z", ttl_s=60)
    taker.acquire()
    assert taker.took_over is not None and taker.took_over.run_id == "run-old"
    assert not stale.renew() and stale.lost.is_set()  # the zombie learns it lost
    with pytest.raises(LeaseLost, match="run run-old no longer holds"):
        check_holder(fs, root, "run-old")
    check_holder(fs, root, "run-new")
    stale.release()  # a lost lease is not deleted by its former holder
    assert read_holder(fs, root).run_id == "run-new"
    taker.release()


# ---------------------------------------------------------------------- overlapping runs
def test_overlapping_runs_wait_or_are_refused_and_never_mix(ray_cpus, s3_server, vocab_file,
                                                            tmp_path, capsys):
    bucket = s3_server.new_bucket()
    fs = s3_server.filesystem()
    ids = _upload(fs, f"{bucket}/wds", num_shards=4, per_shard=4)
    output = f"s3://{bucket}/out"
    slow = _job(f"s3://{bucket}/wds", output, vocab_file, s3_server,
                StubOptions(seconds_per_image=0.25), actors=1, shards_per_actor=1)
    results: list = []
    first = threading.Thread(target=lambda: results.append(run_job(slow, emit=lambda _: None)))
    first.start()
    deadline = time.monotonic() + 120
    while not _records(*open_uri(output, s3_server.storage_options)):
        assert time.monotonic() < deadline and first.is_alive(), "the first run did not start"
        time.sleep(0.2)
    holder = read_holder(*open_uri(output, s3_server.storage_options))
    with pytest.raises(StartupError, match=f"being written by run {holder.run_id} "
                                           r"\(host .+, pid \d+, started "):
        plan_job(slow)  # same configuration: refused while the first run holds the lease
    other = write_vocabulary(tmp_path / "other.txt", ["cat", "dog", "grass"])
    argv = ["--engine", "stub", "--vocab", str(other), "--input", f"s3://{bucket}/wds",
            "--output", output, "--storage-options", json.dumps(s3_server.storage_options),
            "--max-image-pixels", "1000000", "--overwrite"]
    before = {sid: r["sha256"] for sid, r in _records(*open_uri(
        output, s3_server.storage_options)).items()}
    assert label_job.main(argv) == 2  # another configuration + --overwrite: refused too
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"run {holder.run_id} (host" in err
    assert "--wait-for-lease" in err
    during = _records(*open_uri(output, s3_server.storage_options))
    assert {sid: during[sid]["sha256"] for sid in before} == before  # nothing was cleared
    assert label_job.main(argv + ["--wait-for-lease", "120"]) == 0  # waits, then replaces
    first.join(timeout=60)
    assert results and results[0].status == "complete"
    audit = audit_output(output, s3_server.storage_options, ids)
    assert_exactly_once(audit)
    record = read_run_record(output, s3_server.storage_options)
    assert [c["name"] for c in record["categories"]] == ["cat", "dog", "grass"]
    assert {r["fingerprint"] for r in _records(*open_uri(
        output, s3_server.storage_options)).values()} == {record["fingerprint"]}
    history = record["history"]
    assert [h["status"] for h in history] == ["complete", "complete"]
    assert history[0]["run_id"] == holder.run_id
    assert any(a.startswith("cleared the output (--overwrite)") for a in history[1]["actions"])
    assert not fs.exists(f"{bucket}/out/_lease.json")
    fault_row("two overlapping runs (second: other config + --overwrite)", 4, audit,
              "second refused (exit 2, holder named), then waited and replaced; never mixed")


# ---------------------------------------------------------------------- zombies
def test_late_writes_of_zombies_never_become_visible(ray_cpus, s3_server, vocab_file):
    bucket = s3_server.new_bucket()
    fs = s3_server.filesystem()
    ids = _upload(fs, f"{bucket}/wds")
    output = f"s3://{bucket}/out"
    job = _job(f"s3://{bucket}/wds", output, vocab_file, s3_server)
    first = run_job(job, emit=lambda _: None)
    out_fs, root = open_uri(output, s3_server.storage_options)
    certified = _records(out_fs, root)
    plan = plan_job(job)  # a second run holds the lease; everything is done
    assert not plan.todo
    by_id = {s.shard_id: s for s in plan.shards}
    spec = WorkerSpec(job.engine, job.io, job.compute, plan.fingerprint,
                      plan.file_metadata({}), run_id=first.record["run_id"])
    zombie = LabelWorker(spec)  # a worker of the first run, finishing after it ended
    zombie.prepare(zombie.compute_text_embeddings())
    with pytest.raises(LeaseLost):
        zombie.process_shard(by_id["shard-00"], attempt=7)
    late = dataclasses.replace(spec, run_id=plan.run_id)
    retried = LabelWorker(late)  # this run's own first attempt, declared dead, finishing
    retried.prepare(retried.compute_text_embeddings())
    answer = retried.process_shard(by_id["shard-01"], attempt=5)
    assert answer["superseded_attempt"] == 5
    assert answer["labels"] == certified["shard-01"]["labels"]
    plan.release()
    leftover = f"{root}/labels/shard-02.{first.record['run_id']}-9.parquet"
    fs.pipe_file(leftover, fs.cat_file(f"{root}/{certified['shard-02']['labels']}"))
    assert _records(out_fs, root) == certified  # no record moved
    audit = audit_output(output, s3_server.storage_options, ids)
    assert audit["uncertified"] == [leftover]  # present, but no reader sees it
    assert_exactly_once(audit)
    assert set(list_label_files(output, s3_server.storage_options)) == {
        f"{root}/{r['labels']}" for r in certified.values()}
    again = run_job(job, emit=lambda _: None)  # the next run removes the leftover
    assert again.record["this_run"]["shards_labelled"] == 0
    audit = audit_output(output, s3_server.storage_options, ids)
    assert_exactly_once(audit)
    assert audit["uncertified"] == []
    fault_row("zombie writes after its shard was certified (3 late attempts)", 3, audit,
              "late objects never read, removed by the next run; records unchanged")


# ---------------------------------------------------------------------- lost objects
def test_deleted_and_truncated_labels_objects_are_relabelled_exactly(ray_cpus, s3_server,
                                                                     vocab_file, tmp_path):
    bucket = s3_server.new_bucket()
    fs = s3_server.filesystem()
    ids = _upload(fs, f"{bucket}/wds", num_shards=4)
    output = f"s3://{bucket}/out"
    job = _job(f"s3://{bucket}/wds", output, vocab_file, s3_server)
    first = run_job(job, emit=lambda _: None)
    out_fs, root = open_uri(output, s3_server.storage_options)
    records = _records(out_fs, root)
    fs.rm(f"{root}/{records['shard-00']['labels']}")  # a lifecycle rule
    truncated = f"{root}/{records['shard-01']['labels']}"
    fs.pipe_file(truncated, fs.cat_file(truncated)[:100])
    with pytest.raises(OutputIntegrityError, match=r"shard shard-00: its labels object .* "
                                                   r"is missing; shard shard-01: .* has 100 "
                                                   r"bytes"):
        list_label_files(output, s3_server.storage_options)  # readers refuse, not skip
    options = json.dumps(s3_server.storage_options)
    assert export_coco.main(["--labels", output, "--out", str(tmp_path / "c.json"),
                             "--storage-options", options]) == 2
    again = run_job(job, emit=lambda _: None)
    assert again.record["this_run"]["shards_labelled"] == 2
    after = _records(out_fs, root)
    assert {sid for sid, r in after.items() if r["run_id"] == again.record["run_id"]} == {
        "shard-00", "shard-01"}
    assert {sid: after[sid] for sid in ("shard-02", "shard-03")} == {
        sid: records[sid] for sid in ("shard-02", "shard-03")}
    audit = audit_output(output, s3_server.storage_options, ids)
    assert_exactly_once(audit)
    fault_row("labels objects deleted / truncated under their records", 2, audit,
              "readers refuse (named); rerun relabels exactly those 2 shards")

    flipped = f"{root}/{after['shard-02']['labels']}"  # same size, other contents
    data = bytearray(fs.cat_file(flipped))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(flipped, bytes(data))
    assert run_job(job, emit=lambda _: None).record["this_run"]["shards_labelled"] == 0
    verify = dataclasses.replace(job, policy=OutputPolicy(verify=True))
    checked = run_job(verify, emit=lambda _: None)
    assert checked.record["this_run"]["shards_labelled"] == 1
    assert _records(out_fs, root)["shard-02"]["run_id"] == checked.record["run_id"]
    assert first.record["run_id"] != checked.record["run_id"]
    assert_exactly_once(audit_output(output, s3_server.storage_options, ids))


def test_a_certified_table_lost_during_the_run_ends_it_incomplete(ray_cpus, tmp_path,
                                                                  vocab_file):
    import fsspec

    (tmp_path / "wds").mkdir()
    ids = _upload(fsspec.filesystem("file"), str(tmp_path / "wds"), num_shards=4)
    done_dir, deleted = tmp_path / "out" / "_done", []

    def emit(line: str) -> None:  # a lifecycle rule strikes while the run goes on
        records = sorted(done_dir.glob("*.json")) if done_dir.exists() else []
        if records and not deleted:
            record = json.loads(records[0].read_text())
            (tmp_path / "out" / record["labels"]).unlink()
            deleted.append(record["shard_id"])

    job = _job(str(tmp_path / "wds"), str(tmp_path / "out"), vocab_file,
               stub=StubOptions(seconds_per_image=0.3), actors=1)
    summary = run_job(job, emit=emit)
    assert deleted, "no shard was certified while the run went on"
    assert summary.status == "incomplete" and summary.exit_code == 3  # not "complete", 0
    assert summary.record["totals"]["shards_not_holding"] == deleted
    again = run_job(job, emit=lambda _: None)
    assert again.status == "complete" and again.record["this_run"]["shards_labelled"] == 1
    assert_exactly_once(audit_output(str(tmp_path / "out"), {}, ids))


# ---------------------------------------------------------------------- changed input
def test_changed_input_is_refused_and_changes_nothing(ray_cpus, s3_server, vocab_file):
    bucket = s3_server.new_bucket()
    fs = s3_server.filesystem()
    ids = _upload(fs, f"{bucket}/wds")
    output = f"s3://{bucket}/out"
    job = _job(f"s3://{bucket}/wds", output, vocab_file, s3_server)
    run_job(job, emit=lambda _: None)
    out_fs, root = open_uri(output, s3_server.storage_options)
    before = _snapshot(out_fs, root)
    narrower = dataclasses.replace(job, io=dataclasses.replace(
        job.io, input_uri=f"s3://{bucket}/wds/shard-0[01].tar"))
    with pytest.raises(StartupError, match=r"input\.uri: .*wds.* -> .*shard-0\[01\]"):
        run_job(narrower, emit=lambda _: None)
    pixels = dataclasses.replace(job, io=dataclasses.replace(job.io, max_image_pixels=5000))
    with pytest.raises(StartupError, match=r"input\.max_image_pixels: 1000000 -> 5000"):
        run_job(pixels, emit=lambda _: None)
    assert _snapshot(out_fs, root) == before  # refused: nothing changed, no lease left
    nightly = dataclasses.replace(job, io=dataclasses.replace(job.io, overwrite=True))
    resumed = run_job(nightly, emit=lambda _: None)  # --overwrite, nothing differs: skips
    assert resumed.record["this_run"]["shards_skipped"] == 3
    assert {p: e for p, e in _snapshot(out_fs, root).items() if "/run.json" not in p} == {
        p: e for p, e in before.items() if "/run.json" not in p}
    tar = f"{bucket}/wds/shard-01.tar"  # rewritten: same size, other bytes (new ETag)
    fs.pipe_file(tar, fs.cat_file(tar).replace(b'{"caption": "x"}', b'{"caption": "y"}'))
    changed = run_job(job, emit=lambda _: None)
    assert changed.record["this_run"]["shards_labelled"] == 1
    assert _records(out_fs, root)["shard-01"]["run_id"] == changed.record["run_id"]
    audit = audit_output(output, s3_server.storage_options, ids)
    assert_exactly_once(audit)
    fault_row("changed input (narrower glob, pixel limit; a rewritten shard)", 5, audit,
              "refused with exit 2, output unchanged; the rewritten shard relabelled")


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
def test_cut_short_local_uploads_are_removed_or_listed_as_garbage(tmp_path, vocab_file,
                                                                  monkeypatch):
    from pipeline.shards import list_shards

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(encode(photos(1, 40)[0]))
    worker = LabelWorker(WorkerSpec(
        EngineSpec(CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab_file)),
                   stub=StubOptions()),
        IOConfig(str(tmp_path / "in"), str(tmp_path / "out")), ComputeConfig(), "fp", {}))

    def disk_full(src, dst):
        Path(dst).write_bytes(b"PAR1 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pipeline.spool.shutil.copyfile", disk_full)
    shard = list_shards(worker.spec.io)[0]
    with pytest.raises(OSError, match="No space"):
        worker.process_shard(shard)
    assert list((tmp_path / "out" / "labels").iterdir()) == []  # the half copy is gone
    stray = tmp_path / "out" / "labels" / f".{shard.shard_id}.r-0.parquet.1.2.partial"
    stray.write_bytes(b"left by a worker killed mid-copy")
    check = check_output(*open_uri(str(tmp_path / "out")))
    assert check.uncertified == [str(stray)] and not check.certified


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
    ids = _upload(fs, f"{bucket}/wds", num_shards=4, per_shard=4)
    output = f"s3://{bucket}/out"
    job = _job(f"s3://{bucket}/wds", output, vocab_file, s3_server,
               StubOptions(seconds_per_image=0.3), OutputPolicy(lease_ttl_s=2.0), actors=1,
               shards_per_actor=1, max_attempts=2)
    out_fs, root = open_uri(output, s3_server.storage_options)
    results: list = []
    runner = threading.Thread(target=lambda: results.append(run_job(job, emit=lambda _: None)))
    runner.start()
    deadline = time.monotonic() + 120
    while not _records(out_fs, root):
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
    records = _records(out_fs, root)
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
    job = _job(str(tmp_path / "in"), str(tmp_path / "out"), vocab_file)
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


# ---------------------------------------------------------------------- foreign records
def _labelled_in_process(tmp_path: Path, vocab: Path) -> tuple[JobConfig, object, LabelWorker]:
    """Two image shards of two photos labelled by an in-process worker (no Ray); the plan
    still holds the output's lease."""
    (tmp_path / "in").mkdir()
    for i, array in enumerate(photos(4, 40)):
        (tmp_path / "in" / f"im{i}.png").write_bytes(encode(array))
    config = CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab))
    job = JobConfig(IOConfig(str(tmp_path / "in"), str(tmp_path / "out"), images_per_shard=2),
                    ComputeConfig(batch_size=2), EngineSpec(config, stub=StubOptions()))
    plan = plan_job(job)
    worker = LabelWorker(WorkerSpec(job.engine, job.io, job.compute, plan.fingerprint,
                                    plan.file_metadata({}), run_id=plan.run_id))
    worker.prepare(worker.compute_text_embeddings())
    for shard in plan.todo:
        worker.process_shard(shard)
    return job, plan, worker


def test_a_record_of_another_configuration_is_an_error_for_readers_and_redone(tmp_path,
                                                                            vocab_file):
    from pipeline.writer import ShardSuperseded

    job, plan, worker = _labelled_in_process(tmp_path, vocab_file)
    done = tmp_path / "out" / "_done" / "images-000001.json"
    foreign = {**json.loads(done.read_text()), "fingerprint": "f" * 64}
    done.write_text(json.dumps(foreign))  # a zombie of an older configuration won the create
    with pytest.raises(ShardSuperseded, match="images-000001 was certified meanwhile"):
        worker.process_shard(plan.todo[1], attempt=1)
    assert len(list((tmp_path / "out" / "labels").iterdir())) == 2  # the loser cleaned up
    plan.release()
    with pytest.raises(OutputIntegrityError, match=r"shard images-000001: .* another "
                                                   r"configuration \(fingerprint ffffffffffff"):
        list_label_files(str(tmp_path / "out"))
    again = plan_job(job)  # the holder redoes it: the foreign record is removed first
    again.release()
    assert [s.shard_id for s in again.todo] == ["images-000001"]
    assert not done.exists() and len(list((tmp_path / "out" / "labels").iterdir())) == 1


def test_a_flaky_read_of_a_record_is_retried_not_taken_for_a_bad_record(tmp_path, vocab_file,
                                                                        monkeypatch):
    from pipeline import storage

    job, plan, worker = _labelled_in_process(tmp_path, vocab_file)
    plan.release()
    fs = plan.out_fs
    real_cat, flaky = fs.cat, []

    def cat(paths, on_error="raise", **kwargs):
        out = real_cat(paths, on_error=on_error, **kwargs)
        if not flaky:  # the first read of the records: one answer is a reset connection
            flaky.append(paths[0])
            out[paths[0]] = ConnectionResetError("connection reset by peer")
        return out

    monkeypatch.setattr(fs, "cat", cat)
    monkeypatch.setattr(storage.random, "uniform", lambda a, b: 0.01)
    again = plan_job(job)
    again.release()
    assert flaky and sorted(again.skipped) == ["images-000000", "images-000001"]
    assert again.todo == []

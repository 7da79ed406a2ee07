"""Fault injection against the output contract, the store-level parts: conditional
create/replace on each kind of store, the lease (exclusive, waits, taken over only after
expiry), cut-short local uploads, records of another configuration and flaky record
reads (in-process workers, no Ray).

The other parts: test_faults_contract_runs.py, test_faults_contract_driver.py.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from support.images import encode, photos

from cass_engine import CassConfig
from pipeline.conditional import (
    PreconditionFailed,
    create_object,
    honours_conditional_create,
    read_object,
    replace_object,
)
from pipeline.config import ComputeConfig, EngineSpec, IOConfig, JobConfig
from pipeline.lease import Lease, LeaseHeld, LeaseLost, check_holder, read_holder
from pipeline.plan import plan_job
from pipeline.stub import StubOptions
from pipeline.worker import LabelWorker, WorkerSpec
from schemas.completion import OutputIntegrityError, check_output
from schemas.io import list_label_files, open_uri


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

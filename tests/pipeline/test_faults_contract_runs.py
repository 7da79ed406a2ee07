"""Fault injection against the output contract, whole runs on SeaweedFS: overlapping runs,
zombie writes, labels objects lost or damaged under their records, changed input.

Each case injects one fault with real parts (SeaweedFS on loopback where storage matters, a
real local Ray, the stub engine, tens of images) and then checks from the files alone
(:mod:`support.fault_table`) that every input image is in the output exactly once, that the
completion records match ``run.json`` and that nothing uncertified is visible to readers.
Helpers shared by these files: :mod:`support.contract`.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest
from support.contract import certified_records, stub_job, upload_shards
from support.fault_table import assert_exactly_once, audit_output, fault_row
from support.images import write_vocabulary

from jobs import export_coco
from jobs import label as label_job
from pipeline.config import OutputPolicy
from pipeline.lease import LeaseLost, read_holder
from pipeline.plan import StartupError, plan_job
from pipeline.runner import run_job
from pipeline.stub import StubOptions
from pipeline.worker import LabelWorker, WorkerSpec
from schemas.completion import OutputIntegrityError
from schemas.io import list_label_files, open_uri, read_run_record


def _snapshot(fs, root: str) -> dict[str, str]:
    """``{path: ETag}`` of every object under the output (what "nothing changed" means)."""
    fs.invalidate_cache()
    return {p: str(i.get("ETag")) for p, i in fs.find(root, detail=True).items()}


# ---------------------------------------------------------------------- overlapping runs
def test_overlapping_runs_wait_or_are_refused_and_never_mix(ray_cpus, s3_server, vocab_file,
                                                            tmp_path, capsys):
    bucket = s3_server.new_bucket()
    fs = s3_server.filesystem()
    ids = upload_shards(fs, f"{bucket}/wds", num_shards=4, per_shard=4)
    output = f"s3://{bucket}/out"
    slow = stub_job(f"s3://{bucket}/wds", output, vocab_file, s3_server,
                    StubOptions(seconds_per_image=0.25), actors=1, shards_per_actor=1)
    results: list = []
    first = threading.Thread(target=lambda: results.append(run_job(slow, emit=lambda _: None)))
    first.start()
    deadline = time.monotonic() + 120
    while not certified_records(*open_uri(output, s3_server.storage_options)):
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
    before = {sid: r["sha256"] for sid, r in certified_records(*open_uri(
        output, s3_server.storage_options)).items()}
    assert label_job.main(argv) == 2  # another configuration + --overwrite: refused too
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"run {holder.run_id} (host" in err
    assert "--wait-for-lease" in err
    during = certified_records(*open_uri(output, s3_server.storage_options))
    assert {sid: during[sid]["sha256"] for sid in before} == before  # nothing was cleared
    assert label_job.main(argv + ["--wait-for-lease", "120"]) == 0  # waits, then replaces
    first.join(timeout=60)
    assert results and results[0].status == "complete"
    audit = audit_output(output, s3_server.storage_options, ids)
    assert_exactly_once(audit)
    record = read_run_record(output, s3_server.storage_options)
    assert [c["name"] for c in record["categories"]] == ["cat", "dog", "grass"]
    assert {r["fingerprint"] for r in certified_records(*open_uri(
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
    ids = upload_shards(fs, f"{bucket}/wds")
    output = f"s3://{bucket}/out"
    job = stub_job(f"s3://{bucket}/wds", output, vocab_file, s3_server)
    first = run_job(job, emit=lambda _: None)
    out_fs, root = open_uri(output, s3_server.storage_options)
    certified = certified_records(out_fs, root)
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
    assert certified_records(out_fs, root) == certified  # no record moved
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
    ids = upload_shards(fs, f"{bucket}/wds", num_shards=4)
    output = f"s3://{bucket}/out"
    job = stub_job(f"s3://{bucket}/wds", output, vocab_file, s3_server)
    first = run_job(job, emit=lambda _: None)
    out_fs, root = open_uri(output, s3_server.storage_options)
    records = certified_records(out_fs, root)
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
    after = certified_records(out_fs, root)
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
    assert certified_records(out_fs, root)["shard-02"]["run_id"] == checked.record["run_id"]
    assert first.record["run_id"] != checked.record["run_id"]
    assert_exactly_once(audit_output(output, s3_server.storage_options, ids))


def test_a_certified_table_lost_during_the_run_ends_it_incomplete(ray_cpus, tmp_path,
                                                                  vocab_file):
    import fsspec

    (tmp_path / "wds").mkdir()
    ids = upload_shards(fsspec.filesystem("file"), str(tmp_path / "wds"), num_shards=4)
    done_dir, deleted = tmp_path / "out" / "_done", []

    def emit(line: str) -> None:  # a lifecycle rule strikes while the run goes on
        records = sorted(done_dir.glob("*.json")) if done_dir.exists() else []
        if records and not deleted:
            record = json.loads(records[0].read_text())
            (tmp_path / "out" / record["labels"]).unlink()
            deleted.append(record["shard_id"])

    job = stub_job(str(tmp_path / "wds"), str(tmp_path / "out"), vocab_file,
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
    ids = upload_shards(fs, f"{bucket}/wds")
    output = f"s3://{bucket}/out"
    job = stub_job(f"s3://{bucket}/wds", output, vocab_file, s3_server)
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
    assert certified_records(out_fs, root)["shard-01"]["run_id"] == changed.record["run_id"]
    audit = audit_output(output, s3_server.storage_options, ids)
    assert_exactly_once(audit)
    fault_row("changed input (narrower glob, pixel limit; a rewritten shard)", 5, audit,
              "refused with exit 2, output unchanged; the rewritten shard relabelled")

"""Planning and the job around it (no Ray): plan and record checks, resume, regrouping,
COCO export, config and CLI, progress lines, the scheduler, import rules, weight staging."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.images import write_images, write_vocabulary

from cass_engine import CassConfig
from cass_engine.staging import stage_weights
from pipeline.config import (
    ComputeConfig,
    ConfigError,
    EngineSpec,
    IOConfig,
    JobConfig,
    OutputPolicy,
)
from pipeline.engine import stage_engine_weights
from pipeline.plan import StartupError, plan_job
from pipeline.record import OutputConflict, check_compatible
from pipeline.shards import ShardSpec
from pipeline.stub import StubOptions
from pipeline.worker import LabelWorker, WorkerSpec
from schemas.uris import redact


# ---------------------------------------------------------------------- plan / record
def _plan(job: JobConfig) -> object:
    """Plan a job and give its output's lease back (the plan is inspected, not run)."""
    plan = plan_job(job)
    plan.release()
    return plan


def _job(tmp_path: Path, vocab: Path, **io_options) -> JobConfig:
    config = CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab))
    io_cfg = IOConfig(str(tmp_path / "in"), str(tmp_path / "out"), **io_options)
    return JobConfig(io_cfg, ComputeConfig(), EngineSpec(config, stub=StubOptions()))


def test_plan_fails_fast_with_clear_messages(tmp_path, vocab_file):
    with pytest.raises(StartupError, match="does not exist"):
        _plan(_job(tmp_path, vocab_file))
    write_images(tmp_path / "in", ["a.png"])
    with pytest.raises(ConfigError, match="vocabulary"):  # parsed with the engine spec
        _job(tmp_path, tmp_path / "no-such-vocab.txt")
    pq.write_table(pa.table({"x": [b"1"]}), tmp_path / "in" / "a.parquet")
    with pytest.raises(StartupError, match="column 'image'"):
        _plan(_job(tmp_path, vocab_file, input_format="parquet"))
    assert not (tmp_path / "out").exists()


def test_storage_backend_not_installed_is_a_clear_startup_error(tmp_path, vocab_file,
                                                                monkeypatch):
    from fsspec.registry import known_implementations

    monkeypatch.setitem(known_implementations, "nosuchfs",
                        {"class": "nosuchfs_backend.FileSystem",
                         "err": "Install nosuchfs-backend to access nosuchfs://"})
    job = JobConfig(IOConfig("nosuchfs://bucket/in", str(tmp_path / "out")), ComputeConfig(),
                    _job(tmp_path, vocab_file).engine)
    with pytest.raises(StartupError, match=r"list the input nosuchfs://bucket/in: .*"
                                           r"Install nosuchfs-backend"):
        _plan(job)


def test_repeated_vocabulary_words_are_recorded(tmp_path):
    write_images(tmp_path / "in", ["a.png"])
    vocab = write_vocabulary(tmp_path / "v.txt", ["cat, kitty", "dog", "kitty", "bed", "bed"])
    plan = _plan(_job(tmp_path, vocab))
    assert plan.record["vocabulary_repeats"] == ["kitty", "bed"]


def test_plan_refuses_to_mix_vocabularies_unless_overwrite(tmp_path, vocab_file):
    write_images(tmp_path / "in", ["a.png"])
    plan = _plan(_job(tmp_path, vocab_file))
    assert [s.shard_id for s in plan.todo] == ["images-000000"]
    other = write_vocabulary(tmp_path / "other.txt", ["cat", "dog"])
    with pytest.raises(StartupError, match="vocabulary_hash"):
        _plan(_job(tmp_path, other))
    (tmp_path / "out" / "labels").mkdir()
    (tmp_path / "out" / "labels" / "old.parquet").write_bytes(b"x")
    plan = _plan(_job(tmp_path, other, overwrite=True))
    assert not (tmp_path / "out" / "labels").exists()
    assert plan.record["categories"][1]["name"] == "dog"
    with pytest.raises(StartupError, match="confidence: false -> true"):  # rows would mix
        _plan(_job(tmp_path, other, confidence=True))


def test_replacement_worker_with_other_weights_refuses_to_label(tmp_path, vocab_file):
    write_images(tmp_path / "in", ["a.png"])
    job = _job(tmp_path, vocab_file)
    worker = LabelWorker(WorkerSpec(job.engine, job.io, job.compute, "fp"))
    text = worker.compute_text_embeddings()
    run = {"run": {"models": {**worker.engine.weights_info, "sha256": "0" * 64}}}
    with pytest.raises(RuntimeError, match=r"weights differ from the run's \(sha256\)"):
        worker.prepare(text, run)
    assert worker.prepare(text, {"run": {"models": worker.engine.weights_info}})


def test_damaged_records_never_block_a_resume(tmp_path, vocab_file):
    write_images(tmp_path / "in", ["a.png", "b.png"])
    plan = _plan(_job(tmp_path, vocab_file, images_per_shard=1))
    worker = LabelWorker(WorkerSpec(plan.job.engine, plan.job.io, plan.job.compute,
                                    plan.fingerprint))
    worker.prepare(worker.compute_text_embeddings())
    for shard in plan.todo:
        worker.process_shard(shard)
    assert sorted(_plan(_job(tmp_path, vocab_file, images_per_shard=1)).skipped) == [
        "images-000000", "images-000001"]
    done = tmp_path / "out" / "_done" / "images-000001.json"
    done.write_text(done.read_text()[:20])  # a crash mid-write on a disk without atomic writes
    again = _plan(_job(tmp_path, vocab_file, images_per_shard=1))
    assert list(again.skipped) == ["images-000000"]
    assert [s.shard_id for s in again.todo] == ["images-000001"]
    (tmp_path / "out" / "run.json").write_text('{"status": "runn')
    with pytest.raises(StartupError, match="run.json is unreadable.*--overwrite"):
        _plan(_job(tmp_path, vocab_file, images_per_shard=1))
    fresh = _plan(_job(tmp_path, vocab_file, images_per_shard=1, overwrite=True))
    assert len(fresh.todo) == 2


def _label_all(tmp_path: Path, vocab: Path, **io_options) -> object:
    plan = _plan(_job(tmp_path, vocab, **io_options))
    worker = LabelWorker(WorkerSpec(plan.job.engine, plan.job.io, plan.job.compute,
                                    plan.fingerprint))
    worker.prepare(worker.compute_text_embeddings())
    for shard in plan.todo:
        worker.process_shard(shard)
    plan.release()
    return plan


def test_regrouped_image_files_are_labelled_once(tmp_path, vocab_file):
    from schemas.io import iter_label_rows

    write_images(tmp_path / "in", [f"im{i}.png" for i in range(5)])
    _label_all(tmp_path, vocab_file, images_per_shard=2)  # groups 0..2
    with pytest.raises(StartupError, match=r"input\.images_per_shard: 2 -> 3"):
        _plan(_job(tmp_path, vocab_file, images_per_shard=3))  # another input identity
    (tmp_path / "in" / "im4.png").unlink()  # now groups 0..1
    plan = _label_all(tmp_path, vocab_file, images_per_shard=2)
    assert plan.record["stale_shards"] == {"removed": ["images-000002"], "kept": []}
    keys = sorted(r["key"] for r in iter_label_rows(str(tmp_path / "out")))
    assert keys == [f"im{i}.png" for i in range(4)]
    assert not list((tmp_path / "out" / "labels").glob("images-000002.*"))
    (tmp_path / "in" / "im1.png").unlink()  # both groups change
    plan = _label_all(tmp_path, vocab_file, images_per_shard=2)
    assert [s.shard_id for s in plan.todo] == ["images-000000", "images-000001"]
    keys = sorted(r["key"] for r in iter_label_rows(str(tmp_path / "out")))
    assert keys == ["im0.png", "im2.png", "im3.png"]
    assert len(list((tmp_path / "out" / "labels").iterdir())) == 2  # no stale table left
    plan = _label_all(tmp_path, vocab_file, images_per_shard=3, overwrite=True)
    assert [s.shard_id for s in plan.todo] == ["images-000000"]
    keys = sorted(r["key"] for r in iter_label_rows(str(tmp_path / "out")))
    assert keys == ["im0.png", "im2.png", "im3.png"]


def test_coco_export_is_written_whole_or_not_at_all(tmp_path, vocab_file, monkeypatch, capsys):
    from pycocotools.coco import COCO

    from jobs import export_coco

    write_images(tmp_path / "in", ["a.png", "b.png"])
    _label_all(tmp_path, vocab_file)  # run.json is written by the plan
    out = tmp_path / "coco" / "labels.json"
    assert export_coco.main(["--labels", str(tmp_path / "out"), "--out", str(out)]) == 0
    assert len(COCO(str(out)).dataset["images"]) == 2

    def broken(rows, categories, fp, info=None):
        fp.write('{"images": [')
        raise OSError("disk full")

    monkeypatch.setattr(export_coco, "write_coco_json", broken)
    again = tmp_path / "coco" / "again.json"
    assert export_coco.main(["--labels", str(tmp_path / "out"), "--out", str(again)]) == 2
    assert "disk full" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "coco").iterdir()) == ["labels.json"]
    assert export_coco.main(["--labels", str(tmp_path / "nowhere"), "--out", str(again)]) == 2


def test_check_compatible_needs_a_record_for_existing_shards():
    check_compatible(None, {}, "fp", has_shards=False)
    with pytest.raises(OutputConflict, match="no run.json"):
        check_compatible(None, {}, "fp", has_shards=True)
    with pytest.raises(OutputConflict, match="gamma: 0.2 -> 0.3"):
        check_compatible({"fingerprint": "a", "identity": {"config": {"gamma": 0.2}}},
                         {"config": {"gamma": 0.3}}, "b", has_shards=True)


# ---------------------------------------------------------------------- config / CLI
def test_config_validation_and_redaction():
    with pytest.raises(ConfigError, match="images_per_shard"):
        IOConfig("in", "out", images_per_shard=0)
    with pytest.raises(ConfigError, match="differ"):
        IOConfig("s3://b/x", "s3://b/x/")
    with pytest.raises(ConfigError, match="batch_size"):
        ComputeConfig(batch_size=0)
    with pytest.raises(ValueError, match="random"):
        EngineSpec(CassConfig(), clip_weights="a.pt", random_weights=0)
    options = {"endpoint_url": "http://h", "key": "AKIA", "secret": "s3cr3t",
               "client_kwargs": {"aws_session_token": "T0KEN-VALUE"}}
    public = json.dumps(IOConfig("in", "out", storage_options=options).public_dict())
    assert "s3cr3t" not in public and "AKIA" not in public and "T0KEN-VALUE" not in public
    assert redact(options)["endpoint_url"] == "http://h"


def test_cli_flags_only_override_dataclass_defaults(vocab_file):
    from jobs.label import build_parser, job_from_args

    base = ["--input", "in", "--output", "out", "--vocab", str(vocab_file)]
    job = job_from_args(build_parser().parse_args(base))
    cwd = os.getcwd()  # relative local paths: against the directory the command runs in
    assert job.io == IOConfig(f"{cwd}/in", f"{cwd}/out") and job.compute == ComputeConfig()
    assert job.policy == OutputPolicy()
    flags = ["--wait-for-lease", "30", "--lease-ttl", "10", "--verify", "--output-is-shared"]
    assert job_from_args(build_parser().parse_args(base + flags)).policy == OutputPolicy(
        wait_for_lease_s=30.0, lease_ttl_s=10.0, verify=True, output_is_shared=True)
    job = job_from_args(build_parser().parse_args(base + ["--batch-size", "4", "--format",
                                                          "parquet", "--random-weights", "3"]))
    assert job.compute.batch_size == 4 and job.compute.actors is None
    assert job.io.input_format == "parquet" and job.engine.random_weights == 3
    assert job.engine.dtype is None  # the engine's faithful default
    auto = job_from_args(build_parser().parse_args(base + ["--dtype", "auto"]))
    assert auto.engine.dtype == "auto" and auto.engine.identity()["dtype"] == "auto"
    with pytest.raises(ValueError, match="dtype must be"):
        EngineSpec(job.engine.config, dtype="bf16")
    help_text = " ".join(build_parser().format_help().split())
    for option in ("--images-per-shard", "--storage-options", "--limit", "--actors",
                   "--gpus-per-actor", "--batch-size", "--max-image-pixels", "--preset"):
        assert option in help_text
    assert f"(default: {IOConfig('i', 'o').images_per_shard})" in help_text
    assert f"(default: {ComputeConfig().stall_timeout_s:g})" in help_text
    stall = lambda value: job_from_args(  # noqa: E731
        build_parser().parse_args(base + ["--stall-timeout", value])).compute.stall_timeout_s
    assert stall("30") == 30.0 and stall("0") is None
    with pytest.raises(ConfigError, match="stall-timeout"):
        stall("-1")


def test_progress_lines_count_images_and_do_not_repeat_on_force():
    from pipeline.progress import Progress

    lines: list[str] = []
    progress = Progress(2, 1, interval_s=3600.0, emit=lines.append)
    progress._last = time.monotonic()  # the first periodic line is not due for an hour
    record = {"num_images": 4, "num_ok": 3, "num_annotations": 7,
              "errors_by_status": {"decode_error": 1}}
    progress.maybe_report()
    assert lines == []
    progress.shard_done(record)
    progress.maybe_report(force=True)
    progress.maybe_report(force=True)  # nothing new: no second identical line
    assert len(lines) == 1
    assert re.match(r"\[cass-label\] shards 1/2 \(skipped 1, failed 0, retries 0\) \| images 4"
                    r" \| [\d.]+ img/s \| errors 1 \| elapsed 0:00:\d\d \| ETA 0:00:\d\d$",
                    lines[0]), lines[0]
    progress.shard_done(record)
    progress.maybe_report(force=True)
    assert len(lines) == 2 and "shards 2/2" in lines[1] and "images 8" in lines[1]
    totals = progress.totals()
    assert totals["images"] == 8 and totals["images_ok"] == 6 and totals["shards"] == 3


def test_waiting_retry_gets_a_worker_before_the_fresh_shards_run_out():
    from types import SimpleNamespace

    from ray.exceptions import RayError

    from pipeline.scheduler import Scheduler

    class Actor:
        def __init__(self, slot: int) -> None:
            self.process_shard = SimpleNamespace(
                remote=lambda shard, cap, attempt, slot=slot: (slot, shard.shard_id, attempt))

    spec = lambda i: ShardSpec(f"s{i}", "webdataset", (f"s{i}.tar",), (), "u", "fp")  # noqa: E731
    plan = SimpleNamespace(todo=[spec(i) for i in range(20)],
                           job=SimpleNamespace(compute=ComputeConfig(), io=IOConfig("i", "o")))
    pool = SimpleNamespace(actors=[Actor(0), Actor(1)], generation=[0, 0], ready=[True, True])
    progress = SimpleNamespace(shards_done=0, shard_done=lambda record: None,
                               shard_retried=lambda shard_id, reason: None)
    scheduler = Scheduler(pool, plan, progress)
    scheduler.submit()
    assert [scheduler.load(0), scheduler.load(1)] == [2, 2] and len(scheduler.queued()) == 16

    def finish(slot: int, outcome: object = None) -> None:  # one shard of this worker ends
        ref = next(launch.ref for launch in scheduler.in_flight() if launch.slot == slot)
        scheduler.on_result(ref, outcome or {"num_images": 1})

    failing = next(launch for launch in scheduler.in_flight() if launch.slot == 1)
    finish(1, RayError("the task raised"))  # this shard waits for a retry
    assert scheduler.retrying() == [failing.shard_id]
    assert scheduler.attempts(failing.shard_id) == 1
    scheduler.submit()  # the retry is waiting: one worker stops taking fresh shards
    drained = scheduler.draining
    assert drained is not None and len(scheduler.queued()) == 16 - (drained == 0)
    for _ in range(scheduler.load(drained)):  # its shards in flight finish, no new ones
        assert len(scheduler.queued()) == 16 - (drained == 0) and scheduler.retrying()
        finish(drained)
        scheduler.submit()
    running = [(launch.shard_id, launch.attempt) for launch in scheduler.in_flight()
               if launch.slot == drained]
    assert running == [(failing.shard_id, 1)] and scheduler.runs_alone(drained)
    assert scheduler.queued() and scheduler.draining is None


def test_limit_budget_is_shared_by_the_shards_that_start_together():
    from types import SimpleNamespace

    from pipeline.scheduler import Scheduler

    class Actor:
        process_shard = SimpleNamespace(remote=lambda shard, cap, launch: object())

    spec = lambda i: ShardSpec(f"s{i}", "parquet", (f"s{i}.pq",), (), "u", "fp")  # noqa: E731
    plan = SimpleNamespace(todo=[spec(i) for i in range(9)],
                           job=SimpleNamespace(compute=ComputeConfig(),
                                               io=IOConfig("i", "o", limit=5)))
    scheduler = Scheduler(SimpleNamespace(actors=[Actor(), Actor()], generation=[0, 0],
                                          ready=[True, True]),
                          plan, progress=None)
    scheduler.submit()
    caps = sorted(launch.cap for launch in scheduler.in_flight())
    assert caps == [1, 1, 1, 2] and scheduler.budget_left == 0 and len(scheduler.queued()) == 5


def test_job_logs_library_errors_as_one_line():
    import logging

    from jobs.label import _OneLineFormatter

    try:
        raise ConnectionResetError("peer reset\nsecond line")
    except ConnectionResetError:
        record = logging.LogRecord("gcsfs", logging.ERROR, __file__, 1, "out of retries: %s",
                                   ("x",), exc_info=sys.exc_info())
    text = _OneLineFormatter().format(record)
    assert "\n" not in text and "Traceback" not in text
    assert text == ("[gcsfs] error: out of retries: x (ConnectionResetError: peer reset "
                    "second line)")


def test_import_rules():
    code = ("import sys, importlib; importlib.import_module(sys.argv[1]); "
            "print(sorted(m for m in ('ray', 'pyarrow', 'fsspec', 'torch') if m in sys.modules))")
    run = lambda mod: subprocess.run([sys.executable, "-c", code, mod], capture_output=True,  # noqa: E731
                                     text=True, check=True).stdout.strip()
    assert "ray" not in run("pipeline.worker")
    assert run("cass_engine") == "[]"  # public names load on first use
    assert run("cass_engine.segmenter") == "['torch']"
    # the job's driver (argument parsing, planning, scheduling) never loads the engine's torch
    assert "torch" not in run("jobs.label") and "torch" not in run("pipeline.runner")


def test_weights_are_staged_once_per_node(tmp_path, vocab_file, monkeypatch):
    import fsspec

    from cass_engine import staging

    with fsspec.open("memory://weights/clip.pt", "wb") as f:
        f.write(b"weights")
    config = CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab_file))
    spec = EngineSpec(config, clip_weights="memory://weights/clip.pt",
                      dino_weights="/local/dino.pth", cache_dir=str(tmp_path))
    calls = []
    real = staging._download
    monkeypatch.setattr(staging, "_download", lambda *a: (calls.append(a), real(*a)))
    stage_engine_weights(spec)
    stage_engine_weights(spec)
    assert len(calls) == 1 and calls[0][3] is not None  # copied once, with the job's retries
    first = stage_weights("memory://weights/clip.pt", str(tmp_path / "weights"))
    assert len(calls) == 1 and Path(first).read_bytes() == b"weights"
    assert os.path.dirname(first) == str(tmp_path / "weights")
    assert not (tmp_path / "weights" / "dino.pth").exists()  # local paths are not copied

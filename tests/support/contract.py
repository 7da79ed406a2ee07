"""Inputs, jobs and certified records for the output-contract fault tests
(tests/pipeline/test_faults_contract_*.py)."""

from __future__ import annotations

from pathlib import Path

from cass_engine import CassConfig
from pipeline.config import ComputeConfig, EngineSpec, IOConfig, JobConfig, OutputPolicy
from pipeline.plan import JobPlan, plan_job
from pipeline.stub import StubOptions
from pipeline.worker import LabelWorker, WorkerSpec
from schemas.completion import check_output
from support.images import encode, photos, tar_bytes


def upload_shards(fs, prefix: str, num_shards: int = 3, per_shard: int = 4) -> set[str]:
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


def stub_job(input_uri: str, output_uri: str, vocab: Path, server=None,
             stub: StubOptions | None = None, policy: OutputPolicy | None = None,
             io_options: dict | None = None, **compute: object) -> JobConfig:
    """A stub-engine job on ``server``'s store (or local/in-memory paths without one);
    ``io_options`` are further :class:`IOConfig` fields, ``compute`` ComputeConfig fields."""
    config = CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab))
    io_cfg = IOConfig(input_uri, output_uri, max_image_pixels=1_000_000,
                      storage_options=server.storage_options if server else {},
                      **(io_options or {}))
    compute_cfg = ComputeConfig(**{"batch_size": 4, "progress_interval_s": 0.5, **compute})
    return JobConfig(io_cfg, compute_cfg, EngineSpec(config, stub=stub or StubOptions()),
                     policy or OutputPolicy())


def certified_records(fs, root: str) -> dict[str, dict]:
    """``{shard_id: completion record}`` of every certified shard of the output."""
    return {sid: c.record for sid, c in check_output(fs, root).certified.items()}


def label_in_process(job: JobConfig, release: bool = True) -> JobPlan:
    """Plan ``job`` and label its shards with one :class:`LabelWorker` in this process (no
    Ray); the lease is released afterwards unless ``release`` is False. Returns the plan."""
    plan = plan_job(job)
    worker = LabelWorker(WorkerSpec(job.engine, job.io, job.compute, plan.fingerprint,
                                    plan.file_metadata({})))
    for shard in plan.todo:
        worker.process_shard(shard)
    if release:
        plan.release()
    return plan

"""GPU pinning with logical GPUs: ``ray.init(num_gpus=2)`` on a machine without GPUs."""

from __future__ import annotations

import json

import pytest
from support.images import encode, photos

from cass_engine import CassConfig
from pipeline.config import ComputeConfig, EngineSpec, IOConfig, JobConfig
from pipeline.plan import StartupError
from pipeline.runner import run_job
from pipeline.stub import StubOptions


@pytest.fixture
def ray_two_gpus(ray_sessions):
    ray_sessions.ensure(num_cpus=2, num_gpus=2)
    return ray_sessions


def _job(tmp_path, vocab_file, actors=None) -> JobConfig:
    config = CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab_file))
    io_cfg = IOConfig(str(tmp_path / "in"), str(tmp_path / "out"), images_per_shard=2)
    engine = EngineSpec(config, stub=StubOptions(seconds_per_image=0.2))
    return JobConfig(io_cfg, ComputeConfig(actors=actors, batch_size=2), engine)


def test_one_actor_per_gpu_each_pinned_to_a_distinct_gpu(ray_two_gpus, tmp_path, vocab_file):
    (tmp_path / "in").mkdir()
    for i, image in enumerate(photos(8, 40)):
        (tmp_path / "in" / f"{i}.png").write_bytes(encode(image))
    summary = run_job(_job(tmp_path, vocab_file), emit=lambda _: None)
    assert summary.status == "complete"
    resources = summary.record["resources"]
    assert resources["actors"] == {"num_actors": 2, "num_gpus": 1.0, "num_cpus": 1.0}
    workers = resources["workers"]
    assert sorted(w["gpu_ids"] for w in workers) == [[0], [1]]
    assert sorted(w["cuda_visible_devices"] for w in workers) == ["0", "1"]
    assert all(w["device"] == "cpu" for w in workers)  # no CUDA here: auto falls back
    pids = {json.loads(p.read_text())["worker"]["pid"]
            for p in (tmp_path / "out" / "_done").glob("*.json")}
    assert pids == {w["pid"] for w in workers}


def test_more_gpu_actors_than_gpus_is_refused(ray_two_gpus, tmp_path, vocab_file):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(encode(photos(1, 32)[0]))
    with pytest.raises(StartupError, match="exceed the cluster's 2 GPUs"):
        run_job(_job(tmp_path, vocab_file, actors=3), emit=lambda _: None)

"""Progress lines: an ETA from images done, before any shard finishes; the start message."""

from __future__ import annotations

import re
from itertools import islice

from support.images import encode, photos, tar_bytes

from cass_engine import CassConfig
from pipeline.config import ComputeConfig, EngineSpec, IOConfig, JobConfig, OutputPolicy
from pipeline.progress import Progress, ShardCounts
from pipeline.readers import RawImage
from pipeline.runner import run_job
from pipeline.stub import StubOptions


def test_eta_comes_from_images_done_in_running_shards():
    lines: list[str] = []
    progress = Progress(4, interval_s=3600.0, emit=lines.append)
    assert progress.eta_s() is None  # nothing labelled yet
    progress.set_live({"a": (0, None)})
    assert progress.eta_s() is None and progress.line().endswith("ETA ?")
    progress.started -= 10.0  # 10 s since the workers started
    progress.set_live({"a": (5, 1000), "b": (5, None)})  # 1 img/s; 1000 per shard
    assert 3900 < progress.eta_s() < 4000  # (995 + 995 + 2 x 1000) images at 1 img/s
    assert not progress.line().endswith("ETA ?")
    progress.shard_done({"shard_id": "a", "num_images": 1000, "num_ok": 1000,
                         "num_annotations": 0})
    assert "a" not in progress.live and progress.images_seen == 1005  # not counted twice


def test_shard_size_is_estimated_from_the_bytes_read():
    counts = ShardCounts(size_bytes=10_000)
    assert counts.expected() is None
    items = counts.count(RawImage(f"k{i}", "u", data=b"x" * 100) for i in range(30))
    for _ in range(10):
        next(items)
    counts.images = 4
    assert counts.expected() == 100  # 10 images in 1000 bytes of 10000
    assert ShardCounts(size_bytes=10_000, limit=20, read=10, read_bytes=1000).expected() == 20
    list(items)
    assert counts.expected() == 30  # read to its end: exact
    assert ShardCounts(known=6, images=2).expected() == 6
    tar = ShardCounts(size_bytes=10_240, tar=True)  # header + padding: 1024 bytes per member
    list(islice(tar.count(RawImage(f"k{i}", "u", data=b"x" * 400) for i in range(9)), 2))
    assert tar.expected() == 10


def test_progress_shows_an_eta_during_the_first_shard_and_says_workers_start(
        ray_cpus, tmp_path, vocab_file):
    (tmp_path / "in").mkdir()
    images = iter(photos(12, 40))
    for s in range(2):
        members = {f"k{i}.png": encode(next(images)) for i in range(6)}
        (tmp_path / "in" / f"part-{s}.tar").write_bytes(tar_bytes(members))
    config = CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab_file))
    job = JobConfig(IOConfig(str(tmp_path / "in"), str(tmp_path / "out")),
                    ComputeConfig(batch_size=1, progress_interval_s=0.2, actors=1,
                                  shards_per_actor=1),
                    EngineSpec(config, stub=StubOptions(seconds_per_image=0.3)),
                    policy=OutputPolicy(output_is_shared=True))
    lines: list[str] = []
    summary = run_job(job, emit=lines.append)
    assert summary.status == "complete"
    starting = [i for i, x in enumerate(lines) if "starting 1 worker(s) (loading weights, "
                "text embeddings)" in x]
    first_progress = next(i for i, x in enumerate(lines) if "| ETA " in x)
    assert starting and starting[0] < first_progress
    during = [x for x in lines if re.search(r"shards 0/2 .*\| images [1-9]", x)]
    assert during, "\n".join(lines)  # lines while the first shard runs, with images done
    assert any(not x.endswith("ETA ?") for x in during), "\n".join(during)

"""CUDA checks (``-m cuda``; skipped without an NVIDIA GPU). Run by ``bench/gpu_check.sh``.

- The engine on CUDA equals the CPU float32 engine on a real photograph (the test suite's
  random backbones, copied to the GPU): float32 within TF32/kernel noise, float16 and
  bfloat16 autocast within the reduced-precision bounds that ``bench/precision_check.py``
  reports (same text embeddings on both sides, so only the image path differs).
- One pipeline actor per GPU, each pinned to its own GPU and running on CUDA.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from support.engine import photo_336x448, random_backbones  # noqa: F401
from support.images import encode, photos

from cass_engine import CassConfig
from cass_engine.segmenter import CassSegmenter
from pipeline.config import ComputeConfig, EngineSpec, IOConfig, JobConfig
from pipeline.runner import run_job
from pipeline.stub import StubOptions

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

#: dtype -> (max |probability difference|, min label agreement) against CPU float32.
BOUNDS = {"float32": (5e-3, 0.999), "float16": (5e-2, 0.98), "bfloat16": (1.5e-1, 0.95)}


@pytest.fixture(scope="module")
def cpu_reference(tmp_path_factory, random_backbones):
    vocab = tmp_path_factory.mktemp("vocab") / "v.txt"
    vocab.write_text("background\nsky, clouds\ncup, mug\ntable\nwall\nfood, coffee\n")
    out = {}
    for preset in ("coco_stuff", "voc21"):
        config = CassConfig.from_preset(preset, vocabulary_path=str(vocab))
        seg = CassSegmenter(*random_backbones, config, torch.device("cpu"))
        text = seg.set_vocabulary(use_cache=False)
        out[preset] = (config, text, seg.segment([photo_336x448()], return_logits=False)[0])
    return out


@pytest.mark.parametrize("dtype", sorted(BOUNDS))
@pytest.mark.parametrize("preset", ["coco_stuff", "voc21"])
def test_engine_on_cuda_equals_cpu_within_the_precision_bound(cpu_reference, random_backbones,
                                                              preset, dtype):
    config, text, want = cpu_reference[preset]
    clip, dino = (copy.deepcopy(m).cuda() for m in random_backbones)
    amp = None if dtype == "float32" else getattr(torch, dtype)
    seg = CassSegmenter(clip, dino, config, torch.device("cuda"), amp_dtype=amp)
    seg.set_vocabulary(text_embeddings=text)
    got = seg.segment([photo_336x448()], return_logits=False)[0]
    max_diff, min_agree = BOUNDS[dtype]
    assert got.labels.device.type == "cpu" and got.labels.shape == want.labels.shape
    diff = (got.probs - want.probs).abs().max().item()
    agree = (got.labels == want.labels).float().mean().item()
    assert diff <= max_diff, f"{preset} {dtype}: max |dprob| {diff:.2e}"
    assert agree >= min_agree, f"{preset} {dtype}: label agreement {agree:.4f}"
    assert torch.allclose(got.presence, want.presence, atol=max_diff)


def test_pipeline_pins_one_actor_per_gpu_on_cuda(ray_sessions, tmp_path, vocab_file):
    gpus = torch.cuda.device_count()
    ray_sessions.ensure(num_cpus=2 * gpus, num_gpus=gpus)
    (tmp_path / "in").mkdir()
    for i, image in enumerate(photos(4 * gpus, 40)):
        (tmp_path / "in" / f"{i}.png").write_bytes(encode(image))
    config = CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab_file))
    io_cfg = IOConfig(str(tmp_path / "in"), str(tmp_path / "out"), images_per_shard=2)
    engine = EngineSpec(config, stub=StubOptions(seconds_per_image=0.05))
    summary = run_job(JobConfig(io_cfg, ComputeConfig(batch_size=2), engine),
                      emit=lambda _: None)
    assert summary.status == "complete"
    workers = summary.record["resources"]["workers"]
    assert len(workers) == gpus
    assert sorted(w["gpu_ids"][0] for w in workers) == list(range(gpus))
    assert all(w["device"].startswith("cuda") for w in workers)
    assert len({w["cuda_visible_devices"] for w in workers}) == gpus
    pids = {json.loads(p.read_text())["worker"]["pid"]
            for p in (tmp_path / "out" / "_done").glob("*.json")}
    assert pids == {w["pid"] for w in workers}

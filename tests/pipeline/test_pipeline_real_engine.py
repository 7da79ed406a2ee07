"""The pipeline with the real CASS engine (random weights) on a real local Ray."""

from __future__ import annotations

import numpy as np
import pytest
from support.images import encode, photo, write_vocabulary

import cass_engine
from pipeline.config import ComputeConfig, EngineSpec, IOConfig, JobConfig
from pipeline.decode import decode_image
from pipeline.runner import run_job
from schemas import annotations_to_label_map
from schemas.io import iter_label_rows

THREADS = 2  # labels of a random-weight model depend on the float summation order


def _engine_config(vocab):
    # A small whole-image pass keeps the test fast on 2 CPU cores.
    return cass_engine.CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab),
                                              short_side=112, slide_crop=None)


@pytest.mark.slow
def test_real_engine_labels_through_ray_equal_the_engine_run_directly(ray_cpus, tmp_path):
    if not hasattr(cass_engine, "build_segmenter"):
        pytest.skip("cass_engine.build_segmenter does not exist yet")
    import torch

    vocab = write_vocabulary(tmp_path / "vocab.txt", ["sky", "person", "ground"])
    (tmp_path / "in").mkdir()
    images = {"astronaut.png": encode(photo("astronaut", 64)),
              "coffee.jpg": encode(photo("coffee", 64), "JPEG")}
    for name, data in images.items():
        (tmp_path / "in" / name).write_bytes(data)
    engine = EngineSpec(_engine_config(vocab), random_weights=0)
    job = JobConfig(IOConfig(str(tmp_path / "in"), str(tmp_path / "out")),
                    ComputeConfig(actors=1, cpus_per_actor=THREADS, batch_size=1), engine)
    summary = run_job(job, emit=lambda _: None)
    assert summary.status == "complete"
    assert summary.record["models"]["random_weights"] == 0
    assert summary.record["models"]["clip"]["model"].endswith("ViT-B-16-quickgelu")
    rows = {r["key"]: r for r in iter_label_rows(str(tmp_path / "out"))}
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        seg = cass_engine.build_segmenter(_engine_config(vocab), random_weights=0, device="cpu")
        for name, data in images.items():
            row = rows[name]
            assert row["status"] == "ok" and len(row["presence"]) == 3
            rgb = decode_image(data, 10**8).rgb
            result = seg.segment([rgb], return_logits=False, return_probs=False)[0]
            got = annotations_to_label_map(row["annotations"], row["height"], row["width"])
            np.testing.assert_array_equal(got, result.labels.numpy())
            np.testing.assert_allclose(row["presence"], result.presence.numpy(), rtol=1e-5)
    finally:
        torch.set_num_threads(previous)

"""``dtype="auto"`` is recorded as the dtype it resolved to (engine info and predict output)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from support.engine import photo_336x448

import cass_engine.segmenter as segmenter
from cass_engine import CassConfig, build_segmenter
from cass_engine.predict import parse_args, run
from cass_engine.segmenter import dtype_name, resolve_dtype


def test_dtype_names():
    assert dtype_name(torch.bfloat16) == "bfloat16" and dtype_name(torch.float32) == "float32"
    assert dtype_name("auto") == "auto"


@pytest.mark.slow
def test_auto_is_recorded_as_the_resolved_dtype(monkeypatch):
    monkeypatch.setattr(segmenter, "cpu_has_fast_bf16", lambda: True)
    seg = build_segmenter(CassConfig(), random_weights=0, dtype="auto")
    assert seg.amp_dtype == torch.bfloat16 and seg.weights_cast
    assert seg.weights_info["dtype"] == "bfloat16"
    assert seg.weights_info["dtype_requested"] == "auto"
    assert json.loads(json.dumps(seg.weights_info))["dtype"] == "bfloat16"


@pytest.mark.slow
def test_predict_output_records_the_resolved_dtype(tmp_path, monkeypatch):
    monkeypatch.setattr(segmenter, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setenv("CASS_CACHE_DIR", str(tmp_path / "cache"))
    image, vocab = tmp_path / "photo.png", tmp_path / "v.txt"
    Image.fromarray(photo_336x448()[:112, :150]).save(image)
    vocab.write_text("cup\ntable\n")
    args = parse_args(["--image", str(image), "--vocab", str(vocab), "--random-weights", "0",
                       "--dtype", "auto", "--short-side", "112", "--out",
                       str(tmp_path / "r.npz")])
    out = run(args)
    weights = json.loads(str(np.load(out)["weights"]))
    assert weights["dtype"] == "float32" == str(resolve_dtype("cpu", "auto")).split(".")[-1]
    assert weights["dtype_requested"] == "auto"

"""Decision stage against direct formulations, batching invariance, and end-to-end runs."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.engine import photo_336x448

from cass_engine import CassConfig, build_segmenter, parse_vocabulary
from cass_engine.decision import (
    Stitcher,
    adjusted_patch_logits,
    class_ranges,
    finalize,
    group_membership,
    resize_matrix,
)


def test_adjusted_logits_match_per_group_loops():
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(2, 9, 6, generator=g), dim=-1)
    queries = F.normalize(torch.randn(5, 6, generator=g), dim=-1)
    prior = torch.randn(2, 5, generator=g)
    groups = torch.tensor([0, 1, 0, 2, 1])
    got = adjusted_patch_logits(feats, queries, prior, group_membership(groups), 0.3, 0.2, 2)
    for b in range(2):
        text = queries.clone()
        for grp in range(3):
            members = (groups == grp).nonzero().flatten()
            best = int(members[prior[b, members].argmax()])
            top = (feats[b] @ queries[best]).topk(2).indices
            mu = F.normalize(feats[b, top].mean(0), dim=0)
            text[best] = F.normalize(0.7 * queries[best] + 0.3 * mu, dim=0)
        expected = 0.8 * feats[b] @ text.T + 0.2 * prior[b][None]
        assert torch.allclose(got[b], expected, atol=1e-6)


def test_resize_matrix_equals_bilinear_interpolation():
    x = torch.randn(3, 7, 11)
    direct = F.interpolate(x[None], size=(20, 5), mode="bilinear", align_corners=False)[0]
    rows, cols = resize_matrix(20, 7, x.device), resize_matrix(5, 11, x.device)
    assert torch.allclose(rows @ x @ cols.T, direct, atol=1e-5)


def test_stitcher_averages_overlaps_and_rejects_gaps():
    s = Stitcher(1, (2, 3), torch.device("cpu"))
    s.add(torch.ones(1, 2, 2), (0, 0, 2, 2))
    s.add(torch.full((1, 2, 2), 3.0), (0, 1, 2, 3))
    assert s.result()[0].tolist() == [[1, 2, 3], [1, 2, 3]]
    gap = Stitcher(1, (2, 3), torch.device("cpu"))
    gap.add(torch.ones(1, 2, 2), (0, 0, 2, 2))
    with pytest.raises(RuntimeError, match="uncovered"):
        gap.result()


def test_finalize_synonym_max_threshold_and_scores():
    ranges = class_ranges([0, 0, 1, 2])  # class 0 has two queries
    logits = torch.zeros(4, 1, 3)
    logits[1, 0, 0] = 1.0   # pixel 0: class 0 through its synonym, clearly
    logits[2, 0, 1] = 1.0   # pixel 1: class 1
    # pixel 2: all equal -> best class prob 0.25 < 0.3 -> background class 0
    d = finalize(logits, (1, 3), ranges, logit_scale=40.0, prob_thd=0.3, keep_full=True)
    assert d.labels.tolist() == [[0, 1, 0]]
    probs_q = torch.softmax(40 * logits, 0)
    assert torch.allclose(d.probs[0], torch.maximum(probs_q[0], probs_q[1]))
    assert torch.allclose(d.pixel_fraction, torch.tensor([2 / 3, 1 / 3, 0.0]))
    expected0 = (d.probs[0, 0, 0] + d.probs[0, 0, 2]) / 2
    assert torch.isclose(d.mask_scores[0], expected0)
    assert d.mask_scores[2] == 0


@pytest.mark.parametrize("out_hw", [(40, 50), (13, 50), (40, 17), (13, 17)])
def test_finalize_resizes_bilinearly_and_banded_equals_full(out_hw, monkeypatch):
    logits = torch.randn(5, 13, 17)
    ranges = class_ranges([0, 1, 1, 2, 3])
    full = finalize(logits, out_hw, ranges, 40.0, 0.0, keep_full=True)
    expected = torch.nn.functional.interpolate(logits[None], size=out_hw, mode="bilinear",
                                               align_corners=False)[0]
    torch.testing.assert_close(full.logits, expected, rtol=1e-5, atol=1e-5)
    import cass_engine.decision as decision
    monkeypatch.setattr(decision, "BAND_ELEMENTS", 5 * out_hw[1] * 3)  # three rows per band
    banded = finalize(logits, out_hw, ranges, 40.0, 0.0, keep_full=False)
    assert torch.equal(full.labels, banded.labels)
    assert torch.allclose(full.mask_scores, banded.mask_scores)


@pytest.fixture(scope="module")
def segmenter():
    seg = build_segmenter(CassConfig.from_preset("coco_stuff"), random_weights=0)
    vocab = parse_vocabulary("sky, clouds\ngrass\nperson, people\ncup\ntable\n")
    seg.set_vocabulary(vocab, use_cache=False)
    return seg


@pytest.mark.slow
def test_end_to_end_shapes_dtypes_range_and_determinism(segmenter):
    photo = photo_336x448()
    first = segmenter.segment([photo])[0]
    again = segmenter.segment([photo])[0]
    assert first.labels.shape == (300, 400) and first.labels.dtype == torch.int64
    assert first.probs.shape == (5, 300, 400) and first.probs.dtype == torch.float32
    assert first.logits.shape == (7, 300, 400)  # 7 queries (synonyms included)
    assert int(first.labels.min()) >= 0 and int(first.labels.max()) < 5
    assert first.presence.shape == first.prior.shape == first.mask_scores.shape == (5,)
    assert torch.all((first.presence >= 0) & (first.presence <= 1))
    assert torch.isclose(first.pixel_fraction.sum(), torch.tensor(1.0))
    assert torch.equal(first.labels, again.labels)
    assert torch.equal(first.probs, again.probs)
    assert torch.equal(first.labels, first.probs.argmax(0))  # prob_thd is 0 in this preset
    assert segmenter.weights_info["random_weights"] == 0


@pytest.mark.slow
def test_batched_equals_one_at_a_time(segmenter):
    a = photo_336x448()
    b = np.ascontiguousarray(a[:200, :300][::-1])  # a different size
    batch = segmenter.segment([a, b], return_logits=False)
    for image, together in zip([a, b], batch, strict=True):
        alone = segmenter.segment([image], return_logits=False)[0]
        assert torch.equal(alone.labels, together.labels)
        assert torch.allclose(alone.probs, together.probs, atol=1e-5)
        assert torch.allclose(alone.presence, together.presence, atol=1e-6)


def test_bad_images_raise_clear_errors(segmenter):
    from cass_engine import ImageInputError
    with pytest.raises(ImageInputError, match="uint8"):
        segmenter.segment([np.zeros((50, 50, 3), dtype=np.float32)])
    with pytest.raises(ImageInputError, match="too elongated"):  # 16 x 2400 -> 14 x 2048
        segmenter.segment([np.zeros((16, 2400, 3), dtype=np.uint8)])
    with pytest.raises(ImageInputError, match="smaller"):
        segmenter.segment([np.zeros((8, 50, 3), dtype=np.uint8)])


def test_shared_text_embeddings_must_come_from_the_same_text_weights(segmenter):
    import dataclasses

    own = segmenter.text_embeddings
    other = dataclasses.replace(own, text_weights_hash="0" * 64)
    with pytest.raises(ValueError, match="other CLIP text weights"):
        segmenter.set_vocabulary(text_embeddings=other)
    assert segmenter.set_vocabulary(text_embeddings=own) is own


def test_pil_images_are_converted_like_image_files():
    from PIL import Image

    from cass_engine.images import to_uint8_chw

    clear = Image.new("RGBA", (20, 18), (10, 200, 30, 0))  # fully transparent
    assert to_uint8_chw(clear).unique().tolist() == [255]  # composited on white
    deep = Image.fromarray(np.linspace(0, 65535, 20 * 18).reshape(18, 20).astype(np.uint16))
    assert len(to_uint8_chw(deep)[0].unique()) > 200  # 16-bit scaled, not clipped
    turned = Image.new("RGB", (30, 20))
    exif = turned.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    turned.info["exif"] = exif.tobytes()
    buffer = __import__("io").BytesIO()
    turned.save(buffer, format="JPEG", exif=exif.tobytes())
    assert tuple(to_uint8_chw(Image.open(buffer)).shape) == (3, 30, 20)


def test_text_cache_that_cannot_be_written_only_warns(tmp_path):
    from cass_engine.text import _write_cache

    blocked = tmp_path / "file"
    blocked.write_text("x")  # a file where the cache folder should be
    with pytest.warns(UserWarning, match="not cached"):
        _write_cache(blocked / "cache" / "q.pt", torch.zeros(3, 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_import_loads_no_pipeline_dependencies():
    code = ("import sys, cass_engine; bad = [m for m in ('ray', 'pyarrow', 'fsspec') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_names_resolve_lazily():
    import cass_engine
    from cass_engine import segmenter, vocabulary
    for name in cass_engine.__all__:
        assert getattr(cass_engine, name) is not None, name
    assert cass_engine.build_segmenter is segmenter.build_segmenter
    assert cass_engine.Vocabulary is vocabulary.Vocabulary
    assert set(cass_engine.__all__) == set(cass_engine._EXPORTS) | {"__version__"}
    assert set(cass_engine.__all__) <= set(dir(cass_engine))
    with pytest.raises(AttributeError, match="no attribute 'Segmenter'"):
        cass_engine.Segmenter  # noqa: B018


@pytest.mark.slow
def test_predict_cli_writes_arrays_and_overlay(tmp_path):
    from PIL import Image
    image = tmp_path / "photo.png"
    Image.fromarray(photo_336x448()[:160, :200]).save(image)
    vocab = tmp_path / "v.txt"
    vocab.write_text("sky\ncup, mug\n")
    out, overlay, full = tmp_path / "r.npz", tmp_path / "o.png", tmp_path / "full.npz"
    cmd = [sys.executable, "-m", "cass_engine.predict", "--image", str(image), "--vocab",
           str(vocab), "--random-weights", "0"]
    run = subprocess.run([*cmd, "--out", str(out), "--overlay", str(overlay)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    data = np.load(out)
    assert "logits" not in data.files and "probs" not in data.files
    assert data["labels"].shape == (160, 200) and data["labels"].dtype == np.int32
    assert data["presence"].shape == data["mask_scores"].shape == (2,)
    assert list(data["class_names"]) == ["sky", "cup"]
    assert json.loads(str(data["weights"]))["random_weights"] == 0
    assert Image.open(overlay).size[0] > 200
    assert "random weights" in run.stdout
    run = subprocess.run([*cmd, "--out", str(full), "--save-probs", "--save-logits"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    with_maps = np.load(full)
    assert with_maps["logits"].shape == (3, 160, 200) and with_maps["probs"].shape == (2, 160, 200)
    assert np.array_equal(with_maps["labels"], data["labels"])
    assert np.array_equal(with_maps["probs"].argmax(0), data["labels"])
    with zipfile.ZipFile(full) as archive:  # stored compressed
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in archive.infolist())


@pytest.mark.parametrize("args, message", [
    (["--image", "missing.png", "--preset", "voc21"], "image file not found"),
    (["--image", "{bad}", "--preset", "voc21"], "cannot read image"),
    (["--image", "{img}", "--vocab", "{empty}"], "is empty"),
    (["--image", "{img}", "--vocab", "{malformed}"], "empty synonym"),
    (["--image", "{img}", "--preset", "nope"], "invalid choice"),
])
def test_predict_cli_errors(tmp_path, args, message):
    from PIL import Image
    files = {"img": tmp_path / "i.png", "bad": tmp_path / "bad.png",
             "empty": tmp_path / "e.txt", "malformed": tmp_path / "m.txt"}
    Image.new("RGB", (32, 32)).save(files["img"])
    files["bad"].write_bytes(b"not an image")
    files["empty"].write_text("\n")
    files["malformed"].write_text("cat, , dog\n")
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    run = subprocess.run([sys.executable, "-m", "cass_engine.predict", *argv, "--out",
                          str(tmp_path / "o.npz"), "--random-weights", "0"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert message in run.stderr
    assert len(run.stderr.strip().splitlines()) <= 12  # one-line error (argparse adds usage)

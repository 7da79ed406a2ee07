"""Per-pixel confidence: the engine's banded map, its compact encoding, schema 1.0/1.1 files."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from skimage import data
from support.engine import photo_336x448

from cass_engine import CassConfig, build_segmenter, parse_vocabulary
from cass_engine.decision import class_ranges, finalize
from schemas.confidence import (
    IGNORE_LABEL,
    MAX_QUANTISATION_ERROR,
    apply_ignore,
    decode_confidence,
    decode_levels,
    dequantize,
    encode_confidence,
    level_of,
    quantize,
    resolve_levels,
)
from schemas.io import iter_label_rows
from schemas.labels import label_schema, make_row, rows_to_table
from schemas.masks import label_map_to_annotations


def test_finalize_confidence_is_the_label_probability_and_banded_equals_full(monkeypatch):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 6, 7, generator=g) * 0.05
    ranges = class_ranges([0, 1, 1, 2, 3])
    full = finalize(logits, (23, 31), ranges, 40.0, prob_thd=0.4, keep_full=True)
    assert full.confidence.shape == (23, 31) and full.confidence.dtype == torch.float32
    chosen = full.probs.gather(0, full.labels[None])[0]
    assert torch.equal(full.confidence, chosen)
    # where prob_thd sent a pixel to class 0 the confidence is class 0's probability
    low = full.probs.max(0).values < 0.4
    assert low.any() and torch.equal(full.confidence[low], full.probs[0][low])
    monkeypatch.setattr("cass_engine.decision.BAND_ELEMENTS", 5 * 31 * 4)  # bands of 4 rows
    banded = finalize(logits, (23, 31), ranges, 40.0, prob_thd=0.4, keep_full=False)
    assert banded.probs is None
    assert torch.allclose(banded.confidence, full.confidence, atol=1e-6)


@pytest.fixture(scope="module")
def segmenter():
    # whole-image preset at a reduced size: the decision code is the same at any size
    config = dataclasses.replace(CassConfig.from_preset("voc21"), short_side=160)
    seg = build_segmenter(config, random_weights=0)
    seg.set_vocabulary(parse_vocabulary("cup, mug\ntable\nbackground\n"), use_cache=False)
    return seg


def test_engine_confidence_round_trip_on_real_photographs(segmenter):
    photo = photo_336x448()
    full = segmenter.segment([photo])[0]
    expected = full.probs.gather(0, full.labels[None])[0]
    assert full.confidence.shape == photo.shape[:2]
    assert torch.allclose(full.confidence, expected, atol=1e-6)
    other = np.ascontiguousarray(data.astronaut()[::4, ::4])
    lean = segmenter.segment([photo, other], return_logits=False, return_probs=False)
    assert torch.allclose(lean[0].confidence, full.confidence, atol=1e-6)
    assert torch.equal(lean[0].labels, full.labels)
    for result in lean:
        conf = result.confidence.numpy()
        blob = encode_confidence(conf)
        back = decode_confidence(blob, *conf.shape)
        assert back.dtype == np.float32 and back.shape == conf.shape
        assert np.abs(back - conf).max() <= MAX_QUANTISATION_ERROR + 1e-6


def test_reduced_scale_png_decodes_to_full_size_and_bad_pngs_are_refused():
    conf = np.linspace(0, 1, 40 * 60, dtype=np.float32).reshape(40, 60)
    blob = encode_confidence(conf, scale=4)
    with Image.open(io.BytesIO(blob)) as small:
        assert small.size == (15, 10)
    back = decode_confidence(blob, 40, 60)
    assert back.shape == (40, 60) and np.abs(back - conf).max() < 0.05
    assert decode_levels(blob, 40, 60).shape == (40, 60)
    rgb = io.BytesIO()
    Image.new("RGB", (4, 4)).save(rgb, format="PNG")
    with pytest.raises(ValueError, match="mode RGB"):
        decode_confidence(rgb.getvalue(), 4, 4)
    with pytest.raises(ValueError, match="non-empty"):
        encode_confidence(np.zeros((0, 3)))


def test_thresholds_keep_exactly_the_pixels_at_or_above_them_brute_force():
    rng = np.random.default_rng(0)
    conf = rng.random((30, 40)).astype(np.float32)
    labels = rng.integers(0, 3, (30, 40))
    levels = quantize(conf)
    for t in (0.0, 0.1, 0.5, 127 / 255, 0.75, 1.0):
        kept = dequantize(levels) >= np.float32(t) - 1e-7
        np.testing.assert_array_equal(levels >= level_of(t), kept)
        out = apply_ignore(labels, levels, resolve_levels(["a", "b", "c"], ignore_below=t))
        np.testing.assert_array_equal(out == IGNORE_LABEL, ~kept)
        np.testing.assert_array_equal(out[kept], labels[kept])
    doc = {"global": {"threshold": 0.2, "reached": True},
           "classes": {"a": {"threshold": 0.5, "reached": True},
                       "b": {"threshold": None, "reached": False},
                       "c": {"threshold": None, "reached": None}}}
    out = apply_ignore(labels, levels, resolve_levels(["a", "b", "c"], thresholds=doc))
    deq = dequantize(levels)
    expected = np.where(labels == 0, deq >= 0.5 - 1e-7,
                        np.where(labels == 1, False, deq >= 0.2 - 1e-7))
    np.testing.assert_array_equal(out != IGNORE_LABEL, expected)
    with pytest.raises(ValueError, match="not both"):
        resolve_levels(["a"], 0.5, doc)
    with pytest.raises(ValueError, match="not in these labels"):
        resolve_levels(["x", "y", "z"], thresholds=doc)


def _row(confidence: bytes | None) -> dict:
    labels = np.array([[0, 1], [1, 1]])
    anns = label_map_to_annotations(labels, [0.5, 0.5])
    return make_row(shard_id="s", source_uri="u", key="k", width=2, height=2, annotations=anns,
                    presence=[0.5, 0.5], confidence=confidence)


def test_schema_1_1_has_a_nullable_confidence_and_1_0_files_still_read(tmp_path):
    schema = label_schema()
    assert schema.field("confidence").nullable
    blob = encode_confidence(np.full((2, 2), 0.5, np.float32))
    table = rows_to_table([_row(blob), _row(None)])
    assert table.column("confidence").to_pylist() == [blob, None]
    # a schema 1.0 file: the same columns without confidence
    old = pa.schema([f for f in schema if f.name != "confidence"],
                    metadata={b"cass.schema_version": b"1.0"})
    rows = [{k: v for k, v in _row(None).items() if k != "confidence"}]
    (tmp_path / "labels").mkdir()
    (tmp_path / "_done").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=old), tmp_path / "labels" / "s.parquet")
    (tmp_path / "_done" / "s.json").write_text("{}")
    got = list(iter_label_rows(str(tmp_path), columns=["image_id", "confidence"]))
    assert got == [{"image_id": "s/k", "confidence": None}]


def test_confidence_pngs_open_as_png_only_and_within_their_image_size():
    jpeg = io.BytesIO()
    Image.new("L", (4, 4)).save(jpeg, format="JPEG")
    big = io.BytesIO()
    Image.new("L", (400, 300)).save(big, format="PNG")  # a tiny file, far more pixels
    for decode in (decode_levels, decode_confidence):
        with pytest.raises(ValueError, match="not a readable PNG"):
            decode(jpeg.getvalue(), 4, 4)
        with pytest.raises(ValueError, match="larger than its 4x3 image"):
            decode(big.getvalue(), 3, 4)


def test_hf_export_opens_sources_with_the_decoder_allow_list(monkeypatch):
    from cass_engine.formats import IMAGE_FORMATS
    from pipeline import exports
    from pipeline.source_images import SourceItem

    seen = []
    real = Image.open

    def spy(fp, mode="r", formats=None):
        seen.append(formats)
        return real(fp, mode, formats)

    monkeypatch.setattr(Image, "open", spy)
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    item = SourceItem({"image_id": "s/x"}, np.zeros((4, 4, 3), np.uint8), png.getvalue())
    assert exports.hf_image_bytes(item) == (png.getvalue(), "png")
    assert seen and all(tuple(f) == IMAGE_FORMATS for f in seen)

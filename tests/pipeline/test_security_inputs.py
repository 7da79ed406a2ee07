"""Security (issue 9), untrusted data: decoders keep to the allow-list (PostScript never
reaches Ghostscript, in images or ground-truth masks), Parquet ids become unique image ids,
and audit reports and plots draw data text literally, HTML escaped.

Every test here is small: tiny files, no engine.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest


# ----------------------------------------------------------------------------- decoding
@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch) -> Path:
    """A ``gs`` first on PATH that leaves a marker file when run; returns the marker path."""
    from PIL import EpsImagePlugin

    bin_dir, marker = tmp_path / "bin", tmp_path / "gs-ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # not cached from earlier
    monkeypatch.setattr(EpsImagePlugin, "gs_windows_binary", None)
    return marker


def _eps_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), (200, 10, 10)).save(buffer, "EPS")
    return buffer.getvalue()


def test_postscript_named_jpg_is_a_decode_error_and_ghostscript_never_runs(
        tmp_path, fake_ghostscript):
    from PIL import Image

    from cass_engine.images import ImageInputError, load_image
    from pipeline.decode import decode_image

    data = _eps_bytes()
    decoded = decode_image(data, 10**8)
    assert decoded.status == "decode_error" and decoded.rgb is None
    assert "EPS" in decoded.error and "JPEG, PNG, WebP, GIF, TIFF, BMP" in decoded.error
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    with pytest.raises(ImageInputError, match="EPS"):
        load_image(path)
    assert not fake_ghostscript.exists()
    with pytest.raises(Exception):  # noqa: B017, PT011 - control: Pillow's default open runs gs
        Image.open(io.BytesIO(data)).load()
    assert fake_ghostscript.exists()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"])
def test_accepted_formats_still_decode(fmt):
    from PIL import Image

    from pipeline.decode import decode_image

    buffer = io.BytesIO()
    Image.new("RGB", (20, 18), (10, 200, 30)).save(buffer, fmt)
    decoded = decode_image(buffer.getvalue(), 10**8)
    assert decoded.status == "ok" and decoded.rgb.shape == (18, 20, 3)


def test_ground_truth_masks_use_the_decoder_allow_list(fake_ghostscript):
    from cass_engine.images import decode_rgb
    from pipeline.audit.errors import AuditError
    from pipeline.audit.sources import decode_label_png

    with pytest.raises(AuditError, match="EPS"):
        decode_label_png(_eps_bytes(), "mask a.png")
    with pytest.raises(OSError, match="EPS"):
        decode_rgb(_eps_bytes())
    assert not fake_ghostscript.exists()


# ----------------------------------------------------------------------------- Parquet ids
def test_parquet_duplicate_and_null_ids_get_unique_image_ids(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.decode import DecodedImage
    from pipeline.encode import failure_row
    from pipeline.readers import iter_raw_images
    from pipeline.shards import ShardSpec
    from schemas.io import open_uri

    ids = ["a", "a", None, "00000002", "a~1", "b", None, "a"]
    table = pa.table({"image": [b"x"] * len(ids), "name": ids})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=3)
    fs, _ = open_uri(str(tmp_path))
    shard = ShardSpec("p", "parquet", (str(tmp_path / "p.parquet"),), (), "p", "fp")

    def rows() -> list[dict]:
        items = list(iter_raw_images(shard, fs, "image", "name"))
        return [failure_row("p", item, DecodedImage(None, None, None), "decode_error", "x")
                for item in items]

    first = rows()
    image_ids = [r["image_id"] for r in first]
    assert len(set(image_ids)) == len(ids), image_ids
    assert [r["key"] for r in first] == ["a", "a", "00000002", "00000002", "a~1", "b",
                                         "00000006", "a"]  # original ids (row number: null)
    assert image_ids[:3] == ["p/a", "p/a~1", "p/00000002"]
    assert image_ids == [r["image_id"] for r in rows()]  # deterministic


# ----------------------------------------------------------------------------- audit text

DATA_NAMES = ["background", "cost $5 or $6", "<script>alert(1)</script>", "a $^$ b"]


def test_audit_draws_data_text_literally_and_escapes_html(tmp_path):
    from PIL import Image
    from support.audit_data import ok_row, write_labels_output

    from jobs.audit import main

    labels = np.zeros((8, 8), np.int64)
    labels[:4] = 1
    labels[4:, :4] = 2
    labels[4:, 4:] = 3
    key = "<img src=x onerror=alert(2)> $1$.jpg"
    write_labels_output(str(tmp_path / "out"), {"s0": [
        ok_row(key, labels, 4, [0.1, 0.9, 0.8, 0.7])]}, [[n] for n in DATA_NAMES])
    gt = tmp_path / "gt"
    gt.mkdir()
    Image.fromarray(labels.T.astype(np.uint8)).save(gt / f"{key[:-4]}.png")
    (gt / "classes.txt").write_text("\n".join(DATA_NAMES) + "\n")
    code = main(["--labels", str(tmp_path / "out"), "--ground-truth", str(gt),
                 "--report", str(tmp_path / "report"), "--no-progress", "--fail-under", "0"])
    assert code == 0
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "cost $5 or $6" in html



def test_plots_draw_data_text_literally():
    from PIL import Image

    from pipeline.audit.plots import confusion_heatmap, iou_bars

    names = [*DATA_NAMES, "a $^$ b", r"x $\frac{$ y"]  # not even valid math text
    for png in (iou_bars(names, [50.0] * len(names)),
                confusion_heatmap(np.eye(len(names), dtype=np.int64) * 5, names)):
        assert Image.open(io.BytesIO(png)).size[0] > 100

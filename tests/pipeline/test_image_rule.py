"""One image rule: the CLI, the labeling job, audit overlays and review sheets see the same
pixels for the images where loaders usually differ (alpha, 16-bit, palette transparency,
CMYK, greyscale, EXIF orientation)."""

from __future__ import annotations

import functools
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.images import encode, exif_rotated_jpeg, photo, write_vocabulary

from cass_engine.images import load_image, to_uint8_chw
from pipeline.audit.sources import load_source_image
from pipeline.decode import decode_image
from pipeline.review.sheet import decode_photo

LIMIT = 10**6
HIDDEN = (0, 255, 0)  # colour stored under fully transparent pixels: must never show


def _rgb() -> np.ndarray:
    return photo("astronaut", 40)[:, :36].copy()  # 40x36, no square to hide a rotation


def tricky_images() -> dict[str, bytes]:
    """File name -> encoded bytes of the images loaders disagree on."""
    rgb = _rgb()
    height, width = rgb.shape[:2]
    alpha = np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))
    alpha[:, :6] = 0
    colour = rgb.copy()
    colour[alpha == 0] = HIDDEN
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    deep = np.minimum(grey.astype(np.int64) * 257 + np.arange(width) * 7, 65535)
    deep = deep.astype(np.uint16)
    palette = Image.fromarray(rgb).quantize(16)
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])
    return {
        "rgba.png": encode(Image.fromarray(np.dstack([colour, alpha]), "RGBA")),
        "la.png": encode(Image.fromarray(np.dstack([grey, alpha]), "LA")),
        "gray16.png": encode(Image.fromarray(deep)),  # mode I;16
        "palette_trns.png": encode(palette, transparency=palette.info["transparency"]),
        "cmyk.jpg": encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95),
        "gray.png": encode(Image.fromarray(grey)),
        "rotated.jpg": exif_rotated_jpeg(rgb, 6),
    }


@functools.cache
def _decoded() -> dict[str, np.ndarray]:
    return {name: decode_image(data, LIMIT).rgb for name, data in tricky_images().items()}


@pytest.mark.parametrize("name", sorted(tricky_images()))
def test_every_reader_decodes_the_same_pixels(tmp_path, name):
    data = tricky_images()[name]
    path = tmp_path / name
    path.write_bytes(data)
    job = decode_image(data, LIMIT)
    assert job.status == "ok", job.error
    readers = {
        "cli (load_image)": load_image(path),
        "api (PIL image)": to_uint8_chw(Image.open(io.BytesIO(data))).permute(1, 2, 0).numpy(),
        "audit overlay": load_source_image(str(path), None),
        "review sheet": decode_photo(data),
    }
    for reader, rgb in readers.items():
        assert rgb is not None, reader
        assert rgb.dtype == np.uint8 and rgb.shape == job.rgb.shape, reader
        assert rgb.tobytes() == job.rgb.tobytes(), reader


def test_the_rule_alpha_on_white_16_bit_by_range_exif_applied():
    rgb, images = _rgb(), _decoded()
    for name in ("rgba.png", "la.png", "palette_trns.png"):  # transparent -> white
        transparent = np.asarray(Image.open(io.BytesIO(tricky_images()[name])).convert("RGBA"))
        clear = transparent[..., 3] == 0
        assert clear.any() and (images[name][clear] == 255).all(), name
    opaque = images["rgba.png"][:, -1]  # last column: alpha 255, the photo itself
    np.testing.assert_array_equal(opaque, rgb[:, -1])
    deep = np.asarray(Image.open(io.BytesIO(tricky_images()["gray16.png"])))
    assert deep.dtype == np.uint16 and deep.max() > 255
    np.testing.assert_array_equal(images["gray16.png"][..., 0], (deep >> 8).astype(np.uint8))
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    np.testing.assert_array_equal(images["gray16.png"][..., 1] >= grey, True)  # v*257 + a bit
    assert images["rotated.jpg"].shape == (rgb.shape[1], rgb.shape[0], 3)  # rotated 90 degrees
    assert images["cmyk.jpg"].shape == rgb.shape and images["gray.png"].shape == rgb.shape


def test_hf_export_stores_the_rule_pixels_of_a_transparent_rgb_png():
    from pipeline.exports import hf_image_bytes
    from pipeline.source_images import SourceItem

    rgb = _rgb()
    rgb[:4] = 0  # the tRNS colour: transparent, shown white by the rule
    data = encode(Image.fromarray(rgb), transparency=(0, 0, 0))
    seen = decode_image(data, LIMIT).rgb
    assert (seen[:4] == 255).all()
    stored, fmt = hf_image_bytes(SourceItem({"image_id": "s/x"}, seen, data))
    assert fmt == "png" and stored != data
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(stored))), seen)


def test_the_image_rule_loads_no_torch():
    code = ("import sys, cass_engine.images, pipeline.decode, pipeline.source_images; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


# ---------------------------------------------------------------------- CLI vs job
THREADS = 2  # labels of a random-weight model depend on the float summation order
SHORT_SIDE = 64


def _cli_labels(tmp_path: Path, vocab: Path, names: list[str], monkeypatch) -> dict:
    """Label each image with ``python -m cass_engine.predict`` (in-process; the random-weight
    engine is built once for all of them)."""
    import torch

    import cass_engine.segmenter
    from cass_engine.predict import main

    build = functools.cache(cass_engine.segmenter.build_segmenter)
    monkeypatch.setattr(cass_engine.segmenter, "build_segmenter",
                        lambda config, **kw: build(config, **kw))
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    out = {}
    try:
        for name in names:
            npz = tmp_path / "cli" / f"{name}.npz"
            argv = ["--image", str(tmp_path / "in" / name), "--preset", "coco_stuff",
                    "--vocab", str(vocab), "--random-weights", "0",
                    "--short-side", str(SHORT_SIDE), "--out", str(npz)]
            assert main(argv) == 0, name
            out[name] = np.load(npz)["labels"]
    finally:
        torch.set_num_threads(previous)
    return out


@pytest.mark.slow
def test_cli_and_job_label_the_tricky_images_alike(ray_cpus, tmp_path, monkeypatch):
    import cass_engine
    from pipeline.config import ComputeConfig, EngineSpec, IOConfig, JobConfig
    from pipeline.runner import run_job
    from schemas import annotations_to_label_map
    from schemas.io import iter_label_rows

    vocab = write_vocabulary(tmp_path / "vocab.txt", ["sky", "person", "ground"])
    (tmp_path / "in").mkdir()
    for name, data in tricky_images().items():
        (tmp_path / "in" / name).write_bytes(data)
    config = cass_engine.CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab),
                                                short_side=SHORT_SIDE)
    job = JobConfig(IOConfig(str(tmp_path / "in"), str(tmp_path / "out")),
                    ComputeConfig(actors=1, cpus_per_actor=THREADS, batch_size=1),
                    EngineSpec(config, random_weights=0))
    assert run_job(job, emit=lambda _: None).status == "complete"
    rows = {r["key"]: r for r in iter_label_rows(str(tmp_path / "out"))}
    cli = _cli_labels(tmp_path, vocab, sorted(tricky_images()), monkeypatch)
    assert len(np.unique(np.concatenate([m.ravel() for m in cli.values()]))) > 1  # not constant
    for name, labels in cli.items():
        row = rows[name]
        assert row["status"] == "ok", row["error"]
        assert (row["height"], row["width"]) == labels.shape == _decoded()[name].shape[:2]
        got = annotations_to_label_map(row["annotations"], row["height"], row["width"])
        np.testing.assert_array_equal(got, labels, err_msg=name)

"""jobs/evaluate.py with a stand-in segmenter, its errors, and the end-to-end path
engine (random weights) -> Parquet (pipeline encoder and writer) -> audit."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_benchmarks import make_tree

from jobs import evaluate
from jobs.audit import main as audit_main


def _config(tmp_path: Path, *extra: str):
    return evaluate.config_from_args(evaluate.build_parser().parse_args(
        ["--benchmark", "cityscapes", "--data-root", str(tmp_path), "--no-progress", *extra]))


def test_evaluate_prints_measured_next_to_published_and_writes_report(tmp_path, capsys):
    make_tree(tmp_path, "cityscapes")
    report = tmp_path / "report"
    code = evaluate.run(_config(tmp_path, "--report", str(report), "--batch-size", "2"),
                        segment=lambda ims: [np.zeros(im.shape[:2], int) for im in ims])
    assert code == 0
    out = capsys.readouterr().out
    header, row = out.strip().splitlines()[-2:]
    assert header.split() == ["benchmark", "images", "mIoU", "paper", "aAcc", "paper", "mAcc"]
    # masks hold 0, 7, 18, 255 (+ the first pixel): road (0) is 1/3 of every valid pixel
    assert row.split()[:2] == ["cityscapes", "2"] and row.split()[3] == "39.4"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["num_images"] == 2 and metrics["num_classes"] == 19
    assert float(row.split()[2]) == pytest.approx(metrics["mIoU"], abs=0.01)
    assert metrics["sources"]["published_mIoU"] == 39.4
    assert (report / "report.html").read_text().count("data:image/png;base64,") >= 3


def test_evaluate_errors_are_one_line_with_status_two(tmp_path, capsys):
    assert evaluate.main(["--benchmark", "ade20k", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evaluate: error: ade20k: image folder not found") and "\n" not in err
    code = evaluate.main(["--benchmark", "voc21", "--data-root", str(tmp_path),
                          "--random-weights", "0", "--clip-weights", "x.pt"])
    assert code == 2 and "cannot be combined" in capsys.readouterr().err
    assert evaluate.main(["--benchmark", "voc21", "--data-root", ".", "--limit", "0"]) == 2
    with pytest.raises(SystemExit):
        evaluate.main(["--benchmark", "voc99", "--data-root", "."])


def _engine_or_skip():
    engine = pytest.importorskip("cass_engine")
    if not hasattr(engine, "build_segmenter"):
        pytest.skip("cass_engine.build_segmenter does not exist yet")
    try:
        from pipeline.decode import decode_image
        from pipeline.encode import result_to_row
        from pipeline.readers import RawImage
        from pipeline.writer import write_shard
    except ImportError as error:
        pytest.skip(f"the pipeline encoder/writer is not importable yet: {error}")
    return engine, decode_image, result_to_row, RawImage, write_shard


def _png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def test_engine_random_weights_to_parquet_to_audit(tmp_path):
    engine, decode_image, result_to_row, RawImage, write_shard = _engine_or_skip()
    from skimage import data

    from schemas import categories_from_classes, run_metadata
    from schemas.io import open_uri

    vocab = engine.parse_vocabulary("background, sky\ncat\ndog\n")
    config = engine.CassConfig.from_preset("voc21", short_side=112)  # small: a smoke run
    seg = engine.build_segmenter(config, random_weights=0, device="cpu")
    seg.set_vocabulary(vocab, use_cache=False)
    photos = [np.ascontiguousarray(data.coffee()[::8, ::8][:40, :56]),
              np.ascontiguousarray(data.astronaut()[::12, ::12][:36, :42])]
    items, rows = [], []
    for i, rgb in enumerate(photos):
        path = tmp_path / "images" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(_png_bytes(rgb))
        items.append(RawImage(key=path.name, source_uri=str(path), data=path.read_bytes()))
    decoded = [decode_image(item.data, 10**8) for item in items]
    results = seg.segment([d.rgb for d in decoded], return_logits=False, return_probs=False)
    for item, dec, res in zip(items, decoded, results, strict=True):
        rows.append(result_to_row("shard-0", item, dec, res, vocab.num_classes))
    meta = run_metadata(categories_from_classes(vocab.classes), vocab.content_hash())
    fs, root = open_uri(str(tmp_path / "out"))
    write_shard(fs, root, "shard-0", rows, meta, {})
    # ground truth: image 0 is labelled exactly as predicted, image 1 all "dog"
    gt = tmp_path / "gt"
    gt.mkdir()
    Image.fromarray(results[0].labels.numpy().astype(np.uint8)).save(gt / "img0.png")
    Image.fromarray(np.full(photos[1].shape[:2], 2, np.uint8)).save(gt / "img1.png")
    (gt / "classes.txt").write_text("background\ncat\ndog\n")
    report = tmp_path / "report"
    code = audit_main(["--labels", str(tmp_path / "out"), "--ground-truth", str(gt),
                       "--report", str(report), "--no-progress"])
    assert code == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["num_images"] == 2 and metrics["unmatched"]["ground_truth"] == 0
    assert metrics["sources"]["vocabulary_hash"] == vocab.content_hash()
    assert metrics["presence_mAP"] is not None
    pred0, pred1 = (r.labels.numpy() for r in results)
    worst = {w["image_id"]: w["miou"] for w in metrics["worst_images"]}
    assert worst["shard-0/img0.png"] == 100.0
    dog = metrics["per_class"]["dog"]  # ground truth: image 1 entirely, image 0 where predicted
    assert dog["gt_pixels"] == pred1.size + (pred0 == 2).sum()
    assert dog["pred_pixels"] == (pred1 == 2).sum() + (pred0 == 2).sum()
    assert dog["iou"] == pytest.approx(100 * dog["pred_pixels"] / dog["gt_pixels"], abs=1e-3)
    assert (report / "report.html").stat().st_size > 10_000

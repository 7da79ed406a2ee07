"""Benchmark readers on tiny fixture trees in the mmsegmentation layouts of the 8 datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.audit import AuditError
from pipeline.audit.benchmarks import (
    BENCHMARKS,
    comparison_table,
    get_benchmark,
    list_samples,
    load_image,
    load_label_map,
    run_benchmark,
)
from pipeline.audit.metrics import IGNORED

I = IGNORED

# Written out from the mmsegmentation data-preparation guide (not derived from the specs):
# dataset folder, image path, mask path, split file (None: every image, sorted).
LAYOUTS = {
    "voc21": ("VOCdevkit/VOC2012", "JPEGImages/{}.jpg", "SegmentationClass/{}.png",
              "ImageSets/Segmentation/val.txt"),
    "voc20": ("VOCdevkit/VOC2012", "JPEGImages/{}.jpg", "SegmentationClass/{}.png",
              "ImageSets/Segmentation/val.txt"),
    "context60": ("VOCdevkit/VOC2010", "JPEGImages/{}.jpg", "SegmentationClassContext/{}.png",
                  "ImageSets/SegmentationContext/val.txt"),
    "context59": ("VOCdevkit/VOC2010", "JPEGImages/{}.jpg", "SegmentationClassContext/{}.png",
                  "ImageSets/SegmentationContext/val.txt"),
    "coco_stuff": ("coco_stuff164k", "images/val2017/{}.jpg",
                   "annotations/val2017/{}_labelTrainIds.png", None),
    "coco_object": ("coco_stuff164k", "images/val2017/{}.jpg",
                    "annotations/val2017/{}_instanceTrainIds.png", None),
    "cityscapes": ("cityscapes", "leftImg8bit/val/{}_leftImg8bit.png",
                   "gtFine/val/{}_gtFine_labelTrainIds.png", None),
    "ade20k": ("ADEChallengeData2016", "images/validation/{}.jpg",
               "annotations/validation/{}.png", None),
}
NAMES = {
    "split": ["2008_000002", "2007_000033"],  # split-file order, not sorted
    "scan": ["000000000632", "000000000139"],
    "cityscapes": ["lindau/lindau_000000_000019", "frankfurt/frankfurt_000000_000294"],
    "ade20k": ["ADE_val_00000002", "ADE_val_00000001"],
}
# Raw mask values -> expected labels after the benchmark's rule (-1 = ignored).
VALUES = {
    "voc21": ([0, 5, 20, 255], [0, 5, 20, I]),
    "voc20": ([0, 5, 20, 255], [I, 4, 19, I]),
    "context60": ([0, 1, 59, 255], [0, 1, 59, I]),
    "context59": ([0, 1, 59, 255], [I, 0, 58, I]),
    "coco_stuff": ([0, 91, 170, 255], [0, 91, 170, I]),
    "coco_object": ([0, 1, 80, 255], [0, 1, 80, I]),
    "cityscapes": ([0, 7, 18, 255], [0, 7, 18, I]),
    "ade20k": ([0, 1, 150, 255], [I, 0, 149, I]),
}
NUM_CLASSES = {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59, "coco_stuff": 171,
               "coco_object": 81, "cityscapes": 19, "ade20k": 150}
PUBLISHED = {"voc21": (65.8, 90.1), "context60": (36.7, 55.6), "coco_object": (37.8, 76.0),
             "voc20": (87.8, 93.9), "context59": (40.2, 65.0), "coco_stuff": (26.7, 43.6),
             "cityscapes": (39.4, 78.2), "ade20k": (20.4, 48.6)}


def _names(benchmark: str) -> list[str]:
    if LAYOUTS[benchmark][3]:
        return NAMES["split"]
    return NAMES.get(benchmark, NAMES["scan"])


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_tree(root: Path, benchmark: str, hw=(4, 6)) -> list[str]:
    """Images, masks (and split file) of two samples plus distractors; returns the names."""
    folder, image_fmt, mask_fmt, split = LAYOUTS[benchmark]
    base = root / folder
    raw = np.array(VALUES[benchmark][0], np.uint8)
    names = _names(benchmark)
    for i, name in enumerate(names):
        _write(base / image_fmt.format(name), np.full((*hw, 3), 40 * i, np.uint8))
        mask = np.resize(raw, hw).astype(np.uint8)
        mask[0, 0] = raw[i]
        _write(base / mask_fmt.format(name), mask)
    extra = "2011_009999" if split else "zzz_not_in_val"
    _write(base / image_fmt.replace("val", "train").format(extra), np.zeros((2, 2, 3), np.uint8))
    if split:
        _write(base / image_fmt.format(extra), np.zeros((2, 2, 3), np.uint8))  # not in split
        (base / split).parent.mkdir(parents=True, exist_ok=True)
        (base / split).write_text("\n".join(names) + "\n")
    return names


@pytest.mark.parametrize("benchmark", list(LAYOUTS))
def test_reader_finds_samples_in_mmseg_order(tmp_path, benchmark):
    names = make_tree(tmp_path, benchmark)
    spec = get_benchmark(benchmark)
    samples = list_samples(spec, tmp_path)
    expected = names if LAYOUTS[benchmark][3] else sorted(names)
    assert [s.image_id for s in samples] == expected
    folder, image_fmt, mask_fmt, _ = LAYOUTS[benchmark]
    assert samples[0].image_path == tmp_path / folder / image_fmt.format(expected[0])
    assert samples[0].mask_path == tmp_path / folder / mask_fmt.format(expected[0])
    # the dataset folder itself is accepted as the data root too; --limit keeps the first N
    again = list_samples(spec, tmp_path / folder, limit=1)
    assert [s.image_id for s in again] == expected[:1]
    assert load_image(samples[0]).shape == (4, 6, 3)


@pytest.mark.parametrize("benchmark", list(LAYOUTS))
def test_label_rule_of_each_benchmark(tmp_path, benchmark):
    make_tree(tmp_path, benchmark, hw=(1, 4))
    spec = get_benchmark(benchmark)
    sample = list_samples(spec, tmp_path)[0]
    label = load_label_map(sample, spec)
    raw, expected = VALUES[benchmark]
    first = _names(benchmark).index(sample.image_id)
    assert label[0, 1:].tolist() == expected[1:]
    assert label[0, 0] == expected[raw.index(raw[first])]


def test_class_lists_and_published_numbers():
    assert list(BENCHMARKS) == list(PUBLISHED)
    for name, spec in BENCHMARKS.items():
        assert len(spec.class_names()) == NUM_CLASSES[name], name
        assert (spec.published_miou, spec.published_aacc) == PUBLISHED[name]
    assert get_benchmark("voc21").class_names()[:2] == ["background", "aeroplane"]
    assert get_benchmark("coco_object").class_names()[:2] == ["background", "person"]
    assert get_benchmark("voc20").class_names()[0] == "aeroplane"
    assert get_benchmark("cityscapes").class_names()[-1] == "bicycle"


def test_specs_use_the_engine_presets_vocabulary():
    config = pytest.importorskip("cass_engine.config")
    for name, spec in BENCHMARKS.items():
        assert config.CassConfig.from_preset(name).vocabulary_file == spec.vocabulary_file


def _oracle(samples, spec):
    truth = iter([np.where(load_label_map(s, spec) < 0, 0, load_label_map(s, spec))
                  for s in samples])
    return lambda images: [next(truth) for _ in images]


def test_run_benchmark_perfect_and_constant_predictions(tmp_path):
    make_tree(tmp_path, "voc21", hw=(2, 4))
    spec = get_benchmark("voc21")
    samples = list_samples(spec, tmp_path)
    perfect = run_benchmark(spec, tmp_path, _oracle(samples, spec), batch_size=2, progress=False)
    assert perfect.num_images == 2
    assert perfect.summary["mIoU"] == 1.0 and perfect.summary["aAcc"] == 1.0
    # masks: [[v, 5, 20, 255], [0, 5, 20, 255]] with v = 0 then 5; predict 0 everywhere
    zeros = run_benchmark(spec, tmp_path, lambda ims: [np.zeros(im.shape[:2], int) for im in ims],
                          progress=False)
    # class 0: gt 3, pred 12 (all valid pixels), I 3 -> 0.25; classes 5, 20: IoU 0
    assert zeros.summary["mIoU"] == pytest.approx(0.25 / 3)
    assert zeros.summary["aAcc"] == pytest.approx(3 / 12)
    table = comparison_table(spec, zeros)
    assert "voc21" in table and "65.8" in table and "90.1" in table and "8.33" in table


def test_errors_name_the_missing_piece(tmp_path):
    spec = get_benchmark("voc21")
    with pytest.raises(AuditError, match="image folder not found .*JPEGImages"):
        list_samples(spec, tmp_path)
    make_tree(tmp_path, "voc21")
    mask = tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2007_000033.png"
    mask.unlink()
    with pytest.raises(AuditError, match="mask of '2007_000033' not found: .*2007_000033.png"):
        list_samples(spec, tmp_path)
    (tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(AuditError, match="split file not found"):
        list_samples(spec, tmp_path)
    with pytest.raises(AuditError, match="unknown benchmark 'voc'"):
        get_benchmark("voc")


def test_prediction_of_wrong_size_is_an_error(tmp_path):
    make_tree(tmp_path, "ade20k")
    spec = get_benchmark("ade20k")
    with pytest.raises(AuditError, match="ground truth is 4x6 but the prediction is 4x5"):
        run_benchmark(spec, tmp_path, lambda ims: [np.zeros((4, 5), int) for _ in ims],
                      progress=False)

"""Hand-computed metrics: mmseg IoU rules, presence AP, category mapping, worst images."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.audit import (
    AuditError,
    Evaluator,
    GtCategory,
    ImageRef,
    build_mapping,
    identity_mapping,
)
from pipeline.audit.categories import parse_mapping_text
from pipeline.audit.metrics import IGNORED
from pipeline.audit.presence import PresenceAccumulator
from pipeline.audit.report import build_metrics, empty_unmatched

I = IGNORED


def _evaluate(pairs, names=("a", "b", "c"), presence=None):
    ev = Evaluator(identity_mapping(list(names)), worst_k=3)
    for i, (gt, pred) in enumerate(pairs):
        scores = None if presence is None else presence[i]
        ev.add(ImageRef(f"img{i}"), np.array(gt), np.array(pred), scores)
    return ev.result()


def test_mmseg_rules_on_one_image():
    # valid pixels: (gt0,p0) (gt0,p1) (gt1,p1); the ignored pixel's prediction (2) never counts
    result = _evaluate([([[0, 0], [1, I]], [[0, 1], [1, 2]])])
    np.testing.assert_allclose(result.scores.iou[:2], [0.5, 0.5])
    np.testing.assert_allclose(result.scores.acc[:2], [0.5, 1.0])
    assert math.isnan(result.scores.iou[2]) and math.isnan(result.scores.acc[2])
    assert result.summary["mIoU"] == pytest.approx(0.5)
    assert result.summary["mAcc"] == pytest.approx(0.75)
    assert result.summary["aAcc"] == pytest.approx(2 / 3)
    assert result.ignored_pixels == 1


def test_dataset_accumulation_and_predicted_but_absent_class_counts_zero():
    result = _evaluate([([[0, 0], [1, I]], [[0, 1], [1, 2]]),
                        ([[1, 1], [1, 1]], [[2, 2], [2, 2]])])
    # class 2 never in the ground truth but predicted: IoU 0 (included), Acc NaN (excluded)
    assert result.scores.iou[2] == 0.0 and math.isnan(result.scores.acc[2])
    assert result.scores.iou[1] == pytest.approx(1 / 6)  # I=1, gt=5, pred=2
    assert result.summary["mIoU"] == pytest.approx((0.5 + 1 / 6 + 0.0) / 3)
    assert result.summary["mAcc"] == pytest.approx((0.5 + 0.2) / 2)
    assert result.summary["aAcc"] == pytest.approx(2 / 7)
    assert result.confusion.dtype == np.int64
    assert result.confusion[1, 2] == 4 and result.confusion[0, 1] == 1


def test_class_absent_everywhere_is_excluded_and_reported_as_null():
    result = _evaluate([([[0, 1]], [[0, 1]])], names=("a", "b", "never"))
    assert result.summary["mIoU"] == 1.0
    metrics = build_metrics(result, empty_unmatched(), {})
    assert metrics["per_class"]["never"]["iou"] is None
    assert metrics["per_class"]["never"]["gt_pixels"] == 0
    assert metrics["mIoU"] == 100.0


def test_all_ignored_gives_undefined_metrics():
    result = _evaluate([([[I, I]], [[0, 1]])])
    assert math.isnan(result.summary["mIoU"]) and math.isnan(result.summary["aAcc"])
    assert build_metrics(result, empty_unmatched(), {})["mIoU"] is None
    assert result.worst == []  # NaN images are not ranked


def test_worst_images_are_lowest_per_image_miou_first():
    perfect = ([[0, 1]], [[0, 1]])
    half = ([[0, 0]], [[0, 1]])  # class 0 IoU 1/2, class 1 IoU 0 -> 0.25
    wrong = ([[0, 0]], [[1, 1]])
    result = _evaluate([perfect, half, wrong, perfect])
    assert [e.ref.image_id for e in result.worst] == ["img2", "img1", "img0"]
    assert [e.miou for e in result.worst] == pytest.approx([0.0, 0.25, 1.0])


def test_shape_mismatch_and_out_of_range_labels_are_clear_errors():
    ev = Evaluator(identity_mapping(["a", "b"]))
    with pytest.raises(AuditError, match="ground truth is 1x2 but the prediction is 2x1"):
        ev.add(ImageRef("x"), np.zeros((1, 2), int), np.zeros((2, 1), int))
    with pytest.raises(AuditError, match="label value 7 is outside the 2"):
        ev.add(ImageRef("x"), np.array([[0, 7]]), np.zeros((1, 2), int))
    with pytest.raises(AuditError, match="predicted class outside"):
        ev.add(ImageRef("x"), np.zeros((1, 2), int), np.array([[0, 5]]))


def _ap(scores, truth):
    acc = PresenceAccumulator(1)
    for s, t in zip(scores, truth, strict=True):
        acc.add(np.array([s]), np.array([t]), np.array([True]))
    return acc.average_precision()[0]


def test_presence_ap_hand_values():
    assert _ap([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert _ap([0.5, 0.5], [1, 0]) == pytest.approx(0.5)  # tie: one threshold
    assert _ap([0.2, 0.9], [1, 1]) == pytest.approx(1.0)
    assert _ap([0.1, 0.9], [1, 0]) == pytest.approx(0.5)
    assert math.isnan(_ap([0.3, 0.4], [0, 0]))  # no positive image: undefined


def _reference_ap(scores: np.ndarray, truth: np.ndarray) -> float:
    """sklearn's average_precision_score, written out: thresholds at distinct scores."""
    total = 0.0
    previous_recall = 0.0
    for threshold in np.unique(scores)[::-1]:
        chosen = scores >= threshold
        tp = float(np.sum(truth[chosen]))
        recall = tp / truth.sum()
        total += (recall - previous_recall) * tp / chosen.sum()
        previous_recall = recall
    return total


def test_presence_ap_matches_reference_on_random_scores():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 65, size=300) / 64.0  # exact in float16, many ties
    truth = (rng.random(300) < scores * 0.8).astype(int)
    assert _ap(scores, truth) == pytest.approx(_reference_ap(scores, truth), abs=1e-12)


def test_presence_map_over_mapped_categories_uses_max_over_classes():
    classes = [["sky"], ["wall"], ["cat"]]
    gt = [GtCategory("background"), GtCategory("cat")]
    mapping = build_mapping(classes, gt, {"sky": "background", "wall": "background"})
    ev = Evaluator(mapping)
    # image 0: cat present; image 1: only background
    ev.add(ImageRef("0"), np.array([[0, 1]]), np.array([[0, 2]]), np.array([0.2, 0.1, 0.9]))
    ev.add(ImageRef("1"), np.array([[0, 0]]), np.array([[1, 0]]), np.array([0.3, 0.7, 0.95]))
    result = ev.result()
    assert result.presence_ap[1] == pytest.approx(0.5)  # 0.95 (neg) ranks above 0.9 (pos)
    assert result.presence_ap[0] == pytest.approx(1.0)  # both images have background
    assert result.scores.iou[0] == pytest.approx(1.0)  # sky + wall merged into background
    metrics = build_metrics(result, empty_unmatched(), {})
    assert metrics["presence_mAP"] == pytest.approx(75.0)
    assert metrics["per_class"]["background"]["mapped_from"] == ["sky", "wall"]


def test_mapping_by_name_synonym_file_and_unmapped():
    classes = [["background", "sky"], ["person", "man"], ["pottedplant"], ["tv monitor", "tv"],
               ["zebra"]]
    gt = [GtCategory("Background"), GtCategory("person"), GtCategory("potted_plant"),
          GtCategory("tvmonitor", ("television", "tv")), GtCategory("car")]
    mapping = build_mapping(classes, gt)
    assert mapping.class_to_gt == (0, 1, None, 3, None)
    assert mapping.rule == ("name", "name", "", "synonym", "")
    assert mapping.unmapped_classes == ["pottedplant", "zebra"]
    assert mapping.unmapped_gt == ["potted_plant", "car"]
    fixed = build_mapping(classes, gt, {"pottedplant": "potted plant", "man": None})
    assert fixed.class_to_gt == (0, None, 2, 3, None)
    assert fixed.rule[:3] == ("name", "file", "file")


def test_mapping_file_errors_are_clear():
    gt = [GtCategory("cat", (), 17)]
    assert build_mapping([["kitty"]], gt, {"kitty": 17}).class_to_gt == (0,)
    with pytest.raises(AuditError, match="'dog' is not a class"):
        build_mapping([["cat"]], gt, {"dog": "cat"})
    with pytest.raises(AuditError, match="'lion' is not a ground-truth category"):
        build_mapping([["cat"]], gt, {"cat": "lion"})
    with pytest.raises(AuditError, match="not valid JSON"):
        parse_mapping_text("{cat: dog", "map.json")


def test_unmapped_ground_truth_and_predictions_go_to_other():
    classes = [["cat"], ["dog"], ["bird"]]
    gt = [GtCategory("cat"), GtCategory("dog"), GtCategory("car")]
    mapping = build_mapping(classes, gt)
    assert mapping.mapped_gt == [0, 1] and mapping.unmapped_classes == ["bird"]
    ev = Evaluator(mapping)
    # gt: cat, car, dog, dog ; pred: cat, cat (false positive on unmapped car), bird (miss), dog
    ev.add(ImageRef("0"), np.array([[0, 2, 1, 1]]), np.array([[0, 0, 2, 1]]))
    result = ev.result()
    assert result.scores.iou[0] == pytest.approx(0.5)  # I=1, gt=1, pred=2
    assert result.scores.iou[1] == pytest.approx(0.5)  # I=1, gt=2, pred=1
    assert math.isnan(result.scores.iou[2])  # car is not evaluated
    assert result.summary["aAcc"] == pytest.approx(2 / 3)  # car pixel is not in aAcc
    pixels = build_metrics(result, empty_unmatched(), {})["pixels"]
    assert pixels["unmapped_ground_truth"] == 1 and pixels["unmapped_prediction_on_evaluated"] == 1


def test_evaluator_state_does_not_grow_with_the_number_of_images():
    rng = np.random.default_rng(1)
    ev = Evaluator(identity_mapping(["a", "b", "c"]), worst_k=2)
    sizes = []
    for i in range(120):
        gt = rng.integers(0, 3, size=(16, 16))
        ev.add(ImageRef(str(i)), gt, rng.integers(0, 3, size=(16, 16)), rng.random(3))
        sizes.append((ev.confusion.confusion.nbytes, ev.presence.hist.nbytes,
                      len(ev.worst._heap)))
    assert sizes[10] == sizes[-1] == (4 * 4 * 8, sizes[0][1], 2)
    result = ev.result()
    assert result.num_images == 120 and result.confusion.sum() == 120 * 256
    assert result.presence_positives.tolist()[:3] == [120, 120, 120]


def test_audit_and_benchmark_readers_do_not_import_torch_or_ray():
    import subprocess
    import sys

    code = ("import sys, jobs.audit, pipeline.audit.benchmarks; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "[]"

"""metrics.json and report.md: the machine-readable result and its plain-text rendering.

``metrics.json`` keys are stable (version :data:`METRICS_VERSION`); ratios are percentages
(0..100, as in the paper's tables), ``null`` when undefined:

- ``mIoU``, ``aAcc``, ``mAcc``, ``presence_mAP``, ``num_images``, ``num_classes``
- ``per_class``: ``{name: {iou, acc, gt_pixels, pred_pixels, presence_ap, presence_positives,
  mapped_from}}`` for every evaluated ground-truth category
- ``unmatched``: counts and up to :data:`EXAMPLES` ids of each kind under ``examples`` (full
  lists in ``unmatched.tsv``): ``ground_truth`` (ground-truth images no labels row names),
  ``predictions`` (ok rows naming no ground-truth image), ``failed_predictions`` (rows with
  an error status), ``invalid_predictions`` (ok rows whose masks do not decode to a label
  map), ``duplicate_predictions`` (a second row for an already matched image),
  ``incomplete_shards`` (label files without a completion record, not read) and
  ``ground_truth_not_ok`` (error rows of Parquet ground truth)
- ``mapping``, ``pixels``, ``coco_segm``, ``worst_images``, ``sources``, ``conventions``
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .evaluator import EvaluationResult
from .metrics import nanmean_or_nan

METRICS_VERSION = 1
EXAMPLES = 20
CONVENTIONS = (
    "mmseg IoUMetric: ground-truth 255 ignored; intersection/union/gt areas summed over the "
    "dataset (int64); IoU NaN only when a class is neither in the ground truth nor predicted; "
    "mIoU/mAcc = nanmean over evaluated classes; aAcc = sum(intersection)/sum(gt pixels); "
    "presence AP = step-wise area under PR (sklearn average_precision_score), classes without "
    "positive images excluded from presence_mAP"
)


def pct(value: float | None) -> float | None:
    """Fraction -> percent rounded to 4 decimals; ``None`` for NaN/None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(100.0 * float(value), 4)


UNMATCHED_KINDS = ("ground_truth", "predictions", "failed_predictions", "invalid_predictions",
                   "duplicate_predictions", "incomplete_shards", "ground_truth_not_ok")


def empty_unmatched() -> dict:
    """The ``unmatched`` block of a run where every image was evaluated (benchmarks)."""
    return {**{kind: 0 for kind in UNMATCHED_KINDS},
            "examples": {kind: [] for kind in UNMATCHED_KINDS}}


def _per_class(result: EvaluationResult) -> dict[str, dict]:
    mapping, scores = result.mapping, result.scores
    out: dict[str, dict] = {}
    for g in mapping.mapped_gt:
        name = mapping.gt[g].name
        if name in out:
            name = f"{name} [{g}]"
        ap = None if result.presence_ap is None else pct(result.presence_ap[g])
        out[name] = {
            "iou": pct(scores.iou[g]), "acc": pct(scores.acc[g]),
            "gt_pixels": int(scores.gt_pixels[g]), "pred_pixels": int(scores.pred_pixels[g]),
            "presence_ap": ap, "presence_positives": int(result.presence_positives[g]),
            "mapped_from": mapping.sources_of(g),
        }
    return out


def _pixels(result: EvaluationResult) -> dict[str, int]:
    confusion, evaluated = result.confusion, result.mapping.mapped_gt
    return {
        "evaluated": int(confusion[evaluated].sum()),
        "ignored": int(result.ignored_pixels),
        "unmapped_ground_truth": int(confusion[-1].sum()),
        "unmapped_prediction_on_evaluated": int(confusion[evaluated, -1].sum()),
    }


def build_metrics(result: EvaluationResult, unmatched: Mapping, sources: Mapping,
                  fail_under: float | None = None) -> dict:
    """The ``metrics.json`` document (see module docstring)."""
    evaluated = result.mapping.mapped_gt
    presence_map = None
    if result.presence_ap is not None:
        presence_map = pct(nanmean_or_nan(result.presence_ap[evaluated]))
    coco = None if result.coco is None else {
        k: (None if math.isnan(v) else round(v, 4)) for k, v in result.coco.items()}
    return {
        "metrics_version": METRICS_VERSION,
        "mIoU": pct(result.summary["mIoU"]),
        "aAcc": pct(result.summary["aAcc"]),
        "mAcc": pct(result.summary["mAcc"]),
        "presence_mAP": presence_map,
        "num_images": result.num_images,
        "num_classes": len(evaluated),
        "per_class": _per_class(result),
        "unmatched": dict(unmatched),
        "mapping": result.mapping.to_dict(),
        "pixels": _pixels(result),
        "coco_segm": coco,
        "worst_images": [
            {"image_id": e.ref.image_id, "miou": pct(e.miou), "source_uri": e.ref.source_uri}
            for e in result.worst],
        "sources": dict(sources),
        "fail_under": fail_under,
        "conventions": CONVENTIONS,
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _summary_lines(metrics: Mapping) -> list[str]:
    un = metrics["unmatched"]
    lines = [
        "# Label quality audit", "",
        f"- Labels: `{metrics['sources'].get('labels')}`",
        f"- Ground truth: {metrics['sources'].get('ground_truth')}",
        f"- Images evaluated: {metrics['num_images']}; classes evaluated: "
        f"{metrics['num_classes']}",
        f"- Unmatched ground-truth images: {un.get('ground_truth', 0)}; unmatched predictions: "
        f"{un.get('predictions', 0)}; failed rows: {un.get('failed_predictions', 0)}; invalid "
        f"rows: {un.get('invalid_predictions', 0)}; duplicates: "
        f"{un.get('duplicate_predictions', 0)}",
    ]
    if metrics["sources"].get("random_weights") is not None:
        lines.append(f"- **Random weights** (seed {metrics['sources']['random_weights']}): "
                     "the labels are meaningless (smoke run)")
    lines += ["", "| metric | value |", "|---|---|"]
    for key in ("mIoU", "aAcc", "mAcc", "presence_mAP"):
        lines.append(f"| {key} | {_fmt(metrics[key])} |")
    for key, value in (metrics.get("coco_segm") or {}).items():
        lines.append(f"| COCO segm {key} | {_fmt(value)} |")
    if metrics.get("fail_under") is not None:
        lines.append(f"| fail-under bar (mIoU) | {metrics['fail_under']:.2f} |")
    return lines


def _class_lines(metrics: Mapping) -> list[str]:
    lines = ["", "## Per-class results", "",
             "| class | IoU | Acc | GT pixels | predicted pixels | presence AP | mapped from |",
             "|---|---|---|---|---|---|---|"]
    for name, row in metrics["per_class"].items():
        lines.append(f"| {name} | {_fmt(row['iou'])} | {_fmt(row['acc'])} | {row['gt_pixels']} "
                     f"| {row['pred_pixels']} | {_fmt(row['presence_ap'])} | "
                     f"{', '.join(row['mapped_from'])} |")
    return lines


def _detail_lines(metrics: Mapping) -> list[str]:
    mapping, pixels = metrics["mapping"], metrics["pixels"]
    lines = ["", "## Worst images", ""]
    lines += [f"- `{w['image_id']}`: mIoU {_fmt(w['miou'])}" for w in metrics["worst_images"]]
    lines += ["", "## Category mapping", "",
              f"- Unmapped vocabulary classes: {', '.join(mapping['unmapped_classes']) or 'none'}",
              "- Unmapped ground-truth categories: "
              f"{', '.join(mapping['unmapped_gt_categories']) or 'none'}",
              f"- Pixels: {pixels['evaluated']} evaluated, {pixels['ignored']} ignored, "
              f"{pixels['unmapped_ground_truth']} of unmapped categories",
              "", "## Conventions", "", metrics["conventions"], ""]
    return lines


def render_markdown(metrics: Mapping) -> str:
    """``report.md`` text."""
    return "\n".join(_summary_lines(metrics) + _class_lines(metrics) + _detail_lines(metrics))


def unmatched_tsv(lists: Mapping[str, list]) -> str:
    """``kind<TAB>image id<TAB>detail`` lines for every unmatched / failed / invalid image."""
    lines = ["kind\timage_id\tdetail"]
    for kind, items in lists.items():
        for item in items:
            image_id, detail = item if isinstance(item, tuple) else (item, "")
            lines.append(f"{kind}\t{image_id}\t{str(detail).replace(chr(9), ' ')}")
    return "\n".join(lines) + "\n"


def json_default(value: object) -> object:
    """``json.dumps`` hook for numpy scalars."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return None if math.isnan(value) else float(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")

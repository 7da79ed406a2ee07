"""Calibrated ignore thresholds: per-class confidence thresholds reaching a pixel precision.

Memory is fixed: for every vocabulary class ``k`` two histograms over the 256 confidence
levels of :mod:`schemas.confidence` count the pixels predicted as ``k`` whose ground truth
agrees (correct) or disagrees (wrong); pixels whose ground truth is ignored, or whose class
maps to no ground-truth category, are not judged. Keeping the pixels of level ``>= L``
gives, per class,

- precision(L) = correct(>= L) / (correct(>= L) + wrong(>= L))
- recall(L)    = correct(>= L) / ground-truth pixels of the class's category
- kept(L)      = predicted pixels kept / predicted pixels (judged ones)

The class's threshold is the lowest ``L / 255`` whose precision reaches the target; the
global one pools every class. ``thresholds.json``::

    {"target_precision": P, "levels": 256, "global": {...},
     "classes": {name: {"index", "threshold", "level", "reached", "precision", "recall",
                        "kept", "judged_pixels"}}, "provenance": {...}}

``level`` is the lowest kept uint8 confidence level (``threshold = level / 255``).

``threshold`` is null when the class was never judged (exports then use the global one) and
``reached`` false when no threshold reaches the target (exports then ignore the whole class).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from schemas.confidence import LEVELS

from .errors import AuditError
from .metrics import IGNORED


class CalibrationAccumulator:
    """Confidence histograms per predicted class, split by correct / wrong.

    Args:
        class_to_gt: ground-truth category index of every vocabulary class (None: unmapped).
        num_gt: number of ground-truth categories.
    """

    def __init__(self, class_to_gt: Sequence[int | None], num_gt: int) -> None:
        self.class_to_gt = np.asarray([-1 if g is None else g for g in class_to_gt])
        self.num_classes = len(self.class_to_gt)
        self.correct = np.zeros((self.num_classes, LEVELS), dtype=np.int64)
        self.wrong = np.zeros((self.num_classes, LEVELS), dtype=np.int64)
        self.gt_pixels = np.zeros(num_gt, dtype=np.int64)
        self.unjudged = 0
        self.without_confidence: list[str] = []

    def add(self, gt: np.ndarray, pred: np.ndarray, levels: np.ndarray) -> None:
        """Count one image.

        Args:
            gt: ``[H, W]`` ground-truth category indices (:data:`IGNORED` = ignore).
            pred: ``[H, W]`` vocabulary class indices.
            levels: ``[H, W]`` uint8 confidence levels of the predictions.
        """
        if not gt.shape == pred.shape == levels.shape:
            raise AuditError(f"calibration: ground truth {gt.shape}, prediction {pred.shape} "
                             f"and confidence {levels.shape} differ in size")
        valid = gt != IGNORED
        self.gt_pixels += np.bincount(gt[valid].ravel(), minlength=len(self.gt_pixels))[
            :len(self.gt_pixels)]
        mapped = self.class_to_gt[pred]
        judged = valid & (mapped >= 0)
        self.unjudged += int(valid.sum() - judged.sum())
        flat = pred[judged].astype(np.int64) * LEVELS + levels[judged].astype(np.int64)
        hit = (mapped[judged] == gt[judged])
        size = self.num_classes * LEVELS
        self.correct += np.bincount(flat[hit], minlength=size).reshape(self.num_classes, LEVELS)
        self.wrong += np.bincount(flat[~hit], minlength=size).reshape(self.num_classes, LEVELS)

    def curves(self, k: int | None = None) -> dict[str, np.ndarray]:
        """``precision``, ``recall``, ``kept`` per level ``[256]`` for class ``k`` (None: all).

        Precision is NaN where nothing is kept; recall NaN without ground-truth pixels.
        """
        correct = self.correct.sum(0) if k is None else self.correct[k]
        wrong = self.wrong.sum(0) if k is None else self.wrong[k]
        if k is None:
            gt_total = int(self.gt_pixels.sum())
        else:
            g = self.class_to_gt[k]
            gt_total = int(self.gt_pixels[g]) if g >= 0 else 0
        kept_correct = np.cumsum(correct[::-1])[::-1]
        kept = kept_correct + np.cumsum(wrong[::-1])[::-1]
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(kept > 0, kept_correct / np.maximum(kept, 1), np.nan)
            recall = (kept_correct / gt_total if gt_total else np.full(LEVELS, np.nan))
            share = kept / kept[0] if kept[0] else np.full(LEVELS, np.nan)
        return {"precision": precision, "recall": recall, "kept": share,
                "judged": int(kept[0])}


def lowest_level(precision: np.ndarray, target: float) -> int | None:
    """The lowest level whose precision reaches ``target`` (None when none does)."""
    reached = np.flatnonzero(np.nan_to_num(precision, nan=-1.0) >= target - 1e-12)
    return int(reached[0]) if reached.size else None


def _entry(curves: Mapping, target: float) -> dict:
    if curves["judged"] == 0:
        return {"threshold": None, "reached": None, "precision": None, "recall": None,
                "kept": None, "judged_pixels": 0}
    level = lowest_level(curves["precision"], target)
    if level is None:
        return {"threshold": None, "reached": False, "precision": None, "recall": 0.0,
                "kept": 0.0, "judged_pixels": curves["judged"]}

    def value(name: str) -> float | None:
        v = float(curves[name][level])
        return None if np.isnan(v) else round(v, 6)

    return {"threshold": level / (LEVELS - 1), "level": level, "reached": True,
            "precision": value("precision"), "recall": value("recall"), "kept": value("kept"),
            "judged_pixels": curves["judged"]}


def thresholds_document(acc: CalibrationAccumulator, class_names: Sequence[str],
                        target: float, provenance: Mapping | None = None) -> dict:
    """The ``thresholds.json`` document (see module docstring)."""
    classes = {}
    for k, name in enumerate(class_names):
        classes[name] = {"index": k, **_entry(acc.curves(k), target)}
    return {"target_precision": target, "levels": LEVELS, "global": _entry(acc.curves(), target),
            "classes": classes, "unjudged_pixels": acc.unjudged,
            "rows_without_confidence": len(acc.without_confidence),
            "rows_without_confidence_examples": acc.without_confidence[:20],
            "provenance": dict(provenance or {})}


# ---------------------------------------------------------------------- report files
MAX_CURVES = 8


def calibration_png(acc: CalibrationAccumulator, class_names: Sequence[str]) -> bytes:
    """Precision (solid) and recall (dashed) against the threshold: all classes pooled and
    the :data:`MAX_CURVES` classes with the most judged pixels."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(LEVELS) / (LEVELS - 1)
    judged = (acc.correct + acc.wrong).sum(1)
    shown = [k for k in np.argsort(-judged)[:MAX_CURVES] if judged[k] > 0]
    for k, name in [(None, "all classes")] + [(int(k), class_names[k]) for k in shown]:
        curves = acc.curves(k)
        line = ax.plot(x, curves["precision"], label=f"{name} precision",
                       linewidth=2.5 if k is None else 1.2)[0]
        ax.plot(x, curves["recall"], linestyle="--", color=line.get_color(), linewidth=1.0)
    ax.set_xlabel("confidence threshold")
    ax.set_ylabel("pixel precision (solid) / recall (dashed)")
    ax.set_ylim(0, 1.02)
    legend = ax.legend(fontsize=7, loc="lower left")
    for text in legend.get_texts():  # class names are drawn as they are, never as math text
        text.set_parse_math(False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def calibration_markdown(document: Mapping) -> str:
    """The report.md section of the calibration."""
    lines = ["", "## Calibrated ignore thresholds", "",
             f"Target pixel precision {document['target_precision']}; the lowest confidence "
             "threshold reaching it per class (thresholds.json, curves in calibration.png). "
             f"Rows without a stored confidence (not counted): "
             f"{document['rows_without_confidence']}.",
             "", "| class | threshold | precision | recall | kept | judged pixels |",
             "|---|---|---|---|---|---|"]
    for name, e in [("(global)", document["global"]), *document["classes"].items()]:
        threshold = ("never reached" if e["reached"] is False
                     else "global" if e["reached"] is None else _fmt(e["threshold"]))
        lines.append(f"| {name} | {threshold} | {_fmt(e['precision'])} | {_fmt(e['recall'])} "
                     f"| {_fmt(e['kept'])} | {e['judged_pixels']} |")
    return "\n".join(lines) + "\n"


def write_calibration(report_dir: str, acc: CalibrationAccumulator,
                      class_names: Sequence[str], target: float, provenance: Mapping,
                      storage_options: Mapping | None = None) -> list[str]:
    """Write ``thresholds.json`` and ``calibration.png``, and add the curves and the table
    to ``report.md`` and ``report.html`` (written before). Returns the new files' URIs."""
    import json
    from html import escape

    from schemas.io import open_uri

    from .html import data_uri

    document = thresholds_document(acc, class_names, target, provenance)
    png = calibration_png(acc, class_names)
    fs, root = open_uri(report_dir, storage_options)
    root = root.rstrip("/")
    section = calibration_markdown(document)
    with fs.open(f"{root}/thresholds.json", "wb") as f:
        f.write((json.dumps(document, indent=2) + "\n").encode())
    with fs.open(f"{root}/calibration.png", "wb") as f:
        f.write(png)
    with fs.open(f"{root}/report.md", "rb") as f:
        markdown = f.read().decode("utf-8")
    with fs.open(f"{root}/report.md", "wb") as f:
        f.write((markdown + section).encode("utf-8"))
    with fs.open(f"{root}/report.html", "rb") as f:
        html = f.read().decode("utf-8")
    block = ("<h2>Calibrated ignore thresholds</h2><img alt='precision and recall against the "
             f"confidence threshold' src='{data_uri(png)}'><pre>{escape(section)}</pre>")
    html = html.replace("<h2>Conventions</h2>", block + "<h2>Conventions</h2>", 1)
    with fs.open(f"{root}/report.html", "wb") as f:
        f.write(html.encode("utf-8"))
    base = report_dir.rstrip("/")
    return [f"{base}/thresholds.json", f"{base}/calibration.png"]

"""Writes a report directory: metrics.json, report.md, report.html, confusion and unmatched."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Mapping

import numpy as np

from schemas.io import open_uri

from . import plots
from .evaluator import EvaluationResult
from .html import render_html
from .report import json_default, render_markdown, unmatched_tsv
from .worst import ImageRef

ImageLoader = Callable[[ImageRef], "np.ndarray | None"]


def confusion_csv(result: EvaluationResult) -> str:
    """The full confusion matrix as CSV (first column: ground truth; last row/column OTHER)."""
    names = [c.name for c in result.mapping.gt] + ["OTHER"]
    buffer = io.StringIO()
    out = csv.writer(buffer, lineterminator="\n")
    out.writerow(["gt \\ prediction", *names])
    for name, row in zip(names, result.confusion.tolist(), strict=True):
        out.writerow([name, *row])
    return buffer.getvalue()


def _without_empty_other(confusion: np.ndarray, names: list[str]) -> tuple[np.ndarray, list]:
    """Drop the OTHER row and column from the heatmap when nothing fell into them."""
    if confusion[-1].any() or confusion[:, -1].any():
        return confusion, names
    return confusion[:-1, :-1], names[:-1]


def _figures(result: EvaluationResult, metrics: Mapping) -> dict[str, bytes | None]:
    names = [c.name for c in result.mapping.gt] + ["OTHER"]
    per_class = metrics["per_class"]
    figures: dict[str, bytes | None] = {
        "iou": plots.iou_bars(list(per_class), [r["iou"] for r in per_class.values()]),
        "confusion": plots.confusion_heatmap(*_without_empty_other(result.confusion, names)),
        "presence": None,
    }
    if result.presence is not None:
        figures["presence"] = plots.pr_curves(result.presence, names, result.mapping.mapped_gt)
    return figures


def _overlays(result: EvaluationResult, load_image: ImageLoader | None) -> list[tuple[dict, bytes]]:
    colors = plots.palette(result.mapping.num_gt)
    out = []
    for entry in result.worst:
        image = load_image(entry.ref) if load_image is not None else None
        info = {"image_id": entry.ref.image_id, "miou": round(100.0 * entry.miou, 4)}
        out.append((info, plots.overlay(entry, image, colors)))
    return out


def write_report(report_dir: str, result: EvaluationResult, metrics: Mapping,
                 unmatched_lists: Mapping[str, list], load_image: ImageLoader | None = None,
                 storage_options: Mapping | None = None) -> list[str]:
    """Write every report file under ``report_dir`` (any fsspec URI); returns their URIs."""
    legend = plots.legend_entries([c.name for c in result.mapping.gt] + ["OTHER", "ignored"],
                                  plots.palette(result.mapping.num_gt))
    html = render_html(metrics, _figures(result, metrics), _overlays(result, load_image),
                       [legend[g] for g in result.mapping.mapped_gt] + legend[-2:])
    files = {
        "metrics.json": json.dumps(metrics, indent=2, default=json_default) + "\n",
        "report.md": render_markdown(metrics),
        "report.html": html,
        "confusion_matrix.csv": confusion_csv(result),
        "unmatched.tsv": unmatched_tsv(unmatched_lists),
    }
    fs, root = open_uri(report_dir, storage_options)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    for name, text in files.items():
        with fs.open(f"{root}/{name}", "wb") as f:
            f.write(text.encode("utf-8"))
    return [f"{report_dir.rstrip('/')}/{name}" for name in files]

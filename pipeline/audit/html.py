"""``report.html``: one self-contained page (CSS inline, figures as base64 PNG data URIs)."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from html import escape

from .report import _fmt

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;
font-size:13px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}.swatch{display:inline-block;
width:10px;height:10px;margin:0 4px 0 10px;border:1px solid #888}.small{font-size:12px;color:#555}
"""


def data_uri(png: bytes) -> str:
    """A PNG as an ``<img src>`` data URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes | None, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="{data_uri(png)}">' if png else ""


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _summary(metrics: Mapping) -> str:
    un, src = metrics["unmatched"], metrics["sources"]
    rows = [(k, _fmt(metrics[k])) for k in ("mIoU", "aAcc", "mAcc", "presence_mAP")]
    rows += [(f"COCO segm {k}", _fmt(v)) for k, v in (metrics.get("coco_segm") or {}).items()]
    counts = [(k.replace("_", " "), un.get(k, 0)) for k in (
        "ground_truth", "predictions", "failed_predictions", "invalid_predictions",
        "duplicate_predictions", "incomplete_shards", "ground_truth_not_ok")]
    return (f"<p>Labels: <code>{escape(str(src.get('labels')))}</code><br>Ground truth: "
            f"{escape(str(src.get('ground_truth')))}<br>Images evaluated: "
            f"{metrics['num_images']}, classes evaluated: {metrics['num_classes']}</p>"
            + _random_weights(src)
            + _table(["metric", "value (%)"], rows)
            + "<h3>Unmatched and failed images</h3>" + _table(["kind", "count"], counts))


def _random_weights(sources: Mapping) -> str:
    """A warning paragraph when the labels were made with random weights (issue 10)."""
    seed = sources.get("random_weights")
    if seed is None:
        return ""
    return (f"<p><strong>Random weights</strong> (seed {escape(str(seed))}): the labels are "
            "meaningless (smoke run).</p>")


def _classes(metrics: Mapping) -> str:
    rows = [(name, _fmt(r["iou"]), _fmt(r["acc"]), r["gt_pixels"], r["pred_pixels"],
             _fmt(r["presence_ap"]), ", ".join(r["mapped_from"]))
            for name, r in metrics["per_class"].items()]
    return _table(["class", "IoU", "Acc", "GT pixels", "predicted pixels", "presence AP",
                   "mapped from"], rows)


def _legend(entries: Sequence[tuple[str, str]]) -> str:
    spans = "".join(f'<span class="swatch" style="background:{color}"></span>{escape(name)}'
                    for name, color in entries)
    return f'<p class="small">{spans}</p>'


def _worst(overlays: Sequence[tuple[Mapping, bytes]], legend: Sequence[tuple[str, str]]) -> str:
    if not overlays:
        return "<p>No image was ranked.</p>"
    parts = [_legend(legend)]
    for info, png in overlays:
        parts.append(f"<h4>{escape(str(info['image_id']))}: mIoU {_fmt(info['miou'])}</h4>")
        parts.append(_img(png, f"overlay {info['image_id']}"))
    return "".join(parts)


def render_html(metrics: Mapping, figures: Mapping[str, bytes | None],
                overlays: Sequence[tuple[Mapping, bytes]],
                legend: Sequence[tuple[str, str]]) -> str:
    """The whole report page.

    Args:
        metrics: the ``metrics.json`` document.
        figures: PNG bytes under ``"iou"``, ``"confusion"``, ``"presence"`` (may be ``None``).
        overlays: ``(worst_images entry, PNG)`` pairs, worst first.
        legend: ``(category name, colour)`` pairs of the overlays.
    """
    mapping = metrics["mapping"]
    sections = [
        "<h1>Label quality audit</h1>", _summary(metrics),
        "<h2>Per-class IoU</h2>", _img(figures.get("iou"), "per-class IoU"), _classes(metrics),
        "<h2>Confusion matrix</h2><p class='small'>Rows: ground truth; columns: prediction; "
        "each row divided by its ground-truth pixels. OTHER = unmapped.</p>",
        _img(figures.get("confusion"), "confusion matrix"),
        "<h2>Presence precision-recall</h2>",
        _img(figures.get("presence"), "presence PR curves") or "<p>No presence scores.</p>",
        "<h2>Worst images</h2>", _worst(overlays, legend),
        "<h2>Category mapping</h2>",
        "<p>Unmapped vocabulary classes: "
        f"{escape(', '.join(mapping['unmapped_classes']) or 'none')}"
        "<br>Unmapped ground-truth categories: "
        f"{escape(', '.join(mapping['unmapped_gt_categories']) or 'none')}</p>",
        f"<h2>Conventions</h2><p class='small'>{escape(metrics['conventions'])}</p>",
    ]
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Label quality audit"
            f"</title><style>{_STYLE}</style></head><body>{''.join(sections)}</body></html>\n")

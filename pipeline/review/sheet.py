"""A self-contained HTML contact sheet of the selected images: overlays as PNG data URIs."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from html import escape

import numpy as np

from pipeline.config import DEFAULT_MAX_IMAGE_PIXELS
from pipeline.decode import decode_image
from schemas.labels import Category
from schemas.masks import annotations_to_label_map

from .ranking import Ranked, mean_mask_score

THUMB_SIDE = 360
_STYLE = ("body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
          ".grid{display:flex;flex-wrap:wrap;gap:14px}figure{margin:0;width:380px}"
          "img{max-width:100%;border:1px solid #ccc}figcaption{font-size:12px;"
          "word-break:break-all}")


def overlay_png(row: Mapping, image: np.ndarray | None, categories: Sequence[Category],
                max_side: int = THUMB_SIDE) -> bytes:
    """PNG bytes of the row's label map over its photo (grey when the photo is missing).

    Args:
        row: an ``ok`` labels row.
        image: ``[H, W, 3]`` uint8 photo or ``None``.
        categories: the output's categories (class ``i`` is category id ``i + 1``).
        max_side: the longer side of the PNG is scaled down to at most this.
    """
    from cass_engine.overlay import render_overlay

    height, width = int(row["height"]), int(row["width"])
    labels = annotations_to_label_map(row.get("annotations") or [], height, width,
                                      [c.id for c in categories])
    if image is None or image.shape[:2] != (height, width):
        image = np.full((height, width, 3), 128, dtype=np.uint8)
    image, labels = _fit(image, labels, max_side)
    canvas = render_overlay(image, labels, [c.name for c in categories])
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def _fit(image: np.ndarray, labels: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour scaling by an integer factor so the longer side is near ``max_side``."""
    longest = max(labels.shape)
    if longest > max_side:
        step = -(-longest // max_side)
        return image[::step, ::step], labels[::step, ::step]
    factor = max(1, max_side // longest)
    return (np.repeat(np.repeat(image, factor, axis=0), factor, axis=1),
            np.repeat(np.repeat(labels, factor, axis=0), factor, axis=1))


def decode_photo(data: bytes | str | None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
                 ) -> np.ndarray | None:
    """Image bytes -> ``[H, W, 3]`` uint8 as the engine saw it (``None`` if not decodable).

    Decoded by the pipeline's decoder (:func:`pipeline.decode.decode_image`): only the allowed
    formats, EXIF orientation applied, at most ``max_pixels`` pixels.
    """
    if not isinstance(data, bytes):
        return None
    decoded = decode_image(data, max_pixels)
    return decoded.rgb if decoded.status == "ok" else None


def render_sheet(items: Sequence[Ranked], overlays: Sequence[bytes], by: str,
                 title: str, notes: Mapping[str, str] | None = None,
                 random_weights: int | None = None) -> str:
    """The contact sheet page.

    Args:
        items: the selected rows, in review order.
        overlays: one PNG per item.
        by: the ranking used.
        title: page heading (escaped).
        notes: optional per-image remark (e.g. why the photo is missing), escaped.
        random_weights: the seed when the labels came from random weights (said in the header).
    """
    notes = notes or {}
    warning = ("" if random_weights is None else
               f"<p><b>Random weights</b> (seed {escape(str(random_weights))}): these labels "
               "do not come from the real model.</p>")
    figures = []
    for rank, (item, png) in enumerate(zip(items, overlays, strict=True), start=1):
        src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        note = notes.get(item.image_id)
        caption = (f"#{rank} {escape(item.image_id)}<br>{escape(by)} {item.score:.3f}, "
                   f"mean mask score {mean_mask_score(item.row):.3f}"
                   + (f"<br><i>{escape(note)}</i>" if note else ""))
        figures.append(f'<figure><img alt="{escape(item.image_id)}" src="{src}">'
                       f"<figcaption>{caption}</figcaption></figure>")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{escape(title)}"
            f"</title><style>{_STYLE}</style></head><body><h1>{escape(title)}</h1>"
            f"<p>{len(items)} images, ranked by {escape(by)}.</p>"
            f"{warning}"
            f"<div class=\"grid\">{''.join(figures)}</div></body></html>\n")

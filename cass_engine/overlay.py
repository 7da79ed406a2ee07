"""Label-map overlay: the image blended with a coloured label map, plus a legend."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ALPHA = 0.5
LEGEND_ROW = 18


def palette(num_classes: int) -> np.ndarray:
    """Distinct, stable colours: ``[C, 3]`` uint8 (golden-angle hues)."""
    colours = [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65 + 0.35 * (i % 2), 0.95)
               for i in range(num_classes)]
    return (np.array(colours) * 255).astype(np.uint8).reshape(num_classes, 3)


def render_overlay(image: np.ndarray, labels: np.ndarray,
                   class_names: Sequence[str]) -> Image.Image:
    """Blend ``image`` [H, W, 3] uint8 with ``labels`` [H, W]; legend of present classes."""
    colours = palette(len(class_names))
    blended = (image * (1 - ALPHA) + colours[labels] * ALPHA).astype(np.uint8)
    present, counts = np.unique(labels, return_counts=True)
    order = present[np.argsort(-counts)]
    height = max(image.shape[0], LEGEND_ROW * len(order) + 8)
    canvas = Image.new("RGB", (image.shape[1] + 220, height), (255, 255, 255))
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    x = image.shape[1] + 8
    for row, cls in enumerate(order):
        y = 4 + row * LEGEND_ROW
        draw.rectangle([x, y, x + 14, y + 14], fill=tuple(int(c) for c in colours[cls]))
        draw.text((x + 20, y + 1), str(class_names[cls])[:30], fill=(0, 0, 0), font=font)
    return canvas


def save_overlay(image: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                 path: str) -> None:
    """Write ``render_overlay`` to a PNG file."""
    render_overlay(image, labels, class_names).save(path)

"""Label-map overlay: the image blended with a coloured label map, plus a legend.

The legend lists the classes present, largest pixel share first, each with its share of the
image in percent; its font, swatches and column width scale with the image (text about 2 % of
the image's longer side, at least 12 pixels), so that it stays readable when a large overlay
is viewed fitted to a screen. Colours: matplotlib's ``tab10`` for the first ten classes, then
a glasbey-style greedy maximin extension in CIELAB with the CIE94 colour difference (each new
colour as far as possible from all before it and clearly apart from its predecessor): class
``c`` has the same colour in every vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ALPHA = 0.5
#: Legend text height as a fraction of the image's longer side, and its minimum in pixels.
FONT_FRACTION, MIN_FONT = 0.02, 12
#: Rows shown at least (more when the image is tall enough); the rest is summed in one row.
MIN_ROWS = 12
#: Minimum CIE94 colour difference between consecutive extension colours.
ADJACENT_MIN_DELTA_E = 25.0
#: Lightness range of the extension colours (readable as swatches on white, and when blended).
LIGHTNESS_RANGE = (30.0, 88.0)
MAX_NAME_CHARS = 32
TEXT_RGB, BACKGROUND_RGB = (0, 0, 0), (255, 255, 255)


def palette(num_classes: int) -> np.ndarray:
    """Distinct, stable colours: ``[C, 3]`` uint8; ``palette(n)[:m] == palette(m)``."""
    return _palette(max(int(num_classes), 0)).copy()


@lru_cache(maxsize=8)
def _palette(num_classes: int) -> np.ndarray:
    import matplotlib

    seed = np.array(matplotlib.colormaps["tab10"].colors, dtype=np.float64)
    if num_classes <= len(seed):
        return _to_uint8(seed[:num_classes])
    levels = np.linspace(0.0, 1.0, 18)
    candidates = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    lab = srgb_to_lab(candidates)
    lightness_ok = (lab[:, 0] >= LIGHTNESS_RANGE[0]) & (lab[:, 0] <= LIGHTNESS_RANGE[1])
    candidates, lab = candidates[lightness_ok], lab[lightness_ok]
    chosen = [*seed]
    seed_lab = srgb_to_lab(seed)
    nearest = delta_e94(lab[:, None], seed_lab[None]).min(1)
    previous = seed_lab[-1]
    while len(chosen) < num_classes:
        apart = delta_e94(lab, previous) >= ADJACENT_MIN_DELTA_E
        score = np.where(apart, nearest, -1.0) if apart.any() else nearest
        pick = int(np.argmax(score))
        chosen.append(candidates[pick])
        previous = lab[pick]
        nearest = np.minimum(nearest, delta_e94(lab, previous))
    return _to_uint8(np.array(chosen))


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.round(rgb * 255).astype(np.uint8).reshape(-1, 3)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] ``[..., 3]`` -> CIELAB (D65 white) ``[..., 3]``."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722],
                       [0.0193, 0.1192, 0.9505]])
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    e = 6.0 / 29.0
    f = np.where(xyz > e ** 3, np.cbrt(xyz), xyz / (3 * e * e) + 4.0 / 29.0)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], axis=-1)


def delta_e94(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """CIE94 colour difference of CIELAB colours ``[..., 3]`` (graphic-arts weights; made
    symmetric with the geometric mean of the two chromas)."""
    chroma_a, chroma_b = np.hypot(a[..., 1], a[..., 2]), np.hypot(b[..., 1], b[..., 2])
    d_lightness, d_chroma = a[..., 0] - b[..., 0], chroma_a - chroma_b
    d_hue2 = np.maximum(((a[..., 1:] - b[..., 1:]) ** 2).sum(-1) - d_chroma ** 2, 0.0)
    chroma = np.sqrt(chroma_a * chroma_b)
    return np.sqrt(d_lightness ** 2 + (d_chroma / (1 + 0.045 * chroma)) ** 2
                   + d_hue2 / (1 + 0.015 * chroma) ** 2)


@dataclass(frozen=True)
class LegendLayout:
    """Sizes of the legend column, in pixels, for one image size."""

    font_size: int
    row_height: int
    swatch: int
    padding: int

    @classmethod
    def for_image(cls, height: int, width: int) -> LegendLayout:
        """The layout for an ``height`` x ``width`` image."""
        font = max(MIN_FONT, round(FONT_FRACTION * max(height, width)))
        return cls(font, round(1.5 * font), font, max(4, round(0.6 * font)))


@dataclass(frozen=True)
class LegendEntry:
    """One legend row: a class (None for the summed remainder), its name and pixel share."""

    class_index: int | None
    name: str
    share: float  # percent of the image's pixels

    @property
    def share_text(self) -> str:
        return "<0.1 %" if round(self.share, 1) == 0 else f"{self.share:.1f} %"


def legend_entries(labels: np.ndarray, class_names: Sequence[str],
                   max_rows: int | None = None) -> list[LegendEntry]:
    """The classes present in ``labels`` [H, W], largest share first (ties: class order).

    With more classes than ``max_rows``, the last row sums the smallest ones.
    """
    present, counts = np.unique(labels, return_counts=True)
    order = np.lexsort((present, -counts))
    total = float(labels.size)
    entries = [LegendEntry(int(present[i]), _short(str(class_names[present[i]])),
                           100.0 * counts[i] / total) for i in order]
    if max_rows is not None and len(entries) > max_rows:
        kept, rest = entries[:max_rows - 1], entries[max_rows - 1:]
        entries = kept + [LegendEntry(None, f"{len(rest)} more classes",
                                      sum(e.share for e in rest))]
    return entries


def _short(name: str) -> str:
    return name if len(name) <= MAX_NAME_CHARS else name[:MAX_NAME_CHARS - 3] + "..."


def render_overlay(image: np.ndarray, labels: np.ndarray,
                   class_names: Sequence[str]) -> Image.Image:
    """Blend ``image`` [H, W, 3] uint8 with ``labels`` [H, W]; legend of present classes.

    Returns:
        An RGB image ``[max(H, legend height), W + legend width]``: the overlay at the
        top left, the legend column on its right.
    """
    colours = palette(len(class_names))
    blended = (image * (1 - ALPHA) + colours[labels] * ALPHA).astype(np.uint8)
    height, width = labels.shape
    layout = LegendLayout.for_image(height, width)
    fitting = (height - 2 * layout.padding) // layout.row_height
    entries = legend_entries(labels, class_names, max(MIN_ROWS, fitting))
    font = ImageFont.load_default(size=layout.font_size)
    name_w = max(font.getlength(e.name) for e in entries)
    share_w = max(font.getlength(e.share_text) for e in entries)
    pad = layout.padding
    column = round(pad + layout.swatch + pad + name_w + 2 * pad + share_w + pad)
    rows_h = 2 * pad + layout.row_height * len(entries)
    canvas = Image.new("RGB", (width + column, max(height, rows_h)), BACKGROUND_RGB)
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x = width + pad
    for row, entry in enumerate(entries):
        top = pad + row * layout.row_height
        mid = top + layout.row_height / 2
        if entry.class_index is not None:
            fill = tuple(int(c) for c in colours[entry.class_index])
            draw.rectangle([x, mid - layout.swatch / 2, x + layout.swatch,
                            mid + layout.swatch / 2], fill=fill, outline=TEXT_RGB)
        draw.text((x + layout.swatch + pad, mid), entry.name, fill=TEXT_RGB, font=font,
                  anchor="lm")
        draw.text((width + column - pad, mid), entry.share_text, fill=TEXT_RGB, font=font,
                  anchor="rm")
    return canvas


def save_overlay(image: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                 path: str) -> None:
    """Write ``render_overlay`` to a PNG file."""
    render_overlay(image, labels, class_names).save(path)

"""Report figures as PNG bytes (matplotlib's Agg canvas, no pyplot global state).

Text from the data (class names, image ids) is drawn literally: math-text parsing is off
for every such label, so ``$`` and backslashes are plain characters (a name such as
``cost $5 or $6`` is neither garbled nor a parse error).
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from cass_engine.overlay import palette as engine_palette

from .presence import PresenceAccumulator
from .worst import WorstEntry

OTHER_RGB = (128, 128, 128)
IGNORED_RGB = (0, 0, 0)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()


def _literal(texts: Iterable[Text]) -> None:
    """Draw these texts as they are (no math-text parsing of ``$...$``)."""
    for text in texts:
        text.set_parse_math(False)


def palette(num_gt: int) -> np.ndarray:
    """``[G + 2, 3]`` uint8 colours: categories (the engine overlay's palette, in which
    neighbouring classes are easy to tell apart), then OTHER (grey), then ignored (black)."""
    colors = engine_palette(num_gt)[:num_gt].astype(np.uint8)
    return np.concatenate([colors.reshape(-1, 3), [OTHER_RGB, IGNORED_RGB]]).astype(np.uint8)


def colorize(eval_map: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """``[H, W]`` evaluation indices (-1 ignored) -> ``[H, W, 3]`` uint8."""
    return colors[np.where(eval_map < 0, len(colors) - 1, eval_map)]


def iou_bars(names: list[str], iou_percent: list[float | None]) -> bytes:
    """Horizontal bars of per-class IoU (classes without an IoU drawn empty)."""
    values = [0.0 if v is None else v for v in iou_percent]
    fig = Figure(figsize=(7, max(2.0, 0.18 * len(names) + 0.8)))
    ax = fig.add_subplot()
    ax.barh(range(len(names)), values, color="#4c78a8")
    ax.set_yticks(range(len(names)), names, fontsize=6 if len(names) > 40 else 8)
    _literal(ax.get_yticklabels())
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def confusion_heatmap(confusion: np.ndarray, names: list[str], max_classes: int = 40) -> bytes:
    """Row-normalised confusion (share of each ground-truth class's pixels per prediction).

    With more than ``max_classes`` rows, the classes with most ground-truth pixels are shown.
    """
    rows = confusion.sum(axis=1)
    shown = sorted(np.argsort(-rows, kind="stable")[:max_classes].tolist())
    sub = confusion[np.ix_(shown, shown)].astype(np.float64)
    norm = sub / np.maximum(rows[shown][:, None], 1)
    size = max(3.0, 0.2 * len(shown) + 1.5)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    image = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    labels = [names[i] for i in shown]
    fontsize = 5 if len(shown) > 25 else 8
    ax.set_xticks(range(len(shown)), labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(len(shown)), labels, fontsize=fontsize)
    _literal([*ax.get_xticklabels(), *ax.get_yticklabels()])
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _png(fig)


def pr_curves(presence: PresenceAccumulator, names: list[str], categories: list[int],
              max_curves: int = 12) -> bytes:
    """Presence precision-recall curves of the categories with most positive images."""
    positives = presence.num_positives()
    chosen = sorted(categories, key=lambda g: -int(positives[g]))[:max_curves]
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    for g in chosen:
        precision, recall = presence.pr_curve(g)
        if recall.size:
            ax.step(np.concatenate([[0], recall]), np.concatenate([[precision[0]], precision]),
                    where="post", label=names[g], linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    if chosen:
        _literal(ax.legend(fontsize=7, loc="lower left").get_texts())
    return _png(fig)


def overlay(entry: WorstEntry, image: np.ndarray | None, colors: np.ndarray) -> bytes:
    """Image | ground truth | prediction side by side (image omitted when unavailable)."""
    gt_rgb = colorize(entry.gt_eval, colors)
    panels = [("ground truth", gt_rgb), ("prediction", colorize(entry.pred_eval, colors))]
    if image is not None:
        panels.insert(0, ("image", _fit(image, gt_rgb.shape[:2])))
    fig = Figure(figsize=(3.2 * len(panels), 3.2 * gt_rgb.shape[0] / gt_rgb.shape[1] + 0.5))
    for i, (title, pixels) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(pixels)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    return _png(fig)


def _fit(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an RGB image to ``hw`` (cheap, for thumbnails)."""
    rows = np.minimum((np.arange(hw[0]) * image.shape[0] / hw[0]).astype(int), image.shape[0] - 1)
    cols = np.minimum((np.arange(hw[1]) * image.shape[1] / hw[1]).astype(int), image.shape[1] - 1)
    return image[rows][:, cols]


def legend_entries(names: list[str], colors: np.ndarray) -> list[tuple[str, str]]:
    """``(name, "#rrggbb")`` per category, for HTML legends."""
    return [(name, "#" + "".join(f"{int(v):02x}" for v in colors[i]))
            for i, name in enumerate(names)]

"""The overlay: background display names, a legend scaled to the image with pixel shares, and a
palette whose neighbouring colours are clearly apart."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from skimage.color import deltaE_ciede2000, rgb2lab

from cass_engine.overlay import LegendLayout, legend_entries, palette, render_overlay
from cass_engine.vocabulary import (
    VocabularyError,
    bundled_vocabulary,
    load_vocabulary,
    parse_vocabulary,
)

OFFICIAL = Path("/work/shared/presets")
NAMES = ["background", "cat", "dog", "a rather long class name for the legend", "tree"]


def _labels(height: int, width: int) -> np.ndarray:
    """Five classes in bands of 40 %, 30 %, 20 %, 7 % and 3 % of the rows."""
    labels = np.zeros((height, width), dtype=np.int64)
    edges = np.round(np.cumsum([0.4, 0.3, 0.2, 0.07]) * height).astype(int)
    for cls, start in enumerate(edges, start=1):
        labels[start:] = cls
    return labels


def _image(height: int, width: int) -> np.ndarray:
    return np.full((height, width, 3), 128, dtype=np.uint8)


@pytest.mark.parametrize("preset", ["voc21.txt", "coco_object.txt"])
def test_background_line_has_a_display_name_and_the_same_queries(preset):
    bundled = bundled_vocabulary(preset)
    assert bundled.class_names[0] == "background"
    assert bundled.classes[0][:2] == ("sky", "wall") and len(bundled.classes[0]) == 26
    assert "background" not in bundled.query_words
    if OFFICIAL.is_dir():  # the official file (no display name): same queries, same hash
        official = load_vocabulary(OFFICIAL / preset)
        assert official.class_names[0] == "sky"
        assert bundled.classes == official.classes
        assert bundled.content_hash() == official.content_hash()


def test_display_name_syntax():
    vocab = parse_vocabulary("[background] sky, wall\ncat\n[dog]  dog, puppy\n")
    assert vocab.class_names == ["background", "cat", "dog"]
    assert vocab.query_words == ["sky", "wall", "cat", "dog", "puppy"]
    assert vocab.query_to_class == [0, 0, 1, 2, 2]
    assert vocab.content_hash() == parse_vocabulary("sky, wall\ncat\ndog, puppy\n").content_hash()
    assert parse_vocabulary("cat\ndog\n").display_names == ()
    for bad in ("[background sky, wall\n", "[] sky\n", "[background]\n", "[background]   \n"):
        with pytest.raises(VocabularyError, match="display name"):
            parse_vocabulary(bad)


def test_legend_shows_the_display_name():
    vocab = bundled_vocabulary("voc21.txt")
    labels = np.zeros((40, 60), dtype=np.int64)
    labels[:, 45:] = 15  # person
    entries = legend_entries(labels, vocab.class_names)
    assert [(e.name, e.share_text) for e in entries] == [("background", "75.0 %"),
                                                         ("person", "25.0 %")]


def test_shares_sorted_and_summing_to_100():
    labels = _labels(200, 100)
    entries = legend_entries(labels, NAMES)
    assert [e.class_index for e in entries] == [0, 1, 2, 3, 4]
    assert [e.share for e in entries] == sorted((e.share for e in entries), reverse=True)
    printed = [float(re.fullmatch(r"(\d+\.\d) %", e.share_text).group(1)) for e in entries]
    assert printed == [40.0, 30.0, 20.0, 7.0, 3.0]
    assert abs(sum(printed) - 100.0) < 0.1 * len(entries)
    # a tiny class is shown as present, never as 0.0 %
    labels[0, 0] = 2
    tiny = legend_entries(labels[:, :1].repeat(2000, axis=1)[:1], NAMES)
    assert all(e.share_text != "0.0 %" for e in tiny)


def test_rows_beyond_the_limit_are_summed_in_one_row():
    labels = np.arange(40, dtype=np.int64).repeat(25).reshape(20, 50)
    entries = legend_entries(labels, [f"class {i}" for i in range(40)], max_rows=12)
    assert len(entries) == 12 and entries[-1].class_index is None
    assert entries[-1].name == "29 more classes"
    assert sum(e.share for e in entries) == pytest.approx(100.0)


def test_legend_scales_with_the_image():
    small, large = LegendLayout.for_image(300, 400), LegendLayout.for_image(3000, 4000)
    assert small.font_size >= 12
    assert large.font_size >= 6 * small.font_size  # 12 px (the minimum) -> 80 px
    assert large.row_height > small.row_height and large.swatch > small.swatch
    widths, ink = [], []
    for height, width in ((300, 400), (3000, 4000)):
        canvas = np.asarray(render_overlay(_image(height, width), _labels(height, width), NAMES))
        assert canvas.shape[0] == height
        column = canvas[:, width:]
        widths.append(column.shape[1])
        dark_rows = np.flatnonzero((column.max(-1) < 60).any(1))  # text and swatch outlines
        first_row_end = dark_rows[np.flatnonzero(np.diff(dark_rows) > 1)[0]]
        ink.append(first_row_end - dark_rows[0] + 1)  # height of the first legend row's ink
    assert widths[1] > 5 * widths[0]
    assert ink[1] > 5 * ink[0]  # text height follows the font size


def test_legend_column_fits_its_text():
    canvas = render_overlay(_image(120, 160), _labels(120, 160), NAMES)
    column = np.asarray(canvas)[:, 160:]
    # nothing is drawn in the column's right padding: the share text fits
    pad = LegendLayout.for_image(120, 160).padding
    assert (column[:, -pad + 1:] == 255).all()
    assert (column[:, :pad - 1] == 255).all()


def test_tall_legend_extends_the_canvas():
    labels = np.arange(30, dtype=np.int64).repeat(4).reshape(10, 12)
    canvas = render_overlay(_image(10, 12), labels, [f"c{i}" for i in range(30)])
    layout = LegendLayout.for_image(10, 12)
    assert canvas.size[1] >= 12 * layout.row_height  # MIN_ROWS rows, the rest summed


def test_palette_is_stable_and_neighbours_are_clearly_apart():
    colours = palette(256)
    assert colours.shape == (256, 3) and colours.dtype == np.uint8
    assert np.array_equal(palette(21), colours[:21])
    assert len({tuple(c) for c in colours}) == 256
    lab = rgb2lab(colours[None].astype(np.float64) / 255.0)[0]
    # CIEDE2000 (about 2 is a just-noticeable difference): consecutive classes clearly apart
    assert deltaE_ciede2000(lab[:-1], lab[1:]).min() > 20.0
    # and every pair of a vocabulary's colours distinguishable (VOC21, COCO-Object, COCO-Stuff)
    for count, least in ((21, 15.0), (81, 6.5), (171, 6.5)):  # measured 16.2, 7.1, 7.1
        first, second = np.triu_indices(count, 1)
        assert deltaE_ciede2000(lab[first], lab[second]).min() > least, count

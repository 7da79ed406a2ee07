"""Which labels to review first: per-image scores and a deterministic top-K selection.

Scores use what every output row has (mask scores, areas, presence); each lies in ``[0, 1]``,
higher = review sooner:

- ``uncertainty``: for a row with a confidence map (the ``confidence`` column, schema 1.1,
  :mod:`schemas.confidence`), the share of its pixels whose confidence (the probability of
  the pixel's label) is below :data:`LOW_CONFIDENCE` = 0.5, i.e. whose quantised level is
  below ``level_of(0.5)``; a map that cannot be decoded scores 1 (review it). For a row
  without one, ``1 - sum_c area_c * score_c / (H * W)``, one minus the area-weighted mean mask
  score: a mask's score is the mean probability of its class over its pixels, so this is one
  minus the mean winning-class probability over the image's pixels.
- ``disagreement``: the total-variation distance between the image-level presence scores
  (normalised to sum to 1) and the classes' pixel fractions: how differently the global
  classifier and the pixel decision read what the image contains (a class painted over much
  of the image that presence calls absent, or a confidently present class with no pixels).
- ``random``: a uniform draw from the seed and the image id.

Ties break by a hash of the seed and the image id, so the same output, arguments and seed pick
the same images in the same order however the rows are stored or read.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

RANKINGS = ("uncertainty", "disagreement", "random")
#: Label-table columns the scores read (add a confidence column here with its score).
ROW_COLUMNS = ["image_id", "shard_id", "source_uri", "key", "width", "height", "status",
               "annotations", "presence", "confidence"]
#: Pixels below this confidence count as doubtful in :func:`uncertainty`.
LOW_CONFIDENCE = 0.5


@dataclass(frozen=True, order=True)
class Ranked:
    """A row with its score; orders so that the image to review first is the smallest.

    Attributes:
        sort_key: ``(-score, tie-break)``.
        score: the ranking score in ``[0, 1]``.
        image_id: the row's image id.
        row: the labels row (not compared).
    """

    sort_key: tuple[float, int]
    score: float = field(compare=False)
    image_id: str = field(compare=False)
    row: dict = field(compare=False, repr=False)


def seeded_hash(seed: int, image_id: str) -> int:
    """A 64-bit integer from the seed and the image id (stable across runs and machines)."""
    digest = hashlib.sha256(f"{seed}\0{image_id}".encode("utf-8", "replace")).digest()
    return int.from_bytes(digest[:8], "big")


def pixel_fractions(row: Mapping, num_classes: int) -> np.ndarray:
    """``[C]`` share of the image's pixels in each class (category id ``c + 1`` is class ``c``)."""
    out = np.zeros(num_classes, dtype=np.float64)
    total = float(row["width"]) * float(row["height"])
    for ann in row.get("annotations") or []:
        index = int(ann["category_id"]) - 1
        if 0 <= index < num_classes:
            out[index] += float(ann["area"]) / total
    return out


def mean_mask_score(row: Mapping) -> float:
    """Area-weighted mean of the annotations' scores (the image's mean pixel confidence)."""
    total = float(row["width"]) * float(row["height"])
    weighted = sum(float(a["area"]) * float(a["score"]) for a in row.get("annotations") or [])
    return min(1.0, max(0.0, weighted / total))


def uncertainty(row: Mapping, num_classes: int) -> float:
    """Share of pixels below :data:`LOW_CONFIDENCE` when the row has a confidence map, else one
    minus the area-weighted mean mask score (see the module docstring)."""
    confidence = row.get("confidence")
    if not confidence:
        return 1.0 - mean_mask_score(row)
    from schemas.confidence import decode_levels, level_of

    try:
        levels = decode_levels(bytes(confidence), int(row["height"]), int(row["width"]))
    except Exception:  # noqa: BLE001 - an unreadable map is worth a look, not a crash
        return 1.0
    return float(np.mean(levels < level_of(LOW_CONFIDENCE)))


def disagreement(row: Mapping, num_classes: int) -> float:
    """Total-variation distance between normalised presence and pixel fractions."""
    presence = np.clip(np.asarray(row.get("presence") or [], dtype=np.float64), 0.0, None)
    fractions = pixel_fractions(row, num_classes)
    if presence.size != num_classes or presence.sum() <= 0:
        return 1.0
    return float(0.5 * np.abs(presence / presence.sum() - fractions).sum())


def presence_entropy(row: Mapping) -> float:
    """Normalised entropy of the presence scores in ``[0, 1]`` (shown in reports, not ranked)."""
    p = np.clip(np.asarray(row.get("presence") or [], dtype=np.float64), 0.0, None)
    if p.size < 2 or p.sum() <= 0:
        return 0.0
    p = p / p.sum()
    nonzero = p[p > 0]
    return float(-(nonzero * np.log(nonzero)).sum() / np.log(p.size))


def scorer(by: str, seed: int) -> Callable[[Mapping, int], float]:
    """The score function of a ranking (``RANKINGS``)."""
    if by == "uncertainty":
        return uncertainty
    if by == "disagreement":
        return disagreement
    if by == "random":
        return lambda row, _: seeded_hash(seed + 1, str(row["image_id"])) / float(1 << 64)
    raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, got {by!r}")


def top_k(rows: Iterable[dict], k: int, by: str, num_classes: int, seed: int = 0,
          exclude: set[str] | frozenset[str] = frozenset()) -> list[Ranked]:
    """The ``k`` ok rows to review first, in order (memory: ``k`` rows).

    Args:
        rows: labels rows; rows that are not ``ok`` or whose id is in ``exclude`` are skipped.
        k: how many to pick.
        by: one of :data:`RANKINGS`.
        num_classes: the output's number of categories.
        seed: tie-break and ``random`` seed.
        exclude: image ids already sent for review.
    """
    score_of = scorer(by, seed)
    heap: list[tuple[tuple[float, int], int, Ranked]] = []  # max-heap on the sort key
    for row in rows:
        image_id = str(row.get("image_id"))
        if row.get("status") != "ok" or image_id in exclude:
            continue
        score = float(score_of(row, num_classes))
        key = (-round(score, 12), seeded_hash(seed, image_id))
        item = Ranked(key, score, image_id, row)
        neg = (-key[0], -key[1])
        if len(heap) < k:
            heapq.heappush(heap, (neg, 0, item))
        elif neg > heap[0][0]:
            heapq.heapreplace(heap, (neg, 0, item))
    return sorted(entry[2] for entry in heap)

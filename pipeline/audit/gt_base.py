"""What every ground-truth reader provides: categories, image keys, matching, label maps."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from .categories import GtCategory
from .sources import AliasIndex


@dataclass(frozen=True)
class GtImage:
    """One ground-truth image.

    Attributes:
        key: canonical key of the image within its ground truth.
        label_map: ``[H, W]`` int64 category indices (positions in ``categories``);
            ``-1`` (:data:`pipeline.audit.metrics.IGNORED`) marks ignored pixels.
        image_uri: URI of the photo, when the ground truth knows it.
    """

    key: str
    label_map: np.ndarray = field(repr=False)
    image_uri: str | None = None


class GroundTruth(ABC):
    """A ground-truth source: a category list and label maps addressable by image key.

    Attributes:
        categories: categories in label-value order.
        description: one line for reports (format and location).
        index: image keys and their aliases (ids, file names, stems).
    """

    categories: list[GtCategory]
    description: str

    def __init__(self) -> None:
        self.index = AliasIndex()

    def keys(self) -> list[str]:
        """Canonical keys of every image, in source order."""
        return self.index.keys

    def match(self, candidates: list[str]) -> str | None:
        """The image one of ``candidates`` names (see :class:`AliasIndex`), or ``None``."""
        return self.index.match(candidates)

    @abstractmethod
    def load(self, key: str) -> GtImage:
        """Decode the label map of an image (raises ``AuditError`` on bad data)."""

"""CASS: training-free open-vocabulary semantic segmentation on CLIP ViT-B/16 + DINO ViT-B/8.

Typical use::

    from cass_engine import CassConfig, build_segmenter
    seg = build_segmenter(CassConfig.from_preset("coco_stuff"), device="cuda")
    seg.set_vocabulary()                     # once: text embeddings and query groups
    results = seg.segment([image_a, image_b])  # any sizes, uint8 RGB
    results[0].labels, results[0].probs, results[0].presence

Pure inference library: no Ray, no storage, no file formats beyond weights and vocabularies.
The public names below are imported on first use, so that a process that only needs the
configuration or the vocabulary parser (a job's driver, say) never loads torch, open_clip or
timm: ``from cass_engine.config import CassConfig`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CassConfig": "config", "DEFAULT_PRESET": "config", "PRESETS": "config",
    "ImageInputError": "images", "load_image": "images",
    "CassSegmenter": "segmenter", "SegmentationResult": "segmenter",
    "build_segmenter": "segmenter",
    "TextEmbeddings": "text",
    "Vocabulary": "vocabulary", "VocabularyError": "vocabulary",
    "load_vocabulary": "vocabulary", "parse_vocabulary": "vocabulary",
}

__all__ = [
    "CassConfig", "CassSegmenter", "DEFAULT_PRESET", "ImageInputError", "PRESETS",
    "SegmentationResult", "TextEmbeddings", "Vocabulary", "VocabularyError", "build_segmenter",
    "load_image", "load_vocabulary", "parse_vocabulary", "__version__",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .config import DEFAULT_PRESET, PRESETS, CassConfig
    from .images import ImageInputError, load_image
    from .segmenter import CassSegmenter, SegmentationResult, build_segmenter
    from .text import TextEmbeddings
    from .vocabulary import Vocabulary, VocabularyError, load_vocabulary, parse_vocabulary


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cass_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

"""CASS: training-free open-vocabulary semantic segmentation on CLIP ViT-B/16 + DINO ViT-B/8.

Typical use::

    from cass_engine import CassConfig, build_segmenter
    seg = build_segmenter(CassConfig.from_preset("coco_stuff"), device="cuda")
    seg.set_vocabulary()                     # once: text embeddings and query groups
    results = seg.segment([image_a, image_b])  # any sizes, uint8 RGB
    results[0].labels, results[0].probs, results[0].presence

Pure inference library: no Ray, no storage, no file formats beyond weights and vocabularies.
"""

from .config import DEFAULT_PRESET, PRESETS, CassConfig
from .images import ImageInputError, load_image
from .segmenter import CassSegmenter, SegmentationResult, build_segmenter
from .text import TextEmbeddings
from .vocabulary import Vocabulary, VocabularyError, load_vocabulary, parse_vocabulary

__version__ = "0.1.0"

__all__ = [
    "CassConfig", "CassSegmenter", "DEFAULT_PRESET", "ImageInputError", "PRESETS",
    "SegmentationResult", "TextEmbeddings", "Vocabulary", "VocabularyError", "build_segmenter",
    "load_image", "load_vocabulary", "parse_vocabulary", "__version__",
]

"""Engine results and decode failures -> validated label rows (see :mod:`schemas.labels`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from schemas import error_row, label_map_to_annotations, make_row
from schemas.confidence import encode_confidence

from .decode import DecodedImage
from .readers import RawImage


def result_to_row(shard_id: str, item: RawImage, decoded: DecodedImage, result: Any,
                  num_classes: int, confidence: bool = False) -> dict:
    """An ``ok`` row from one engine result.

    Args:
        shard_id: the shard's id.
        item: where the image came from (key, source URI).
        decoded: the decoded image (its size must match the label map).
        result: engine output with ``labels`` ``[H, W]`` int64, ``mask_scores`` ``[C]`` and
            ``presence`` ``[C]`` float32 (torch tensors or arrays).
        num_classes: C.
        confidence: store ``result.confidence`` ``[H, W]`` (see :mod:`schemas.confidence`).

    Raises:
        ValueError: the result does not match the image or the vocabulary.
    """
    labels = to_numpy(result.labels)
    if labels.shape != (decoded.height, decoded.width):
        raise ValueError(f"label map {labels.shape} != image {(decoded.height, decoded.width)}")
    scores = np.clip(to_numpy(result.mask_scores).astype(np.float64), 0.0, 1.0)
    presence = np.clip(to_numpy(result.presence).astype(np.float64), 0.0, 1.0)
    annotations = label_map_to_annotations(labels, scores)
    return make_row(shard_id=shard_id, source_uri=item.source_uri, key=item.key,
                    width=decoded.width, height=decoded.height, annotations=annotations,
                    presence=presence.tolist(), num_categories=num_classes,
                    confidence=_confidence(result, labels.shape) if confidence else None,
                    image_id=item.image_id)


def _confidence(result: Any, shape: tuple[int, ...]) -> bytes:
    """The encoded confidence map of a result (``ValueError`` when it has none)."""
    value = getattr(result, "confidence", None)
    if value is None:
        raise ValueError("the engine returned no confidence map (--confidence)")
    value = to_numpy(value)
    if value.shape != shape:
        raise ValueError(f"confidence map {value.shape} != label map {shape}")
    return encode_confidence(value)


def failure_row(shard_id: str, item: RawImage, decoded: DecodedImage | None,
                status: str, message: str) -> dict:
    """An error row for an image that could not be read, decoded or labelled."""
    width = decoded.width if decoded is not None else None
    height = decoded.height if decoded is not None else None
    return error_row(shard_id=shard_id, source_uri=item.source_uri, key=item.key,
                     status=status, error=message or status, width=width, height=height,
                     image_id=item.image_id)


def encode_result(shard_id: str, item: RawImage, decoded: DecodedImage, result: Any,
                  num_classes: int, confidence: bool = False) -> dict:
    """The row of one engine result: :func:`result_to_row`, or an ``engine_error`` row when
    the result is an exception of an image that failed alone or does not fit its image."""
    if isinstance(result, Exception):
        return failure_row(shard_id, item, decoded, "engine_error",
                           f"{type(result).__name__}: {result}")
    try:
        return result_to_row(shard_id, item, decoded, result, num_classes, confidence)
    except ValueError as exc:
        return failure_row(shard_id, item, decoded, "engine_error", str(exc))


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (on any device) or array-like as a numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)

"""Per-pixel confidence maps <-> compact bytes (the ``confidence`` column, schema 1.1).

Encoding (chosen by measurement, see ``bench/confidence_encoding.py`` and README "Output"):
the confidence ``[H, W]`` in [0, 1] (the probability of each pixel's label) is quantised to
uint8 as ``round(255 * c)`` and stored as a single-channel 8-bit PNG (mode ``L``) of the
image's full size, so the reconstruction error is at most ``1/510`` (half a quantisation
step). A PNG smaller than the image (``scale > 1`` when encoding; readers accept it) is
upsampled with Pillow's bilinear filter on the float map.

Bins: level ``q`` (0..255) stands for confidences in ``[(q - 0.5) / 255, (q + 0.5) / 255)``;
calibration histograms (:mod:`pipeline.audit.calibration`) count pixels by level, so a
threshold ``t`` keeps exactly the pixels whose level is ``>= level_of(t)``.

Torch-free: numpy and Pillow only.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

LEVELS = 256
#: Largest error of a full-size round trip: half a quantisation step.
MAX_QUANTISATION_ERROR = 0.5 / (LEVELS - 1)


def quantize(confidence: np.ndarray) -> np.ndarray:
    """``[H, W]`` float in [0, 1] -> ``[H, W]`` uint8 levels ``round(255 * c)`` (clipped)."""
    values = np.nan_to_num(np.asarray(confidence, dtype=np.float32), nan=0.0)
    return np.rint(np.clip(values, 0.0, 1.0) * (LEVELS - 1)).astype(np.uint8)


def dequantize(levels: np.ndarray) -> np.ndarray:
    """uint8 levels -> float32 confidences ``level / 255``."""
    return np.asarray(levels, dtype=np.float32) / np.float32(LEVELS - 1)


def level_of(threshold: float) -> int:
    """The lowest level whose confidences are all counted as ``>= threshold``.

    ``threshold`` 0 keeps every pixel (level 0); above 1 keeps none (level 256).
    """
    if threshold <= 0:
        return 0
    return min(LEVELS, int(np.ceil(threshold * (LEVELS - 1) - 1e-6)))


def encode_confidence(confidence: np.ndarray, scale: int = 1) -> bytes:
    """Encode a confidence map as PNG bytes.

    Args:
        confidence: ``[H, W]`` float (torch tensors: pass ``.numpy()``), values in [0, 1].
        scale: store at ``1/scale`` of the size (box-filtered); 1 (the default, what the
            pipeline writes) keeps every pixel.

    Returns:
        PNG bytes of an ``L`` image.
    """
    from PIL import Image

    values = np.asarray(confidence, dtype=np.float32)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"confidence must be a non-empty [H, W] array, got {values.shape}")
    if scale > 1:
        height, width = values.shape
        small = (max(1, round(width / scale)), max(1, round(height / scale)))
        values = np.asarray(Image.fromarray(values, mode="F").resize(small, Image.BOX))
    buffer = io.BytesIO()
    Image.fromarray(quantize(values), mode="L").save(buffer, format="PNG")  # zlib level 6
    return buffer.getvalue()


def _open_png(data: bytes, height: int, width: int) -> Any:
    """Open a stored confidence map: PNG only (no other Pillow decoder runs), mode ``L``, and
    never more pixels than its image (checked from the header, before decoding).

    Raises:
        ValueError: another format, another mode, or more pixels than ``height x width``.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ValueError(f"confidence is not a readable PNG ({exc})") from None
    if image.mode != "L":
        image.close()
        raise ValueError(f"confidence PNG has mode {image.mode}, expected L")
    if image.size[0] * image.size[1] > max(int(height) * int(width), 1):
        image.close()
        raise ValueError(f"confidence PNG is {image.size[0]}x{image.size[1]}, larger than its "
                         f"{width}x{height} image")
    return image


def decode_levels(data: bytes, height: int, width: int) -> np.ndarray:
    """PNG bytes -> ``[height, width]`` uint8 levels (bilinear upsampling when smaller).

    Raises:
        ValueError: not a single-channel 8-bit PNG.
    """
    from PIL import Image

    with _open_png(data, height, width) as image:
        if image.size == (width, height):
            return np.asarray(image).copy()
        values = Image.fromarray(dequantize(np.asarray(image)), mode="F")
    full = np.asarray(values.resize((width, height), Image.BILINEAR))
    return quantize(full)


def decode_confidence(data: bytes, height: int, width: int) -> np.ndarray:
    """PNG bytes -> ``[height, width]`` float32 confidences in [0, 1]."""
    from PIL import Image

    with _open_png(data, height, width) as image:
        values = dequantize(np.asarray(image))
        if image.size == (width, height):
            return values
    upsampled = Image.fromarray(values, mode="F").resize((width, height), Image.BILINEAR)
    return np.clip(np.asarray(upsampled, dtype=np.float32), 0.0, 1.0)


# ---------------------------------------------------------------------- ignore thresholds
#: Label value of ignored pixels in exports and the dataset reader.
IGNORE_LABEL = 255


def class_thresholds(document: Mapping, class_names: Sequence[str]) -> np.ndarray:
    """Per-class thresholds ``[C]`` from a ``thresholds.json`` document, for exports.

    Classes never judged take the global threshold; a threshold that is never reached is
    ``inf`` (every pixel of the class is ignored).

    Raises:
        ValueError: the document is not a thresholds file or names unknown classes.
    """
    if not isinstance(document, Mapping) or "classes" not in document:
        raise ValueError("not a thresholds file (no 'classes')")
    glob = document.get("global") or {}
    fallback = _as_threshold(glob)
    out = np.full(len(class_names), fallback, dtype=np.float64)
    index = {name: i for i, name in enumerate(class_names)}
    for name, entry in document["classes"].items():
        if name not in index:
            raise ValueError(f"thresholds file names class {name!r}, not in these labels")
        if entry.get("reached") is not None:
            out[index[name]] = _as_threshold(entry)
    return out


def _as_threshold(entry: Mapping) -> float:
    if entry.get("reached") is False:
        return float("inf")
    value = entry.get("threshold")
    return 0.0 if value is None else float(value)


def threshold_levels(thresholds: np.ndarray) -> np.ndarray:
    """Per-class lowest kept level ``[C]`` (256 = keep nothing) for float thresholds."""
    return np.asarray([LEVELS if not np.isfinite(t) else level_of(float(t))
                       for t in thresholds], dtype=np.int64)


def resolve_levels(class_names: Sequence[str], ignore_below: float | None = None,
                   thresholds: Mapping | None = None) -> np.ndarray | None:
    """Per-class lowest kept level ``[C]`` for ``--ignore-below T`` or ``--thresholds FILE``.

    Returns None when neither is given (nothing is ignored).

    Raises:
        ValueError: both given, ``T`` outside [0, 1], or a bad thresholds document.
    """
    if ignore_below is not None and thresholds is not None:
        raise ValueError("give --ignore-below or --thresholds, not both")
    if ignore_below is not None:
        if not 0.0 <= ignore_below <= 1.0:
            raise ValueError(f"--ignore-below must be in [0, 1], got {ignore_below}")
        return threshold_levels(np.full(len(class_names), ignore_below))
    if thresholds is not None:
        return threshold_levels(class_thresholds(thresholds, class_names))
    return None


def apply_ignore(labels: np.ndarray, levels: np.ndarray, class_levels: np.ndarray) -> np.ndarray:
    """``[H, W]`` uint8 labels with :data:`IGNORE_LABEL` where the confidence level is below
    the pixel's class threshold level (``class_levels`` ``[C]`` from :func:`resolve_levels`)."""
    out = np.asarray(labels).astype(np.uint8, copy=True)
    out[levels.astype(np.int64) < class_levels[labels]] = IGNORE_LABEL
    return out

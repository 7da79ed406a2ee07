"""Decode image bytes to RGB uint8 arrays, or to an error kind.

Pixels follow the one image rule of :mod:`cass_engine.images` (decoder allow-list, EXIF
orientation, alpha composited on white, 16-bit scaled by ``value >> 8``), the rule the
engine's CLI and API use too. Errors become kinds for error rows:

    - Zero bytes -> ``empty``; more than ``max_image_pixels`` pixels (checked from the header,
      before any pixel is decoded) -> ``too_large``; anything Pillow cannot read, including
      truncated data -> ``decode_error``.
    - A format outside :data:`cass_engine.formats.IMAGE_FORMATS` (JPEG, PNG, WebP, GIF, TIFF,
      BMP) is a ``decode_error`` naming the format it was detected as, and no other decoder
      (nor an external program such as Ghostscript) runs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from cass_engine.formats import UnsupportedImageFormat
from cass_engine.images import ImageTooLarge, decode_rgb

# The pipeline enforces its own limit (``max_image_pixels``) right after reading the header;
# Pillow's warning for large images is redundant here. (A process-wide filter: the
# ``catch_warnings`` context manager is not thread-safe and decoding runs in threads.)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass
class DecodedImage:
    """A decoded image or the reason it could not be decoded.

    Attributes:
        rgb: ``[H, W, 3]`` uint8 array, or None on error.
        width, height: pixel size when known (also for ``too_large``), else None.
        status: ``ok`` or an error kind (see :mod:`schemas.labels`).
        error: message when not ok.
    """

    rgb: np.ndarray | None
    width: int | None
    height: int | None
    status: str = "ok"
    error: str | None = None


def _failed(status: str, message: str, size: tuple[int, int] | None = None) -> DecodedImage:
    width, height = size if size else (None, None)
    return DecodedImage(None, width, height, status, message)


def decode_image(data: bytes, max_image_pixels: int) -> DecodedImage:
    """Decode encoded image bytes to RGB.

    Args:
        data: the file's bytes.
        max_image_pixels: decompression-bomb limit (width x height).
    """
    if not data:
        return _failed("empty", "zero-byte object")
    try:
        return _decode(data, max_image_pixels)
    except Image.DecompressionBombError as exc:
        return _failed("too_large", str(exc))
    except UnsupportedImageFormat as exc:
        return _failed("decode_error", f"unsupported image format: {exc}")
    except UnidentifiedImageError:
        return _failed("decode_error", "cannot identify image file (not an image, or an "
                       "unsupported format)")
    except MemoryError:
        raise  # the worker is short of memory (the pixel limit was checked): not the image's fault
    except Exception as exc:  # noqa: BLE001 - malformed files raise all kinds (struct.error...)
        return _failed("decode_error", f"{type(exc).__name__}: {exc}")


def max_encoded_bytes(max_image_pixels: int) -> int:
    """Largest encoded image worth reading: 8 bytes per allowed pixel (16-bit RGBA stored
    raw) plus 1 MiB of metadata. Anything larger cannot decode within the pixel limit."""
    return max_image_pixels * 8 + 2**20


def _decode(data: bytes, max_image_pixels: int) -> DecodedImage:
    try:
        rgb = decode_rgb(data, max_image_pixels)
    except ImageTooLarge as exc:
        return _failed("too_large", f"{exc} (--max-image-pixels)", exc.size)
    return DecodedImage(rgb, rgb.shape[1], rgb.shape[0])

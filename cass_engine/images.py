"""The one image rule: encoded bytes or any Pillow image -> ``[H, W, 3]`` uint8 RGB.

Every reader of images uses it: the engine's CLI and Python API, the labeling job's decoder
(:mod:`pipeline.decode`), audit overlays, review sheets and exports. Rules:

- Only the formats of :data:`cass_engine.formats.IMAGE_FORMATS` are opened (JPEG, PNG, WebP,
  GIF, TIFF, BMP); more than ``max_pixels`` pixels is refused from the header, before any
  pixel is decoded. Multi-frame files give their first frame.
- EXIF orientation is applied (sizes are after rotation), as image viewers show the image.
- Transparency (RGBA, LA, PA, palette or single-colour ``tRNS`` transparency) is composited
  on white: the pixels are what the image looks like on a white page, and the colour
  values hidden under transparent pixels (which encoders treat as free) never matter.
- 16-bit (and 32-bit integer) single-channel images are scaled by their value range
  0..65535 to 0..255 as ``value >> 8`` (values clipped to that range first); this is how
  Pillow itself reads 16-bit colour PNG/TIFF files, so a 16-bit grey image and its 16-bit
  RGB copy give the same pixels, and a 16-bit copy of an 8-bit image (``v * 257`` or
  ``v << 8``) gives back the 8-bit values exactly. Float images are clipped to 0..255.
- Greyscale and palette images are expanded; CMYK and other modes use Pillow's conversion
  (no ICC colour management).

Torch-free: Pillow and numpy only (:func:`to_uint8_chw` loads torch when called).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from .formats import open_image

if TYPE_CHECKING:  # pragma: no cover
    import torch

MIN_SIDE = 16  # one CLIP patch
#: Pixel limit of :func:`load_image` (the labeling job's default ``--max-image-pixels``).
DEFAULT_MAX_PIXELS = 64_000_000
_INTEGER_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageInputError(ValueError):
    """An image that the engine cannot take (wrong type, shape, dtype or size)."""


class ImageTooLarge(ImageInputError):
    """More pixels than allowed (read from the header; nothing was decoded).

    Attributes:
        size: ``(width, height)`` of the image.
    """

    def __init__(self, size: tuple[int, int], max_pixels: int) -> None:
        width, height = size
        super().__init__(f"{width}x{height} = {width * height} pixels exceeds the limit of "
                         f"{max_pixels}")
        self.size = size


def rgb_array(image: Image.Image) -> np.ndarray:
    """Any Pillow image -> ``[H, W, 3]`` uint8 RGB by the module's rule (EXIF orientation
    applied); a writable, C-contiguous copy."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _INTEGER_GREY or image.mode == "F":
        grey = _grey_to_uint8(image)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if image.mode in _ALPHA or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.array(image.convert("RGB"), dtype=np.uint8)


def _grey_to_uint8(image: Image.Image) -> np.ndarray:
    """Integer or float single-channel image -> ``[H, W]`` uint8."""
    values = np.asarray(image)
    if image.mode == "F":
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return (np.clip(values.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)


def decode_rgb(source: bytes | str | Path | IO[bytes],
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one image (bytes, path or binary file) to ``[H, W, 3]`` uint8 RGB.

    Args:
        source: the encoded image.
        max_pixels: decompression-bomb limit (width x height), checked from the header.

    Raises:
        ImageTooLarge: more than ``max_pixels`` pixels.
        cass_engine.formats.UnsupportedImageFormat: not one of the accepted formats.
        OSError, ValueError, ...: whatever Pillow raises for damaged data (the pipeline
            turns every one into a ``decode_error`` row).
    """
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    with open_image(str(fp) if isinstance(fp, Path) else fp) as image:
        if image.size[0] * image.size[1] > max_pixels:
            raise ImageTooLarge(image.size, max_pixels)
        image.load()
        return rgb_array(image)


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as ``[H, W, 3]`` uint8 RGB (:func:`decode_rgb`'s rule and limits).

    Raises:
        ImageInputError: missing, unreadable or too large a file, or another format.
    """
    try:
        return decode_rgb(Path(path), max_pixels)
    except ImageInputError:
        raise
    except FileNotFoundError:
        raise ImageInputError(f"image file not found: {path}") from None
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - damaged files raise all kinds (struct.error...)
        raise ImageInputError(f"cannot read image {path}: {error}") from None


def to_uint8_chw(image: object) -> torch.Tensor:
    """Convert an RGB image to a ``[3, H, W]`` uint8 tensor (no copy when already one).

    Accepts ``[H, W, 3]`` uint8 numpy arrays, ``[3, H, W]`` uint8 tensors and Pillow images
    (any mode, converted by :func:`rgb_array`, the rule image files follow).

    Raises:
        ImageInputError: anything else, or an image smaller than 16 pixels on a side.
    """
    import torch

    if isinstance(image, Image.Image):
        image = rgb_array(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ImageInputError(
                f"expected an [H, W, 3] uint8 RGB array, got shape {image.shape} {image.dtype}")
        if not image.flags.writeable or not image.flags.c_contiguous:
            image = np.array(image, copy=True, order="C")
        tensor = torch.from_numpy(image).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ImageInputError(
                f"expected a [3, H, W] uint8 tensor, got {tuple(image.shape)} {image.dtype}")
        tensor = image
    else:
        raise ImageInputError(f"unsupported image type {type(image).__name__}")
    if min(tensor.shape[-2:]) < MIN_SIDE:
        raise ImageInputError(f"image {tuple(tensor.shape[-2:])} is smaller than "
                              f"{MIN_SIDE} pixels on a side")
    return tensor

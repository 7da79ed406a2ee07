"""Image input conversion: whatever the caller has -> ``[3, H, W]`` uint8 RGB tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .formats import open_image

MIN_SIDE = 16  # one CLIP patch


class ImageInputError(ValueError):
    """An image that the engine cannot take (wrong type, shape, dtype or size)."""


def to_uint8_chw(image: object) -> torch.Tensor:
    """Convert an RGB image to a ``[3, H, W]`` uint8 tensor (no copy when already one).

    Accepts ``[H, W, 3]`` uint8 numpy arrays, ``[3, H, W]`` uint8 tensors and PIL images (any
    mode, converted to RGB as :func:`load_image` does: EXIF orientation, alpha on white,
    16-bit scaled).

    Raises:
        ImageInputError: anything else, or an image smaller than 16 pixels on a side.
    """
    if isinstance(image, Image.Image):  # same conversion as load_image
        image = np.asarray(_to_rgb(ImageOps.exif_transpose(image)))
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


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as ``[H, W, 3]`` uint8 RGB, EXIF orientation applied.

    Only JPEG, PNG, WebP, GIF, TIFF and BMP files are opened
    (:data:`cass_engine.formats.IMAGE_FORMATS`).

    Raises:
        ImageInputError: missing or unreadable file, or another format.
    """
    try:
        with open_image(str(path)) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(_to_rgb(im))
    except FileNotFoundError:
        raise ImageInputError(f"image file not found: {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageInputError(f"cannot read image {path}: {error}") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB with alpha composited on white; 16-bit grey scaled to 8 bits."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray((arr / top * 255).round().astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")

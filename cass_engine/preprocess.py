"""Image preparation: resizing, normalisation, the crop grid and the DINO input path.

All functions work on torch tensors on the caller's device. Images are ``uint8`` RGB tensors of
shape ``[3, H, W]`` unless stated otherwise.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

#: CLIP normalisation on the 0..255 scale, as used by the reference preprocessor (these are
#: OpenAI's mean/std times 255, rounded to three decimals).
CLIP_MEAN_255 = (122.771, 116.746, 104.094)
CLIP_STD_255 = (68.501, 66.632, 70.323)
#: The reference code un-normalises with ImageNet constants whose blue std is written 0.255
#: instead of 0.225 (a typo that changes the DINO input colours; reproduced by default).
REFERENCE_UNNORM_STD = (IMAGENET_DEFAULT_STD[0], IMAGENET_DEFAULT_STD[1], 0.255)

CLIP_PATCH = 16
DINO_PATCH = 8


def resized_hw(height: int, width: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """Output size of a keep-ratio resize to ``short_side`` with the long side capped.

    Same rule as mmseg ``Resize(scale=(max_long_side, short_side), keep_ratio=True)``:
    ``scale = min(max_long / long, short / short)``, sizes rounded half up.
    """
    scale = min(max_long_side / max(height, width), short_side / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_uint8(image: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False, no antialias) of a uint8 image, rounded to uint8.

    Args:
        image: ``[3, H, W]`` uint8.
        hw: output (height, width).
    Returns:
        ``[3, h, w]`` uint8.
    """
    if tuple(image.shape[-2:]) == tuple(hw):
        return image
    out = F.interpolate(image[None].float(), size=hw, mode="bilinear", align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def clip_normalize(images: torch.Tensor) -> torch.Tensor:
    """CLIP normalisation of uint8 images ``[..., 3, H, W]`` -> float32, same shape."""
    mean = images.new_tensor(CLIP_MEAN_255, dtype=torch.float32).view(3, 1, 1)
    std = images.new_tensor(CLIP_STD_255, dtype=torch.float32).view(3, 1, 1)
    return (images.float() - mean) / std


def imagenet_normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of uint8 images as torchvision's ToTensor + Normalize does."""
    mean = images_uint8.new_tensor(IMAGENET_DEFAULT_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = images_uint8.new_tensor(IMAGENET_DEFAULT_STD, dtype=torch.float32).view(3, 1, 1)
    return (images_uint8.float() / 255.0 - mean) / std


def reference_dino_lut(device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-channel table mapping a pixel value to the reference DINO input value.

    The reference code CLIP-normalises the crop, un-normalises it with the ImageNet constants
    (blue std typo included), multiplies by 255 and truncates to uint8. Every step is done here
    in float32 in the same order, once for the 256 possible values of each channel.

    Returns:
        ``[3, 256]`` uint8 table: ``lut[c, p]`` is the value DINO sees for pixel value ``p``.
    """
    values = torch.arange(256, dtype=torch.float32).expand(3, 256)
    clip_mean = torch.tensor(CLIP_MEAN_255, dtype=torch.float32)[:, None]
    clip_std = torch.tensor(CLIP_STD_255, dtype=torch.float32)[:, None]
    normalized = (values - clip_mean) / clip_std
    pairs = zip(IMAGENET_DEFAULT_MEAN, REFERENCE_UNNORM_STD, strict=True)
    un_mean = torch.tensor([-m / s for m, s in pairs], dtype=torch.float32)[:, None]
    un_std = torch.tensor([1.0 / s for s in REFERENCE_UNNORM_STD], dtype=torch.float32)[:, None]
    restored = (normalized - un_mean) / un_std * 255
    return restored.clamp(0, 255).to(torch.uint8).to(device)


def apply_lut(images: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Map uint8 images ``[B, 3, H, W]`` through a ``[3, 256]`` table, per channel."""
    b, c, h, w = images.shape
    flat = images.permute(1, 0, 2, 3).reshape(c, -1).long()
    mapped = torch.gather(lut, 1, flat)
    return mapped.reshape(c, b, h, w).permute(1, 0, 2, 3)


PIL_PRECISION_BITS = 22  # Pillow's fixed-point precision for 8-bit resampling


def _pil_bicubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@lru_cache(maxsize=64)
def pil_bicubic_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """Pillow's fixed-point bicubic resampling weights along one axis, ``[out, in]`` float64.

    Same support widening, per-row normalisation and rounding to integers with 22 fractional
    bits as Pillow's 8-bit resampler, so ``pil_resample_axis`` reproduces it exactly.
    """
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    one = 1 << PIL_PRECISION_BITS
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = [_pil_bicubic((x + lo - center + 0.5) / filter_scale) for x in range(hi - lo)]
        total = sum(taps)
        for i, tap in enumerate(taps):
            k = tap / total if total != 0.0 else tap
            weights[xx, lo + i] = int(k * one - 0.5) if k < 0 else int(k * one + 0.5)
    return weights


def pil_resample_axis(images: torch.Tensor, out_size: int, axis: int) -> torch.Tensor:
    """Resample uint8 images ``[B, 3, H, W]`` along ``axis`` (-1 or -2) as Pillow does."""
    weights = pil_bicubic_matrix(images.shape[axis], out_size).to(images.device)
    x = images.double().movedim(axis, -1)
    acc = x @ weights.T + float(1 << (PIL_PRECISION_BITS - 1))
    out = torch.floor(acc / float(1 << PIL_PRECISION_BITS)).clamp_(0, 255)
    return out.to(torch.uint8).movedim(-1, axis)


def square_resize_bicubic(images: torch.Tensor) -> torch.Tensor:
    """Resize uint8 images ``[B, 3, H, W]`` to a square of side ``min(H, W)``, as Pillow's
    ``Image.resize`` with its bicubic filter does (bit-exact; a no-op for squares).
    """
    side = min(images.shape[-2:])
    if images.shape[-1] != side:
        images = pil_resample_axis(images, side, -1)
    if images.shape[-2] != side:
        images = pil_resample_axis(images, side, -2)
    return images


def dino_input(crops_uint8: torch.Tensor, mode: str, lut: torch.Tensor | None) -> torch.Tensor:
    """Build DINO's input for a batch of same-size uint8 crops ``[B, 3, h, w]``.

    ``reference``: colour table, square resize to ``min(h, w)``, ImageNet normalisation.
    ``exact``: ImageNet normalisation of the true pixels at the crop's own size.
    Both are then cropped to a multiple of 8 (DINO's patch size).

    Returns:
        float32 ``[B, 3, h', w']`` with ``h'``, ``w'`` multiples of 8.
    """
    if mode == "reference":
        assert lut is not None
        crops_uint8 = square_resize_bicubic(apply_lut(crops_uint8, lut))
    out = imagenet_normalize(crops_uint8)
    h = out.shape[-2] - out.shape[-2] % DINO_PATCH
    w = out.shape[-1] - out.shape[-1] % DINO_PATCH
    return out[..., :h, :w]


def crop_boxes(height: int, width: int, crop: int | None,
               stride: int) -> list[tuple[int, int, int, int]]:
    """Sliding-window crop boxes ``(y1, x1, y2, x2)`` covering an image.

    Grid count per axis ``n = max(L - crop + stride - 1, 0) // stride + 1``; a window that
    would overrun is shifted back inside the image; windows are clipped to images smaller than
    the crop. ``crop=None`` gives one box covering the whole image.
    """
    if crop is None:
        return [(0, 0, height, width)]
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            boxes.append((max(y2 - crop, 0), max(x2 - crop, 0), y2, x2))
    return boxes


def interpolate_pos_embed(pos_embed: torch.Tensor, image_hw: tuple[int, int],
                          patch: int) -> torch.Tensor:
    """Positional embeddings ``[1 + n*n, D]`` resampled for an image of ``image_hw`` pixels.

    The patch grid is ``image_hw // patch`` (the patch convolution floors). Bicubic, with the
    scale factor ``(grid + 0.1) / n`` per axis, as the official DINO code and the reference CASS
    code do (timm's dynamic resampling gives different values). Returned unchanged only when
    the grid is the native one and the image is square, the reference rule.

    Returns:
        ``[1 + gh*gw, D]``, class token first.
    """
    n = int(math.sqrt(pos_embed.shape[0] - 1))
    grid_hw = (image_hw[0] // patch, image_hw[1] // patch)
    if grid_hw == (n, n) and image_hw[0] == image_hw[1]:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:1], pos_embed[1:]
    dim = patch_pos.shape[-1]
    grid = patch_pos.reshape(1, n, n, dim).permute(0, 3, 1, 2)
    scale = ((grid_hw[0] + 0.1) / n, (grid_hw[1] + 0.1) / n)
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False,
                         recompute_scale_factor=False)
    if tuple(grid.shape[-2:]) != grid_hw:
        raise RuntimeError(f"positional grid {tuple(grid.shape[-2:])} != expected {grid_hw}")
    return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(-1, dim)], dim=0)

"""Pixel-adaptive mask refinement (PAMR, Araslanov & Roth 2020): optional post-processing.

Off by default (the published numbers use none). Each iteration replaces a pixel's logits by
an affinity-weighted average of its 8 neighbours at every dilation; affinities come from
local colour differences of the image, scaled by the local standard deviation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _neighbours(x: torch.Tensor, dilations: tuple[int, ...], with_centre: bool) -> torch.Tensor:
    """Shifted copies of ``x [B, C, H, W]`` (replicate border): ``[B, C, K, H, W]``."""
    h, w = x.shape[-2:]
    out = []
    for d in dilations:
        padded = F.pad(x, (d, d, d, d), mode="replicate")
        offsets = ([(0, 0)] if with_centre else []) + _OFFSETS
        for dy, dx in offsets:
            out.append(padded[..., d + dy * d:d + dy * d + h, d + dx * d:d + dx * d + w])
    return torch.stack(out, dim=2)


def pamr(image: torch.Tensor, logits: torch.Tensor, steps: int,
         dilations: tuple[int, ...]) -> torch.Tensor:
    """Refine logits with image-guided local propagation.

    Args:
        image: ``[B, 3, H, W]`` float image (any normalisation).
        logits: ``[B, Q, H, W]`` float logits at the image size.
    Returns:
        ``[B, Q, H, W]`` refined logits.
    """
    image, logits = image.float(), logits.float()
    std = _neighbours(image, dilations, with_centre=True).std(dim=2, keepdim=True)
    diff = (image[:, :, None] - _neighbours(image, dilations, with_centre=False)).abs()
    affinity = torch.softmax((-diff / (1e-8 + 0.1 * std)).mean(1, keepdim=True), dim=2)
    for _ in range(steps):
        logits = (_neighbours(logits, dilations, with_centre=False) * affinity).sum(2)
    return logits

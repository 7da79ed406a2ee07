"""Engine test fixtures: seeded real-size backbones and real photographs (skimage.data).

Import the fixtures into a test module (``from engine_fixtures import ...``); the backbones
are built once per test process.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import open_clip
import pytest
import timm
import torch
from skimage import data

from cass_engine.registry import CLIP_MODEL_NAME, DINO_MODEL_NAME


@lru_cache(maxsize=2)
def build_random_backbones(seed: int = 0):
    """CLIP ViT-B/16 (QuickGELU) and DINO ViT-B/8 with seeded random weights, eval mode."""
    torch.manual_seed(seed)
    clip = open_clip.create_model(CLIP_MODEL_NAME, pretrained=None).eval()
    dino = timm.create_model(DINO_MODEL_NAME, pretrained=False, num_classes=0).eval()
    for p in list(clip.parameters()) + list(dino.parameters()):
        p.requires_grad_(False)
    _give_heads_distinct_spectra(clip.visual.transformer.resblocks[-1].attn.in_proj_weight, 1.0)
    _give_heads_distinct_spectra(dino.blocks[-1].attn.qkv.weight, -1.0)
    return clip, dino


def _give_heads_distinct_spectra(qkv_weight: torch.Tensor, direction: float) -> None:
    """Scale the key channels of each head of a last block by a head-specific decay.

    Freshly initialised heads all have nearly the same key spectrum, so their matching costs
    tie to within float noise and the assignment is decided by rounding. Trained heads differ;
    giving each random head its own channel decay (the key spectrum's shape) makes the
    matching well-posed, as it is with real weights.
    """
    dim = qkv_weight.shape[1]
    keys = qkv_weight[dim:2 * dim].view(12, 64, dim)
    channel = torch.arange(64, dtype=keys.dtype)
    for head in range(12):
        rate = 0.01 + 0.008 * (head if direction > 0 else 11 - head)
        keys[head] *= torch.exp(-rate * channel)[:, None]


def photo_336x448() -> np.ndarray:
    """A real photograph (skimage's coffee cup), cropped to 300x400 RGB uint8."""
    return np.ascontiguousarray(data.coffee()[50:350, 100:500])


@pytest.fixture(scope="session")
def random_backbones():
    return build_random_backbones(0)


@pytest.fixture(scope="session")
def real_photo_336x448():
    return photo_336x448()

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

from cass_engine.weights import CLIP_MODEL_NAME, DINO_MODEL_NAME


@lru_cache(maxsize=2)
def build_random_backbones(seed: int = 0):
    """CLIP ViT-B/16 (QuickGELU) and DINO ViT-B/8 with seeded random weights, eval mode."""
    torch.manual_seed(seed)
    clip = open_clip.create_model(CLIP_MODEL_NAME, pretrained=None).eval()
    dino = timm.create_model(DINO_MODEL_NAME, pretrained=False, num_classes=0).eval()
    for p in list(clip.parameters()) + list(dino.parameters()):
        p.requires_grad_(False)
    return clip, dino


def photo_336x448() -> np.ndarray:
    """A real photograph (skimage's coffee cup), cropped to 300x400 RGB uint8."""
    return np.ascontiguousarray(data.coffee()[50:350, 100:500])


@pytest.fixture(scope="session")
def random_backbones():
    return build_random_backbones(0)


@pytest.fixture(scope="session")
def real_photo_336x448():
    return photo_336x448()

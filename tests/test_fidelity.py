"""Fidelity: the batched engine against a literal one-crop-at-a-time reference formulation.

Shared seeded backbones, a real photograph, every preset, fp32 on CPU. Class probabilities
must agree to better than 5e-4 everywhere.
"""

from __future__ import annotations

import pytest
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from cass_engine import PRESETS, CassConfig, CassSegmenter, TextEmbeddings
from cass_engine.preprocess import resize_uint8, resized_hw
from cass_engine.text import embed_queries
from engine_fixtures import random_backbones, real_photo_336x448  # noqa: F401
from reference_cass import reference_probs

TOLERANCE = 5e-4


@pytest.fixture(scope="module")
def photo(real_photo_336x448):
    return real_photo_336x448


def _engine(models, preset: str, **overrides) -> tuple[CassSegmenter, TextEmbeddings]:
    clip, dino = models
    cfg = CassConfig.from_preset(preset, **overrides)
    vocab = cfg.load_vocabulary()
    queries = embed_queries(clip, vocab.query_words, OPENAI_IMAGENET_TEMPLATES[:2]).cpu()
    seg = CassSegmenter(clip, dino, cfg, torch.device("cpu"))
    emb = seg.set_vocabulary(text_embeddings=TextEmbeddings(vocab, queries, "test"))
    return seg, emb


def _reference(models, seg, emb, image):
    cfg = seg.config
    chw = torch.from_numpy(image).permute(2, 0, 1)
    small = resize_uint8(chw, resized_hw(*chw.shape[-2:], cfg.short_side, cfg.max_long_side))
    groups = emb.groups(cfg.h_threshold)
    return reference_probs(*models, cfg, emb.queries, groups,
                           emb.vocabulary.query_to_class, small, tuple(chw.shape[-2:]))


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(PRESETS))
def test_engine_matches_reference(random_backbones, photo, preset):
    seg, emb = _engine(random_backbones, preset)
    engine = seg.segment([photo])[0].probs
    reference = _reference(random_backbones, seg, emb, photo)
    assert engine.shape == reference.shape
    diff = (engine - reference).abs().max().item()
    assert diff < TOLERANCE, f"{preset}: max |engine - reference| = {diff:.2e}"

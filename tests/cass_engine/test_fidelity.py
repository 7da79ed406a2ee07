"""Fidelity: the batched engine against a literal one-crop-at-a-time reference formulation.

Shared seeded backbones, a real photograph, every preset, fp32 on CPU. Class probabilities
must agree to better than 5e-4 everywhere.

Head matching maximises the summed spectral distance, and those distances are close to
additive (``D[i, j] ~ f(i) + g(j)`` whenever one head's spectrum dominates the other's at every
rank), so many assignments tie to within float rounding and the reference's choice among them
is decided by rounding noise. The test therefore checks that both sides build the same cost
matrices (to 1e-3: the reference also rounds its N x N DINO graph to float16), then lets the
engine replay the reference's assignment for the matching matrix; everything else is compared
end to end.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from scipy.optimize import linear_sum_assignment
from support import reference_cass
from support.engine import random_backbones, real_photo_336x448  # noqa: F401
from support.reference_cass import reference_probs

from cass_engine import PRESETS, CassConfig, CassSegmenter, TextEmbeddings, spectral
from cass_engine.preprocess import resize_uint8, resized_hw
from cass_engine.text import embed_queries

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
    # two templates keep the test fast; the embeddings still come from this CLIP's text tower
    emb = seg.set_vocabulary(text_embeddings=TextEmbeddings(vocab, queries,
                                                            seg.text_weights_hash()))
    return seg, emb


def _reference(models, seg, emb, image):
    cfg = seg.config
    chw = torch.from_numpy(image).permute(2, 0, 1)
    small = resize_uint8(chw, resized_hw(*chw.shape[-2:], cfg.short_side, cfg.max_long_side))
    groups = emb.groups(cfg.h_threshold)
    return reference_probs(*models, cfg, emb.queries, groups,
                           emb.vocabulary.query_to_class, small, tuple(chw.shape[-2:]))


COST_TOLERANCE = 1e-3


class AssignmentReplay:
    """Records the reference's assignments, then hands them to the engine by cost matrix."""

    def __init__(self) -> None:
        self.recorded: list[tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]] = []
        self.worst_cost_gap = 0.0

    def record(self, cost):
        result = linear_sum_assignment(cost)
        self.recorded.append((np.asarray(cost, dtype=np.float64), result))
        return result

    def replay(self, cost):
        gaps = [np.abs(c - cost).max() for c, _ in self.recorded]
        best = int(np.argmin(gaps))
        self.worst_cost_gap = max(self.worst_cost_gap, float(gaps[best]))
        assert gaps[best] < COST_TOLERANCE, f"no reference cost matrix within {gaps[best]:.2e}"
        return self.recorded[best][1]


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(PRESETS))
def test_engine_matches_reference(random_backbones, photo, preset, monkeypatch):
    seg, emb = _engine(random_backbones, preset)
    replay = AssignmentReplay()
    monkeypatch.setattr(reference_cass, "linear_sum_assignment", replay.record)
    reference = _reference(random_backbones, seg, emb, photo)
    monkeypatch.setattr(spectral, "linear_sum_assignment", replay.replay)
    engine = seg.segment([photo])[0].probs
    assert replay.worst_cost_gap < COST_TOLERANCE
    assert engine.shape == reference.shape
    diff = (engine - reference).abs().max().item()
    assert diff < TOLERANCE, f"{preset}: max |engine - reference| = {diff:.2e}"

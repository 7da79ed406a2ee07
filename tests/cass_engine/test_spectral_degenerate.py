"""Every named spectral option on degenerate spectra: finite, valid attention and labels.

Degenerate inputs: rank-1 key matrices (one non-zero eigenvalue), keys whose Gram matrix is a
multiple of the identity (all eigenvalues equal), all-zero keys; and, end to end, a segmenter
with seeded random weights whose DINO key projection is forced to rank 1 or to zero. Where the
mathematics defines the result it is checked: a rank-1 graph is its own low-rank
approximation; a flat spectrum has nothing for the eigenscaling to stretch; a zero DINO graph
leaves CLIP's attention (scaled by ``1 / (10 w + 1)``, ``w = 1``).
"""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from support.engine import build_random_backbones, photo_336x448

from cass_engine import CassConfig, CassSegmenter, TextEmbeddings, parse_vocabulary
from cass_engine.spectral import (
    eigenscale,
    fused_attention_output,
    gaussian_prior,
    gram_spectra,
    kept_eigen_mask,
    low_rank_dino_graph,
    match_value_range,
)
from cass_engine.text import embed_queries

HEADS, GRID, D = 12, (8, 8), 64
N = GRID[0] * GRID[1]  # = D, so that V = identity makes the output the attention matrix

#: Every named option of the kept rank, with the eigenscaling and head-pairing switches.
RANKS = {
    "reference-10": {},
    "reference-1": {"reference_rank": 1},
    "energy-95": {"rank": "energy"},
    "energy-100": {"rank": "energy", "energy_threshold": 1.0},
}
OPTIONS = {
    f"{rank}-{'scaled' if scaled else 'unscaled'}-{pairing}": CassConfig(
        eigenscaling=scaled, head_pairing=pairing, **values)
    for (rank, values), scaled, pairing in itertools.product(
        RANKS.items(), (True, False), ("reference", "matched"))
}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_keys(seed: int) -> torch.Tensor:
    decay = torch.exp(-0.05 * torch.arange(D, dtype=torch.float32))
    return torch.randn(1, HEADS, N, D, generator=_generator(seed)) * decay


def _rank1_keys(seed: int, same_channels: bool = False) -> torch.Tensor:
    """``K_h = u_h w_h^T``: one non-zero eigenvalue per head.

    With ``same_channels`` every entry of ``w_h`` is equal, so that the key stays rank 1
    after the min-max range map (which adds a constant to every entry).
    """
    g = _generator(seed)
    w = torch.randn(1, HEADS, 1, 1 if same_channels else D, generator=g).expand(1, HEADS, 1, D)
    return torch.randn(1, HEADS, N, 1, generator=g) @ w


def _flat_keys(seed: int, scale: float = 1.5) -> torch.Tensor:
    """Scaled one-hot token rows in random order: ``K^T K = scale^2 I`` exactly."""
    g = _generator(seed)
    rows = torch.stack([torch.randperm(N, generator=g) for _ in range(HEADS)])
    return (scale * torch.eye(N, D)[rows])[None]


def _zero_keys(seed: int) -> torch.Tensor:
    return torch.zeros(1, HEADS, N, D)


SPECTRA = {"rank1": _rank1_keys, "flat": _flat_keys, "zero": _zero_keys}


def _attention(k_clip: torch.Tensor, k_dino: torch.Tensor, config: CassConfig) -> torch.Tensor:
    """The fused attention matrices ``[1, h, N, N]`` (values = identity)."""
    values = torch.eye(N, D).expand(1, HEADS, N, D)
    return fused_attention_output(k_clip, values, k_dino, GRID, config)


def _assert_row_stochastic(attention: torch.Tensor) -> None:
    assert torch.isfinite(attention).all()
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]),
                               atol=1e-5, rtol=0)


def _direct_graph(keys: torch.Tensor) -> torch.Tensor:
    graph = keys.double() @ keys.double().transpose(-1, -2) / math.sqrt(D)
    graph.diagonal(dim1=-2, dim2=-1).zero_()
    return graph


@pytest.mark.parametrize("side", ["dino", "clip", "both"])
@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_every_option_gives_finite_row_stochastic_attention(side, spectrum):
    degenerate = SPECTRA[spectrum](7)
    k_clip = degenerate if side in ("clip", "both") else _random_keys(1)
    k_dino = degenerate if side in ("dino", "both") else _random_keys(2)
    for fp16 in (True, False):
        mapped = match_value_range(k_dino, k_clip, fp16=fp16)
        for option, config in OPTIONS.items():
            attention = _attention(k_clip, mapped, config)
            assert torch.isfinite(attention).all(), f"{option}, fp16={fp16}: not finite"
            _assert_row_stochastic(attention)


@pytest.mark.parametrize("fp16", [True, False])
def test_constant_keys_map_to_the_target_minimum(fp16):
    target = _random_keys(3)
    for source in (torch.zeros(2, HEADS, N, D), torch.full((2, HEADS, N, D), 0.75)):
        mapped = match_value_range(source, target, fp16)
        assert torch.isfinite(mapped).all()
        expected = target.amin().half().float() if fp16 else target.amin()
        assert torch.equal(mapped, torch.full_like(mapped, expected.item()))


def test_kept_rank_of_degenerate_spectra():
    energy = CassConfig(rank="energy")
    rank1, _ = gram_spectra(_rank1_keys(0))
    flat, _ = gram_spectra(_flat_keys(0))
    zero, _ = gram_spectra(_zero_keys(0))
    assert (kept_eigen_mask(rank1, energy).sum(-1) == 1).all()
    # 64 equal values: 61 / 64 is the first share reaching 95 %
    assert (kept_eigen_mask(flat, energy).sum(-1) == 61).all()
    assert (kept_eigen_mask(flat, energy.replace(energy_threshold=1.0)).sum(-1) == D).all()
    assert (kept_eigen_mask(zero, energy).sum(-1) == 1).all()
    assert (kept_eigen_mask(zero, CassConfig()).sum(-1) == 10).all()


@pytest.mark.parametrize("rank", ["reference-1", "energy-95"])
@pytest.mark.parametrize("scaled", [True, False])
def test_rank1_graph_is_its_own_low_rank_approximation(rank, scaled):
    # one kept pair: phi of a single value is the value itself (no spread to stretch)
    keys = _rank1_keys(4)
    values, vectors = gram_spectra(keys)
    config = CassConfig(eigenscaling=scaled, **RANKS[rank])
    assert (kept_eigen_mask(values, config).sum(-1) == 1).all()
    got = low_rank_dino_graph(keys, values, vectors, config)
    assert torch.isfinite(got).all()
    direct = _direct_graph(keys)
    torch.testing.assert_close(got.double(), direct, rtol=1e-4, atol=1e-4 * direct.abs().max())


@pytest.mark.parametrize("scaled", [True, False])
def test_rank1_graph_with_ten_kept_pairs(scaled):
    # the nine others are zero: unscaled the graph is the matrix itself, scaled it is
    # phi(s_max) = 1.5 s_max times the eigenvector's outer product
    keys = _rank1_keys(5)
    values, vectors = gram_spectra(keys)
    got = low_rank_dino_graph(keys, values, vectors, CassConfig(eigenscaling=scaled))
    direct = _direct_graph(keys) * (1.5 if scaled else 1.0)
    torch.testing.assert_close(got.double(), direct, rtol=1e-4, atol=1e-4 * direct.abs().max())


def test_flat_spectrum_is_not_stretched():
    values, vectors = gram_spectra(_flat_keys(6))
    assert torch.equal(values, torch.full_like(values, 1.5 ** 2 / math.sqrt(D)))
    for rank in RANKS.values():
        on, off = CassConfig(**rank), CassConfig(eigenscaling=False, **rank)
        keep = kept_eigen_mask(values, on)
        assert torch.equal(eigenscale(values, keep, on), eigenscale(values, keep, off))


@pytest.mark.parametrize("rank", ["energy-100", "reference-64"])
def test_flat_graph_kept_whole_is_the_matrix_itself(rank):
    keys = _flat_keys(8)
    values, vectors = gram_spectra(keys)
    config = (CassConfig(rank="energy", energy_threshold=1.0) if rank == "energy-100"
              else CassConfig(reference_rank=64))
    got = low_rank_dino_graph(keys, values, vectors, config)
    torch.testing.assert_close(got.double(), _direct_graph(keys), rtol=0, atol=1e-6)


def test_rank1_fused_attention_does_not_depend_on_eigenscaling():
    # one kept value (or 1.5 s_max and zeros): phi only scales the graph, and the graph is
    # min-max rescaled into CLIP's range before the fusion
    k_clip = _random_keys(9)
    k_dino = match_value_range(_rank1_keys(10, same_channels=True), k_clip, fp16=False)
    for option, config in OPTIONS.items():
        got = _attention(k_clip, k_dino, config)
        reference = _attention(k_clip, k_dino, config.replace(eigenscaling=False))
        torch.testing.assert_close(got, reference, rtol=0, atol=2e-5, msg=option)


def test_zero_dino_graph_leaves_clip_attention():
    # zero DINO spectra: D = 1 for every pair, so w = 1 and A_psi = (10 min + A_clip) / 11
    k_clip = _random_keys(11)
    clip_graph = k_clip @ k_clip.transpose(-1, -2) / math.sqrt(D)
    prior = gaussian_prior(GRID, 5.0, torch.device("cpu"))
    expected = torch.softmax(clip_graph / 11.0 + prior, dim=-1)
    for option, config in OPTIONS.items():
        got = _attention(k_clip, _zero_keys(0), config)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=option)


def test_zero_clip_keys_leave_the_neighbourhood_prior():
    prior = gaussian_prior(GRID, 5.0, torch.device("cpu"))
    expected = torch.softmax(prior, dim=-1).expand(1, HEADS, N, N)
    for option, config in OPTIONS.items():
        got = _attention(_zero_keys(0), _random_keys(12), config)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=option)


# ---------------------------------------------------------------- end to end

VOCAB = "background\ncup\ntable\nwall\nfood\n"  # no synonyms: class probabilities sum to 1


def _forced_backbones(kind: str):
    """Seeded random backbones whose DINO last-block keys are rank 1 or zero per head.

    Rank 1 survives the bilinear resize and the min-max range map because every channel of
    a head gets the same key (``W_k`` rows equal within a head, equal biases).
    """
    clip, dino = copy.deepcopy(build_random_backbones(0))
    qkv = dino.blocks[-1].attn.qkv
    dim = qkv.weight.shape[1]
    with torch.no_grad():
        weight = qkv.weight[dim:2 * dim].view(HEADS, D, dim)
        bias = qkv.bias[dim:2 * dim].view(HEADS, D)
        if kind == "zero":
            weight.zero_()
            bias.zero_()
        else:
            weight.copy_(weight[:, :1].expand_as(weight).clone())
            bias.copy_(bias[:, :1].expand_as(bias).clone())
    return clip, dino


@pytest.fixture(scope="module")
def text_embeddings():
    clip, dino = build_random_backbones(0)
    vocab = parse_vocabulary(VOCAB)
    queries = embed_queries(clip, vocab.query_words, OPENAI_IMAGENET_TEMPLATES[:2]).cpu()
    seg = CassSegmenter(clip, dino, CassConfig(), torch.device("cpu"))
    return TextEmbeddings(vocab, queries, seg.text_weights_hash())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rank1", "zero"])
def test_segmenter_with_degenerate_dino_keys_gives_probabilities(kind, text_embeddings):
    models = _forced_backbones(kind)
    image = photo_336x448()[:224, :224]
    configs = {"reference": CassConfig(short_side=224),
               "energy": CassConfig(short_side=224, rank="energy"),
               "energy-matched-exact": CassConfig(short_side=224, rank="energy",
                                                  head_pairing="matched", dino_input="exact",
                                                  dino_key_fp16=False),
               "voc21-energy": CassConfig.from_preset("voc21", short_side=224, rank="energy")}
    for name, config in configs.items():
        seg = CassSegmenter(*models, config, torch.device("cpu"))
        seg.set_vocabulary(text_embeddings=text_embeddings)
        result = seg.segment([image])[0]
        probs = result.probs.numpy()
        assert np.isfinite(probs).all(), f"{kind} {name}: non-finite probabilities"
        assert probs.min() >= 0 and probs.max() <= 1 + 1e-6, name
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4, err_msg=name)
        labels = result.labels.numpy()
        assert labels.shape == image.shape[:2] and 0 <= labels.min() <= labels.max() < 5
        assert np.isfinite(result.presence.numpy()).all(), name

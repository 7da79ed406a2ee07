"""Spectral fusion components against slow, direct formulations on small tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cass_engine import CassConfig
from cass_engine.spectral import (
    assign_heads,
    eigenscale,
    fused_attention_output,
    gaussian_prior,
    gram_spectra,
    kept_eigen_mask,
    low_rank_dino_graph,
    match_value_range,
    normalized_top_spectrum,
    spectral_distance,
)

CFG = CassConfig.from_preset("coco_stuff")


def _keys(b=2, h=3, n=30, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g) * torch.linspace(0.5, 2.0, d)


def test_gram_spectrum_equals_graph_eigenvalues():
    k = _keys()
    values, _ = gram_spectra(k)
    graph = (k.double() @ k.double().transpose(-1, -2)) / math.sqrt(k.shape[-1])
    full = torch.linalg.eigvalsh(graph).flip(-1)[..., :k.shape[-1]]
    assert torch.allclose(values, full, atol=1e-9)


def test_spectral_distance_matches_loops():
    a = normalized_top_spectrum(gram_spectra(_keys(seed=1))[0], 5)
    c = normalized_top_spectrum(gram_spectra(_keys(seed=2))[0], 5)
    assert torch.allclose(a.sum(-1), torch.ones(2, 3, dtype=a.dtype))
    dist = spectral_distance(a, c)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                direct = (a[b, i].sort().values - c[b, j].sort().values).abs().sum()
                assert torch.isclose(dist[b, i, j], direct)


def test_head_pairing_reference_and_matched():
    # cost = 1 - D with a unique optimum: dino 0 -> clip 2, dino 1 -> clip 0, dino 2 -> clip 1
    distance = torch.full((1, 3, 3), 0.1, dtype=torch.float64)
    distance[0, 0, 2], distance[0, 1, 0], distance[0, 2, 1] = 0.9, 0.8, 0.7
    ref_idx, ref_w = assign_heads(distance, "reference")
    assert ref_idx.tolist() == [[2, 0, 1]]  # CLIP head c fused with DINO head col[c]
    assert torch.allclose(ref_w, torch.tensor([[0.9, 0.8, 0.7]]))
    m_idx, m_w = assign_heads(distance, "matched")
    assert m_idx.tolist() == [[1, 2, 0]]  # CLIP head c fused with the DINO head matched to it
    assert torch.allclose(m_w, torch.tensor([[0.8, 0.7, 0.9]]))


def test_eigenscaling_formula_and_switch():
    s = torch.tensor([[10.0, 6.0, 3.0, 1.0]], dtype=torch.float64)
    keep = torch.tensor([[True, True, True, False]])
    lo, hi = 3.0, 10.0
    expected = [(v - lo) / (hi - lo) * (1.5 * hi - 0.5 * lo) + 0.5 * lo for v in (10.0, 6.0, 3.0)]
    assert torch.allclose(eigenscale(s, keep, CFG)[0, :3], torch.tensor(expected, dtype=s.dtype))
    assert eigenscale(s, keep, CFG)[0, 3] == 0
    off = CFG.replace(eigenscaling=False)
    assert torch.equal(eigenscale(s, keep, off)[0], torch.tensor([10.0, 6.0, 3.0, 0.0],
                                                                 dtype=s.dtype))


def test_rank_modes():
    values = torch.tensor([[50.0, 30.0, 10.0, 5.0, 3.0, 2.0] + [0.0] * 10], dtype=torch.float64)
    assert kept_eigen_mask(values, CFG.replace(reference_rank=3))[0].sum() == 3
    energy = kept_eigen_mask(values, CFG.replace(rank="energy"))[0]
    assert energy.sum() == 4  # 95/100 reached at the 4th value


@pytest.mark.parametrize("eigenscaling", [True, False])
def test_low_rank_graph_matches_full_eigendecomposition(eigenscaling):
    cfg = CFG.replace(eigenscaling=eigenscaling, reference_rank=4)
    k = _keys(b=1, h=2, n=25, d=8)
    values, vectors = gram_spectra(k)
    got = low_rank_dino_graph(k, values, vectors, cfg)
    for h in range(2):
        graph = k[0, h].double() @ k[0, h].double().T / math.sqrt(8)
        ev, evec = torch.linalg.eigh(graph)
        s, u = ev.flip(0)[:4], evec.flip(1)[:, :4]
        if eigenscaling:
            lo, hi = s.min(), s.max()
            s = (s - lo) / (hi - lo) * (1.5 * hi - 0.5 * lo) + 0.5 * lo
        direct = u @ torch.diag(s) @ u.T
        direct.fill_diagonal_(0)
        assert torch.allclose(got[0, h].double(), direct, atol=1e-4)


def test_gaussian_prior_values():
    omega = gaussian_prior((3, 4), 5.0, torch.device("cpu"))
    assert omega.shape == (12, 12)
    # patch (0,0) vs (2,3): squared distance 13
    assert math.isclose(omega[0, 11].item(), math.exp(-13 / 50), rel_tol=1e-6)
    assert torch.allclose(omega.diagonal(), torch.ones(12))


def test_value_range_mapping_fp16_matches_half_arithmetic():
    src = torch.randn(1, 2, 5, 4).half().float()
    tgt = torch.randn(1, 2, 5, 4) * 3
    got = match_value_range(src, tgt, fp16=True)
    h = src.half()
    direct = (h - h.min()) / (h.max() - h.min())
    direct = direct * (tgt.max() - tgt.min()) + tgt.min()
    assert direct.dtype == torch.float16
    assert torch.equal(got, direct.float())
    plain = match_value_range(src, tgt, fp16=False)
    assert math.isclose(plain.min().item(), tgt.min().item(), rel_tol=1e-6)
    assert math.isclose(plain.max().item(), tgt.max().item(), rel_tol=1e-6)


def test_fused_attention_is_per_crop_independent():
    k, v, kd = _keys(b=3, h=12, n=12, d=64, seed=3), _keys(b=3, h=12, n=12, d=64, seed=4), \
        _keys(b=3, h=12, n=12, d=64, seed=5)
    batched = fused_attention_output(k, v, kd, (3, 4), CFG)
    single = torch.cat([fused_attention_output(k[i:i + 1], v[i:i + 1], kd[i:i + 1], (3, 4), CFG)
                        for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)
    rows = batched.sum(-1)
    assert np.isfinite(rows.numpy()).all()

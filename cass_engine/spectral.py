"""Spectral attention fusion: the rebuilt last attention layer of CLIP (cass-spec 3-6).

Everything is batched over crops and vectorised over heads. Shapes: B crops, h heads, N patch
tokens of the CLIP grid, d = 64 channels per head. The graphs ``K K^T / sqrt(d)`` have rank at
most d, so their spectra and leading eigenvectors come from the d x d Gram matrices
``K^T K / sqrt(d)`` (same non-zero eigenvalues) and thin factors, never from N x N
eigendecompositions. The only host round trip is the h x h assignment of every crop.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .config import CassConfig

#: Kept eigenvalues whose spread is at most this fraction of the largest count as equal
#: (a flat spectrum, left unscaled by ``eigenscale``); float64 eigh is accurate to ~1e-14.
FLAT_SPECTRUM_RTOL = 1e-12


def round_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 precision, keeping the dtype (the reference keeps DINO keys in fp16)."""
    return x.to(torch.float16).to(x.dtype)


def resize_dino_keys(keys: torch.Tensor, dino_hw: tuple[int, int], clip_hw: tuple[int, int],
                     fp16: bool) -> torch.Tensor:
    """Bilinearly resize DINO keys from the DINO grid to the CLIP grid.

    Args:
        keys: ``[B, h, n_dino, d]``.
    Returns:
        ``[B, h, N, d]`` float32.
    """
    b, h, _, d = keys.shape
    x = keys.float()
    if fp16:
        x = round_fp16(x)
    grid = x.transpose(2, 3).reshape(b * h, d, *dino_hw)
    grid = F.interpolate(grid, size=clip_hw, mode="bilinear", align_corners=False)
    if fp16:
        grid = round_fp16(grid)
    return grid.reshape(b, h, d, -1).transpose(2, 3)


def match_value_range(source: torch.Tensor, target: torch.Tensor, fp16: bool) -> torch.Tensor:
    """Min-max map each crop's ``source`` into the value range of its ``target``.

    One global min and max per crop over heads, tokens and channels. With ``fp16`` every
    intermediate is rounded to float16, as in the reference. A constant ``source`` (e.g. all
    zero keys) has no range to map and becomes ``target``'s minimum.

    Args:
        source, target: ``[B, ...]``.
    """
    def extremes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.flatten(1)
        shape = (-1,) + (1,) * (x.dim() - 1)
        return flat.amin(1).view(shape), flat.amax(1).view(shape)

    s_min, s_max = extremes(source)
    t_min, t_max = extremes(target)
    r = round_fp16 if fp16 else (lambda x: x)
    unit = r(r(source - s_min) / _nonzero(r(s_max - s_min)))  # constant source -> t_min
    # float16 arithmetic with float32 scalars as the reference runs it on CPU: the product
    # takes the float32 range, the sum adds the minimum rounded to float16.
    return r(r(unit * (t_max - t_min)) + r(t_min))


def gram_spectra(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of the per-head Gram matrices ``K^T K / sqrt(d)`` in float64.

    Returns:
        eigenvalues ``[B, h, d]`` (descending) and eigenvectors ``[B, h, d, d]`` (columns).
    """
    k = keys.double()
    gram = k.transpose(-1, -2) @ k / math.sqrt(k.shape[-1])
    values, vectors = torch.linalg.eigh(gram)
    return values.flip(-1), vectors.flip(-1)


def normalized_top_spectrum(values: torch.Tensor, k_eigen: int) -> torch.Tensor:
    """Top ``k_eigen`` eigenvalues divided by the sum of their magnitudes. ``[B, h, k]``."""
    top = values[..., :k_eigen]
    return top / top.abs().sum(-1, keepdim=True).clamp_min(1e-300)


def spectral_distance(dino_spec: torch.Tensor, clip_spec: torch.Tensor) -> torch.Tensor:
    """``D[b, i, j] = sum_r |sort(dino_i)_r - sort(clip_j)_r|``. Returns ``[B, h, h]``."""
    a = dino_spec.sort(-1).values[:, :, None, :]
    c = clip_spec.sort(-1).values[:, None, :, :]
    return (a - c).abs().sum(-1)


def assign_heads(distance: torch.Tensor, pairing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Hungarian assignment on ``1 - D`` per crop; the DINO head and weight of each CLIP head.

    ``reference``: CLIP head c takes DINO head ``col[c]`` and weight ``1 - C[c, col[c]]``
    (the official code's indexing). ``matched``: CLIP head ``col[i]`` takes DINO head i and
    weight ``1 - C[i, col[i]]``.

    Returns:
        dino_index ``[B, h]`` long and weight ``[B, h]`` float32, on the input's device.
    """
    cost = (1.0 - distance).float()
    cost_np = cost.cpu().numpy()
    heads = cost.shape[-1]
    dino_index = np.empty(cost_np.shape[:2], dtype=np.int64)
    weight = np.empty(cost_np.shape[:2], dtype=np.float32)
    for b, matrix in enumerate(cost_np):
        rows, cols = linear_sum_assignment(matrix)
        pair_weight = 1.0 - matrix[rows, cols]
        if pairing == "reference":
            dino_index[b], weight[b] = cols, pair_weight
        else:
            dino_index[b, cols], weight[b, cols] = rows, pair_weight
    assert dino_index.shape[1] == heads
    device = distance.device
    return torch.from_numpy(dino_index).to(device), torch.from_numpy(weight).to(device)


def kept_eigen_mask(values: torch.Tensor, config: CassConfig) -> torch.Tensor:
    """Which eigenpairs of the DINO graph are kept. ``values`` descending ``[..., d]``.

    ``reference``: the first ``reference_rank``. ``energy``: the smallest rank whose leading
    values reach ``energy_threshold`` of the sum of the positive values (at least 1; a
    spectrum with no positive value keeps 1).
    """
    positions = torch.arange(values.shape[-1], device=values.device)
    if config.rank == "reference":
        return (positions < config.reference_rank).expand_as(values)
    total = values.clamp_min(0).sum(-1, keepdim=True)
    energy = values.clamp_min(0).cumsum(-1) / _nonzero(total)
    # a spectrum without positive energy (a zero graph) keeps one pair: rank 1, graph 0
    energy = torch.where(total > 0, energy, torch.ones_like(energy))
    rank = (energy < config.energy_threshold).sum(-1, keepdim=True) + 1
    return positions < rank


def eigenscale(values: torch.Tensor, keep: torch.Tensor, config: CassConfig) -> torch.Tensor:
    """Dynamic eigenscaling of the kept eigenvalues (identity when disabled); 0 elsewhere.

    ``phi(s) = (s - s_min) / (s_max - s_min) * (hi * s_max - lo * s_min) + lo * s_min``.

    A flat kept spectrum (one kept pair, as the energy rule gives for a rank-1 graph, or
    values equal to within ``FLAT_SPECTRUM_RTOL`` of ``s_max``) has no spread to stretch
    and is kept as it is: ``phi`` would divide by ``s_max - s_min = 0``, and every positive
    common factor gives the same fused attention (the graph is min-max rescaled later).
    """
    if not config.eigenscaling:
        return torch.where(keep, values, torch.zeros_like(values))
    big = torch.finfo(values.dtype).max
    s_min = torch.where(keep, values, torch.full_like(values, big)).amin(-1, keepdim=True)
    s_max = torch.where(keep, values, torch.full_like(values, -big)).amax(-1, keepdim=True)
    spread = s_max - s_min
    flat = spread <= FLAT_SPECTRUM_RTOL * s_max.abs()
    span = (config.eig_scale_high * s_max) - (config.eig_scale_low * s_min)
    scaled = (values - s_min) / torch.where(flat, torch.ones_like(spread), spread) * span \
        + config.eig_scale_low * s_min
    scaled = torch.where(flat, values, scaled)
    return torch.where(keep, scaled, torch.zeros_like(values))


def low_rank_dino_graph(keys: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor,
                        config: CassConfig) -> torch.Tensor:
    """Rank-limited, eigenscaled DINO graph with a zero diagonal.

    With ``K = U S V^T`` the graph is ``U (S^2/sqrt(d)) U^T``; ``U = K V / S`` for the kept
    eigenpairs of the Gram matrix (eigenvalues ``S^2 / sqrt(d)``).

    Args:
        keys: ``[B, h, N, d]`` DINO keys on the CLIP grid (already range-mapped).
        values, vectors: the Gram spectra of ``keys`` (``gram_spectra``).
    Returns:
        ``[B, h, N, N]`` float32.
    """
    keep = kept_eigen_mask(values, config)
    scaled = eigenscale(values, keep, config)
    sigma = (values.clamp_min(0) * math.sqrt(keys.shape[-1])).sqrt()
    inv_sigma = torch.where(keep & (sigma > 0), 1.0 / sigma.clamp_min(1e-300),
                            torch.zeros_like(sigma))
    basis = (keys.double() @ vectors) * inv_sigma[..., None, :]
    graph = ((basis * scaled[..., None, :]) @ basis.transpose(-1, -2)).float()
    graph.diagonal(dim1=-2, dim2=-1).zero_()
    return graph


@lru_cache(maxsize=32)
def _gaussian_prior_cpu(grid_hw: tuple[int, int], sigma: float) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(grid_hw[0]), torch.arange(grid_hw[1]), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], dim=-1).float()
    dist2 = torch.cdist(coords, coords).pow(2)
    return torch.exp(-dist2 / (2.0 * sigma * sigma))


def gaussian_prior(grid_hw: tuple[int, int], sigma: float, device: torch.device) -> torch.Tensor:
    """``omega[p, q] = exp(-|pos_p - pos_q|^2 / (2 sigma^2))`` in grid units. ``[N, N]``."""
    return _gaussian_prior_cpu(tuple(grid_hw), float(sigma)).to(device)


def fused_attention_output(k_clip: torch.Tensor, v_clip: torch.Tensor, k_dino: torch.Tensor,
                           grid_hw: tuple[int, int], config: CassConfig) -> torch.Tensor:
    """CASS attention for block 12: fuse the graphs, add the Gaussian prior, attend over V.

    Args:
        k_clip, v_clip: ``[B, h, N, d]`` CLIP keys and values of the patch tokens.
        k_dino: ``[B, h, N, d]`` DINO keys resized to the CLIP grid, range-mapped to CLIP's K.
        grid_hw: the CLIP patch grid (gh, gw) with gh * gw = N.
    Returns:
        ``[B, h, N, d]`` float32 attention output per head.
    """
    k_clip, v_clip, k_dino = k_clip.float(), v_clip.float(), k_dino.float()
    scale = 1.0 / math.sqrt(k_clip.shape[-1])
    clip_graph = k_clip @ k_clip.transpose(-1, -2) * scale
    clip_values, _ = gram_spectra(k_clip)
    dino_values, dino_vectors = gram_spectra(k_dino)
    distance = spectral_distance(normalized_top_spectrum(dino_values, config.k_eigen),
                                 normalized_top_spectrum(clip_values, config.k_eigen))
    dino_index, weight = assign_heads(distance, config.head_pairing)
    gather = dino_index[..., None, None]
    k_sel = torch.gather(k_dino, 1, gather.expand(-1, -1, *k_dino.shape[2:]))
    val_sel = torch.gather(dino_values, 1, dino_index[..., None].expand(-1, -1, k_dino.shape[-1]))
    vec_sel = torch.gather(dino_vectors, 1, gather.expand(-1, -1, *dino_vectors.shape[2:]))
    dino_graph = low_rank_dino_graph(k_sel, val_sel, vec_sel, config)
    dino_graph = _map_graph_range(dino_graph, clip_graph)
    w = (config.fusion_scale * weight)[..., None, None]
    fused = (w * dino_graph + clip_graph) / (w + 1.0)
    fused = fused + gaussian_prior(grid_hw, config.sigma, fused.device)
    return torch.softmax(fused, dim=-1) @ v_clip


def _map_graph_range(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Min-max map each ``[N, N]`` graph of ``source`` into the range of ``target``'s.

    A constant graph (a zero DINO graph) becomes ``target``'s minimum: the fused attention
    is then the CLIP graph's, scaled by ``1 / (10 w + 1)`` (a constant does not change the
    row softmax).
    """
    s_min = source.amin((-1, -2), keepdim=True)
    s_max = source.amax((-1, -2), keepdim=True)
    t_min = target.amin((-1, -2), keepdim=True)
    t_max = target.amax((-1, -2), keepdim=True)
    return (source - s_min) / _nonzero(s_max - s_min) * (t_max - t_min) + t_min


def _nonzero(denominator: torch.Tensor) -> torch.Tensor:
    """``denominator`` with its zeros replaced by 1 (their numerators are 0): divisions of
    degenerate (constant) inputs stay finite; every other value is divided as before."""
    return torch.where(denominator == 0, torch.ones_like(denominator), denominator)

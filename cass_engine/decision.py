"""From patch features to pixel decisions (cass-spec 7-8).

- ``adjusted_patch_logits``: object-presence-guided text adjustment and the logit mix.
- ``Stitcher``: sums crop logits into a canvas and divides by the per-pixel count.
- ``finalize``: resize to the input size, softmax over queries, class probabilities (max over
  synonyms), labels with the background threshold, per-class scores; in row bands so memory
  stays bounded for large images unless full tensors are asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BAND_ELEMENTS = 1 << 23  # queries x rows x width per band when full tensors are not kept


def group_membership(groups: torch.Tensor) -> torch.Tensor:
    """``[G, Q]`` bool: query q belongs to group g. ``groups`` is ``[Q]`` 0-based."""
    num_groups = int(groups.max()) + 1
    return groups[None, :] == torch.arange(num_groups, device=groups.device)[:, None]


def adjusted_patch_logits(features: torch.Tensor, queries: torch.Tensor, prior: torch.Tensor,
                          membership: torch.Tensor, alpha: float, gamma: float,
                          top_n: int) -> torch.Tensor:
    """Patch logits with object-presence-guided text embeddings.

    For each crop and group g: ``i* = argmax_{i in g} P_i`` (first on ties); the ``top_n``
    patches most similar to ``t_i*`` are averaged into ``mu``; ``t_i*`` becomes
    ``normalize((1 - alpha) t_i* + alpha normalize(mu))``. Then
    ``S* = (1 - gamma) F T~^T + gamma P``.

    Args:
        features: ``[B, N, E]`` L2-normalised patch features.
        queries: ``[Q, E]`` L2-normalised text embeddings.
        prior: ``[B, Q]`` object-presence prior (cosine of the global vector with each query).
        membership: ``[G, Q]`` bool group membership.
    Returns:
        ``[B, N, Q]`` float32 logits.
    """
    b, n, e = features.shape
    masked = prior[:, None, :].masked_fill(~membership[None], float("-inf"))
    best = masked.argmax(-1)  # [B, G]
    t_best = queries[best]  # [B, G, E]
    sims = t_best @ features.transpose(1, 2)  # [B, G, N]
    top = sims.topk(min(top_n, n), dim=-1).indices  # [B, G, n]
    picked = torch.gather(features[:, None].expand(-1, top.shape[1], -1, -1), 2,
                          top[..., None].expand(-1, -1, -1, e))
    mu = F.normalize(picked.mean(2), dim=-1)
    adjusted = F.normalize((1 - alpha) * t_best + alpha * mu, dim=-1)
    text = queries[None].expand(b, -1, -1).clone()
    text.scatter_(1, best[..., None].expand(-1, -1, e), adjusted)
    logits = features @ text.transpose(1, 2)
    return (1 - gamma) * logits + gamma * prior[:, None, :]


class Stitcher:
    """Accumulates crop logits ``[Q, h, w]`` into an image canvas and averages overlaps."""

    def __init__(self, num_queries: int, hw: tuple[int, int], device: torch.device) -> None:
        self.canvas = torch.zeros(num_queries, *hw, device=device)
        self.count = torch.zeros(1, *hw, device=device)

    def add(self, logits: torch.Tensor, box: tuple[int, int, int, int]) -> None:
        y1, x1, y2, x2 = box
        self.canvas[:, y1:y2, x1:x2] += logits
        self.count[:, y1:y2, x1:x2] += 1

    def result(self) -> torch.Tensor:
        if bool((self.count == 0).any()):
            raise RuntimeError("crop grid left pixels uncovered")
        return self.canvas / self.count


def class_ranges(query_to_class: list[int]) -> list[tuple[int, int]]:
    """Contiguous query index range ``[start, end)`` of every class."""
    ranges: list[tuple[int, int]] = []
    for q, c in enumerate(query_to_class):
        if c == len(ranges):
            ranges.append((q, q + 1))
        elif c == len(ranges) - 1:
            ranges[-1] = (ranges[-1][0], q + 1)
        else:
            raise ValueError("queries must be grouped class by class")
    return ranges


def max_over_synonyms(values: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """Per-class max over each class's queries along dim 0: ``[Q, ...] -> [C, ...]``."""
    if len(ranges) == values.shape[0]:
        return values
    return torch.stack([values[s:e].amax(0) for s, e in ranges])


def resize_matrix(out_size: int, in_size: int, device: torch.device) -> torch.Tensor:
    """``[out, in]`` bilinear (align_corners=False) resampling matrix along one axis."""
    eye = torch.eye(in_size, device=device)[None]
    return F.interpolate(eye, size=out_size, mode="linear", align_corners=False)[0].T


def bilinear_taps(out_size: int, in_size: int, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(first, second, weight)`` per output index: bilinear (align_corners=False) resampling
    is ``x[first] * (1 - weight) + x[second] * weight``, with F.interpolate's own weights."""
    matrix = resize_matrix(out_size, in_size, device)  # at most two non-zeros per row
    _, index = matrix.topk(min(2, in_size), dim=1)
    first, second = index.min(1).values, index.max(1).values
    weight = matrix.gather(1, second[:, None])[:, 0]
    weight = torch.where(first == second, torch.zeros_like(weight), weight)
    return first, second, weight


def _blend(x: torch.Tensor, taps: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
           rows: slice, dim: int) -> torch.Tensor:
    """Resample ``x`` along ``dim`` at output positions ``rows`` of ``taps``."""
    first, second, weight = (t[rows] for t in taps)
    shape = [1] * x.dim()
    shape[dim] = -1
    weight = weight.view(shape)
    return (x.index_select(dim, first) * (1 - weight)
            + x.index_select(dim, second) * weight)


@dataclass
class Decision:
    """Per-image outputs of ``finalize``; see ``SegmentationResult`` for the meaning."""

    labels: torch.Tensor
    pixel_fraction: torch.Tensor
    mask_scores: torch.Tensor
    logits: torch.Tensor | None
    probs: torch.Tensor | None
    confidence: torch.Tensor | None = None


def finalize(logits_small: torch.Tensor, out_hw: tuple[int, int], ranges: list[tuple[int, int]],
             logit_scale: float, prob_thd: float, keep_full: bool) -> Decision:
    """Resize logits to the input size and decide pixel labels.

    Args:
        logits_small: ``[Q, h, w]`` stitched logits at the resized-image size.
        out_hw: input image size (H, W).
        keep_full: also return ``logits [Q, H, W]`` and ``probs [C, H, W]``.

    The per-pixel ``confidence`` ``[H, W]`` float32 (the probability of the class in
    ``labels``: the winning class probability, or class 0's probability where ``prob_thd``
    sent the pixel to class 0) is always returned; it is decided band by band like the labels.
    """
    q, h, w = logits_small.shape
    height, width = out_hw
    device = logits_small.device
    # Separable bilinear resize, band by band of output rows: each output row and column
    # blends two source taps (F.interpolate's weights), so the work and memory per band are
    # O(Q x band x W) and nothing ever holds a full [Q, H, W] unless it was asked for.
    rows_t = None if h == height else bilinear_taps(height, h, device)
    cols_t = None if w == width else bilinear_taps(width, w, device)
    by_row = logits_small.permute(1, 0, 2)  # [h, Q, w]
    band = height if keep_full else max(1, BAND_ELEMENTS // max(1, q * width))
    labels = torch.empty(out_hw, dtype=torch.long, device=device)
    confidence = torch.empty(out_hw, dtype=torch.float32, device=device)
    score_sum = torch.zeros(len(ranges), dtype=torch.float64, device=device)
    full_logits, full_probs = [], []
    for y0 in range(0, height, band):
        rows = (by_row[y0:y0 + band] if rows_t is None
                else _blend(by_row, rows_t, slice(y0, y0 + band), dim=0))  # [band, Q, w]
        part = rows if cols_t is None else _blend(rows, cols_t, slice(None), dim=2)
        part = part.permute(1, 0, 2)  # [Q, band, W]
        probs = max_over_synonyms(torch.softmax(part * logit_scale, dim=0), ranges)
        best_prob, best = probs.max(0)
        best[best_prob < prob_thd] = 0
        labels[y0:y0 + band] = best
        chosen = probs.gather(0, best[None])[0]
        confidence[y0:y0 + band] = chosen
        score_sum.index_add_(0, best.flatten(), chosen.flatten().double())
        if keep_full:
            full_logits.append(part)
            full_probs.append(probs)
    counts = torch.bincount(labels.flatten(), minlength=len(ranges)).double()
    scores = torch.where(counts > 0, score_sum / counts.clamp_min(1), torch.zeros_like(counts))
    return Decision(labels, (counts / labels.numel()).float(), scores.float(),
                    torch.cat(full_logits, 1) if keep_full else None,
                    torch.cat(full_probs, 1) if keep_full else None, confidence)

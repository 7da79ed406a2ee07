"""A slow, literal formulation of the reference CASS behaviour, for fidelity tests only.

It follows the official implementation step by step, at batch size 1 and with its data path:
crops one at a time, the whole image re-encoded for the prior of every crop, the DINO input
rebuilt through PIL (un-normalisation with the blue-std typo, uint8 truncation, PIL bicubic
square resize), DINO keys in float16, N x N graphs with full float64 eigendecompositions,
heads in Python loops, the randomized rank-10 ``torch.svd_lowrank``, per-group Python loops
for the text adjustment. It shares nothing with ``cass_engine`` but the backbones' modules.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment

CLIP_MEAN = [122.771, 116.746, 104.094]
CLIP_STD = [68.501, 66.632, 70.323]
IMNET_MEAN = [0.485, 0.456, 0.406]
IMNET_STD = [0.229, 0.224, 0.225]
TYPO_STD = [0.229, 0.224, 0.255]
EXACT_LOW_RANK = False  # True: exact top-10 eigenpairs instead of the randomized SVD


def _pos(pos_embed, h, w, patch):
    n_tok = (h // patch) * (w // patch)
    n = pos_embed.shape[0] - 1
    if n_tok == n and h == w:
        return pos_embed
    side = int(math.sqrt(n))
    grid = pos_embed[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, mode="bicubic", align_corners=False, recompute_scale_factor=False,
                         scale_factor=((h // patch + 0.1) / side, (w // patch + 0.1) / side))
    return torch.cat([pos_embed[:1], grid.permute(0, 2, 3, 1).reshape(-1, grid.shape[1])])


def _clip_tokens(visual, x):
    h, w = x.shape[-2:]
    t = visual.conv1(x).flatten(2).transpose(1, 2)
    t = torch.cat([visual.class_embedding.expand(1, 1, -1), t], 1) + _pos(
        visual.positional_embedding, h, w, 16)
    t = visual.ln_pre(t)
    for blk in visual.transformer.resblocks[:-1]:
        t = blk(t)
    return t


def _cls(visual, tokens):
    out = visual.transformer.resblocks[-1](tokens)
    v = visual.ln_post(out[:, 0]) @ visual.proj
    return v / v.norm(dim=-1, keepdim=True)


def _inv_image(crop_norm):
    x = crop_norm[0].clone()
    for c in range(3):  # CLIP-normalised -> ImageNet un-normalisation with the 0.255 typo
        x[c] = (x[c] - (-IMNET_MEAN[c] / TYPO_STD[c])) / (1 / TYPO_STD[c])
    arr = x.permute(1, 2, 0).numpy() * 255
    return Image.fromarray(arr.astype("uint8"))


def _dino_key(dino, pil):
    arr = torch.from_numpy(np.asarray(pil)).permute(2, 0, 1).float() / 255
    for c in range(3):
        arr[c] = (arr[c] - IMNET_MEAN[c]) / IMNET_STD[c]
    h, w = arr.shape[1] - arr.shape[1] % 8, arr.shape[2] - arr.shape[2] % 8
    x = arr[:, :h, :w][None]
    t = dino.patch_embed.proj(x).flatten(2).transpose(1, 2)
    t = torch.cat([dino.cls_token, t], 1) + _pos(dino.pos_embed[0], h, w, 8)
    for blk in dino.blocks[:-1]:
        t = blk(t)
    last = dino.blocks[-1]
    qkv = last.attn.qkv(last.norm1(t)).reshape(1, t.shape[1], 3, 12, 64).permute(2, 0, 3, 1, 4)
    return qkv[1, 0, :, 1:, :], (h // 8, w // 8)  # [12, n, 64]


def _spectrum(adj, k):
    vals = [torch.sort(torch.linalg.eigvalsh(a), descending=True)[0][:k] for a in adj]
    return torch.stack(vals)


def _scale(s, on):
    if not on:
        return s
    lo, hi = s.min(), s.max()
    return (s - lo) / (hi - lo) * (1.5 * hi - 0.5 * lo) + 0.5 * lo


def _range(src, tgt):
    return (src - src.min()) / (src.max() - src.min()) * (tgt.max() - tgt.min()) + tgt.min()


def _omega(gh, gw, sigma):
    pts = [(r, c) for r in range(gh) for c in range(gw)]
    out = torch.zeros(len(pts), len(pts))
    for p, (r1, c1) in enumerate(pts):
        for q, (r2, c2) in enumerate(pts):
            out[p, q] = math.exp(-((r1 - r2) ** 2 + (c1 - c2) ** 2) / (2 * sigma ** 2))
    return out


def _reduced_features(clip, dino, x_norm, inv, cfg):
    visual = clip.visual
    h, w = x_norm.shape[-2:]
    gh, gw = h // 16, w // 16
    small = min(h, w)
    inv = inv.resize((small, small))  # PIL default filter for RGB: bicubic
    dkey, dgrid = _dino_key(dino, inv)
    dkey = dkey.half().permute(0, 2, 1).reshape(12, 64, *dgrid)
    dkey = F.interpolate(dkey, size=(gh, gw), mode="bilinear", align_corners=False)
    dkey = dkey.reshape(12, 64, gh * gw).permute(0, 2, 1)
    tokens = _clip_tokens(visual, x_norm)
    x_last = _cls(visual, tokens)
    blk = visual.transformer.resblocks[-1]
    y = blk.ln_1(tokens)[0]
    _, k, v = F.linear(y, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, -1)
    k = k.reshape(-1, 12, 64).transpose(0, 1)[:, 1:]
    v = v.reshape(-1, 12, 64).transpose(0, 1)[:, 1:]
    dkey = (dkey - dkey.min()) / (dkey.max() - dkey.min())
    dkey = dkey * (k.max() - k.min()) + k.min()  # stays float16, as in the reference
    a_clip = torch.bmm(k, k.transpose(1, 2)) * 0.125
    a_dino = torch.bmm(dkey, dkey.transpose(1, 2)) * 0.125  # float16, as in the reference
    ld = _spectrum(a_dino.double(), cfg.k_eigen)
    lc = _spectrum(a_clip.double(), cfg.k_eigen)
    ld, lc = F.normalize(ld, p=2, dim=1), F.normalize(lc, p=2, dim=1)
    cost = torch.zeros(12, 12)
    for i in range(12):
        for j in range(12):
            pd = F.normalize(ld[i][None], p=1, dim=-1)
            pc = F.normalize(lc[j][None], p=1, dim=-1)
            cost[i, j] = 1 - (torch.sort(pd)[0] - torch.sort(pc)[0]).abs().sum()
    rows, cols = linear_sum_assignment(cost.numpy())
    combined = torch.zeros_like(a_clip)
    torch.manual_seed(0)
    for idx in range(12):
        i, j = rows[idx], cols[idx]
        wd = 1 - cost[i, j]
        if EXACT_LOW_RANK:
            ev, evec = torch.linalg.eigh(a_dino[j].double())
            u, s = evec[:, -10:].flip(-1), ev[-10:].flip(-1)
            vv = u
        else:
            u, s, vv = torch.svd_lowrank(a_dino[j].double(), q=10)
        approx = u @ torch.diag(_scale(s, cfg.eigenscaling)) @ vv.T
        approx.fill_diagonal_(0)
        approx = _range(approx, a_clip[i])
        combined[idx] = (wd * 10 * approx + a_clip[i]) / (wd * 10 + 1)
    attn = torch.softmax(combined + _omega(gh, gw, cfg.sigma), dim=-1)
    out = torch.bmm(attn, v).transpose(0, 1).reshape(-1, 768)
    out = blk.attn.out_proj(out)
    feats = visual.ln_post(out) @ visual.proj
    return feats / feats.norm(dim=-1, keepdim=True), x_last, (gh, gw)


def _adjust(feats, queries, prior, groups, alpha):
    sims = prior.numpy()
    adjusted = queries.clone()
    for g in range(len(set(groups.tolist()))):
        members = np.where(groups == g)[0]
        best = int(members[np.argmax(sims[members])])
        t = F.normalize(queries[best][None], dim=1)
        top = torch.topk((F.normalize(feats, dim=1) @ t.T).squeeze(1), min(2, feats.shape[0]))[1]
        mu = F.normalize(feats[top].mean(0), dim=0)
        adjusted[best] = F.normalize((1 - alpha) * t[0] + alpha * mu, dim=0)
    return adjusted


def _forward_feature(clip, dino, crop, whole, queries, groups, cfg):
    feats, x_last, (gh, gw) = _reduced_features(clip, dino, crop, _inv_image(crop), cfg)
    if whole is None:
        prior = (x_last @ queries.T)[0]
    else:
        prior = (_cls(clip.visual, _clip_tokens(clip.visual, whole)) @ queries.T)[0]
    adjusted = _adjust(feats, queries, prior, groups, cfg.alpha)
    logits = (feats @ adjusted.T) * (1 - cfg.gamma) + prior[None] * cfg.gamma
    logits = logits.T.reshape(1, -1, gh, gw)
    return F.interpolate(logits, size=crop.shape[-2:], mode="bilinear", align_corners=False)


@torch.no_grad()
def reference_probs(clip, dino, cfg, queries, groups, query_to_class, image_resized, out_hw):
    """Class probabilities ``[C, H, W]`` of the reference algorithm.

    Args:
        image_resized: ``[3, h, w]`` uint8, already resized to the preset's short side.
        out_hw: original image size to resize the logits back to.
    """
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    img = ((image_resized.float() - mean) / std)[None]
    h, w = img.shape[-2:]
    if cfg.slide_crop is None:
        logits = _forward_feature(clip, dino, img, None, queries, groups, cfg)
    else:
        crop, stride = cfg.slide_crop, cfg.slide_stride
        preds = torch.zeros(1, queries.shape[0], h, w)
        count = torch.zeros(1, 1, h, w)
        for r in range(max(h - crop + stride - 1, 0) // stride + 1):
            for c in range(max(w - crop + stride - 1, 0) // stride + 1):
                y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                whole = None if cfg.prior_source == "crop" else img
                out = _forward_feature(clip, dino, img[:, :, y1:y2, x1:x2], whole, queries,
                                       groups, cfg)
                preds += F.pad(out, (x1, w - x2, y1, h - y2))
                count[:, :, y1:y2, x1:x2] += 1
        logits = preds / count
    logits = F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False)[0]
    probs = torch.softmax(logits * cfg.logit_scale, 0)
    q2c = torch.tensor(query_to_class)
    num_cls = int(q2c.max()) + 1
    if num_cls != len(query_to_class):
        onehot = F.one_hot(q2c).T.view(num_cls, -1, 1, 1)
        probs = (probs[None] * onehot).max(1)[0]
    return probs

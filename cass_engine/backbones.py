"""What CASS needs from the two backbones, reached through the registries' own modules.

- CLIP (open_clip ``ViT-B-16-quickgelu``): blocks 1..11 as they are; from block 12 either the
  ordinary CLS embedding or its key/value projections of the patch tokens.
- DINO (timm ``vit_base_patch8_224.dino``): blocks 1..11 with fused attention, then only the
  qkv projection of block 12 for the keys. Nothing after it runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .preprocess import CLIP_PATCH, DINO_PATCH, interpolate_pos_embed


def clip_block11_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Run CLIP's patch embedding and blocks 1..11 on normalised images.

    Args:
        visual: open_clip ``VisionTransformer``.
        images: ``[B, 3, H, W]`` CLIP-normalised (H, W floored to multiples of 16 by the conv).
    Returns:
        ``[B, 1 + gh*gw, 768]`` tokens after block 11 (class token first).
    """
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = interpolate_pos_embed(visual.positional_embedding, tuple(images.shape[-2:]), CLIP_PATCH)
    x = visual.ln_pre(x + pos.to(x.dtype))
    batch_first = getattr(visual.transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    return x if batch_first else x.transpose(0, 1)


def clip_cls_embedding(visual: nn.Module, tokens11: torch.Tensor) -> torch.Tensor:
    """The ordinary CLIP image embedding from block-11 tokens (block 12 in full, CLS pooled).

    Returns:
        ``[B, 512]`` L2-normalised float32.
    """
    block = visual.transformer.resblocks[-1]
    batch_first = getattr(visual.transformer, "batch_first", True)
    x = block(tokens11 if batch_first else tokens11.transpose(0, 1))
    x = x if batch_first else x.transpose(0, 1)
    cls = visual.ln_post(x[:, 0]) @ visual.proj
    return F.normalize(cls.float(), dim=-1)


def clip_last_keys_values(visual: nn.Module,
                          tokens11: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of block 12 for the patch tokens (class token dropped).

    Returns:
        keys, values: each ``[B, heads, N, head_dim]`` (values include the projection bias).
    """
    attn = visual.transformer.resblocks[-1].attn
    y = visual.transformer.resblocks[-1].ln_1(tokens11[:, 1:])
    _, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    b, n, d = k.shape
    heads = attn.num_heads
    k = k.reshape(b, n, heads, d // heads).transpose(1, 2)
    v = v.reshape(b, n, heads, d // heads).transpose(1, 2)
    return k, v


def clip_patch_features(visual: nn.Module, heads_out: torch.Tensor) -> torch.Tensor:
    """Project the fused attention output of block 12 to CLIP's embedding space.

    Args:
        heads_out: ``[B, heads, N, head_dim]`` attention output per head (M_h V_h).
    Returns:
        ``[B, N, 512]`` L2-normalised float32 patch features F.
    """
    attn = visual.transformer.resblocks[-1].attn
    b, h, n, d = heads_out.shape
    z = heads_out.transpose(1, 2).reshape(b, n, h * d)
    z = F.linear(z.to(attn.out_proj.weight.dtype), attn.out_proj.weight, attn.out_proj.bias)
    out = visual.ln_post(z) @ visual.proj
    return F.normalize(out.float(), dim=-1)


def dino_last_keys(dino: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Keys of DINO's last block for the patch tokens.

    Positional embeddings are resampled the way the official DINO code does (see
    ``interpolate_pos_embed``); blocks 1..11 use their own (fused) attention; of block 12 only
    ``norm1`` and the qkv projection run.

    Args:
        dino: timm ``VisionTransformer`` (``vit_base_patch8_224.dino``).
        images: ``[B, 3, H, W]`` ImageNet-normalised, H and W multiples of 8.
    Returns:
        ``[B, heads, gh*gw, head_dim]`` keys.
    """
    x = dino.patch_embed.proj(images.to(dino.patch_embed.proj.weight.dtype))
    x = x.flatten(2).transpose(1, 2)
    cls = dino.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
    pos = interpolate_pos_embed(dino.pos_embed[0], tuple(images.shape[-2:]), DINO_PATCH)
    x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
    x = dino.norm_pre(x)
    for block in dino.blocks[:-1]:
        x = block(x)
    last = dino.blocks[-1]
    qkv = last.attn.qkv(last.norm1(x[:, 1:]))
    b, n, _ = qkv.shape
    qkv = qkv.reshape(b, n, 3, last.attn.num_heads, -1)
    return qkv[:, :, 1].transpose(1, 2)

"""The two backbones' architectures, built from their libraries' registries.

CLIP ViT-B/16 is open_clip's ``ViT-B-16-quickgelu`` (QuickGELU, as OpenAI trained it), DINO
ViT-B/8 is timm's ``vit_base_patch8_224.dino`` without a classifier head. Each is built empty
(to load a checkpoint into), with the registry's random initialisation under a fixed seed,
or with the weights of the libraries' own hubs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

CLIP_MODEL_NAME = "ViT-B-16-quickgelu"
DINO_MODEL_NAME = "vit_base_patch8_224.dino"
CLIP_PRETRAINED_TAG = "openai"


class Backbone(NamedTuple):
    """What one backbone is and which file its flag expects (for records and messages)."""

    model_id: str  # WeightsInfo.model
    hub_tag: str  # WeightsInfo.source is "hub:<hub_tag>" for hub weights
    family: str  # as fit.check_family names it
    flag: str  # the CLI flag that takes the file
    what: str  # the file the flag expects, for messages


CLIP = Backbone(f"open_clip:{CLIP_MODEL_NAME}", CLIP_PRETRAINED_TAG, "CLIP", "--clip-weights",
                "a CLIP ViT-B/16 checkpoint (OpenAI ViT-B-16.pt or open_clip ViT-B-16)")
DINO = Backbone(f"timm:{DINO_MODEL_NAME}", "dino", "DINO/timm ViT", "--dino-weights",
                "a DINO ViT-B/8 checkpoint (dino_vitbase8_pretrain.pth or timm's weights)")


def build_clip(hub: bool = False, hub_cache_dir: str | None = None) -> torch.nn.Module:
    """open_clip ``ViT-B-16-quickgelu``: randomly initialised, or with the hub's OpenAI weights
    (downloaded into ``hub_cache_dir``; None: open_clip's default cache)."""
    import open_clip

    kwargs: dict[str, Any] = {"pretrained": CLIP_PRETRAINED_TAG if hub else None}
    if hub:
        kwargs["cache_dir"] = hub_cache_dir
    with _quiet_random_init_notice():
        return open_clip.create_model(CLIP_MODEL_NAME, **kwargs)


def build_dino(hub: bool = False, hub_cache_dir: str | None = None) -> torch.nn.Module:
    """timm ``vit_base_patch8_224.dino`` without a head: randomly initialised, or with the
    hub's DINO weights (downloaded into ``hub_cache_dir``; None: timm's default cache)."""
    import timm

    kwargs = {"cache_dir": hub_cache_dir} if hub and hub_cache_dir else {}
    return timm.create_model(DINO_MODEL_NAME, pretrained=hub, num_classes=0, **kwargs)


def dino_checkpoint_filter() -> Callable[[dict, torch.nn.Module], dict]:
    """timm's own key conversion for ViT checkpoints (applied after the fit check)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn


def seeded(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """``build()`` under ``torch.manual_seed(seed)``, leaving the caller's RNG state alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def finalize(model: torch.nn.Module) -> torch.nn.Module:
    """CPU, float32, eval mode, no gradients."""
    model = model.to(device="cpu", dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


def missing_hub_weights() -> list[str]:
    """The weight flags (``--clip-weights``, ``--dino-weights``) whose hub weights are not in
    the local Hugging Face cache (nothing is downloaded; no network access).

    Returns:
        The flags whose default weights a run without network access could not load.
    """
    import open_clip
    import timm
    from huggingface_hub import try_to_load_from_cache

    clip_repo = open_clip.get_pretrained_cfg(CLIP_MODEL_NAME, CLIP_PRETRAINED_TAG)["hf_hub"]
    wanted = {
        CLIP.flag: (clip_repo.strip("/"), ("open_clip_model.safetensors",
                                           "open_clip_pytorch_model.bin")),
        DINO.flag: (timm.models.get_pretrained_cfg(DINO_MODEL_NAME).hf_hub_id,
                    ("model.safetensors", "pytorch_model.bin")),
    }
    return [flag for flag, (repo, names) in wanted.items()
            if not any(isinstance(try_to_load_from_cache(repo, name), str) for name in names)]


class _RandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init_notice() -> Iterator[None]:
    """Hide open_clip's "initialized randomly" notice: weights are loaded right after (or
    random weights were asked for and are recorded as such)."""
    notice = _RandomInitNotice()
    logging.getLogger().addFilter(notice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(notice)

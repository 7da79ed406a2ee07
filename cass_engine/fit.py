"""Fit checks: does a state dict fit the backbone's architecture exactly?

Nothing is resized, dropped or filled in: a checkpoint of the other backbone is named as such
before any model is built, and any missing, unexpected or differently shaped tensor is listed
together with the file the flag expects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .registry import Backbone
from .staging import WeightsError


def check_family(state: Mapping[str, Any], shown: str, expected: Backbone) -> None:
    """Fails fast, before building a model, on a checkpoint of the other backbone.

    Args:
        state: the checkpoint's tensors by (normalised) key.
        shown: the file as messages name it.
        expected: the backbone the checkpoint was given for.

    Raises:
        WeightsError: the keys are those of the other backbone.
    """
    if any(k.startswith("visual.") for k in state) or "token_embedding.weight" in state:
        family = "CLIP"
    elif "patch_embed.proj.weight" in state or "blocks.0.attn.qkv.weight" in state:
        family = "DINO/timm ViT"
    else:
        return  # unrecognised: check_fit lists what does not fit
    if family != expected.family:
        raise WeightsError(f"{shown} looks like a {family} checkpoint; {_wanted(expected)}")


def check_fit(model: torch.nn.Module, state: Mapping[str, torch.Tensor], shown: str,
              expected: Backbone) -> None:
    """Checks that ``state`` has exactly the model's keys, each with the model's shape.

    Args:
        model: the registry model the state is for.
        state: the checkpoint's tensors by (normalised) key.
        shown: the file as messages name it.
        expected: the backbone (for the flag and the file it expects).

    Raises:
        WeightsError: naming the file, what it should be and up to four keys of each problem.
    """
    wanted = model.state_dict()
    problems = {
        "missing": [k for k in wanted if k not in state],
        "unexpected": [k for k in state if k not in wanted],
        "shape": [
            f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
            for k, v in wanted.items()
            if k in state and state[k].shape != v.shape
        ],
    }
    if any(problems.values()):
        details = "; ".join(f"{name}: {_some(keys)}" for name, keys in problems.items() if keys)
        raise WeightsError(f"{shown} does not fit: {_wanted(expected)} ({details})")


def _wanted(expected: Backbone) -> str:
    return f"{expected.flag} expects {expected.what}"


def _some(items: list[str], limit: int = 4) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more

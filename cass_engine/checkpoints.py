"""Checkpoint formats: state dicts read from the weight files users have, without running code.

The container is detected by content, not by file name: OpenAI's TorchScript archive (its
tensors read by the restricted reader in :mod:`cass_engine.torchscript`, never
``torch.jit.load``), safetensors, or a torch pickle read with ``weights_only=True``. The
tensors are then unwrapped (``teacher``, ``state_dict`` or ``model``), their keys normalised
(``module.``/``backbone.`` prefixes dropped, as open_clip's loader does) and cast to float32.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

import torch

from .staging import WeightsError, first_line
from .torchscript import UnsafeArchiveError, is_torchscript, read_torchscript_state

ACCEPTED_FORMATS = (
    "Accepted weight files: OpenAI's TorchScript ViT-B-16.pt (its tensors are read without "
    "running it), state dicts saved with torch.save (read with weights_only=True) and "
    "safetensors files; no weights file ever runs code."
)
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_WRAPPER_KEYS = ("teacher", "state_dict", "model")  # checked in this order
_KEY_PREFIXES = ("module.", "backbone.")


def read_clip_state(path: str, shown: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Reads a CLIP checkpoint into open_clip keys (float32).

    Args:
        path: the local file.
        shown: how messages name the file (the public URL of a staged copy; default ``path``).

    Returns:
        The state dict and its format: ``"openai-torchscript"``, ``"openai-state-dict"`` or
        ``"open_clip"``.

    Raises:
        WeightsError: not a readable checkpoint of tensors (the message names ``shown``).
    """
    shown = shown or path
    obj, container = _read_checkpoint(path, shown)
    raw, wrapper = _unwrap(obj, shown)
    state = _normalize(raw, shown)
    for key in _OPENAI_EXTRA_KEYS:
        state.pop(key, None)
    if container == "torchscript":
        return state, "openai-torchscript"
    prefixed = any(str(k).startswith("module.") for k in raw)
    is_open_clip = wrapper is not None or prefixed or container == "safetensors"
    return state, "open_clip" if is_open_clip else "openai-state-dict"


def read_dino_state(path: str, shown: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Reads a DINO/timm checkpoint into timm keys (float32, projection head dropped).

    Args:
        path: the local file.
        shown: how messages name the file (the public URL of a staged copy; default ``path``).

    Returns:
        The state dict and its format: ``"dino-official"`` or ``"timm"``.

    Raises:
        WeightsError: not a readable checkpoint of tensors (the message names ``shown``).
    """
    shown = shown or path
    obj, container = _read_checkpoint(path, shown)
    raw, wrapper = _unwrap(obj, shown)
    state = {k: v for k, v in _normalize(raw, shown).items() if not k.startswith("head.")}
    is_dino = container == "pickle" and wrapper in (None, "teacher")
    return state, "dino-official" if is_dino else "timm"


def _read_checkpoint(path: str, shown: str) -> tuple[Any, str]:
    """Loads a TorchScript archive, a safetensors file or a weights-only torch pickle."""
    try:
        if is_torchscript(path):  # read without running its code (never torch.jit.load)
            return read_torchscript_state(path), "torchscript"
        if _is_safetensors(path):
            return _load_safetensors(path, shown), "safetensors"
        with torch.serialization.safe_globals([argparse.Namespace]):  # DINO training "args"
            return torch.load(path, map_location="cpu", weights_only=True), "pickle"
    except WeightsError:
        raise
    except UnsafeArchiveError as e:
        raise WeightsError(
            f"{shown} is a TorchScript archive that cannot be read without running its code "
            f"({e}); refused. {ACCEPTED_FORMATS}") from None
    except Exception as e:
        raise WeightsError(
            f"{shown} is not a readable PyTorch checkpoint ({type(e).__name__}: {first_line(e)}); "
            "is it truncated, an HTML error page or another kind of file? Download it again "
            "and check its sha256."
        ) from e


def _load_safetensors(path: str, shown: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise WeightsError(
            f"{shown} is a safetensors file but the 'safetensors' package is not installed; "
            "install it, or convert the file with torch.save"
        ) from e
    return load_file(path, device="cpu")


def _is_safetensors(path: str) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length and a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") < os.path.getsize(path)


def _unwrap(obj: Any, shown: str) -> tuple[Mapping, str | None]:
    """Returns the tensor mapping of a checkpoint and the wrapper key it sat under, if any."""
    wrapper = None
    if isinstance(obj, Mapping):
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    raw = obj[wrapper] if wrapper else obj
    if not isinstance(raw, Mapping) or not raw:
        raise WeightsError(f"{shown} holds a {type(raw).__name__}, not a state dict of tensors")
    return raw, wrapper


def _normalize(raw: Mapping, shown: str) -> dict[str, torch.Tensor]:
    """Strips ``module.``/``backbone.`` prefixes and casts floating tensors to float32."""
    state = {}
    for key, value in raw.items():
        key = str(key)
        if not isinstance(value, torch.Tensor):
            if key in _OPENAI_EXTRA_KEYS:
                continue
            raise WeightsError(f"{shown}: entry {key!r} is a {type(value).__name__}, not a tensor")
        while key.startswith(_KEY_PREFIXES):
            key = key.split(".", 1)[1]
        state[key] = value.float() if value.is_floating_point() else value
    return state

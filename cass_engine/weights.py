"""Backbone weights: CLIP ViT-B/16 and DINO ViT-B/8 built from their registries, weights loaded.

Weights come from the libraries' own hubs (``source=None``), from a checkpoint file or fsspec
URL in one of the formats users have (detected by content, not by file name), or from the
registry's random initialisation under a fixed seed (smoke tests). A checkpoint must fit the
model exactly: nothing is resized, dropped (except DINO's projection head) or filled in, and
a failed download never falls back to random weights. ``open_clip.load_checkpoint`` and
``build_model_from_openai_state_dict`` are not used as is because the first silently
resamples positional embeddings and the second accepts any CLIP architecture and keeps it
half float16; their key normalisation is reproduced (:mod:`cass_engine.checkpoints`) and
loaded strictly into the registry model (:mod:`cass_engine.registry`,
:mod:`cass_engine.fit`). URLs are staged once per node (:mod:`cass_engine.staging`); the
recorded source is the URL without credentials, with the file's sha256.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from schemas.uris import public_uri

from . import registry
from .checkpoints import read_clip_state, read_dino_state
from .fit import check_family, check_fit
from .registry import CLIP, DINO, Backbone
from .staging import (
    WeightsError,
    check_weight_choice,
    file_sha256,
    first_line,
    is_remote,
    stage_weights,
)

if TYPE_CHECKING:
    import open_clip
    import timm

__all__ = ["WEIGHTS_REMEDY", "WeightsError", "WeightsInfo", "load_clip", "load_dino"]

WEIGHTS_REMEDY = (
    "Without network access, pre-stage the weight files and pass their paths or URLs: "
    "--clip-weights PATH_OR_URL/ViT-B-16.pt (OpenAI CLIP ViT-B/16) and "
    "--dino-weights PATH_OR_URL/dino_vitbase8_pretrain.pth (official DINO ViT-B/8); "
    "or pass --random-weights SEED for smoke tests (random weights, meaningless labels)."
)

Reader = Callable[[str, str], tuple[dict[str, torch.Tensor], str]]


@dataclass(frozen=True)
class WeightsInfo:
    """Identity of loaded weights, for the run record.

    Attributes:
        model: registry and name, e.g. ``"open_clip:ViT-B-16-quickgelu"``.
        source: ``"hub:TAG"``, a local path, a URL without credentials or query (never the
            staged copy's path), or ``"random:SEED"``.
        format: ``"openai-state-dict"``, ``"openai-torchscript"``, ``"open_clip"``,
            ``"dino-official"``, ``"timm"``, ``"hub"`` or ``"random"``.
        sha256: hex digest of the weight file when there is one, else ``None``.
        random_seed: the seed of random weights, else ``None``.
    """

    model: str
    source: str
    format: str
    sha256: str | None
    random_seed: int | None

    def to_dict(self) -> dict:
        """Returns the fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


def load_clip(
    source: str | None = None,
    *,
    random_seed: int | None = None,
    cache_dir: str | None = None,
    hub_cache_dir: str | None = None,
    storage_options: dict | None = None,
) -> tuple[open_clip.model.CLIP, WeightsInfo]:
    """Builds open_clip ``ViT-B-16-quickgelu`` (QuickGELU, as OpenAI trained it) with weights.

    Args:
        source: path or fsspec URL of an OpenAI TorchScript ``ViT-B-16.pt``, an OpenAI or
            open_clip state dict (``.pt``/``.pth``/``.bin``/``.safetensors``); ``None``: the hub.
        random_seed: use the seeded random initialisation instead (``source`` must be ``None``).
        cache_dir: staging folder for URLs (default ``$CASS_CACHE_DIR/weights``, i.e.
            ``~/.cache/cass_engine/weights``).
        hub_cache_dir: open_clip's download cache for the hub (``None``: its default).
        storage_options: fsspec options for a ``source`` URL (endpoint, credentials).

    Returns:
        The model (CPU, float32, eval mode, ``requires_grad`` off) and its :class:`WeightsInfo`.

    Raises:
        ValueError: both ``source`` and ``random_seed``.
        WeightsError: the weights cannot be found, fetched or read, or do not fit the model.
    """
    def from_hub() -> torch.nn.Module:  # open_clip's own cached download
        return registry.build_clip(hub=True, hub_cache_dir=hub_cache_dir)

    if source is None:
        return _without_file(CLIP, registry.build_clip, from_hub, random_seed)
    check_weight_choice(source, None, random_seed)
    return _from_file(CLIP, source, cache_dir, storage_options, read_clip_state,
                      registry.build_clip)


def load_dino(
    source: str | None = None,
    *,
    random_seed: int | None = None,
    cache_dir: str | None = None,
    hub_cache_dir: str | None = None,
    storage_options: dict | None = None,
) -> tuple[timm.models.VisionTransformer, WeightsInfo]:
    """Builds timm ``vit_base_patch8_224.dino`` without a classifier head, with weights.

    Args:
        source: path or fsspec URL of the official ``dino_vitbase8_pretrain.pth``, a DINO
            training checkpoint (its ``teacher`` is used), or a timm ``.pth``/``.safetensors``;
            ``None``: the hub.
        random_seed: use the seeded random initialisation instead (``source`` must be ``None``).
        cache_dir: staging folder for URLs (default ``$CASS_CACHE_DIR/weights``, i.e.
            ``~/.cache/cass_engine/weights``).
        hub_cache_dir: timm's download cache for the hub (``None``: its default).
        storage_options: fsspec options for a ``source`` URL (endpoint, credentials).

    Returns:
        The model (CPU, float32, eval mode, ``requires_grad`` off) and its :class:`WeightsInfo`.

    Raises:
        ValueError: both ``source`` and ``random_seed``.
        WeightsError: the weights cannot be found, fetched or read, or do not fit the model.
    """
    def from_hub() -> torch.nn.Module:
        return registry.build_dino(hub=True, hub_cache_dir=hub_cache_dir)

    if source is None:
        return _without_file(DINO, registry.build_dino, from_hub, random_seed)
    check_weight_choice(None, source, random_seed)
    return _from_file(DINO, source, cache_dir, storage_options, read_dino_state,
                      registry.build_dino, registry.dino_checkpoint_filter())


def _without_file(expected: Backbone, build: Callable[[], torch.nn.Module],
                  from_hub: Callable[[], torch.nn.Module],
                  random_seed: int | None) -> tuple[Any, WeightsInfo]:
    """Builds with seeded random weights, or with the hub's weights when no seed is given."""
    if random_seed is not None:
        model = registry.seeded(build, random_seed)
        info = WeightsInfo(expected.model_id, f"random:{random_seed}", "random", None, random_seed)
        return registry.finalize(model), info
    try:
        model = from_hub()
    except Exception as e:
        raise WeightsError(
            f"could not get the pretrained weights of {expected.model_id} from the hub "
            f"({type(e).__name__}: {first_line(e)}). {WEIGHTS_REMEDY}"
        ) from e
    info = WeightsInfo(expected.model_id, f"hub:{expected.hub_tag}", "hub", None, None)
    return registry.finalize(model), info


def _from_file(expected: Backbone, source: str, cache_dir: str | None,
               storage_options: dict | None, reader: Reader,
               build: Callable[[], torch.nn.Module],
               filter_fn: Callable[[dict, torch.nn.Module], dict] | None = None,
               ) -> tuple[Any, WeightsInfo]:
    """Stages and reads a checkpoint, checks it against the model, loads it strictly."""
    shown = public_uri(source)
    path = stage_weights(source, cache_dir, storage_options)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {shown}")
    state, fmt = _read_staged(reader, source, path, shown)
    check_family(state, shown, expected)
    model = build()
    check_fit(model, state, shown, expected)  # before timm's filter could resample anything
    if filter_fn is not None:
        state = filter_fn(state, model)
        check_fit(model, state, shown, expected)
    model.load_state_dict(state, strict=True)
    info = WeightsInfo(expected.model_id, shown, fmt, file_sha256(path), None)
    return registry.finalize(model), info


def _read_staged(reader: Reader, source: str, path: str,
                 shown: str) -> tuple[dict[str, torch.Tensor], str]:
    """Runs ``reader``; an unreadable staged copy is removed so that the next run fetches it."""
    try:
        return reader(path, shown)
    except WeightsError:
        if is_remote(source):  # never a user's own file
            Path(path).unlink(missing_ok=True)
        raise

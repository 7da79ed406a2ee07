"""Backbone weights: CLIP ViT-B/16 and DINO ViT-B/8 built from their registries, weights loaded.

Weights come from the libraries' own hubs (``source=None``), from a checkpoint file or fsspec URL
in one of the formats users have (detected by content, not by file name), or from the registry's
random initialisation under a fixed seed (smoke tests). A checkpoint must fit the model exactly:
nothing is resized, dropped (except DINO's projection head) or filled in, and a failed download
never falls back to random weights. ``open_clip.load_checkpoint`` and
``build_model_from_openai_state_dict`` are not used as is because the first silently resamples
positional embeddings and the second accepts any CLIP architecture and keeps it half float16;
their key normalisation is reproduced here and loaded strictly into the registry model.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

import torch

from schemas.uris import public_uri

from .torchscript import UnsafeArchiveError, is_torchscript, read_torchscript_state

if TYPE_CHECKING:
    import open_clip
    import timm

CLIP_MODEL_NAME = "ViT-B-16-quickgelu"
DINO_MODEL_NAME = "vit_base_patch8_224.dino"
CLIP_PRETRAINED_TAG = "openai"
DEFAULT_CACHE_DIR = "~/.cache/cass_engine/weights"

_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_WRAPPER_KEYS = ("teacher", "state_dict", "model")  # checked in this order
_KEY_PREFIXES = ("module.", "backbone.")
ACCEPTED_FORMATS = (
    "Accepted weight files: OpenAI's TorchScript ViT-B-16.pt (its tensors are read without "
    "running it), state dicts saved with torch.save (read with weights_only=True) and "
    "safetensors files; no weights file ever runs code."
)
_REMEDY = (
    "Without network access, pre-stage the weight files and pass their paths or URLs: "
    "--clip-weights PATH_OR_URL/ViT-B-16.pt (OpenAI CLIP ViT-B/16) and "
    "--dino-weights PATH_OR_URL/dino_vitbase8_pretrain.pth (official DINO ViT-B/8); "
    "or pass --random-weights SEED for smoke tests (random weights, meaningless labels)."
)


class _Expected(NamedTuple):
    model_id: str  # WeightsInfo.model
    hub_tag: str  # WeightsInfo.source is "hub:<hub_tag>" for hub weights
    family: str  # as _check_family names it
    flag: str  # the CLI flag that takes the file
    what: str  # the file the flag expects, for messages


_CLIP = _Expected(f"open_clip:{CLIP_MODEL_NAME}", CLIP_PRETRAINED_TAG, "CLIP", "--clip-weights",
                  "a CLIP ViT-B/16 checkpoint (OpenAI ViT-B-16.pt or open_clip ViT-B-16)")
_DINO = _Expected(f"timm:{DINO_MODEL_NAME}", "dino", "DINO/timm ViT", "--dino-weights",
                  "a DINO ViT-B/8 checkpoint (dino_vitbase8_pretrain.pth or timm's weights)")


class WeightsError(RuntimeError):
    """Weights could not be found, fetched or loaded; the message says what to do."""


@dataclass(frozen=True)
class WeightsInfo:
    """Identity of loaded weights, for the run record.

    Attributes:
        model: registry and name, e.g. ``"open_clip:ViT-B-16-quickgelu"``.
        source: ``"hub:TAG"``, a local path, a URL without credentials or query, or
            ``"random:SEED"``.
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
    storage_options: dict | None = None,
) -> tuple[open_clip.model.CLIP, WeightsInfo]:
    """Builds open_clip ``ViT-B-16-quickgelu`` (QuickGELU, as OpenAI trained it) with weights.

    Args:
        source: path or fsspec URL of an OpenAI TorchScript ``ViT-B-16.pt``, an OpenAI or
            open_clip state dict (``.pt``/``.pth``/``.bin``/``.safetensors``); ``None``: the hub.
        random_seed: use the seeded random initialisation instead (``source`` must be ``None``).
        cache_dir: staging folder for URLs (default ``~/.cache/cass_engine/weights``); for the
            hub, open_clip's download cache (``None``: its default).
        storage_options: fsspec options for a ``source`` URL (endpoint, credentials).

    Returns:
        The model (CPU, float32, eval mode, ``requires_grad`` off) and its :class:`WeightsInfo`.

    Raises:
        WeightsError: the weights cannot be found, fetched or read, or do not fit the model.
    """
    import open_clip

    def build(pretrained: str | None = None, **kwargs: Any) -> torch.nn.Module:
        with _quiet_random_init_notice():
            return open_clip.create_model(CLIP_MODEL_NAME, pretrained=pretrained, **kwargs)

    def from_hub(hub_cache: str | None) -> torch.nn.Module:  # open_clip's own cached download
        return build(CLIP_PRETRAINED_TAG, cache_dir=hub_cache)

    if random_seed is not None or source is None:
        return _without_file(_CLIP, build, from_hub, source, random_seed, cache_dir)
    return _from_file(_CLIP, source, cache_dir, storage_options, _clip_state, build)


def load_dino(
    source: str | None = None,
    *,
    random_seed: int | None = None,
    cache_dir: str | None = None,
    storage_options: dict | None = None,
) -> tuple[timm.models.VisionTransformer, WeightsInfo]:
    """Builds timm ``vit_base_patch8_224.dino`` without a classifier head, with weights.

    Args:
        source: path or fsspec URL of the official ``dino_vitbase8_pretrain.pth``, a DINO
            training checkpoint (its ``teacher`` is used), or a timm ``.pth``/``.safetensors``;
            ``None``: the hub.
        random_seed: use the seeded random initialisation instead (``source`` must be ``None``).
        cache_dir: staging folder for URLs (default ``~/.cache/cass_engine/weights``); for the
            hub, timm's download cache (``None``: its default).
        storage_options: fsspec options for a ``source`` URL (endpoint, credentials).

    Returns:
        The model (CPU, float32, eval mode, ``requires_grad`` off) and its :class:`WeightsInfo`.

    Raises:
        WeightsError: the weights cannot be found, fetched or read, or do not fit the model.
    """
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    def build(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        return timm.create_model(DINO_MODEL_NAME, pretrained=pretrained, num_classes=0, **kwargs)

    def from_hub(hub_cache: str | None) -> torch.nn.Module:
        return build(True, **({"cache_dir": hub_cache} if hub_cache else {}))

    if random_seed is not None or source is None:
        return _without_file(_DINO, build, from_hub, source, random_seed, cache_dir)
    filter_fn = checkpoint_filter_fn
    return _from_file(_DINO, source, cache_dir, storage_options, _dino_state, build, filter_fn)


WEIGHTS_REMEDY = _REMEDY


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
        _CLIP.flag: (clip_repo.strip("/"), ("open_clip_model.safetensors",
                                            "open_clip_pytorch_model.bin")),
        _DINO.flag: (timm.models.get_pretrained_cfg(DINO_MODEL_NAME).hf_hub_id,
                     ("model.safetensors", "pytorch_model.bin")),
    }
    return [flag for flag, (repo, names) in wanted.items()
            if not any(isinstance(try_to_load_from_cache(repo, name), str) for name in names)]


def stage_weights(source: str, cache_dir: str | None = None,
                  storage_options: dict | None = None) -> str:
    """Returns a local path for ``source``, copying a URL into the cache once.

    Local paths are returned as they are (``file://`` loses its prefix). Other fsspec URLs are
    copied into ``cache_dir`` as ``<sha256 of the URL>-<file name>`` through a temporary file
    renamed into place (never a partial file under the final name). Staged files are reused
    as long as they exist: a changed object under the same URL is not fetched again.

    Args:
        source: a local path or an fsspec URL (``s3://``, ``gs://``, ``memory://``, ``https://``).
        cache_dir: staging folder; default ``~/.cache/cass_engine/weights``.
        storage_options: fsspec options for the URL's filesystem.

    Returns:
        The local path.

    Raises:
        WeightsError: the URL does not exist or cannot be read.
    """
    if not _is_remote(source):
        return os.path.expanduser(source.removeprefix("file://"))
    cache = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
    target = cache / _staged_name(source)
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        _download(source, target, storage_options or {})
    return str(target)


def _without_file(expected: _Expected, build: Callable[[], torch.nn.Module],
                  from_hub: Callable[[str | None], torch.nn.Module], source: str | None,
                  random_seed: int | None, cache_dir: str | None) -> tuple[Any, WeightsInfo]:
    """Builds with seeded random weights, or with the hub's weights when no seed is given."""
    if source is not None:
        raise WeightsError("pass either a weights source or random_seed, not both")
    if random_seed is not None:
        with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG state alone
            torch.manual_seed(random_seed)
            model = build()
        info = WeightsInfo(expected.model_id, f"random:{random_seed}", "random", None, random_seed)
        return _finalize(model), info
    try:
        model = from_hub(cache_dir)
    except Exception as e:
        raise WeightsError(
            f"could not get the pretrained weights of {expected.model_id} from the hub "
            f"({type(e).__name__}: {_first_line(e)}). {_REMEDY}"
        ) from e
    info = WeightsInfo(expected.model_id, f"hub:{expected.hub_tag}", "hub", None, None)
    return _finalize(model), info


def _from_file(expected: _Expected, source: str, cache_dir: str | None,
               storage_options: dict | None, reader: Callable[[str], tuple[dict, str]],
               build: Callable[[], torch.nn.Module],
               filter_fn: Callable[[dict, torch.nn.Module], dict] | None = None,
               ) -> tuple[Any, WeightsInfo]:
    """Stages and reads a checkpoint, checks it against the model, loads it strictly."""
    path = _existing_file(source, cache_dir, storage_options)
    state, fmt = _read_staged(reader, source, path)
    _check_family(state, path, expected)
    model = build()
    _check_fit(model, state, path, expected)  # before timm's filter could resample anything
    if filter_fn is not None:
        state = filter_fn(state, model)
        _check_fit(model, state, path, expected)
    model.load_state_dict(state, strict=True)
    info = WeightsInfo(expected.model_id, public_uri(source), fmt, _sha256(path), None)
    return _finalize(model), info


def _finalize(model: torch.nn.Module) -> torch.nn.Module:
    """CPU, float32, eval mode, no gradients."""
    model = model.to(device="cpu", dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


def _existing_file(source: str, cache_dir: str | None, storage_options: dict | None) -> str:
    """Stages ``source`` and checks that the local file exists."""
    path = stage_weights(source, cache_dir, storage_options)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {public_uri(source)}")
    return path


def _read_staged(reader: Callable[[str], tuple[dict, str]], source: str,
                 path: str) -> tuple[dict[str, torch.Tensor], str]:
    """Runs ``reader``; an unreadable staged copy is removed so that the next run fetches it."""
    try:
        return reader(path)
    except WeightsError:
        if _is_remote(source):  # never a user's own file
            Path(path).unlink(missing_ok=True)
        raise


def _clip_state(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """Reads a CLIP checkpoint into open_clip keys (float32) and names its format."""
    obj, container = _read_checkpoint(path)
    raw, wrapper = _unwrap(obj, path)
    state = _normalize(raw, path)
    for key in _OPENAI_EXTRA_KEYS:
        state.pop(key, None)
    if container == "torchscript":
        return state, "openai-torchscript"
    prefixed = any(str(k).startswith("module.") for k in raw)
    is_open_clip = wrapper is not None or prefixed or container == "safetensors"
    return state, "open_clip" if is_open_clip else "openai-state-dict"


def _dino_state(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """Reads a DINO/timm checkpoint into timm keys (float32, no head) and names its format."""
    obj, container = _read_checkpoint(path)
    raw, wrapper = _unwrap(obj, path)
    state = {k: v for k, v in _normalize(raw, path).items() if not k.startswith("head.")}
    is_dino = container == "pickle" and wrapper in (None, "teacher")
    return state, "dino-official" if is_dino else "timm"


def _read_checkpoint(path: str) -> tuple[Any, str]:
    """Loads a TorchScript archive, a safetensors file or a weights-only torch pickle."""
    try:
        if is_torchscript(path):  # read without running its code (never torch.jit.load)
            return read_torchscript_state(path), "torchscript"
        if _is_safetensors(path):
            return _load_safetensors(path), "safetensors"
        with torch.serialization.safe_globals([argparse.Namespace]):  # DINO training "args"
            return torch.load(path, map_location="cpu", weights_only=True), "pickle"
    except WeightsError:
        raise
    except UnsafeArchiveError as e:
        raise WeightsError(
            f"{path} is a TorchScript archive that cannot be read without running its code "
            f"({e}); refused. {ACCEPTED_FORMATS}") from None
    except Exception as e:
        raise WeightsError(
            f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)}); "
            "is it truncated, an HTML error page or another kind of file? Download it again "
            "and check its sha256."
        ) from e


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise WeightsError(
            f"{path} is a safetensors file but the 'safetensors' package is not installed; "
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


def _unwrap(obj: Any, path: str) -> tuple[Mapping, str | None]:
    """Returns the tensor mapping of a checkpoint and the wrapper key it sat under, if any."""
    wrapper = None
    if isinstance(obj, Mapping):
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    raw = obj[wrapper] if wrapper else obj
    if not isinstance(raw, Mapping) or not raw:
        raise WeightsError(f"{path} holds a {type(raw).__name__}, not a state dict of tensors")
    return raw, wrapper


def _normalize(raw: Mapping, path: str) -> dict[str, torch.Tensor]:
    """Strips ``module.``/``backbone.`` prefixes and casts floating tensors to float32."""
    state = {}
    for key, value in raw.items():
        key = str(key)
        if not isinstance(value, torch.Tensor):
            if key in _OPENAI_EXTRA_KEYS:
                continue
            raise WeightsError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        while key.startswith(_KEY_PREFIXES):
            key = key.split(".", 1)[1]
        state[key] = value.float() if value.is_floating_point() else value
    return state


def _check_fit(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str,
               expected: _Expected) -> None:
    """Raises WeightsError naming the file, what it looks like and what does not fit."""
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
        wanted_file = f"{expected.flag} expects {expected.what}"
        raise WeightsError(f"{path} does not fit: {wanted_file} ({details})")


def _check_family(state: Mapping[str, Any], path: str, expected: _Expected) -> None:
    """Fails fast, before building a model, on a checkpoint of the other backbone."""
    if any(k.startswith("visual.") for k in state) or "token_embedding.weight" in state:
        family = "CLIP"
    elif "patch_embed.proj.weight" in state or "blocks.0.attn.qkv.weight" in state:
        family = "DINO/timm ViT"
    else:
        return  # unrecognised: _check_fit lists what does not fit
    if family != expected.family:
        wanted_file = f"{expected.flag} expects {expected.what}"
        raise WeightsError(f"{path} looks like a {family} checkpoint; {wanted_file}")


def _some(items: list[str], limit: int = 4) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _is_url(source: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", source) is not None


def _is_remote(source: str) -> bool:
    """A URL that ``stage_weights`` copies (any but ``file://``)."""
    return _is_url(source) and not source.startswith("file://")


def _staged_name(url: str) -> str:
    """``<hash of the URL>-<file name>``: one per URL, readable in a listing."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:24]
    base = os.path.basename(urlsplit(url).path) or "weights"
    return digest + "-" + "".join(c if c.isalnum() or c in "._-" else "_" for c in base)


def _download(url: str, target: Path, storage_options: dict) -> None:
    """Copies ``url`` to ``target`` through a temporary file renamed into place."""
    import fsspec

    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    chain = public_uri(url) == url  # chained errors could print the credentials
    try:
        with fsspec.open(url, "rb", **storage_options) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 * 1024 * 1024)
        os.replace(tmp, target)
    except FileNotFoundError as e:  # fsspec's http reports unreachable hosts this way too
        message = f"weights file not found: {public_uri(url)}{_not_found_cause(e, url)}"
        raise WeightsError(message) from (e if chain else None)
    except Exception as e:
        raise WeightsError(
            f"could not copy weights from {public_uri(url)} ({_describe(e, url)}); "
            "check the URL and the storage options"
        ) from (e if chain else None)
    finally:
        tmp.unlink(missing_ok=True)


def _not_found_cause(error: FileNotFoundError, url: str) -> str:
    """`` (why)`` when a FileNotFoundError hides another failure (aiohttp's connection errors)."""
    cause = error.__cause__
    while isinstance(cause, FileNotFoundError):
        cause = cause.__cause__
    return "" if cause is None or isinstance(cause, LookupError) else f" ({_describe(cause, url)})"


def _describe(error: BaseException, url: str) -> str:
    """``Type: first line of the message``, without the URL's user info or query."""
    parts = urlsplit(url)
    text = f"{type(error).__name__}: {_first_line(error)}".replace(url, public_uri(url))
    for secret in (parts.netloc.rpartition("@")[0], parts.query, parts.password or ""):
        if secret:
            text = text.replace(secret, "***")
    return text


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * 1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_line(error: BaseException, limit: int = 300) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else "")[:limit]


class _RandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init_notice():
    """Hide open_clip's "initialized randomly" notice: weights are loaded right after (or
    random weights were asked for and are recorded as such)."""
    notice = _RandomInitNotice()
    logging.getLogger().addFilter(notice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(notice)

"""Text side: query embeddings from the 80 ImageNet templates, their disk cache, Ward groups.

The text transformer is causal, so the embedding taken at the end-of-text token depends only on
the tokens before it: the context is cut right after the longest prompt's end token, which
changes no output value and removes most of the work (prompts are ~10 tokens of 77). Prompts
are batched in order of length, so each batch is cut at nearly its own prompts' length. On CPU
the encoder can run under bf16 autocast (``dtype=torch.bfloat16``, the engine's bf16 mode);
such embeddings are cached under their own key.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip import get_tokenizer
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from torch import nn

from .staging import cache_root
from .vocabulary import Vocabulary

CACHE_FORMAT = "cass-text-v1"
PROMPT_BATCH = 1024


@dataclass(frozen=True)
class TextEmbeddings:
    """Query embeddings of a vocabulary; picklable, computed once and shared.

    Attributes:
        vocabulary: the vocabulary embedded.
        queries: ``[Q, 512]`` float32 CPU tensor, L2-normalised rows.
        text_weights_hash: SHA-256 of the text tower weights that produced them.
    """

    vocabulary: Vocabulary
    queries: torch.Tensor
    text_weights_hash: str

    def groups(self, h_threshold: float) -> np.ndarray:
        """Ward groups of the queries for a cut distance (see ``ward_groups``)."""
        return ward_groups(self.queries, h_threshold)


def default_cache_dir() -> Path:
    """``$CASS_CACHE_DIR`` or ``~/.cache/cass_engine`` (the engine's one cache root)."""
    return cache_root()


def text_weights_hash(model: nn.Module) -> str:
    """SHA-256 over the text tower's parameters (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith("visual.") or name == "logit_scale":
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def encode_prompts(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip text encoder on tokens cut after the last end-of-text position.

    Args:
        model: open_clip ``CLIP``.
        tokens: ``[M, 77]`` long token ids.
    Returns:
        ``[M, 512]`` float32 (not normalised).
    """
    eot = tokens.argmax(dim=-1)
    length = int(eot.max()) + 1
    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
    x = model.transformer(x, attn_mask=mask)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    return (x @ model.text_projection).float()


@torch.no_grad()
def embed_queries(model: nn.Module, words: Sequence[str],
                  templates: Sequence = OPENAI_IMAGENET_TEMPLATES,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Template-averaged embedding of each query word.

    Each template prompt is L2-normalised, the 80 are averaged, the mean is L2-normalised.
    Prompts are encoded in batches of similar length (shortest first).

    Args:
        dtype: ``torch.bfloat16`` runs the encoder under CPU bf16 autocast; None or float32
            runs it in full precision.
    Returns:
        ``[Q, 512]`` float32 on the model's device.
    """
    tokenizer = get_tokenizer("ViT-B-16-quickgelu")
    device = model.token_embedding.weight.device
    prompts = [template(word) for word in words for template in templates]
    tokens = tokenizer(prompts)
    order = tokens.argmax(dim=-1).argsort(stable=True)
    encoded = torch.empty(len(prompts), model.text_projection.shape[-1], device=device)
    with _text_autocast(device, dtype):
        for i in range(0, len(prompts), PROMPT_BATCH):
            index = order[i:i + PROMPT_BATCH]
            encoded[index.to(device)] = encode_prompts(model, tokens[index].to(device))
    features = F.normalize(encoded, dim=-1).view(len(words), len(templates), -1)
    return F.normalize(features.mean(dim=1), dim=-1)


def _text_autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    if device.type != "cpu" or dtype != torch.bfloat16:
        raise ValueError(f"reduced-precision text encoding is bf16 on CPU only, not {dtype} "
                         f"on {device.type}")
    return torch.autocast("cpu", dtype=torch.bfloat16)


def cache_key(weights_hash: str, words: Sequence[str], templates: Sequence,
              dtype: torch.dtype | None = None) -> str:
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    if dtype is not None and dtype != torch.float32:
        digest.update(f"dtype={dtype}".encode())
    digest.update(weights_hash.encode())
    digest.update("\x1f".join(template("{}") for template in templates).encode())
    digest.update("\x1e".join(words).encode("utf-8"))
    return digest.hexdigest()


def compute_text_embeddings(model: nn.Module, vocabulary: Vocabulary,
                            cache_dir: str | Path | None = None, use_cache: bool = True,
                            weights_hash: str | None = None,
                            dtype: torch.dtype | None = None) -> TextEmbeddings:
    """Query embeddings for a vocabulary, read from or written to the disk cache.

    The cache key covers the text weights, the template list, the query words and the
    encoder's precision (``dtype``, see ``embed_queries``).
    """
    weights_hash = weights_hash or text_weights_hash(model)
    words = vocabulary.query_words
    path = Path(cache_dir or default_cache_dir()) / "text" / (
        cache_key(weights_hash, words, OPENAI_IMAGENET_TEMPLATES, dtype) + ".pt")
    queries = _read_cache(path, len(words)) if use_cache else None
    if queries is None:
        queries = embed_queries(model, words, dtype=dtype).cpu()
        if use_cache:
            _write_cache(path, queries)
    return TextEmbeddings(vocabulary, queries, weights_hash)


def _read_cache(path: Path, num_queries: int) -> torch.Tensor | None:
    try:
        queries = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError):
        return None
    if not isinstance(queries, torch.Tensor) or queries.shape[0] != num_queries:
        return None
    return queries.float()


def _write_cache(path: Path, queries: torch.Tensor) -> None:
    """Best effort: a cache that cannot be written (read-only, full) only costs recomputation.
    The temporary name is unique across hosts, processes and threads sharing the folder."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(queries.contiguous(), tmp)
        tmp.replace(path)
    except Exception as exc:  # noqa: BLE001 - torch.save raises RuntimeError for I/O errors
        warnings.warn(f"text embeddings not cached in {path.parent}: {exc}", stacklevel=3)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def ward_groups(queries: torch.Tensor, h_threshold: float) -> np.ndarray:
    """Group queries by Ward linkage on their cosine distances, cut at ``h_threshold``.

    Distances are computed in float32 as the reference does; a single query is one group.

    Returns:
        ``[Q]`` int64 group index, 0-based.
    """
    emb = F.normalize(queries.float(), dim=-1).cpu().numpy()
    if emb.shape[0] == 1:
        return np.zeros(1, dtype=np.int64)
    dist = np.clip(1.0 - emb @ emb.T, 0.0, 2.0)
    dist = (dist + dist.T) / 2
    np.fill_diagonal(dist, 0.0)
    tree = linkage(squareform(dist, checks=False), method="ward")
    return fcluster(tree, t=h_threshold, criterion="distance").astype(np.int64) - 1

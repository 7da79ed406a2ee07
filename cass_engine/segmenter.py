"""The public engine: ``build_segmenter`` -> ``set_vocabulary`` once -> ``segment`` per batch."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import backbones as bb
from .config import CassConfig
from .decision import (
    Stitcher,
    adjusted_patch_logits,
    class_ranges,
    finalize,
    group_membership,
    max_over_synonyms,
)
from .images import MIN_SIDE, ImageInputError, to_uint8_chw
from .pamr import pamr
from .preprocess import (
    clip_normalize,
    crop_boxes,
    dino_input,
    reference_dino_lut,
    resize_uint8,
    resized_hw,
)
from .spectral import fused_attention_output, match_value_range, resize_dino_keys
from .text import TextEmbeddings, compute_text_embeddings, text_weights_hash
from .vocabulary import Vocabulary

DEFAULT_CROP_BATCH = 32


@dataclass
class SegmentationResult:
    """Outputs for one image, at the input image's size (H, W).

    Attributes:
        labels: ``[H, W]`` int64 class index; pixels whose best class probability is below
            ``prob_thd`` get class 0.
        presence: ``[C]`` float32 object-presence probability: ``softmax(logit_scale * P)``
            over the queries, max over each class's synonyms, where ``P`` is the cosine of the
            image's global CLIP vector with each query (the raw prior). With
            ``prior_source="crop"`` the max over the image's crops.
        prior: ``[C]`` float32 raw prior, max over synonyms of ``P`` (cosine, -1..1).
        pixel_fraction: ``[C]`` float32 share of the image's pixels labelled with each class.
        mask_scores: ``[C]`` float32 mean class probability over the pixels labelled with the
            class (0 where the class is absent).
        logits: ``[Q, H, W]`` float32 query logits before the ``logit_scale`` factor, or None.
        probs: ``[C, H, W]`` float32 class probabilities, or None.
        confidence: ``[H, W]`` float32 probability of each pixel's label (the winning class
            probability; class 0's where ``prob_thd`` chose class 0), always computed (band
            by band, without the full ``probs``).
    """

    labels: torch.Tensor
    presence: torch.Tensor
    prior: torch.Tensor
    pixel_fraction: torch.Tensor
    mask_scores: torch.Tensor
    logits: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    confidence: torch.Tensor | None = None


@dataclass
class _Crop:
    image: int
    box: tuple[int, int, int, int]


class CassSegmenter:
    """CASS on loaded backbones. Use ``build_segmenter`` to construct one from weights.

    Args:
        clip: open_clip ``CLIP`` (ViT-B/16, QuickGELU) on ``device``.
        dino: timm ``VisionTransformer`` (DINO ViT-B/8) on ``device``.
        config: hyperparameters.
        device: where everything runs.
        amp_dtype: reduced precision for the backbones (None: full precision). On CPU the
            image backbones' weights are cast to it once (no autocast: no per-call weight
            casts); elsewhere it is an autocast dtype. The text tower stays float32.
        weights_info: model identities and weight hashes, for records.
        cache_dir: text-embedding cache root (None: ``$CASS_CACHE_DIR`` or ~/.cache).
    """

    def __init__(self, clip: nn.Module, dino: nn.Module, config: CassConfig,
                 device: torch.device, amp_dtype: torch.dtype | None = None,
                 weights_info: dict | None = None, cache_dir: str | Path | None = None) -> None:
        self.clip, self.dino, self.config = clip.eval(), dino.eval(), config
        self.device, self.amp_dtype = torch.device(device), amp_dtype
        self.weights_cast = _cast_backbones(self.clip, self.dino, self.device, amp_dtype)
        self.weights_info = dict(weights_info or {})
        self.cache_dir = cache_dir
        self.crop_batch_size = DEFAULT_CROP_BATCH
        self._lut = reference_dino_lut(self.device)
        self._text: TextEmbeddings | None = None
        self._text_hash: str | None = None

    # ----------------------------------------------------------------- vocabulary
    @property
    def vocabulary(self) -> Vocabulary:
        if self._text is None:
            raise RuntimeError("call set_vocabulary() before segment()")
        return self._text.vocabulary

    @property
    def text_embeddings(self) -> TextEmbeddings | None:
        return self._text

    def text_weights_hash(self) -> str:
        if self._text_hash is None:
            self._text_hash = text_weights_hash(self.clip)
        return self._text_hash

    def set_vocabulary(self, vocabulary: Vocabulary | None = None, *,
                       text_embeddings: TextEmbeddings | None = None,
                       use_cache: bool = True) -> TextEmbeddings:
        """Embed a vocabulary (or adopt precomputed embeddings) and group its queries.

        Args:
            vocabulary: classes to segment; None uses the config's (user file or preset file).
            text_embeddings: embeddings computed elsewhere (e.g. on a driver) to reuse as is.
        Returns:
            The embeddings in use (picklable, to share with other workers).
        """
        if text_embeddings is None:
            vocabulary = vocabulary or self.config.load_vocabulary()
            text_embeddings = compute_text_embeddings(
                self.clip, vocabulary, self.cache_dir, use_cache, self.text_weights_hash(),
                dtype=self._text_dtype())
        elif text_embeddings.text_weights_hash != self.text_weights_hash():
            raise ValueError("the text embeddings were computed with other CLIP text weights "
                             f"({text_embeddings.text_weights_hash[:12]}...) than this "
                             f"engine's ({self.text_weights_hash()[:12]}...)")
        self._text = text_embeddings
        groups = torch.from_numpy(text_embeddings.groups(self.config.h_threshold))
        self._queries = text_embeddings.queries.to(self.device)
        self._membership = group_membership(groups.to(self.device))
        self._ranges = class_ranges(text_embeddings.vocabulary.query_to_class)
        return text_embeddings

    def _text_dtype(self) -> torch.dtype | None:
        """bf16 text encoding in the CPU bf16 mode; full precision otherwise."""
        return torch.bfloat16 if self.weights_cast and self.amp_dtype == torch.bfloat16 else None

    # ----------------------------------------------------------------- segmentation
    @torch.no_grad()
    def segment(self, images: Sequence, *, return_logits: bool = True,
                return_probs: bool = True) -> list[SegmentationResult]:
        """Segment a batch of images of any sizes.

        Args:
            images: RGB images as ``[H, W, 3]`` uint8 numpy arrays, ``[3, H, W]`` uint8
                tensors or PIL images.
            return_logits, return_probs: keep the full ``[Q, H, W]`` / ``[C, H, W]`` tensors
                (memory grows with image size x queries); labels and scores are always returned.
        Returns:
            One ``SegmentationResult`` per image, tensors on the CPU.
        """
        if self._text is None:
            self.set_vocabulary()
        cfg = self.config
        originals = [to_uint8_chw(image).to(self.device) for image in images]
        sizes = [resized_hw(*im.shape[-2:], cfg.short_side, cfg.max_long_side)
                 for im in originals]
        for im, size in zip(originals, sizes, strict=True):
            if min(size) < MIN_SIDE:
                raise ImageInputError(
                    f"image {tuple(im.shape[-2:])} is too elongated: resized to {size} (long "
                    f"side at most {cfg.max_long_side}) it is under {MIN_SIDE} pixels across")
        resized = [resize_uint8(im, size) for im, size in zip(originals, sizes, strict=True)]
        crops = [_Crop(i, box) for i, im in enumerate(resized)
                 for box in crop_boxes(*im.shape[-2:], cfg.slide_crop, cfg.slide_stride)]
        image_prior = self._image_priors(resized)
        stitchers = [Stitcher(len(self._queries), tuple(im.shape[-2:]), self.device)
                     for im in resized]
        crop_priors: dict[int, list[torch.Tensor]] = defaultdict(list)
        for batch in self._crop_batches(crops):
            logits, priors = self._crop_logits(resized, batch, image_prior)
            for crop, crop_logit, prior in zip(batch, logits, priors, strict=True):
                stitchers[crop.image].add(crop_logit, crop.box)
                crop_priors[crop.image].append(prior)
        return [self._decide(originals[i], resized[i], stitchers[i].result(), crop_priors[i],
                             return_logits, return_probs) for i in range(len(images))]

    def _crop_batches(self, crops: list[_Crop]) -> list[list[_Crop]]:
        by_size: dict[tuple[int, int], list[_Crop]] = defaultdict(list)
        for crop in crops:
            y1, x1, y2, x2 = crop.box
            by_size[(y2 - y1, x2 - x1)].append(crop)
        size = max(1, self.crop_batch_size)
        return [group[i:i + size] for group in by_size.values()
                for i in range(0, len(group), size)]

    def _autocast(self):
        if self.amp_dtype is None or self.amp_dtype == torch.float32 or self.weights_cast:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _image_priors(self, resized: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Whole-image global vectors' prior ``[Q]`` per image, when the config uses it."""
        if self.config.prior_source != "image" or self.config.slide_crop is None:
            return [None] * len(resized)
        priors = []
        for image in resized:
            with self._autocast():
                tokens = bb.clip_block11_tokens(self.clip.visual, clip_normalize(image)[None])
                cls = bb.clip_cls_embedding(self.clip.visual, tokens)
            priors.append((cls @ self._queries.T)[0])
        return priors

    def _crop_logits(self, resized: list[torch.Tensor], batch: list[_Crop],
                     image_prior: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, Q, h, w]`` at crop resolution and the prior ``[B, Q]`` of each crop."""
        cfg = self.config
        crops = torch.stack([resized[c.image][:, c.box[0]:c.box[2], c.box[1]:c.box[3]]
                             for c in batch])
        with self._autocast():
            tokens = bb.clip_block11_tokens(self.clip.visual, clip_normalize(crops))
            k_clip, v_clip = bb.clip_last_keys_values(self.clip.visual, tokens)
            dino_images = dino_input(crops, cfg.dino_input, self._lut)
            k_dino = bb.dino_last_keys(self.dino, dino_images)
            cls = None
            if image_prior[batch[0].image] is None:
                cls = bb.clip_cls_embedding(self.clip.visual, tokens)
        grid = (crops.shape[-2] // 16, crops.shape[-1] // 16)
        dino_grid = (dino_images.shape[-2] // 8, dino_images.shape[-1] // 8)
        k_dino = resize_dino_keys(k_dino, dino_grid, grid, cfg.dino_key_fp16)
        k_dino = match_value_range(k_dino, k_clip.float(), cfg.dino_key_fp16)
        heads = fused_attention_output(k_clip, v_clip, k_dino, grid, cfg)
        with self._autocast():
            features = bb.clip_patch_features(self.clip.visual, heads)
        prior = (cls @ self._queries.T if cls is not None
                 else torch.stack([image_prior[c.image] for c in batch]))
        logits = adjusted_patch_logits(features, self._queries, prior, self._membership,
                                       cfg.alpha, cfg.gamma, cfg.top_n)
        logits = logits.transpose(1, 2).reshape(len(batch), -1, *grid)
        logits = torch.nn.functional.interpolate(logits, size=crops.shape[-2:], mode="bilinear",
                                                 align_corners=False)
        return logits, prior

    def _decide(self, original: torch.Tensor, resized: torch.Tensor, logits: torch.Tensor,
                priors: list[torch.Tensor], keep_logits: bool, keep_probs: bool
                ) -> SegmentationResult:
        cfg = self.config
        out_hw = tuple(original.shape[-2:])
        if cfg.pamr_steps > 0:
            logits = torch.nn.functional.interpolate(logits[None], size=out_hw, mode="bilinear",
                                                     align_corners=False)
            image = torch.nn.functional.interpolate(clip_normalize(resized)[None], size=out_hw,
                                                    mode="bilinear", align_corners=False)
            logits = pamr(image, logits, cfg.pamr_steps, tuple(cfg.pamr_dilations))[0]
        decision = finalize(logits, out_hw, self._ranges, cfg.logit_scale, cfg.prob_thd,
                            keep_full=keep_logits or keep_probs)
        prior_q = torch.stack(priors).float()  # [crops, Q]
        presence = max_over_synonyms(torch.softmax(cfg.logit_scale * prior_q, dim=-1).T,
                                     self._ranges).amax(-1)
        prior = max_over_synonyms(prior_q.T, self._ranges).amax(-1)
        return SegmentationResult(
            labels=decision.labels.cpu(), presence=presence.cpu(), prior=prior.cpu(),
            pixel_fraction=decision.pixel_fraction.cpu(), mask_scores=decision.mask_scores.cpu(),
            logits=decision.logits.cpu() if keep_logits else None,
            probs=decision.probs.cpu() if keep_probs else None,
            confidence=decision.confidence.cpu())


def _cast_backbones(clip: nn.Module, dino: nn.Module, device: torch.device,
                    dtype: torch.dtype | None) -> bool:
    """Cast the image backbones' weights to ``dtype`` once, on CPU; True when done.

    CPU autocast re-casts every frozen weight on every call (hundreds of copies per image),
    which costs more than the reduced-precision matmuls save. LayerNorm statistics and SDPA
    softmax accumulate in float32 inside PyTorch's bf16 CPU kernels; everything after the
    backbones (spectral fusion, eigen-decompositions, Hungarian costs, logits, softmax and
    decision) runs in float32 or float64 as in the full-precision path.
    """
    if device.type != "cpu" or dtype is None or dtype == torch.float32:
        return False
    clip.visual.to(dtype)
    dino.to(dtype)
    return True


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX-BF16 or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(device: str | torch.device, dtype: torch.dtype | str | None) -> torch.dtype:
    """The engine dtype for a device.

    None is float32 on CPU (the faithful path) and float16 on accelerators. ``"auto"`` is
    float16 on accelerators and, on CPU, bfloat16 when the CPU multiplies bf16 natively
    (AMX-BF16 or AVX512-BF16; agreement with float32 measured in README), else float32. A
    name like ``"bfloat16"`` is that dtype.
    """
    device = torch.device(device)
    if dtype == "auto":
        if device.type != "cpu":
            return torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.float16
    if isinstance(dtype, str):
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"unknown dtype {dtype!r}: float32, float16, bfloat16 or auto")
        return getattr(torch, dtype)
    return dtype


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``; names (``"auto"``) pass through."""
    return dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")


def build_segmenter(config: CassConfig, *, clip_weights: str | None = None,
                    dino_weights: str | None = None, random_weights: int | None = None,
                    device: str | torch.device = "cpu",
                    dtype: torch.dtype | str | None = None,
                    storage_options: dict | None = None,
                    cache_dir: str | Path | None = None) -> CassSegmenter:
    """Load both backbones and return a ready ``CassSegmenter`` (vocabulary not yet set).

    Args:
        config: engine hyperparameters.
        clip_weights, dino_weights: weight file paths or fsspec URLs; None downloads the
            official weights through the hubs (cached).
        random_weights: build both backbones with seeded random weights instead (smoke runs
            and tests only; recorded in ``weights_info``). Exclusive with weight paths.
        device: torch device.
        dtype: reduced precision for the image backbones (see ``resolve_dtype``); None means
            float32 on CPU and float16 on accelerators. ``weights_info["dtype"]`` records
            the resolved dtype (``"auto"`` never), ``"dtype_requested"`` what was asked.
        storage_options: fsspec options for weight URLs.
        cache_dir: cache root for staged weights (``<root>/weights``) and text embeddings
            (``<root>/text``); None: ``$CASS_CACHE_DIR`` or ``~/.cache/cass_engine``.
    """
    from .staging import check_weight_choice, weights_dir
    from .weights import load_clip, load_dino

    check_weight_choice(clip_weights, dino_weights, random_weights)
    device = torch.device(device)
    requested = None if dtype is None else dtype_name(dtype)
    dtype = resolve_dtype(device, dtype)
    staged = str(weights_dir(cache_dir)) if cache_dir is not None else None
    clip, clip_info = load_clip(clip_weights, random_seed=random_weights, cache_dir=staged,
                                storage_options=storage_options)
    dino, dino_info = load_dino(dino_weights, random_seed=random_weights, cache_dir=staged,
                                storage_options=storage_options)
    info = {"clip": clip_info.to_dict(), "dino": dino_info.to_dict(),
            "random_weights": random_weights, "dtype": dtype_name(dtype),
            "dtype_requested": requested}
    return CassSegmenter(clip.to(device), dino.to(device), config, device,
                         amp_dtype=None if dtype == torch.float32 else dtype,
                         weights_info=info, cache_dir=cache_dir)


def labels_to_numpy(result: SegmentationResult) -> np.ndarray:
    """Label map as a numpy ``[H, W]`` int32 array."""
    return result.labels.numpy().astype(np.int32)

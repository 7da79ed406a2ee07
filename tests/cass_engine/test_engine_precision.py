"""The CPU bf16 mode: weights cast once, no autocast, bf16 text; agreement with float32."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from open_clip import get_tokenizer
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from support.engine import photo_336x448, random_backbones  # noqa: F401

import cass_engine.text as text_module
from cass_engine import CassConfig, parse_vocabulary
from cass_engine.segmenter import CassSegmenter, resolve_dtype
from cass_engine.text import cache_key, compute_text_embeddings, embed_queries

#: Bounds of the bf16 mode on this photograph (measured: see README, precision table).
AGREEMENT, MAX_DPROB = 0.995, 0.05
VOCAB = "background\nsky, clouds\ncup, mug\ntable\nwall\nfood, coffee\n"


def test_resolve_dtype_defaults_and_auto(monkeypatch):
    import cass_engine.segmenter as segmenter
    assert resolve_dtype("cpu", None) == torch.float32  # the faithful default
    monkeypatch.setattr(segmenter, "cpu_has_fast_bf16", lambda: True)
    assert resolve_dtype("cpu", "auto") == torch.bfloat16
    monkeypatch.setattr(segmenter, "cpu_has_fast_bf16", lambda: False)
    assert resolve_dtype("cpu", "auto") == torch.float32
    assert resolve_dtype("cuda", None) == resolve_dtype("cuda", "auto") == torch.float16
    assert resolve_dtype("cpu", "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("cpu", "int8")


def test_length_sorted_batches_give_the_per_prompt_embeddings(random_backbones, monkeypatch):
    clip, _ = random_backbones
    templates = OPENAI_IMAGENET_TEMPLATES[:4]
    words = ["cat", "a very long fire hydrant name", "dog"]
    monkeypatch.setattr(text_module, "PROMPT_BATCH", 3)  # batches mix words and lengths
    got = embed_queries(clip, words, templates)
    tokenizer = get_tokenizer("ViT-B-16-quickgelu")
    with torch.no_grad():
        for i, word in enumerate(words):
            per = clip.encode_text(tokenizer([t(word) for t in templates]))
            want = torch.nn.functional.normalize(
                torch.nn.functional.normalize(per, dim=-1).mean(0), dim=-1)
            assert torch.allclose(got[i], want, atol=1e-5), word


def test_bf16_text_is_close_and_cached_under_its_own_key(random_backbones, tmp_path):
    clip, _ = random_backbones
    vocab = parse_vocabulary(VOCAB)
    full = compute_text_embeddings(clip, vocab, tmp_path, weights_hash="h")
    half = compute_text_embeddings(clip, vocab, tmp_path, weights_hash="h",
                                   dtype=torch.bfloat16)
    assert len(list((tmp_path / "text").glob("*.pt"))) == 2
    cosine = (full.queries * half.queries).sum(-1)
    assert not torch.equal(full.queries, half.queries)
    assert cosine.min() > 0.999
    words, templates = vocab.query_words, OPENAI_IMAGENET_TEMPLATES
    assert cache_key("h", words, templates) == cache_key("h", words, templates, torch.float32)
    assert cache_key("h", words, templates) != cache_key("h", words, templates, torch.bfloat16)


@pytest.fixture(scope="module")
def engines(random_backbones):
    config = CassConfig.from_preset("voc21")
    full = CassSegmenter(*random_backbones, config, torch.device("cpu"))
    half = CassSegmenter(*copy.deepcopy(random_backbones), config, torch.device("cpu"),
                         amp_dtype=torch.bfloat16)  # casts its (copied) backbones in place
    text = full.set_vocabulary(parse_vocabulary(VOCAB), use_cache=False)
    half.set_vocabulary(text_embeddings=text)  # same text: only the image path differs
    return full, half


@pytest.mark.slow
def test_bf16_cpu_casts_the_backbones_once_and_runs_them_without_autocast(engines):
    full, half = engines
    assert half.weights_cast and not full.weights_cast
    assert all(p.dtype == torch.bfloat16 for p in half.clip.visual.parameters())
    assert all(p.dtype == torch.bfloat16 for p in half.dino.parameters())
    assert half.clip.token_embedding.weight.dtype == torch.float32  # text tower stays fp32
    assert half.text_weights_hash() == full.text_weights_hash()
    seen = []

    def record(_module, inputs):
        seen.append((torch.is_autocast_enabled("cpu"), inputs[0].dtype))

    hooks = [half.clip.visual.transformer.resblocks[0].register_forward_pre_hook(record),
             half.dino.blocks[0].register_forward_pre_hook(record)]
    try:
        result = half.segment([photo_336x448()[:160, :200]], return_logits=False)[0]
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) >= 2 and all(not autocast and dt == torch.bfloat16 for autocast, dt in seen)
    assert result.probs.dtype == torch.float32 and result.labels.dtype == torch.int64
    assert bool(((result.probs >= 0) & (result.probs <= 1)).all())


@pytest.mark.slow
def test_bf16_cpu_agrees_with_float32_on_a_photograph(engines):
    full, half = engines
    photo = photo_336x448()
    want = full.segment([photo], return_logits=False)[0]
    got = half.segment([photo], return_logits=False)[0]
    agreement = (got.labels == want.labels).float().mean().item()
    diff = (got.probs - want.probs).abs()
    assert agreement >= AGREEMENT, agreement
    assert diff.max().item() <= MAX_DPROB, diff.max().item()
    assert np.isfinite(got.presence.numpy()).all()

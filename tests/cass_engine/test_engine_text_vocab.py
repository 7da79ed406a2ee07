"""Vocabulary parsing, presets, text embeddings (truncated context, cache) and Ward groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from open_clip import get_tokenizer
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist
from support.engine import random_backbones  # noqa: F401

from cass_engine import PRESETS, CassConfig, VocabularyError, load_vocabulary, parse_vocabulary
from cass_engine.text import compute_text_embeddings, embed_queries, encode_prompts, ward_groups

# preset: short side, slide, gamma, alpha, h_threshold, prob_thd, eigenscaling, prior
SPEC_TABLE = {
    "voc21": (336, None, 0.10, 0.03, 0.10, 0.1, True, "image"),
    "context60": (336, 224, 0.25, 0.04, 0.09, 0.1, True, "image"),
    "coco_object": (336, 224, 0.25, 0.01, 0.10, 0.1, True, "image"),
    "voc20": (336, 224, 0.40, 0.02, 0.10, 0.0, False, "image"),
    "context59": (336, 224, 0.25, 0.04, 0.09, 0.0, True, "image"),
    "coco_stuff": (336, 224, 0.20, 0.02, 0.02, 0.0, True, "image"),
    "cityscapes": (560, 224, 0.10, 0.03, 0.14, 0.0, False, "crop"),
    "ade20k": (336, 224, 0.30, 0.05, 0.06, 0.0, True, "image"),
}
CLASS_COUNTS = {"voc21": 21, "context60": 60, "coco_object": 81, "voc20": 20, "context59": 59,
                "coco_stuff": 171, "cityscapes": 19, "ade20k": 150}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_match_spec_table(name):
    cfg = PRESETS[name]
    got = (cfg.short_side, cfg.slide_crop, cfg.gamma, cfg.alpha, cfg.h_threshold, cfg.prob_thd,
           cfg.eigenscaling, cfg.prior_source)
    assert got == SPEC_TABLE[name]
    assert (cfg.slide_stride, cfg.sigma, cfg.k_eigen, cfg.fusion_scale, cfg.reference_rank,
            cfg.top_n, cfg.logit_scale) == (112, 5.0, 20, 10.0, 10, 2, 40.0)
    assert cfg.load_vocabulary().num_classes == CLASS_COUNTS[name]


def test_config_is_frozen_validated_and_overridable(tmp_path):
    cfg = CassConfig.from_preset("ade20k", alpha=0.5)
    assert cfg.alpha == 0.5 and cfg.preset == "ade20k"
    with pytest.raises(AttributeError):
        cfg.alpha = 0.1  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown preset"):
        CassConfig.from_preset("nope")
    with pytest.raises(ValueError, match="unknown CassConfig field"):
        CassConfig.from_preset("voc21", colour="red")
    with pytest.raises(ValueError, match="gamma"):
        CassConfig.from_preset("voc21", gamma=2.0)
    vocab = tmp_path / "v.txt"
    vocab.write_text("cat\ndog, puppy\n")
    assert CassConfig.from_preset("voc21", vocabulary_path=str(vocab)).load_vocabulary(
    ).class_names == ["cat", "dog"]


def test_vocabulary_parser_synonyms_blank_lines_unicode_trailing_space():
    v = parse_vocabulary("background, sky, wall\n\ncat \n  \nchien, 狗\r\ndog\n")
    assert v.class_names == ["background", "cat", "chien", "dog"]
    assert v.query_words == ["background", "sky", "wall", "cat ", "chien", "狗", "dog"]
    assert v.query_to_class == [0, 0, 0, 1, 2, 2, 3]
    assert parse_vocabulary("a\na\n").duplicate_queries() == ["a"]
    same = parse_vocabulary("background, sky, wall\ncat \nchien, 狗\ndog")
    assert v.content_hash() == same.content_hash()
    assert v.content_hash() != parse_vocabulary("background\ncat\n").content_hash()


@pytest.mark.parametrize("text, message", [("", "empty"), ("\n \n", "empty"),
                                           ("cat, , dog\n", "empty synonym"),
                                           ("a\x00b", "not a text file")])
def test_vocabulary_parser_rejects_malformed(text, message):
    with pytest.raises(VocabularyError, match=message):
        parse_vocabulary(text)


def test_vocabulary_files_missing_and_binary(tmp_path):
    with pytest.raises(VocabularyError, match="not found"):
        load_vocabulary(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(VocabularyError, match="UTF-8"):
        load_vocabulary(bad)


def test_official_context60_file_keeps_trailing_space():
    words = PRESETS["context60"].load_vocabulary().query_words
    assert "wood " in words


def test_truncated_context_equals_full_text_encoder(random_backbones):
    clip, _ = random_backbones
    tokens = get_tokenizer("ViT-B-16-quickgelu")(["a photo of a cat.", "a bad photo of the "
                                                  "big red fire hydrant next to the road."])
    with torch.no_grad():
        full = clip.encode_text(tokens)
        cut = encode_prompts(clip, tokens)
    assert torch.allclose(cut, full, atol=1e-5)


def test_template_average_and_cache(random_backbones, tmp_path):
    clip, _ = random_backbones
    templates = OPENAI_IMAGENET_TEMPLATES[:3]
    got = embed_queries(clip, ["cat", "dog"], templates)
    tokens = get_tokenizer("ViT-B-16-quickgelu")([t("cat") for t in templates])
    with torch.no_grad():
        per = torch.nn.functional.normalize(clip.encode_text(tokens), dim=-1)
    expected = torch.nn.functional.normalize(per.mean(0), dim=-1)
    assert torch.allclose(got[0], expected, atol=1e-5)
    vocab = parse_vocabulary("cat\n")
    first = compute_text_embeddings(clip, vocab, tmp_path, weights_hash="h")
    files = list((tmp_path / "text").glob("*.pt"))
    assert len(files) == 1
    torch.save(first.queries * 0 + 7, files[0])  # a cached value is read back, not recomputed
    assert torch.all(compute_text_embeddings(clip, vocab, tmp_path, weights_hash="h").queries == 7)
    assert not torch.all(compute_text_embeddings(clip, vocab, tmp_path,
                                                 weights_hash="other").queries == 7)


def test_ward_groups_match_direct_scipy():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 16))
    queries = np.concatenate([base + 0.05 * rng.normal(size=(4, 16)) for _ in range(3)])
    t = torch.nn.functional.normalize(torch.tensor(queries, dtype=torch.float32), dim=-1)
    groups = ward_groups(t, 0.3)
    direct = fcluster(linkage(pdist(t.numpy(), "cosine"), "ward"), 0.3, "distance") - 1
    assert np.array_equal(groups, direct)
    assert len(set(groups.tolist())) == 4  # three noisy copies of four directions
    assert ward_groups(t[:1], 0.3).tolist() == [0]

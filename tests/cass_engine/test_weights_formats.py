"""Tests for cass_engine.weights: real-size backbones, seeded random weights, saved in the
formats users have and loaded back through the public loaders, from paths and fsspec URLs;
bad files, and the hubs.

No test touches the network: hub tests block sockets and put huggingface_hub in offline mode.
"""

from __future__ import annotations

import json
import socket
import sys

import open_clip
import pytest
import timm
import torch
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file
from support.weights_files import (  # noqa: F401 - fixtures
    assert_loaded,
    cache_dir,
    clip_file,
    clip_random,
    clip_state,
    dino_file,
    dino_random,
    dino_state,
    files,
    memory_url,
    sha256,
)

from cass_engine.registry import CLIP_MODEL_NAME, DINO_MODEL_NAME
from cass_engine.weights import WeightsError, WeightsInfo, load_clip, load_dino

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit deprecation notes

# ----------------------------------------------------------------------------- formats

CLIP_FORMATS = {  # file written -> WeightsInfo.format reported
    "openai-state-dict": "openai-state-dict",
    "openai-torchscript": "openai-torchscript",
    "open_clip": "open_clip",
    "open_clip-safetensors": "open_clip",
}
DINO_FORMATS = {
    "dino-official": "dino-official",
    "dino-teacher": "dino-official",
    "timm-safetensors": "timm",
    "timm-wrapped-fp16": "timm",
}


@pytest.mark.parametrize("via", ["path", "memory"])
@pytest.mark.parametrize("fmt", list(CLIP_FORMATS))
def test_load_clip_formats(fmt, via, clip_file, clip_state, memory_url, cache_dir):
    path = clip_file(fmt)
    source, shown = (str(path),) * 2 if via == "path" else memory_url(path, f"clip-{fmt}.pt")
    model, info = load_clip(source, cache_dir=cache_dir)
    assert_loaded(model, clip_state)
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert info == WeightsInfo(
        f"open_clip:{CLIP_MODEL_NAME}", shown, CLIP_FORMATS[fmt], sha256(path), None
    )


@pytest.mark.parametrize("via", ["path", "memory"])
@pytest.mark.parametrize("fmt", list(DINO_FORMATS))
def test_load_dino_formats(fmt, via, dino_file, dino_state, memory_url, cache_dir):
    path = dino_file(fmt)
    source, shown = (str(path),) * 2 if via == "path" else memory_url(path, f"dino-{fmt}.pth")
    model, info = load_dino(source, cache_dir=cache_dir)
    assert_loaded(model, dino_state)
    assert isinstance(model, timm.models.VisionTransformer)
    assert model.patch_embed.patch_size == (8, 8) and model.num_classes == 0
    assert info == WeightsInfo(
        f"timm:{DINO_MODEL_NAME}", shown, DINO_FORMATS[fmt], sha256(path), None
    )


# ----------------------------------------------------------------------------- random weights


def test_random_clip_is_deterministic_and_leaves_global_rng(clip_random):
    model0, info0 = clip_random
    assert info0 == WeightsInfo(f"open_clip:{CLIP_MODEL_NAME}", "random:0", "random", None, 0)
    again, _ = load_clip(random_seed=0)
    assert_loaded(again, model0.state_dict())
    torch.manual_seed(123)
    expected_draw = torch.rand(4)
    torch.manual_seed(123)
    other, _ = load_clip(random_seed=1)
    assert torch.equal(torch.rand(4), expected_draw)
    assert not torch.equal(other.visual.conv1.weight, model0.visual.conv1.weight)
    assert isinstance(other.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_random_dino_is_deterministic(dino_random):
    model0, info0 = dino_random
    assert info0.to_dict() == {
        "model": f"timm:{DINO_MODEL_NAME}", "source": "random:0", "format": "random",
        "sha256": None, "random_seed": 0,
    }
    json.dumps(info0.to_dict())
    assert_loaded(load_dino(random_seed=0)[0], model0.state_dict())
    other, _ = load_dino(random_seed=7)
    assert not torch.equal(other.blocks[11].attn.qkv.weight, model0.blocks[11].attn.qkv.weight)


@pytest.mark.parametrize("loader", [load_clip, load_dino])
def test_source_and_seed_together_is_an_error(loader, tmp_path):
    with pytest.raises(ValueError, match="random weights .* cannot be combined with weight files"):
        loader(str(tmp_path / "x.pth"), random_seed=0)


# ----------------------------------------------------------------------------- bad inputs


def test_dino_file_given_as_clip_weights(dino_file):
    path = dino_file("dino-official")
    with pytest.raises(WeightsError) as err:
        load_clip(str(path))
    message = str(err.value)
    assert str(path) in message and "looks like a DINO/timm ViT checkpoint" in message
    assert "--clip-weights expects a CLIP ViT-B/16 checkpoint" in message


def test_clip_file_given_as_dino_weights(clip_file):
    path = clip_file("openai-state-dict")
    with pytest.raises(WeightsError) as err:
        load_dino(str(path))
    message = str(err.value)
    assert str(path) in message and "looks like a CLIP checkpoint" in message
    assert "--dino-weights expects a DINO ViT-B/8 checkpoint" in message


def test_dino_of_another_patch_size_is_not_resampled(dino_state, files):
    state = dict(dino_state)
    state["patch_embed.proj.weight"] = torch.zeros(768, 3, 16, 16)
    state["pos_embed"] = torch.zeros(1, 197, 768)
    torch.save(state, files / "dino_vitbase16_pretrain.pth")
    expected = r"does not fit.*shape: .*patch_embed\.proj\.weight \(768, 3, 16, 16\) \(expected"
    with pytest.raises(WeightsError, match=expected):
        load_dino(str(files / "dino_vitbase16_pretrain.pth"))


def test_missing_and_unexpected_keys(dino_state, files):
    state = {k: v for k, v in dino_state.items() if k != "norm.weight"}
    state["fc_norm.weight"] = torch.ones(768)  # a mean-pooling ViT, not DINO's
    torch.save(state, files / "partial.pth")
    expected = "does not fit.*missing: norm.weight; unexpected: fc_norm.weight"
    with pytest.raises(WeightsError, match=expected):
        load_dino(str(files / "partial.pth"))


@pytest.mark.parametrize("loader", [load_clip, load_dino])
def test_text_file_is_not_a_checkpoint(loader, tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    path.write_text("<html><body>403 Forbidden</body></html>\n")
    with pytest.raises(WeightsError, match="is not a readable PyTorch checkpoint") as err:
        loader(str(path))
    assert str(path) in str(err.value)
    assert path.exists()  # only staged copies of URLs are removed, never the user's file


def test_safetensors_without_the_package(tmp_path, monkeypatch):
    save_file({"cls_token": torch.zeros(1, 1, 768)}, str(tmp_path / "model.safetensors"))
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import fails
    with pytest.raises(WeightsError, match="safetensors file but the 'safetensors' package"):
        load_dino(str(tmp_path / "model.safetensors"))


@pytest.mark.parametrize(
    ("loader", "make_file", "fmt"),
    [("clip", "clip_file", "openai-torchscript"), ("dino", "dino_file", "dino-official")],
)
def test_truncated_file(loader, make_file, fmt, request, files):
    data = request.getfixturevalue(make_file)(fmt).read_bytes()
    path = files / f"truncated-{fmt}.pth"
    path.write_bytes(data[: len(data) // 2])
    load = load_clip if loader == "clip" else load_dino
    with pytest.raises(WeightsError, match="truncated") as err:
        load(str(path))
    assert str(path) in str(err.value)


def test_pickled_non_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="not a state dict"):
        load_dino(str(tmp_path / "list.pt"))


@pytest.mark.parametrize("loader", [load_clip, load_dino])
def test_missing_file(loader, tmp_path):
    path = tmp_path / "nowhere" / "ViT-B-16.pt"
    with pytest.raises(WeightsError, match=f"weights file not found: {path}"):
        loader(str(path))


# ----------------------------------------------------------------------------- the hub


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: huggingface_hub in offline mode and sockets refusing to connect."""
    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("loader", [load_clip, load_dino])
def test_hub_offline_explains_the_remedy(loader, offline, tmp_path):
    with pytest.raises(WeightsError) as err:
        loader(hub_cache_dir=str(tmp_path))
    message = str(err.value)
    for remedy in ("--clip-weights", "ViT-B-16.pt", "--dino-weights", "dino_vitbase8_pretrain.pth"):
        assert remedy in message
    assert "--random-weights SEED" in message
    assert err.value.__cause__ is not None


def test_hub_clip_uses_open_clip_download(clip_state, files, offline, monkeypatch):
    path = files / "open_clip_pytorch_model.bin"  # the hub's file: a plain open_clip state dict
    torch.save({k: v.half() for k, v in clip_state.items()}, path)
    requested = []

    def fake_download(cfg, prefer_hf_hub=True, cache_dir=None):
        requested.append(cfg["hf_hub"])
        return str(path)

    monkeypatch.setattr(open_clip.factory, "download_pretrained", fake_download)
    model, info = load_clip()
    assert_loaded(model, clip_state)
    assert requested == ["timm/vit_base_patch16_clip_224.openai/"]
    assert info == WeightsInfo(f"open_clip:{CLIP_MODEL_NAME}", "hub:openai", "hub", None, None)


def test_hub_dino_uses_timm_pretrained(dino_state, offline, monkeypatch):
    requested = []

    def fake_hf(model_id, filename=None, **kwargs):
        requested.append(model_id)
        return dict(dino_state)

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", fake_hf)
    model, info = load_dino()
    assert_loaded(model, dino_state)
    assert requested == [f"timm/{DINO_MODEL_NAME}"]
    assert info == WeightsInfo(f"timm:{DINO_MODEL_NAME}", "hub:dino", "hub", None, None)

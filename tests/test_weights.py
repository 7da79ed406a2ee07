"""Tests for cass_engine.weights: real-size backbones, seeded random weights, saved in the
formats users have and loaded back through the public loaders, from paths and fsspec URLs.

No test touches the network: hub tests block sockets and put huggingface_hub in offline mode.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec
import open_clip
import pytest
import timm
import torch
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

from cass_engine.weights import (
    CLIP_MODEL_NAME,
    DINO_MODEL_NAME,
    WeightsError,
    WeightsInfo,
    load_clip,
    load_dino,
    stage_weights,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit deprecation notes

State = dict[str, torch.Tensor]
OPENAI_EXTRAS = {"input_resolution": 224, "context_length": 77, "vocab_size": 49408}


# ----------------------------------------------------------------------------- helpers


class _Tree(torch.nn.Module):
    """A scriptable module whose state_dict is exactly the buffers hung on it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _module_tree(state: State) -> torch.nn.Module:
    """Nested modules whose state_dict has the keys of ``state`` (like OpenAI's JIT archive)."""
    root = _Tree()
    for key, value in state.items():
        *names, leaf = key.split(".")
        node = root
        for name in names:
            if not hasattr(node, name):
                node.add_module(name, _Tree())
            node = getattr(node, name)
        node.register_buffer(leaf, value.clone())
    return root


def _openai_half(state: State) -> State:
    """float16 like OpenAI's checkpoints (LayerNorms stay float32)."""
    return {k: v if ".ln_" in f".{k}" else v.half() for k, v in state.items()}


def _fp16_exact(state: State) -> State:
    """float32 values that survive a round trip through float16 exactly."""
    return {k: v.half().float() if v.is_floating_point() else v for k, v in state.items()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_loaded(model: torch.nn.Module, expected: State) -> None:
    """Same keys and bit-identical float32 values; CPU, eval mode, no gradients."""
    got = model.state_dict()
    assert set(got) == set(expected)
    for key, value in got.items():
        assert value.dtype == torch.float32 and value.device.type == "cpu", key
        assert torch.equal(value, expected[key]), key
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def _put_in_memory(path: Path, url: str) -> None:
    fsspec.filesystem("memory").pipe(url, path.read_bytes())


@pytest.fixture
def cache_dir(tmp_path: Path) -> Iterator[str]:
    """A staging folder, removed after the test (staged weights are large)."""
    yield str(tmp_path / "cache")
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


@pytest.fixture
def memory_url() -> Iterator[Callable[[Path, str], tuple[str, str]]]:
    """Copies a file into fsspec's in-memory filesystem; removes it afterwards.

    The URL carries credentials and a signature, as presigned URLs do; the second value
    returned is the URL as it may be recorded, without them.
    """
    urls = []

    def put(path: Path, name: str) -> tuple[str, str]:
        url = f"memory://user:SECRET@weights-test/{name}?X-Amz-Signature=SECRET2"
        _put_in_memory(path, url)
        urls.append(url)
        return url, f"memory://***@weights-test/{name}"

    yield put
    fs = fsspec.filesystem("memory")
    for url in urls:
        if fs.exists(url):
            fs.rm(url)


# ----------------------------------------------------------------------------- reference weights


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder for the large weight files of this module, removed at its end."""
    folder = tmp_path_factory.mktemp("weights")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)  # large files: do not keep them around


@pytest.fixture(scope="module")
def clip_random() -> tuple[torch.nn.Module, WeightsInfo]:
    return load_clip(random_seed=0)


@pytest.fixture(scope="module")
def clip_state(clip_random: tuple[torch.nn.Module, WeightsInfo]) -> State:
    return _fp16_exact(clip_random[0].state_dict())


@pytest.fixture(scope="module")
def dino_random() -> tuple[torch.nn.Module, WeightsInfo]:
    return load_dino(random_seed=0)


@pytest.fixture(scope="module")
def dino_state(dino_random: tuple[torch.nn.Module, WeightsInfo]) -> State:
    return _fp16_exact(dino_random[0].state_dict())


def _write_clip(fmt: str, state: State, path: Path) -> None:
    if fmt == "openai-state-dict":
        torch.save({**_openai_half(state), **OPENAI_EXTRAS}, path)
    elif fmt == "openai-torchscript":
        extras = {k: torch.tensor(v) for k, v in OPENAI_EXTRAS.items()}
        tree = _module_tree({**_openai_half(state), **extras})
        torch.jit.save(torch.jit.script(tree), str(path))
    elif fmt == "open_clip":
        wrapped = {f"module.{k}": v for k, v in state.items()}
        torch.save({"epoch": 32, "name": "run", "state_dict": wrapped}, path)
    elif fmt == "open_clip-safetensors":
        save_file({k: v.half().contiguous() for k, v in state.items()}, str(path))


def _write_dino(fmt: str, state: State, path: Path) -> None:
    head = {"head.mlp.0.weight": torch.randn(8, 768), "head.last_layer.weight_g": torch.ones(1, 8)}
    if fmt == "dino-official":
        torch.save(state, path)
    elif fmt == "dino-teacher":
        teacher = {f"backbone.{k}": v for k, v in {**state, **head}.items()}
        student = {f"module.backbone.{k}": -state[k] for k in ("cls_token", "norm.weight")}
        args = argparse.Namespace(arch="vit_base", patch_size=8, lr=0.0005)
        ckpt = {"teacher": {f"module.{k}": v for k, v in teacher.items()}, "student": student}
        torch.save({**ckpt, "epoch": 100, "args": args}, path)
    elif fmt == "timm-safetensors":
        save_file(state, str(path))
    elif fmt == "timm-wrapped-fp16":
        wrapped = {f"module.{k}": v.half() for k, v in state.items()}
        wrapped |= {"module.head.weight": torch.zeros(10, 768), "module.head.bias": torch.zeros(10)}
        torch.save({"epoch": 3, "arch": DINO_MODEL_NAME, "state_dict": wrapped}, path)


def _written_once(files: Path, name: str, write: Callable, state: State
                  ) -> Callable[[str], Path]:
    """``get(fmt)``: the path of ``state`` written in format ``fmt`` (written on first use)."""

    def get(fmt: str) -> Path:
        path = files / f"{name}-{fmt}.bin"
        if not path.exists():
            write(fmt, state, path)
        return path

    return get


@pytest.fixture(scope="module")
def clip_file(files: Path, clip_state: State) -> Callable[[str], Path]:
    """Writes (once) the reference CLIP weights in a given format."""
    return _written_once(files, "clip", _write_clip, clip_state)


@pytest.fixture(scope="module")
def dino_file(files: Path, dino_state: State) -> Callable[[str], Path]:
    """Writes (once) the reference DINO weights in a given format."""
    return _written_once(files, "dino", _write_dino, dino_state)


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
    _assert_loaded(model, clip_state)
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert info == WeightsInfo(
        f"open_clip:{CLIP_MODEL_NAME}", shown, CLIP_FORMATS[fmt], _sha256(path), None
    )


@pytest.mark.parametrize("via", ["path", "memory"])
@pytest.mark.parametrize("fmt", list(DINO_FORMATS))
def test_load_dino_formats(fmt, via, dino_file, dino_state, memory_url, cache_dir):
    path = dino_file(fmt)
    source, shown = (str(path),) * 2 if via == "path" else memory_url(path, f"dino-{fmt}.pth")
    model, info = load_dino(source, cache_dir=cache_dir)
    _assert_loaded(model, dino_state)
    assert isinstance(model, timm.models.VisionTransformer)
    assert model.patch_embed.patch_size == (8, 8) and model.num_classes == 0
    assert info == WeightsInfo(
        f"timm:{DINO_MODEL_NAME}", shown, DINO_FORMATS[fmt], _sha256(path), None
    )


# ----------------------------------------------------------------------------- random weights


def test_random_clip_is_deterministic_and_leaves_global_rng(clip_random):
    model0, info0 = clip_random
    assert info0 == WeightsInfo(f"open_clip:{CLIP_MODEL_NAME}", "random:0", "random", None, 0)
    again, _ = load_clip(random_seed=0)
    _assert_loaded(again, model0.state_dict())
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
    _assert_loaded(load_dino(random_seed=0)[0], model0.state_dict())
    other, _ = load_dino(random_seed=7)
    assert not torch.equal(other.blocks[11].attn.qkv.weight, model0.blocks[11].attn.qkv.weight)


def test_source_and_seed_together_is_an_error(tmp_path):
    with pytest.raises(WeightsError, match="not both"):
        load_dino(str(tmp_path / "x.pth"), random_seed=0)


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


def test_unreadable_staged_copy_is_not_kept(cache_dir):
    fsspec.filesystem("memory").pipe("memory://weights-test/bad.pt", b"<html>502</html>")
    try:
        with pytest.raises(WeightsError, match="bad.pt is not a readable PyTorch checkpoint"):
            load_dino("memory://weights-test/bad.pt", cache_dir=cache_dir)
    finally:
        fsspec.filesystem("memory").rm("memory://weights-test/bad.pt")
    assert os.listdir(cache_dir) == []


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


def test_missing_url_hides_credentials(tmp_path):
    with pytest.raises(WeightsError) as err:
        load_clip("memory://user:SECRET@bucket/ViT-B-16.pt?token=SECRET2", cache_dir=str(tmp_path))
    assert str(err.value) == "weights file not found: memory://***@bucket/ViT-B-16.pt"


def test_unreachable_url_hides_credentials(tmp_path):
    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://user:SECRET@127.0.0.1:{port}/ViT-B-16.pt?X-Amz-Signature=SECRET2"
    with pytest.raises(WeightsError) as err:
        load_clip(url, cache_dir=str(tmp_path))
    assert f"http://***@127.0.0.1:{port}/ViT-B-16.pt (" in str(err.value)
    assert "SECRET" not in "".join(traceback.format_exception(err.value))
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- staging


def test_stage_weights_copies_once_and_reuses(tmp_path):
    local = tmp_path / "w.pt"
    local.write_bytes(b"weights-1")
    assert stage_weights(str(local)) == str(local)
    assert stage_weights(f"file://{local}") == str(local)
    cache = tmp_path / "cache"
    fs = fsspec.filesystem("memory")
    fs.pipe("memory://stage-a/w.pt", b"weights-1")
    fs.pipe("memory://stage-b/w.pt", b"weights-2")
    try:
        staged_a = stage_weights("memory://stage-a/w.pt", str(cache))
        staged_b = stage_weights("memory://stage-b/w.pt", str(cache))
        fs.pipe("memory://stage-a/w.pt", b"changed")  # a staged URL is not fetched again
        assert stage_weights("memory://stage-a/w.pt", str(cache)) == staged_a
    finally:
        fs.rm(["memory://stage-a/w.pt", "memory://stage-b/w.pt"])
    assert Path(staged_a).read_bytes() == b"weights-1"
    assert Path(staged_b).read_bytes() == b"weights-2"
    assert Path(staged_a).parent == cache and staged_a.endswith("-w.pt")
    assert sorted(os.listdir(cache)) == sorted([Path(staged_a).name, Path(staged_b).name])


def test_stage_weights_is_atomic(tmp_path, monkeypatch):
    fs = fsspec.filesystem("memory")
    fs.pipe("memory://stage-c/w.pt", b"x" * 1000)

    def copy_then_fail(src, dst, length=0):
        dst.write(src.read(10))
        raise ConnectionResetError("connection lost")

    monkeypatch.setattr(shutil, "copyfileobj", copy_then_fail)
    try:
        with pytest.raises(WeightsError, match="could not copy weights from memory://stage-c/w.pt"):
            stage_weights("memory://stage-c/w.pt", str(tmp_path))
        assert os.listdir(tmp_path) == []
        monkeypatch.undo()
        staged = stage_weights("memory://stage-c/w.pt", str(tmp_path))
    finally:
        fs.rm("memory://stage-c/w.pt")
    assert Path(staged).read_bytes() == b"x" * 1000


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
        loader(cache_dir=str(tmp_path))
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
    _assert_loaded(model, clip_state)
    assert requested == ["timm/vit_base_patch16_clip_224.openai/"]
    assert info == WeightsInfo(f"open_clip:{CLIP_MODEL_NAME}", "hub:openai", "hub", None, None)


def test_hub_dino_uses_timm_pretrained(dino_state, offline, monkeypatch):
    requested = []

    def fake_hf(model_id, filename=None, **kwargs):
        requested.append(model_id)
        return dict(dino_state)

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", fake_hf)
    model, info = load_dino()
    _assert_loaded(model, dino_state)
    assert requested == [f"timm/{DINO_MODEL_NAME}"]
    assert info == WeightsInfo(f"timm:{DINO_MODEL_NAME}", "hub:dino", "hub", None, None)

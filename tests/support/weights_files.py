"""Test support: real-size backbone weights (seeded random) written in the formats users have.

Fixtures are imported by the weights tests (``from weights_files import ...``); the large
files of a module live in one folder removed at its end.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import save_file

from cass_engine.registry import DINO_MODEL_NAME
from cass_engine.weights import WeightsInfo, load_clip, load_dino

State = dict[str, torch.Tensor]
OPENAI_EXTRAS = {"input_resolution": 224, "context_length": 77, "vocab_size": 49408}


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


def openai_half(state: State) -> State:
    """float16 like OpenAI's checkpoints (LayerNorms stay float32)."""
    return {k: v if ".ln_" in f".{k}" else v.half() for k, v in state.items()}


def fp16_exact(state: State) -> State:
    """float32 values that survive a round trip through float16 exactly."""
    return {k: v.half().float() if v.is_floating_point() else v for k, v in state.items()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_loaded(model: torch.nn.Module, expected: State) -> None:
    """Same keys and bit-identical float32 values; CPU, eval mode, no gradients."""
    got = model.state_dict()
    assert set(got) == set(expected)
    for key, value in got.items():
        assert value.dtype == torch.float32 and value.device.type == "cpu", key
        assert torch.equal(value, expected[key]), key
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def put_in_memory(path: Path, url: str) -> None:
    fsspec.filesystem("memory").pipe(url, path.read_bytes())


def write_clip(fmt: str, state: State, path: Path) -> None:
    """Writes CLIP weights as ``openai-state-dict``, ``openai-torchscript``, ``open_clip`` or
    ``open_clip-safetensors``."""
    if fmt == "openai-state-dict":
        torch.save({**openai_half(state), **OPENAI_EXTRAS}, path)
    elif fmt == "openai-torchscript":
        extras = {k: torch.tensor(v) for k, v in OPENAI_EXTRAS.items()}
        tree = _module_tree({**openai_half(state), **extras})
        torch.jit.save(torch.jit.script(tree), str(path))
    elif fmt == "open_clip":
        wrapped = {f"module.{k}": v for k, v in state.items()}
        torch.save({"epoch": 32, "name": "run", "state_dict": wrapped}, path)
    elif fmt == "open_clip-safetensors":
        save_file({k: v.half().contiguous() for k, v in state.items()}, str(path))


def write_dino(fmt: str, state: State, path: Path) -> None:
    """Writes DINO weights as ``dino-official``, ``dino-teacher``, ``timm-safetensors`` or
    ``timm-wrapped-fp16``."""
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
        put_in_memory(path, url)
        urls.append(url)
        return url, f"memory://***@weights-test/{name}"

    yield put
    fs = fsspec.filesystem("memory")
    for url in urls:
        if fs.exists(url):
            fs.rm(url)


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
    return fp16_exact(clip_random[0].state_dict())


@pytest.fixture(scope="module")
def dino_random() -> tuple[torch.nn.Module, WeightsInfo]:
    return load_dino(random_seed=0)


@pytest.fixture(scope="module")
def dino_state(dino_random: tuple[torch.nn.Module, WeightsInfo]) -> State:
    return fp16_exact(dino_random[0].state_dict())


@pytest.fixture(scope="module")
def clip_file(files: Path, clip_state: State) -> Callable[[str], Path]:
    """Writes (once) the reference CLIP weights in a given format."""
    return _written_once(files, "clip", write_clip, clip_state)


@pytest.fixture(scope="module")
def dino_file(files: Path, dino_state: State) -> Callable[[str], Path]:
    """Writes (once) the reference DINO weights in a given format."""
    return _written_once(files, "dino", write_dino, dino_state)

"""Security (issue 9), weight files: nothing in a weights file runs code. TorchScript
``__setstate__`` and pickle ``__reduce__`` payloads never run; the safe TorchScript reader
matches ``torch.jit.load`` and refuses hostile shapes and compression bombs without
allocating.

Every test here is small: tiny files, no engine.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Tuple  # noqa: UP035 - TorchScript needs typing.Tuple

import fsspec
import pytest
import torch

from cass_engine.weights import WeightsError, load_clip, load_dino

# ----------------------------------------------------------------------------- weights

MARKER_TEXT = "MARKER-TORCHSCRIPT-CODE-RAN"


class _SetStateModule(torch.nn.Module):
    """A module whose TorchScript ``__setstate__`` prints a marker when the archive loads."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:  # noqa: UP006
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:  # noqa: UP006
        print("MARKER-TORCHSCRIPT-CODE-RAN")
        self.weight = state[0]
        self.training = state[1]


class _WritesMarker:
    """Pickles to ``os.system("touch MARKER")``: runs when a plain unpickler loads it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _setstate_archive(path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript deprecation notes
        torch.jit.save(torch.jit.script(_SetStateModule()), str(path))
    return path


def _reduce_archive(path: Path, marker: Path) -> Path:
    """A TorchScript-shaped zip (code/, constants.pkl) whose data.pkl runs a shell command."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"weight": _WritesMarker(marker)}))
        archive.writestr("evil/constants.pkl", pickle.dumps(()))
        archive.writestr("evil/code/__torch__.py", "class M(Module):\n  __parameters__ = []\n")
        archive.writestr("evil/version", "3\n")
    return path


def _reduce_torch_save(path: Path, marker: Path) -> Path:
    buffer = io.BytesIO()
    torch.save({"weight": _WritesMarker(marker)}, buffer)
    path.write_bytes(buffer.getvalue())
    return path


class _Block(torch.nn.Module):
    """Like OpenAI's ResidualAttentionBlock: attention, a plain tensor attribute, an MLP."""

    def __init__(self, width: int, mask: torch.Tensor | None) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(width, 2)
        self.ln_1 = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(),
                                       torch.nn.Linear(2 * width, width))
        self.attn_mask = mask  # an attribute, not a parameter or buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(x)


class _Tower(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.Sequential(_Block(8, torch.zeros(3, 3)), _Block(8, None))
        self.proj = torch.nn.Parameter(torch.randn(8, 4).half())
        self.register_buffer("scale", torch.tensor(2.0))
        self.context_length = 77

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x) @ self.proj.float() * self.scale


def test_safe_torchscript_reader_matches_jit_load(tmp_path):
    from cass_engine.torchscript import read_torchscript_state

    path = tmp_path / "tower.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_Tower()), str(path))
        expected = torch.jit.load(str(path)).state_dict()  # our own archive: safe to run
    state = read_torchscript_state(str(path))
    assert set(state) == set(expected) and "blocks.0.attn_mask" not in state
    for key, value in expected.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


class _StorageRef:
    """Pickled as a persistent storage reference (as torch.jit.save writes them)."""


class _StridedTensor:
    def __init__(self, size: tuple, stride: tuple) -> None:
        self.size, self.stride = size, stride

    def __reduce__(self):
        import collections

        return (torch._utils._rebuild_tensor_v2,
                (_StorageRef(), 0, self.size, self.stride, False, collections.OrderedDict()))


class _ArchivePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", torch.FloatStorage, "0", "cpu", 1)
        return None


def _strided_archive(path: Path, size: tuple, stride: tuple, stored: bytes) -> Path:
    buffer = io.BytesIO()
    _ArchivePickler(buffer, protocol=2).dump({"weight": _StridedTensor(size, stride)})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("m/data.pkl", buffer.getvalue())
        archive.writestr("m/constants.pkl", pickle.dumps(()))
        archive.writestr("m/code/__torch__.py", "class M(Module):\n  __parameters__ = []\n")
        archive.writestr("m/data/0", stored)
    return path


def test_hostile_tensor_shapes_and_bombs_are_refused_without_allocating(tmp_path):
    from cass_engine.torchscript import UnsafeArchiveError, read_torchscript_state

    ok = _strided_archive(tmp_path / "ok.pt", (2, 2), (2, 1), bytes(16))
    with pytest.raises(UnsafeArchiveError, match="not a module"):  # its tensor was rebuilt
        read_torchscript_state(str(ok))
    broadcast = _strided_archive(tmp_path / "b.pt", (2**20, 2**20), (0, 0), bytes(4))
    with pytest.raises(UnsafeArchiveError, match="larger than its storage"):
        read_torchscript_state(str(broadcast))  # 4 TB if it were materialised
    bomb = _strided_archive(tmp_path / "z.pt", (4,), (1,), bytes(2**26))  # 64 MiB of zeros
    with pytest.raises(UnsafeArchiveError, match="compression bomb"):
        read_torchscript_state(str(bomb))


@pytest.mark.parametrize("via", ["path", "memory"])
@pytest.mark.parametrize("loader", [load_clip, load_dino])
def test_torchscript_setstate_never_runs(loader, via, tmp_path, capfd):
    path = _setstate_archive(tmp_path / "ViT-B-16.pt")
    source = str(path)
    if via == "memory":
        source = f"memory://security-test/{tmp_path.name}/ViT-B-16.pt"
        fsspec.filesystem("memory").pipe(source, path.read_bytes())
    with pytest.raises(WeightsError) as err:
        loader(source, cache_dir=str(tmp_path / "cache"))
    message = str(err.value)
    assert "TorchScript archive that cannot be read without running its code" in message
    assert "__setstate__" in message and "Accepted weight files" in message
    assert "safetensors" in message and "weights_only=True" in message
    assert MARKER_TEXT not in capfd.readouterr().out  # its code never ran


@pytest.mark.parametrize("make", ["torchscript-shaped", "torch.save"])
@pytest.mark.parametrize("via", ["path", "memory"])
def test_pickle_reduce_never_runs(make, via, tmp_path):
    marker = tmp_path / "marker"
    write = _reduce_archive if make == "torchscript-shaped" else _reduce_torch_save
    path = write(tmp_path / "weights.pt", marker)
    source = str(path)
    if via == "memory":
        source = f"memory://security-test/{tmp_path.name}/weights.pt"
        fsspec.filesystem("memory").pipe(source, path.read_bytes())
    with pytest.raises(WeightsError):
        load_clip(source, cache_dir=str(tmp_path / "cache"))
    assert not marker.exists()
    pickle.loads(pickle.dumps(_WritesMarker(marker)))  # the payload does work when run
    assert marker.exists()

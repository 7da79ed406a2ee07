"""Read the tensors of a TorchScript archive without running anything from it.

``torch.jit.load`` compiles the archive's ``code/`` and runs it (``__setstate__`` methods
included) while loading, so a weights file could run arbitrary TorchScript. This reader never
does: it unpickles ``data.pkl`` with an unpickler that knows only the tensor-rebuild function,
the storage types and ``OrderedDict`` (every other global is refused), builds each tensor from
its raw storage bytes in the zip, and takes the parameter and buffer names of each module
class from the ``__parameters__``/``__buffers__`` declarations in ``code/`` (read as text,
never compiled). Archive member names are only looked up in the zip, never used as paths.

That is enough for OpenAI's ``ViT-B-16.pt`` and any module tree saved by ``torch.jit.save``
whose modules keep their plain attribute state; an archive that restores itself through its
own code (``__setstate__``), holds objects other than modules and tensors, or references
other globals raises :class:`UnsafeArchiveError`.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import re
import zipfile
from typing import Any

import torch

#: Largest tensor storage read from an archive (far above any CLIP weight tensor).
MAX_STORAGE_BYTES = 2**31

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_CLASS = re.compile(r"^class\s+([\w.]+)\s*\(", re.M)  # older archives: mangle.Name
_NAMES = re.compile(r"^\s+__(parameters|buffers)__\s*=\s*\[([^\]]*)\]", re.M)
_SETSTATE = re.compile(r"^\s+def\s+__setstate__\s*\(", re.M)
_MAX_DEPTH = 64


class UnsafeArchiveError(ValueError):
    """The archive cannot be read without running its code (the message says why)."""


class _StorageType:
    """Stands for ``torch.<X>Storage`` in the pickle: only its dtype is used."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _ScriptObject:
    """A ``__torch__`` object of the pickle: its class name and pickled state, nothing run."""

    qualname = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple,
                    *_ignored: Any) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` on a flat storage tensor, bounds checked."""
    if not isinstance(storage, torch.Tensor):
        raise UnsafeArchiveError("a tensor is rebuilt from something other than a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or min(size + stride + (int(offset),), default=0) < 0:
        raise UnsafeArchiveError("a tensor has an invalid size, stride or offset")
    extent = sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if all(size) else -1
    if int(offset) + extent >= storage.numel() and all(size):
        raise UnsafeArchiveError("a tensor reaches beyond its storage")
    if math.prod(size) > storage.numel():  # overlapping strides (e.g. 0) would multiply it
        raise UnsafeArchiveError("a tensor is larger than its storage")
    return torch.as_strided(storage, size, stride, int(offset)).clone()


def _same(value: Any, *_ignored: Any) -> Any:
    """``torch.jit._pickle.build_*list`` / ``restore_type_tag``: the value itself."""
    return value


_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch.jit._pickle", name): _same for name in (
        "build_intlist", "build_tensorlist", "build_doublelist", "build_boollist",
        "build_tensor_from_id", "restore_type_tag")},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix = archive, prefix
        self._storages: dict[str, torch.Tensor] = {}
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _GLOBALS:
            fn = _GLOBALS[(module, name)]  # a fresh callable each time: a BUILD opcode
            return lambda *args: fn(*args)  # on it changes nothing beyond this archive
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                self._classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return self._classes[qualname]
        raise UnsafeArchiveError(f"its pickle references {module}.{name}, which is not part "
                                 "of a tensor")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise UnsafeArchiveError(f"unknown persistent reference {type(pid).__name__}")
        dtype, key = pid[1].dtype, pid[2]
        if key not in self._storages:
            name = f"{self._prefix}data/{key}"
            try:
                info = self._archive.getinfo(name)
            except KeyError:
                raise UnsafeArchiveError(f"storage {key!r} is missing") from None
            if info.file_size > MAX_STORAGE_BYTES or (
                    info.compress_type != zipfile.ZIP_STORED
                    and info.file_size > 100 * max(info.compress_size, 1)):
                raise UnsafeArchiveError(f"storage {key!r} declares {info.file_size} bytes "
                                         "(too large, or a compression bomb)")
            raw = self._archive.read(name)
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) % itemsize:
                raise UnsafeArchiveError(f"storage {key!r} has a partial element")
            flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(
                0, dtype=dtype)
            self._storages[key] = flat
        return self._storages[key]


def is_torchscript(path: str) -> bool:
    """A TorchScript archive is a zip with ``code/`` or ``constants.pkl`` entries."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" or "/code/" in n
                   for n in archive.namelist())


def read_torchscript_state(path: str) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript module archive, as ``torch.jit.load(path)
    .state_dict()`` would return them, without compiling or running any of its code.

    Args:
        path: local path of the archive.

    Returns:
        ``{dotted name: CPU tensor}`` in the archive's dtypes.

    Raises:
        UnsafeArchiveError: the archive cannot be read this way (the message says why).
        zipfile.BadZipFile, OSError: not a readable zip (truncated, damaged).
    """
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise UnsafeArchiveError("it has no single <archive>/data.pkl")
        prefix = pickles[0][: -len("data.pkl")]
        declared = _declared_tensors(archive, prefix, names)
        root = _Unpickler(archive.read(pickles[0]), archive, prefix).load()
    if not isinstance(root, _ScriptObject):
        raise UnsafeArchiveError(f"its data.pkl holds a {type(root).__name__}, not a module")
    state: dict[str, torch.Tensor] = {}
    _collect(root, "", declared, state, 0)
    return state


def _declared_tensors(archive: zipfile.ZipFile, prefix: str,
                      names: list[str]) -> dict[str, tuple[str, ...] | None]:
    """``{class qualname: parameter and buffer names}`` from the ``code/`` text (never
    compiled); ``None`` for a class that defines ``__setstate__``."""
    code = f"{prefix}code/"
    declared: dict[str, tuple[str, ...] | None] = {}
    for name in names:
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        module = name[len(code):-3].replace("/", ".")
        text = archive.read(name).decode("utf-8", errors="replace")
        starts = [(m.start(), m.group(1)) for m in _CLASS.finditer(text)] + [(len(text), "")]
        for (start, cls), (end, _) in zip(starts, starts[1:], strict=False):
            body = text[start:end]
            if _SETSTATE.search(body):
                declared[f"{module}.{cls}"] = None
                continue
            found: list[str] = []
            for match in _NAMES.finditer(body):
                found += re.findall(r'"([^"]*)"', match.group(2))
            declared[f"{module}.{cls}"] = tuple(found)
    return declared


def _collect(obj: _ScriptObject, prefix: str, declared: dict, out: dict, depth: int) -> None:
    """Adds ``obj``'s parameters and buffers, then those of its submodules, to ``out``."""
    if depth > _MAX_DEPTH:
        raise UnsafeArchiveError("its modules are nested too deeply")
    if declared.get(obj.qualname, ()) is None:
        raise UnsafeArchiveError(f"{obj.qualname} restores itself with its own code "
                                 "(__setstate__)")
    if obj.qualname not in declared:
        raise UnsafeArchiveError(f"{obj.qualname} has no class declaration in code/")
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):
        raise UnsafeArchiveError(f"{obj.qualname} has a pickled state of type "
                                 f"{type(state).__name__}, not module attributes")
    for name in declared[obj.qualname]:
        value = state.get(name)
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif value is not None:
            raise UnsafeArchiveError(f"{prefix}{name} is a {type(value).__name__}, "
                                     "not a tensor")
    for name, value in state.items():
        if isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{name}.", declared, out, depth + 1)

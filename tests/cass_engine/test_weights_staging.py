"""Tests for cass_engine.staging: weight URLs copied once per node into one cache folder
(under a cross-process lock), atomic copies, messages without credentials, the cache's
location (as the README states it) and the one random-weights rule.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from support import REPO
from support.weights_files import cache_dir  # noqa: F401 - fixture

from cass_engine.config import CassConfig
from cass_engine.staging import check_weight_choice, stage_weights, weights_dir
from cass_engine.weights import WeightsError, load_clip, load_dino

CHOICE = "random weights .* cannot be combined with weight files"


def _staged_files(folder: str | Path) -> list[str]:
    """The staged files of a cache folder (lock files are kept: see staging._locked)."""
    return sorted(n for n in os.listdir(folder) if not n.endswith(".lock"))


def test_local_paths_pass_through(tmp_path):
    local = tmp_path / "w.pt"
    local.write_bytes(b"weights-1")
    assert stage_weights(str(local)) == str(local)
    assert stage_weights(f"file://{local}") == str(local)
    assert not (tmp_path / "cache").exists()


def test_stage_weights_copies_once_and_reuses(tmp_path):
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
    assert _staged_files(cache) == sorted([Path(staged_a).name, Path(staged_b).name])


def test_stage_weights_is_atomic(tmp_path, monkeypatch):
    fs = fsspec.filesystem("memory")
    fs.pipe("memory://stage-c/w.pt", b"x" * 1000)

    def copy_then_fail(self, rpath, lpath, **kwargs):
        Path(lpath).write_bytes(b"x" * 10)
        raise ConnectionResetError("connection lost")

    monkeypatch.setattr(MemoryFileSystem, "get_file", copy_then_fail)
    try:
        with pytest.raises(WeightsError, match="could not copy weights from memory://stage-c/w.pt"):
            stage_weights("memory://stage-c/w.pt", str(tmp_path))
        assert _staged_files(tmp_path) == []  # no partial file, under any name
        monkeypatch.undo()
        staged = stage_weights("memory://stage-c/w.pt", str(tmp_path))
    finally:
        fs.rm("memory://stage-c/w.pt")
    assert Path(staged).read_bytes() == b"x" * 1000


def test_retry_wraps_the_copy_itself(tmp_path):
    """The job's retry policy sees the storage error (not a WeightsError) and can retry it."""
    fs = fsspec.filesystem("memory")
    url = "memory://user:SECRET@stage-d/w.pt"  # the memory filesystem keeps it in the path
    fs.pipe(url, b"weights")
    seen = []

    def retry(fn, what):
        seen.append(what)
        return fn()

    try:
        staged = stage_weights(url, str(tmp_path), retry=retry)
        stage_weights(url, str(tmp_path), retry=retry)
    finally:
        fs.rm(url)
    assert seen == ["stage weights memory://***@stage-d/w.pt"]  # once, no credentials
    assert Path(staged).read_bytes() == b"weights"


_CHILD = """
import os, sys, time
import fsspec
from fsspec.implementations.memory import MemoryFileSystem
from cass_engine.staging import stage_weights
cache, log, go = sys.argv[1:4]
fsspec.filesystem("memory").pipe("memory://lock-test/w.pt", b"w" * 1000)
real = MemoryFileSystem.get_file
def slow_copy(self, rpath, lpath, **kwargs):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(1.0)  # the other process asks for the file meanwhile
    return real(self, rpath, lpath, **kwargs)
MemoryFileSystem.get_file = slow_copy
open(go + f".{os.getpid()}", "w").close()  # ready
while not os.path.exists(go):
    time.sleep(0.01)
print(stage_weights("memory://lock-test/w.pt", cache))
"""


def test_two_processes_on_a_node_copy_once(tmp_path):
    cache, log, go = tmp_path / "cache", tmp_path / "copies.log", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    children = [subprocess.Popen([sys.executable, "-c", _CHILD, str(cache), str(log), str(go)],
                                 stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("go.*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        go.touch()  # both stage at the same moment
        outputs = [child.communicate(timeout=60)[0].strip() for child in children]
    finally:
        for child in children:
            child.kill()
    assert all(child.returncode == 0 for child in children)
    assert len(log.read_text().split()) == 1  # one copy; the other process waited for it
    assert outputs[0] == outputs[1] and Path(outputs[0]).read_bytes() == b"w" * 1000
    assert _staged_files(cache) == [Path(outputs[0]).name]


def test_unreadable_staged_copy_is_not_kept(cache_dir):
    fsspec.filesystem("memory").pipe("memory://weights-test/bad.pt", b"<html>502</html>")
    try:
        expected = "memory://weights-test/bad.pt is not a readable PyTorch checkpoint"
        with pytest.raises(WeightsError, match=expected):  # named by its URL, not its copy
            load_dino("memory://weights-test/bad.pt", cache_dir=cache_dir)
    finally:
        fsspec.filesystem("memory").rm("memory://weights-test/bad.pt")
    assert _staged_files(cache_dir) == []


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
    assert _staged_files(tmp_path) == []


def test_one_cache_folder_where_the_readme_says(tmp_path, monkeypatch):
    monkeypatch.delenv("CASS_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert weights_dir() == tmp_path / "home" / ".cache" / "cass_engine" / "weights"
    monkeypatch.setenv("CASS_CACHE_DIR", str(tmp_path / "cass"))
    assert weights_dir() == tmp_path / "cass" / "weights"
    assert weights_dir(tmp_path / "root") == tmp_path / "root" / "weights"
    readme = (REPO / "README.md").read_text()
    weights_section = readme.split("## Weights", 1)[1].split("\n## ", 1)[0]
    assert "`$CASS_CACHE_DIR/weights`" in weights_section
    assert "`~/.cache/cass_engine/weights`" in weights_section


def test_default_staging_goes_to_the_cache_root(tmp_path, monkeypatch):
    """Without a cache folder (``cass_engine.predict``, a job without ``cache_dir``), URLs are
    staged under ``$CASS_CACHE_DIR/weights``, by the engine and by the job's workers alike."""
    from pipeline.config import EngineSpec
    from pipeline.engine import stage_engine_weights

    monkeypatch.setenv("CASS_CACHE_DIR", str(tmp_path / "cass"))
    fs = fsspec.filesystem("memory")
    fs.pipe("memory://stage-e/w.pt", b"weights")
    fs.pipe("memory://stage-e/d.pth", b"dino")
    try:
        staged = stage_weights("memory://stage-e/w.pt")
        stage_engine_weights(EngineSpec(CassConfig.from_preset("voc21"),
                                        dino_weights="memory://stage-e/d.pth"))
    finally:
        fs.rm(["memory://stage-e/w.pt", "memory://stage-e/d.pth"])
    assert Path(staged).parent == tmp_path / "cass" / "weights"
    assert len(_staged_files(tmp_path / "cass" / "weights")) == 2
    assert sorted(p.name for p in (tmp_path / "cass").iterdir()) == ["weights"]


def test_random_weights_with_files_is_one_rule(tmp_path):
    from cass_engine.segmenter import build_segmenter
    from pipeline.config import EngineSpec

    config = CassConfig.from_preset("voc21")
    with pytest.raises(ValueError, match=CHOICE):
        check_weight_choice(None, "dino.pth", 0)
    with pytest.raises(ValueError, match=CHOICE):
        EngineSpec(config, clip_weights="s3://b/ViT-B-16.pt", random_weights=0)
    with pytest.raises(ValueError, match=CHOICE):  # before anything is built or fetched
        build_segmenter(config, dino_weights=str(tmp_path / "missing.pth"), random_weights=3)
    check_weight_choice("clip.pt", "dino.pth", None)
    check_weight_choice(None, None, 0)

"""Security and clean failures (issue 9): nothing from a file or the network runs code, the
embedded Ray listens on loopback only, bad input is one line and a documented exit code.

Every test here is small: the stub engine where the engine does not matter, tiny files.
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
import numpy as np
import psutil
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


# ----------------------------------------------------------------------------- embedded Ray

from support import REPO  # noqa: E402

_SLOW_STUB_JOB = """
import dataclasses, sys
import jobs.label as label
from pipeline.stub import StubOptions
spec = label._engine_spec
label._engine_spec = lambda args, io: dataclasses.replace(
    spec(args, io), stub=StubOptions(seconds_per_image=0.4))
sys.exit(label.main(sys.argv[1:]))
"""


def _is_loopback(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _listeners(root: psutil.Process) -> set[tuple[str, str, int]]:
    """``(process name, ip, port)`` of every listening TCP socket of ``root``'s process tree."""
    found = set()
    try:
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return found
    for proc in tree:
        try:
            name = proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((name, conn.laddr.ip, conn.laddr.port))
        except psutil.Error:  # exited meanwhile
            continue
    return found


def test_embedded_ray_listens_on_loopback_only_and_joins_no_stranger(tmp_path):
    import subprocess
    import sys
    import tempfile
    import time

    ray_tmp = Path(tempfile.mkdtemp(prefix="rsec", dir="/tmp"))  # short: socket paths
    # A cluster that `ray start` recorded (someone else's): ray.init() would try to join it.
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-c", _SLOW_STUB_JOB, "--input", str(REPO / "samples/images"),
               "--output", str(tmp_path / "out"), "--engine", "stub", "--actors", "1",
               "--cpus-per-actor", "1", "--progress-interval", "1"]
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    root, seen = psutil.Process(process.pid), set()
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            seen |= _listeners(root)
            time.sleep(0.25)
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert process.returncode == 0, output
    names = {name for name, _, _ in seen}
    assert {"gcs_server", "raylet"} <= names, seen  # the run's own Ray was seen running
    assert any(name.startswith("ray::") for name in names), seen  # and its workers
    exposed = sorted(s for s in seen if not _is_loopback(s[1]))
    assert not exposed, f"listening beyond loopback: {exposed}"


# ----------------------------------------------------------------------------- decoding


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch) -> Path:
    """A ``gs`` first on PATH that leaves a marker file when run; returns the marker path."""
    from PIL import EpsImagePlugin

    bin_dir, marker = tmp_path / "bin", tmp_path / "gs-ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # not cached from earlier
    monkeypatch.setattr(EpsImagePlugin, "gs_windows_binary", None)
    return marker


def _eps_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), (200, 10, 10)).save(buffer, "EPS")
    return buffer.getvalue()


def test_postscript_named_jpg_is_a_decode_error_and_ghostscript_never_runs(
        tmp_path, fake_ghostscript):
    from PIL import Image

    from cass_engine.images import ImageInputError, load_image
    from pipeline.decode import decode_image

    data = _eps_bytes()
    decoded = decode_image(data, 10**8)
    assert decoded.status == "decode_error" and decoded.rgb is None
    assert "EPS" in decoded.error and "JPEG, PNG, WebP, GIF, TIFF, BMP" in decoded.error
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    with pytest.raises(ImageInputError, match="EPS"):
        load_image(path)
    assert not fake_ghostscript.exists()
    with pytest.raises(Exception):  # noqa: B017, PT011 - control: Pillow's default open runs gs
        Image.open(io.BytesIO(data)).load()
    assert fake_ghostscript.exists()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"])
def test_accepted_formats_still_decode(fmt):
    from PIL import Image

    from pipeline.decode import decode_image

    buffer = io.BytesIO()
    Image.new("RGB", (20, 18), (10, 200, 30)).save(buffer, fmt)
    decoded = decode_image(buffer.getvalue(), 10**8)
    assert decoded.status == "ok" and decoded.rgb.shape == (18, 20, 3)


# ----------------------------------------------------------------------------- preflight


def _label(argv: list[str], capsys) -> tuple[int, list[str], float]:
    """Runs jobs/label.py in this process; returns exit code, stderr lines, seconds."""
    import time

    from jobs import label

    start = time.monotonic()
    code = label.main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, lines, time.monotonic() - start


@pytest.fixture
def nothing_starts(monkeypatch):
    """Fails the test if the job gets as far as planning or starting Ray."""
    from jobs import label
    from pipeline import plan

    def started(*_args, **_kwargs):
        raise AssertionError("the job went on to plan or start Ray")

    monkeypatch.setattr(plan, "plan_job", started)
    monkeypatch.setattr(label, "init_ray", started)


@pytest.fixture
def no_aws_credentials(monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _options_file(tmp_path: Path, options: dict) -> str:
    import json

    path = tmp_path / "storage.json"
    path.write_text(json.dumps(options))
    path.chmod(0o600)
    return f"@{path}"


@pytest.mark.parametrize("case", ["wrong key", "wrong secret", "missing bucket", "no credentials"])
def test_storage_errors_are_one_line_before_any_worker(case, s3_server, s3_bucket, tmp_path,
                                                       capsys, no_aws_credentials,
                                                       nothing_starts):
    options = dict(s3_server.storage_options)
    bucket, expected = s3_bucket, "rejected the credentials"
    if case == "wrong key":
        options["key"] = "not-a-known-key"
    elif case == "wrong secret":
        options["secret"] = "not-the-secret"
    elif case == "missing bucket":
        bucket, expected = "no-such-bucket-here", "bucket 'no-such-bucket-here'"
    else:
        del options["key"], options["secret"]
        expected = "no credentials"
    code, lines, seconds = _label([
        "--input", f"s3://{bucket}/shards/", "--output", str(tmp_path / "out"),
        "--engine", "stub", "--storage-options", _options_file(tmp_path, options)], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert expected in lines[0] and f"s3://{bucket}/shards/" in lines[0]
    assert "not-the-secret" not in lines[0] and s3_server.secret not in lines[0]
    assert seconds < 15


def test_unreachable_endpoint_fails_in_seconds(tmp_path, capsys, nothing_starts):
    import socket

    with socket.socket() as sock:  # a loopback port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "SECRET-X"}
    code, lines, seconds = _label([
        "--input", "s3://bucket/shards/", "--output", "s3://bucket/labels",
        "--engine", "stub", "--storage-options", _options_file(tmp_path, options)], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "cannot reach the storage endpoint" in lines[0] and str(port) in lines[0]
    assert "SECRET-X" not in lines[0]
    assert seconds < 15


def test_storage_options_file_errors_never_show_the_contents(tmp_path, capsys):
    from jobs import label

    bad = tmp_path / "bad.json"
    bad.write_text('{"secret": "SECRET-Y",')
    for value in (f"@{bad}", f"@{tmp_path / 'missing.json'}"):
        with pytest.raises(SystemExit) as exit_info:
            label.build_parser().parse_args(["--input", "a", "--output", "b",
                                             "--storage-options", value])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "SECRET-Y" not in err and "storage" in err


@pytest.mark.parametrize(("inp", "out"), [
    ("data", "data/labels"), ("data/labels", "data"), ("data/", "data/./x"),
    ("s3://b/images/", "s3://b/images/run1"), ("s3://b/images/*.tar", "s3://b/images/out"),
])
def test_output_inside_input_is_refused(inp, out, tmp_path, capsys, monkeypatch,
                                        nothing_starts):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    code, lines, _ = _label(["--input", inp, "--output", out, "--engine", "stub"], capsys)
    assert code == 2 and len(lines) == 1 and "choose an output outside the input" in lines[0]


def test_sibling_output_is_accepted():
    from pipeline.preflight import check_not_nested

    check_not_nested("s3://b/images", "s3://b/images-labels")
    check_not_nested("/data/images", "/data/labels")
    check_not_nested("s3://b/images", "gs://b/images/labels")


# ----------------------------------------------------------------------------- public URIs


def test_messages_never_show_user_info_or_query(tmp_path, capsys):
    from schemas.uris import public_text

    text = public_text("cannot read s3://AKIA:SECRET1@bucket/x.tar?X-Amz-Signature=SECRET2: "
                       "no (see https://host/a?token=SECRET3)")
    assert "SECRET" not in text and "s3://***@bucket/x.tar" in text and "https://host/a" in text
    code, lines, _ = _label(["--input", "memory://user:SECRET4@nowhere/in?sig=SECRET5",
                             "--output", str(tmp_path / "out"), "--engine", "stub"], capsys)
    assert code == 2 and len(lines) == 1 and "memory://***@nowhere/in" in lines[0]
    assert "SECRET" not in lines[0]



def test_missing_hub_weights_offline_is_one_line_with_the_whole_remedy(tmp_path, capsys,
                                                                      monkeypatch,
                                                                      nothing_starts):
    from huggingface_hub import constants

    from cass_engine.weights import WEIGHTS_REMEDY

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, lines, seconds = _label(["--input", str(REPO / "samples/images"),
                                   "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "--clip-weights and no --dino-weights" in lines[0] and WEIGHTS_REMEDY in lines[0]
    assert seconds < 30 and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- Parquet ids


def test_parquet_duplicate_and_null_ids_get_unique_image_ids(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.decode import DecodedImage
    from pipeline.encode import failure_row
    from pipeline.readers import iter_raw_images
    from pipeline.shards import ShardSpec
    from schemas.io import open_uri

    ids = ["a", "a", None, "00000002", "a~1", "b", None, "a"]
    table = pa.table({"image": [b"x"] * len(ids), "name": ids})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=3)
    fs, _ = open_uri(str(tmp_path))
    shard = ShardSpec("p", "parquet", (str(tmp_path / "p.parquet"),), (), "p", "fp")

    def rows() -> list[dict]:
        items = list(iter_raw_images(shard, fs, "image", "name"))
        return [failure_row("p", item, DecodedImage(None, None, None), "decode_error", "x")
                for item in items]

    first = rows()
    image_ids = [r["image_id"] for r in first]
    assert len(set(image_ids)) == len(ids), image_ids
    assert [r["key"] for r in first] == ["a", "a", "00000002", "00000002", "a~1", "b",
                                         "00000006", "a"]  # original ids (row number: null)
    assert image_ids[:3] == ["p/a", "p/a~1", "p/00000002"]
    assert image_ids == [r["image_id"] for r in rows()]  # deterministic


# ----------------------------------------------------------------------------- audit text

DATA_NAMES = ["background", "cost $5 or $6", "<script>alert(1)</script>", "a $^$ b"]


def test_audit_draws_data_text_literally_and_escapes_html(tmp_path):
    from PIL import Image
    from support.audit_data import ok_row, write_labels_output

    from jobs.audit import main

    labels = np.zeros((8, 8), np.int64)
    labels[:4] = 1
    labels[4:, :4] = 2
    labels[4:, 4:] = 3
    key = "<img src=x onerror=alert(2)> $1$.jpg"
    write_labels_output(str(tmp_path / "out"), {"s0": [
        ok_row(key, labels, 4, [0.1, 0.9, 0.8, 0.7])]}, [[n] for n in DATA_NAMES])
    gt = tmp_path / "gt"
    gt.mkdir()
    Image.fromarray(labels.T.astype(np.uint8)).save(gt / f"{key[:-4]}.png")
    (gt / "classes.txt").write_text("\n".join(DATA_NAMES) + "\n")
    code = main(["--labels", str(tmp_path / "out"), "--ground-truth", str(gt),
                 "--report", str(tmp_path / "report"), "--no-progress", "--fail-under", "0"])
    assert code == 0
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "cost $5 or $6" in html



def test_plots_draw_data_text_literally():
    from PIL import Image

    from pipeline.audit.plots import confusion_heatmap, iou_bars

    names = [*DATA_NAMES, "a $^$ b", r"x $\frac{$ y"]  # not even valid math text
    for png in (iou_bars(names, [50.0] * len(names)),
                confusion_heatmap(np.eye(len(names), dtype=np.int64) * 5, names)):
        assert Image.open(io.BytesIO(png)).size[0] > 100


def test_gcs_missing_bucket_is_one_line(gcs_server, tmp_path, capsys):
    from pipeline.preflight import PreflightError, check_storage

    bucket = gcs_server.new_bucket()
    check_storage(f"gs://{bucket}/shards/", gcs_server.storage_options, "the input")
    with pytest.raises(PreflightError, match="does not exist") as err:
        check_storage("gs://no-such-bucket-x/shards/", gcs_server.storage_options, "the input")
    assert "\n" not in str(err.value)


def test_credentials_from_the_environment(s3_server, s3_bucket, monkeypatch, no_aws_credentials):
    from pipeline.preflight import check_storage

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    check_storage(f"s3://{s3_bucket}/in/", {"endpoint_url": s3_server.endpoint_url}, "the input")


def test_permission_denied_is_named():
    from botocore.exceptions import ClientError

    from pipeline.preflight import describe_storage_error

    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}},
                         "ListObjectsV2")
    try:
        raise PermissionError("Access Denied") from denied
    except PermissionError as exc:
        text = describe_storage_error(exc, "s3://u:SECRET@b/in?x=SECRET", "the input")
    assert text.startswith("permission denied for the input s3://***@b/in")
    assert "SECRET" not in text


def test_missing_weights_url_is_one_line(s3_server, s3_bucket, tmp_path, capsys,
                                         nothing_starts):
    code, lines, seconds = _label([
        "--input", str(REPO / "samples/images"), "--output", str(tmp_path / "out"),
        "--clip-weights", f"s3://{s3_bucket}/weights/ViT-B-16.pt",
        "--dino-weights", str(tmp_path / "dino.pth"),
        "--storage-options", _options_file(tmp_path, s3_server.storage_options)], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert f"the weights file s3://{s3_bucket}/weights/ViT-B-16.pt does not exist" in lines[0]
    assert seconds < 15


def test_ground_truth_masks_use_the_decoder_allow_list(fake_ghostscript):
    from cass_engine.images import decode_rgb
    from pipeline.audit.errors import AuditError
    from pipeline.audit.sources import decode_label_png

    with pytest.raises(AuditError, match="EPS"):
        decode_label_png(_eps_bytes(), "mask a.png")
    with pytest.raises(OSError, match="EPS"):
        decode_rgb(_eps_bytes())
    assert not fake_ghostscript.exists()


def test_missing_local_weights_file_is_one_line(tmp_path, capsys, nothing_starts,
                                                monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, lines, _ = _label(["--input", str(REPO / "samples/images"),
                             "--output", str(tmp_path / "out"),
                             "--clip-weights", str(tmp_path / "ViT-B-16.pt")], capsys)
    assert code == 2 and lines == [
        f"label.py: error: weights file not found: {tmp_path / 'ViT-B-16.pt'} (--clip-weights)"]

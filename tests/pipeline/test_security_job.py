"""Security and clean failures (issue 9) of the label job: the embedded Ray listens on
loopback only and joins no stranger; bad storage, credentials, endpoints, options files,
nested outputs and missing weights are one line and exit code 2 before any worker starts;
messages never show user info or query strings.

Every test here is small: the stub engine where the engine does not matter, tiny files.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest
from support import REPO

# ----------------------------------------------------------------------------- embedded Ray
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


def test_missing_local_weights_file_is_one_line(tmp_path, capsys, nothing_starts,
                                                monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, lines, _ = _label(["--input", str(REPO / "samples/images"),
                             "--output", str(tmp_path / "out"),
                             "--clip-weights", str(tmp_path / "ViT-B-16.pt")], capsys)
    assert code == 2 and lines == [
        f"label.py: error: weights file not found: {tmp_path / 'ViT-B-16.pt'} (--clip-weights)"]

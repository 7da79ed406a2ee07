"""Driver-side checks before anything is planned or any worker starts (exit code 2).

- The output must not lie inside the input, nor the input inside the output: a run would
  list its own label files as input, or write into the images it reads.
- Every object store the job names (input, output, weight URLs) answers one small request
  within seconds, with bounded retries: no credentials, rejected credentials, an unreachable
  endpoint, a missing bucket and denied permission each become one line that names the
  (public) URI and the remedy, instead of minutes of retries and a library traceback.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from schemas.uris import public_uri

from .config import IOConfig
from .plan import StartupError
from .storage import exception_chain

PROBE_TIMEOUT_S = 20.0
_PROBED = {"s3", "s3a", "gs", "gcs"}  # object stores with credentials and buckets
_CREDENTIALS_HELP = ("pass --storage-options @FILE (a JSON file with \"key\" and \"secret\") "
                     "or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
_REJECTED = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
             "AuthorizationHeaderMalformed", "InvalidClientTokenId", "invalid_grant")
_UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionRefusedError",
                "ClientConnectorError", "ConnectTimeout", "ServerTimeoutError",
                "ConnectionError", "TimeoutError", "gaierror")


class PreflightError(StartupError):
    """A check before the run failed; the message is one line with the remedy."""


def preflight(io: IOConfig, weight_uris: Iterable[str | None] = (),
              timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Refuse nested input/output and unusable storage before the job starts.

    Args:
        io: the job's input and output.
        weight_uris: weight file paths or URLs (remote ones are checked to exist).
        timeout_s: upper bound of each storage probe in seconds.

    Raises:
        PreflightError: one line naming the problem (URIs without credentials).
    """
    check_not_nested(io.input_uri, io.output_uri)
    check_storage(io.input_uri, io.storage_options, "the input", timeout_s)
    check_storage(io.output_uri, io.storage_options, "the output", timeout_s)
    for uri in weight_uris:
        if uri:
            check_storage(uri, io.storage_options, "the weights file", timeout_s, exact=True)


def check_hub_weights(engine: Any, timeout_s: float = 5.0) -> None:
    """For a local run (workers on this machine): refuse at once a weights path that does not
    exist, and hub weights that are neither cached nor reachable, with the full remedy
    (instead of minutes of download retries in every worker). The hub is not probed behind
    an HTTP(S) proxy.

    Args:
        engine: the job's :class:`~pipeline.config.EngineSpec`.
        timeout_s: bound of the connection attempt to the hub.

    Raises:
        PreflightError: the message names the missing weights and what to pass.
    """
    if engine.stub is not None or engine.random_weights is not None:
        return
    for flag, path in (("--clip-weights", engine.clip_weights),
                       ("--dino-weights", engine.dino_weights)):
        local = path and ("://" not in path or path.startswith("file://"))
        if local and not os.path.isfile(os.path.expanduser(path.removeprefix("file://"))):
            raise PreflightError(f"weights file not found: {path} ({flag})")
    if engine.clip_weights and engine.dino_weights:
        return
    from cass_engine.registry import missing_hub_weights
    from cass_engine.weights import WEIGHTS_REMEDY

    flags = [f for f in missing_hub_weights()
             if not (engine.clip_weights if f == "--clip-weights" else engine.dino_weights)]
    if not flags:
        return
    problem = _hub_problem(timeout_s)
    if problem:
        raise PreflightError(
            f"no {' and no '.join(flags)} given, the hub's weights are not in the local cache "
            f"and {problem}. {WEIGHTS_REMEDY}")


def _hub_problem(timeout_s: float) -> str | None:
    """Why the Hugging Face hub cannot be reached from here, or None (or behind a proxy)."""
    import socket

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    parts = urlsplit(constants.ENDPOINT)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        _bounded(lambda: socket.create_connection((host, port), timeout_s).close(),
                 timeout_s + 1)
    except (OSError, TimeoutError) as exc:
        return f"the hub ({host}) cannot be reached ({type(exc).__name__})"
    return None


def check_not_nested(input_uri: str, output_uri: str) -> None:
    """Raises PreflightError when one URI is the other or lies under it."""
    (in_proto, in_path), (out_proto, out_path) = _location(input_uri), _location(output_uri)
    if in_proto != out_proto:
        return
    inside = out_path == in_path or out_path.startswith(in_path.rstrip("/") + "/")
    around = in_path.startswith(out_path.rstrip("/") + "/")
    if inside or around:
        where = "inside the input" if inside else "around the input (the input is inside it)"
        raise PreflightError(
            f"the output {public_uri(output_uri)} is {where} {public_uri(input_uri)}: a run "
            "would read its own labels as images, or write among them; choose an output "
            "outside the input")


def _protocol(uri: str) -> str:
    return urlsplit(uri).scheme.lower() if "://" in uri else "file"


def _location(uri: str) -> tuple[str, str]:
    """``(protocol, normalised path)``: local paths resolved, globs cut at the first wildcard."""
    proto = _protocol(uri)
    path = uri.split("://", 1)[1] if "://" in uri else uri
    path = path.split("?", 1)[0]
    if proto in ("s3", "s3a", "gs", "gcs") and "@" in path.split("/", 1)[0]:
        path = path.split("@", 1)[1]  # user info
    for i, char in enumerate(path):
        if char in "*?[":
            path = path[:i].rsplit("/", 1)[0]
            break
    if proto in ("file", "local"):
        return "file", os.path.realpath(os.path.expanduser(path))
    return {"s3a": "s3", "gcs": "gs"}.get(proto, proto), path.rstrip("/")


def check_storage(uri: str, options: Mapping, what: str, timeout_s: float = PROBE_TIMEOUT_S,
                  exact: bool = False) -> None:
    """One bounded request to the object store behind ``uri`` (``s3://``, ``gs://``; other
    schemes are left to the job's own error handling).

    Args:
        uri: the URI to check.
        options: fsspec storage options.
        what: what the URI is, for the message (``"the input"``).
        timeout_s: upper bound of the probe in seconds.
        exact: the object itself must exist (weight files), not only its bucket.

    Raises:
        PreflightError: the store cannot be used (one line, remedy included).
    """
    if _protocol(uri) not in _PROBED:
        return
    try:
        _bounded(lambda: _probe(uri, options, exact), timeout_s)
    except TimeoutError:
        raise PreflightError(
            f"cannot reach the storage of {what} {public_uri(uri)}: no answer within "
            f"{timeout_s:g} s; check the endpoint (endpoint_url) and the network") from None
    except ImportError as exc:
        raise PreflightError(f"cannot open {what} {public_uri(uri)}: no filesystem for this "
                             f"URI scheme is installed ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - classified into one line
        raise PreflightError(describe_storage_error(exc, uri, what, options)) from None


def _bounded(fn: Callable[[], Any], timeout_s: float) -> Any:
    """``fn()`` in a daemon thread; TimeoutError when it has not returned in time."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            result["error"] = exc

    thread = threading.Thread(target=run, name="storage-preflight", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _probe(uri: str, options: Mapping, exact: bool) -> None:
    """The smallest request that needs working credentials and an existing bucket."""
    import fsspec

    proto = _protocol(uri)
    probe_options = dict(options)
    if proto in ("s3", "s3a"):
        config = dict(probe_options.get("config_kwargs") or {})
        config.update(connect_timeout=3, read_timeout=10, retries={"max_attempts": 1})
        probe_options["config_kwargs"] = config
    fs = fsspec.filesystem(proto, skip_instance_cache=True, **probe_options)
    if hasattr(fs, "retries"):
        fs.retries = 1
    path = fs._strip_protocol(uri)
    bucket, _, key = path.partition("/")
    if exact:
        fs.info(path)
    elif proto in ("s3", "s3a"):  # one key of a listing: needs what reading the input needs
        from fsspec.asyn import sync

        sync(fs.loop, fs._call_s3, "list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1)
    elif proto in ("gs", "gcs"):
        from fsspec.asyn import sync

        sync(fs.loop, fs._call, "GET", "b/{}/o", bucket, json_out=True, prefix=key,
             maxResults=1)
    else:
        fs.ls(bucket, detail=False)


def describe_storage_error(exc: BaseException, uri: str, what: str,
                           options: Mapping | None = None) -> str:
    """One line for a storage failure: its kind, the public URI and the remedy."""
    chain = exception_chain(exc)
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain)
    shown = public_uri(uri)
    if "NoCredentialsError" in names or "Unable to locate credentials" in text:
        return f"no credentials for {what} {shown}: {_CREDENTIALS_HELP}"
    if any(code in text for code in _REJECTED):
        return (f"access denied: the storage rejected the credentials for {what} {shown} "
                "(unknown key or wrong secret): check --storage-options or the AWS_* "
                "variables")
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        bucket = shown.split("://", 1)[-1].split("/", 1)[0]
        return f"the bucket {bucket!r} of {what} {shown} does not exist"
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return (f"permission denied for {what} {shown}: the credentials may not list or "
                "read it")
    if names & set(_UNREACHABLE):
        endpoint = (options or {}).get("endpoint_url") or (options or {}).get(
            "client_kwargs", {}).get("endpoint_url", "")
        at = f" at {public_uri(str(endpoint))}" if endpoint else ""
        kind = next(type(e).__name__ for e in chain if type(e).__name__ in _UNREACHABLE)
        return (f"cannot reach the storage endpoint{at} for {what} {shown} ({kind}): check "
                "endpoint_url and the network")
    if isinstance(exc, FileNotFoundError):
        return f"{what} {shown} does not exist"
    return f"cannot access {what} {shown}: {_first(exc)}"


def _first(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"

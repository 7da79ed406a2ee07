"""The public form of URIs and storage options: what records, logs and messages may show.

One rule for the whole product (engine, pipeline, output contract, jobs): a URI loses its user
info, query string and fragment (where signed URLs and tokens live); storage options lose the
values of secret-looking keys. Standard library only, so that every layer can import it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

_SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "session",
                 "auth", "connection", "sas", "signature", "private", "cookie")


def redact(options: Mapping | None) -> dict:
    """A copy of storage options safe to log: values of secret-looking keys become ``"***"``,
    URLs lose their user info and query string (nested mappings and lists included)."""
    return {name: _redacted(name, value) for name, value in (options or {}).items()}


def _redacted(name: object, value: object) -> object:
    if isinstance(value, Mapping):
        return redact(value)
    if any(word in str(name).lower() for word in _SECRET_WORDS):
        return "***"
    if isinstance(value, (list, tuple)):
        return [_redacted(name, v) for v in value]
    if isinstance(value, str) and "://" in value:
        return public_uri(value)
    return value


def public_uri(uri: str | None) -> str | None:
    """A URI without credentials (user info, query string, fragment), for records and logs."""
    if uri is None or "://" not in uri:
        return uri
    parts = urlsplit(uri)
    if not (parts.username or parts.password or parts.query or parts.fragment):
        return uri
    host = parts.hostname or ""
    netloc = f"***@{host}" if parts.username or parts.password else host
    netloc += f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def public_text(text: str) -> str:
    """``text`` with every URL in it made public (:func:`public_uri`): for messages and log
    lines that may quote a URI given by the user or a library."""
    return _URL.sub(lambda m: public_uri(m.group(0)) or "", text)

"""Help texts that state a flag's default as its config dataclass holds it.

Jobs give every optional flag ``default=None`` and build their frozen config from the flags
that were given, so a default lives in one place (the dataclass); these helpers put that
value into the help text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any


def field_defaults(config_type: type) -> dict[str, Any]:
    """Each field's default (a factory's value for mutable ones); required fields absent.

    Args:
        config_type: a dataclass type.
    """
    out: dict[str, Any] = {}
    for f in fields(config_type):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def default_text(value: Any, unset: str = "none", true: str = "on", false: str = "off") -> str:
    """``"(default: X)"``; ``unset`` says what ``None``/``{}`` means, ``true``/``false`` what
    a boolean does."""
    if value is None or (isinstance(value, dict) and not value):
        text = unset
    elif isinstance(value, bool):
        text = true if value else false
    else:
        text = str(value)
    return f"(default: {text})"


def default_helper(config_type: type) -> Callable[..., str]:
    """``default(name, **words)`` -> the help-text default of field ``name`` (``words``: the
    keywords of :func:`default_text`)."""
    defaults = field_defaults(config_type)

    def default(name: str, unset: str = "none", **words: str) -> str:
        return default_text(defaults[name], unset, **words)

    return default


def given(values: dict[str, Any]) -> dict[str, Any]:
    """The flags that were given (``None`` = left out, so the dataclass default applies)."""
    return {name: value for name, value in values.items() if value is not None}

"""The one error type of the audit: bad inputs, reported as a single line without a traceback."""

from __future__ import annotations


class AuditError(Exception):
    """An input of an audit or benchmark run is missing, unreadable or inconsistent.

    The message is one line that names the file or image and says what is wrong; entry points
    print it and exit non-zero.
    """

"""UTC times as the output's files write them (run records, completion records, leases,
review files) and as run ids begin. Standard library only, so that every layer can import it.
"""

from __future__ import annotations

import time

#: ISO 8601, UTC, whole seconds: ``2026-01-31T23:59:59Z``.
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
#: The same without separators (sortable, safe in object names): ``20260131T235959Z``.
COMPACT_FORMAT = "%Y%m%dT%H%M%SZ"


def utc_timestamp(seconds: float | None = None) -> str:
    """``seconds`` since the epoch (default: now) as :data:`TIMESTAMP_FORMAT`."""
    return time.strftime(TIMESTAMP_FORMAT, time.gmtime(seconds))


def utc_compact(seconds: float | None = None) -> str:
    """``seconds`` since the epoch (default: now) as :data:`COMPACT_FORMAT`."""
    return time.strftime(COMPACT_FORMAT, time.gmtime(seconds))

"""Peak resident memory of the current process: drivers, workers and benchmark scripts."""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes (``ru_maxrss`` counts KiB on Linux
    and bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)

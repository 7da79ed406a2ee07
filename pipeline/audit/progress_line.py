"""A dependency-free progress line on stderr: count, rate and (when known) percent and ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressLine:
    """Rate-limited progress display.

    On a terminal the line is redrawn in place; otherwise a line is printed at most every
    ``log_every_s`` seconds, so logs of nightly runs stay short.

    Args:
        label: prefix of the line.
        total: expected number of items, if known.
        stream: where to write (default ``sys.stderr``); ``None`` disables output.
        every_s: redraw interval on a terminal.
        log_every_s: print interval when the stream is not a terminal.
    """

    def __init__(self, label: str, total: int | None = None, stream: TextIO | None = sys.stderr,
                 every_s: float = 0.5, log_every_s: float = 30.0) -> None:
        self.label = label
        self.total = total
        self.stream = stream
        self.count = 0
        self.notes: dict[str, int] = {}
        self._start = self._last = time.monotonic()
        tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self._tty = tty
        self._interval = every_s if tty else log_every_s

    def update(self, n: int = 1, **notes: int) -> None:
        """Count ``n`` items; ``notes`` are extra counters shown on the line (added up)."""
        self.count += n
        for name, value in notes.items():
            self.notes[name] = self.notes.get(name, 0) + value
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._write(self.line(now))

    def line(self, now: float | None = None) -> str:
        """The current progress text."""
        elapsed = max((now or time.monotonic()) - self._start, 1e-9)
        rate = self.count / elapsed
        text = f"{self.label}: {self.count}"
        if self.total:
            percent = 100.0 * self.count / self.total
            eta = (self.total - self.count) / rate if rate > 0 else float("inf")
            text += f"/{self.total} ({percent:.1f}%, ETA {eta:.0f}s)"
        text += f" {rate:.3g}/s"
        extra = ", ".join(f"{k} {v}" for k, v in self.notes.items() if v)
        return f"{text} [{extra}]" if extra else text

    def close(self) -> None:
        """Print the final line."""
        self._write(self.line(), final=True)

    def _write(self, text: str, final: bool = False) -> None:
        if self.stream is None:
            return
        if self._tty:
            self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

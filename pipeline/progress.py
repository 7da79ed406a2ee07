"""Live progress lines (shards, images, images/s, ETA, errors) and the final summary; and
:class:`ProgressLine`, the plain count/rate/ETA line of exports, audits and benchmarks.

Lines go to the ``emit`` callable (stderr by default, which ``ray job submit`` also captures
in the job log); one line every ``interval_s`` seconds, never carriage-return redraws, so
the log stays readable.

The ETA counts images, not shards: the images left (in the running shards, from the workers'
estimates of their size, and in the shards not started, at the mean size of the shards seen
so far) over the rate of images since the workers started. It appears with the first images
labelled, long before the first shard of a thousand images is done. Workers keep those
counts per shard in :class:`ShardCounts`, in memory, and hand them over when asked.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from .storage import retry

if TYPE_CHECKING:
    from .readers import RawImage
    from .shards import ShardSpec


def emit_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclass
class Progress:
    """Counts of one run.

    Attributes:
        total_shards: shards to label in this run (skipped ones excluded).
        skipped_shards: shards already done in the output.
        interval_s: seconds between progress lines.
        emit: where lines go.
    """

    total_shards: int
    skipped_shards: int = 0
    interval_s: float = 10.0
    emit: Callable[[str], None] = emit_stderr
    shards_done: int = 0
    shards_failed: int = 0
    retries: int = 0
    truncated: int = 0
    live: dict = field(default_factory=dict)  # shard_id -> (images done, images expected)
    images: int = 0
    ok: int = 0
    annotations: int = 0
    engine_seconds: float = 0.0
    errors: Counter = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    _last: float = 0.0
    _last_counts: tuple = ()

    def restart_clock(self) -> None:
        """Measure rates from now (after the workers started)."""
        self.started = time.monotonic()

    def set_live(self, live: Mapping[str, tuple[int, int | None]]) -> None:
        """Images done and expected (None: unknown) in each running shard."""
        self.live = dict(live)

    def shard_done(self, record: Mapping) -> None:
        self.live.pop(record.get("shard_id"), None)
        self.shards_done += 1
        self.truncated += bool(record.get("truncated"))
        self.images += int(record["num_images"])
        self.ok += int(record["num_ok"])
        self.annotations += int(record["num_annotations"])
        self.engine_seconds += float(record.get("engine_seconds", 0.0))
        self.errors.update(record.get("errors_by_status", {}))

    def shard_retried(self, shard_id: str, reason: str) -> None:
        self.retries += 1
        self.emit(f"[cass-label] shard {shard_id} will be retried: {reason}")

    def shard_failed(self, shard_id: str, reason: str) -> None:
        self.shards_failed += 1
        self.emit(f"[cass-label] shard {shard_id} FAILED: {reason}")

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def live_images(self) -> int:
        """Images already labelled in running shards."""
        return sum(done for done, _ in self.live.values())

    @property
    def images_seen(self) -> int:
        """Images in finished shards plus those already labelled in running shards."""
        return self.images + self.live_images

    @property
    def images_per_s(self) -> float:
        return self.images_seen / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def eta_s(self) -> float | None:
        """Seconds left at the current image rate; None before the first image or while the
        size of the shards is not known at all."""
        finished = self.shards_done + self.shards_failed
        per_shard = self._images_per_shard()
        if self.images_seen == 0 or per_shard is None:
            return None if finished == 0 else (
                self.elapsed_s / finished * (self.total_shards - finished))
        left = sum(max(0.0, (per_shard if expected is None else expected) - done)
                   for done, expected in self.live.values())
        not_started = max(0, self.total_shards - finished - len(self.live))
        return (left + not_started * per_shard) / self.images_per_s

    def _images_per_shard(self) -> float | None:
        """Mean image count of the shards done and the running shards' estimates."""
        sizes = [expected for _, expected in self.live.values() if expected is not None]
        count = self.shards_done + len(sizes)
        return (self.images + sum(sizes)) / count if count else None

    def line(self) -> str:
        eta = self.eta_s()
        return (f"[cass-label] shards {self.shards_done}/{self.total_shards}"
                f" (skipped {self.skipped_shards}, failed {self.shards_failed},"
                f" retries {self.retries}) | images {self.images_seen}"
                f" | {self.images_per_s:.1f} img/s"
                f" | errors {sum(self.errors.values())}"
                f" | elapsed {_duration(self.elapsed_s)}"
                f" | ETA {_duration(eta) if eta is not None else '?'}")

    def due(self) -> bool:
        """Whether the next progress line is due."""
        return time.monotonic() - self._last >= self.interval_s

    def maybe_report(self, force: bool = False) -> None:
        """Emit a progress line when one is due; ``force``: unless the last line already
        showed these counts."""
        counts = (self.shards_done, self.shards_failed, self.retries, self.images_seen)
        if self.due() or (force and counts != self._last_counts):
            self._last, self._last_counts = time.monotonic(), counts
            self.emit(self.line())

    def totals(self) -> dict:
        """Counts of finished shards only (images in unfinished shards were not written)."""
        rate = self.images / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return {
            "shards": self.total_shards + self.skipped_shards,
            "shards_labelled": self.shards_done, "shards_skipped": self.skipped_shards,
            "shards_failed": self.shards_failed, "shards_truncated": self.truncated,
            "retries": self.retries,
            "images": self.images, "images_ok": self.ok,
            "images_error": sum(self.errors.values()),
            "errors_by_status": dict(sorted(self.errors.items())),
            "annotations": self.annotations, "seconds": round(self.elapsed_s, 3),
            "images_per_s": round(rate, 3),
            "engine_seconds": round(self.engine_seconds, 3),
        }

    def summary(self, status: str, output_uri: str) -> str:
        t = self.totals()
        errors = ", ".join(f"{k} {v}" for k, v in t["errors_by_status"].items()) or "none"
        return (f"[cass-label] {status.upper()}: {t['shards_labelled']} shard(s) labelled, "
                f"{t['shards_skipped']} skipped, {t['shards_failed']} failed; "
                f"{t['images']} images ({t['images_ok']} ok; errors: {errors}), "
                f"{t['annotations']} masks in {_duration(t['seconds'])} "
                f"({t['images_per_s']:.1f} img/s) -> {output_uri}")


@dataclass
class ShardCounts:
    """Progress of one shard on a worker, and an estimate of its size in images.

    Attributes:
        images: images labelled so far.
        known: the shard's exact image count, when known (image groups; a shard read to its
            end); else estimated from the bytes read: images read x the shard file's size /
            the bytes they took in it (for tars with their headers and padding; other members,
            such as captions, make it a little high).
        limit: ``--limit`` share of this launch (None: no limit).
        size_bytes: byte size of the shard file (None: unknown).
        tar: the shard is a tar file (each member takes a 512-byte header and is padded to
            512 bytes).
    """

    images: int = 0
    known: int | None = None
    limit: int | None = None
    size_bytes: int | None = None
    read: int = 0
    read_bytes: int = 0
    tar: bool = False

    def count(self, items: Iterable[RawImage]) -> Iterator[RawImage]:
        """Pass items through, counting them and their bytes as they are read."""
        for item in items:
            self.read += 1
            size = len(item.data or b"")
            self.read_bytes += (512 + -(-size // 512) * 512) if self.tar else size
            yield item
        self.known = self.read if self.known is None else self.known

    def expected(self) -> int | None:
        """Estimated images in the shard (at least those labelled), or None."""
        estimate = self.known
        if estimate is None and self.size_bytes and self.read_bytes:
            estimate = round(self.read * self.size_bytes / self.read_bytes)
        if estimate is None:
            return None
        if self.limit is not None:
            estimate = min(estimate, self.limit)
        return max(estimate, self.images)


def shard_counts(shard: ShardSpec, fs: Any, limit: int | None = None) -> ShardCounts:
    """Counts of a shard about to be read: image groups know their size; for a tar or
    Parquet shard the file's size is asked for once (best effort)."""
    if shard.kind == "images":
        return ShardCounts(known=len(shard.paths), limit=limit)
    try:
        size = int(retry(lambda: fs.size(shard.paths[0]), f"stat {shard.paths[0]}", attempts=2))
    except Exception:  # noqa: BLE001 - only for the progress estimate
        size = None
    return ShardCounts(limit=limit, size_bytes=size, tar=shard.kind == "webdataset")


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

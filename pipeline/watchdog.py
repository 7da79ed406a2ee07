"""The stall watchdog: polls the busy workers for their shards' progress and heartbeats.

Every ``poll_every_s`` seconds the driver asks each busy worker (one small call, 1 s timeout,
best effort) for ``{shard_id: {"images", "expected", "beat"}}``: images labelled so far,
the shard's estimated image count, and a counter that moves whenever the shard makes
progress. Workers are never asked more often, however many images they label, so the driver
is not flooded. A shard whose counter has not moved for ``stall_timeout_s`` is *stalled*; a
worker that has not answered once since the shard was sent (still starting: importing,
staging and loading weights) gets :data:`STARTUP_GRACE_S` more.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayError

#: Extra time a worker that has not answered once since a shard was sent to it gets before
#: the shard counts as stalled.
STARTUP_GRACE_S = 600.0


@dataclass
class _Clock:
    launched_at: float = field(default_factory=time.monotonic)
    beat: int = -1
    beat_at: float | None = None  # last heartbeat change seen; None until the worker answers


class Watchdog:
    """Heartbeat clocks of the shards in flight.

    Args:
        stall_timeout_s: seconds without progress before a shard is stalled (None: never).
        poll_every_s: seconds between polls.
    """

    def __init__(self, stall_timeout_s: float | None, poll_every_s: float) -> None:
        self.stall_timeout_s, self.poll_every_s = stall_timeout_s, poll_every_s
        self._clocks: dict[Any, _Clock] = {}
        self._polled_at = time.monotonic()

    def launched(self, ref: Any) -> None:
        """Start the clock of a launch."""
        self._clocks[ref] = _Clock()

    def forget(self, ref: Any) -> None:
        self._clocks.pop(ref, None)

    def due(self) -> bool:
        return time.monotonic() - self._polled_at >= self.poll_every_s

    def poll(self, actors: Sequence[Any], running: Mapping[Any, tuple[int, str]]
             ) -> dict[str, tuple[int, int | None]]:
        """Ask the busy workers; returns ``{shard_id: (images done, images expected)}``.

        Args:
            actors: the worker actors by slot.
            running: ``{ref: (slot, shard_id)}`` of the launches in flight.
        """
        self._polled_at = now = time.monotonic()
        calls = {slot: actors[slot].progress.remote() for slot in sorted(
            {slot for slot, _ in running.values()})}
        ready, _ = ray.wait(list(calls.values()), num_returns=len(calls), timeout=1.0)
        answers = {}
        for slot, ref in calls.items():
            try:
                answers[slot] = ray.get(ref) if ref in ready else None
            except RayError:
                answers[slot] = None
        live: dict[str, tuple[int, int | None]] = {}
        for ref, (slot, shard_id) in running.items():
            if answers.get(slot) is None:
                continue
            counts, clock = answers[slot].get(shard_id), self._clocks.setdefault(ref, _Clock())
            if counts is not None:
                live[shard_id] = (int(counts["images"]), counts.get("expected"))
            if counts is not None and counts["beat"] != clock.beat:
                clock.beat, clock.beat_at = counts["beat"], now
            elif clock.beat_at is None:  # the worker is up: the shard's clock starts
                clock.beat_at = now
        return live

    def overdue_s(self, ref: Any, now: float) -> float:
        """Seconds a launch is past its stall deadline (<= 0: not stalled)."""
        clock = self._clocks.get(ref)
        if self.stall_timeout_s is None or clock is None:
            return 0.0
        if clock.beat_at is None:
            return now - clock.launched_at - self.stall_timeout_s - STARTUP_GRACE_S
        return now - clock.beat_at - self.stall_timeout_s

    def idle_s(self, ref: Any, now: float) -> float:
        """Seconds since a launch last made progress (or was launched)."""
        clock = self._clocks.get(ref)
        return 0.0 if clock is None else now - (clock.beat_at or clock.launched_at)

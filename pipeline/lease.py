"""One writer per output: a lease object ``OUTPUT/_lease.json``.

A run takes the lease with a conditional create (:func:`pipeline.conditional.create_object`)
before it reads or changes anything in the output, renews it in a background thread every
quarter of its time to live, and deletes it at the end. A second run finds it held: it waits
(``--wait-for-lease SECONDS``) or stops with :class:`LeaseHeld`, whose message names the
holder (run id, host, pid, start time). A lease whose holder stopped renewing it (the driver
was killed, its machine died) can be taken over once it expired, with a conditional replace of
exactly the expired version, so of two runs racing for it one wins.

A storage outage longer than the time to live lets the lease expire, but does not lose it:
when storage answers again the holder re-takes it with a conditional replace of the version
it last wrote (same ETag / generation / content). If another run took the expired lease over
meanwhile, that replace fails and the lease is lost for good.

Workers check the lease right before they certify a shard (:func:`check_holder`): a worker of
a run that lost its lease, or whose lease expired and was not re-taken within two renewal
periods, cannot make its labels visible.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .conditional import (
    PreconditionFailed,
    create_object,
    delete_object,
    read_object,
    replace_object,
)
from .config import DEFAULT_LEASE_TTL_S

log = logging.getLogger(__name__)
LEASE_NAME = "_lease.json"


class LeaseHeld(RuntimeError):
    """Another run holds the output's lease."""


class LeaseLost(RuntimeError):
    """This run's lease expired or was taken over; it must not certify anything."""


def lease_path(root: str) -> str:
    return f"{root}/{LEASE_NAME}"


@dataclass(frozen=True)
class Holder:
    """The content of a lease object."""

    run_id: str
    host: str
    pid: int
    started_at: str
    renewed_at: float
    expires_at: float
    ttl_s: float

    def describe(self, now: float) -> str:
        left = self.expires_at - now
        state = f"expires in {left:.0f} s" if left > 0 else f"expired {-left:.0f} s ago"
        return (f"run {self.run_id} (host {self.host}, pid {self.pid}, started "
                f"{self.started_at}; lease {state})")

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        """The holder in a lease object, or None when it is unreadable."""
        try:
            raw = json.loads(data)
            return cls(str(raw["run_id"]), str(raw["host"]), int(raw["pid"]),
                       str(raw["started_at"]), float(raw["renewed_at"]),
                       float(raw["expires_at"]), float(raw["ttl_s"]))
        except (ValueError, KeyError, TypeError):
            return None


def read_holder(fs: Any, root: str) -> Holder | None:
    """The current holder of an output's lease (None: free or unreadable)."""
    found = read_object(fs, lease_path(root))
    return Holder.parse(found[0]) if found else None


def check_holder(fs: Any, root: str, run_id: str, wait_s: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
    """Raise :class:`LeaseLost` unless ``run_id`` holds the output's lease, unexpired.

    A lease of ``run_id`` that expired (its renewals could not reach storage, and another run
    may take it over at any moment) is waited for, ``wait_s`` seconds (default: half its time
    to live, two renewal periods), to be re-taken by its holder.
    """
    deadline = None
    while True:
        holder = read_holder(fs, root)
        if holder is None or holder.run_id != run_id:
            other = holder.describe(clock()) if holder else "nobody"
            raise LeaseLost(f"run {run_id} no longer holds the lease of the output (held by "
                            f"{other}); its labels are not certified")
        if holder.expires_at > clock():
            return
        wait = holder.ttl_s / 2 if wait_s is None else wait_s
        deadline = deadline if deadline is not None else time.monotonic() + wait
        if time.monotonic() >= deadline:
            raise LeaseLost(f"the lease of run {run_id} expired {clock() - holder.expires_at:.0f}"
                            f" s ago and was not renewed within {wait:g} s; its labels are "
                            "not certified")
        time.sleep(min(1.0, max(0.05, wait / 10)))


class Lease:
    """The lease of one run on one output.

    Args:
        fs, root: the output filesystem and root path.
        run_id: this run's id.
        started_at: this run's start time (ISO 8601, UTC), recorded for other runs to see.
        ttl_s: seconds the lease lives without renewal.
        clock: wall clock in seconds (tests).
    """

    def __init__(self, fs: Any, root: str, run_id: str, started_at: str,
                 ttl_s: float = DEFAULT_LEASE_TTL_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.fs, self.path, self.run_id = fs, lease_path(root), run_id
        self.started_at, self.ttl_s, self.clock = started_at, ttl_s, clock
        self.token: str | None = None
        self.expires_at = 0.0
        self.took_over: Holder | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _content(self) -> tuple[bytes, float]:
        now = self.clock()
        holder = Holder(self.run_id, socket.gethostname(), os.getpid(), self.started_at, now,
                        now + self.ttl_s, self.ttl_s)
        return holder.to_bytes(), holder.expires_at

    def acquire(self, wait_s: float = 0.0, poll_s: float | None = None) -> None:
        """Take the lease, waiting up to ``wait_s`` seconds for its holder to let it go.

        Raises:
            LeaseHeld: another live run holds it (after the wait).
        """
        deadline = time.monotonic() + wait_s
        poll_s = poll_s or max(0.2, min(5.0, self.ttl_s / 8))
        while True:
            holder = self._try_take()
            if holder is None:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                hint = (f" (waited {wait_s:g} s)" if wait_s else
                        "; wait for it with --wait-for-lease SECONDS")
                raise LeaseHeld(f"the output is being written by {holder.describe(self.clock())}"
                                f"{hint}")
            time.sleep(min(poll_s, left))

    def _try_take(self) -> Holder | None:
        """One attempt: None when taken, else the live holder."""
        data, expires = self._content()
        try:
            self.token, self.expires_at = create_object(self.fs, self.path, data), expires
            return None
        except PreconditionFailed:
            pass
        current = read_object(self.fs, self.path)
        if current is None:  # released meanwhile: try again at once
            return self._try_take()
        holder = Holder.parse(current[0])
        if holder is not None and holder.run_id == self.run_id:  # our create, retried
            self.token, self.expires_at = current[1], holder.expires_at
            return None
        if holder is not None and holder.expires_at > self.clock():
            return holder
        data, expires = self._content()
        try:  # expired (or unreadable): take over exactly that version
            self.token = replace_object(self.fs, self.path, data, current[1])
        except PreconditionFailed:  # someone else renewed or took it: look again
            return self._try_take()
        self.expires_at, self.took_over = expires, holder
        log.warning("took over the expired lease of %s",
                    holder.describe(self.clock()) if holder else "an unreadable lease")
        return None

    @property
    def expired(self) -> bool:
        """Whether the last renewal that reached storage is older than the time to live
        (another run may take the lease over; this one re-takes it when it can)."""
        return self.token is not None and self.clock() >= self.expires_at

    def renew(self) -> bool:
        """Extend (or, expired, re-take) the lease with a conditional replace of the version
        this run last wrote; False when storage did not answer, or (and :attr:`lost` set)
        when another run changed the lease."""
        with self._lock:
            if self.lost.is_set() or self.token is None:
                return False
            was_expired, (data, expires) = self.expired, self._content()
            try:
                self.token, self.expires_at = self._replace(data), expires
            except PreconditionFailed:
                log.error("the output's lease was taken over by another run")
                self.lost.set()
                return False
            except Exception as exc:  # noqa: BLE001 - storage down: retried next period
                log.warning("could not renew the output's lease: %s%s", type(exc).__name__,
                            "; it expired, and is re-taken when storage answers unless "
                            "another run takes it over" if self.expired else "")
                return False
            if was_expired:
                log.warning("re-took this run's expired lease after a storage outage")
            return True

    def _replace(self, data: bytes) -> str:
        """Replace our last version with ``data``. Our own write answered late (retried,
        then refused) counts as done; a version of ours that landed while its answer was
        lost (so :attr:`token` is stale) is replaced in turn, conditionally on it."""
        try:
            return replace_object(self.fs, self.path, data, self.token)
        except PreconditionFailed:
            current = read_object(self.fs, self.path)
            if current is not None and current[0] == data:
                return current[1]
            holder = Holder.parse(current[0]) if current is not None else None
            if holder is not None and (holder.run_id, holder.started_at) == (
                    self.run_id, self.started_at):
                return replace_object(self.fs, self.path, data, current[1])
            raise

    def start_renewing(self) -> None:
        """Renew every quarter of the time to live, in a daemon thread, until released."""
        def loop() -> None:
            while not self._stop.wait(self.ttl_s / 4):
                if not self.renew() and self.lost.is_set():
                    return

        self._thread = threading.Thread(target=loop, name="cass-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and delete the lease (if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            if self.token is None or self.lost.is_set():
                return
            try:
                delete_object(self.fs, self.path, self.token)
            except Exception as exc:  # noqa: BLE001 - it expires on its own
                log.warning("could not release the output's lease: %s", type(exc).__name__)
            self.token = None

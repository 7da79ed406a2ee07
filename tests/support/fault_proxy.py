"""An HTTP fault proxy on loopback, in front of an S3 server, for the fault-injection tests.

Every client connection carries one request (the proxy asks the server to close after its
answer). Each request is, at the configured rates, answered ``503 SlowDown`` or ``500
InternalError`` without reaching the server, cut by a connection reset, or stalled and then
cut; otherwise it is forwarded. Faults are bounded (``max_faults``) and the proxy stops by
itself after ``lifetime_s`` seconds (or at :meth:`FaultProxy.stop`).
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

_ERRORS = {
    "503": (b"503 Slow Down", b"SlowDown", b"Please reduce your request rate."),
    "500": (b"500 Internal Server Error", b"InternalError", b"We encountered an internal error."),
}


@dataclass
class FaultRates:
    """Probability of each fault per request (their sum at most 1)."""

    slowdown_503: float = 0.0
    error_500: float = 0.0
    reset: float = 0.0
    stall: float = 0.0
    stall_s: float = 1.0


@dataclass
class FaultProxy:
    """Proxy ``127.0.0.1:<port>`` -> ``upstream`` injecting faults; see the module docstring."""

    upstream: tuple[str, int]
    rates: FaultRates
    max_faults: int = 50
    lifetime_s: float = 300.0
    seed: int = 0
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        self._deadline = time.monotonic() + self.lifetime_s
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name="fault-proxy").start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._stop.set()

    def _accept(self) -> None:
        with self._server:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                try:
                    client, _ = self._server.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _choose(self) -> str:
        with self._lock:
            self.counts["requests"] += 1
            if sum(v for k, v in self.counts.items() if k != "requests") >= self.max_faults:
                return "forward"
            r, acc = self._rng.random(), 0.0
            for name in ("slowdown_503", "error_500", "reset", "stall"):
                acc += getattr(self.rates, name)
                if r < acc:
                    self.counts[name] += 1
                    return name
            return "forward"

    def _serve(self, client: socket.socket) -> None:
        with client:
            client.settimeout(30)
            try:
                head, body = _read_request(client)
            except (OSError, ValueError):
                return
            fault = self._choose()
            if fault in ("slowdown_503", "error_500"):
                client.sendall(_error_response(fault[-3:]))
            elif fault in ("reset", "stall"):
                if fault == "stall":
                    time.sleep(self.rates.stall_s)
                _reset(client)
            else:
                self._forward(client, head, body)

    def _forward(self, client: socket.socket, head: bytes, body: bytes) -> None:
        try:
            with socket.create_connection(self.upstream, timeout=30) as upstream:
                upstream.sendall(_close_after(head) + body)
                while chunk := upstream.recv(65536):
                    client.sendall(chunk)
        except OSError:
            _reset(client)


def _read_request(sock: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP request: its head and its whole body (Content-Length or chunked)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ValueError("connection closed before a request")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    headers = {line.split(b":", 1)[0].strip().lower(): line.split(b":", 1)[1].strip()
               for line in head.split(b"\r\n")[1:] if b":" in line}
    if headers.get(b"expect", b"").lower() == b"100-continue":  # the client waits for this
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        while not (rest.endswith(b"\r\n0\r\n\r\n") or rest.startswith(b"0\r\n\r\n")):
            chunk = sock.recv(65536)
            if not chunk:
                raise ValueError("connection closed inside a chunked body")
            rest += chunk
        return head + b"\r\n\r\n", rest
    length = int(headers.get(b"content-length", b"0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ValueError("connection closed inside a body")
        rest += chunk
    return head + b"\r\n\r\n", rest


def _close_after(head: bytes) -> bytes:
    lines = [line for line in head.rstrip(b"\r\n").split(b"\r\n")
             if not line.lower().startswith((b"connection:", b"expect:"))]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


def _error_response(code: str) -> bytes:
    status, name, message = _ERRORS[code]
    body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>' + name + b"</Code><Message>"
            + message + b"</Message></Error>")
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/xml\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a dropped connection looks to the client."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass

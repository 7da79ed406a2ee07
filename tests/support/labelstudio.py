"""A real Label Studio server for the tests (session-scoped fixture ``label_studio``).

Label Studio pins older numpy/pyarrow than this project, so it lives in its own virtual
environment: ``$CASS_LABELSTUDIO_VENV`` or ``~/.cache/cass-labeler-tests/labelstudio-venv``,
created with ``python -m venv`` and ``pip install label-studio==LABEL_STUDIO_VERSION`` on first
use (about a minute) and reused afterwards (a marker file records a finished install; a file
lock keeps parallel sessions from installing twice). The server runs on 127.0.0.1 on a free
port with its own data directory and SQLite database; its user and API token are created by
its own ``start`` options (``--username/--password/--user-token``, legacy tokens enabled);
version checks, analytics and error reporting are off, so it needs no network. First start
(database migrations) takes about a minute on two cores.

The tests using it are skipped only when the install itself fails (no package index); a
server that is installed but does not start fails the tests.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

LABEL_STUDIO_VERSION = "1.23.2"
INSTALL_TIMEOUT_S = 1200
START_TIMEOUT_S = 300
_READY = ".cass-ready"


@dataclass(frozen=True)
class LabelStudioServer:
    """A running server: its URL, an API token and the venv's Python (for its converters)."""

    url: str
    token: str
    username: str
    python: str


def venv_dir() -> Path:
    default = Path.home() / ".cache" / "cass-labeler-tests" / "labelstudio-venv"
    return Path(os.environ.get("CASS_LABELSTUDIO_VENV", default))


def ensure_venv() -> tuple[Path, float]:
    """The Label Studio venv (installing it if needed) and the seconds the install took."""
    venv = venv_dir()
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / _READY).exists():
            return venv, 0.0
        started = time.monotonic()
        subprocess.run(["rm", "-rf", str(venv)], check=True)
        steps = [[sys.executable, "-m", "venv", str(venv)],
                 [str(venv / "bin" / "pip"), "install", "-q",
                  f"label-studio=={LABEL_STUDIO_VERSION}"]]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True,
                                  timeout=INSTALL_TIMEOUT_S)
            if done.returncode != 0:
                last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
                pytest.skip(f"Label Studio cannot be installed ({' '.join(step[:3])}): "
                            f"{last[0]}")
        (venv / _READY).write_text(LABEL_STUDIO_VERSION)
        return venv, time.monotonic() - started


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_env(data_dir: Path) -> dict:
    quiet = {"LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false", "SENTRY_DSN": "",
             "FRONTEND_SENTRY_DSN": "", "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
             "DJANGO_DB": "sqlite", "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "DJANGO"))}
    return {**env, **quiet}


def _wait_healthy(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"label-studio exited with code {process.returncode} (log: {log})")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    pytest.fail(f"label-studio did not answer /health within {START_TIMEOUT_S} s (log: {log})")


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """A Label Studio server on loopback for the whole session (stopped at the end)."""
    venv, install_s = ensure_venv()
    data_dir = tmp_path_factory.mktemp("labelstudio")
    port, token = _free_port(), secrets.token_hex(20)
    username = "reviewer@example.com"
    command = [str(venv / "bin" / "label-studio"), "start", "--no-browser",
               "--internal-host", "127.0.0.1", "--port", str(port),
               "--data-dir", str(data_dir / "media"), "--database", str(data_dir / "ls.sqlite3"),
               "--username", username, "--password", secrets.token_hex(12),
               "--user-token", token, "--enable-legacy-api-token"]
    log = data_dir / "server.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=_server_env(data_dir), stdout=out,
                                   stderr=subprocess.STDOUT, cwd=data_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(process, url, log)
        print(f"\nlabel-studio {LABEL_STUDIO_VERSION}: install {install_s:.0f} s, "
              f"start {time.monotonic() - started:.0f} s", file=sys.stderr)
        yield LabelStudioServer(url, token, username, str(venv / "bin" / "python"))
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

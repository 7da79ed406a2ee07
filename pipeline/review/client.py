"""A small Label Studio REST client: projects, task import, JSON export.

The API token comes from the caller (the jobs read ``LABEL_STUDIO_API_KEY``); it is sent only
in the ``Authorization`` header and never appears in messages. Legacy tokens are sent as
``Token <key>``; personal access tokens (JWTs) are exchanged for an access token first
(``POST /api/token/refresh/``). Every failure is a :class:`LabelStudioError` with one line:
unreachable server, rejected token, unknown project, or the server's own reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import requests

TIMEOUT_S = 60.0
IMPORT_BATCH_BYTES = 32 * 1024 * 1024
MAX_EXPORT_BYTES = 1024 * 1024 * 1024


class LabelStudioError(Exception):
    """A Label Studio request failed; the message is one line."""


class LabelStudioClient:
    """Talks to one Label Studio server.

    Args:
        url: server root, e.g. ``http://127.0.0.1:8080``.
        token: API token (legacy token or personal access token).
        timeout_s: per-request timeout.
    """

    def __init__(self, url: str, token: str, timeout_s: float = TIMEOUT_S) -> None:
        if not url.startswith(("http://", "https://")):
            raise LabelStudioError(f"Label Studio URL must start with http:// or https://: {url}")
        if not token:
            raise LabelStudioError("no Label Studio API token: set LABEL_STUDIO_API_KEY")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._session = requests.Session()
        self._session.headers["Authorization"] = self._authorization(token)

    def _authorization(self, token: str) -> str:
        if token.count(".") != 2:
            return f"Token {token}"
        response = self._send("POST", "/api/token/refresh/", json={"refresh": token},
                              auth=False)
        access = response.json().get("access") if response.content else None
        if not access:
            raise LabelStudioError(f"Label Studio at {self.url} did not issue an access token")
        return f"Bearer {access}"

    def _send(self, method: str, path: str, auth: bool = True, **kwargs: Any) -> requests.Response:
        session = self._session if auth else requests
        try:
            response = session.request(method, self.url + path, timeout=self.timeout_s, **kwargs)
        except requests.RequestException as error:
            raise LabelStudioError(f"cannot reach Label Studio at {self.url}: "
                                   f"{type(error).__name__}") from None
        if response.status_code in (401, 403):
            raise LabelStudioError(f"Label Studio at {self.url} rejected the API token "
                                   f"(HTTP {response.status_code}); check LABEL_STUDIO_API_KEY")
        if response.status_code >= 400:
            raise LabelStudioError(f"Label Studio {method} {path} failed: HTTP "
                                   f"{response.status_code} {_detail(response)}")
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise LabelStudioError(f"Label Studio {method} {path} did not return JSON "
                                   "(is this a Label Studio server?)") from None

    def check(self) -> None:
        """Verify that the server answers and accepts the token."""
        self._json("GET", "/api/projects", params={"page_size": 1})

    def projects(self) -> Iterator[dict]:
        """Every project visible to the token."""
        page = 1
        while True:
            data = self._json("GET", "/api/projects", params={"page": page, "page_size": 100})
            results = data.get("results", []) if isinstance(data, dict) else data
            yield from results
            if not isinstance(data, dict) or not data.get("next"):
                return
            page += 1

    def project(self, name_or_id: str | int) -> dict | None:
        """A project by id (digits) or exact title; ``None`` when there is none.

        Raises:
            LabelStudioError: several projects carry that title.
        """
        text = str(name_or_id).strip()
        if text.isdigit():
            try:
                return self._json("GET", f"/api/projects/{int(text)}")
            except LabelStudioError as error:
                if "HTTP 404" in str(error):
                    return None
                raise
        found = [p for p in self.projects() if p.get("title") == text]
        if len(found) > 1:
            raise LabelStudioError(f"{len(found)} Label Studio projects are titled {text!r}; "
                                   "pass the project id")
        return found[0] if found else None

    def require_project(self, name_or_id: str | int) -> dict:
        """Like :meth:`project` but an unknown project is an error."""
        project = self.project(name_or_id)
        if project is None:
            raise LabelStudioError(f"no Label Studio project {name_or_id!r} at {self.url}")
        return project

    def create_project(self, title: str, label_config: str) -> dict:
        """Create a project with a labeling config."""
        return self._json("POST", "/api/projects",
                          json={"title": title, "label_config": label_config})

    def import_tasks(self, project_id: int, tasks: Sequence[dict],
                     on_batch: Callable[[list[dict]], None] | None = None) -> int:
        """Import tasks (with their predictions) in batches; returns the number imported.

        Args:
            project_id: the project.
            tasks: the tasks.
            on_batch: called with each batch right after the server accepted it (so callers
                can record what was sent even when a later batch fails).
        """
        imported = 0
        for batch in _batches(tasks, IMPORT_BATCH_BYTES):
            body = json.dumps(batch).encode("utf-8")
            result = self._json("POST", f"/api/projects/{project_id}/import", data=body,
                                headers={"Content-Type": "application/json"})
            imported += int(result.get("task_count", len(batch)))
            if on_batch is not None:
                on_batch(batch)
        return imported

    def export_tasks(self, project_id: int, max_bytes: int = MAX_EXPORT_BYTES) -> list:
        """The project's annotated tasks as Label Studio JSON (bounded to ``max_bytes``)."""
        response = self._send("GET", f"/api/projects/{project_id}/export",
                              params={"exportType": "JSON"}, stream=True)
        chunks, size = [], 0
        for chunk in response.iter_content(1 << 20):
            size += len(chunk)
            if size > max_bytes:
                raise LabelStudioError(f"Label Studio export of project {project_id} is larger "
                                       f"than {max_bytes} bytes")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks))
        except RecursionError:
            raise LabelStudioError(f"Label Studio export of project {project_id} is nested "
                                   "too deeply") from None
        except ValueError:
            raise LabelStudioError(f"Label Studio export of project {project_id} is not "
                                   "JSON") from None
        if not isinstance(data, list):
            raise LabelStudioError(f"Label Studio export of project {project_id} is not a "
                                   "list of tasks")
        return data


def _batches(tasks: Sequence[dict], max_bytes: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    size = 0
    for task in tasks:
        task_size = len(json.dumps(task))
        if batch and size + task_size > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(task)
        size += task_size
    if batch:
        yield batch


def _detail(response: requests.Response) -> str:
    try:
        data = response.json()
        text = data.get("detail") or data.get("validation_errors") or data
    except ValueError:
        text = response.text
    return " ".join(str(text).split())[:300]

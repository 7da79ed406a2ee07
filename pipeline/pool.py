"""The engine actor pool: sizing to the cluster, GPU pinning, shared text embeddings.

One actor per ``gpus_per_actor`` GPUs (Ray pins each to its own devices through
``num_gpus`` and ``CUDA_VISIBLE_DEVICES``); CPU actors when the cluster has no GPUs. The first
actor computes the vocabulary's text embeddings once; every actor (and every replacement of a
dead one) receives them through the object store.

A replacement is *pending* until it has answered once: it may never be placed (its node is
gone and no other node has a free GPU), so the scheduler gives it no shard until then.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError

from schemas.uris import public_uri

from .plan import JobPlan, StartupError
from .record import OutputConflict
from .worker import LabelWorker, WorkerSpec


@dataclass(frozen=True)
class ActorResources:
    """Size of the actor pool and what each actor reserves."""

    num_actors: int
    num_gpus: float
    num_cpus: float


def actor_resources(actors: int | None, gpus_per_actor: float,
                    cpus_per_actor: float | None) -> ActorResources:
    """Size the pool to the cluster: one actor per ``gpus_per_actor`` GPUs, else CPU actors.

    Raises:
        StartupError: more actors requested than the cluster's GPUs or CPUs can hold.
    """
    totals = ray.cluster_resources()
    gpus, cpus = totals.get("GPU", 0.0), totals.get("CPU", 1.0)
    if gpus_per_actor > 0 and gpus >= gpus_per_actor:
        count = actors or int(gpus // gpus_per_actor)
        if count * gpus_per_actor > gpus + 1e-9:
            raise StartupError(f"{count} actors x {gpus_per_actor} GPUs exceed the cluster's "
                               f"{gpus:g} GPUs (GPU actor pools do not autoscale)")
        per_cpu = cpus_per_actor or _cpus_per_gpu_actor(gpus_per_actor)
        return ActorResources(count, gpus_per_actor, per_cpu)
    count = actors or 1
    per_cpu = cpus_per_actor or max(1.0, float(math.floor(min(cpus / count, _max_node_cpus()))))
    if count * per_cpu > cpus + 1e-9:
        raise StartupError(f"{count} CPU actors x {per_cpu:g} CPUs exceed the cluster's "
                           f"{cpus:g} CPUs")
    return ActorResources(count, 0.0, per_cpu)


def _alive_nodes() -> list[dict]:
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def _cpus_per_gpu_actor(gpus_per_actor: float) -> float:
    shares = [r.get("CPU", 0.0) * gpus_per_actor / r["GPU"] for r in _alive_nodes()
              if r.get("GPU")]
    return max(1.0, float(math.floor(min(shares)))) if shares else 1.0


def _max_node_cpus() -> float:
    return max((r.get("CPU", 1.0) for r in _alive_nodes()), default=1.0)


class WorkerPool:
    """Engine actors; the first computes the text embeddings that all others adopt."""

    def __init__(self, plan: JobPlan, spec: WorkerSpec, resources: ActorResources) -> None:
        self.plan, self.spec, self.resources = plan, spec, resources
        self._cls = ray.remote(LabelWorker).options(
            num_gpus=resources.num_gpus, num_cpus=resources.num_cpus,
            max_concurrency=plan.job.compute.shards_per_actor + 1,
            max_restarts=0, max_task_retries=0)
        self.actors: list[Any] = []
        self.generation: list[int] = []
        self.infos: list[dict] = []
        self.replacements = 0
        self.ready: list[bool] = []
        self._pings: dict[int, tuple[Any, float]] = {}  # slot -> (describe ref, since)
        self._embeddings: Any = None
        self._metadata: dict = {}

    def start(self) -> dict:
        """Start every actor, share the embeddings; returns the model identities."""
        self.actors = [self._cls.remote(self.spec) for _ in range(self.resources.num_actors)]
        self.generation = [0] * len(self.actors)
        self.ready = [True] * len(self.actors)
        timeout = self.plan.job.compute.startup_timeout_s
        deadline = time.monotonic() + timeout
        left = lambda: max(1.0, deadline - time.monotonic())  # noqa: E731
        try:
            embeddings = self.actors[0].compute_text_embeddings.remote(True)
            self.infos = ray.get([a.describe.remote() for a in self.actors], timeout=left())
            # owned and stored by the driver: replacements still get them after the node of
            # the worker that computed them is gone
            self._embeddings = ray.put(ray.get(embeddings, timeout=left()))
            models = self.infos[0]["weights_info"]  # every worker checks its own in prepare()
            self.plan.check_weights(models)  # --overwrite: clears an output of other weights
            self._metadata = self.plan.file_metadata(models)
            ray.get([a.prepare.remote(self._embeddings, self._metadata) for a in self.actors],
                    timeout=left())
        except GetTimeoutError as exc:
            r = self.resources
            raise StartupError(
                f"the workers did not start within {timeout:g} s (--startup-timeout): "
                f"{r.num_actors} worker(s) needing {r.num_gpus:g} GPU(s) and {r.num_cpus:g} "
                "CPU(s) each may not fit on any node, or staging the weights and computing "
                "the text embeddings takes longer") from exc
        except RayError as exc:
            raise StartupError(
                "the engine failed to start on a worker: "
                f"{error_reason(exc, limit=4000)}") from exc  # whole remedies
        except OutputConflict as exc:
            output = public_uri(self.plan.job.io.output_uri)
            raise StartupError(f"refusing to write to {output}: {exc}") from exc
        return models

    def replace(self, index: int) -> None:
        """Kill the actor in slot ``index`` (no restart) and start a pending replacement."""
        ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self._cls.remote(self.spec, self._embeddings, self._metadata)
        self.generation[index] += 1
        self.replacements += 1
        self.ready[index] = False
        self._pings[index] = (self.actors[index].describe.remote(), time.monotonic())

    def kill(self, index: int) -> None:
        """Kill the actor in slot ``index`` for good (the slot is not used again)."""
        ray.kill(self.actors[index], no_restart=True)
        self.ready[index] = False
        self._pings.pop(index, None)

    def pending_refs(self) -> list[Any]:
        """The first calls of the pending replacements (to wait on with shard results)."""
        return [ref for ref, _ in self._pings.values()]

    def pending_since(self) -> float | None:
        """``time.monotonic()`` when the oldest pending replacement was started, or None."""
        return min((since for _, since in self._pings.values()), default=None)

    def check_pending(self) -> list[tuple[int, str]]:
        """Mark replacements that answered as ready; returns ``(slot, reason)`` of those
        that failed to start (their constructor raised or their node died)."""
        if not self._pings:
            return []
        refs = {ref: slot for slot, (ref, _) in self._pings.items()}
        answered, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        failed = []
        for ref in answered:
            slot = refs[ref]
            del self._pings[slot]
            try:
                self.infos.append(ray.get(ref))
            except RayError as exc:
                failed.append((slot, error_reason(exc)))
            else:
                self.ready[slot] = True
        return failed

    def peak_memory(self, timeout_s: float = 10.0) -> list[int | None]:
        """Peak resident memory of each live actor in bytes (None when unavailable or not
        started)."""
        refs = [a.peak_memory_bytes.remote() if ok else None
                for a, ok in zip(self.actors, self.ready, strict=True)]
        asked = [ref for ref in refs if ref is not None]
        ready = ray.wait(asked, num_returns=len(asked), timeout=timeout_s)[0] if asked else []
        out = []
        for ref in refs:
            try:
                out.append(ray.get(ref) if ref is not None and ref in ready else None)
            except RayError:
                out.append(None)
        return out

    def shutdown(self, close_timeout_s: float = 5.0) -> None:
        """Stop every actor. With decode processes, idle actors first close them (their
        semaphores and pixel files go with them), waiting at most ``close_timeout_s``."""
        if self.spec.compute.cpu_processes and self.actors:
            with contextlib.suppress(Exception):
                ray.wait([a.close.remote() for a in self.actors], num_returns=len(self.actors),
                         timeout=close_timeout_s)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def error_reason(exc: BaseException, limit: int = 500) -> str:
    """One-line reason of a Ray error: the task's own exception when there is one.

    ``RayTaskError`` carries it as ``cause``; an actor that died in its constructor only has
    the remote traceback in its message, whose last ``SomeError: ...`` line is the reason.
    """
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        lines = [line for line in str(cause).strip().splitlines() if line.strip()]
        return f"{type(cause).__name__}: {lines[0] if lines else ''}"[:limit]
    lines = [_ANSI.sub("", line).strip() for line in str(exc).splitlines() if line.strip()]
    raised = [line for line in lines if _RAISED.match(line)]
    if raised:
        return raised[-1][:limit]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:limit]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*:")

"""Ray for a job: join the cluster it was given, or start a private local Ray on loopback.

- ``--address`` or ``RAY_ADDRESS``: join that cluster (``ray job submit`` sets
  ``RAY_ADDRESS``). Securing a real cluster is the cluster's business: Ray token
  authentication (``RAY_AUTH_MODE=token``) and a private network (see README, Security).
- Otherwise a private local Ray is started. ``ray.init()`` without an address would join any
  cluster that ``ray start`` recorded in Ray's temp folder (someone else's, on a shared
  machine); ``address="local"`` never does. Every listener of the local Ray (GCS, raylet,
  object manager, dashboard agent, runtime-env agent, workers, the driver's own gRPC server)
  is bound to 127.0.0.1, and no dashboard is started. Ray binds its servers to the node IP,
  which it resolves to the machine's address unless cluster mode is off: the node IP is
  pinned to loopback through ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (read by every Ray
  process this one starts, and patched into this process's already imported constant).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

LOOPBACK = "127.0.0.1"
_CLUSTER_MODE_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to join: ``address``, else ``$RAY_ADDRESS``, else None (start a local one)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def init_ray(address: str | None = None, *, logging_level: str = "WARNING",
             log_to_driver: bool = True, **local_options: object) -> bool:
    """Connect to the cluster at ``address``/``RAY_ADDRESS``, else start a private local Ray.

    Args:
        address: a Ray cluster address (``ray://...`` or ``host:port``); None: see above.
        logging_level: level of Ray's own logger in this process.
        log_to_driver: forward the workers' stdout/stderr to this process.
        **local_options: more ``ray.init`` options for a local Ray (``num_cpus``...).

    Returns:
        True when this call connected or started Ray (the caller shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    target = cluster_address(address)
    if target:
        ray.init(address=target, logging_level=logging_level, log_to_driver=log_to_driver)
    else:
        start_local_ray(logging_level=logging_level, log_to_driver=log_to_driver,
                        **local_options)
    return True


def start_local_ray(**options: object) -> None:
    """Start a new local Ray whose every listener is bound to 127.0.0.1 (no dashboard).

    Args:
        **options: ``ray.init`` keyword arguments (not ``address``, ``_node_ip_address``,
            ``include_dashboard`` or ``dashboard_host``, which this function sets).
    """
    import ray

    with _loopback_node():
        ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False,
                 dashboard_host=LOOPBACK, **options)


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Ray's node IP resolves to 127.0.0.1 in this process and the processes started inside."""
    from ray._private import ray_constants

    saved_env = os.environ.get(_CLUSTER_MODE_VARIABLE)
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTER_MODE_VARIABLE] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_CLUSTER_MODE_VARIABLE, None)
        else:
            os.environ[_CLUSTER_MODE_VARIABLE] = saved_env

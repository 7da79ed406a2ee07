"""A local Ray started on loopback, reused while its resources match."""

from __future__ import annotations


class RaySessions:
    """Starts a local Ray with given logical resources; reuses it while they match."""

    def __init__(self) -> None:
        self.current: tuple | None = None

    def ensure(self, num_cpus: int = 2, num_gpus: int = 0) -> None:
        import ray

        wanted = (num_cpus, num_gpus)
        if ray.is_initialized() and self.current == wanted:
            return
        if ray.is_initialized():
            ray.shutdown()
        from pipeline.cluster import start_local_ray  # private, on 127.0.0.1 only

        start_local_ray(num_cpus=num_cpus, num_gpus=num_gpus, logging_level="ERROR")
        self.current = wanted

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self.current = None

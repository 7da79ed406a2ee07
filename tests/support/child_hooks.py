"""Functions that tests hand to decode processes (importable by name in a child process)."""

from __future__ import annotations


def out_of_memory(data: bytes, max_image_pixels: int, prefix: str) -> None:
    """Stands in for ``pipeline.cpu_pool.decode_to_file`` in a child short of memory."""
    raise MemoryError("no memory left for the pixels")

"""Functions that tests hand to decode processes (importable by name in a child process)."""

from __future__ import annotations


def out_of_memory(data: bytes, max_image_pixels: int) -> None:
    """Stands in for ``decode_image`` in a child that is short of memory."""
    raise MemoryError("no memory left for the pixels")

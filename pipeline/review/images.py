"""Source images as Label Studio shows them: ``data:`` URIs with the image's MIME type.

The bytes are read by :mod:`pipeline.source_images` (the pipeline's own readers, matched on
``image_id``), as for exports and audit overlays.
"""

from __future__ import annotations

import base64

_MIME = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF8": "image/gif",
         b"BM": "image/bmp", b"II*\x00": "image/tiff", b"MM\x00*": "image/tiff"}


def mime_type(data: bytes) -> str:
    """The image MIME type from its magic bytes (``application/octet-stream`` if unknown)."""
    for magic, mime in _MIME.items():
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def data_uri(data: bytes) -> str:
    """The image as a ``data:`` URI (Label Studio shows these like any image URL)."""
    return f"data:{mime_type(data)};base64," + base64.b64encode(data).decode("ascii")

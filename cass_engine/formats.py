"""The image formats that are decoded, and a Pillow ``open`` limited to them.

Pillow's ``Image.open`` tries every plugin it has by default; some hand the file to other
programs (EPS/PostScript to Ghostscript) or parse rarely used formats. Only the formats
below are ever opened; anything else is refused with the format it was detected as (by
Pillow's own signature checks on the first bytes, which run no decoder).
"""

from __future__ import annotations

from typing import IO

from PIL import Image, UnidentifiedImageError

#: Pillow format ids that are decoded (multi-picture MPO files open through JPEG).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP")
_SHOWN = "JPEG, PNG, WebP, GIF, TIFF, BMP"


class UnsupportedImageFormat(UnidentifiedImageError):
    """The bytes are no image of an accepted format (the message names what they look like)."""


def open_image(fp: str | IO[bytes]) -> Image.Image:
    """``Image.open`` with only :data:`IMAGE_FORMATS` enabled.

    Args:
        fp: a path or a binary file object positioned at the start of the image.

    Raises:
        UnsupportedImageFormat: another format, or no recognisable image.
        FileNotFoundError, OSError: as ``Image.open``.
    """
    try:
        return Image.open(fp, formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        detected = detect_format(fp)
        what = f"a {detected} file" if detected else "not an image of a known format"
        raise UnsupportedImageFormat(
            f"{what}; accepted image formats: {_SHOWN}") from None


def detect_format(fp: str | IO[bytes]) -> str | None:
    """The Pillow format id whose signature matches the first bytes, or None.

    Only the plugins' prefix checks run (no decoding, no external program).
    """
    if isinstance(fp, str):
        with open(fp, "rb") as f:
            prefix = f.read(16)
    else:
        fp.seek(0)
        prefix = fp.read(16)
    Image.init()
    for format_id, (_factory, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(prefix):
                return format_id
        except Exception:  # noqa: BLE001, S112 - a plugin's check failed on odd bytes
            continue
    return None

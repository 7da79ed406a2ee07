"""Sample images (scikit-image photographs), encoders, edge cases, tar files."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")
PIXEL_LIMIT = 1_000_000  # the --max-image-pixels of the pipeline stage tests


def photo(name: str, max_side: int = 96) -> np.ndarray:
    """A scikit-image photograph as ``[H, W, 3]`` uint8 (grayscale ones expanded), shrunk."""
    from skimage import data

    array = getattr(data, name)()
    image = Image.fromarray(array).convert("RGB")
    image.thumbnail((max_side, max_side))
    return np.asarray(image)


def photos(count: int, max_side: int = 96) -> list[np.ndarray]:
    """``count`` photographs, cycling through :data:`SKIMAGE_PHOTOS` with varied sizes."""
    out = []
    for i in range(count):
        side = max_side - 8 * (i // len(SKIMAGE_PHOTOS))
        out.append(photo(SKIMAGE_PHOTOS[i % len(SKIMAGE_PHOTOS)], max(side, 24)))
    return out


def encode(image: np.ndarray | Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    """Encode an array or Pillow image to bytes (PNG is lossless)."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    pil.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def write_images(root: Path, names: list[str]) -> None:
    """Write one small PNG photograph per name under ``root`` (subfolders made as needed)."""
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(photos(i + 1)[-1]))


def write_vocabulary(path: Path, classes: list[str]) -> Path:
    """Write a vocabulary file (one class per line)."""
    path.write_text("\n".join(classes) + "\n", encoding="utf-8")
    return path


def png_with_declared_size(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width x height`` pixels (a decompression bomb)."""
    import struct
    import zlib

    data = bytearray(encode(np.zeros((8, 8), dtype=np.uint8)))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def exif_rotated_jpeg(image: np.ndarray, orientation: int = 6) -> bytes:
    """JPEG of ``image`` whose EXIF orientation tag asks viewers to rotate it."""
    pil = Image.fromarray(image)
    exif = pil.getexif()
    exif[0x0112] = orientation
    return encode(pil, "JPEG", exif=exif.tobytes(), quality=95)


def edge_case_images() -> dict[str, tuple[bytes, str]]:
    """Generated images that must decode (status ``ok``) or fail with a given status."""
    rgb = photo("astronaut", 48)
    gray16 = (np.arange(32 * 40, dtype=np.uint16).reshape(32, 40) * 50)
    jpeg = encode(rgb, "JPEG")
    return {
        "rgb.png": (encode(rgb), "ok"),
        "gray.png": (encode(Image.fromarray(rgb).convert("L")), "ok"),
        "palette.png": (encode(Image.fromarray(rgb).convert("P")), "ok"),
        "gray16.png": (encode(Image.fromarray(gray16)), "ok"),
        "alpha.png": (encode(Image.fromarray(rgb).convert("RGBA")), "ok"),
        "cmyk.jpg": (encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"), "ok"),
        "rotated.jpg": (exif_rotated_jpeg(rgb[:, :30]), "ok"),
        "photo.webp": (encode(rgb, "WEBP"), "ok"),
        "corrupt.jpg": (b"\xff\xd8\xff" + bytes(range(256)) * 4, "decode_error"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "decode_error"),
        "empty.png": (b"", "empty"),
        "text.png": (b"this is not an image at all", "decode_error"),
        "bomb.png": (png_with_declared_size(30000, 30000), "too_large"),
    }


def tar_bytes(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    """A WebDataset-style tar archive in memory; ``symlink`` adds a link member to /etc/passwd."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            archive.addfile(info)
    return buffer.getvalue()

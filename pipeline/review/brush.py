"""Label Studio brush masks: the bit-packed run-length format of ``BrushLabels`` results.

A brush result stores an RGBA image of the original size, flattened row-major to ``4 * H * W``
values, as a list of bytes (``value.rle``). The bit stream (most significant bit first) is:

- a header: the number of values (32 bits), the word size minus one (5 bits) and four run-length
  field sizes minus one (4 bits each);
- then blocks until every value is filled: a flag bit, a 2-bit index into the four field sizes,
  ``count - 1`` in that many bits, then one word (flag 1: ``count`` repeats of that word) or
  ``count`` words (flag 0: literal values);
- zero bits up to a whole byte.

Label Studio reads the mask from the alpha channel (every fourth value); like its own COCO
export, any non-zero alpha is inside. We write every channel of a pixel as 255 (inside) or 0,
with word size 8 and field sizes 3, 4, 8 and 16 bits, and runs only (flag 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

WORD_BITS = 8
FIELD_BITS = (3, 4, 8, 16)
CHANNELS = 4
INSIDE = 255
_HEADER_BITS = 32 + 5 + 4 * 4


class BrushError(ValueError):
    """A brush RLE is malformed or does not fit the image it claims to describe."""


def encode_brush(mask: np.ndarray) -> list[int]:
    """Encode a binary mask as Label Studio brush RLE.

    Args:
        mask: ``[H, W]`` array, non-zero = inside.

    Returns:
        The ``value.rle`` list of byte values (ints in ``0..255``).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"mask must be a non-empty [H, W] array, got shape {mask.shape}")
    flat = (mask.reshape(-1) != 0)
    lengths, values = _pixel_runs(flat)
    block_lengths, block_values = _split_runs(lengths * CHANNELS, values * INSIDE)
    bits = np.concatenate([_header_bits(flat.size * CHANNELS),
                           _block_bits(block_lengths, block_values)])
    return np.packbits(bits).tolist()


def _pixel_runs(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run lengths and values (0/1) of a 1-D bool array."""
    starts = np.flatnonzero(np.concatenate([[True], flat[1:] != flat[:-1]]))
    lengths = np.diff(np.append(starts, flat.size))
    return lengths.astype(np.int64), flat[starts].astype(np.int64)


def _split_runs(lengths: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut runs longer than the largest field allows into full blocks plus a remainder."""
    cap = 1 << FIELD_BITS[-1]
    pieces = (lengths + cap - 1) // cap
    out_values = np.repeat(values, pieces)
    out_lengths = np.full(out_values.size, cap, dtype=np.int64)
    last = np.cumsum(pieces) - 1
    out_lengths[last] = lengths - (pieces - 1) * cap
    return out_lengths, out_values


def _header_bits(num_values: int) -> np.ndarray:
    fields = [(num_values, 32), (WORD_BITS - 1, 5)] + [(b - 1, 4) for b in FIELD_BITS]
    return np.concatenate([_to_bits(np.array([v]), np.array([w]), w) for v, w in fields])


def _block_bits(lengths: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Bits of run blocks: flag 1, field index, ``length - 1``, the word."""
    sizes = np.asarray(FIELD_BITS)
    index = np.searchsorted(1 << sizes, lengths)  # smallest field that holds the length
    field = sizes[index]
    code = (1 << (2 + field + WORD_BITS)) | (index << (field + WORD_BITS))
    code |= (lengths - 1) << WORD_BITS
    code |= values
    return _to_bits(code, 3 + field + WORD_BITS, 3 + FIELD_BITS[-1] + WORD_BITS)


def _to_bits(codes: np.ndarray, widths: np.ndarray, max_width: int) -> np.ndarray:
    """Concatenate the low ``widths[i]`` bits of each ``codes[i]``, most significant first."""
    widths = np.broadcast_to(widths, codes.shape)
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]])
    out = np.zeros(int(widths.sum()), dtype=np.uint8)
    for position in range(max_width):  # one pass per bit position, vectorised over codes
        used = widths > position
        shift = widths[used] - 1 - position
        out[starts[used] + position] = (codes[used] >> shift) & 1
    return out


def decode_brush(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """Decode Label Studio brush RLE to the mask of its alpha channel.

    Args:
        rle: the ``value.rle`` byte values.
        height, width: the image size the result claims (``original_height/width``).

    Returns:
        ``[H, W]`` bool, True where alpha is non-zero.

    Raises:
        BrushError: malformed data, or a value count other than ``4 * H * W``.
    """
    expected = CHANNELS * int(height) * int(width)
    data = _checked_bytes(rle, expected)
    reader = _BitReader(data)
    num = reader.read(32)
    if num != expected:
        raise BrushError(f"brush RLE holds {num} values, the {height}x{width} image needs "
                         f"{expected}")
    word = reader.read(5) + 1
    fields = [reader.read(4) + 1 for _ in range(4)]
    out = np.zeros(num, dtype=bool)
    filled = 0
    while filled < num:
        repeat = reader.read(1)
        end = filled + 1 + reader.read(fields[reader.read(2)])
        if end > num:
            raise BrushError(f"brush RLE runs past the end of the image ({end} > {num} values)")
        if repeat:
            out[filled:end] = reader.read(word) != 0
        else:
            out[filled:end] = reader.read_words(word, end - filled) != 0
        filled = end
    return out.reshape(int(height), int(width), CHANNELS)[:, :, CHANNELS - 1]


def _checked_bytes(rle: Sequence[int], expected_values: int) -> np.ndarray:
    if isinstance(rle, (str, bytes)) or not isinstance(rle, Sequence):
        raise BrushError("brush RLE must be a list of byte values")
    limit = 16 + 5 * expected_values  # more than any encoding of that many values needs
    if len(rle) > limit:
        raise BrushError(f"brush RLE has {len(rle)} bytes, more than the {limit} an image of "
                         f"{expected_values // CHANNELS} pixels can need")
    try:
        data = np.asarray(rle, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise BrushError("brush RLE must be a list of integers") from None
    if data.ndim != 1 or (data.size and (data.min() < 0 or data.max() > 255)):
        raise BrushError("brush RLE values must be bytes (0..255)")
    if data.size * 8 < _HEADER_BITS:
        raise BrushError("brush RLE is shorter than its header")
    return data.astype(np.uint8)


class _BitReader:
    """Reads unsigned big-endian bit fields from a byte array."""

    def __init__(self, data: np.ndarray) -> None:
        self._bits = np.unpackbits(data).tobytes().translate(bytes.maketrans(b"\0\1", b"01"))
        self._pos = 0

    def read(self, size: int) -> int:
        end = self._pos + size
        if end > len(self._bits):
            raise BrushError("brush RLE ends in the middle of a block")
        value = int(self._bits[self._pos:end], 2)
        self._pos = end
        return value

    def read_words(self, size: int, count: int) -> np.ndarray:
        return np.array([self.read(size) for _ in range(count)], dtype=np.int64)

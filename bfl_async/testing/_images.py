"""Small, valid PNG, JPEG and WebP images made with the standard library only.

Each image is a deterministic pattern whose colours come from a key (the task id), so two
downloads of one task are byte-identical and two tasks differ. `render` can pad a file to about
a given size with a chunk or segment every decoder skips, for download tests and benchmarks;
the padding is one shared block repeated, so a padded image costs no extra memory per task.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import struct
import zlib

__all__ = ["CONTENT_TYPES", "render"]

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}

_BLOCK = b" " * (1 << 20)
"""The shared padding block: spaces are valid in a PNG tEXt chunk, a JPEG COM segment and a
WebP unknown chunk alike."""

RGB = tuple[int, int, int]


def render(fmt: str, key: str, size: tuple[int, int], pad_to: int | None = None) -> list[bytes]:
    """Return the image for `key` as a list of byte strings to send one after the other."""
    width, height = size
    if not (1 <= width <= 16383 and 1 <= height <= 16383):
        raise ValueError(f"image size must be within 1..16383 pixels per side, not {size}")
    digest = hashlib.sha256(key.encode()).digest()
    first: RGB = (digest[0], digest[1], digest[2])
    second: RGB = (first[0] ^ 0x80, first[1] ^ 0x80, first[2] ^ 0x80)
    if fmt == "png":
        return _png(width, height, first, second, pad_to)
    if fmt == "jpeg":
        return _jpeg(width, height, first, second, pad_to)
    if fmt == "webp":
        return _webp(width, height, first, second, pad_to)
    raise ValueError(f"unknown image format {fmt!r}")


def _padding(size: int) -> list[bytes]:
    """`size` bytes of padding, as references to the shared block (and to a shared tail)."""
    whole, rest = divmod(size, len(_BLOCK))
    return [_BLOCK] * whole + ([_tail(rest)] if rest else [])


@functools.lru_cache(maxsize=8)
def _tail(size: int) -> bytes:
    """The first `size` bytes of the block, made once: every image of a size shares it."""
    return _BLOCK[:size]


def _lerp(a: int, b: int, num: int, den: int) -> int:
    return a + (b - a) * num // den if den else a


# PNG: an RGB gradient, red across and green down; padding is a tEXt chunk after the pixels.


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _png(width: int, height: int, first: RGB, second: RGB, pad_to: int | None) -> list[bytes]:
    reds = bytes(_lerp(first[0], second[0], x, width - 1) for x in range(width))
    blues = bytes(_lerp(second[2], first[2], x, width - 1) for x in range(width))
    greens = [_lerp(first[1], second[1], y, height - 1) for y in range(height)]
    row = bytearray(3 * width)
    row[0::3] = reds
    row[1::3] = bytes([greens[0]]) * width
    row[2::3] = blues
    raw = bytearray(b"\x00" + row)  # filter 0 (None) for the first scanline
    for above, green in itertools.pairwise(greens):
        # filter 2 (Up): only green changes from one row to the next
        raw += b"\x02" + bytes([0, (green - above) & 0xFF, 0]) * width
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    head = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
    head += _png_chunk(b"IDAT", zlib.compress(bytes(raw), 9))
    tail = _png_chunk(b"IEND", b"")
    keyword = b"Comment\x00"
    overhead = 12 + len(keyword)
    if pad_to is None or pad_to < len(head) + len(tail) + overhead:
        return [head + tail]
    fill = pad_to - len(head) - len(tail) - overhead
    parts = _padding(fill)
    crc = zlib.crc32(keyword, zlib.crc32(b"tEXt"))
    for part in parts:
        crc = zlib.crc32(part, crc)
    text_head = struct.pack(">I", len(keyword) + fill) + b"tEXt" + keyword
    return [head + text_head, *parts, struct.pack(">I", crc) + tail]


# JPEG: baseline, 4:4:4 YCbCr, each 8x8 block one flat colour (DC coefficient only), so the
# entropy coder needs only the DC table and the end-of-block code. Padding is COM segments.

_DC_BITS = (0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0)  # ITU T.81 table K.3
_DC_VALUES = tuple(range(12))
_AC_BITS = (0, 2) + (0,) * 14  # two 2-bit codes: 00 = end of block, 01 = unused
_AC_VALUES = (0x00, 0x01)
_QUANT = 8  # with every entry 8, a flat block of level v has the quantised DC value v - 128


def _huffman_codes(bits: tuple[int, ...], values: tuple[int, ...]) -> dict[int, tuple[int, int]]:
    """Canonical Huffman codes, symbol -> (code, length), as JPEG assigns them."""
    codes: dict[int, tuple[int, int]] = {}
    code = 0
    symbols = iter(values)
    for length, count in enumerate(bits, start=1):
        for _ in range(count):
            codes[next(symbols)] = (code, length)
            code += 1
        code <<= 1
    return codes


class _JpegBits:
    """MSB-first bit writer with JPEG's 0xFF byte stuffing."""

    def __init__(self) -> None:
        self.out = bytearray()
        self._acc = 0
        self._count = 0

    def write(self, value: int, length: int) -> None:
        self._acc = (self._acc << length) | (value & ((1 << length) - 1))
        self._count += length
        while self._count >= 8:
            self._count -= 8
            byte = (self._acc >> self._count) & 0xFF
            self.out.append(byte)
            if byte == 0xFF:
                self.out.append(0x00)
        self._acc &= (1 << self._count) - 1

    def flush(self) -> bytes:
        if self._count:
            self.write((1 << (8 - self._count)) - 1, 8 - self._count)  # pad with 1 bits
        return bytes(self.out)


def _segment(marker: int, data: bytes) -> bytes:
    return struct.pack(">HH", 0xFF00 | marker, len(data) + 2) + data


def _ycbcr(rgb: RGB) -> RGB:
    r, g, b = rgb
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    y_, cb_, cr_ = (min(255, max(0, round(v))) for v in (y, cb, cr))
    return (y_, cb_, cr_)


def _jpeg(width: int, height: int, first: RGB, second: RGB, pad_to: int | None) -> list[bytes]:
    cols, rows = (width + 7) // 8, (height + 7) // 8
    dc_codes = _huffman_codes(_DC_BITS, _DC_VALUES)
    eob_code, eob_length = _huffman_codes(_AC_BITS, _AC_VALUES)[0x00]
    bits = _JpegBits()
    previous = [0, 0, 0]
    for by in range(rows):
        for bx in range(cols):
            rgb = (
                _lerp(first[0], second[0], bx, cols - 1),
                _lerp(first[1], second[1], by, rows - 1),
                _lerp(second[2], first[2], bx, cols - 1),
            )
            for component, level in enumerate(_ycbcr(rgb)):
                diff = (level - 128) - previous[component]
                previous[component] = level - 128
                category = abs(diff).bit_length()
                code, length = dc_codes[category]
                bits.write(code, length)
                if category:
                    bits.write(diff if diff > 0 else diff + (1 << category) - 1, category)
                bits.write(eob_code, eob_length)
    jfif = _segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    tables = _segment(0xDB, b"\x00" + bytes([_QUANT]) * 64)
    frame = struct.pack(">BHHB", 8, height, width, 3)
    frame += b"".join(bytes([component, 0x11, 0]) for component in (1, 2, 3))
    tables += _segment(0xC0, frame)
    tables += _segment(0xC4, b"\x00" + bytes(_DC_BITS) + bytes(_DC_VALUES))
    tables += _segment(0xC4, b"\x10" + bytes(_AC_BITS) + bytes(_AC_VALUES))
    scan = _segment(0xDA, b"\x03\x01\x00\x02\x00\x03\x00\x00\x3f\x00")
    body = tables + scan + bits.flush() + b"\xff\xd9"
    head = b"\xff\xd8" + jfif
    if pad_to is None:
        return [head + body]
    parts = [head]
    fill = pad_to - len(head) - len(body)
    while fill > 4:
        size = min(fill - 4, 0xFFFF - 2)
        parts.append(struct.pack(">HH", 0xFFFE, size + 2))
        parts.extend(_padding(size))
        fill -= size + 4
    parts.append(body)
    return parts


# WebP: lossless (VP8L), a two-colour checkerboard of 8-pixel squares. Each channel has a
# "simple" prefix code of the two values it takes, so every pixel costs one bit per channel.
# Padding is an unknown chunk after the image, which needs the extended (VP8X) layout.


def _lsb_bits(value: int, length: int) -> str:
    """`value` as `length` bits in the order VP8L reads them (least significant first)."""
    return format(value, f"0{length}b")[::-1] if length else ""


def _webp(width: int, height: int, first: RGB, second: RGB, pad_to: int | None) -> list[bytes]:
    header = [_lsb_bits(width - 1, 14), _lsb_bits(height - 1, 14), "0", "000"]
    header.append("000")  # no transform, no colour cache, no meta prefix codes
    for channel in (1, 0, 2):  # green, red, blue: two symbols, 8 bits each
        low, high = sorted((first[channel], second[channel]))
        header.append("1" + "1" + "1" + _lsb_bits(low, 8) + _lsb_bits(high, 8))
    header.append("1" + "0" + "1" + _lsb_bits(255, 8))  # alpha: always 255
    header.append("1" + "0" + "0" + "0")  # distance: one symbol, never read

    def pixel(colour: RGB) -> str:
        return "".join("1" if colour[c] > (first[c] + second[c]) / 2 else "0" for c in (1, 0, 2))

    squares = (pixel(first), pixel(second))

    def row(phase: int) -> str:
        return "".join(squares[(x // 8 + phase) % 2] for x in range(width))

    rows = (row(0), row(1))
    stream = "".join(header) + "".join(rows[(y // 8) % 2] for y in range(height))
    data = b"\x2f" + int(stream[::-1], 2).to_bytes((len(stream) + 7) // 8, "little")
    image = _riff_chunk(b"VP8L", data)
    canvas = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    vp8x = _riff_chunk(b"VP8X", b"\x00" * 4 + canvas)
    fill = pad_to - 12 - len(vp8x) - len(image) - 8 if pad_to is not None else -1
    fill -= fill % 2  # RIFF chunks are padded to an even size
    if fill < 0:
        return [b"RIFF" + struct.pack("<I", 4 + len(image)) + b"WEBP" + image]
    riff_size = 4 + len(vp8x) + len(image) + 8 + fill
    head = b"RIFF" + struct.pack("<I", riff_size) + b"WEBP" + vp8x + image
    return [head + b"PADD" + struct.pack("<I", fill), *_padding(fill)]


def _riff_chunk(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack("<I", len(data)) + data + (b"\x00" if len(data) % 2 else b"")

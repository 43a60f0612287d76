"""A small PNG writer: signature, IHDR, IDAT…, IEND and nothing else.

Pillow's PNG encoder chooses a filter per row by trying all five, which costs ~110 ms for a
3-megapixel picture before zlib has compressed a byte. This writer filters every row with
*Up* (each byte minus the byte above it, computed with ``ImageChops.subtract_modulo`` on the
raw scanlines), then deflates with zlib-ng (the system zlib where it is missing). A 3 MP
photograph takes ~80 ms instead of ~230 ms and comes out about as large as Pillow's level-1
output (~20 % larger than its level 6); screenshots come out as small as Pillow's.

* Only IHDR, IDAT and IEND are written: no ancillary chunk (no gAMA, pHYs, tRNS, text), so
  nothing of the input other than its pixels reaches the output.
* The pixels are read with ``Image.tobytes`` in the PNG raw mode (big-endian for 16 bit,
  MSB-first packed bits for mode ``1``): what Pillow decodes from the output is identical.
* Rows are packed, filtered and compressed in stripes of about ``STRIPE_BYTES``, so the memory
  needed beyond the image is small; the zlib stream is cut into IDAT chunks of ``IDAT_BYTES``.
"""

from __future__ import annotations

import importlib
import struct
import zlib
from collections.abc import Callable
from typing import BinaryIO

from PIL import Image, ImageChops

# zlib-ng (the ``zlib-ng`` package, a dependency; the same library Pillow's wheels use)
# deflates Up-filtered photographs faster than the system zlib, to the same stream format
# (bench/content_formats.py, 2026-11-22, side by side: a 3 MP photo 5.8 -> 7.3/s on one
# process, a screenshot 22 -> 31/s). Without it (a build for a platform it has no wheel for)
# the system zlib is used.
compressobj: Callable[[int, int, int, int, int], zlib._Compress]
try:
    compressobj = importlib.import_module("zlib_ng.zlib_ng").compressobj
except ImportError:
    compressobj = zlib.compressobj

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pillow mode → (raw mode for tobytes, bit depth, PNG colour type).
MODES: dict[str, tuple[str, int, int]] = {
    "1": ("1", 1, 0),
    "L": ("L", 8, 0),
    "LA": ("LA", 8, 4),
    "RGB": ("RGB", 8, 2),
    "RGBA": ("RGBA", 8, 6),
    "I;16": ("I;16B", 16, 0),
    "I;16B": ("I;16B", 16, 0),
    # 32-bit integers are clipped to 0..65535 by the packer; the caller checks the range.
    "I": ("I;16B", 16, 0),
}
CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}
FILTER_UP = 2
STRIPE_BYTES = 1 << 19
IDAT_BYTES = 1 << 20
# A sample of the filtered rows is deflated first and its ratio picks the zlib settings.
# Busy content (photographs: ~55 % of the raw size) gets Huffman coding alone, which there is
# ~2x faster than level 1's match search and smaller even than level 6's. Flat content
# (screenshots, ~3 %) gets the match search that finds repeated glyphs: level 6 for small
# images, level 2 (nearly as small, cheap) for large ones; in between, small images get level 6
# and large ones run-length matching.
FAST_ABOVE_PIXELS = 1_000_000
SMALL = (6, zlib.Z_DEFAULT_STRATEGY)
LARGE_FLAT = (2, zlib.Z_DEFAULT_STRATEGY)
LARGE_MIXED = (1, zlib.Z_RLE)
BUSY = (1, zlib.Z_HUFFMAN_ONLY)
FLAT_BELOW_RATIO = 0.25
BUSY_ABOVE_RATIO = 0.5
PROBE_BANDS = 4
PROBE_BYTES = 1 << 16


def chunk(kind: bytes, body: bytes = b"") -> bytes:
    """One PNG chunk: length, type, body, CRC-32 of type and body."""
    crc = zlib.crc32(body, zlib.crc32(kind))
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def ihdr(width: int, height: int, depth: int, colour: int) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))


def write_png(
    im: Image.Image, fh: BinaryIO, *, level: int | None = None, strategy: int | None = None
) -> None:
    """Write ``im`` (a mode in ``MODES``) to ``fh`` as a non-interlaced PNG."""
    try:
        rawmode, depth, colour = MODES[im.mode]
    except KeyError:
        raise ValueError(f"cannot write mode {im.mode} as PNG") from None
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ValueError(f"cannot write a {width}x{height} image")
    row_bytes = (width * depth * CHANNELS[colour] + 7) // 8
    auto_level, auto_strategy = _compression(im, rawmode, row_bytes)
    comp = compressobj(
        auto_level if level is None else level,
        zlib.DEFLATED,
        15,
        8,
        auto_strategy if strategy is None else strategy,
    )
    fh.write(SIGNATURE + ihdr(width, height, depth, colour))
    stripe = max(1, STRIPE_BYTES // row_bytes)
    pending = bytearray()
    for top in range(0, height, stripe):
        pending += comp.compress(_filtered_rows(im, rawmode, row_bytes, top, top + stripe))
        while len(pending) >= IDAT_BYTES:
            fh.write(chunk(b"IDAT", bytes(pending[:IDAT_BYTES])))
            del pending[:IDAT_BYTES]
    pending += comp.flush()
    for start in range(0, len(pending), IDAT_BYTES):
        fh.write(chunk(b"IDAT", bytes(pending[start : start + IDAT_BYTES])))
    fh.write(chunk(b"IEND"))


def _compression(im: Image.Image, rawmode: str, row_bytes: int) -> tuple[int, int]:
    """(zlib level, strategy) for ``im``, from how well a sample of its rows compresses."""
    rows = max(1, PROBE_BYTES // PROBE_BANDS // row_bytes)
    probe = compressobj(LARGE_MIXED[0], zlib.DEFLATED, 15, 8, LARGE_MIXED[1])
    raw = packed = 0
    for band in range(PROBE_BANDS):
        top = im.height * (2 * band + 1) // (2 * PROBE_BANDS)
        sample = _filtered_rows(im, rawmode, row_bytes, top, top + rows)
        raw += len(sample)
        packed += len(probe.compress(sample))
    packed += len(probe.flush())
    if packed > BUSY_ABOVE_RATIO * raw:
        return BUSY
    if im.width * im.height <= FAST_ABOVE_PIXELS:
        return SMALL
    return LARGE_FLAT if packed < FLAT_BELOW_RATIO * raw else LARGE_MIXED


def _filtered_rows(im: Image.Image, rawmode: str, row_bytes: int, top: int, end: int) -> bytes:
    """Rows ``top:end`` of ``im`` as PNG scanlines filtered with Up: byte 2, row minus prior row.

    The rows (and the one above them) are packed with ``tobytes`` into an 8-bit "L" image one
    byte per pixel, so that the filter is a byte-wise subtraction whatever the mode and bit
    depth, which is how PNG defines it.
    """
    bottom = min(im.height, end)
    rows = bottom - top
    first = max(0, top - 1)
    packed = im.crop((0, first, im.width, bottom)).tobytes("raw", rawmode)
    lines = Image.frombuffer("L", (row_bytes, bottom - first), packed, "raw", "L", 0, 1)
    if top > 0:
        current = lines.crop((0, 1, row_bytes, rows + 1))
        prior = lines.crop((0, 0, row_bytes, rows))
    else:
        # The first row's prior row is all zeros.
        current = lines
        prior = Image.new("L", (row_bytes, rows))
        if rows > 1:
            prior.paste(lines.crop((0, 0, row_bytes, rows - 1)), (0, 1))
    framed = Image.new("L", (row_bytes + 1, rows), FILTER_UP)
    framed.paste(ImageChops.subtract_modulo(current, prior), (1, 0))
    return framed.tobytes()

"""PNG chunk walker and JPEG marker walker (stdlib only, no image library).

PNG: signature, IHDR first and well formed, every CRC, only the chunk types the outside writes
(plus harmless colour/size chunks), IDAT contiguous, the zlib stream inflating to exactly the
bytes the image needs, IEND last and nothing after it.

JPEG: SOI, then only the markers a baseline/progressive encoder writes (JFIF APP0 and Adobe
APP14 are the only application segments; no COM), entropy-coded data walked to EOI, nothing
after EOI.
"""

from __future__ import annotations

import struct
import zlib

from inside.recheck.findings import Findings

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_ALLOWED = frozenset(
    {
        b"IHDR",
        b"PLTE",
        b"IDAT",
        b"IEND",
        b"tRNS",
        b"gAMA",
        b"cHRM",
        b"sRGB",
        b"pHYs",
        b"sBIT",
        b"bKGD",
    }
)
# Colour type → allowed bit depths and channels.
PNG_COLOUR = {
    0: ((1, 2, 4, 8, 16), 1),
    2: ((8, 16), 3),
    3: ((1, 2, 4, 8), 1),
    4: ((8, 16), 2),
    6: ((8, 16), 4),
}
MAX_SIDE = 100_000
MAX_PIXELS = 400_000_000
# Adam7 passes: (x start, y start, x step, y step).
ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)


def _raw_size(width: int, height: int, depth: int, channels: int, interlace: int) -> int:
    """Bytes of filtered scanlines the IDAT stream must inflate to."""

    def rows(w: int, h: int) -> int:
        if w == 0 or h == 0:
            return 0
        return h * (1 + (w * depth * channels + 7) // 8)

    if not interlace:
        return rows(width, height)
    return sum(
        rows(
            (width - x0 + dx - 1) // dx if width > x0 else 0,
            (height - y0 + dy - 1) // dy if height > y0 else 0,
        )
        for x0, y0, dx, dy in ADAM7
    )


def check_png(data: bytes, found: Findings) -> None:
    found.check("png.signature")
    if not data.startswith(PNG_SIGNATURE):
        found.problem("not a PNG (bad signature)")
        return
    pos = len(PNG_SIGNATURE)
    idat = bytearray()
    seen: list[bytes] = []
    header: tuple[int, int, int, int, int] | None = None
    while True:
        if pos + 12 > len(data):
            found.problem("truncated chunk (no IEND)")
            return
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        if length > 0x7FFFFFFF or pos + 12 + length > len(data):
            found.problem(f"chunk {kind!r} length {length} runs past the end")
            return
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        if zlib.crc32(kind + body) != crc:
            found.problem(f"bad CRC in chunk {kind!r}")
        if not kind.isalpha():
            found.problem(f"invalid chunk type {kind!r}")
        if kind not in PNG_ALLOWED:
            found.problem(f"chunk {kind.decode('latin-1')!r} not allowed")
        if not seen and kind != b"IHDR":
            found.problem("first chunk is not IHDR")
        if kind == b"IHDR":
            if seen or length != 13:
                found.problem("misplaced or malformed IHDR")
            else:
                width, height, depth, colour, _comp, _filt, interlace = struct.unpack(
                    ">IIBBBBB", body
                )
                header = (width, height, depth, colour, interlace)
        if kind == b"IDAT":
            if seen and seen[-1] != b"IDAT" and b"IDAT" in seen:
                found.problem("IDAT chunks are not contiguous")
            idat += body
        seen.append(kind)
        pos += 12 + length
        if kind == b"IEND":
            break
    found.check("png.chunks")
    if pos != len(data):
        found.problem(f"{len(data) - pos} bytes after IEND")
    found.check("png.trailing")
    if header is None:
        found.problem("no IHDR")
        return
    width, height, depth, colour, interlace = header
    if colour not in PNG_COLOUR or depth not in PNG_COLOUR[colour][0] or interlace > 1:
        found.problem(f"invalid IHDR (depth {depth}, colour type {colour})")
        return
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE) or width * height > MAX_PIXELS:
        found.problem(f"image size {width}x{height} out of range")
        return
    expected = _raw_size(width, height, depth, PNG_COLOUR[colour][1], interlace)
    dec = zlib.decompressobj()
    try:
        raw = dec.decompress(bytes(idat), expected + 1)
    except zlib.error as exc:
        found.problem(f"IDAT does not inflate: {exc}")
        return
    if len(raw) != expected or not dec.eof or dec.unused_data:
        found.problem(
            f"IDAT inflates to {len(raw)} bytes (+{len(dec.unused_data)} unused), "
            f"expected {expected}"
        )
    found.check("png.idat")
    found.scan(raw, "pixels")


# JPEG markers allowed besides SOI/EOI/SOS/RSTn and the two application segments.
JPEG_SEGMENTS = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC4, 0xDB, 0xDD, 0xDC}  # SOF0-2, DHT, DQT, DRI, DNL
)


def check_jpeg(data: bytes, found: Findings) -> None:
    found.check("jpeg.markers")
    if not data.startswith(b"\xff\xd8"):
        found.problem("not a JPEG (no SOI)")
        return
    pos = 2
    n = len(data)
    frames = 0
    while True:
        if pos + 2 > n:
            found.problem("truncated JPEG (no EOI)")
            return
        if data[pos] != 0xFF:
            found.problem(f"expected a marker at offset {pos}")
            return
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            pos += 2
            break
        if pos + 4 > n:
            found.problem("truncated segment")
            return
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2 or pos + 2 + length > n:
            found.problem(f"segment 0xFF{marker:02X} runs past the end")
            return
        body = data[pos + 4 : pos + 2 + length]
        if marker == 0xE0:
            if not body.startswith(b"JFIF\x00"):
                found.problem("APP0 segment that is not JFIF")
            elif len(body) > 14 and body[12] * body[13]:
                found.problem("JFIF thumbnail present")
        elif marker == 0xEE:
            if not body.startswith(b"Adobe"):
                found.problem("APP14 segment that is not Adobe")
        elif 0xE1 <= marker <= 0xEF:
            found.problem(f"APP{marker - 0xE0} segment (metadata) present")
        elif marker == 0xFE:
            found.problem("COM segment (comment) present")
        elif marker in (0xC0, 0xC1, 0xC2):
            frames += 1
        elif marker == 0xDA:
            pos = _skip_entropy(data, pos + 2 + length)
            continue
        elif marker not in JPEG_SEGMENTS:
            found.problem(f"unexpected marker 0xFF{marker:02X}")
        pos += 2 + length
    if frames != 1:
        found.problem(f"{frames} frame headers")
    found.check("jpeg.eoi")
    if pos != n:
        found.problem(f"{n - pos} bytes after EOI")


def _skip_entropy(data: bytes, pos: int) -> int:
    """Skip entropy-coded data: stop at a marker other than a stuffed 0x00 or RSTn."""
    n = len(data)
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= n:
            return n  # no EOI: the caller reports truncation
        nxt = data[pos + 1]
        if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
            pos += 2 if nxt != 0xFF else 1
            continue
        return pos

"""A minimal Compound File Binary (OLE2) writer for test fixtures (MS-CFB version 3).

Enough for olefile to read: 512-byte sectors, one FAT sector, one directory sector, every
stream padded to at least 4096 bytes so no mini stream is needed. Used to build legacy Office
look-alikes (``WordDocument`` stream) and encrypted OOXML containers (``EncryptionInfo`` and
``EncryptedPackage``).
"""

from __future__ import annotations

import struct

SECTOR = 512
MIN_STREAM = 4096  # streams below the mini-stream cutoff would need a mini FAT
FREESECT, ENDOFCHAIN, FATSECT, NOSTREAM = 0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD, 0xFFFFFFFF


def _dir_entry(name: str, kind: int, child: int, right: int, start: int, size: int) -> bytes:
    encoded = name.encode("utf-16-le") + b"\0\0" if name else b""
    return struct.pack(
        "<64sHBBIII16sIQQIQ",
        encoded.ljust(64, b"\0"),
        len(encoded),
        kind,
        1,  # black
        NOSTREAM,
        right,
        child,
        b"\0" * 16,
        0,
        0,
        0,
        start,
        size,
    )


def build(streams: list[tuple[str, bytes]]) -> bytes:
    """A CFB file holding ``streams`` (at most 3) in its root storage."""
    assert 1 <= len(streams) <= 3
    padded = [(n, d.ljust(MIN_STREAM, b"\0")) for n, d in streams]
    fat = [FATSECT, ENDOFCHAIN]  # sector 0: FAT, sector 1: directory
    starts = []
    data = b""
    for _, body in padded:
        count = -(-len(body) // SECTOR)
        first = len(fat)
        starts.append(first)
        fat += [first + i + 1 for i in range(count - 1)] + [ENDOFCHAIN]
        data += body.ljust(count * SECTOR, b"\0")
    assert len(fat) <= SECTOR // 4
    fat += [FREESECT] * (SECTOR // 4 - len(fat))
    entries = [_dir_entry("Root Entry", 5, 1, NOSTREAM, ENDOFCHAIN, 0)]
    for i, ((name, _), (_, body), start) in enumerate(zip(streams, padded, starts, strict=True)):
        right = i + 2 if i + 1 < len(streams) else NOSTREAM
        entries.append(_dir_entry(name, 2, NOSTREAM, right, start, len(body)))
    while len(entries) < 4:
        entries.append(_dir_entry("", 0, NOSTREAM, NOSTREAM, 0, 0))
    header = struct.pack(
        "<8s16sHHHHH6sIIIIIIIII",
        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1",
        b"\0" * 16,
        0x003E,
        3,
        0xFFFE,
        9,
        6,
        b"\0" * 6,
        0,  # directory sectors (0 in version 3)
        1,  # FAT sectors
        1,  # first directory sector
        0,
        MIN_STREAM,
        ENDOFCHAIN,  # first mini FAT sector
        0,
        ENDOFCHAIN,  # first DIFAT sector
        0,
    )
    difat = struct.pack("<109I", 0, *([FREESECT] * 108))
    header += difat
    assert len(header) == SECTOR
    return header + struct.pack(f"<{SECTOR // 4}I", *fat) + b"".join(entries) + data

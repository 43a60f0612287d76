"""The structure of a ZIP file, read by ferry's own code (pure: bytes in, values out).

Python's zipfile trusts what it reads: 3.11 happily reads overlapping entries (one local
header shared by many central-directory records, a "better zip bomb", CPython gh-109858) and
decides by declared sizes. Here every record is checked before anything is decompressed:

- the end-of-central-directory record (EOCD) must be the last thing in the file (its comment
  length accounts for every trailing byte) and no data may come before the first entry;
- every central record must point at a local header with the same name, and the spans
  ``[local header, end of data + descriptor)`` of all entries must not overlap each other or
  the central directory;
- ZIP64 is read for sizes and offsets of single entries; an archive that needs the ZIP64 end
  record (more than 65,535 entries or offsets beyond 4 GiB) is beyond every ferry limit.

:func:`embedded_eocd` finds a structurally valid EOCD anywhere in a buffer: the sign of a ZIP
glued to another format (a polyglot), which zip tools would open.
"""

from __future__ import annotations

import dataclasses
import itertools
import struct
from dataclasses import dataclass

from ferry.content.base import Reject

EOCD_SIG = b"PK\x05\x06"
CENTRAL_SIG = b"PK\x01\x02"
LOCAL_SIG = b"PK\x03\x04"
DESCRIPTOR_SIG = b"PK\x07\x08"
EOCD_SIZE = 22
CENTRAL_SIZE = 46
LOCAL_SIZE = 30
MAX_COMMENT = 0xFFFF
ZIP64_EXTRA = 0x0001
FLAG_ENCRYPTED = 0x0001
FLAG_DESCRIPTOR = 0x0008
FLAG_STRONG_ENCRYPTION = 0x0040
FLAG_UTF8 = 0x0800
METHOD_AES = 99
S_IFMT = 0o170000
S_IFLNK = 0o120000
S_IFREG = 0o100000
S_IFDIR = 0o040000
UNIX = 3

_EOCD = struct.Struct("<4s4H2LH")
_CENTRAL = struct.Struct("<4s6H3L5H2L")
_LOCAL = struct.Struct("<4s5H3L2H")


@dataclass(frozen=True)
class Entry:
    name: str
    raw_name: bytes
    flags: int
    method: int
    crc: int
    csize: int
    usize: int
    offset: int  # of the local header
    data_start: int
    span_end: int  # end of the data and its descriptor
    external_attr: int
    create_system: int
    date_time: tuple[int, int, int, int, int, int] = (1980, 1, 1, 0, 0, 0)
    local_name: bytes = b""

    @property
    def is_dir(self) -> bool:
        mode = self.external_attr >> 16
        if self.create_system == UNIX and mode & S_IFMT == S_IFDIR:
            return True
        return self.name.endswith("/")

    @property
    def is_symlink(self) -> bool:
        return self.create_system == UNIX and (self.external_attr >> 16) & S_IFMT == S_IFLNK

    @property
    def is_special(self) -> bool:
        """A device, FIFO or socket (only Unix-made archives can say so)."""
        fmt = (self.external_attr >> 16) & S_IFMT
        return self.create_system == UNIX and fmt not in (0, S_IFREG, S_IFDIR, S_IFLNK)

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & (FLAG_ENCRYPTED | FLAG_STRONG_ENCRYPTION)) or (
            self.method == METHOD_AES
        )


@dataclass(frozen=True)
class Directory:
    entries: tuple[Entry, ...]
    cd_offset: int
    eocd_offset: int


def _date_time(dos_date: int, dos_time: int) -> tuple[int, int, int, int, int, int]:
    """A valid zipfile date_time from DOS fields (nonsense becomes 1980-01-01)."""
    year, month, day = 1980 + (dos_date >> 9), (dos_date >> 5) & 15, dos_date & 31
    hour, minute, second = dos_time >> 11, (dos_time >> 5) & 63, (dos_time & 31) * 2
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 60):
        return (1980, 1, 1, 0, 0, 0)
    return (year, month, day, hour, minute, second)


def _decode_name(raw: bytes, flags: int) -> str:
    if flags & FLAG_UTF8:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Reject("MALFORMED", "an archive entry name is not valid UTF-8") from None
    for codec in ("utf-8", "gb18030"):  # Chinese Windows tools write GBK without the flag
        try:
            return raw.decode(codec)
        except UnicodeDecodeError:
            continue
    return raw.decode("cp437")


def _eocd_at(buf: bytes, pos: int) -> tuple[int, int, int, int] | None:
    """(entries, cd_size, cd_offset, comment_len) if a plausible EOCD starts at ``pos``."""
    if pos + EOCD_SIZE > len(buf):
        return None
    sig, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, comment = _EOCD.unpack_from(buf, pos)
    if sig != EOCD_SIG or disk != 0 or cd_disk != 0 or n_disk != n_total:
        return None
    if cd_size > pos or pos + EOCD_SIZE + comment > len(buf):
        return None
    return n_total, cd_size, cd_offset, comment


def _find_eocd(buf: bytes) -> int | None:
    start = max(0, len(buf) - EOCD_SIZE - MAX_COMMENT)
    pos = buf.rfind(EOCD_SIG, start)
    while pos >= 0:
        if _eocd_at(buf, pos) is not None:
            return pos
        pos = buf.rfind(EOCD_SIG, start, pos)
    return None


def embedded_eocd(buf: bytes, skip_end: int | None = None) -> int | None:
    """Offset of a structurally valid EOCD anywhere in ``buf`` (its central directory must
    start with a central record), ignoring one found at ``skip_end`` (the buffer's own)."""
    pos = buf.find(EOCD_SIG)
    while pos >= 0:
        found = _eocd_at(buf, pos)
        if found is not None and pos != skip_end:
            n_total, cd_size, _, _ = found
            cd_start = pos - cd_size
            if (n_total == 0 and cd_size == 0) or buf[cd_start : cd_start + 4] == CENTRAL_SIG:
                return pos
        pos = buf.find(EOCD_SIG, pos + 1)
    return None


def _zip64_values(extra: bytes, need: list[str], values: dict[str, int]) -> None:
    i = 0
    while i + 4 <= len(extra):
        tag, size = struct.unpack_from("<2H", extra, i)
        body = extra[i + 4 : i + 4 + size]
        if tag == ZIP64_EXTRA:
            j = 0
            for key in need:
                if j + 8 > len(body):
                    raise Reject("MALFORMED", "a ZIP64 field of an archive entry is cut short")
                values[key] = struct.unpack_from("<Q", body, j)[0]
                j += 8
            return
        i += 4 + size
    if need:
        raise Reject("MALFORMED", "an archive entry lacks its ZIP64 sizes")


def read_directory(buf: bytes, max_entries: int) -> Directory:
    """Parse and check the whole structure; raises Reject (MALFORMED, POLYGLOT,
    LIMIT_EXCEEDED, ARCHIVE_BOMB) before anything is decompressed."""
    eocd = _find_eocd(buf)
    if eocd is None:
        raise Reject("MALFORMED", "not a complete ZIP archive (no end of central directory)")
    found = _eocd_at(buf, eocd)
    assert found is not None
    n_total, cd_size, cd_offset, comment = found
    if n_total == 0xFFFF or cd_offset == 0xFFFFFFFF or cd_size == 0xFFFFFFFF:
        raise Reject("LIMIT_EXCEEDED", "a ZIP64 archive (over 65,535 entries or 4 GiB)")
    if eocd + EOCD_SIZE + comment != len(buf):
        raise Reject("POLYGLOT", "data follows the end of the ZIP archive")
    if cd_offset + cd_size != eocd:
        raise Reject("POLYGLOT", "data comes before the ZIP archive or between its parts")
    if n_total > max_entries:
        raise Reject("LIMIT_EXCEEDED", f"the archive has {n_total} entries (at most {max_entries})")
    entries: list[Entry] = []
    pos = cd_offset
    for _ in range(n_total):
        if pos + CENTRAL_SIZE > eocd or buf[pos : pos + 4] != CENTRAL_SIG:
            raise Reject("MALFORMED", "the archive's central directory is damaged")
        (
            _,
            made_by,
            _need,
            flags,
            method,
            dos_time,
            dos_date,
            crc,
            csize,
            usize,
            n_len,
            x_len,
            c_len,
            _disk,
            _internal,
            external,
            offset,
        ) = _CENTRAL.unpack_from(buf, pos)
        raw_name = bytes(buf[pos + CENTRAL_SIZE : pos + CENTRAL_SIZE + n_len])
        extra = bytes(buf[pos + CENTRAL_SIZE + n_len : pos + CENTRAL_SIZE + n_len + x_len])
        pos += CENTRAL_SIZE + n_len + x_len + c_len
        if pos > eocd:
            raise Reject("MALFORMED", "the archive's central directory is damaged")
        values = {"usize": usize, "csize": csize, "offset": offset}
        need = [k for k in ("usize", "csize", "offset") if values[k] == 0xFFFFFFFF]
        if need:
            _zip64_values(extra, need, values)
        entry = _with_local(
            buf,
            raw_name,
            flags,
            method,
            crc,
            values,
            external,
            made_by >> 8,
            cd_offset,
        )
        entries.append(dataclasses.replace(entry, date_time=_date_time(dos_date, dos_time)))
    if pos != eocd:
        raise Reject("MALFORMED", "the archive's central directory has trailing bytes")
    _check_spans(entries, cd_offset)
    for entry in entries:  # after the overlap check: a shared header is the better diagnosis
        if entry.local_name != entry.raw_name:
            raise Reject("MALFORMED", "an archive entry has different names in its two headers")
    return Directory(tuple(entries), cd_offset, eocd)


def _with_local(  # noqa: PLR0917  # the fields of one central record
    buf: bytes,
    raw_name: bytes,
    flags: int,
    method: int,
    crc: int,
    values: dict[str, int],
    external: int,
    create_system: int,
    cd_offset: int,
) -> Entry:
    offset, csize = values["offset"], values["csize"]
    if offset + LOCAL_SIZE > cd_offset:
        raise Reject("MALFORMED", "an archive entry points outside the archive")
    sig, _need, l_flags, _m, _t, _d, _crc, _cs, _us, n_len, x_len = _LOCAL.unpack_from(buf, offset)
    if sig != LOCAL_SIG:
        raise Reject("MALFORMED", "an archive entry points at no local header")
    local_name = bytes(buf[offset + LOCAL_SIZE : offset + LOCAL_SIZE + n_len])
    if (l_flags ^ flags) & (FLAG_ENCRYPTED | FLAG_STRONG_ENCRYPTION):
        raise Reject("MALFORMED", "an archive entry's headers disagree about encryption")
    data_start = offset + LOCAL_SIZE + n_len + x_len
    span_end = data_start + csize
    if flags & FLAG_DESCRIPTOR:
        zip64 = values["usize"] > 0xFFFFFFFF or csize > 0xFFFFFFFF
        size = 24 if zip64 else 16
        has_sig = buf[span_end : span_end + 4] == DESCRIPTOR_SIG
        span_end += size if has_sig else size - 4
    if span_end > cd_offset:
        raise Reject("MALFORMED", "an archive entry's data runs into the central directory")
    return Entry(
        name=_decode_name(raw_name, flags),
        raw_name=raw_name,
        flags=flags,
        method=method,
        crc=crc,
        csize=csize,
        usize=values["usize"],
        offset=offset,
        data_start=data_start,
        span_end=span_end,
        external_attr=external,
        create_system=create_system,
        local_name=local_name,
    )


def _check_spans(entries: list[Entry], cd_offset: int) -> None:
    ordered = sorted(entries, key=lambda e: e.offset)
    if ordered and ordered[0].offset != 0:
        raise Reject("POLYGLOT", "data comes before the first entry of the ZIP archive")
    for a, b in itertools.pairwise(ordered):
        if b.offset < a.span_end:
            raise Reject(
                "ARCHIVE_BOMB",
                "archive entries overlap (several entries share the same data)",
            )

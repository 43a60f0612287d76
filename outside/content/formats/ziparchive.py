"""ZIP: a container only. Every member goes through the whole pipeline; any refusal refuses
the whole archive (no partial delivery).

Before anything is decompressed (:mod:`outside.content.zipstruct` has read and checked the
structure: trailing or leading data, overlapping entries):

- nesting: an archive at depth ``archive_depth`` or deeper is ARCHIVE_DEPTH;
- entries beyond ``archive_entries``: LIMIT_EXCEEDED;
- absolute paths, ``..``, drive letters, backslashes, symbolic links, device files, two entries
  for one path: ARCHIVE_TRAVERSAL; every path component must also pass the file-name policy;
- an encrypted entry: ENCRYPTED; a compression method other than stored or deflate: MALFORMED;
- declared sizes beyond ``archive_expanded`` in total, a member ratio above ``archive_ratio``
  (members over 1 MiB), or a stored entry whose two sizes differ: ARCHIVE_BOMB.

Members are then inflated one at a time into files with a byte budget equal to their declared
size: a member that expands beyond what its header says (a lying header) is ARCHIVE_BOMB,
one that ends early or fails its CRC is MALFORMED. Memory stays at one 64 KiB piece.

The delivered archive is rebuilt: the delivered bytes of each member under its delivered name
(its folders kept), deflated, with the original timestamps, and nothing else (no comments,
extra fields, gaps or empty folders).
"""

from __future__ import annotations

import mmap
import shutil
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from ferry.content.base import Action, Context, FormatResult, Reject
from outside.content import names, zipstruct

# A member smaller than this is not checked for its ratio (small, very compressible text is
# normal and harmless).
RATIO_MIN_BYTES = 1024 * 1024
CHUNK = 64 * 1024


class _MemberContext(Protocol):
    workdir: Path

    def member_file(self, name: str, path: Path) -> tuple[Path, dict[str, Any]]: ...


def _path_parts(entry: zipstruct.Entry) -> list[str]:
    raw = entry.name
    if "\\" in raw:
        raise Reject("ARCHIVE_TRAVERSAL", f"the archive path {raw!r} contains a backslash")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        raise Reject("ARCHIVE_TRAVERSAL", f"the archive path {raw!r} is absolute")
    parts = raw.rstrip("/").split("/") if raw.rstrip("/") else []
    if not parts:
        raise Reject("ARCHIVE_TRAVERSAL", "an archive entry has an empty path")
    for part in parts:
        if part in ("..", "."):
            raise Reject("ARCHIVE_TRAVERSAL", f"the archive path {raw!r} leaves its folder")
        if not part:
            raise Reject("ARCHIVE_TRAVERSAL", f"the archive path {raw!r} has an empty folder")
        try:
            names.check_name(part)
        except Reject as exc:
            raise Reject("FILENAME_POLICY", f"archive path {raw!r}: {exc.message}") from None
    return parts


def _gate(entries: tuple[zipstruct.Entry, ...], ctx: Context, archive_size: int) -> None:
    limits = ctx.policy.limits
    seen: dict[str, str] = {}
    total = 0
    for entry in entries:
        if entry.is_symlink:
            raise Reject("ARCHIVE_TRAVERSAL", f"{entry.name!r} is a symbolic link")
        if entry.is_special:
            raise Reject("ARCHIVE_TRAVERSAL", f"{entry.name!r} is a device or special file")
        parts = _path_parts(entry)
        key = "/".join(parts).casefold()
        if key in seen:
            raise Reject("ARCHIVE_TRAVERSAL", f"two entries write the same path {entry.name!r}")
        seen[key] = entry.name
        if entry.encrypted:
            raise Reject("ENCRYPTED", f"archive entry {entry.name!r} is encrypted")
        if entry.is_dir:
            if entry.usize:
                raise Reject("MALFORMED", f"the folder entry {entry.name!r} has content")
            continue
        if entry.method not in (0, 8):
            raise Reject(
                "MALFORMED",
                f"archive entry {entry.name!r} uses compression method {entry.method} "
                "(only stored and deflate are accepted)",
            )
        if entry.method == 0 and entry.csize != entry.usize:
            raise Reject("ARCHIVE_BOMB", f"archive entry {entry.name!r} declares two sizes")
        if entry.usize >= RATIO_MIN_BYTES and entry.usize > limits.archive_ratio * max(
            entry.csize, 1
        ):
            raise Reject(
                "ARCHIVE_BOMB",
                f"archive entry {entry.name!r} expands {entry.usize // max(entry.csize, 1)} "
                f"times (at most {limits.archive_ratio})",
            )
        total += entry.usize
    if total > limits.archive_expanded:
        raise Reject(
            "ARCHIVE_BOMB",
            f"the archive expands to {total} bytes (at most {limits.archive_expanded})",
        )
    if total >= RATIO_MIN_BYTES and total > limits.archive_ratio * max(archive_size, 1):
        raise Reject("ARCHIVE_BOMB", "the archive expands more than the allowed ratio")


def _inflate_to(buf: Any, entry: zipstruct.Entry, path: Path) -> None:
    """Write the member's bytes to ``path``, never more than its declared size."""
    budget = entry.usize
    crc = 0
    written = 0
    inflater = zlib.decompressobj(-15) if entry.method == 8 else None
    pos, end = entry.data_start, entry.data_start + entry.csize
    with path.open("wb") as out:
        while pos < end or (inflater is not None and inflater.unconsumed_tail):
            if inflater is None:
                chunk = bytes(buf[pos : min(end, pos + CHUNK)])
                pos += len(chunk)
            else:
                feed = inflater.unconsumed_tail
                if not feed:
                    feed = bytes(buf[pos : min(end, pos + CHUNK)])
                    pos += len(feed)
                try:
                    chunk = inflater.decompress(feed, budget - written + 1)
                except zlib.error:
                    raise Reject("MALFORMED", f"archive entry {entry.name!r} is damaged") from None
            written += len(chunk)
            if written > budget:
                raise Reject(
                    "ARCHIVE_BOMB",
                    f"archive entry {entry.name!r} expands beyond the size its header declares",
                )
            crc = zlib.crc32(chunk, crc)
            out.write(chunk)
            if inflater is not None and inflater.eof:
                break
    if inflater is not None and (not inflater.eof or inflater.unused_data or pos < end):
        raise Reject("MALFORMED", f"archive entry {entry.name!r} does not end where declared")
    if written != budget:
        raise Reject("MALFORMED", f"archive entry {entry.name!r} is shorter than declared")
    if crc != entry.crc:
        raise Reject("MALFORMED", f"archive entry {entry.name!r} fails its checksum")


def _unique(path: str, taken: set[str]) -> str:
    if path.casefold() not in taken:
        taken.add(path.casefold())
        return path
    stem, dot, ext = path.rpartition(".")
    if not dot:
        stem, ext = path, ""
    for n in range(2, 100_000):
        candidate = f"{stem} ({n}).{ext}" if ext else f"{stem} ({n})"
        if candidate.casefold() not in taken:
            taken.add(candidate.casefold())
            return candidate
    raise Reject("LIMIT_EXCEEDED", "too many members with the same name")


def sanitize(src: Path, dst: Path, ctx: Context) -> FormatResult:
    limits = ctx.policy.limits
    if ctx.depth >= limits.archive_depth:
        raise Reject(
            "ARCHIVE_DEPTH",
            f"archives nested more than {limits.archive_depth} levels deep are not accepted",
        )
    members: _MemberContext = ctx  # type: ignore[assignment]  # the engine's FileContext
    size = src.stat().st_size
    with src.open("rb") as fh:
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    try:
        directory = zipstruct.read_directory(buf, limits.archive_entries)  # type: ignore[arg-type]
        _gate(directory.entries, ctx, size)
        files = [e for e in directory.entries if not e.is_dir]
        dropped = len(directory.entries) - len(files)
        work = members.workdir / f"zip{ctx.depth}"
        work.mkdir(exist_ok=True)
        taken: set[str] = set()
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, allowZip64=False) as out:
            for i, entry in enumerate(sorted(files, key=lambda e: e.offset)):
                raw = work / f"{i}{PurePosixPath(entry.name).suffix[:16]}"
                _inflate_to(buf, entry, raw)
                delivered, report = members.member_file(entry.name, raw)
                folder = str(PurePosixPath(entry.name).parent)
                arcname = report["delivered_name"]
                arcname = _unique(arcname if folder == "." else f"{folder}/{arcname}", taken)
                zinfo = zipfile.ZipInfo(arcname, date_time=entry.date_time)
                zinfo.compress_type = zipfile.ZIP_DEFLATED
                zinfo.external_attr = 0o644 << 16
                with delivered.open("rb") as fh, out.open(zinfo, "w") as sink:
                    shutil.copyfileobj(fh, sink, CHUNK)
                raw.unlink(missing_ok=True)
                for leftover in work.parent.glob(f"m{ctx.depth + 1}-*"):
                    shutil.rmtree(leftover, ignore_errors=True)
    finally:
        if isinstance(buf, mmap.mmap):
            buf.close()
    actions = [Action("normalised", "ZIP archive rebuilt from its checked members")]
    info = {"members": len(files), "folders": dropped, "depth": ctx.depth}
    return FormatResult("zip", cleaned=True, actions=actions, info=info)

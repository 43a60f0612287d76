"""The audit log's files as the verifier, the writer and the mirrors read them.

Nothing but a regular file is opened: :func:`open_regular` (to read) and :func:`open_append`
(to append, creating it) look at the name first without following a symbolic link and
refuse anything else (a symbolic link, a FIFO, a socket, a device, a directory) with
:class:`UnsafeFile`, without opening it, then open without following a link and without
blocking, and check that what they opened is the regular file they looked at.

``checkpoints.log`` can hold any number of notes (the inside's mirror of the outside's log holds
what a compromised outside sent), so nothing here keeps them all: :class:`NoteFile` reads the
file one note at a time, and for :mod:`ferry.audit.verify`, which reads the notes a few times,
reads them again up to the end of the last whole note the first read found, checking that
those bytes are the same (a hash): a live writer only ever appends, or cuts back a
half-written note while it rides out a full disk, which is past that end. :class:`NoteIndex`
keeps only what verify needs while it scans the records: a few counts, and the notes that are
out of size order (at most :data:`MAX_UNORDERED_NOTES`).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.audit.merkle import (
    MAX_NOTE_LINE,
    MAX_NOTE_SIGNATURES,
    SIG_PREFIX,
    Note,
    NoteFormatError,
    NoteReader,
)

# Notes smaller than a note before them that verify compares with the records. Such a note
# is a CHECKPOINT_REGRESSION whatever its root; keeping the first ones keeps the report the
# same as for an in-order file (which notes match), and the bound keeps memory bounded.
MAX_UNORDERED_NOTES = 1000
_READ_CHUNK = 64 * 1024  # what a read of checkpoints.log takes at once

_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
# What open(2) says of a name that is no longer the regular file looked at: a symbolic link
# (ELOOP, with O_NOFOLLOW), a socket or a FIFO without a reader (ENXIO), a device without a
# driver (ENODEV), a directory opened to write (EISDIR).
_NOT_REGULAR = frozenset({errno.ELOOP, errno.ENXIO, errno.ENODEV, errno.EISDIR})


class UnsafeFile(OSError):
    """A log file is a symbolic link, a FIFO, a socket or another non-regular file, or not
    the file expected."""


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
        (stat.S_ISDIR, "a directory"),
    )
    return next((name for test, name in kinds if test(mode)), "of an unknown type")


def _unsafe(path: Path, mode: int) -> UnsafeFile:
    if stat.S_ISLNK(mode):
        return UnsafeFile(f"{path.name} is a symbolic link, not a regular file")
    return UnsafeFile(f"{path.name} is not a regular file ({_kind(mode)})")


def not_regular(path: Path) -> UnsafeFile | None:
    """Why ``path`` is not read or written (a symbolic link is not followed): None if it is
    a regular file or nothing."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    return None if stat.S_ISREG(mode) else _unsafe(path, mode)


def _open(path: Path, flags: int) -> int:
    try:
        before: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise
        before = None
    if before is not None and not stat.S_ISREG(before.st_mode):
        raise _unsafe(path, before.st_mode)  # (not opened: a FIFO or a device never is)
    try:
        fd = os.open(path, flags | _OPEN, 0o600)
    except OSError as exc:
        if exc.errno in _NOT_REGULAR:
            raise UnsafeFile(f"{path.name} was replaced as it was opened") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _unsafe(path, st.st_mode)
        if before is not None and (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise UnsafeFile(f"{path.name} was replaced as it was opened")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path: Path, same_as: int | None = None) -> int:
    """A read-only descriptor of the regular file ``path``.

    Raises :class:`UnsafeFile` for anything but a regular file (which is not opened), or if
    ``same_as`` (an open descriptor) is not the same file, and :class:`FileNotFoundError`
    if there is none.
    """
    fd = _open(path, os.O_RDONLY)
    if same_as is not None:
        st, other = os.fstat(fd), os.fstat(same_as)
        if (st.st_dev, st.st_ino) != (other.st_dev, other.st_ino):
            os.close(fd)
            raise UnsafeFile(f"{path.name} was replaced while it was being opened")
    return fd


def open_append(path: Path) -> int:
    """A descriptor to append to the regular file ``path``, created (mode 0600) if there is
    none. Raises :class:`UnsafeFile` for anything but a regular file, which is not opened (a
    FIFO would block the writer, a device or a socket is no place for a log)."""
    return _open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)


class _Window(io.RawIOBase):
    """The first ``limit`` bytes of a descriptor (all of it if None), from ``start`` on, read
    with pread."""

    def __init__(self, fd: int, limit: int | None, start: int = 0) -> None:
        super().__init__()
        self._fd = fd
        self._limit = limit
        self._pos = start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]  # (typeshed: Buffer)
        n = len(buffer)
        if self._limit is not None:
            n = min(n, self._limit - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._fd, n, self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


# Line starts whose hash the first pass keeps: an incomplete final note starts at one of the
# last lines read (it has at most MAX_NOTE_SIGNATURES + 5 lines).
_MARKS = MAX_NOTE_SIGNATURES + 8


class _Pass:
    """One read of checkpoints.log from its start: lines as the note reader asks for them,
    hashed as they are handed out (with ``marks``, the hash at each of the last line starts
    is kept too)."""

    def __init__(self, fd: int, limit: int | None, *, marks: bool = False, start: int = 0) -> None:
        self._stream = io.BufferedReader(_Window(fd, limit, start), _READ_CHUNK)
        self.hash = hashlib.sha256()
        self.read = 0
        self._marks: deque[tuple[int, Any]] | None = deque(maxlen=_MARKS) if marks else None

    def readline(self, size: int = -1, /) -> bytes:
        if self._marks is not None:
            self._marks.append((self.read, self.hash.copy()))
        data = self._stream.readline(size)
        self.hash.update(data)
        self.read += len(data)
        return data

    def digest_at(self, offset: int) -> bytes | None:
        """The hash of the bytes before ``offset``, a line start among the last read (or the
        end): None if it is not one."""
        if offset == self.read:
            return self.hash.digest()
        marks = self._marks or ()
        return next((h.digest() for at, h in marks if at == offset), None)

    def drain(self) -> None:
        while self.readline(_READ_CHUNK):
            pass


class NoteFile:
    """``checkpoints.log``, opened once.

    :meth:`first_pass` reads it to the end of the notes (or to the malformed or torn one).
    :meth:`again` reads the notes again, as often as asked, from the same descriptor, up to
    where the first pass found them whole (an incomplete final note, which a live writer may
    cut back or complete meanwhile, is not read again), and :attr:`changed` turns true if
    those bytes are not the same any more (nothing read from them then holds).
    """

    def __init__(self, path: Path, same_as: int | None = None) -> None:
        self.fd = open_regular(path, same_as)
        self._limit: int | None = None
        self._digest = b""
        self.changed = False
        self.end: NotesEnd | None = None  # how the notes ended (after the first pass)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> NoteFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def first_pass(self) -> Iterator[Note]:
        """The notes, in file order; afterwards :attr:`end` says how the file ended."""
        source = _Pass(self.fd, None, marks=True)
        reader = NoteReader(source)
        yield from reader
        self.end = NotesEnd(reader.size, reader.torn_at, reader.torn, reader.error)
        digest = None if reader.torn_at is None else source.digest_at(reader.torn_at)
        if digest is not None:
            self._limit, self._digest = reader.torn_at, digest
        else:
            self._limit, self._digest = source.read, source.hash.digest()

    def again(self) -> Generator[Note, None, None]:
        """The notes of the first pass, read again (the first pass must have run to its end).
        However far it is iterated, the rest of the bytes are read and compared on closing."""
        assert self._limit is not None, "the first pass has not been read to its end"
        source = _Pass(self.fd, self._limit)
        try:
            yield from NoteReader(source)
        finally:
            source.drain()
            if source.read != self._limit or source.hash.digest() != self._digest:
                self.changed = True

    def later(self) -> LaterNotes:
        """The notes stored after those the first pass found whole (see :class:`LaterNotes`)."""
        assert self._limit is not None, "the first pass has not been read to its end"
        return LaterNotes(self.fd, self._limit)


class LaterNotes:
    """The notes a live writer stored in checkpoints.log after those the first pass read
    whole (or an incomplete final note it has since completed), read from the same
    descriptor as verify's scan reaches the sizes they cover: one note held at a time.

    :meth:`at` reads on to a size. At the end of what is stored, :attr:`ended` turns true and
    nothing more is read until :meth:`resume`, which goes on once from the end of the last
    whole note read (what the writer stored meanwhile). Notes smaller than one read before
    them are passed over (a writer only stores larger ones). :meth:`one` reads the note at an
    offset again. Offsets are from the start of the file.
    """

    def __init__(self, fd: int, start: int) -> None:
        self._fd = fd
        self._at = start  # just past the last whole note read
        self._start = start
        self._reader: NoteReader | None = None
        self._head: Note | None = None
        self.ended = False

    def _source(self, start: int) -> io.BufferedReader:
        return io.BufferedReader(_Window(self._fd, None, start), _READ_CHUNK)

    def _past_signatures(self) -> None:
        """Signature lines where a note should begin belong to the note before it: the first
        pass found it whole with fewer (a rotation signs with two keys, and a read can end
        between their lines). One read; at most a note's worth of them."""
        data = os.pread(self._fd, MAX_NOTE_SIGNATURES * (MAX_NOTE_LINE + 1), self._at)
        pos = 0
        for _ in range(MAX_NOTE_SIGNATURES):
            nl = data.find(b"\n", pos)
            if not data.startswith(SIG_PREFIX, pos) or nl < 0:
                break
            pos = nl + 1
        self._at += pos

    def _next(self) -> Note | None:
        if self.ended:
            return None
        if self._reader is None:
            self._past_signatures()
            self._start = self._at
            self._reader = NoteReader(self._source(self._at), after_note=True)
        note = self._reader.next()
        if note is None:
            self.ended = True
            self._reader = None
            return None
        self._at = self._start + note.end
        return note

    def at(self, size: int) -> Iterator[tuple[int, Note]]:
        """(offset, note) of each note of ``size`` (asked in increasing order), reading on as
        far as it."""
        while True:
            if self._head is None:
                self._head = self._next()
                if self._head is None:
                    return
            found = self._head.checkpoint.size
            if found > size:
                return
            note, self._head = self._head, None
            if found == size:
                yield self._start + note.offset, note

    def one(self, offset: int) -> Note | None:
        """The note at ``offset`` (one :meth:`at` gave), read again."""
        return NoteReader(self._source(offset)).next()

    def resume(self) -> None:
        """Read on once more, past the end met before."""
        self.ended = False


@dataclass(frozen=True)
class NotesEnd:
    """How the notes of checkpoints.log ended, as :class:`~ferry.audit.merkle.ParsedNotes`
    says."""

    size: int  # bytes read: past the last note, or past the line of ``error``
    torn_at: int | None  # offset of an incomplete final note
    torn: bytes  # its bytes
    error: NoteFormatError | None  # the first malformed note


@dataclass(frozen=True, slots=True)
class _Unordered:
    root: bytes
    line: int
    offset: int


class NoteIndex:
    """What verify needs of ``checkpoints.log`` while it scans the records, in memory bounded
    whatever the file holds.

    Built by a first pass (counts, the largest size, the notes out of size order). During the
    scan, :meth:`at` gives the notes of each size the tree reaches, in increasing size order,
    from a second pass; the verifier names the note that stopped it (:meth:`mismatch`). After
    the scan, :meth:`notes` reads the notes again, each with whether it matched the records.
    :attr:`changed` says if the notes read again were not the bytes first read. The file is
    closed if the first pass fails.
    """

    def __init__(self, file: NoteFile | None) -> None:
        self._file = file
        self.count = 0
        self.top = 0  # the largest size
        self.first_origin: str | None = None
        self.end: NotesEnd | None = None
        self._unordered: dict[int, list[_Unordered]] = {}
        # Out-of-order notes past MAX_UNORDERED_NOTES, not compared with the records: how
        # many, the line of the first, and the smallest and largest of their sizes.
        self.dropped = 0
        self.dropped_line = 0
        self._dropped_sizes = (0, -1)
        self._cursor: Iterator[Note] | None = None
        self._head: Note | None = None
        self._cursor_max = 0
        self._lo: int | None = None  # the sizes compared with the records
        self._hi = -1
        self._mismatch: tuple[int, int] | None = None  # (size, offset) of a mismatching note
        if file is None:
            return
        try:
            self._first_pass(file)
        except BaseException:
            file.close()
            raise
        self.end = file.end

    def _first_pass(self, file: NoteFile) -> None:
        kept = 0
        for note in file.first_pass():
            self.count += 1
            size = note.checkpoint.size
            if self.first_origin is None:
                self.first_origin = note.checkpoint.origin
            if size >= self.top:
                self.top = size
            elif kept < MAX_UNORDERED_NOTES:
                kept += 1
                entry = _Unordered(note.checkpoint.root, note.line, note.offset)
                self._unordered.setdefault(size, []).append(entry)
            else:
                if not self.dropped:
                    self.dropped_line = note.line
                    self._dropped_sizes = (size, size)
                lo, hi = self._dropped_sizes
                self._dropped_sizes = (min(lo, size), max(hi, size))
                self.dropped += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    @property
    def changed(self) -> bool:
        """The file's notes were not the same bytes when read again: nothing read holds."""
        return self._file is not None and self._file.changed

    def later(self) -> LaterNotes | None:
        """The notes stored after those the first pass read (see :class:`LaterNotes`)."""
        if self._file is None or self.end is None:
            return None
        return self._file.later()

    def maybe_dropped(self, size: int) -> bool:
        """Whether a note of ``size`` may be among the out-of-order notes not compared with
        the records (its absence from the others then proves nothing)."""
        lo, hi = self._dropped_sizes
        return lo <= size <= hi

    # --- during the scan: sizes in increasing order ----------------------------------------

    def _next_in_order(self) -> Note | None:
        """The next note of the second pass that is not smaller than one before it."""
        if self._file is None:
            return None
        if self._cursor is None:
            self._cursor = self._file.again()
        for note in self._cursor:
            if note.checkpoint.size >= self._cursor_max:
                self._cursor_max = note.checkpoint.size
                return note
        return None

    def _head_from(self, size: int) -> Note | None:
        """The first in-order note not yet given whose size is at least ``size``."""
        if self._head is None:
            self._head = self._next_in_order()
        while self._head is not None and self._head.checkpoint.size < size:
            self._head = self._next_in_order()
        return self._head

    def has(self, size: int) -> bool:
        """Whether a note has this size, or may have (asked before the scan reaches it)."""
        head = self._head_from(size)
        in_order = head is not None and head.checkpoint.size == size
        return in_order or size in self._unordered or self.maybe_dropped(size)

    def at(self, size: int) -> Iterator[tuple[bytes, int, int]]:
        """(root, line, offset) of each note of ``size``, in file order: the scan is at
        ``size`` and asks each size once, in increasing order."""
        if self._lo is None:
            self._lo = size
        self._hi = size
        while (head := self._head_from(size)) is not None and head.checkpoint.size == size:
            self._head = None
            yield head.checkpoint.root, head.line, head.offset
        # (an unordered note follows, in the file, every in-order note of its size)
        for entry in self._unordered.pop(size, ()):
            yield entry.root, entry.line, entry.offset

    def mismatch(self, size: int, offset: int) -> None:
        """The note at ``offset`` does not match the records (and the scan stops)."""
        self._mismatch = (size, offset)

    def close_scan(self) -> None:
        """The scan is over: what it held of the notes is let go."""
        self._cursor, self._head = None, None
        self._unordered.clear()

    # --- after the scan ------------------------------------------------------------------------

    def notes(self) -> Iterator[tuple[Note, bool]]:
        """Every note in file order, with whether it matched the records."""
        if self._file is None:
            return
        top = unordered = 0
        for note in self._file.again():
            size = note.checkpoint.size
            compared = self._lo is not None and self._lo <= size <= self._hi
            if size < top:
                unordered += 1
                compared = compared and unordered <= MAX_UNORDERED_NOTES
            else:
                top = size
            if self._mismatch is not None and size == self._mismatch[0]:
                compared = compared and note.offset < self._mismatch[1]
            yield note, compared

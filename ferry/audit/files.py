"""The audit log's files as the verifier and the writer read them.

Every file of a log directory is opened without following a final symbolic link and without
blocking (a FIFO in a segment's or ``checkpoints.log``'s place must not hang the reader), and
only a regular file is read: :func:`open_regular` raises :class:`UnsafeFile` for anything else.

``checkpoints.log`` can hold any number of notes (the inside's mirror of the outside's log holds
what a compromised outside sent), so nothing here keeps them all: :class:`NoteFile` reads the
file in passes, one note at a time, each pass exactly the bytes the first pass read (and checks
that they did not change), and :class:`NoteIndex` keeps only what :mod:`ferry.audit.verify`
needs while it scans the records: a few counts, and the notes that are out of size order
(at most :data:`MAX_UNORDERED_NOTES`).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

from ferry.audit.merkle import Note, NoteFormatError, NoteReader

# Notes smaller than a note before them that verify compares with the records. Such a note
# is a CHECKPOINT_REGRESSION whatever its root; keeping the first ones keeps the report the
# same as for an in-order file (which notes match), and the bound keeps memory bounded.
MAX_UNORDERED_NOTES = 1000
_READ_CHUNK = 64 * 1024  # what a pass reads at once


class UnsafeFile(OSError):
    """A log file is a symbolic link, a FIFO or another non-regular file, or not the file
    expected."""


def open_regular(path: Path, same_as: int | None = None) -> int:
    """A read-only descriptor of the regular file ``path``.

    Opens without following a final symlink and without blocking, then checks the file type.
    Raises :class:`UnsafeFile` for anything but a regular file, or if ``same_as`` (an open
    descriptor) is not the same file, and :class:`FileNotFoundError` if there is none.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(f"{path.name} is a symbolic link, not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(f"{path.name} is not a regular file")
        if same_as is not None:
            other = os.fstat(same_as)
            if (st.st_dev, st.st_ino) != (other.st_dev, other.st_ino):
                raise UnsafeFile(f"{path.name} was replaced while it was being opened")
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_regular_fd(fd: int, path: Path) -> None:
    """Raise :class:`UnsafeFile` unless ``fd`` (``path``, opened) is a regular file."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise UnsafeFile(f"{path.name} is not a regular file")


class _Window(io.RawIOBase):
    """The first ``limit`` bytes of a descriptor (all of it if None), read with pread."""

    def __init__(self, fd: int, limit: int | None) -> None:
        super().__init__()
        self._fd = fd
        self._limit = limit
        self._pos = 0

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


class _Pass:
    """One read of checkpoints.log from its start: lines as the note reader asks for them,
    hashed as they are handed out."""

    def __init__(self, fd: int, limit: int | None) -> None:
        self._stream = io.BufferedReader(_Window(fd, limit), _READ_CHUNK)
        self.hash = hashlib.sha256()
        self.read = 0

    def readline(self, size: int = -1, /) -> bytes:
        data = self._stream.readline(size)
        self.hash.update(data)
        self.read += len(data)
        return data

    def drain(self) -> None:
        while self.readline(_READ_CHUNK):
            pass


class NoteFile:
    """``checkpoints.log``, opened once and read in passes.

    The first pass reads to the end of the notes (or to the malformed or torn one); each later
    pass reads exactly those bytes again, so that a writer appending meanwhile changes nothing,
    and :attr:`changed` turns true if they are not the same bytes any more.
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
        source = _Pass(self.fd, None)
        reader = NoteReader(source)
        yield from reader
        self._limit = source.read
        self._digest = source.hash.digest()
        self.end = NotesEnd(reader.size, reader.torn_at, reader.torn, reader.error)

    def again(self) -> Generator[Note, None, None]:
        """The notes of the first pass, read again (the first pass must have run to its end).
        However far it is iterated, the rest of the bytes are read and compared on closing."""
        assert self._limit is not None, "the first pass has not been read to its end"
        source = _Pass(self.fd, self._limit)
        try:
            yield from NoteReader(source)
        finally:
            source.drain()
            if source.hash.digest() != self._digest:
                self.changed = True


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
    from a second pass; the verifier says what it compared (:meth:`compared`, and
    :meth:`mismatch` for the note that stopped it). After the scan, :meth:`notes` reads the
    file again, each note with whether it matched the records.
    """

    def __init__(self, file: NoteFile | None) -> None:
        self._file = file
        self.count = 0
        self.top = 0  # the largest size
        self.first_origin: str | None = None
        self.end: NotesEnd | None = None
        self._unordered: dict[int, list[_Unordered]] = {}
        self._cursor: Generator[Note, None, None] | None = None
        self._head: Note | None = None
        self._cursor_max = 0
        self._lo: int | None = None  # the sizes compared with the records
        self._hi = -1
        self._mismatch: tuple[int, int] | None = None  # (size, offset) of a mismatching note
        if file is None:
            return
        kept = 0
        for note in file.first_pass():
            self.count += 1
            size = note.checkpoint.size
            if self.first_origin is None:
                self.first_origin = note.checkpoint.origin
            if size < self.top:
                if kept < MAX_UNORDERED_NOTES:
                    kept += 1
                    entry = _Unordered(note.checkpoint.root, note.line, note.offset)
                    self._unordered.setdefault(size, []).append(entry)
            else:
                self.top = size
        self.end = file.end

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    @property
    def changed(self) -> bool:
        """The file's bytes changed between two passes: nothing read from it holds."""
        return self._file is not None and self._file.changed

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
        """Whether a note has this size (asked before the scan reaches it)."""
        head = self._head_from(size)
        return (head is not None and head.checkpoint.size == size) or size in self._unordered

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
        """The scan is over: read the rest of the second pass (and compare its bytes)."""
        if self._cursor is not None:
            self._cursor.close()
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

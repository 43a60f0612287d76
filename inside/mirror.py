"""The inside's mirror of the outside's audit log, and the witness of its checkpoints.

Pieces arrive as verified objects of kind ``audit`` (``outside/mirror.py``): a file name
(a segment or ``checkpoints.log``) and a byte offset. :meth:`AuditMirror.receive` appends a
piece that starts where the mirror file ends (fsynced), keeps one that starts beyond the end
in memory until the gap is filled (bounded), and checks that one overlapping what the mirror
already has repeats it byte for byte (a repeat copy). The mirror is thus byte-identical to
the outside's log, and ``ferry audit verify`` works on it with the outside's audit key.

Each new checkpoint in the mirrored ``checkpoints.log`` is then witnessed: its signature by
the configured outside audit key, its origin (the same log), its size (never smaller than
the last), and its root: the mirrored records up to its size must hash to it. Since every
checkpoint is checked against the same growing tree, a checkpoint that verifies also
proves the log only grew since the previous one (append-only consistency). Each outcome is
recorded in the inside's own log: ``audit.witnessed`` or ``audit.witness_inconsistent``.
After an inconsistency the mirror stops witnessing (and says so at every start) until an
auditor looks: ``ferry audit verify`` on the mirror names the first bad position.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ferry import log
from ferry.audit.agent import AgentAudit
from ferry.audit.files import UnsafeFile, open_append, open_regular
from ferry.audit.merkle import CompactRange, leaf_hash, read_notes
from ferry.audit.record import AuditError, AuditObject, Subject, decode
from ferry.audit.segments import CHECKPOINTS_FILE, PIECE_NAME, segment_name
from ferry.crypto.keys import PublicKey

_log = log.get("inside.mirror")

# Bytes of out-of-order pieces held while a gap is filled (a repeat copy usually fills it).
MAX_PENDING_BYTES = 64 * 1024 * 1024
PIECE_COST = 256  # counted for each piece held besides its bytes (its objects, its entry)
SUBJECT = Subject.component("audit-mirror")
# Bytes read at a time while hashing mirrored records (a record is at most 16 KiB).
READ_CHUNK = 1024 * 1024


def segment_complete(directory: Path, number: int) -> bool:
    """True once the mirror holds segment ``number`` whole: the next segment's opening
    record names this one's exact size."""
    try:
        with open(open_regular(directory / segment_name(number + 1)), "rb") as f:
            first = f.readline(64 * 1024)
        if not first.endswith(b"\n"):
            return False
        previous = decode(first[:-1]).get("detail", {}).get("previous") or {}
        size = (directory / segment_name(number)).stat().st_size
    except (OSError, ValueError, AuditError):
        return False
    return previous.get("segment") == segment_name(number) and previous.get("bytes") == size


class MirrorRejected(Exception):
    """A piece that cannot be placed (bad name, or contradicting the mirror)."""


@dataclass
class _Cursor:
    """How far the witness has read the mirrored records: segment number and byte offset."""

    segment: int = 1
    offset: int = 0


class AuditMirror:
    def __init__(
        self,
        directory: Path,
        peer_key: PublicKey,
        audit: AgentAudit,
        previous_peer_keys: Sequence[PublicKey] = (),
    ) -> None:
        self.dir = directory
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # the outside's audit key, then earlier ones (a rotation): a checkpoint signed by
        # any of them is witnessed
        self.peer_keys = (peer_key, *previous_peer_keys)
        self.audit = audit
        self._pending: dict[str, dict[int, bytes]] = {}
        self._pending_bytes = 0
        self._tree = CompactRange()
        self._cursor = _Cursor()
        self._count = _Cursor()  # how far records have been counted
        self._available = 0
        self._notes_offset = 0  # bytes of checkpoints.log already witnessed
        self.origin: str | None = None
        self.witnessed = 0  # size of the last witnessed checkpoint
        self.broken: str | None = None
        self.pieces = 0
        self._catch_up(record=False)  # re-witness what is already mirrored (restart)

    # --------------------------------------------------------------- placing
    def receive(self, name: str, content: bytes) -> None:
        """Place one verified piece; raises MirrorRejected for a piece that cannot fit."""
        m = PIECE_NAME.fullmatch(name)
        if m is None:
            raise MirrorRejected(f"not an audit piece name: {name[:80]!r}")
        file, offset = m.group(1), int(m.group(2))
        if not content:  # (the shipper never cuts one; held, it would cost and fill nothing)
            raise MirrorRejected(f"an empty audit piece: {name[:80]!r}")
        self.pieces += 1
        self._place(file, offset, content)
        self._drain_pending(file)
        self._catch_up(record=True)

    def _size(self, file: str) -> int:
        try:
            return (self.dir / file).stat().st_size
        except FileNotFoundError:
            return 0

    def _place(self, file: str, offset: int, content: bytes) -> None:
        size = self._size(file)
        if offset > size:
            held = self._pending.setdefault(file, {})
            cost = len(content) + PIECE_COST
            if offset not in held and self._pending_bytes + cost <= MAX_PENDING_BYTES:
                held[offset] = content
                self._pending_bytes += cost
            return
        overlap = min(size - offset, len(content))
        if overlap:
            with open(open_regular(self.dir / file), "rb") as f:
                f.seek(offset)
                have = f.read(overlap)
            if have != content[:overlap]:
                self._inconsistent(
                    f"piece {file}@{offset} differs from the bytes already mirrored",
                    file=file,
                )
                raise MirrorRejected(f"{file}@{offset} contradicts the mirror")
        rest = content[overlap:]
        if rest:
            path = self.dir / file
            created = not path.exists()
            fd = open_append(path)  # (UnsafeFile, not a hang, if a FIFO is in its place)
            try:
                view = memoryview(rest)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)

    def _drain_pending(self, file: str) -> None:
        held = self._pending.get(file)
        while held:
            size = self._size(file)
            ready = [o for o in held if o <= size]
            if not ready:
                return
            for o in sorted(ready):
                content = held.pop(o)
                self._pending_bytes -= len(content) + PIECE_COST
                if o + len(content) > self._size(file):
                    self._place(file, o, content)

    # -------------------------------------------------------------- witnessing
    def _catch_up(self, *, record: bool) -> None:
        """Witness every checkpoint whose records have all arrived, in order (``record``: each
        in the inside's log; not at a start, where those mirrored before are witnessed again).
        A mirrored file that is not a regular file (only the mirror writes there) stops the
        witness. What stops it is recorded, at a start too."""
        try:
            self._witness(record=record)
        except UnsafeFile as exc:
            self._inconsistent(f"{exc}: the mirror does not read it")

    def _witness(self, *, record: bool) -> None:
        while not self.broken:
            try:
                with open(open_regular(self.dir / CHECKPOINTS_FILE), "rb") as f:
                    f.seek(self._notes_offset)
                    # one note at a time, each line bounded: never the rest of the file
                    parsed = read_notes(f, after_note=self._notes_offset > 0, max_notes=1)
            except FileNotFoundError:
                return
            if not parsed.notes:
                if parsed.error is not None:
                    self._inconsistent(f"{CHECKPOINTS_FILE} does not parse: {parsed.error}")
                return
            note = parsed.notes[0]
            if parsed.size <= note.end:
                return  # nothing follows it yet: more signature lines may still arrive
            cp = note.checkpoint
            if cp.size > self._records_available():
                return  # its records have not all arrived yet: witness it later
            problem = self._check(note.signature_by_any(self.peer_keys), cp.origin, cp.size)
            if problem is None:
                self._advance_to(cp.size)
                if self._tree.root() != cp.root:
                    problem = (
                        f"checkpoint {cp.size}: the mirrored records hash to "
                        f"{self._tree.root().hex()}, the checkpoint says {cp.root.hex()}"
                    )
            if problem is not None:
                self._inconsistent(problem)
                return
            self.origin = cp.origin
            self._notes_offset += note.end
            self.witnessed = cp.size
            if record:
                self.audit.try_record(
                    "audit.witnessed",
                    subject=SUBJECT,
                    result="success",
                    obj=AuditObject(kind="checkpoint", size=cp.size),
                    detail={"origin": cp.origin, "size": cp.size, "root": cp.root.hex()},
                )

    def _check(self, signature: str, origin: str, size: int) -> str | None:
        if signature != "valid":
            return f"checkpoint {size} is not validly signed by the outside audit key ({signature})"
        if self.origin is not None and origin != self.origin:
            return f"checkpoint {size} is for log {origin!r}, not {self.origin!r}"
        if size < self.witnessed:
            return f"checkpoint {size} follows checkpoint {self.witnessed}: a log only grows"
        return None

    def _records_available(self) -> int:
        """How many records the mirror holds without a hole (counted incrementally)."""
        while True:
            path = self.dir / segment_name(self._count.segment)
            try:
                with open(open_regular(path), "rb") as f:
                    f.seek(self._count.offset)
                    data = f.read()
            except FileNotFoundError:
                break
            complete = data.rfind(b"\n") + 1
            self._available += data.count(b"\n", 0, complete)
            self._count.offset += complete
            if not self._segment_complete(self._count.segment):
                break
            self._count = _Cursor(self._count.segment + 1, 0)
        return self._available

    def _segment_complete(self, number: int) -> bool:
        return segment_complete(self.dir, number)

    def _advance_to(self, size: int) -> None:
        """Feed mirrored records into the tree until it holds ``size`` of them (reading only
        as far as needed, in READ_CHUNK pieces: a segment may be 64 MiB)."""
        while self._tree.size < size:
            path = self.dir / segment_name(self._cursor.segment)
            with open(open_regular(path), "rb") as f:
                f.seek(self._cursor.offset)
                data = f.read(READ_CHUNK)
            pos = 0
            while self._tree.size < size:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    break
                self._tree.append(leaf_hash(data[pos:nl]))
                pos = nl + 1
            self._cursor.offset += pos
            if self._tree.size < size and len(data) < READ_CHUNK:  # end of this segment
                if not self._segment_complete(self._cursor.segment):
                    raise MirrorRejected("mirrored records end before the checkpoint")
                self._cursor = _Cursor(self._cursor.segment + 1, 0)

    def _inconsistent(self, problem: str, *, file: str = "") -> None:
        self.broken = problem
        _log.error("mirror_inconsistent", reason=problem, file=file or None)
        self.audit.try_record(
            "audit.witness_inconsistent",
            subject=SUBJECT,
            result="failure",
            reason=f"WITNESS_INCONSISTENT: {problem}"[:1024],
            obj=AuditObject(kind="checkpoint", path=str(self.dir)),
            detail={"witnessed": self.witnessed},
        )

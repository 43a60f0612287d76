"""Checkpoints a live writer stores while verify reads its log.

Verify reads ``checkpoints.log`` first, then the records. A running agent goes on writing in
between, and its writer stores a checkpoint's note only after the ``audit.checkpoint`` record
that announces it: the records read can announce checkpoints whose notes came after the notes
were read. :class:`LateCheckpoints` looks for each of those in what the file holds past the
notes read (:class:`~ferry.audit.files.LaterNotes`, one note at a time) as the scan reaches
it and, for those the writer had not stored yet (the scan can be ahead of it), once more after
the scan. A note found counts only if it is the writer's: the log's origin and a trusted key's
signature; then it is stored (the records' root) or a mismatch (another root: the records were
changed). Anything else leaves the checkpoint not stored, which verify reports as it would for
a stopped log. What is held is bounded: at most :data:`MAX_LATE` checkpoints wait for the
second look, each with the offset of a note to read again, never a note.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from ferry.audit.files import LaterNotes
from ferry.audit.merkle import Note
from ferry.crypto.keys import PublicKey

# Checkpoints announced past the notes read and not found when the scan reached them, looked
# for again after the scan (a live writer behind the scan: a few at the end)
MAX_LATE = 1000

Verdict = Literal["stored", "mismatch", ""]


@dataclass(slots=True)
class Announced:
    """An audit.checkpoint record: where (the verifier's position), the size it announces, and
    whether a note of that size is in checkpoints.log (known once the scan reaches the size).
    Past the notes read first: the records' root at ``size``, and whether it waits for a
    second look after the scan (``late``)."""

    idx: int
    size: int
    pos: Any
    stored: bool = False
    root: bytes | None = None
    late: bool = False


class LateCheckpoints:
    """See the module's docstring. ``open_later`` gives the notes past those read first (None
    if there is no file to read); ``origin`` the log's origin as known so far."""

    def __init__(
        self,
        open_later: Callable[[], LaterNotes | None],
        origin: Callable[[], str | None],
    ) -> None:
        self._open_later = open_later
        self._origin = origin
        self._later: LaterNotes | None = None
        self._opened = False
        self._resumed = False  # (the second look has begun)
        # (checkpoint, offset of a note of its size not signed by the keys known then)
        self.pending: list[tuple[Announced, int | None]] = []
        self.stored = 0  # notes found that match the records and a trusted key signed
        self.last = 0  # the largest size of those
        self.tops: dict[bytes, int] = {}  # the largest of those per key id
        self.first_offset: int | None = None  # the smallest offset of those

    def _notes(self) -> LaterNotes | None:
        if not self._opened:
            self._opened = True
            self._later = self._open_later()
        return self._later

    def judge(
        self, note: Note, offset: int, announced: Announced, keys: Iterable[PublicKey]
    ) -> Verdict:
        """The note at ``offset``: "stored" (the size announced, the log's origin, a trusted
        key's signature, the records' root), "mismatch" (the same but another root), or ""
        (not the writer's)."""
        cp = note.checkpoint
        origin = self._origin()
        if cp.size != announced.size or (origin is not None and cp.origin != origin):
            return ""
        signer = next((k for k in keys if note.signature_status(k) == "valid"), None)
        if signer is None:
            return ""
        if cp.root != announced.root:
            return "mismatch"
        self.stored += 1
        self.last = max(self.last, cp.size)
        self.tops[signer.key_id] = max(self.tops.get(signer.key_id, 0), cp.size)
        self.first_offset = min(offset, offset if self.first_offset is None else self.first_offset)
        return "stored"

    def look(self, announced: Announced, keys: Iterable[PublicKey]) -> tuple[Verdict, int] | None:
        """As the scan reaches ``announced`` (past the notes read; its ``root`` set): (verdict,
        offset of the note) for a note that is the writer's, else None, with ``announced``
        then waiting for the second look (``late``) if it may still come. ``keys``: those
        known so far (all are tried after the scan)."""
        later = self._notes()
        if later is None:
            return None
        unsigned: int | None = None
        if not later.ended:
            try:
                found, unsigned = self._read_for(later, announced, list(keys))
            except OSError:
                found, later.ended = None, True  # (looked for again after the scan)
            if found is not None:
                return found
            if unsigned is None and not later.ended:
                return None  # (the writer stored notes past it, and not its own: missing)
        if len(self.pending) < MAX_LATE:
            announced.late = True
            self.pending.append((announced, unsigned))
        return None

    def again(self, keys: Iterable[PublicKey]) -> list[tuple[Announced, tuple[Verdict, int]]]:
        """After the scan: the waiting checkpoints that a note in what checkpoints.log holds now
        shows, with (verdict, offset) as :meth:`look`, judged with ``keys`` (all trusted by
        then). The others keep waiting, with the offset of a note of their size if one is
        there: call again once more keys are trusted (a rotation's handover, signed by a note
        found here), then take :attr:`pending` as not stored."""
        keys = list(keys)
        later = self._notes()
        if later is None:
            return []
        first = not self._resumed
        if first:
            self._resumed = True
            later.resume()
        found: list[tuple[Announced, tuple[Verdict, int]]] = []
        still: list[tuple[Announced, int | None]] = []
        for announced, at in self.pending:
            verdict: tuple[Verdict, int] | None = None
            offset = at
            try:
                if at is not None:
                    note = later.one(at)
                    if note is not None and (v := self.judge(note, at, announced, keys)):
                        verdict = v, at
                elif first:
                    verdict, offset = self._read_for(later, announced, keys)
            except OSError:
                verdict = None
            if verdict is None:
                still.append((announced, offset))
            else:
                found.append((announced, verdict))
        self.pending = still
        return found

    def _read_for(
        self, later: LaterNotes, announced: Announced, keys: list[PublicKey]
    ) -> tuple[tuple[Verdict, int] | None, int | None]:
        """Read on to ``announced``'s size: (verdict, offset) of a note that is the writer's,
        else None and the offset of the first note of its size (judged again with more
        keys)."""
        candidate: int | None = None
        for at, note in later.at(announced.size):
            verdict = self.judge(note, at, announced, keys)
            if verdict:
                return (verdict, at), at
            candidate = at if candidate is None else candidate
        return None, candidate

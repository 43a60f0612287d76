"""Verify an audit log: every record, the Merkle tree, every signed checkpoint.

:func:`verify` reads a log directory (or one segment file) and returns a
:class:`VerifyReport`. It checks, in one streaming pass over the segments with O(log n)
memory (``checkpoints.log`` is read a few times, one note at a time, each read checked to see
the same bytes: see :mod:`ferry.audit.files`; no file is opened unless it is a regular file,
no link followed):

* every line is a JSON record that matches the schema;
* indexes run from 0 without gaps, repeats or reordering, and each record's
  ``prev`` is the leaf hash of the record before it;
* each segment starts with an ``audit.segment_opened`` record that names the
  previous segment, its exact size in bytes and the tree at that point;
* timestamps do not go back by more than a tolerance (a warning: clocks step);
* every checkpoint in ``checkpoints.log`` parses, is signed by the audit key,
  has a size that never shrinks, and has the root of the recomputed tree at its
  size (so consecutive checkpoints are append-only consistent: both are prefixes
  of the same recomputed log); no checkpoint covers more records than exist;
* every ``audit.checkpoint`` record has its signed checkpoint;
* every segment is a regular file (``SEGMENT_NOT_FILE``), and every file can be read
  (``FILE_UNREADABLE``).

The scan stops at the first bad record; :attr:`VerifyReport.first` names the
first bad position (segment file, line, record index, byte offset) and a
problem code. docs/AUDIT.md lists the codes and what each means.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.audit.files import (
    MAX_UNORDERED_NOTES,
    LaterNotes,
    NoteFile,
    NoteIndex,
    UnsafeFile,
    not_regular,
    open_regular,
)
from ferry.audit.findings import Problem, VerifyReport
from ferry.audit.live import Announced, LateCheckpoints
from ferry.audit.merkle import CompactRange, Note, leaf_hash, note_key_id
from ferry.audit.record import (
    MAX_RECORD_BYTES,
    ZERO_HASH,
    decode,
    parse_ts,
    record_errors,
)
from ferry.audit.segments import _SEGMENT, CHECKPOINTS_FILE, Line, list_segments, segment_name
from ferry.crypto.keys import PublicKey
from ferry.errors import FerryError, UsageError

# Report at most this many problems of one kind (a log re-signed with another key
# has every checkpoint wrong; the first few say it all).
MAX_REPORTED_PER_CODE = 10
MAX_OPENING_CUTS = 8  # audit.tail_truncated records a run's opening may hold after a close
MAX_HANDOVERS = 100  # audit.started records naming earlier keys that are followed
DEFAULT_TS_TOLERANCE = 1.0  # seconds a timestamp may go back before it is reported
# Called with each record as soon as it is verified (decoded, schema, index, chain), from the
# very bytes verified, and whether a checkpoint in checkpoints.log covers it (whether that
# checkpoint verifies is known only at the end: the caller trusts nothing before then).
RecordHook = Callable[[dict[str, Any], bool], None]


@dataclass(frozen=True, slots=True)
class _Pos:
    file: str
    line: int
    offset: int
    idx: int


# What may follow a clean close, by state (see _Verifier._follow_close; audit.segment_opened
# may come anywhere): a new run's opening, or the writer's own recovery from an outage.
_AFTER_CLOSE: dict[str, frozenset[str]] = {
    "closed": frozenset({"audit.started", "audit.outage"}),
    # (audit.started again: a run that stopped before its first checkpoint, then the next)
    "opening": frozenset({"audit.started", "audit.tail_truncated", "audit.checkpoint"}),
    "opening_full": frozenset({"audit.started", "audit.checkpoint"}),
    "unsigned_opening": frozenset(),
    # (audit.started in these: the run stopped while recording the outage, then the next)
    "recovering": frozenset({"audit.checkpoint", "audit.started"}),
    "recovered": frozenset({"audit.stopped", "audit.started"}),
    # (the outage tail's audit.stopped: its checkpoint, or a next run after a crash)
    "restopping": frozenset({"audit.checkpoint", "audit.started"}),
}


class _Stop(Exception):
    """The scan cannot go on past a bad record."""


@dataclass(slots=True)
class _NoteFacts:
    """What the checks after the scan need of the notes, gathered in one read."""

    verified: int = 0  # notes that match the records and are signed by a trusted key
    last_verified: int | None = None  # the largest size of those
    at_size: bool = False  # a note has the size the scan ended at
    beyond: tuple[int, int] | None = None  # (size, line) of the first smallest note past it
    beyond_max: int = 0  # the largest size past it

    def add(self, note: Note, verified: bool, tree_size: int) -> None:
        size = note.checkpoint.size
        if verified:
            self.verified += 1
            self.last_verified = max(size, self.last_verified or 0)
        if size == tree_size:
            self.at_size = True
        elif size > tree_size:
            if self.beyond is None or size < self.beyond[0]:
                self.beyond = (size, note.line)
            self.beyond_max = max(self.beyond_max, size)


class _Verifier:
    def __init__(
        self,
        path: Path,
        keys: tuple[PublicKey, ...],
        ts_tolerance: float,
        first_segment: int | None = None,
        on_record: RecordHook | None = None,
        *,
        want_roots: frozenset[int] = frozenset(),
        report_io: bool = True,
    ) -> None:
        self.path = path
        self.report_io = report_io  # an error reading a file is FILE_UNREADABLE, else raised
        self.on_record = on_record
        self.want_roots = want_roots
        self.keys = keys
        self.first_segment = first_segment
        self.tolerance_us = int(ts_tolerance * 1_000_000)
        self.report = VerifyReport(str(path), authenticated=bool(keys))
        self.scan_problem: Problem | None = None
        self.other: list[Problem] = []
        self.counts: dict[str, int] = {}
        self.tree = CompactRange()
        self.prev_hex = ZERO_HASH
        self.prev_pos: _Pos | None = None
        self.last_ts = ""
        self.suspect: tuple[_Pos, _Pos] | None = None  # (record j, record j-1): j.prev is wrong
        # checkpoints.log, never held whole: see ferry.audit.files
        self.index = NoteIndex(None)
        self.notes_unread = False  # checkpoints.log is there but could not be read
        self.last_matched = 0  # the largest size of a note that matched the records so far
        self.tops: dict[bytes, int] = {}  # see _top_signed
        # audit.checkpoint records: how many, the last one, and the first of those whose note
        # is not in checkpoints.log (each is CHECKPOINT_MISSING, but a last one may be pending)
        self.announced = 0
        self.last_announced: Announced | None = None
        self.missing: list[Announced] = []
        self.missing_more = 0  # (beyond MAX_REPORTED_PER_CODE)
        # checkpoints announced past the notes read, whose notes a live writer stored since
        self.late = LateCheckpoints(self._later_notes, self._origin)
        self.notes_absent = False  # there was no checkpoints.log when the notes were read
        self.later_fd = -1
        # (the opening checkpoint, the record after it, its event) of each new run found
        # after a clean close whose first checkpoint's note is looked for after the scan
        self.openings: list[tuple[Announced, _Pos, str]] = []
        self.opening = Announced(0, 0, None)  # (the one in state "opening_late")
        self.log_keys: dict[str, None] = {}  # checkpoint_key of each audit.started, in order
        # (idx, earlier keys) of each audit.started that names earlier audit keys (a rotation)
        self.handovers: list[tuple[int, list[str]]] = []
        self.log_origin: str | None = None
        self.end: _Pos | None = None  # just past the last complete record
        self.partial = False  # the scan starts from a segment's saved state, not from record 0
        self.tail = True  # the segments scanned run to the end of the log
        self.complete = False  # the scan reached the end of the segments
        self.torn: tuple[str, int, bytes] | None = None  # (segment, offset, bytes) of a torn line
        self.top_note = 0  # the largest size in checkpoints.log
        # (size, root) of the last checkpoint announced after top_note (an earlier one would
        # be CHECKPOINT_MISSING)
        self.unstored: list[tuple[int, bytes]] = []
        self.torn_pos: _Pos | None = None
        self.seg_sizes: dict[str, int] = {}  # the size of each segment read, when read
        self.torn_ckpt: int | None = None  # offset of an incomplete final note
        self.last_events = ("", "")
        # Where the records stand relative to a clean close: "" (none), "stopping",
        # "closed", then the states of _AFTER_CLOSE (see _follow_close).
        self.close_state = ""
        self.opening_cuts = 0  # audit.tail_truncated records of a run's opening after a close

    # --- reporting ---------------------------------------------------------------------

    def problem(self, code: str, message: str, pos: _Pos | None = None, **kw: Any) -> None:
        self.counts[code] = self.counts.get(code, 0) + 1
        if self.counts[code] > MAX_REPORTED_PER_CODE:
            return
        if pos is not None:
            kw = {"file": pos.file, "line": pos.line, "idx": pos.idx, "offset": pos.offset, **kw}
        self.other.append(Problem(code, message, **kw))

    def stop(self, code: str, message: str, pos: _Pos) -> _Stop:
        self.scan_problem = Problem(code, message, pos.file, pos.line, pos.idx, pos.offset)
        return _Stop()

    def warn(self, code: str, message: str, pos: _Pos | None = None) -> None:
        key = "warn:" + code
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.counts[key] <= MAX_REPORTED_PER_CODE:
            loc: dict[str, Any] = {}
            if pos is not None:
                loc = {"file": pos.file, "line": pos.line, "idx": pos.idx, "offset": pos.offset}
            self.report.warnings.append(Problem(code, message, **loc))

    # --- the run -------------------------------------------------------------------------

    def run(self) -> VerifyReport:
        started = time.perf_counter()
        directory = self.path_dir = self._directory()
        try:
            # The notes are read before the segments are listed: a live writer stores a note
            # only after its records, so every note read has its records in a segment listed
            # after it (listed first, a segment begun in between would be left out, and the
            # notes covering its records taken for a truncation).
            self._load_notes(directory)
            segments, gap = self._segments()
            if segments or gap:
                try:
                    self._scan(segments, gap)
                    self.complete = True
                except _Stop:
                    pass
            self.index.close_scan()
            self._finish()
        finally:
            self.index.close()
            if self.later_fd >= 0:
                os.close(self.later_fd)
        self.report.seconds = time.perf_counter() - started
        return self.report

    def _directory(self) -> Path:
        path = self.path
        if path.is_dir():
            return path
        if path.is_file() and _SEGMENT.fullmatch(path.name):
            return path.parent
        raise UsageError(f"{path}: not an audit log directory or segment file")

    def _segments(self) -> tuple[list[Path], str | None]:
        path = self.path
        if path.is_dir():
            found = list_segments(path, any_type=True)  # (the others are SEGMENT_NOT_FILE)
            if self.first_segment is not None:
                found = [(n, p) for n, p in found if n >= self.first_segment]
                self.partial = True
                first = self.first_segment
            else:
                first = 1
            if not found:
                self.problem("NO_LOG", f"no audit segments (audit-NNNNNN.jsonl) in {path}")
            paths: list[Path] = []
            gap = None
            for expected, (number, p) in enumerate(found, first):
                if number != expected:
                    gap = segment_name(expected)
                    break
                paths.append(p)
            if gap is not None:
                gap = self._past_gap(found[len(paths) :], gap)
            self.report.segments = len(found)
            return paths, gap
        self.partial = True
        self.tail = False
        self.report.segments = 1
        return [path], None

    def _past_gap(self, beyond: list[tuple[int, Path]], gap: str) -> str | None:
        """The files named like segments after a number that has none: each that is not a
        regular file is SEGMENT_NOT_FILE (a stray socket or FIFO is not read, and is not a
        segment that went missing); the gap is SEGMENT_MISSING if a regular file follows it."""
        missing = None
        for _, p in beyond:
            unsafe = not_regular(p)
            if unsafe is None:
                missing = gap
            else:
                self.problem(
                    "SEGMENT_NOT_FILE",
                    f"{unsafe}: it is not read (it comes after {gap}, which does not exist)",
                    file=p.name,
                )
        return missing

    def _load_notes(self, directory: Path) -> None:
        try:
            # (the notes are read in passes, each checked to read the same bytes)
            self.index = NoteIndex(NoteFile(directory / CHECKPOINTS_FILE))
        except FileNotFoundError:
            self.notes_absent = True
            return
        except UnsafeFile as exc:
            self.problem("CHECKPOINT_MALFORMED", str(exc), file=CHECKPOINTS_FILE)
            self.notes_unread = True
            return
        except OSError as exc:
            if not self.report_io:
                raise
            self.notes_unread = True
            self.problem(
                "FILE_UNREADABLE",
                f"{CHECKPOINTS_FILE} could not be read: {_os_error(exc)}: its checkpoints are "
                "not verified",
                file=CHECKPOINTS_FILE,
            )
            return
        end = self.index.end
        assert end is not None
        if end.error is not None:
            self.problem(
                "CHECKPOINT_MALFORMED",
                f"{CHECKPOINTS_FILE} does not parse: {end.error.reason}",
                file=CHECKPOINTS_FILE,
                line=end.error.line,
            )
        self.torn_ckpt = end.torn_at
        self.top_note = self.index.top
        self.report.checkpoints = self.index.count
        self.report.covered_when_read = self.top_note

    def _lines(self, segments: list[Path]) -> Iterator[tuple[Path, Line, bool]]:
        for i, seg in enumerate(segments):
            try:
                fd = open_regular(seg)
            except UnsafeFile as exc:
                raise self.stop(
                    "SEGMENT_NOT_FILE",
                    f"{exc}: it is not read (the records from idx {self.tree.size} on)",
                    _Pos(seg.name, 1, 0, self.tree.size),
                ) from None
            except OSError as exc:
                raise self._unreadable(seg, 1, 0, exc) from None
            with open(fd, "rb") as f:
                number = offset = 0
                try:
                    size = os.fstat(fd).st_size
                    while raw := f.readline(MAX_RECORD_BYTES + 2):
                        number += 1
                        complete = raw.endswith(b"\n")
                        line = Line(number, offset, raw[:-1] if complete else raw, complete)
                        offset += len(raw)
                        yield seg, line, offset >= size and i == len(segments) - 1
                    self.seg_sizes[seg.name] = os.fstat(fd).st_size
                except OSError as exc:
                    raise self._unreadable(seg, number + 1, offset, exc) from None

    def _unreadable(self, seg: Path, line: int, offset: int, exc: OSError) -> Exception:
        """A segment that cannot be read (permissions, an I/O error): FILE_UNREADABLE, or
        the error itself for the writer (an outage, not a bad log)."""
        if not self.report_io:
            return exc
        return self.stop(
            "FILE_UNREADABLE",
            f"{seg.name} could not be read: {_os_error(exc)}: the records from idx "
            f"{self.tree.size} on are not verified",
            _Pos(seg.name, line, offset, self.tree.size),
        )

    def _scan(self, segments: list[Path], gap: str | None) -> None:
        lines = self._lines(segments)
        pending: tuple[Path, Line, bool] | None = None
        prev_seg: tuple[str, int] | None = None
        while True:
            item = pending or next(lines, None)
            pending = None
            if item is None:
                break
            seg, line, at_end = item
            if line.number == 1 and self.prev_pos is not None:
                prev_seg = (self.prev_pos.file, self.seg_sizes.get(self.prev_pos.file, -1))
            pos = _Pos(seg.name, line.number, line.offset, self.tree.size)
            if not line.complete:
                if at_end:
                    self.torn = (seg.name, line.offset, line.data)
                    self.torn_pos = pos
                    break
                raise self.stop("MALFORMED_LINE", "line longer than 16 KiB or unterminated", pos)
            rec = self._record(line, pos)
            if line.number == 1:
                self._segment_start(rec, seg, pos, prev_seg)
                pos = _Pos(seg.name, line.number, line.offset, self.tree.size)
            elif rec["event"] == "audit.segment_opened":
                raise self.stop(
                    "SEGMENT_LINK", "audit.segment_opened in the middle of a segment", pos
                )
            if rec["idx"] != self.tree.size:
                try:
                    pending = next(lines, None)
                except _Stop:  # (the next segment is unreadable: no lookahead)
                    pending = None
                raise self._index_problem(rec["idx"], pos, pending)
            self._chain(rec, pos)
            self._record_facts(rec, pos)
            self._follow_close(rec["event"], pos)
            self.last_events = (self.last_events[1], rec["event"])
            leaf = leaf_hash(line.data)
            self.tree.append(leaf)
            if self.tree.size in self.want_roots:
                self.report.roots_at[self.tree.size] = self.tree.root().hex()
            self.prev_hex = leaf.hex()
            self.prev_pos = pos
            self.report.records += 1
            if self.on_record is not None:
                self.on_record(rec, pos.idx < self.top_note)
            self._check_notes(pos)
            if rec["event"] == "audit.checkpoint" and self.tree.size > self.top_note:
                root = self.tree.root()
                self.unstored = [(self.tree.size, root)]
                if self.last_announced is not None:  # (this record's: see _record_facts)
                    self.last_announced.root = root
                    self._late(self.last_announced)
            end = line.offset + len(line.data) + 1
            self.end = _Pos(seg.name, line.number + 1, end, pos.idx + 1)
        if self.suspect is not None:
            at, before = self.suspect
            self._modified(before, at, ambiguous=True)
        if gap is not None:
            where = self.end or _Pos(gap, 1, 0, self.tree.size)
            raise self.stop(
                "SEGMENT_MISSING",
                f"segment {gap} is missing: the records from idx {self.tree.size} on are gone",
                _Pos(gap, 1, 0, where.idx),
            )

    def _record(self, line: Line, pos: _Pos) -> dict[str, Any]:
        try:
            rec = decode(line.data)
        except ValueError as exc:
            raise self.stop("MALFORMED_LINE", f"not a valid record: {exc}", pos) from None
        errors = record_errors(rec)
        if errors:
            idx = rec.get("idx")
            where = pos if not isinstance(idx, int) else _Pos(pos.file, pos.line, pos.offset, idx)
            raise self.stop("SCHEMA", "record does not match the schema: " + errors[0], where)
        return rec

    def _segment_start(
        self, rec: dict[str, Any], seg: Path, pos: _Pos, prev_seg: tuple[str, int] | None
    ) -> None:
        detail = rec.get("detail") or {}
        if rec["event"] != "audit.segment_opened":
            raise self.stop("SEGMENT_LINK", "a segment must start with audit.segment_opened", pos)
        if detail["segment"] != seg.name:
            raise self.stop(
                "SEGMENT_LINK", f"segment_opened names {detail['segment']}, not {seg.name}", pos
            )
        if self.partial and self.prev_pos is None:
            try:
                tree = CompactRange(
                    detail["tree_size"], [bytes.fromhex(h) for h in detail["frontier"]]
                )
            except ValueError:
                raise self.stop("SEGMENT_LINK", "segment_opened has a bad frontier", pos) from None
            if tree.root().hex() != detail["root"]:
                raise self.stop("SEGMENT_LINK", "segment_opened frontier and root disagree", pos)
            self.tree, self.prev_hex = tree, rec["prev"]
            self.report.first_idx = tree.size
            self.warn(
                "SEGMENT_ONLY",
                f"verified from {seg.name} on: records before idx {tree.size} were not read; "
                "the starting state is confirmed only by a checkpoint at or after it",
            )
            self._check_notes(None)
            return
        expected_prev = None if prev_seg is None else {"segment": prev_seg[0], "bytes": prev_seg[1]}
        if detail["previous"] != expected_prev:
            raise self.stop(
                "SEGMENT_LINK",
                f"segment_opened names previous segment {detail['previous']}, "
                f"but the files show {expected_prev}",
                pos,
            )
        state = (detail["tree_size"], detail["root"], detail["frontier"])
        actual = (self.tree.size, self.tree.root().hex(), [h.hex() for h in self.tree.hashes])
        if state != actual:
            raise self.stop(
                "SEGMENT_LINK",
                f"segment_opened records tree size {detail['tree_size']} and root "
                f"{str(detail['root'])[:16]}..., but the records before it give size "
                f"{self.tree.size} and root {actual[1][:16]}...",
                pos,
            )

    def _index_problem(self, found: int, pos: _Pos, after: tuple[Path, Line, bool] | None) -> _Stop:
        expected = self.tree.size
        pos = _Pos(pos.file, pos.line, pos.offset, expected)
        if found < expected:
            if self.prev_pos is not None and found == expected - 1:
                p = self.prev_pos
                return self.stop(
                    "INDEX_DUPLICATE",
                    f"lines {p.line} and {pos.line} of {pos.file} both claim idx {found}: "
                    "one of them was inserted",
                    _Pos(p.file, p.line, p.offset, found),
                )
            return self.stop(
                "INDEX_DUPLICATE",
                f"expected idx {expected}, found idx {found} again: an inserted or duplicated "
                "record",
                pos,
            )
        next_idx = None
        if after is not None and after[1].complete:
            try:
                value = decode(after[1].data).get("idx")
                next_idx = value if isinstance(value, int) else None
            except ValueError:
                next_idx = None
        if next_idx == expected:
            return self.stop(
                "RECORDS_SWAPPED",
                f"expected idx {expected}, found idx {found} followed by idx {expected}: "
                "records were reordered",
                pos,
            )
        missing = found - expected
        return self.stop(
            "RECORDS_MISSING",
            f"expected idx {expected}, found idx {found}: {missing} record"
            f"{'s' if missing > 1 else ''} deleted before this line",
            pos,
        )

    def _chain(self, rec: dict[str, Any], pos: _Pos) -> None:
        """Check ``prev``; on a break, look at one more record to say which was changed."""
        broken = rec["prev"] != self.prev_hex
        if self.suspect is not None:
            at, before = self.suspect
            if broken:  # record j's own hash is wrong too: record j was changed
                self._modified(at, at, ambiguous=False)
            else:  # record j is consistent with its successor: record j-1 was changed
                self._modified(before, at, ambiguous=False)
        if broken:
            if self.prev_pos is None:  # record 0 (or a segment's first in single mode)
                raise self.stop(
                    "RECORD_MODIFIED",
                    f"record {pos.idx} was changed: its prev field is not the expected hash",
                    pos,
                )
            self.suspect = (pos, self.prev_pos)

    def _modified(self, bad: _Pos, link: _Pos, *, ambiguous: bool) -> None:
        if bad is link:
            msg = (
                f"record {bad.idx} was changed: its prev field does not name record "
                f"{bad.idx - 1}, and record {bad.idx + 1} does not name it"
            )
        elif ambiguous:
            msg = (
                f"record {bad.idx} was changed (or the prev field of record {link.idx}, the "
                f"last record): record {link.idx} names a different predecessor"
            )
        else:
            msg = (
                f"record {bad.idx} was changed: record {link.idx} names a predecessor whose "
                "hash differs (or records between them were removed and the rest renumbered)"
            )
        raise self.stop("RECORD_MODIFIED", msg, bad)

    def _record_facts(self, rec: dict[str, Any], pos: _Pos) -> None:
        ts = rec["ts"]
        if ts < self.last_ts:
            try:
                back = parse_ts(self.last_ts) - parse_ts(ts)
            except ValueError:
                raise self.stop("SCHEMA", f"timestamp {ts} is not a valid time", pos) from None
            if back > self.tolerance_us:
                self.warn(
                    "TS_REGRESSION",
                    f"timestamp {ts} is {back / 1e6:.3f} s before the previous record's "
                    f"(tolerance {self.tolerance_us / 1e6:g} s): the clock stepped back",
                    pos,
                )
        self.last_ts = ts
        event = rec["event"]
        if event == "audit.checkpoint":
            detail = rec["detail"]
            if detail["size"] != pos.idx + 1:
                raise self.stop(
                    "SCHEMA",
                    f"audit.checkpoint at idx {pos.idx} announces size {detail['size']}, "
                    f"not {pos.idx + 1}",
                    pos,
                )
            self._announce(Announced(pos.idx, detail["size"], pos))
            self.log_origin = self.log_origin or detail["origin"]
        elif event == "audit.started":
            detail = rec["detail"]
            if len(self.log_keys) < MAX_HANDOVERS:
                self.log_keys.setdefault(detail["checkpoint_key"], None)
            earlier = detail.get("previous_checkpoint_keys")
            if earlier and len(self.handovers) < MAX_HANDOVERS:
                self.handovers.append((pos.idx, list(earlier)))  # (the schema bounds it)
            self.log_origin = self.log_origin or detail["origin"]
            if detail["resumed"] and "signed_size" in detail:
                self._adopted(detail, pos)

    def _adopted(self, detail: dict[str, Any], pos: _Pos) -> None:
        signed, size = detail["signed_size"], detail.get("tree_size")
        if not isinstance(size, int) or not signed <= size <= pos.idx:
            raise self.stop(
                "SCHEMA",
                f"audit.started at idx {pos.idx} gives signed_size {signed} and tree_size "
                f"{size}: not signed_size <= tree_size <= its own index",
                pos,
            )
        if size == signed:
            return
        self.report.adopted_records += size - signed
        if len(self.report.adopted) < MAX_HANDOVERS:
            self.report.adopted.append({"from": signed, "to": size, "at": pos.idx})
        self.warn(
            "ADOPTED",
            f"records {signed}..{size - 1} ({size - signed}) were written after the last "
            f"checkpoint stored before record {pos.idx}, by a run that stopped without signing "
            "them (a crash, a power cut), and signed when the log reopened: nothing but the "
            "protection of the log's disk while the agent was stopped vouches for them",
            pos,
        )

    def _follow_close(self, event: str, pos: _Pos) -> None:
        """After a clean close (audit.stopped, then its checkpoint) the writer adds only a new
        run's opening records (audit.started, audit.tail_truncated, its first checkpoint,
        whose note it stores before it writes anything else), or the records of an outage it
        recovered from while closing (audit.outage, a checkpoint, audit.stopped, a
        checkpoint). Anything else was added by someone else, and would be signed by the next
        run: DATA_AFTER_CLOSE."""
        state = self.close_state
        if event == "audit.segment_opened" and state:
            return
        if state == "opening_late":  # (see below)
            if self.opening.stored:
                state = self.close_state = ""
            elif self.opening.late and len(self.openings) < MAX_HANDOVERS:
                # (not stored when the scan reached it: judged after; past the bound, now)
                self.openings.append((self.opening, pos, event))
                state = self.close_state = ""
            else:
                state = self.close_state = "unsigned_opening"
        expected = _AFTER_CLOSE.get(state)
        if expected is not None and event not in expected:
            self._after_close(pos, event, expected)
            self.close_state = ""
            return
        if event == "audit.stopped":
            self.close_state = "restopping" if state == "recovered" else "stopping"
        elif event == "audit.checkpoint" and state in ("stopping", "restopping"):
            self.close_state = "closed"
        elif event == "audit.started" and state in _AFTER_CLOSE:
            self.close_state = "opening"  # (a new run; maybe after one that stopped early)
            self.opening_cuts = 0
        elif state == "closed":
            self.close_state = "recovering"  # (audit.outage)
        elif state == "recovering":
            self.close_state = "recovered"  # (its checkpoint; audit.stopped comes next)
        elif state == "opening" and event == "audit.tail_truncated":
            self.opening_cuts += 1  # (a run records a few cuts at most, not data)
            if self.opening_cuts >= MAX_OPENING_CUTS:
                self.close_state = "opening_full"
        elif state in ("opening", "opening_full") and event == "audit.checkpoint":
            # the run's first checkpoint: its note is stored before any later record (a note
            # stored after the notes were read is looked for as the next record comes)
            if self.index.has(pos.idx + 1):
                self.close_state = ""
            elif pos.idx + 1 > self.top_note and self.last_announced is not None:
                self.close_state = "opening_late"
                self.opening = self.last_announced
            else:
                self.close_state = "unsigned_opening"
        elif state not in ("opening", "opening_full"):
            self.close_state = ""

    def _after_close(self, pos: _Pos, event: str, expected: Collection[str]) -> None:
        where = (
            f"where only {' or '.join(sorted(expected))} can"
            if expected
            else "and a new run's first checkpoint, which has no signed note"
        )
        self.problem(
            "DATA_AFTER_CLOSE",
            f"record {pos.idx} ({event}) follows the log's clean close (audit.stopped and "
            f"its checkpoint) {where}: no run of the writer added it",
            pos,
        )

    def _check_notes(self, pos: _Pos | None) -> None:
        size = self.tree.size
        root: bytes | None = None
        for note_root, line, offset in self.index.at(size):
            if self.last_announced is not None and self.last_announced.size == size:
                self.last_announced.stored = True
            root = root or self.tree.root()
            if note_root == root:
                self.last_matched = size
                continue
            self.index.mismatch(size, offset)
            where = pos or _Pos(CHECKPOINTS_FILE, line, offset, size)
            raise self.stop(
                "CHECKPOINT_MISMATCH",
                f"checkpoint {size} ({CHECKPOINTS_FILE} line {line}) does not match the "
                f"records: record {size - 1} was changed, or records "
                f"{self.last_matched}..{size - 1} were rewritten",
                where,
            )

    # --- after the scan ----------------------------------------------------------------------

    def _finish(self) -> None:
        report = self.report
        report.tree_size = self.tree.size
        report.root = self.tree.root().hex()
        keys = self._late_again(self._keys())
        facts = self._check_note_signatures(keys)
        if self.index.changed:
            self.problem(
                "CHECKPOINT_MALFORMED",
                f"{CHECKPOINTS_FILE} changed while it was being verified (verify again)",
                file=CHECKPOINTS_FILE,
            )
        if self.index.dropped:
            # (reported whatever the count of CHECKPOINT_REGRESSION: it says what was not done)
            n = self.index.dropped
            these = "1 more checkpoint was" if n == 1 else f"{n} more checkpoints were"
            self.other.append(
                Problem(
                    "CHECKPOINT_REGRESSION",
                    f"more than {MAX_UNORDERED_NOTES} checkpoints are smaller than one before "
                    f"them: {these} not compared with the records, from this line on (a "
                    "mismatch among them is not reported, nor a missing checkpoint whose size "
                    "they may hold)",
                    file=CHECKPOINTS_FILE,
                    line=self.index.dropped_line,
                )
            )
        if self.complete:
            self._check_coverage(facts)
        self._check_announcements()
        self._check_torn(facts)
        report.checkpoints += self.late.stored  # (stored while verify read: ferry.audit.live)
        report.checkpoints_verified = facts.verified + self.late.stored
        report.last_checkpoint = max(facts.last_verified or 0, self.late.last) or None
        # One announced but unstored checkpoint and no other is a crash before the first
        # note was stored (CHECKPOINT_PENDING); anything else without notes is a removal.
        if (
            self.complete
            and report.records
            and not self.index.count
            and not self.late.stored
            and self.announced != 1
            and not self.notes_unread  # (FILE_UNREADABLE or not a file: said already)
        ):
            self.problem(
                "NO_CHECKPOINT",
                "no signed checkpoint: nothing shows these records were written by the audit key",
            )
        covered = report.last_checkpoint or 0
        later = not self.tail and self.top_note > self.tree.size  # covered after this segment
        if self.complete and self.tree.size > covered and not later:
            self.warn(
                "UNCOVERED_TAIL",
                f"records {covered}..{self.tree.size - 1} come after the last checkpoint: "
                "no signature covers them yet",
            )
        report.problems = ([self.scan_problem] if self.scan_problem else []) + sorted(
            self.other, key=lambda p: (p.idx is None, p.idx or 0, p.line or 0)
        )
        for code, count in self.counts.items():
            if not code.startswith("warn:") and count > MAX_REPORTED_PER_CODE:
                more = count - MAX_REPORTED_PER_CODE
                report.problems.append(Problem(code, f"... and {more} more {code}"))

    def _keys(self, *, again: bool = False) -> list[PublicKey]:
        """The keys checkpoints may be signed by: those given, and each earlier audit key a
        later start names (``previous_checkpoint_keys``) in a record that a checkpoint signed
        by a trusted key covers (the handover of a key rotation: the new key vouches for the
        old one). Without a key given, the keys the log names itself, with a warning."""
        report = self.report
        trusted: dict[bytes, tuple[PublicKey, str]] = {k.key_id: (k, "given") for k in self.keys}
        if not trusted:
            for text in self.log_keys:
                key = _ed25519(text)
                if key is not None:
                    trusted.setdefault(key.key_id, (key, "named by the log"))
            if not again:
                self.warn(
                    "UNAUTHENTICATED",
                    "no key given: signatures were checked against the keys the log names "
                    "itself (audit.started), which a forger controls; give the audit public "
                    "key (--key)"
                    if trusted
                    else "no key given and none named in the log",
                )
        grew = bool(trusted) and bool(self.handovers)
        while grew:
            grew = False
            top = self._top_signed([k for k, _ in trusted.values()])
            for idx, earlier in self.handovers:
                if idx >= top or self._adopted_at(idx):
                    continue  # (a start signed only by the next run could be anyone's)
                for text in earlier:
                    key = _ed25519(text)
                    if key is not None and key.key_id not in trusted:
                        trusted[key.key_id] = (key, f"handed over at record {idx}")
                        grew = True
        report.keys = [{"key_id": k.key_id.hex(), "trusted": how} for k, how in trusted.values()]
        report.key_id = report.keys[0]["key_id"] if report.keys else None
        return [k for k, _ in trusted.values()]

    def _adopted_at(self, idx: int) -> bool:
        return any(a["from"] <= idx < a["to"] for a in self.report.adopted)

    def _top_signed(self, keys: list[PublicKey]) -> int:
        """The largest size of a checkpoint that matches the records and one of ``keys``
        signed (0 if none). ``keys`` are those first trusted, then with them the keys of the
        handovers that a checkpoint by those covers: one read of checkpoints.log finds the
        largest for each key not asked about before (only trusted keys are ever checked)."""
        new = {k.key_id: k for k in keys if k.key_id not in self.tops}
        if new:
            tops = dict.fromkeys(new, 0)
            ids: tuple[str, dict[bytes, PublicKey]] | None = None  # note key ids, by origin
            for note, matched in self.index.notes():
                size = note.checkpoint.size
                if not matched or all(top >= size for top in tops.values()):
                    continue
                origin = note.checkpoint.origin
                if ids is None or ids[0] != origin:
                    ids = (origin, {note_key_id(origin, k): k for k in new.values()})
                by_id = ids[1]
                checked: set[bytes] = set()
                for sig in note.signatures:  # (the first line of a key decides, as in C2SP)
                    key = by_id.get(sig.key_id) if sig.name == origin else None
                    if key is None or sig.key_id in checked:
                        continue
                    checked.add(sig.key_id)
                    if tops[key.key_id] < size and note.signature_status(key) == "valid":
                        tops[key.key_id] = size
            for key_id in tops:  # (and those stored while verify read: ferry.audit.live)
                tops[key_id] = max(tops[key_id], self.late.tops.get(key_id, 0))
            self.tops.update(tops)
        return max((self.tops[k.key_id] for k in keys), default=0)

    def _check_note_signatures(self, keys: list[PublicKey]) -> _NoteFacts:
        """Check each note's origin, signature and order in one read of checkpoints.log, and
        gather what the other checks need of the notes."""
        origin = self.log_origin or self.index.first_origin
        self.report.origin = origin
        facts = _NoteFacts()
        previous: tuple[int, bytes] | None = None
        for note, matched in self.index.notes():
            cp = note.checkpoint
            loc: dict[str, Any] = {"file": CHECKPOINTS_FILE, "line": note.line}
            if cp.origin != origin:
                self.problem(
                    "CHECKPOINT_ORIGIN",
                    f"checkpoint {cp.size} is for log {cp.origin!r}, not {origin!r}",
                    **loc,
                )
            # a scan from a later segment judges the signatures of the checkpoints that reach
            # its records; earlier ones may be by a key handed over in a segment it skipped
            before = self.partial and cp.size < self.report.first_idx
            actual = note.signature_by_any(keys) if matched or not before else "valid"
            status = "valid" if before else actual
            if status == "invalid":
                self.problem(
                    "CHECKPOINT_BAD_SIGNATURE",
                    f"checkpoint {cp.size} has a signature by the audit key that does not verify",
                    **loc,
                )
            elif status == "absent":
                signers = ", ".join(f"{s.name} ({s.key_id.hex()})" for s in note.signatures)
                ids = " or ".join(k.key_id.hex() for k in keys)
                self.problem(
                    "CHECKPOINT_UNSIGNED",
                    f"checkpoint {cp.size} is not signed by the audit key"
                    + (f" {ids}" if ids else "")
                    + f"; signed by: {signers}",
                    **loc,
                )
            if previous is not None:
                if cp.size < previous[0]:
                    self.problem(
                        "CHECKPOINT_REGRESSION",
                        f"checkpoint {cp.size} follows checkpoint {previous[0]}: a log only grows",
                        **loc,
                    )
                elif cp.size == previous[0] and cp.root != previous[1]:
                    self.problem(
                        "CHECKPOINT_FORK",
                        f"two checkpoints of size {cp.size} have different roots",
                        **loc,
                    )
            previous = (cp.size, cp.root)
            facts.add(note, matched and actual == "valid", self.tree.size)
        return facts

    def _check_torn(self, facts: _NoteFacts) -> None:
        """A torn write is normal after a crash. After a clean close only the start of the
        next run's first record can be torn (a crash or a full disk as it began)."""
        closed = (
            self.complete
            and self.last_events == ("audit.stopped", "audit.checkpoint")
            and facts.at_size
        )
        after = "the log was closed (audit.stopped and its final checkpoint), yet"
        if self.torn is not None and self.torn_pos is not None:
            name, _, data = self.torn
            head = b'{"v":1,"idx":%d,' % self.tree.size
            begun = data.rstrip(b"\0")  # (a power cut can leave zeros where data was due)
            if closed and not (head.startswith(begun) or begun.startswith(head)):
                self.problem(
                    "DATA_AFTER_CLOSE",
                    f"{after} {len(data)} bytes without a newline follow in {name}",
                    self.torn_pos,
                )
            else:
                self.warn(
                    "TORN_TAIL",
                    f"the last line ({len(data)} bytes) has no newline: the writer stopped in "
                    "mid-write; it is cut off and recorded when the log reopens",
                    self.torn_pos,
                )
        if self.torn_ckpt is not None and self.late.first_offset != self.torn_ckpt:
            # (unless the writer completed it meanwhile: a note found there counts)
            where = f"{CHECKPOINTS_FILE} ends inside a checkpoint at byte {self.torn_ckpt}"
            if closed and self.tail:
                self.problem("DATA_AFTER_CLOSE", f"{after} {where}", file=CHECKPOINTS_FILE)
            else:
                self.warn(
                    "CHECKPOINT_TORN",
                    f"{where} (the writer stopped while writing it; it is cut off when the log "
                    "reopens)",
                )

    def _check_coverage(self, facts: _NoteFacts) -> None:
        size = self.tree.size
        if not self.tail or facts.beyond is None:
            return
        first_size, first_line = facts.beyond
        end = self.end or _Pos("", 1, 0, 0)
        self.problem(
            "TRUNCATED",
            f"the log ends after {size} records, but checkpoint {first_size} "
            f"({CHECKPOINTS_FILE} line {first_line}) covers more: records "
            f"{size}..{facts.beyond_max - 1} are missing",
            _Pos(end.file, end.line, end.offset, size),
        )

    def _announce(self, announced: Announced) -> None:
        """A new audit.checkpoint record: the one before it, whose size the scan has reached,
        either has its note or is missing (only the last one can still be pending)."""
        before = self.last_announced
        if before is not None and not before.late:
            self._unless_stored(before)
        self.announced += 1
        self.last_announced = announced

    def _unless_stored(self, announced: Announced) -> None:
        """Missing, unless stored: the first MAX_REPORTED_PER_CODE in the log's order are
        listed (those judged after the scan come later), the others counted."""
        if announced.stored or self._may_be_stored(announced.size):
            return
        self.missing.append(announced)
        if len(self.missing) > MAX_REPORTED_PER_CODE:
            self.missing.sort(key=lambda a: a.idx)
            self.missing.pop()
            self.missing_more += 1

    def _origin(self) -> str | None:
        return self.log_origin or self.index.first_origin

    def _later_notes(self) -> LaterNotes | None:
        """The notes stored past those read first (ferry.audit.live); if there was no
        checkpoints.log then, all of the one there may be now."""
        if self.notes_unread:
            return None
        if not self.notes_absent:
            return self.index.later()
        try:
            self.later_fd = open_regular(self.path_dir / CHECKPOINTS_FILE)
        except OSError:
            return None
        return LaterNotes(self.later_fd, 0)

    def _late(self, announced: Announced) -> None:
        """An audit.checkpoint past the notes read (its root set): a live writer may have
        stored its note since (ferry.audit.live). The keys tried now are those given, else
        those the log named so far; after the scan, all that _keys trusts."""
        keys = list(self.keys) or [k for k in map(_ed25519, self.log_keys) if k is not None]
        found = self.late.look(announced, keys)
        if found is not None:
            self._settle(announced, *found)

    def _settle(self, announced: Announced, verdict: str, offset: int) -> None:
        announced.stored = True  # (a mismatch is that, not a missing checkpoint)
        if verdict == "mismatch":
            size = announced.size
            self.problem(
                "CHECKPOINT_MISMATCH",
                f"checkpoint {size} ({CHECKPOINTS_FILE} byte {offset}, stored while verify "
                f"read the records) does not match the records: a record before {size} was "
                "changed",
                announced.pos,
            )

    def _late_again(self, keys: list[PublicKey]) -> list[PublicKey]:
        """After the scan: the checkpoints whose notes were not stored yet when the scan
        reached them, in what checkpoints.log holds now. A note found there may hand over
        from an earlier key (a rotation while verify read): then the keys are taken again,
        and the others judged again with them. Those still not found but the last are
        missing; a new run's opening among them is followed by data after a close. Returns
        the keys trusted."""
        while self.late.pending:
            tops = dict(self.late.tops)
            for announced, found in self.late.again(keys):
                self._settle(announced, *found)
            if self.late.tops == tops:
                break
            self.tops.clear()  # (a handover signed meanwhile: see _top_signed)
            keys = self._keys(again=True)
        for announced, _ in self.late.pending:
            if announced is not self.last_announced:
                self._unless_stored(announced)
        self.late.pending.clear()
        for opening, pos, event in self.openings:
            if not opening.stored:
                self._after_close(pos, event, _AFTER_CLOSE["unsigned_opening"])
        return keys

    def _check_announcements(self) -> None:
        for announced in self.missing:
            self._missing(announced)
        if self.missing_more:
            self.counts["CHECKPOINT_MISSING"] += self.missing_more
        last = self.last_announced
        if last is None or last.stored or self._may_be_stored(last.size):
            return
        if last.size > self.top_note:
            idx, size, pos = last.idx, last.size, last.pos
            self.warn(
                "CHECKPOINT_PENDING",
                f"record {idx} announces checkpoint {size}, which is not in "
                f"{CHECKPOINTS_FILE}: the writer stopped before storing it (it is stored "
                "when the log reopens)",
                pos,
            )
        else:
            self._missing(last)

    def _may_be_stored(self, size: int) -> bool:
        """Whether a note of ``size`` may be in checkpoints.log, though not among the notes
        read (then its absence is not CHECKPOINT_MISSING: another problem says why)."""
        return self.notes_unread or self.index.maybe_dropped(size)

    def _missing(self, announced: Announced) -> None:
        self.problem(
            "CHECKPOINT_MISSING",
            f"record {announced.idx} announces checkpoint {announced.size}, which is not in "
            f"{CHECKPOINTS_FILE}: checkpoints were removed",
            announced.pos,
        )


def verify(
    path: str | Path,
    public_key: PublicKey | Sequence[PublicKey] | None = None,
    *,
    ts_tolerance: float = DEFAULT_TS_TOLERANCE,
    on_record: RecordHook | None = None,
    want_roots: Collection[int] = (),
) -> VerifyReport:
    """Verify the audit log at ``path`` (a directory, or one segment file).

    ``public_key`` is the audit key's public half (or several: each checkpoint must be
    signed by one of them); earlier keys that the log hands over from (a key rotation, see
    :meth:`_Verifier._keys`) are trusted too. Without it, signatures are checked against
    the keys the log names and the report is not :attr:`~VerifyReport.authenticated`.
    Raises :class:`UsageError` if ``path`` is neither a log directory nor a segment file.
    ``on_record``: see :data:`RecordHook` (reconcile counts the records it is given, so
    that what it counts is exactly what was verified, never a second read of the files).
    ``want_roots``: sizes at which to give the root of the records' tree
    (:attr:`VerifyReport.roots_at`), computed as the scan passes them.
    """
    keys = _key_tuple(public_key)
    for key in keys:
        if key.alg != "ed25519":
            raise UsageError(f"the audit key is an ed25519 key, not {key.alg}")
    verifier = _Verifier(
        Path(path), keys, ts_tolerance, on_record=on_record, want_roots=frozenset(want_roots)
    )
    return verifier.run()


def _key_tuple(keys: PublicKey | Sequence[PublicKey] | None) -> tuple[PublicKey, ...]:
    if keys is None:
        return ()
    return (keys,) if isinstance(keys, PublicKey) else tuple(keys)


def _os_error(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _ed25519(text: str) -> PublicKey | None:
    try:
        key = PublicKey.from_string(text)
    except FerryError:
        return None
    return key if key.alg == "ed25519" else None


@dataclass(frozen=True)
class TailState:
    """What the writer needs to resume a log, from :func:`scan_tail`."""

    report: VerifyReport
    tree: CompactRange
    prev: str  # hex leaf hash of the last record
    torn: tuple[str, int, bytes] | None  # (segment, offset, bytes) of a torn final line
    # the last checkpoint announced, if it is not in checkpoints.log (more than one missing
    # is CHECKPOINT_MISSING: the writer then refuses the log)
    unstored: list[tuple[int, bytes]]


def scan_tail(
    directory: Path, first_segment: int, key: PublicKey | Sequence[PublicKey]
) -> TailState:
    """Verify a log from segment ``first_segment`` to its end, as the writer does on reopening.

    The state at the start of that segment is taken from its segment_opened
    record and confirmed by the checkpoints whose sizes fall in the scanned part. An error
    reading a file is raised (the log cannot be opened now), not reported as a problem of the
    log.
    """
    v = _Verifier(directory, _key_tuple(key), DEFAULT_TS_TOLERANCE, first_segment, report_io=False)
    report = v.run()
    return TailState(report, v.tree, v.prev_hex, v.torn, v.unstored)

"""The outside logs the inside witnessed, as reconcile reads them from the inside's log (pure).

The inside's witness (``inside/mirror.py``) records ``audit.witnessed`` (origin, size, root) for
each checkpoint note of the outside's log it takes from its mirror, at once, in the order of
the mirror's ``checkpoints.log``. Notes are only appended to that file and every copy of a log
holds the same records, so the witnessed checkpoints of one log only grow, and a checkpoint
that does not grow (a smaller one, or one of the same size with another root), or one of
another origin, begins another log: a rebuilt outside, or one restored from a backup or a
snapshot, shipped from its start to a new mirror (docs/OPERATIONS.md). The same note again
(a repeated note) is the same log. A log witnessed again from its start (its mirror set aside
and the same log shipped again) is one log again once it reaches the last checkpoint
witnessed before: its records up to there are the same.

Only a few checkpoints of each log are kept, never one per record (an outside signs one a
minute): the first, the one due (the largest witnessed by the cutoff: what a copy of the log
must hold by now), and the last. :meth:`Witnessed.identify` then finds which log an outside
log read is, from the roots of its records at those sizes: a copy of a witnessed log has, at
each witnessed size it holds, the witnessed root.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

# Witnessed logs kept (the newest): a rebuilt outside starts one (once a month for 20 years is
# 240). More are the work of an outside that presents logs at will; reconcile says when older
# ones were left out.
MAX_WITNESSED_LOGS = 256
MAX_REASON = 200  # characters kept of an audit.witness_inconsistent record's reason

HAS = "has"  # the log read holds the checkpoint's records: its root is the witnessed one
DIFFERS = "differs"  # it holds as many records, but they hash to another root: another log
SHORT = "short"  # it holds fewer records (or they could not be compared)


@dataclass(frozen=True, slots=True)
class Point:
    """One witnessed checkpoint: when it was first witnessed, its size and root (hex)."""

    ts: str
    size: int
    root: str


@dataclass
class WitnessedLog:
    """One outside log as the inside's ``audit.witnessed`` records saw it: a summary."""

    number: int  # 1 for the first log witnessed, 2 for the next, ...
    origin: str | None
    first: Point
    last: Point  # its largest checkpoint witnessed
    last_ts: str  # of the last record that witnessed it
    due: Point | None = None  # its largest checkpoint witnessed by the cutoff

    @property
    def first_ts(self) -> str:
        return self.first.ts

    @property
    def size(self) -> int:
        return self.last.size

    def points(self) -> Iterator[Point]:
        """The checkpoints kept, smallest first."""
        yield self.first
        if self.due is not None and self.due not in (self.first, self.last):
            yield self.due
        if self.last != self.first:
            yield self.last

    def extend(self, point: Point, cutoff: str | None) -> None:
        if point.size > self.last.size:
            self.last = point
        self.last_ts = point.ts
        if (cutoff is None or point.ts <= cutoff) and (
            self.due is None or point.size > self.due.size
        ):
            self.due = point

    def absorb(self, again: WitnessedLog) -> None:
        """``again`` is this log witnessed again from its start, up to this log's last
        checkpoint (so far): one log."""
        self.last_ts = again.last_ts
        if again.due is not None and (self.due is None or again.due.size > self.due.size):
            self.due = again.due


@dataclass(frozen=True)
class Identity:
    """Which witnessed log an outside log read is."""

    log: WitnessedLog | None  # None: it contradicts every log kept
    # (log, checkpoint) the log read contradicts, when it is none of them: the newest's first
    contradicted: tuple[WitnessedLog, Point] | None = None
    # An earlier log it agrees with, holding less than that log's due checkpoint, while it
    # lacks the last checkpoint witnessed of ``log`` or ``log`` has none due yet (witnessed
    # only within the cutoff): it may be a stale copy of that earlier log as well as a copy
    # of ``log`` (they begin alike), and nothing witnessed tells which.
    earlier: WitnessedLog | None = None


@dataclass
class Witnessed:
    """The outside logs an inside log witnessed, one after the other, and its witness's
    refusals (``audit.witness_inconsistent``)."""

    # records after this time may be about what is still on its way to the log read
    cutoff: str | None = None
    logs: deque[WitnessedLog] = field(default_factory=lambda: deque(maxlen=MAX_WITNESSED_LOGS))
    count: int = 0  # logs witnessed (kept or not)
    refused: int = 0  # audit.witness_inconsistent records
    last_refusal: tuple[str, str] | None = None  # (ts, reason) of the last one
    stopped: bool = False  # the last witness record is a refusal: nothing witnessed since

    @property
    def current(self) -> WitnessedLog | None:
        """The log witnessed now (the last one)."""
        return self.logs[-1] if self.logs else None

    @property
    def left_out(self) -> int:
        """Logs witnessed before the oldest one kept."""
        return self.count - len(self.logs)

    def sizes(self) -> set[int]:
        """The sizes of every checkpoint kept: the roots :meth:`identify` needs."""
        return {p.size for log in self.logs for p in log.points()}

    def note(self, ts: str, origin: str | None, size: int, root: str) -> None:
        """An ``audit.witnessed`` record (in the order of the inside's log)."""
        self.stopped = False
        if size < 1:
            return  # (a checkpoint of no record: nothing to compare)
        point = Point(ts, size, root)
        log = self.current
        if (
            log is not None
            and origin == log.origin
            and (size > log.last.size or (size == log.last.size and root == log.last.root))
        ):
            log.extend(point, self.cutoff)
        else:
            self.count += 1
            log = WitnessedLog(self.count, origin, point, point, ts)
            log.extend(point, self.cutoff)
            self.logs.append(log)
        if len(self.logs) > 1:
            before = self.logs[-2]
            if before.origin == origin and (before.last.size, before.last.root) == (size, root):
                before.absorb(log)  # (the same log again: see the module's docstring)
                self.logs.pop()
                self.count -= 1

    def refusal(self, ts: str, reason: str | None) -> None:
        """An ``audit.witness_inconsistent`` record: the witness refused the log shipped."""
        self.refused += 1
        self.last_refusal = (ts, (reason or "")[:MAX_REASON])
        self.stopped = True

    def identify(self, roots: Mapping[int, str], held: int) -> Identity:
        """Which witnessed log is the outside log read, which holds ``held`` records that
        hash to ``roots`` (size -> root hex, at least at every size of :meth:`sizes` up to
        ``held``). It is a log none of whose checkpoints kept it contradicts (holding as many
        records, with another root). One that holds the last checkpoint witnessed of the log
        witnessed now is that log (the same log shipped again may have reached further than
        the inside has signed of its witness). Otherwise, of those not contradicted, the one
        with the largest checkpoint it holds, and of equals the newest (a copy that holds
        only what several logs share is taken for the newest of them). :attr:`Identity.
        earlier` then names an earlier log it agrees with whose due checkpoint it lacks,
        unless it holds all that was witnessed of the log taken and some of that is due.
        None when it contradicts every log kept."""
        agreeing: list[tuple[WitnessedLog, int]] = []  # (log, largest checkpoint it holds)
        contradicted: tuple[WitnessedLog, Point] | None = None
        for log in self.logs:
            held_points = [(p, _relation(p, roots, held)) for p in log.points()]
            differs = next((p for p, r in held_points if r == DIFFERS), None)
            if differs is not None:
                contradicted = (log, differs)
                continue
            agreeing.append((log, max((p.size for p, r in held_points if r == HAS), default=0)))
        if not agreeing:
            return Identity(None, contradicted)
        now = self.current
        if now is not None and _relation(now.last, roots, held) == HAS:
            best = now
        else:
            best = max(agreeing, key=lambda a: (a[1], a[0].number))[0]
        earlier = None
        if best.due is None or _relation(best.last, roots, held) != HAS:
            lacking = [
                log
                for log, _ in agreeing
                if log.number < best.number and log.due is not None and log.due.size > held
            ]
            earlier = max(lacking, key=lambda log: log.number, default=None)
        return Identity(best, None, earlier)


def _relation(point: Point, roots: Mapping[int, str], held: int) -> str:
    if point.size > held:
        return SHORT
    root = roots.get(point.size)
    if root is None:
        return SHORT
    return HAS if root == point.root else DIFFERS

"""Account for every item the outside accepted (docs/AUDIT.md §7 and §10).

Every ``intake.accepted`` item of the outside log (or of the inside's mirror of
it) ends in exactly one state:

* ``delivered`` -- an inside ``delivery.delivered`` record, or an inside rejection
  that a security administrator released from quarantine (``quarantine.released``,
  signed): counted as delivered, and listed apart;
* ``rejected`` -- an inside ``delivery.rejected`` record, or a ``verdict`` with
  result ``rejected`` (the reason is the rejecting record's reason);
* ``in_flight`` -- neither yet, and accepted less than ``grace`` seconds before ``now``;
* ``missing`` -- neither, after the grace period (an item whose every packet was
  lost is one: the inside never saw it, the outside log says it was accepted).

Evidence is attached to open items: how far the item got (never sent, sent N
times, received but not delivered), ``transfer.lost``, ``link.sequence_gap``
ranges that cover its sequence number, and later items of its channel that did
arrive (it was overtaken). Discrepancies -- things that should not happen -- are
listed apart: an inside item the outside log never accepted, an item both
delivered and rejected, a hash that changed between sender and receiver, an item
accepted twice.

:class:`Accountant` is fed records one at a time (it keeps one small object per
item, never the records) and is shared with :mod:`ferry.audit.report`.
"""

from __future__ import annotations

import bisect
import itertools
import json
import operator
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ferry.audit.findings import VerifyReport
from ferry.audit.locate import Locations, LogLocation
from ferry.audit.record import format_ts, per_item
from ferry.audit.timeline import (
    LogStats,
    field_int,
    field_str,
    item_of,
    note_audit_record,
    read_log,
    safe,
    subject_label,
    ts_us,
)
from ferry.audit.verify import verify
from ferry.audit.witnessed import Identity, Witnessed
from ferry.errors import UsageError

DEFAULT_GRACE = 600.0  # seconds: longer than a planned repeat schedule, shorter than a shift
# Seconds the outside log read (the inside's mirror of it, say) may lag behind the inside's
# log before it counts as behind (OUTSIDE_LOG_BEHIND); the grace period if that is longer.
MIN_LAG = 600.0
STATES = ("delivered", "rejected", "in_flight", "missing")
MAX_LISTED_HOLES = 1000
_NONE: dict[str, Any] = {}
# Channels whose names start with this carry the agents' own control objects (the
# outside's audit segments, channel "_audit", docs/AUDIT.md §8), not clerks' items.
CONTROL_PREFIX = "_"  # outside sequence holes listed (the count is always exact)


class ItemState:
    """What the logs say about one item (one per item; the records are not kept)."""

    __slots__ = (
        "accepted",
        "accepted_idx",
        "accepted_ts",
        "channel",
        "channel_inside",
        "channels_seen",
        "delivered_path",
        "delivered_sha256",
        "delivered_size",
        "delivered_ts",
        "epoch",
        "evidence",
        "inside_first_ts",
        "item",
        "kind",
        "last_ts",
        "lost",
        "media_type",
        "name",
        "planned",
        "rank",
        "reason",
        "received_sha256",
        "received_ts",
        "recheck_reason",
        "recheck_result",
        "rejected_by",
        "rejected_reason",
        "rejected_ts",
        "released_by",
        "released_ts",
        "sends",
        "sent_sha256",
        "seq",
        "sha256",
        "size",
        "state",
        "subject",
        "verdict",
        "verdict_reason",
        "verdict_result",
    )

    def __init__(self, item: str) -> None:
        self.item = item
        self.accepted = 0  # intake.accepted records (1 expected)
        self.accepted_idx: int | None = None
        self.accepted_ts: str | None = None
        self.channel: str | None = None
        self.channels_seen: set[str] | None = None  # other channels records name, if any
        self.channel_inside = False  # the channel is an inside record's (none outside yet)
        # Where reconcile lists it: in the order the outside log first names each item, then
        # the items only the inside names, in its order (whichever log is read first).
        self.rank = 0
        self.seq: int | None = None
        self.epoch: str | None = None
        self.kind: str | None = None
        self.name: str | None = None
        self.size: int | None = None
        self.sha256: str | None = None
        self.media_type: str | None = None
        self.subject: str | None = None
        self.verdict: str | None = None
        self.verdict_result: str | None = None
        self.verdict_reason: str | None = None
        self.sends = 0
        self.planned: int | None = None
        self.sent_sha256: str | None = None
        self.received_ts: str | None = None
        self.received_sha256: str | None = None
        self.lost: str | None = None  # why and how far, when the inside gave up
        self.recheck_result: str | None = None
        self.recheck_reason: str | None = None
        self.delivered_ts: str | None = None
        self.delivered_path: str | None = None
        self.delivered_sha256: str | None = None
        self.delivered_size: int | None = None
        self.rejected_ts: str | None = None
        self.rejected_reason: str | None = None
        self.rejected_by: str | None = None  # "verdict" (outside) or "delivery" (inside)
        self.released_ts: str | None = None  # released from the inside quarantine
        self.released_by: str | None = None
        self.inside_first_ts: str | None = None
        self.last_ts = ""
        self.state = ""
        self.reason: str | None = None
        self.evidence: list[str] = []

    def stage(self) -> str:
        """How far an open item got."""
        if self.received_ts is not None:
            return f"received inside at {self.received_ts}, never delivered"
        if self.lost is not None:
            return f"inside gave up on it ({self.lost})"
        if self.sends:
            return f"sent {self.sends} time(s), never received inside"
        if self.verdict is not None:
            return f"verdict {self.verdict}, never sent"
        return "accepted, no verdict and never sent"

    def to_json(self) -> dict[str, Any]:
        return {
            "item": self.item,
            "state": self.state,
            "reason": self.reason,
            "channel": self.channel,
            "seq": self.seq,
            "epoch": self.epoch,
            "kind": self.kind,
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "media_type": self.media_type,
            "subject": self.subject,
            "accepted_ts": self.accepted_ts,
            "accepted_idx": self.accepted_idx,
            "verdict": self.verdict,
            "verdict_result": self.verdict_result,
            "sends": self.sends,
            "received_ts": self.received_ts,
            "recheck": self.recheck_result,
            "delivered_ts": self.delivered_ts,
            "delivered_path": self.delivered_path,
            "delivered_sha256": self.delivered_sha256,
            "rejected_ts": self.rejected_ts,
            "rejected_by": self.rejected_by,
            "released_ts": self.released_ts,
            "released_by": self.released_by,
            "last_ts": self.last_ts,
            "evidence": list(self.evidence),
        }


@dataclass(frozen=True)
class Discrepancy:
    """Something the two logs say that should not happen: reported, never concluded."""

    code: str
    item: str | None
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "item": self.item, "message": self.message}


@dataclass(frozen=True)
class SequenceGap:
    """A ``link.sequence_gap`` record of the inside: sequence numbers it never received."""

    ts: str
    channel: str | None
    epoch: str | None
    first: int
    last: int
    items: tuple[str, ...]  # accepted items whose seq falls in the range
    unknown: int  # seqs in the range with no accepted item

    def to_json(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "channel": self.channel,
            "epoch": self.epoch,
            "first": self.first,
            "last": self.last,
            "items": list(self.items),
            "unknown": self.unknown,
        }


def reason_code(reason: str | None) -> str:
    """``MACRO`` of ``MACRO: message`` (the code before the colon), or the reason itself."""
    if not reason:
        return "(none)"
    head = reason.split(":", 1)[0].strip()
    return head[:64] or "(none)"


@dataclass
class Accountant:
    """Folds the records of both logs into one :class:`ItemState` per item."""

    items: dict[str, ItemState] = field(default_factory=dict)
    fed: int = 0  # item records fed (ranks items)
    events: Counter[str] = field(default_factory=Counter)
    intake_rejected: Counter[str] = field(default_factory=Counter)  # by reason code
    gap_records: list[dict[str, Any]] = field(default_factory=list)

    def feed(self, side: str, rec: dict[str, Any]) -> None:
        event: str = rec["event"]
        self.events[event] += 1
        if event == "intake.rejected":
            self.intake_rejected[reason_code(rec.get("reason"))] += 1
            return
        if event == "link.sequence_gap" and side == "inside":
            self.gap_records.append(rec)
            return
        obj = rec.get("object")
        if type(obj) is dict and "items" in obj:  # a batch record: once per item
            for one in per_item(rec):
                self._feed_item(side, event, one)
            return
        self._feed_item(side, event, rec)

    def _feed_item(self, side: str, event: str, rec: dict[str, Any]) -> None:
        item = item_of(rec)
        if item is None:
            return
        self.fed += 1
        st = self.items.get(item)
        if st is None:
            st = self.items[item] = ItemState(item)
            st.rank = self.fed + (_INSIDE_RANK if side == "inside" else 0)
        elif side == "outside" and st.rank > _INSIDE_RANK:
            st.rank = self.fed
        ts: str = rec["ts"]
        if ts > st.last_ts:  # noqa: PLR1730  # max() is slower on the hot path
            st.last_ts = ts
        obj: dict[str, Any] = rec.get("object") or _NONE
        detail: dict[str, Any] = rec.get("detail") or _NONE
        channel = field_str(obj, "channel")
        # Every record names them (§7): the first outside record that does wins, else the
        # first inside one (the inside's log is read first).
        if st.channel is None or (channel is not None and side == "outside" and st.channel_inside):
            if st.channel is not None and st.channel != channel:
                _other_channel(st, st.channel)
            st.channel = channel
            st.channel_inside = side == "inside"
            st.seq = field_int(obj, "seq")
            st.epoch = field_str(obj, "epoch")
            st.kind = field_str(obj, "kind")
        elif channel is not None and channel != st.channel:  # (one side says otherwise)
            _other_channel(st, channel)
        result: str = rec["result"]
        reason = rec.get("reason")
        if side == "inside" and (st.inside_first_ts is None or ts < st.inside_first_ts):
            st.inside_first_ts = ts
        if side == "outside":
            if event == "intake.accepted":
                st.accepted += 1
                if st.accepted_ts is None:
                    st.accepted_ts = ts
                    st.accepted_idx = rec["idx"]
                    st.name = field_str(obj, "name")
                    st.size = field_int(obj, "size")
                    st.sha256 = field_str(obj, "sha256")
                    st.media_type = field_str(obj, "media_type")
                    st.subject = subject_label(rec["subject"])
            elif event == "verdict":
                st.verdict = field_str(detail, "verdict") or result
                st.verdict_result = result
                st.verdict_reason = reason
                if result == "rejected" and st.rejected_ts is None:
                    st.rejected_ts, st.rejected_by, st.rejected_reason = ts, "verdict", reason
            elif event in ("transfer.sent", "transfer.repeated"):
                st.sends += 1
                st.planned = field_int(detail, "of") or st.planned
                st.sent_sha256 = st.sent_sha256 or field_str(obj, "sha256")
            return
        if event == "transfer.received":
            st.received_ts = st.received_ts or ts
            st.received_sha256 = st.received_sha256 or field_str(obj, "sha256")
        elif event == "transfer.lost":
            got, need = field_int(detail, "blocks_done"), field_int(detail, "blocks_total")
            lost = [reason] if isinstance(reason, str) and reason else []
            if got is not None and need is not None:
                lost.append(f"{got} of {need} blocks decoded")
            st.lost = "; ".join(lost) or "lost"
        elif event == "recheck":
            st.recheck_result = result
            st.recheck_reason = reason
        elif event == "delivery.delivered":
            if st.delivered_ts is None:
                st.delivered_ts = ts
                st.delivered_path = field_str(obj, "path")
                st.delivered_sha256 = field_str(obj, "sha256")
                st.delivered_size = field_int(obj, "size")
        elif event == "delivery.rejected" and st.rejected_by != "delivery":
            # An inside rejection is the one that counts: it names the inside's reason.
            st.rejected_ts, st.rejected_by = ts, "delivery"
            st.rejected_reason = reason or st.recheck_reason
        elif event == "quarantine.released" and result == "success" and st.released_ts is None:
            # (the agent writes it only for a line signed by the security-admin key)
            st.released_ts, st.released_by = ts, subject_label(rec["subject"])

    def feed_log(self, side: str, directory: Path, stats: LogStats, limit: int | None) -> None:
        """Feed the records of a log read unverified (the inside's first, see reconcile)."""
        for rec in read_log(directory, side, limit=limit, stats=stats):
            self.feed(side, rec)


def _other_channel(st: ItemState, channel: str) -> None:
    if st.channels_seen is None:
        st.channels_seen = set()
    if len(st.channels_seen) < 8:
        st.channels_seen.add(channel)


_INSIDE_RANK = 1 << 62  # (above any count of records fed)


@dataclass
class LogCheck:
    """One log and what ``verify`` said about it (report is None when not verified)."""

    location: LogLocation
    report: VerifyReport | None
    note: str  # why it was not verified, or "verified"
    unsigned: bool = False  # count the records after the last signed checkpoint too
    error: str | None = None  # verified, but what was counted is not what was verified

    @property
    def failed(self) -> bool:
        return self.error is not None or (self.report is not None and not self.report.verified)

    @property
    def limit(self) -> int | None:
        """Read only what a verified signed checkpoint covers: records after it (the tail a
        running agent has not signed yet, up to a minute of them) could have been changed or
        made up by whoever can write the log's disk, without the key. (A log read without
        verification, or with ``unsigned``: all that was verified.)"""
        rep = self.report
        if rep is None or not rep.ok:
            return None
        if not rep.verified or self.unsigned:
            return rep.tree_size
        # (a live writer's checkpoints stored while verify read: their records were read as
        # not covered yet, and wait for the next run)
        return min(rep.last_checkpoint or 0, rep.covered_when_read)

    def to_json(self) -> dict[str, Any]:
        rep = self.report
        return {
            "side": self.location.side,
            "path": str(self.location.directory),
            "mirror": self.location.mirror,
            "verified": bool(rep and rep.verified and self.error is None),
            "note": self.note,
            "tree_size": rep.tree_size if rep else None,
            "root": rep.root if rep else None,
            "last_checkpoint": rep.last_checkpoint if rep else None,
            "key_id": rep.key_id if rep else None,
            "first_problem": rep.first.to_json() if rep and rep.first else None,
        }


class _Counted:
    """Counts the records of one log as :func:`verify` hands them over, from the bytes it
    verified: those a checkpoint covers (or, ``unsigned``, every verified record). Whether
    the log verifies, and so whether they count at all, is known once verify returns."""

    def __init__(self, acc: Accountant, stats: LogStats, unsigned: bool) -> None:
        self.acc = acc
        self.stats = stats
        self.unsigned = unsigned
        self.end = 0  # one past the index of the last record counted

    def __call__(self, rec: dict[str, Any], covered: bool) -> None:
        if not (covered or self.unsigned):
            return
        st = self.stats
        idx: int = rec["idx"]
        self.end = idx + 1
        st.lines += 1
        event: str = rec["event"]
        if event.startswith("audit."):  # (as read_log does: items never appear in them)
            note_audit_record(st, rec)
            return
        st.last_idx = idx
        ts: str = rec["ts"]
        if st.first_ts is None:
            st.first_ts = ts
        if st.last_ts is None or ts > st.last_ts:
            st.last_ts = ts
        self.acc.feed(st.side, rec)


def _check(
    loc: LogLocation,
    *,
    enabled: bool,
    unsigned: bool,
    counted: _Counted | None = None,
    want_roots: frozenset[int] = frozenset(),
) -> LogCheck:
    """Verify one log (feeding ``counted`` its records as they are verified, and taking the
    roots of its records' tree at ``want_roots``)."""
    if not enabled:
        return LogCheck(loc, None, "not verified (--no-verify)")
    key = loc.public_key()
    if key is None:
        return LogCheck(loc, None, "not verified: no public key known for this log")
    report = verify(loc.directory, key, on_record=counted, want_roots=want_roots)
    if report.verified:
        note = "verified"
        tail = report.tree_size - min(report.last_checkpoint or 0, report.covered_when_read)
        if tail > 0 and unsigned:
            note += f" (with {tail} records after its last signed checkpoint: not signed yet)"
        elif tail > 0 and (report.last_checkpoint or 0) > report.covered_when_read:
            note += (
                f" ({tail} records, signed while reconcile read the log or not signed yet, "
                "are not counted yet: run again, or give --include-unsigned)"
            )
        elif tail > 0:
            note += (
                f" ({tail} records after its last signed checkpoint are not counted yet: "
                "an agent signs them within a minute or so; run again then, or give "
                "--include-unsigned)"
            )
        if report.adopted_records:
            ranges = ", ".join(f"{a['from']}..{a['to'] - 1}" for a in report.adopted[:3])
            more = ", ..." if len(report.adopted) > 3 else ""
            note += (
                f" ({report.adopted_records} records, {ranges}{more}, were signed only when "
                "the agent restarted after stopping without closing its log: ADOPTED in "
                "`ferry audit verify`)"
            )
    elif report.ok and not report.signed:
        note = "FAILED: NOT SIGNED no checkpoint signed by its key covers a record"
    else:
        first = report.first
        note = f"FAILED: {first.code} {first.message}" if first else "FAILED"
    check = LogCheck(loc, report, note, unsigned)
    if counted is not None and report.verified and counted.end != (check.limit or 0):
        # (never, unless verify and this count disagree on what a checkpoint covers)
        check.error = (
            f"records 0..{counted.end - 1} were counted, but the signed checkpoints "
            f"cover {check.limit or 0}"
        )
        check.note = f"FAILED: {check.error}"
    return check


def reconcile_logs(
    locations: Locations,
    *,
    now_us: int,
    grace: float = DEFAULT_GRACE,
    enabled: bool = True,
    unsigned: bool = False,
) -> tuple[list[LogCheck], Reconciliation | None]:
    """Verify the outside and the inside log and account for their records (what
    ``ferry audit reconcile`` does). A log whose key is known is verified, and its records
    are counted in the same pass, from the bytes verified: nothing is read again by path
    afterwards, when whoever can write the files could have changed them (a live agent
    appends; an attacker rewrites). Only the records a verified signed checkpoint covers
    count, unless ``unsigned``. A log without a key (or with ``enabled`` false) is read
    unverified (:func:`read_log`). The inside's log comes first: the outside log read is
    then matched with the outside logs the inside witnessed by the roots of its records at
    the sizes witnessed, taken in the same pass (:mod:`ferry.audit.witnessed`). Returns each
    log's check (the outside's first) and the reconciliation, which is None when a log
    failed verification (nothing is reconciled then)."""
    if grace < 0:
        raise UsageError("--grace must not be negative")
    if locations.outside is None or locations.inside is None:
        raise UsageError(
            "reconcile needs both logs: the outside's (or its mirror) and the inside's"
        )
    acc = Accountant()
    out_stats = LogStats("outside", str(locations.outside.directory))
    in_stats = LogStats("inside", str(locations.inside.directory))
    # The inside's records first: its audit.witnessed records say at which sizes to take
    # the roots of the outside log's records, as they are verified (the order of the two
    # logs changes nothing else: see Accountant).
    in_stats.witnessed.cutoff = _witness_cutoff(now_us, grace)
    in_check = _read(locations.inside, in_stats, acc, enabled=enabled, unsigned=unsigned)
    out_stats.want_roots = frozenset(in_stats.witnessed.sizes())
    out_check = _read(
        locations.outside,
        out_stats,
        acc,
        enabled=enabled,
        unsigned=unsigned,
        count=not in_check.failed,
    )
    checks = [out_check, in_check]
    if any(c.failed for c in checks):
        return checks, None
    return checks, settle(acc, out_stats, in_stats, now_us=now_us, grace=grace, checks=checks)


def _read(
    loc: LogLocation,
    st: LogStats,
    acc: Accountant,
    *,
    enabled: bool,
    unsigned: bool,
    count: bool = True,
) -> LogCheck:
    """Verify one log, and (``count``) count its records into ``acc`` as they are
    verified, or, without a key, as they are read."""
    counted = _Counted(acc, st, unsigned) if count else None
    check = _check(
        loc, enabled=enabled, unsigned=unsigned, counted=counted, want_roots=st.want_roots
    )
    if check.report is None and count:  # not verified: read as it is, and said so
        acc.feed_log(loc.side, loc.directory, st, None)
    elif check.report is not None:
        st.limit = check.limit
        st.roots_at = check.report.roots_at
    return check


@dataclass
class Reconciliation:
    """The outcome of :func:`reconcile`."""

    now: str
    grace: float
    accepted: list[ItemState]  # outside intake.accepted items, by acceptance time
    unexplained: list[ItemState]  # inside-only items
    discrepancies: list[Discrepancy]
    gaps: list[SequenceGap]
    holes: list[dict[str, Any]]  # outside seq numbers with no intake.accepted
    hole_count: int
    checks: list[LogCheck]
    stats: list[LogStats]
    accountant: Accountant
    control: int = 0  # objects of control channels (``_audit``), left out of the accounting

    def by_state(self, state: str) -> Iterator[ItemState]:
        return (s for s in self.accepted if s.state == state)

    def counts(self) -> dict[str, int]:
        c = Counter(s.state for s in self.accepted)
        return {state: c.get(state, 0) for state in STATES}

    @property
    def released(self) -> list[ItemState]:
        """Delivered items that got there by a release from the inside quarantine."""
        return list(self._released())

    def _released(self) -> Iterator[ItemState]:
        return (s for s in self.accepted if s.state == "delivered" and s.released_ts)

    @property
    def missing(self) -> int:
        return sum(1 for s in self.accepted if s.state == "missing")

    def json_fields(self, *, items: bool = True) -> Iterator[tuple[str, Any]]:
        """The members of the JSON document, in order; the long lists as iterators (of
        dicts made one at a time), for :func:`stream_json` to write as they come."""
        counts = self.counts()
        rejected = Counter(s.rejected_by for s in self.by_state("rejected"))
        yield "now", self.now
        yield "grace", self.grace
        yield "logs", [c.to_json() for c in self.checks]
        yield "read", [s.to_json() for s in self.stats]
        yield "accepted", len(self.accepted)
        yield "counts", counts
        yield "rejected_by", {"verdict": rejected["verdict"], "delivery": rejected["delivery"]}
        yield "released", (s.to_json() for s in self._released())
        yield "intake_rejected", sum(self.accountant.intake_rejected.values())
        yield "control_objects", self.control
        yield "discrepancies", (d.to_json() for d in self.discrepancies)
        yield "sequence_gaps", (g.to_json() for g in self.gaps)
        yield "outside_seq_holes", {"count": self.hole_count, "listed": self.holes}
        for state in ("missing", "in_flight", "rejected"):
            yield state, (s.to_json() for s in self.by_state(state))
        yield "unexplained", (s.to_json() for s in self.unexplained)
        if items:
            yield "items", (s.to_json() for s in self.accepted)

    def to_json(self, *, items: bool = True) -> dict[str, Any]:
        """The whole document in memory (small logs, tests; ``--json`` streams it)."""
        return {
            key: list(value) if isinstance(value, Iterator) else value
            for key, value in self.json_fields(items=items)
        }


def stream_json(
    fields: Iterable[tuple[str, Any]], out: IO[str], *, indent: int | None = None
) -> None:
    """Write a JSON object member by member, and the members that are iterators as arrays,
    element by element: the text ``json.dumps`` gives for the object with the iterators
    made lists (and ``indent``, or compact separators without), without ever holding the
    document, or a list of its elements, in memory."""
    if indent is None:
        item_sep, key_sep, nl1, nl2, end = ",", ":", "", "", "}"
    else:
        item_sep, key_sep = ",", ": "
        nl1, nl2 = "\n" + " " * indent, "\n" + " " * (2 * indent)
        end = "\n}"
    dumps = json.JSONEncoder(indent=indent, separators=(item_sep, key_sep)).encode

    def nested(value: Any, nl: str) -> str:  # (a newline in the text is always structure)
        text = dumps(value)
        return text.replace("\n", nl) if nl else text

    out.write("{")
    first = True
    for key, value in fields:
        out.write(("" if first else item_sep) + nl1 + dumps(key) + key_sep)
        first = False
        if not isinstance(value, Iterator):
            out.write(nested(value, nl1))
            continue
        out.write("[")
        n = 0
        for element in value:
            out.write((item_sep if n else "") + nl2 + nested(element, nl2))
            n += 1
        out.write(nl1 + "]" if n else "]")
    out.write(end if not first else "}")


def reconcile(
    outside: Path,
    inside: Path,
    *,
    now_us: int,
    grace: float = DEFAULT_GRACE,
    limits: tuple[int | None, int | None] = (None, None),
    checks: list[LogCheck] | None = None,
) -> Reconciliation:
    """Account for every item of the ``outside`` log (or mirror) against the ``inside`` log,
    read as they are, unverified (``limits``: read only the records below these indexes).
    To verify the logs and count what was verified, use :func:`reconcile_logs`."""
    if grace < 0:
        raise UsageError("--grace must not be negative")
    acc = Accountant()
    out_stats = LogStats("outside", str(outside))
    in_stats = LogStats("inside", str(inside))
    in_stats.witnessed.cutoff = _witness_cutoff(now_us, grace)
    acc.feed_log("inside", inside, in_stats, limits[1])  # (first: as reconcile_logs does)
    out_stats.want_roots = frozenset(in_stats.witnessed.sizes())
    acc.feed_log("outside", outside, out_stats, limits[0])
    return settle(acc, out_stats, in_stats, now_us=now_us, grace=grace, checks=checks or [])


def _witness_cutoff(now_us: int, grace: float) -> str:
    """Records of the inside after this time may be about what is still on its way to the
    outside log read (the mirror lags): the grace period, and at least MIN_LAG, before now."""
    return format_ts(now_us - int(max(grace, MIN_LAG) * 1_000_000))


def settle(
    acc: Accountant,
    out_stats: LogStats,
    in_stats: LogStats,
    *,
    now_us: int,
    grace: float,
    checks: list[LogCheck],
) -> Reconciliation:
    """Decide every item's state once all records are in."""
    cutoff = format_ts(now_us - int(grace * 1_000_000))
    accepted: list[ItemState] = []
    unexplained: list[ItemState] = []
    problems: list[Discrepancy] = [
        Discrepancy(
            "WRONG_SIDE",
            None,
            f"the log given as the {side} log was written by the {said} agent (its "
            "audit.started records say so): the logs are swapped, or one was given for both",
        )
        for side, said in (("outside", out_stats.written_by), ("inside", in_stats.written_by))
        if said is not None and said != side
    ]
    problems.extend(_origin_problems(out_stats, in_stats, checks))
    held = out_stats.limit if out_stats.limit is not None else out_stats.lines
    witnessed = in_stats.witnessed
    identity = witnessed.identify(out_stats.roots_at, held)
    problems.extend(_refused(witnessed))
    problems.extend(_forked(witnessed, identity))
    problems.extend(_superseded(witnessed, identity))
    control = 0
    for st in sorted(acc.items.values(), key=_RANK):
        if st.channels_seen:
            names = ", ".join(sorted({st.channel or "", *st.channels_seen}))
            problems.append(
                Discrepancy("CHANNEL_MISMATCH", st.item, f"its records name channels {names}")
            )
        if (
            st.channel is not None
            and st.channel.startswith(CONTROL_PREFIX)
            and all(c.startswith(CONTROL_PREFIX) for c in st.channels_seen or ())
        ):
            control += 1  # the agents' own traffic (the audit mirror): not a clerk's item
            continue
        _decide(st, cutoff, problems)
        if st.accepted_ts is not None:
            accepted.append(st)
        else:
            unexplained.append(st)
    accepted.sort(key=lambda s: (s.accepted_ts or "", s.accepted_idx or 0))
    unexplained.sort(key=lambda s: (s.inside_first_ts or s.last_ts, s.item))
    horizon_end = out_stats.last_ts
    tolerance = format_ts(ts_us(horizon_end) - int(grace * 1_000_000)) if horizon_end else None
    lag = int(max(grace, MIN_LAG) * 1_000_000)
    overdue = format_ts(ts_us(horizon_end) + lag) if horizon_end else None
    recent = _witness_cutoff(now_us, grace)  # (what arrived since may be on its way to it)
    behind: list[str] = []  # first arrival of each item the outside log should hold by now
    for st in unexplained:
        first = st.inside_first_ts or st.last_ts
        if st.inside_first_ts is None:
            st.state = "not_accepted"
            problems.append(
                Discrepancy(
                    "NOT_ACCEPTED",
                    st.item,
                    f"outside records about it (last {st.last_ts}) but no intake.accepted",
                )
            )
        elif overdue is not None and overdue < first <= recent:
            st.state = "after_outside_log"
            st.evidence.append(
                "arrived more than the grace period (at least 10 minutes) after the outside "
                "log's last record: the outside log read has stopped growing, or is an old copy"
            )
            behind.append(first)
        elif tolerance is None or first > tolerance:
            st.state = "not_yet_in_outside_log"
            st.evidence.append(
                "no intake.accepted in the outside log yet: the item arrived after, or within "
                "the grace period of, the outside log's last record (mirror lag)"
            )
        elif out_stats.first_ts is not None and first < out_stats.first_ts:
            st.state = "before_outside_log"
            st.evidence.append("arrived before the first record of the outside log read")
        else:
            st.state = "unexplained"
            problems.append(
                Discrepancy(
                    "UNEXPLAINED_ARRIVAL",
                    st.item,
                    f"seen inside at {first} but never accepted in the outside log",
                )
            )
    problems.extend(_behind(out_stats, held, identity, behind))
    gaps = _gaps(acc, accepted)
    _overtaken(accepted)
    holes, hole_count = _holes(accepted)
    return Reconciliation(
        now=format_ts(now_us),
        grace=grace,
        accepted=accepted,
        unexplained=unexplained,
        discrepancies=problems,
        gaps=gaps,
        holes=holes,
        hole_count=hole_count,
        checks=checks,
        stats=[out_stats, in_stats],
        accountant=acc,
        control=control,
    )


def _origin_problems(
    out_stats: LogStats, in_stats: LogStats, checks: list[LogCheck]
) -> list[Discrepancy]:
    """Each log's origin (its name in its checkpoints and audit.started records) against the
    one expected for its side, when its agent's config names it (``audit.origin``; or
    ``--outside-origin``/``--inside-origin``); and the outside log's against the one the
    inside witnessed (its ``audit.witnessed`` records: the log the inside mirrored). A log
    of another gateway signed by the same key, or an old log, is not the one to account
    for. (A swapped pair is WRONG_SIDE.)"""
    problems: list[Discrepancy] = []
    actual: dict[str, str | None] = {}
    for st in (out_stats, in_stats):
        check = next((c for c in checks if c.location.side == st.side), None)
        rep = check.report if check is not None else None
        origin = actual[st.side] = rep.origin if rep is not None and rep.ok else st.origin
        if origin is None:
            continue
        expected = check.location.origin if check is not None else None
        if expected is not None and origin != expected:
            problems.append(
                Discrepancy(
                    "ORIGIN_MISMATCH",
                    None,
                    f"the {st.side} log given is the log {origin!r}, but {expected!r} was "
                    f"expected (audit.origin in its agent's config, or --{st.side}-origin): "
                    "it is another log than the one to account for",
                )
            )
    outside = actual.get("outside")
    seen = in_stats.witnessed_origins
    if outside is not None and seen and outside not in seen:
        # (any log the inside witnessed: after a rebuilt outside, the old log's copy too)
        names = ", ".join(repr(w) for w in seen)
        problems.append(
            Discrepancy(
                "ORIGIN_MISMATCH",
                None,
                f"the outside log given is the log {outside!r}, but the inside log witnessed "
                f"the outside's log as {names} (audit.witnessed): it is not a log the inside "
                "mirrored",
            )
        )
    return problems


def _refused(witnessed: Witnessed) -> list[Discrepancy]:
    """The inside's witness refused the outside's log (``audit.witness_inconsistent``: it
    contradicts the mirror) and has witnessed nothing since: the outside goes on with
    another log than the one mirrored (rebuilt or rolled back, or rewritten), and what it
    records is in no mirror. (Refusals followed by a log witnessed, as after a rebuilt
    outside's log is mirrored afresh, are counted in the inside log's read stats.)"""
    if not witnessed.stopped or witnessed.last_refusal is None:
        return []
    ts, reason = witnessed.last_refusal
    return [
        Discrepancy(
            "WITNESS_INCONSISTENT",
            None,
            f"the inside's witness refused the outside's log at {ts} ({reason}) and has "
            f"witnessed none of its checkpoints since ({witnessed.refused} refusal(s); "
            "audit.witness_inconsistent): the outside shipped a log that contradicts the "
            "inside's mirror (an outside rebuilt or restored from a backup or snapshot, or a "
            "rewritten log); what it recorded since is in no mirror (docs/OPERATIONS.md, "
            '"The outside\'s disk is lost")',
        )
    ]


def _forked(witnessed: Witnessed, identity: Identity) -> list[Discrepancy]:
    """The outside log read is none of the logs the inside witnessed: it holds as many
    records as a checkpoint witnessed of each, with another root. A fork (an outside rolled
    back to a backup or snapshot and run on, or a log re-signed without some of its records)
    or another log: what the logs witnessed accepted cannot be accounted for with it."""
    if identity.contradicted is None:
        return []
    log, point = identity.contradicted
    others = len(witnessed.logs) - 1
    also = f", nor with any of the {others} other log(s) it witnessed before" if others else ""
    if witnessed.left_out:
        also += f" (the {witnessed.left_out} oldest logs witnessed were not kept)"
    return [
        Discrepancy(
            "OUTSIDE_LOG_FORKED",
            None,
            f"the outside log given is not a log the inside witnessed: the inside witnessed "
            f"checkpoint {point.size} of {log.origin!r} (root {point.root[:16]}...) at "
            f"{point.ts} (audit.witnessed), but the first {point.size} records of the log "
            f"given hash to another root; it agrees neither with the log witnessed "
            f"{'now' if log is witnessed.current else 'last'}{also}: a fork (an outside "
            "rolled back to a backup or snapshot, or a log rewritten by whoever holds its "
            "key) or another log; what the log witnessed accepted is not accounted for by "
            "this run",
        )
    ]


def _superseded(witnessed: Witnessed, identity: Identity) -> list[Discrepancy]:
    """The outside log read is one the inside witnessed, but the inside has witnessed another
    outside log since: the copy of an old log (set aside after a rebuilt outside,
    docs/OPERATIONS.md). What the log witnessed now accepted is in no log read: without
    this, its items would pass silently (arrivals within minutes of the copy's end look like
    mirror lag, and an item that never arrived is in neither log)."""
    given, now = identity.log, witnessed.current
    if given is None or now is None or given is now:
        return []
    since = now.number - given.number
    return [
        Discrepancy(
            "OUTSIDE_LOG_SUPERSEDED",
            None,
            "the outside log given is an older log than the one the inside witnesses now: the "
            f"inside witnessed it as {given.origin!r} from {given.first_ts} to "
            f"{given.last_ts} (up to checkpoint {given.size}), and since {now.first_ts} "
            f"{'another log' if since == 1 else f'{since} other logs'}, now {now.origin!r} "
            f"(checkpoint {now.size} at {now.last_ts}; audit.witnessed); what that log "
            "accepted is not accounted for by this run: reconcile its copy (the inside's "
            "mirror) too",
        )
    ]


def _behind(
    out_stats: LogStats, held: int, identity: Identity, arrivals: list[str]
) -> list[Discrepancy]:
    """The outside log read (``held`` records) is older than the inside says it should be:
    the inside witnessed a later checkpoint of the log it is (``identity.log``; before the
    witness cutoff: a live mirror may grow between its reading and the inside log's), or of
    an earlier log it may as well be (``identity.earlier``), or items arrived long after its
    last record. A rolled-back or stale copy (of the mirror, say), or an outside that
    stopped shipping its log, would otherwise hide what the outside recorded after it."""
    out: list[Discrepancy] = []
    log = identity.log
    if log is not None and log.due is not None and log.due.size > held:
        when, size = log.due.ts, log.due.size
        out.append(
            Discrepancy(
                "OUTSIDE_LOG_BEHIND",
                None,
                f"the inside witnessed checkpoint {size} of the outside log at {when} "
                f"(audit.witnessed), but the outside log read holds {held} records: an old or "
                "rolled-back copy, and what the outside recorded after them is not accounted for",
            )
        )
    earlier = identity.earlier
    if log is not None and earlier is not None and earlier.due is not None:
        out.append(
            Discrepancy(
                "OUTSIDE_LOG_BEHIND",
                None,
                f"the outside log read holds {held} records, the beginning of the log the inside "
                f"witnesses now (since {log.first_ts}) and also of the log it witnessed before "
                f"({earlier.origin!r}, up to checkpoint {earlier.due.size} at {earlier.due.ts}; "
                "audit.witnessed): it may be a stale copy of that earlier log, whose records "
                f"after {held} are then not accounted for; until the log witnessed now has "
                "been witnessed for longer than the grace period (at least 10 minutes), "
                "nothing tells which",
            )
        )
    if arrivals:
        out.append(
            Discrepancy(
                "OUTSIDE_LOG_BEHIND",
                None,
                f"{len(arrivals)} item(s) arrived inside from {min(arrivals)} to "
                f"{max(arrivals)}, more than the grace period (at least 10 minutes) after the "
                f"outside log's last record ({out_stats.last_ts}): the outside log read stopped "
                "growing (is the mirror stuck? `ferry inside mirror status`) or is an old "
                "copy; they are listed as after_outside_log",
            )
        )
    return out


_RANK = operator.attrgetter("rank")


def _decide(st: ItemState, cutoff: str, problems: list[Discrepancy]) -> None:
    if st.accepted > 1:
        problems.append(
            Discrepancy("ACCEPTED_TWICE", st.item, f"{st.accepted} intake.accepted records")
        )
    if st.sent_sha256 and st.received_sha256 and st.sent_sha256 != st.received_sha256:
        problems.append(
            Discrepancy(
                "HASH_CONFLICT",
                st.item,
                f"sent with sha256 {st.sent_sha256}, received with {st.received_sha256}",
            )
        )
    released = st.rejected_by == "delivery" and st.released_ts is not None
    if st.delivered_ts is not None and not released:
        st.state = "delivered"
        if st.rejected_ts is not None:
            problems.append(
                Discrepancy(
                    "CONFLICTING_OUTCOME",
                    st.item,
                    f"delivered at {st.delivered_ts} but also rejected ({st.rejected_by}) "
                    f"at {st.rejected_ts}: {st.rejected_reason or 'no reason given'}",
                )
            )
        return
    if released:  # delivered by a person: rejected inside, then released from quarantine
        # (the release's delivery.delivered record, if any, gave the delivered path)
        st.state = "delivered"
        st.reason = st.rejected_reason
        st.evidence.append(
            f"rejected inside at {st.rejected_ts}: {st.rejected_reason or 'no reason given'}; "
            f"released from quarantine by {st.released_by} at {st.released_ts}"
        )
        return
    if st.rejected_ts is not None:
        st.state = "rejected"
        st.reason = st.rejected_reason or st.recheck_reason or st.verdict_reason
        return
    if st.accepted_ts is None:
        return  # inside only: decided by the caller
    st.state = "in_flight" if st.accepted_ts >= cutoff else "missing"
    st.evidence.append(st.stage())
    if st.lost is not None and st.received_ts is not None:
        st.evidence.append(f"inside gave up on it ({st.lost})")


def _by_channel(accepted: list[ItemState]) -> dict[str | None, list[tuple[int, str, ItemState]]]:
    out: dict[str | None, list[tuple[int, str, ItemState]]] = {}
    for st in accepted:
        if st.seq is not None:
            out.setdefault(st.channel, []).append((st.seq, st.item, st))
    for rows in out.values():
        rows.sort(key=lambda r: (r[0], r[1]))
    return out


def _gaps(acc: Accountant, accepted: list[ItemState]) -> list[SequenceGap]:
    channels = _by_channel(accepted)
    gaps = []
    for rec in acc.gap_records:
        obj: dict[str, Any] = rec.get("object") or {}
        detail: dict[str, Any] = rec.get("detail") or {}
        first, last = field_int(detail, "first"), field_int(detail, "last")
        if first is None or last is None or last < first:
            continue
        channel, epoch = field_str(obj, "channel"), field_str(obj, "epoch")
        rows = channels.get(channel, [])
        lo = bisect.bisect_left(rows, (first, ""))
        hit: list[str] = []
        seqs: set[int] = set()
        for seq, item, st in rows[lo:]:
            if seq > last:
                break
            if epoch is not None and st.epoch is not None and st.epoch != epoch:
                continue
            if st.accepted_ts is not None and st.accepted_ts > rec["ts"]:
                continue  # accepted after the gap was seen: another epoch's seq
            hit.append(item)
            seqs.add(seq)
            if st.state in ("missing", "in_flight"):
                st.evidence.append(
                    f"the inside reported a sequence gap {first}..{last} on its channel "
                    f"at {rec['ts']}"
                )
        unknown = (last - first + 1) - len(seqs)
        gaps.append(SequenceGap(rec["ts"], channel, epoch, first, last, tuple(hit), unknown))
    return gaps


def _overtaken(accepted: list[ItemState]) -> None:
    """Evidence for open items: a later item of the same channel did arrive."""
    latest: dict[tuple[str | None, str | None], tuple[int, str]] = {}
    for st in accepted:
        if st.seq is not None and st.received_ts is not None:
            key = (st.channel, st.epoch)
            if key not in latest or st.seq > latest[key][0]:
                latest[key] = (st.seq, st.received_ts)
    for st in accepted:
        if st.state not in ("missing", "in_flight") or st.seq is None:
            continue
        seen = latest.get((st.channel, st.epoch))
        if seen is not None and seen[0] > st.seq:
            st.evidence.append(
                f"overtaken: a later item of its channel (seq {seen[0]}) arrived at {seen[1]}"
            )


def _holes(accepted: list[ItemState]) -> tuple[list[dict[str, Any]], int]:
    """Sequence numbers between accepted items of one channel with no intake.accepted."""
    seqs: dict[tuple[str | None, str | None], list[int]] = {}
    for st in accepted:
        if st.seq is not None:
            seqs.setdefault((st.channel, st.epoch), []).append(st.seq)
    listed: list[dict[str, Any]] = []
    count = 0
    for (channel, epoch), values in sorted(seqs.items(), key=lambda kv: (str(kv[0]), kv[1])):
        values.sort()
        for a, b in itertools.pairwise(values):
            if b > a + 1:
                count += b - a - 1
                if len(listed) < MAX_LISTED_HOLES:
                    listed.append(
                        {"channel": channel, "epoch": epoch, "first": a + 1, "last": b - 1}
                    )
    return listed, count


# --- text -----------------------------------------------------------------------------------


def _item_line(st: ItemState) -> str:
    where = f"channel {safe(st.channel)}" if st.channel else "no channel"
    if st.seq is not None:
        where += f" #{st.seq}"
    name = f"  {json.dumps(st.name)}" if st.name else ""
    return f"  {safe(st.item)}  {where}  accepted {st.accepted_ts}{name}"


def render_text(rec: Reconciliation, *, limit: int = 200) -> Iterator[str]:
    """The reconciliation for people; lists are cut after ``limit`` entries."""
    yield f"ferry audit reconcile  now {rec.now}  grace {rec.grace:g} s"
    for check in rec.checks:
        rep = check.report
        size = f"; {rep.tree_size} records, root {rep.root[:16]}" if rep and rep.ok else ""
        yield f"  {safe(check.location.describe())}: {safe(check.note)}{size}"
    for st in rec.stats:
        if st.malformed or st.torn:
            yield (
                f"  {st.side} log: {st.malformed} malformed line(s) skipped, "
                f"{st.torn} unterminated last line(s)"
            )
        refusal = st.witnessed.last_refusal
        if refusal is not None and not st.witnessed.stopped:  # (else WITNESS_INCONSISTENT)
            yield (
                f"  {st.side} log: its witness refused the outside's log "
                f"{st.witnessed.refused} time(s), last at {refusal[0]} "
                "(audit.witness_inconsistent), and has witnessed a log since"
            )
    c = rec.counts()
    by = Counter(s.rejected_by for s in rec.by_state("rejected"))
    released = rec.released
    yield (
        f"items accepted outside: {len(rec.accepted)}   delivered {c['delivered']}"
        + (f" (released from quarantine {len(released)})" if released else "")
        + f"   rejected {c['rejected']} (outside verdict {by['verdict']}, inside {by['delivery']})"
        f"   in flight {c['in_flight']}   missing {c['missing']}"
    )
    refused = sum(rec.accountant.intake_rejected.values())
    if refused:
        yield f"refused at intake (never accepted, no item): {refused}"
    if rec.control:
        yield f"control objects (channels {CONTROL_PREFIX}*, e.g. the audit mirror): {rec.control}"

    def section(title: str, rows: list[ItemState], detail: bool) -> Iterator[str]:
        if not rows:
            return
        yield ""
        yield f"{title} ({len(rows)})"
        for st in rows[:limit]:
            yield _item_line(st)
            if detail:
                for ev in st.evidence:
                    yield f"      {safe(ev)}"
            else:
                by_whom = "outside verdict" if st.rejected_by == "verdict" else "inside"
                yield f"      rejected by {by_whom} at {st.rejected_ts}: {safe(st.reason or '-')}"
        if len(rows) > limit:
            yield f"  ... and {len(rows) - limit} more (see --json)"

    yield from section(
        f"MISSING: accepted more than {rec.grace:g} s ago, neither delivered nor rejected",
        list(rec.by_state("missing")),
        True,
    )
    yield from section("IN FLIGHT", list(rec.by_state("in_flight")), True)
    yield from section("REJECTED", list(rec.by_state("rejected")), False)
    yield from section("RELEASED FROM QUARANTINE (rejected inside, delivered by a person)",
                       released, True)  # fmt: skip
    if rec.discrepancies:
        yield ""
        yield f"DISCREPANCIES ({len(rec.discrepancies)})"
        for d in rec.discrepancies[:limit]:
            yield f"  {d.code}  {safe(d.item or '-')}  {safe(d.message)}"
    pending = [s for s in rec.unexplained if s.state != "unexplained"]
    if pending:
        yield ""
        yield f"INSIDE ITEMS NOT (YET) IN THE OUTSIDE LOG ({len(pending)})"
        for item in pending[:limit]:
            yield f"  {safe(item.item)}  first seen inside {item.inside_first_ts}  ({item.state})"
    if rec.gaps:
        yield ""
        yield f"SEQUENCE GAPS reported by the inside ({len(rec.gaps)})"
        for g in rec.gaps[:limit]:
            items = ", ".join(safe(i) for i in g.items[:5]) or "none"
            more = f" +{len(g.items) - 5}" if len(g.items) > 5 else ""
            yield (
                f"  {g.ts}  channel {safe(g.channel or '-')}  seq {g.first}..{g.last}  "
                f"accepted items in it: {items}{more}; not accepted outside: {g.unknown}"
            )
    if rec.hole_count:
        yield ""
        yield (
            f"note: {rec.hole_count} sequence number(s) between accepted items have no "
            "intake.accepted record (see --json outside_seq_holes)"
        )
    yield ""
    missing = c["missing"]
    if missing:
        yield f"RESULT: {missing} item(s) MISSING"
    elif rec.discrepancies:
        yield f"RESULT: nothing missing, {len(rec.discrepancies)} discrepancy(ies)"
    else:
        yield "RESULT: every accepted item is accounted for"

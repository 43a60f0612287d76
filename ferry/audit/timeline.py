"""Read audit logs as an auditor does, and replay the life of items across both sides.

:func:`read_log` streams the records of one log directory: segments in order,
read in large chunks, one ``json.loads`` per line, never the whole log in memory.
It is a reader, not a verifier: ``ferry audit verify`` (and ``reconcile``, which
runs it first) proves the log is intact. A line that is not a well-formed record
is skipped and counted (``malformed``), an unterminated last line (a writer in
mid-write) is left for later (``torn``), and every string read from a record is
treated as hostile by whoever prints it (:func:`safe`).

:func:`replay` joins the outside log (or the inside's byte-identical mirror of
it) and the inside log on the item id (``object.item``, else ``corr``;
docs/AUDIT.md §7) and returns each item's records in time order:
intake -> verdict -> sent xN -> received -> re-check -> delivered or rejected.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ferry.audit.files import open_regular
from ferry.audit.merkle import CompactRange, leaf_hash
from ferry.audit.record import MAX_RECORD_BYTES, per_item
from ferry.audit.segments import list_segments
from ferry.audit.witnessed import Witnessed
from ferry.errors import UsageError

SIDES = ("outside", "inside")
SIDE_ORDER = {"outside": 0, "inside": 1}
# Events about one item (docs/AUDIT.md §7). intake.rejected has no item id: the
# item was never accepted.
ITEM_EVENT_PREFIXES = ("intake.", "verdict", "quarantine.", "transfer.", "recheck", "delivery.")
# Log housekeeping that replay leaves out even with --system (verify covers it).
HOUSEKEEPING = frozenset({"audit.checkpoint", "audit.segment_opened"})
READ_CHUNK = 1 << 20  # bytes read from a segment at a time
_TS = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")
# Bytes of a record line before its event name: {"v":1,"idx":<16 digits>,"ts":"<27>","event":"
_EVENT_WINDOW = 100
_AUDIT_EVENT = '"event":"audit.'
_STARTED = '"event":"audit.started"'
_WITNESSED = '"event":"audit.witnessed"'
_REFUSED = '"event":"audit.witness_'  # (audit.witness_inconsistent, whole past the window)
MAX_WITNESSED_ORIGINS = 8  # distinct origins noted from audit.witnessed records


def _audit_record(line: str, limit: int | None) -> dict[str, Any] | None:
    """An ``audit.*`` record line, decoded, if it is well formed and below ``limit``."""
    if len(line) > MAX_RECORD_BYTES:
        return None
    try:
        rec, _ = _DECODE(line)
    except (ValueError, RecursionError):
        return None
    if not _well_formed(rec) or (limit is not None and rec["idx"] >= limit):
        return None
    return rec  # type: ignore[no-any-return]


def note_audit_record(stats: LogStats, rec: dict[str, Any]) -> None:
    """What reconcile takes from a log's own (well-formed) records: the side and origin its
    first ``audit.started`` names; the origins its ``audit.witnessed`` records name (the
    inside's witness of the outside's log), the logs they witnessed and how far, and the
    witness's refusals (``audit.witness_inconsistent``)."""
    event: str = rec["event"]
    detail: dict[str, Any] = rec.get("detail", _EMPTY)
    if event == "audit.started":
        if stats.written_by is None:
            side = detail.get("side")
            stats.written_by = side if side in SIDES else None
        if stats.origin is None:
            origin = detail.get("origin")
            stats.origin = origin if isinstance(origin, str) else None
    elif stats.side != "inside":
        return  # (the witness's records are the inside's: in an outside log, forged)
    elif event == "audit.witnessed":
        origin = field_str(detail, "origin")
        if (
            origin is not None
            and origin not in stats.witnessed_origins
            and len(stats.witnessed_origins) < MAX_WITNESSED_ORIGINS
        ):
            stats.witnessed_origins.append(origin)
        size, root = detail.get("size"), detail.get("root")
        if type(size) is int and isinstance(root, str) and _ROOT_MATCH(root) is not None:
            stats.witnessed.note(rec["ts"], origin, size, root)
    elif event == "audit.witness_inconsistent":
        stats.witnessed.refusal(rec["ts"], rec.get("reason"))


# --- timestamps ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _day_us(date: str) -> int:
    day = datetime.strptime(date, "%Y-%m-%d").replace(tzinfo=UTC)
    return int(day.timestamp()) * 1_000_000


def ts_us(ts: str) -> int:
    """Microseconds since the epoch of a well-formed record timestamp (fast path)."""
    return (
        _day_us(ts[:10])
        + (int(ts[11:13]) * 3600 + int(ts[14:16]) * 60 + int(ts[17:19])) * 1_000_000
        + int(ts[20:26])
    )


def parse_when(text: str) -> str:
    """A user's time (``2026-11-21``, ``2026-11-21T21:25``, ``...:25.5Z``; UTC) as a record
    timestamp string, so that it compares with ``ts`` as text. Raises UsageError."""
    value = text.strip().removesuffix("Z").removesuffix("z")
    for fmt in ("%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            dt = datetime.strptime(value.replace(" ", "T"), fmt)
        except ValueError:
            continue
        return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    raise UsageError(f"not a UTC time: {text!r} (use 2026-11-21T21:25:00Z or 2026-11-21)")


# --- untrusted strings ----------------------------------------------------------------------

# C0/C1 controls, DEL, and the Unicode bidirectional overrides that can reorder what
# a terminal shows ("Trojan Source"); a record's strings come from clerks and peers.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def safe(text: object) -> str:
    """``text`` with control and bidi characters escaped, for a terminal or a text file."""
    s = text if isinstance(text, str) else str(text)
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", s)


def field_str(mapping: dict[str, Any], key: str) -> str | None:
    value = mapping.get(key)
    return value if isinstance(value, str) else None


def field_int(mapping: dict[str, Any], key: str) -> int | None:
    value = mapping.get(key)
    return value if type(value) is int else None


# --- reading --------------------------------------------------------------------------------


@dataclass
class LogStats:
    """What :func:`read_log` saw in one log."""

    side: str
    path: str
    lines: int = 0  # complete lines read (records and malformed lines)
    malformed: int = 0  # lines skipped: not a well-formed record
    torn: int = 0  # an unterminated last line (left for a later read)
    last_idx: int | None = None
    first_ts: str | None = None  # of the records returned
    last_ts: str | None = None
    limit: int | None = None  # records read only below this index (a verified tree size)
    written_by: str | None = None  # the side the first audit.started record names
    origin: str | None = None  # the origin the first audit.started record names
    # origins audit.witnessed records name
    witnessed_origins: list[str] = field(default_factory=list)
    # the outside logs an inside log's audit.witnessed records witnessed (set its cutoff
    # before the log is read)
    witnessed: Witnessed = field(default_factory=Witnessed)
    # Set before an outside log is read: the sizes at which to take the root of its records'
    # tree (the checkpoints the inside witnessed), into roots_at (size -> root hex).
    want_roots: frozenset[int] = frozenset()
    roots_at: dict[int, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "side": self.side,
            "path": self.path,
            "lines": self.lines,
            "malformed": self.malformed,
            "torn": self.torn,
            "last_idx": self.last_idx,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "limit": self.limit,
            "witness_refusals": self.witnessed.refused,  # audit.witness_inconsistent records
        }


_TS_MATCH = _TS.fullmatch
_ROOT_MATCH = re.compile("[0-9a-f]{64}").fullmatch
_EMPTY: dict[str, Any] = {}


def _well_formed(rec: object) -> bool:
    """The shape the readers rely on (the full schema is verify's job)."""
    if type(rec) is not dict:
        return False
    get = rec.get
    ts = get("ts")
    reason = get("reason")
    corr = get("corr")
    return (
        type(get("idx")) is int
        and type(ts) is str
        and _TS_MATCH(ts) is not None
        and type(get("event")) is str
        and type(get("result")) is str
        and (reason is None or type(reason) is str)
        and (corr is None or type(corr) is str)
        and type(get("subject")) is dict
        and type(get("object", _EMPTY)) is dict
        and type(get("detail", _EMPTY)) is dict
    )


def _lines(path: Path, stats: LogStats) -> Iterator[str]:
    """Complete lines of one segment; an unterminated tail is counted as torn.

    Chunks are decoded as Latin-1 (one byte, one character, never an error) and
    split as text; :func:`read_log` refuses lines that are not ASCII. Only a regular file is
    read (:class:`~ferry.audit.files.UnsafeFile` otherwise: a FIFO swapped in after the
    listing must not hang the reader, nor a symbolic link be followed).
    """
    with open(open_regular(path), "rb") as f:
        rest = ""
        while chunk := f.read(READ_CHUNK):
            parts = (rest + chunk.decode("latin-1")).split("\n")
            rest = parts.pop()
            if len(rest) > MAX_RECORD_BYTES:  # a runaway line: drop it as it grows
                stats.malformed += 1
                rest = ""
            yield from parts
        if rest:
            stats.torn += 1


_DECODE = json.JSONDecoder().raw_decode


def read_log(
    directory: Path,
    side: str,
    *,
    limit: int | None = None,
    stats: LogStats | None = None,
    skip_audit: bool = True,
) -> Iterator[dict[str, Any]]:
    """The well-formed records of the log in ``directory``, in file order.

    ``limit``: stop at the first record whose index is that or more (read only
    what a verified tree size covers). ``skip_audit``: leave out the log's own
    ``audit.*`` records without decoding them (items never appear in them).
    """
    st = stats if stats is not None else LogStats(side, str(directory))
    st.limit = limit
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{directory}: no such audit log directory")
    first_ts = last_ts = ""
    # the records' tree, as far as st.want_roots asks (as verify computes it)
    tree = CompactRange() if st.want_roots else None
    top = max(st.want_roots, default=0)
    for _, segment in list_segments(directory):
        for line in _lines(segment, st):
            st.lines += 1
            if tree is not None:
                tree.append(leaf_hash(line.encode("latin-1")))  # (the line's bytes)
                if tree.size in st.want_roots:
                    st.roots_at[tree.size] = tree.root().hex()
                if tree.size >= top:
                    tree = None
            if skip_audit and line.find(_AUDIT_EVENT, 0, _EVENT_WINDOW) > 0:
                wanted = (
                    line.find(_WITNESSED, 0, _EVENT_WINDOW) > 0
                    or line.find(_REFUSED, 0, _EVENT_WINDOW) > 0
                ) or (
                    (st.written_by is None or st.origin is None)
                    and line.find(_STARTED, 0, _EVENT_WINDOW) > 0
                )
                if wanted:
                    rec = _audit_record(line, limit)
                    if rec is not None:
                        note_audit_record(st, rec)
                continue
            if len(line) > MAX_RECORD_BYTES or not line.isascii():
                st.malformed += 1
                continue
            try:
                rec, end = _DECODE(line)
            except (ValueError, RecursionError):
                st.malformed += 1
                continue
            if end != len(line) or not _well_formed(rec):
                st.malformed += 1
                continue
            idx = rec["idx"]
            if limit is not None and idx >= limit:
                break
            st.last_idx = idx
            ts = rec["ts"]
            if not first_ts:
                first_ts = st.first_ts = ts
            if ts > last_ts:
                last_ts = st.last_ts = ts
            yield rec
        else:
            continue
        break  # reached the limit


def item_of(rec: dict[str, Any]) -> str | None:
    """The item a record is about: ``object.item``, else ``corr`` of an item event."""
    obj = rec.get("object")
    if obj:
        item = obj.get("item")
        if isinstance(item, str) and item:
            return item
    event: str = rec["event"]
    if event.startswith(ITEM_EVENT_PREFIXES) and event != "intake.rejected":
        corr = rec.get("corr")
        return corr or None
    return None


def subject_label(subject: dict[str, Any]) -> str:
    kind = field_str(subject, "kind") or "?"
    ident = field_str(subject, "id") or "?"
    return f"{kind}:{ident}"


def terminal(event: str, result: str) -> str | None:
    """The end state a record puts its item in, if any (docs/AUDIT.md §7)."""
    if event == "delivery.delivered":
        return "delivered"
    if event == "delivery.rejected" or (event == "verdict" and result == "rejected"):
        return "rejected"
    return None


# --- replay ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayFilter:
    """Which items to show. Every given criterion must hold (an empty one is ignored)."""

    items: tuple[str, ...] = ()  # item ids or id prefixes
    channels: tuple[str, ...] = ()
    subjects: tuple[str, ...] = ()  # subject id, name, or "kind:id" of any record
    since: str | None = None  # record timestamps (see parse_when)
    until: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "items": list(self.items),
            "channels": list(self.channels),
            "subjects": list(self.subjects),
            "since": self.since,
            "until": self.until,
        }

    def item_ok(self, item: str) -> bool:
        return not self.items or item.startswith(self.items)

    def subject_ok(self, subject: dict[str, Any]) -> bool:
        if not self.subjects:
            return True
        names = {field_str(subject, "id"), field_str(subject, "name"), subject_label(subject)}
        return any(s in names for s in self.subjects)

    def time_ok(self, ts: str) -> bool:
        return (self.since is None or ts >= self.since) and (self.until is None or ts < self.until)


@dataclass(frozen=True, slots=True)
class Entry:
    """One record in a timeline (slim: what replay prints)."""

    ts: str
    side: str
    idx: int
    event: str
    result: str
    reason: str | None
    subject: str
    facts: str  # key=value facts from object and detail
    record: dict[str, Any] | None = None  # object, detail, corr (kept for --json)

    def sort_key(self) -> tuple[str, int, int]:
        return (self.ts, SIDE_ORDER.get(self.side, 2), self.idx)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "side": self.side,
            "idx": self.idx,
            "ts": self.ts,
            "event": self.event,
            "result": self.result,
            "reason": self.reason,
            "subject": self.subject,
        }
        if self.record is not None:
            out.update(self.record)
        return out


@dataclass
class Timeline:
    """The records of one item across both logs, in time order."""

    item: str
    entries: list[Entry] = field(default_factory=list)
    channel: str | None = None
    seq: int | None = None
    kind: str | None = None
    name: str | None = None
    outcome: str = "open"  # delivered, rejected or open (no end state yet)
    sides: set[str] = field(default_factory=set)
    matched_subject: bool = False
    matched_time: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "item": self.item,
            "channel": self.channel,
            "seq": self.seq,
            "kind": self.kind,
            "name": self.name,
            "outcome": self.outcome,
            "sides": sorted(self.sides, key=SIDE_ORDER.__getitem__),
            "records": [e.to_json() for e in self.entries],
        }


# Facts shown per event in the text timeline (object keys, then detail keys).
_OBJECT_FACTS = ("kind", "name", "size", "media_type", "path", "seq")
MAX_FACTS = 200  # characters of facts per line


def _facts(rec: dict[str, Any], *, first: bool) -> str:
    obj: dict[str, Any] = rec.get("object") or {}
    parts: list[str] = []
    if first or rec["event"].startswith("delivery."):
        parts.extend(f"{k}={obj[k]}" for k in _OBJECT_FACTS if k in obj and k != "seq")
    detail: dict[str, Any] = rec.get("detail") or {}
    for k in sorted(detail):
        v = detail[k]
        text = v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))
        parts.append(f"{k}={text}")
    text = " ".join(parts)
    return text if len(text) <= MAX_FACTS else text[: MAX_FACTS - 1] + "\u2026"


@dataclass
class Replay:
    """What :func:`replay` returns."""

    timelines: list[Timeline]
    other: list[Entry]  # records about no item (with --system)
    logs: list[LogStats]
    filters: ReplayFilter

    def to_json(self) -> dict[str, Any]:
        return {
            "filters": self.filters.to_json(),
            "logs": [s.to_json() for s in self.logs],
            "items": [t.to_json() for t in self.timelines],
            "other": [e.to_json() for e in self.other],
        }


def replay(
    logs: Iterable[tuple[str, Path]],
    filters: ReplayFilter | None = None,
    *,
    keep_records: bool = False,
    system: bool = False,
    limits: dict[str, int] | None = None,
) -> Replay:
    """The timelines of the items in ``logs`` ((side, directory) pairs) that pass ``filters``.

    ``keep_records``: keep each record's object, detail and corr (for JSON).
    ``system``: also return the records about no item (agent, link, key, config
    and audit events), filtered by time and subject.
    """
    filters = filters or ReplayFilter()
    by_item: dict[str, Timeline] = {}
    other: list[Entry] = []
    all_stats: list[LogStats] = []
    for side, directory in logs:
        st = LogStats(side, str(directory))
        all_stats.append(st)
        limit = (limits or {}).get(side)
        for whole in read_log(directory, side, limit=limit, stats=st, skip_audit=not system):
            for rec in per_item(whole):  # a batch record is in each of its items' timelines
                _place(rec, side, filters, by_item, other, keep_records=keep_records, system=system)
    chosen = [
        tl
        for tl in by_item.values()
        if tl.matched_subject
        and tl.matched_time
        and (not filters.channels or tl.channel in filters.channels)
    ]
    for tl in chosen:
        tl.entries.sort(key=Entry.sort_key)
    chosen.sort(key=lambda t: (t.entries[0].sort_key(), t.item))
    other.sort(key=Entry.sort_key)
    return Replay(chosen, other, all_stats, filters)


def _place(
    rec: dict[str, Any],
    side: str,
    filters: ReplayFilter,
    by_item: dict[str, Timeline],
    other: list[Entry],
    *,
    keep_records: bool,
    system: bool,
) -> None:
    """Add one record to its item's timeline (or to ``other``)."""
    item = item_of(rec)
    if item is None:
        if (
            system
            and rec["event"] not in HOUSEKEEPING
            and filters.time_ok(rec["ts"])
            and filters.subject_ok(rec["subject"])
        ):
            other.append(_entry(rec, side, keep_records, first=True))
        return
    if not filters.item_ok(item):
        return
    tl = by_item.get(item)
    if tl is None:
        tl = by_item[item] = Timeline(item)
    obj: dict[str, Any] = rec.get("object") or {}
    tl.channel = tl.channel or field_str(obj, "channel")
    tl.kind = tl.kind or field_str(obj, "kind")
    tl.name = tl.name or field_str(obj, "name")
    if tl.seq is None:
        tl.seq = field_int(obj, "seq")
    tl.sides.add(side)
    end = terminal(rec["event"], rec["result"])
    if end is not None and tl.outcome != "delivered":
        tl.outcome = end
    tl.matched_subject = tl.matched_subject or filters.subject_ok(rec["subject"])
    tl.matched_time = tl.matched_time or filters.time_ok(rec["ts"])
    tl.entries.append(_entry(rec, side, keep_records, first=not tl.entries))


def _entry(rec: dict[str, Any], side: str, keep: bool, *, first: bool) -> Entry:
    kept: dict[str, Any] | None = None
    if keep:
        kept = {k: rec[k] for k in ("object", "corr", "detail") if k in rec}
    return Entry(
        rec["ts"],
        side,
        rec["idx"],
        rec["event"],
        rec["result"],
        rec.get("reason"),
        subject_label(rec["subject"]),
        _facts(rec, first=first),
        kept,
    )


# --- text -----------------------------------------------------------------------------------


def _line(e: Entry) -> str:
    reason = f"  reason={safe(e.reason)}" if e.reason else ""
    facts = f"  {safe(e.facts)}" if e.facts else ""
    return (
        f"  {e.ts}  {e.side:<7}  #{e.idx:<8} {e.event:<20} {e.result:<8} "
        f"{safe(e.subject)}{reason}{facts}"
    )


def render_text(result: Replay) -> Iterator[str]:
    """The replay as lines of text (every record string escaped)."""
    for st in result.logs:
        note = f", {st.malformed} malformed line(s) skipped" if st.malformed else ""
        torn = ", an unterminated last line (writer busy)" if st.torn else ""
        yield f"# {st.side} log {safe(st.path)}: {st.lines} lines{note}{torn}"
    yield f"# {len(result.timelines)} item(s)"
    for tl in result.timelines:
        head = [f"item {safe(tl.item)}"]
        if tl.channel:
            head.append(
                f"channel {safe(tl.channel)}" + (f" #{tl.seq}" if tl.seq is not None else "")
            )
        if tl.kind:
            head.append(safe(tl.kind))
        if tl.name:
            head.append(json.dumps(tl.name))  # quoted and escaped (ensure_ascii)
        head.append(tl.outcome.upper())
        yield ""
        yield "  ".join(head)
        for e in tl.entries:
            yield _line(e)
    if result.other:
        yield ""
        yield f"other events ({len(result.other)})"
        for e in result.other:
            yield _line(e)

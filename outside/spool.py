"""The outside's durable spool: SQLite (WAL, synchronous=FULL) rows, plus one object file per
file item; a message's object stream is small and lives in its row.

An object stream is exactly what is sent: the content followed by the signed
trailer (manifest + signature). A file's object file is written to a temporary
name, fsynced and renamed before its row is committed, so after a crash every
committed row has a complete object stream. A message is acknowledged to its
client only after the transaction holding its row has committed.

Scheduling state lives here too: each item is sent ``sends_total`` times
(the channel's repeat schedule), ``spread_us`` apart in total; ``next_send_us``
is when the next copy is due.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.errors import StateError
from ferry.state import PRUNE_BATCH, open_db, rollback, transaction

SCHEMA_VERSION = 4  # 4: a message row holds its bundle member record, unsigned
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS channel_seq (channel TEXT PRIMARY KEY, last_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    object_id BLOB PRIMARY KEY,
    channel TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('file', 'message', 'audit')),
    priority INTEGER NOT NULL,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 BLOB NOT NULL,
    length INTEGER NOT NULL,          -- object stream length (content + trailer)
    spool_file TEXT,                  -- files: object stream file name under spool/
    data BLOB,                        -- messages: the object stream itself
    subject TEXT NOT NULL,            -- folder:<channel> or api:<client>
    source_path TEXT,                 -- where the clerk dropped it
    source_key TEXT,                  -- dev/inode/size/mtime of the original (crash recovery)
    state TEXT NOT NULL CHECK (state IN ('queued', 'sent')),
    sends_done INTEGER NOT NULL DEFAULT 0,
    sends_total INTEGER NOT NULL,
    spread_us INTEGER NOT NULL,
    next_send_us INTEGER NOT NULL,
    created_us INTEGER NOT NULL,
    first_sent_us INTEGER,
    sent_us INTEGER,
    intake_idx INTEGER,               -- index of its intake.accepted record in the audit log
    UNIQUE (channel, seq)
);
CREATE INDEX IF NOT EXISTS items_due ON items (state, next_send_us);
CREATE INDEX IF NOT EXISTS items_source ON items (source_key);
-- the periodic scan for repeats that came due: only items sent at least once, so a backlog
-- of new items (possibly many thousands) is not read every time
CREATE INDEX IF NOT EXISTS items_repeats ON items (priority, next_send_us)
    WHERE state='queued' AND sends_done>0;
CREATE TABLE IF NOT EXISTS submissions (
    client TEXT NOT NULL,
    submission_id TEXT NOT NULL,
    request_sha256 BLOB NOT NULL,
    object_id BLOB NOT NULL REFERENCES items (object_id),
    created_us INTEGER NOT NULL,
    PRIMARY KEY (client, submission_id)
);
-- (prune deletes an item's submission; the foreign key check also looks items up here)
CREATE INDEX IF NOT EXISTS submissions_item ON submissions (object_id);
"""


def now_us() -> int:
    return int(time.time() * 1e6)


@dataclass(frozen=True)
class SpoolItem:
    object_id: bytes
    channel: str
    seq: int
    name: str
    size: int
    length: int
    spool_file: Path | None
    kind: str = "file"
    priority: int = 1
    data: bytes | None = None
    sends_done: int = 0
    sends_total: int = 1
    audit_idx: int = -1
    """The last audit record of its intake: the sender sends it only once that is on disk
    (-1: nothing to wait for, e.g. resumed from the spool)."""
    deadline_us: int | None = None
    """No copy goes out after this (:func:`repeat_deadline`); None: no deadline (not sent
    yet, or a piece of the audit log's copy)."""


@dataclass(frozen=True)
class MessageRequest:
    """A message submission from an API client, already validated."""

    client: str
    submission_id: str
    request_sha256: bytes
    """SHA-256 of what the client sent: a resubmission must be identical."""
    channel: str
    sends_total: int
    spread_us: int
    priority: int


@dataclass(frozen=True)
class Sealed:
    """What ``seal(request, seq)`` returns: a message's bundle member record
    (:func:`ferry.wire.records.encode_member`; the sender signs the bundle)."""

    object_id: bytes
    stream: bytes
    name: str
    size: int
    sha256: bytes


@dataclass(frozen=True)
class Accepted:
    object_id: bytes
    seq: int
    duplicate: bool
    """True when this submission id was accepted before (the earlier answer is repeated)."""


@dataclass(frozen=True)
class Conflict:
    """The submission id was used before for different content."""

    object_id: bytes
    seq: int


@dataclass(frozen=True)
class SubmissionStatus:
    object_id: bytes
    channel: str
    seq: int
    state: str
    sends_done: int
    sends_total: int
    created_us: int
    sent_us: int | None
    request_sha256: bytes = b""
    """What the submission was (a message: its channel, schema and bytes; an upload: the
    file's SHA-256): a resubmission with other content is a conflict, never a duplicate."""


_SELECT_ITEMS = (
    "SELECT object_id, channel, seq, name, size, length, spool_file, kind, priority, data,"
    " sends_done, sends_total, first_sent_us, spread_us FROM items WHERE state='queued'"
)
_DUE_ALL = _SELECT_ITEMS + " AND next_send_us<=? ORDER BY priority, next_send_us LIMIT ?"
_DUE_REPEATS = (
    _SELECT_ITEMS.replace("FROM items", "FROM items INDEXED BY items_repeats")
    + " AND sends_done>0 AND next_send_us<=? ORDER BY priority, next_send_us LIMIT ?"
)
DUE_LIMIT = 10_000
"""Items :meth:`Spool.due` returns at most, unless told."""

# No copy of an item is sent later than this after its first (see Spool.expire_repeats): the
# inside's ledger keeps an item at least 8 days (inside.retention_days) after it arrived...
REPEAT_DEADLINE_US = 7 * 24 * 3600 * 1_000_000
# ... or, for a spread near its maximum (7 days), later than this after the spread's end.
REPEAT_SPREAD_GRACE_US = 3600 * 1_000_000


def repeat_deadline(first_sent_us: int, spread_us: int) -> int:
    """When the last copy of an item may go out at the latest (Spool.expire_repeats)."""
    return first_sent_us + max(REPEAT_DEADLINE_US, spread_us + REPEAT_SPREAD_GRACE_US)


class Spool:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "spool"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._db = open_db(state_dir / "outside.db", SCHEMA)
        self._lock = threading.Lock()
        self._numbering: dict[str, threading.Lock] = {}  # per channel: see numbering()
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            raise StateError(
                f"{state_dir / 'outside.db'}: spool schema version {row[0]}, this ferry "
                f"needs {SCHEMA_VERSION}; drain the spool with the old version first"
            )
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(items)")}
        if "intake_idx" not in columns:  # (a spool from before it: additive, same version)
            self._db.execute("ALTER TABLE items ADD COLUMN intake_idx INTEGER")
        # backlog_items counts what clerks and integrators queued (the API's BUSY
        # threshold); audit-mirror pieces are ferry's own and count only in bytes.
        count, total = self._db.execute(
            "SELECT count(*) FILTER (WHERE kind != 'audit'), coalesce(sum(length), 0)"
            " FROM items WHERE state='queued'"
        ).fetchone()
        self.backlog_items = int(count)
        self.backlog_bytes = int(total)
        self.orphans_removed = self._remove_orphans()

    def _remove_orphans(self) -> int:
        """Delete object files no queued row refers to: a crash between renaming a file into
        the spool and committing its row, or between the last send and the unlink. (The
        original is still in the drop folder in the first case and is taken again.)"""
        rows = self._db.execute(
            "SELECT spool_file FROM items WHERE state='queued' AND spool_file IS NOT NULL"
        ).fetchall()
        wanted = {str(r[0]) for r in rows}
        removed = 0
        for path in self.dir.glob("*.obj"):
            if path.name not in wanted:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def close(self) -> None:
        self._db.close()

    def next_epoch(self, now: int) -> int:
        """A sender epoch strictly greater than any used before, time-ordered when state is lost."""
        with self._lock, transaction(self._db):
            row = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
            epoch = max(now, (row[0] if row else 0) + 1)
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES('epoch', ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (epoch,),
            )
        return epoch

    def next_seq(self, channel: str) -> int:
        with self._lock:
            return self._next_seq(channel)

    @contextlib.contextmanager
    def numbering(self, channel: str) -> Iterator[int]:
        """The channel's next sequence number, held for the caller until it has added its
        item (or given up: the next caller then gets the same number). Two threads that
        spool files on one channel (the folder intake and an API upload) never share a
        number, and none is skipped (the inside would report a sequence gap)."""
        with self._lock:
            lock = self._numbering.setdefault(channel, threading.Lock())
        with lock:
            yield self.next_seq(channel)

    def _next_seq(self, channel: str) -> int:
        row = self._db.execute(
            "SELECT last_seq FROM channel_seq WHERE channel=?", (channel,)
        ).fetchone()
        return (row[0] if row else 0) + 1

    def _set_seq(self, channel: str, seq: int) -> None:
        self._db.execute(
            "INSERT INTO channel_seq(channel, last_seq) VALUES (?, ?) "
            "ON CONFLICT(channel) DO UPDATE SET last_seq=max(last_seq, excluded.last_seq)",
            (channel, seq),
        )

    def known_source(self, source_key: str) -> str | None:
        """The spool state of an item taken from a file with this identity, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT state FROM items WHERE source_key=?", (source_key,)
            ).fetchone()
        return None if row is None else str(row[0])

    def unforgotten_sources(self, channel: str) -> list[tuple[str, str]]:
        """``(source_path, source_key)`` of the channel's items whose key is not forgotten
        (see :meth:`forget_sources`)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT source_path, source_key FROM items WHERE channel=?"
                " AND source_key IS NOT NULL AND source_key != '' AND source_path != ''",
                (channel,),
            ).fetchall()
        return [(str(r[0]), str(r[1])) for r in rows]

    def forget_sources(self, source_keys: Collection[str]) -> None:
        """The clerk's originals of these items have left the drop folder: a file found
        there later with the same identity (moved back from ``sent/`` to be sent again) is a
        new drop, not one the agent crashed before finishing. Not waited onto the disk: what a
        power cut takes back is forgotten again at the next start (see
        ``FolderIntake.forget_finished_sources``)."""
        if not source_keys:
            return
        with self._lock, transaction(self._db, durable=False):
            self._db.executemany(
                "UPDATE items SET source_key=NULL WHERE source_key=?",
                [(k,) for k in dict.fromkeys(source_keys)],
            )

    # ------------------------------------------------------------------ files
    def add(
        self,
        item: SpoolItem,
        sha256: bytes,
        source_path: str,
        source_key: str,
        *,
        subject: str = "",
        spread_us: int = 0,
        submission: tuple[str, str, bytes] | None = None,
    ) -> None:
        """Commit a file item whose object file is already durable.

        ``submission`` is ``(client, submission id, request SHA-256)`` for API uploads.
        """
        self.add_many(
            [(item, sha256, source_path, source_key)],
            subject=subject,
            spread_us=spread_us,
            submission=submission,
        )

    def add_many(
        self,
        entries: Sequence[tuple[SpoolItem, bytes, str, str]],
        *,
        subject: str = "",
        spread_us: int = 0,
        submission: tuple[str, str, bytes] | None = None,
    ) -> None:
        """Commit file items whose object files are already durable, in one transaction:
        ``(item, sha256, source path, source key)`` each (a folder's batch: one channel)."""
        if any(item.spool_file is None for item, _, _, _ in entries):
            raise ValueError("a file item needs its spool file")
        if submission is not None and len(entries) != 1:
            raise ValueError("a submission names one item")
        created = now_us()
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for item, sha256, source_path, source_key in entries:
                    assert item.spool_file is not None
                    self._db.execute(
                        "INSERT INTO items(object_id, channel, seq, kind, priority, name,"
                        " size, sha256, length, spool_file, subject, source_path, source_key,"
                        " state, sends_total, spread_us, next_send_us, created_us, intake_idx)"
                        " VALUES (?,?,?,'file',?,?,?,?,?,?,?,?,?,'queued',?,?,?,?,?)",
                        (
                            item.object_id,
                            item.channel,
                            item.seq,
                            item.priority,
                            item.name,
                            item.size,
                            sha256,
                            item.length,
                            item.spool_file.name,
                            subject or f"folder:{item.channel}",
                            source_path,
                            source_key,
                            item.sends_total,
                            spread_us,
                            created,
                            created,
                            item.audit_idx if item.audit_idx >= 0 else None,
                        ),
                    )
                    self._set_seq(item.channel, item.seq)
                    if submission is not None:
                        self._db.execute(
                            "INSERT INTO submissions VALUES (?,?,?,?,?)",
                            (*submission, item.object_id, created),
                        )
                self._db.execute("COMMIT")
            except sqlite3.Error:
                rollback(self._db)
                raise
            self.backlog_items += len(entries)
            self.backlog_bytes += sum(item.length for item, _, _, _ in entries)

    # --------------------------------------------------------------- messages
    def add_blob(self, item: SpoolItem, sha256: bytes, subject: str, spread_us: int = 0) -> None:
        """Commit an item whose object stream is ``item.data`` (audit-mirror pieces)."""
        self.add_blobs([(item, sha256)], subject, spread_us)

    def add_blobs(
        self, items: Sequence[tuple[SpoolItem, bytes]], subject: str, spread_us: int = 0
    ) -> None:
        """Commit ``(item, sha256)`` items whose object streams are ``item.data``, in one
        durable transaction (one fsync, and the lock held once, however many)."""
        if any(item.data is None for item, _ in items):
            raise ValueError("a blob item needs its object stream")
        if not items:
            return
        created = now_us()
        last_seq: dict[str, int] = {}
        with self._lock, transaction(self._db):
            self._db.executemany(
                "INSERT INTO items(object_id, channel, seq, kind, priority, name, size,"
                " sha256, length, data, subject, state, sends_total, spread_us,"
                " next_send_us, created_us) VALUES (?,?,?,?,?,?,?,?,?,?,?,'queued',?,?,?,?)",
                [
                    (
                        item.object_id,
                        item.channel,
                        item.seq,
                        item.kind,
                        item.priority,
                        item.name,
                        item.size,
                        sha256,
                        item.length,
                        item.data,
                        subject,
                        item.sends_total,
                        spread_us,
                        created,
                        created,
                    )
                    for item, sha256 in items
                ],
            )
            for item, _ in items:
                last_seq[item.channel] = max(item.seq, last_seq.get(item.channel, 0))
            for channel, seq in last_seq.items():
                self._set_seq(channel, seq)
        for item, _ in items:  # (committed)
            if item.kind != "audit":  # audit pieces count in bytes only (see __init__)
                self.backlog_items += 1
            self.backlog_bytes += item.length

    def accept_messages(
        self,
        requests: Sequence[MessageRequest],
        seal: Callable[[MessageRequest, int], Sealed],
        audit_idx: Callable[[], Mapping[tuple[str, str], int]] = dict,
    ) -> list[tuple[Accepted | Conflict, SpoolItem | None]]:
        """Commit a batch of messages in one durable transaction (group commit).

        ``seal(request, seq)`` builds the signed object stream once the
        channel sequence number is known; ``audit_idx()``, asked once every request
        is sealed, gives by (client, channel) the index of the intake record the seals
        wrote: each new item's :attr:`SpoolItem.audit_idx`. A submission id already used by the
        same client gets the earlier answer (no second item); with different
        content it is a :class:`Conflict`. The new items are returned for sending.
        """
        out: list[tuple[Accepted | Conflict, SpoolItem | None]] = []
        created = now_us()
        added_bytes = 0
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                batch_seen: dict[tuple[str, str], tuple[bytes, Accepted]] = {}
                last_seq: dict[str, int] = {}  # per channel, written once at the end
                item_rows: list[tuple[object, ...]] = []
                submission_rows: list[tuple[object, ...]] = []
                made: list[tuple[int, Accepted, MessageRequest, int, Sealed]] = []
                for req in requests:
                    key = (req.client, req.submission_id)
                    prior = batch_seen.get(key)
                    if prior is None:
                        row = self._db.execute(
                            "SELECT s.request_sha256, s.object_id, i.seq FROM submissions s"
                            " JOIN items i USING (object_id)"
                            " WHERE s.client=? AND s.submission_id=?",
                            key,
                        ).fetchone()
                        if row is not None:
                            prior = (bytes(row[0]), Accepted(bytes(row[1]), int(row[2]), True))
                    if prior is not None:
                        sha, acc = prior
                        if sha == req.request_sha256:
                            out.append((Accepted(acc.object_id, acc.seq, True), None))
                        else:
                            out.append((Conflict(acc.object_id, acc.seq), None))
                        continue
                    if req.channel not in last_seq:
                        last_seq[req.channel] = self._next_seq(req.channel) - 1
                    seq = last_seq[req.channel] = last_seq[req.channel] + 1
                    sealed = seal(req, seq)
                    item_rows.append(
                        (
                            sealed.object_id,
                            req.channel,
                            seq,
                            req.priority,
                            sealed.name,
                            sealed.size,
                            sealed.sha256,
                            len(sealed.stream),
                            sealed.stream,
                            f"api:{req.client}",
                            req.sends_total,
                            req.spread_us,
                            created,
                            created,
                        )
                    )
                    submission_rows.append(
                        (
                            req.client,
                            req.submission_id,
                            req.request_sha256,
                            sealed.object_id,
                            created,
                        )
                    )
                    acc = Accepted(sealed.object_id, seq, False)
                    batch_seen[key] = (req.request_sha256, acc)
                    added_bytes += len(sealed.stream)
                    made.append((len(out), acc, req, seq, sealed))
                    out.append((acc, None))
                records = audit_idx()  # (the seals above wrote the intake records)
                idxs = [records.get((req.client, req.channel), -1) for _, _, req, _, _ in made]
                item_rows = [
                    (*row, idx if idx >= 0 else None)
                    for row, idx in zip(item_rows, idxs, strict=True)
                ]
                for (pos, acc, req, seq, sealed), idx in zip(made, idxs, strict=True):
                    item = SpoolItem(
                        sealed.object_id,
                        req.channel,
                        seq,
                        sealed.name,
                        sealed.size,
                        len(sealed.stream),
                        None,
                        kind="message",
                        priority=req.priority,
                        data=sealed.stream,
                        sends_total=req.sends_total,
                        audit_idx=idx,
                    )
                    out[pos] = (acc, item)
                self._db.executemany(
                    "INSERT INTO items(object_id, channel, seq, kind, priority, name, size,"
                    " sha256, length, data, subject, state, sends_total, spread_us,"
                    " next_send_us, created_us, intake_idx)"
                    " VALUES (?,?,?,'message',?,?,?,?,?,?,?,'queued',?,?,?,?,?)",
                    item_rows,
                )
                self._db.executemany("INSERT INTO submissions VALUES (?,?,?,?,?)", submission_rows)
                for channel, seq in last_seq.items():
                    self._set_seq(channel, seq)
                self._db.execute("COMMIT")
            except BaseException:
                rollback(self._db)
                raise
            self.backlog_items += sum(1 for _, item in out if item is not None)
            self.backlog_bytes += added_bytes
        return out

    def submission(self, client: str, submission_id: str) -> SubmissionStatus | None:
        with self._lock:
            row = self._db.execute(
                "SELECT i.object_id, i.channel, i.seq, i.state, i.sends_done, i.sends_total,"
                " i.created_us, i.sent_us, s.request_sha256 FROM submissions s"
                " JOIN items i USING (object_id) WHERE s.client=? AND s.submission_id=?",
                (client, submission_id),
            ).fetchone()
        if row is None:
            return None
        return SubmissionStatus(
            bytes(row[0]), row[1], row[2], row[3], row[4], row[5], row[6], row[7], bytes(row[8])
        )

    # ------------------------------------------------------------- scheduling
    def unrecorded(self, size: int) -> list[dict[str, Any]]:
        """Items whose intake record has an index at or past ``size``, the audit log's size
        as found when it was opened: records a crash took back (appended, not yet on
        disk) while the spool had committed their items. By record index."""
        with self._lock:
            cur = self._db.execute(
                "SELECT object_id, channel, seq, kind, name, size, sha256, subject, intake_idx,"
                " spool_file FROM items WHERE intake_idx >= ? ORDER BY intake_idx",
                (size,),
            )
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def set_intake_idx(self, pairs: Sequence[tuple[bytes, int]]) -> None:
        """(object id, index of its intake record) for items recorded again."""
        with self._lock, transaction(self._db):
            self._db.executemany(
                "UPDATE items SET intake_idx=? WHERE object_id=?", [(i, o) for o, i in pairs]
            )

    def due(
        self,
        now: int,
        limit: int = DUE_LIMIT,
        skip: Collection[bytes] = (),
        *,
        repeats_only: bool = False,
    ) -> list[SpoolItem]:
        """Queued items whose next copy is due, most urgent first (minus ``skip``: in flight).

        ``repeats_only``: only items already sent at least once (new items reach
        the sender directly; this keeps the periodic scan small under load).
        """
        with self._lock:
            rows = self._db.execute(
                _DUE_REPEATS if repeats_only else _DUE_ALL, (now, limit + len(skip))
            ).fetchall()
        return [self._item(r) for r in rows if bytes(r[0]) not in skip][:limit]

    def last_row(self) -> int:
        """The newest item's row number: an item added later has a higher one (SQLite gives
        a new row the highest number plus one, and :meth:`prune` never forgets the newest
        row, so no number is given twice; there is no VACUUM, which could renumber rows)."""
        with self._lock:
            (last,) = self._db.execute("SELECT coalesce(max(rowid), 0) FROM items").fetchone()
        return int(last)

    def unsent(
        self, up_to_row: int, skip: Collection[bytes] = (), limit: int = DUE_LIMIT
    ) -> list[SpoolItem]:
        """Queued items never sent, added by row ``up_to_row`` (what a start found in the
        spool: :meth:`last_row`), most urgent first, minus ``skip``, whatever the clock says
        (an item made while it was ahead is due now too). Their ids come in index order, a
        priority at a time (no sort of the whole backlog); then their rows."""
        with self._lock:
            ids: list[bytes] = []
            for priority in (0, 1):  # (each in the order of items_due: no sort of them all)
                ids += [
                    oid
                    for (raw,) in self._db.execute(
                        "SELECT object_id FROM items INDEXED BY items_due WHERE state='queued'"
                        " AND priority=? AND sends_done=0 AND rowid<=?"
                        " ORDER BY next_send_us LIMIT ?",
                        (priority, up_to_row, limit - len(ids) + len(skip)),
                    )
                    if (oid := bytes(raw)) not in skip
                ][: limit - len(ids)]
            found: dict[bytes, SpoolItem] = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))  # placeholders only
                query = (  # (+state: by id, not by walking the backlog on items_due)
                    _SELECT_ITEMS.replace("WHERE state=", "WHERE +state=")
                    + f" AND object_id IN ({marks})"
                )
                for r in self._db.execute(query, chunk):
                    found[bytes(r[0])] = self._item(r)
        return [found[oid] for oid in ids if oid in found]

    def expire_repeats(
        self, now: int, skip: Collection[bytes] = (), limit: int = 10_000
    ) -> list[Expired]:
        """Finish, without sending them, the items whose next copy falls due after their
        deadline: :data:`REPEAT_DEADLINE_US` after their first copy, or
        :data:`REPEAT_SPREAD_GRACE_US` after their channel's repeat ``spread`` ended if that
        is later (the outside was stopped, or the link's backlog held them back, that long).
        By then the inside may have forgotten the item (its ledger keeps it at least 8 days),
        and a copy would be delivered twice. Pieces of the audit log's copy (``audit``) are
        not items, and never expire. ``skip``: in flight. Each is returned (its spool file is
        to be removed, and its copies not sent recorded)."""
        with self._lock:
            rows = [
                r
                for r in self._db.execute(
                    "SELECT object_id, channel, seq, sends_done, sends_total, spool_file, length,"
                    " kind FROM items INDEXED BY items_repeats WHERE state='queued'"
                    " AND sends_done>0 AND next_send_us<=? AND kind!='audit'"
                    " AND first_sent_us+max(?, spread_us+?)<? LIMIT ?",
                    (
                        now,
                        REPEAT_DEADLINE_US,
                        REPEAT_SPREAD_GRACE_US,
                        now,
                        limit + len(skip),
                    ),
                )
                if bytes(r[0]) not in skip
            ][:limit]
            if not rows:
                return []
            out = [
                Expired(
                    bytes(r[0]),
                    str(r[1]),
                    int(r[2]),
                    int(r[3]),
                    int(r[4]),
                    None if r[5] is None else self.dir / str(r[5]),
                )
                for r in rows
            ]
            # (durable: a file's spool copy is removed once this is on disk)
            with transaction(self._db, durable=any(e.spool_file is not None for e in out)):
                self._db.executemany(
                    "UPDATE items SET state='sent', data=NULL WHERE object_id=?",
                    [(e.object_id,) for e in out],
                )
            for r in rows:
                if r[7] != "audit":
                    self.backlog_items -= 1
                self.backlog_bytes -= int(r[6])
        return out

    def next_due_us(self) -> int | None:
        with self._lock:
            row = self._db.execute(
                "SELECT min(next_send_us) FROM items WHERE state='queued'"
            ).fetchone()
        return None if row[0] is None else int(row[0])

    def queued(self) -> list[SpoolItem]:
        with self._lock:
            rows = self._db.execute(_SELECT_ITEMS + " ORDER BY priority, created_us").fetchall()
        return [self._item(r) for r in rows]

    def _item(self, r: tuple[Any, ...]) -> SpoolItem:
        return SpoolItem(
            object_id=bytes(r[0]),
            channel=str(r[1]),
            seq=int(r[2]),
            name=str(r[3]),
            size=int(r[4]),
            length=int(r[5]),
            spool_file=None if r[6] is None else self.dir / str(r[6]),
            kind=str(r[7]),
            priority=int(r[8]),
            data=None if r[9] is None else bytes(r[9]),
            sends_done=int(r[10]),
            sends_total=int(r[11]),
            deadline_us=(
                None if r[12] is None or r[7] == "audit" else repeat_deadline(r[12], r[13])
            ),
        )

    def mark_sent(self, object_ids: Sequence[bytes], now: int | None = None) -> list[SentCopy]:
        """Record that one more copy of each item went out (one transaction).

        Items with copies left are rescheduled; finished ones leave the backlog
        and their message data is dropped. Returns what happened to each.
        """
        now = now_us() if now is None else now
        out: list[SentCopy] = []
        finished: list[tuple[int, int, int, bytes]] = []
        rescheduled: list[tuple[int, int, int, int, bytes]] = []
        with self._lock:
            # Read first (this agent is the spool's only writer, and holds the lock), to
            # know whether the commit must reach the disk before it returns.
            rows: dict[bytes, tuple[Any, ...]] = {}
            ids = list(dict.fromkeys(object_ids))  # once each, in order
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))  # placeholders only
                query = (
                    "SELECT object_id, sends_done, sends_total, spread_us, first_sent_us,"  # noqa: S608
                    " spool_file, length, kind FROM items"
                    # (+state: look rows up by id; on state the planner would pick
                    # items_due and walk the whole backlog for every chunk)
                    f" WHERE +state='queued' AND object_id IN ({marks})"
                )
                for row in self._db.execute(query, chunk):
                    rows[bytes(row[0])] = row[1:]
            for oid in ids:
                found = rows.get(oid)
                if found is None:
                    continue  # unknown, or finished already: not counted again
                done, total, spread, first, spool_file, length, kind = found
                done += 1
                first = now if first is None else first
                if done >= total:
                    finished.append((done, first, now, oid))
                    path = None if spool_file is None else self.dir / spool_file
                    out.append(SentCopy(oid, done, total, True, path))
                else:
                    step = spread // max(1, total - 1)
                    rescheduled.append((done, first, now, max(now, first + done * step), oid))
                    out.append(SentCopy(oid, done, total, False, None))
            if not out:
                return out
            # A copy sent but not recorded is only sent once more (the inside drops
            # repeats), so this commit need not wait for the disk, unless a file's spool
            # copy is about to be deleted: then the record must be on disk first.
            durable = any(c.spool_file is not None for c in out)
            with transaction(self._db, durable=durable):
                self._db.executemany(
                    "UPDATE items SET state='sent', sends_done=?, first_sent_us=?,"
                    " sent_us=?, data=NULL WHERE object_id=?",
                    finished,
                )
                self._db.executemany(
                    "UPDATE items SET sends_done=?, first_sent_us=?, sent_us=?,"
                    " next_send_us=? WHERE object_id=?",
                    rescheduled,
                )
            for copy in out:
                if copy.finished:
                    *_, length, kind = rows[copy.object_id]
                    if kind != "audit":
                        self.backlog_items -= 1
                    self.backlog_bytes -= int(length)
        return out

    def prune(self, before_us: int, limit: int = PRUNE_BATCH) -> int:
        """Forget up to ``limit`` finished items (every copy sent) whose last copy left
        before ``before_us``, with their submission ids; how many went. A client that
        reuses a forgotten submission id gets a new item; a status query answers unknown.
        The newest row is kept whatever its age: its number must not be given again
        (:meth:`last_row`)."""
        with self._lock, transaction(self._db):
            ids = [
                (r[0],)
                for r in self._db.execute(
                    # (on items_due: a finished item's next_send_us <= its last sent_us)
                    # (and never one whose original still sits in a drop folder, its source
                    # key kept: forgotten, that file would be sent again)
                    "SELECT object_id FROM items WHERE state='sent' AND next_send_us<?"
                    " AND sent_us<? AND (source_key IS NULL OR source_key='')"
                    " AND rowid<(SELECT max(rowid) FROM items) LIMIT ?",
                    (before_us, before_us, limit),
                )
            ]
            self._db.executemany("DELETE FROM submissions WHERE object_id=?", ids)
            self._db.executemany("DELETE FROM items WHERE object_id=?", ids)
        return len(ids)

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, count(*) FROM items GROUP BY state").fetchall()
        return {str(r[0]): int(r[1]) for r in rows}


@dataclass(frozen=True)
class Expired:
    """An item finished by :meth:`Spool.expire_repeats` with copies not sent."""

    object_id: bytes
    channel: str
    seq: int
    sends_done: int
    sends_total: int
    spool_file: Path | None


@dataclass(frozen=True)
class SentCopy:
    object_id: bytes
    sends_done: int
    sends_total: int
    finished: bool
    spool_file: Path | None
    """The object file to remove once the last copy went out (files only)."""

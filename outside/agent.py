"""The outside (low-side) agent: take files and messages in, spool them, send them one way.

``ferry outside run -c outside.yaml``. Threads: one intake thread per files
channel takes completed files from its drop folder (watchdog; a folder that
stops answering holds up its channel alone); the API thread accepts
messages and uploads over ZeroMQ; the main thread schedules spooled items
(messages before files, repeats when due), drives the sender machine, paces
every byte through a token bucket and writes to the link. It never reads
from the link.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import queue
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from ferry import log, selftest
from ferry.audit.agent import AgentAudit
from ferry.audit.record import AuditObject, AuditUnavailable, Subject
from ferry.audit.segments import CHECKPOINTS_FILE, iter_lines, list_segments
from ferry.config_types import OutsideConfig
from ferry.crypto.keys import load_public_key, load_secret_key
from ferry.errors import ChannelError, FerryError
from ferry.runtime import open_sender, pacing_rate, settle_gc
from ferry.state import Retention
from ferry.status import STATUS_FILE, write_status
from ferry.wire import records as rec
from ferry.wire.pacing import TokenBucket
from ferry.wire.sender import (
    BytesSource,
    ObjectSent,
    OutgoingObject,
    Sender,
    build_trailer,
    send_priority,
    symbol_size_for,
)
from outside.api import MESSAGE_TYPE, ApiServer
from outside.content.pipeline import ContentPipeline
from outside.intake import CONTENT_SUBJECT, FolderIntake
from outside.mirror import CHANNEL as MIRROR_CHANNEL
from outside.mirror import MAX_PIECE, AuditShipper
from outside.spool import DUE_LIMIT, Spool, SpoolItem, now_us

# Datagrams asked of the sender machine per loop turn: amortises Python overhead
# while keeping heartbeats and intake responsive (64 x 1.5 kB ~ 0.1 ms at 1 Gb/s).
BATCH = 64
# ... but never more than this much of the link's time: a message that arrives while a
# batch is being paced out waits for it (64 datagrams are 0.7 s at 1 Mb/s).
BATCH_SECONDS = 0.005
# A datagram's headers and tag beyond its symbol (about; for the batch size only).
DATAGRAM_OVERHEAD = 64
# Pacing burst: the bucket may run this many bytes ahead of the rate.
PACING_BURST = 256 * 1024
STATUS_INTERVAL = 0.5

_log = log.get("outside")


def batch_for(rate: float, datagram: int) -> int:
    """Datagrams per loop turn on a link of ``rate`` bytes/s: :data:`BATCH`, or as many as
    take :data:`BATCH_SECONDS` of the link if fewer (at least one)."""
    return max(1, min(BATCH, int(rate * BATCH_SECONDS / datagram)))


class FileSource:
    """An object file in the spool, read with pread (thread-safe, no shared offset)."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self._fd, size, offset)

    def close(self) -> None:
        os.close(self._fd)


# Messages travel in bundles (docs/PROTOCOL.md §bundles): the messages due at one turn of
# the send loop, per channel, up to this many content bytes (one FEC block, held in memory
# inside) and members; one signature for all. A lone larger message is a bundle of one.
BUNDLE_MAX = 48 * 1024
BUNDLE_MAX_MEMBERS = 512
# A bundle of up to this many symbols is one FEC block with half as many repair symbols
# (at least 2: a one-symbol bundle survives two lost packets); a larger one (a big message)
# gets the link's FEC.
BUNDLE_ONE_BLOCK = 160


def bundle_fec(symbols: int) -> tuple[int, int] | None:
    """Per-object FEC of a bundle of ``symbols`` source symbols."""
    if symbols > BUNDLE_ONE_BLOCK:
        return None
    k = max(1, symbols)
    return (k, max(2, -(-k // 2)))


# Source symbols of an audit-mirror piece (one FEC block; k + repair stays under 255).
MAX_PIECE_SYMBOLS = 200
SCHEDULE_INTERVAL = 0.5
# How often the audit shipping thread looks whether its interval has passed.
SHIP_POLL = 0.1
# A channel's folder intake without progress for this long is listed in status.json
# (intake_stalled); `ferry health` turns it CRITICAL past --max-stall.
STALL_REPORTED = 5.0
# Seconds the send loop waits at most for new items' intake records to reach the disk.
AUDIT_DURABLE_WAIT = 0.05
ADMIN_PUBLIC_KEY = "keys/security-admin.pub"  # as ferry quarantine release looks for it
# The sending thread blocks in syscalls; with the API thread busy it would wait the default
# 5 ms for the GIL after each one. A shorter switch interval keeps the link fed.
SWITCH_INTERVAL = 0.0005
# Sent copies are recorded in one spool transaction per interval (a crash only costs a resend).
SENT_FLUSH_INTERVAL = 0.05


class OutsideAgent:
    def __init__(self, cfg: OutsideConfig, stop: threading.Event) -> None:
        self.cfg = cfg
        self.stop = stop
        selftest.run()
        self.key = load_secret_key(cfg.signing_key, ("ed25519",))
        self.recipient = load_public_key(cfg.inside_public_key, cfg.source.parent)
        self.spool = Spool(cfg.state_dir)
        self._retention = Retention(
            self.spool.prune, cfg.retention_days * 86400, "spool_pruned", _log
        )
        self.audit = AgentAudit(cfg.audit, "outside", cfg.state_dir, cfg.source)
        self._incoming: queue.SimpleQueue[SpoolItem] = queue.SimpleQueue()
        self._wake = threading.Event()
        self.pipeline: ContentPipeline | None = None
        try:
            if any(c.content is not None for c in cfg.channels):
                self.pipeline = ContentPipeline()  # parsers in worker processes (docs/CONTENT.md)
                self.pipeline.start()  # YARA EICAR self-test: refuses to run without it
            admin = cfg.source.parent / ADMIN_PUBLIC_KEY  # releases are signed with its secret
            self.intake = FolderIntake(
                cfg.channels,
                self.spool,
                self.key,
                audit=self.audit,
                pipeline=self.pipeline,
                admin_key=load_public_key(str(admin)) if admin.is_file() else None,
                reserve=cfg.spool_reserve,
            )
            self.api: ApiServer | None = None
            if cfg.api is not None:
                self.api = ApiServer(
                    cfg,
                    self.spool,
                    self.key,
                    self._enqueue,
                    stop,
                    audit=self.audit,
                    pipeline=self.pipeline,
                )
            self.audit.keys_in_use(
                [("outside-signing", self.key.public, True), ("inside-kem", self.recipient, True)]
                + ([] if self.api is None else self.api.keys.in_use("api-server"))
                + self.audit.own_keys()
            )
        except BaseException as exc:
            self.audit.try_record(
                "agent.stopped", result="failure", reason=f"START_FAILED: {exc}"[:1024]
            )
            api: ApiServer | None = getattr(self, "api", None)
            if api is not None:
                api.close()  # (its sockets and authenticator thread)
            if self.pipeline is not None:
                self.pipeline.close()
            self.audit.close()
            self.spool.close()
            raise
        self._symbol_size = symbol_size_for(cfg.link)
        self.shipper: AuditShipper | None = None
        if cfg.audit is not None and cfg.audit.mirror:
            self.shipper = AuditShipper(
                cfg.audit.dir,
                self.spool,
                self.key,
                cfg.state_dir,
                max_piece=min(MAX_PIECE, MAX_PIECE_SYMBOLS * self._symbol_size - 2048),
                on_resend=self._mirror_resend,
                durable_bytes=self.audit.log.durable_bytes,
            )
        # sends not yet audited: (item, copy, copies, id of the bundle it went in)
        self._unrecorded: deque[tuple[ObjectSent, int, int, str | None]] = deque()
        # sends the spool could not record yet (a full disk): recorded at a later flush (a
        # copy sent but not recorded is at worst sent once more; the inside drops repeats)
        self._sent_unsaved: list[tuple[ObjectSent, str | None]] = []
        self._sent_unsaved_logged = -60.0
        self._sources: dict[bytes, FileSource | BytesSource] = {}
        # due, not yet in a bundle, by (channel, send priority: first copies before repeats)
        self._waiting_msgs: dict[tuple[str, int], list[SpoolItem]] = {}
        self._bundles: dict[bytes, list[SpoolItem]] = {}  # bundle id -> its messages
        self._in_bundles: set[bytes] = set()  # messages waiting or on their way
        self._awaiting: list[SpoolItem] = []  # new items whose intake records are not durable
        # items the spool held at the start (rows up to _resumed_rows) not yet handed to the
        # sender: more than DUE_LIMIT were due, or made while the clock was ahead
        self._unsent_left = False
        self._resumed_rows = 0
        self._bundles_made = 0
        self.bundles_sent = 0
        self.status_path = cfg.state_dir / STATUS_FILE

    def _enqueue(self, items: list[SpoolItem]) -> None:
        for item in items:
            self._incoming.put(item)
        self._wake.set()

    def _backpressure_loop(self) -> None:
        """Pause folder intake while the spool is past the API's BUSY threshold (each
        channel's intake runs on a thread of its own: FolderIntake.start)."""
        api = self.cfg.api
        while api is not None and not self.stop.is_set():
            try:
                full = (
                    self.spool.backlog_items >= api.busy_items
                    or self.spool.backlog_bytes >= api.busy_bytes
                )
                self.intake.pause(full)
            except Exception:  # noqa: BLE001  # this thread must never die silently
                _log.exception("intake_error")
            self.stop.wait(self.cfg.poll_interval)

    def _ship_loop(self, shipper: AuditShipper) -> None:
        """The audit log to the inside, on a thread of its own: a drop folder on a share that
        stops answering holds up folder intake, not this."""
        while not self.stop.is_set():
            try:
                if not self.audit.failed:
                    items = shipper.step()
                    if items:
                        self._enqueue(items)
            except Exception:  # noqa: BLE001  # the shipping thread must never die silently
                _log.exception("audit_ship_error")
            self.stop.wait(min(SHIP_POLL, shipper.interval))

    def _submit(self, sender: Sender, item: SpoolItem) -> None:
        if item.object_id in self._sources or item.object_id in self._in_bundles:
            return  # a copy is already on its way
        if item.kind == "message":
            if item.data is None:
                _log.error("spool_message_without_content", object_id=item.object_id.hex())
                return
            key = (item.channel, send_priority(item.priority, item.sends_done > 0))
            self._waiting_msgs.setdefault(key, []).append(item)
            self._in_bundles.add(item.object_id)
            return
        source: FileSource | BytesSource
        if item.data is not None:
            source = BytesSource(item.data)
        else:
            if item.spool_file is None:
                _log.error("spool_item_without_content", object_id=item.object_id.hex())
                return
            try:
                source = FileSource(item.spool_file)
            except OSError as exc:
                _log.error("spool_file_missing", object_id=item.object_id.hex(), error=str(exc))
                return
        self._sources[item.object_id] = source
        sender.submit(
            OutgoingObject(
                item.object_id,
                item.length,
                source,
                item.channel,
                item.seq,
                priority=send_priority(item.priority, item.sends_done > 0),
                fec=self._fec_for(item),
                not_after=None if item.deadline_us is None else item.deadline_us / 1e6,
            )
        )

    def _resume(self, sender: Sender) -> int:
        """At the start, hand the sender what the spool holds: what is due now (at most
        DUE_LIMIT); the first copies of the rest, by row number, come from
        :meth:`_schedule`: more than DUE_LIMIT were due, or items made while the clock was
        ahead look due later (they would have waited for a start after that time)."""
        self._resumed_rows = self.spool.last_row()
        due = self.spool.due(now_us())
        for item in due:
            self._submit(sender, item)
        self._unsent_left = True  # (the first _schedule looks; usually there is none)
        return len(due)

    def _schedule(self, sender: Sender) -> None:
        """Hand the sender the repeats that came due and, while the start left some, the
        first copies of what the spool held at the start (a DUE_LIMIT at a time, once most
        of what went before is on its way). Items made since the start never come from
        here: they reach the sender once their intake records are on disk
        (:meth:`_submit_durable`); a row number, not the time (the clock may be set back),
        bounds what was there at the start."""
        # (and sent, their sending not recorded yet: a full disk, _sent_unsaved)
        unsaved = {sent.object_id for sent, _ in self._sent_unsaved}
        in_flight = self._sources.keys() | self._in_bundles | unsaved
        self._expire_repeats(in_flight)
        due = self.spool.due(now_us(), skip=in_flight, repeats_only=True)
        if self._unsent_left and len(in_flight) < DUE_LIMIT // 2:
            resumed = self.spool.unsent(self._resumed_rows, in_flight)
            if len(resumed) < DUE_LIMIT:
                self._unsent_left = False  # (all taken)
            due = resumed + due
        for item in due:
            self._submit(sender, item)

    def _submit_durable(self, sender: Sender) -> None:
        """Hand new items to the sender once their intake records are on disk: an item never
        crosses while the record of its acceptance could still be lost (fail closed)."""
        newest = max(item.audit_idx for item in self._awaiting)
        if newest >= 0 and not self.audit.log.is_durable(newest):
            # the API and the folder intake wait for the same records (about one fsync); on
            # AuditUnavailable (or AuditTimeout) the items stay until the log recovers
            with contextlib.suppress(AuditUnavailable):
                self.audit.log.wait_durable(newest, timeout=AUDIT_DURABLE_WAIT)
        waiting = self._awaiting
        self._awaiting = []
        for item in waiting:
            if item.audit_idx < 0 or self.audit.log.is_durable(item.audit_idx):
                self._submit(sender, item)
            else:
                self._awaiting.append(item)

    def _bundle_messages(self, sender: Sender) -> None:
        """Put the messages that came due into bundles, in order, and queue them."""
        for (channel, priority), items in self._waiting_msgs.items():
            start = 0
            while start < len(items):
                end, size = start + 1, rec.BUNDLE_COUNT.size + items[start].length
                while (
                    end < len(items)
                    and end - start < BUNDLE_MAX_MEMBERS
                    and size + items[end].length <= BUNDLE_MAX
                ):
                    size += items[end].length
                    end += 1
                self._submit_bundle(sender, channel, priority, items[start:end])
                start = end
        self._waiting_msgs.clear()

    def _submit_bundle(
        self, sender: Sender, channel: str, priority: int, items: list[SpoolItem]
    ) -> None:
        content = rec.encode_bundle([item.data for item in items if item.data is not None])
        deadlines = [item.deadline_us for item in items if item.deadline_us is not None]
        bundle_id = os.urandom(16)
        created = now_us()
        self._bundles_made += 1
        manifest = rec.Manifest(
            object_id=bundle_id,
            kind="bundle",
            channel=channel,
            seq=0,  # not in the channel's sequence: its members are
            name=f"bundle-{self._bundles_made}",
            media_type=rec.BUNDLE_MEDIA_TYPE,
            size=len(content),
            sha256=hashlib.sha256(content).digest(),
            created_us=created,
            mtime_us=created,
            sender=self.key.public.key_id,
            subject="component:sender",
        )
        stream = content + build_trailer(manifest, self.key)
        source = BytesSource(stream)
        self._sources[bundle_id] = source
        self._bundles[bundle_id] = items
        sender.submit(
            OutgoingObject(
                bundle_id,
                len(stream),
                source,
                channel,
                max(item.seq for item in items),  # heartbeats announce the last member sent
                priority=priority,
                fec=bundle_fec(-(-len(stream) // self._symbol_size)),
                not_after=min(deadlines) / 1e6 if deadlines else None,
            )
        )

    def _release(self, dropped: list[bytes]) -> None:
        """Objects the sender dropped unsent: repeats held back (by first copies ahead of
        them) past their deadline. Their items are no longer on their way: the next turn
        finishes those past their deadline (:meth:`_expire_repeats`) and hands the others
        (a bundle's other members) to the sender again."""
        items = 0
        for oid in dropped:
            src = self._sources.pop(oid, None)
            if isinstance(src, FileSource):
                src.close()
            members = self._bundles.pop(oid, None)
            for item in members or ():
                self._in_bundles.discard(item.object_id)
            items += len(members) if members is not None else 1
        _log.warning("repeats_dropped_late", objects=len(dropped), items=items)

    def _fec_for(self, item: SpoolItem) -> tuple[int, int] | None:
        if item.kind == "audit":  # one block, so the inside takes it in memory
            k = min(MAX_PIECE_SYMBOLS, max(1, -(-item.length // self._symbol_size)))
            return (k, max(2, k // 4))
        return None

    def _sent(self, events: list[ObjectSent]) -> None:
        done: list[tuple[ObjectSent, str | None]] = []  # (item, its bundle's id)
        for ev in events:
            src = self._sources.pop(ev.object_id, None)
            if isinstance(src, FileSource):
                src.close()
            members = self._bundles.pop(ev.object_id, None)
            if members is None:
                done.append((ev, None))
                continue
            self.bundles_sent += 1
            for item in members:
                self._in_bundles.discard(item.object_id)
                done.append(
                    (ObjectSent(item.object_id, item.channel, item.seq), ev.object_id.hex())
                )
        self._sent_unsaved.extend(done)
        done = self._sent_unsaved
        try:
            copies = self.spool.mark_sent([ev.object_id for ev, _ in done])
        except sqlite3.Error as exc:  # (a full disk): kept, and recorded at a later flush
            now = time.monotonic()
            if now >= self._sent_unsaved_logged + 60:
                self._sent_unsaved_logged = now
                _log.error("sends_not_recorded", count=len(done), error=str(exc))
            return
        self._sent_unsaved = []
        by_id = {ev.object_id: (ev, bundle) for ev, bundle in done}
        self._unrecorded.extend(  # (mirror pieces are accounted for by the mirror itself)
            (by_id[c.object_id][0], c.sends_done, c.sends_total, by_id[c.object_id][1])
            for c in copies
            if c.object_id in by_id and by_id[c.object_id][0].channel != MIRROR_CHANNEL
        )
        self._record_sends()
        per_item = log.enabled("debug")  # messages: one line each only when debugging
        for copy in copies:
            if copy.spool_file is not None:  # a file: one info line per copy
                copy.spool_file.unlink(missing_ok=True)
            elif not per_item:
                continue
            emit = _log.info if copy.spool_file is not None else _log.debug
            emit(
                "sent",
                object_id=copy.object_id.hex(),
                copy=copy.sends_done,
                copies=copy.sends_total,
            )

    def _expire_repeats(self, in_flight: Collection[bytes] = ()) -> None:
        """Copies due past their deadline (7 days after the item's first, see
        :meth:`Spool.expire_repeats`) are not sent: ``transfer.expired`` for each such item.
        ``in_flight``: items being sent now, left alone."""
        try:
            expired = self.spool.expire_repeats(now_us(), skip=in_flight)
        except sqlite3.Error as exc:  # (a full disk): tried again at the next turn
            _log.error("repeats_not_expired", error=str(exc))
            return
        if not expired:
            return
        subject = Subject.component("sender")
        for e in expired:
            if e.spool_file is not None:
                e.spool_file.unlink(missing_ok=True)
            if e.channel == MIRROR_CHANNEL:
                continue
            self.audit.try_record(
                "transfer.expired",
                subject=subject,
                result="info",
                obj=AuditObject(item=e.object_id.hex(), channel=e.channel or None, seq=e.seq),
                detail={"sent": e.sends_done, "of": e.sends_total},
                corr=e.object_id.hex(),
            )
        _log.warning(
            "repeats_expired",
            items=len(expired),
            channels=sorted({e.channel for e in expired}),
            note="copies due past their deadline (a week after the first) were not sent",
        )

    def _record_sends(self) -> None:
        """transfer.sent / transfer.repeated for each copy that left (kept until recorded)."""
        subject = Subject.component("sender")
        pending = self._unrecorded

        def drop(run: list[dict[str, object]]) -> None:  # in the log: no longer pending
            for _ in run:
                pending.popleft()

        while pending:
            ev, done, total, bundle = pending[0]
            event = "transfer.sent" if done <= 1 else "transfer.repeated"
            detail: dict[str, object] = {"send": done, "of": total}
            try:
                if bundle is None:  # a file
                    self.audit.record(
                        event,
                        subject=subject,
                        obj=AuditObject(
                            item=ev.object_id.hex(), channel=ev.channel or None, seq=ev.seq
                        ),
                        detail=detail,
                        corr=ev.object_id.hex(),
                    )
                    pending.popleft()
                    continue
                # messages: batch records for the run of copies of one bundle, channel
                # and send number (docs/AUDIT.md §2), each dropped once it is in the log
                detail["bundle"] = bundle
                run = 1
                while (
                    run < len(pending)
                    and pending[run][1:] == (done, total, bundle)
                    and pending[run][0].channel == ev.channel
                ):
                    run += 1
                entries: list[dict[str, object]] = [
                    {"item": e.object_id.hex(), "seq": e.seq}
                    for e, _, _, _ in itertools.islice(pending, run)
                ]
                shared: dict[str, object] = {"kind": "message"}
                if ev.channel:
                    shared["channel"] = ev.channel
                self.audit.record_items(
                    event,
                    subject=subject,
                    shared=shared,
                    entries=entries,
                    detail=detail,
                    recorded=drop,
                )
            except AuditUnavailable:
                return  # recorded after the log recovers (sending has stopped meanwhile)

    def _mirror_resend(self, start: str, error: str | None) -> None:
        """An operator asked for the audit log to cross again (ferry outside mirror resend)."""
        self.audit.try_record(
            "audit.resend",
            subject=Subject.component("audit-mirror"),
            result="failure" if error else "success",
            reason=None if error is None else f"BAD_REQUEST: {error}",
            obj=AuditObject(
                kind="checkpoint" if start.startswith(CHECKPOINTS_FILE) else "segment",
                name=start or None,
            ),
        )

    def _write_status(self, sender: Sender, epoch: int, started_at: float) -> None:
        """Rewrite state/status.json (operators, ``ferry health``, the demo)."""
        now = time.time()
        write_status(
            self.status_path,
            {
                "role": "outside",
                "epoch": epoch,
                "pid": os.getpid(),
                "written_at": now,
                "started_at": started_at,
                "uptime": now - started_at,
                "audit_problem": self.audit.log.problem,
                "packets_sent": sender.packets_sent,
                "bytes_sent": sender.bytes_sent,
                "objects_sent": sender.objects_sent,
                "bundles_sent": self.bundles_sent,
                "queued": sender.objects_queued,
                "backlog_items": self.spool.backlog_items,
                "backlog_bytes": self.spool.backlog_bytes,
                "busy_items": None if self.cfg.api is None else self.cfg.api.busy_items,
                "busy_bytes": None if self.cfg.api is None else self.cfg.api.busy_bytes,
                "taken": self.intake.taken,
                "quarantined": self.intake.quarantined,
                "intake_paused": self.intake.paused,
                "intake_stalled": self.intake.stalled(STALL_REPORTED),
                "api_accepted": 0 if self.api is None else self.api.accepted,
                "api_rejected": 0 if self.api is None else self.api.rejected,
                "api_busy": 0 if self.api is None else self.api.busy,
                "api_previous_server_keys": [] if self.api is None else self.api.keys.status(),
            },
        )

    def _record_lost_intake(self) -> None:
        """Intake records a crash took back: appended, not yet on disk, when the agent died
        (a power cut; kill -9 before the writer wrote them) while the spool had already
        committed their items. Each such item (its record's index, kept with its row, at
        or past the size the log had when it opened) is recorded accepted again from its
        row, marked ``recovered``, and on disk before anything is sent: no item crosses
        without its intake record (docs/AUDIT.md). A file's content verdict record, written
        just before, is written again too when it was lost with it (from the report the
        file's signed manifest carries; also marked ``recovered``)."""
        lost = self.spool.unrecorded(self.audit.log.resumed_size)
        if not lost:
            return
        drops = {ch.name: str(ch.drop) for ch in self.cfg.channels if ch.drop is not None}
        have_verdict = self._verdicts_on_record(
            {bytes(r["object_id"]).hex() for r in lost if r["kind"] == "file"}
        )
        done: list[tuple[bytes, int]] = []
        for row in lost:
            if row["kind"] == "file" and bytes(row["object_id"]).hex() not in have_verdict:
                self._record_lost_verdict(row)
            kind, who = str(row["subject"]).partition(":")[::2]
            if kind == "api":
                subject = Subject.api_client(who)
            elif kind == "folder" and who in drops:
                subject = Subject.clerk_folder(drops[who], who)
            else:
                subject = self.audit.subject
            oid = bytes(row["object_id"])
            idx = self.audit.record(
                "intake.accepted",
                subject=subject,
                obj=AuditObject(
                    kind=row["kind"],
                    item=oid.hex(),
                    channel=row["channel"],
                    name=row["name"],
                    size=row["size"],
                    sha256=bytes(row["sha256"]).hex(),
                    seq=row["seq"],
                    media_type=MESSAGE_TYPE if row["kind"] == "message" else None,
                ),
                detail={"recovered": True},
                corr=oid.hex(),
            )
            done.append((oid, idx))
        self.audit.log.wait_durable(done[-1][1])
        self.spool.set_intake_idx(done)
        _log.warning(
            "intake_records_recovered",
            count=len(done),
            effect="their intake records had not reached the disk before the agent stopped; "
            "written again from the spool (detail.recovered) before any of them is sent",
        )

    def _verdicts_on_record(self, items: set[str]) -> set[str]:
        """Which of these items have a ``verdict`` record on disk: looked for in the log's
        last two segments (a verdict is recorded just before its item's intake record)."""
        found: set[str] = set()
        if not items or self.cfg.audit is None:
            return found
        for _, seg in list_segments(self.cfg.audit.dir)[-2:]:
            for line in iter_lines(seg):
                if not line.complete or b'"verdict"' not in line.data:
                    continue
                with contextlib.suppress(ValueError):
                    record = json.loads(line.data)
                    if record.get("event") == "verdict" and record.get("corr") in items:
                        found.add(record["corr"])
        return found

    def _record_lost_verdict(self, row: Mapping[str, Any]) -> None:
        """Record again the content verdict of a spooled file whose record a crash took
        back, from the report in the file's own signed manifest (the original name is not
        kept there: the name given is the one it is delivered under)."""
        oid = bytes(row["object_id"])
        try:
            with open(self.spool.dir / str(row["spool_file"]), "rb") as f:
                f.seek(-rec.TRAILER_TAIL.size, os.SEEK_END)
                length = rec.trailer_length(f.read(rec.TRAILER_TAIL.size))
                f.seek(-length, os.SEEK_END)
                manifest = rec.decode_manifest(rec.split_trailer(f.read(length))[0])
            report = json.loads(manifest.report) if manifest.report else None
        except (OSError, ValueError, FerryError) as exc:
            _log.error("verdict_not_recovered", item=oid.hex(), error=str(exc))
            return
        if not isinstance(report, dict):
            return  # (no content check on its channel: no verdict to record)
        sha_in = report.get("sha256_in")
        detail: dict[str, Any] = {
            "verdict": report.get("verdict"),
            "detected_type": report.get("type") or "unknown",
            "delivered_name": manifest.name,
            "actions": report.get("actions") if isinstance(report.get("actions"), list) else [],
            "recovered": True,
        }
        if "override" in report:
            detail["override"] = report["override"]
        self.audit.record(
            "verdict",
            subject=CONTENT_SUBJECT,
            result="success",
            obj=AuditObject(
                kind="file",
                item=oid.hex(),
                channel=row["channel"],
                name=manifest.name,
                sha256=sha_in if isinstance(sha_in, str) and len(sha_in) == 64 else None,
                seq=row["seq"],
            ),
            detail=detail,
            corr=oid.hex(),
        )

    def run(self) -> int:
        cfg = self.cfg
        epoch = self.spool.next_epoch(int(time.time() * 1e6))
        sender = Sender(
            cfg.link, self.key, self.recipient, epoch=epoch, rng=os.urandom, now=time.time()
        )
        channel = open_sender(cfg)
        bucket = TokenBucket(pacing_rate(cfg), PACING_BURST)
        send_many = getattr(channel, "send_many", None) if cfg.link.rate_bps >= 50e6 else None
        batch_size = batch_for(
            pacing_rate(cfg), channel.wire_size(self._symbol_size + DATAGRAM_OVERHEAD)
        )
        sys.setswitchinterval(SWITCH_INTERVAL)
        self._record_lost_intake()
        self._expire_repeats()
        resumed = self._resume(sender)
        self._bundle_messages(sender)
        self.intake.start(self._enqueue, cfg.poll_interval)
        if self.api is not None:
            self.api.start()
        _log.info(
            "outside_started",
            epoch=epoch,
            transport=cfg.link.transport,
            rate_bps=cfg.link.rate_bps,
            resumed_items=resumed,
            inside_key=self.recipient.key_id.hex(),
            signing_key=self.key.public.key_id.hex(),
            api=None if self.api is None else self.api.endpoint,
        )
        settle_gc()
        intake = threading.Thread(target=self._backpressure_loop, name="intake", daemon=True)
        intake.start()
        ship = None
        if self.shipper is not None:
            ship = threading.Thread(
                target=self._ship_loop, args=(self.shipper,), name="audit-ship", daemon=True
            )
            ship.start()
        next_status = next_schedule = next_flush = 0.0
        pending_sent: list[ObjectSent] = []
        started_at = time.time()
        halted = False
        try:
            while not self.stop.is_set():
                if self.audit.failed:  # fail closed: nothing is sent unaudited
                    if not halted:
                        halted = True
                        _log.error("transfers_halted", reason="audit log cannot be written")
                    self._write_status(sender, epoch, started_at)  # (monitors see why)
                    self.stop.wait(0.2)
                    continue
                if halted:
                    halted = False
                    _log.warning("transfers_resumed", reason="audit log writable again")
                    self._record_sends()
                self._wake.clear()
                while True:
                    try:
                        self._awaiting.append(self._incoming.get_nowait())
                    except queue.Empty:
                        break
                if self._awaiting:
                    self._submit_durable(sender)
                mono = time.monotonic()
                if mono >= next_schedule:  # repeats that came due
                    next_schedule = mono + SCHEDULE_INTERVAL
                    self._schedule(sender)
                self._retention.step(mono)  # (sent items past cfg.retention_days)
                if self._waiting_msgs:
                    self._bundle_messages(sender)
                now = time.time()
                batch = sender.datagrams(now, batch_size)
                if send_many is not None and batch:
                    # fast links: pace the batch as a whole, one syscall (GSO), one GIL release
                    size = sum(channel.wire_size(len(d)) for d in batch)
                    wait = bucket.consume(size, time.monotonic())
                    if wait > 0:
                        time.sleep(wait)
                    send_many(batch)
                else:
                    for d in batch:
                        wait = bucket.consume(channel.wire_size(len(d)), time.monotonic())
                        if wait > 0.01:
                            self.stop.wait(wait)  # slow links: stay responsive to SIGTERM
                        elif wait > 0:
                            time.sleep(wait)
                        channel.send(d)
                pending_sent.extend(sender.pop_events())
                if dropped := sender.pop_dropped():
                    self._release(dropped)
                if pending_sent and (mono >= next_flush or not batch):
                    next_flush = mono + SENT_FLUSH_INTERVAL  # one transaction for many
                    self._sent(pending_sent)
                    pending_sent = []
                if mono >= next_status:
                    next_status = mono + STATUS_INTERVAL
                    self._write_status(sender, epoch, started_at)
                if not batch:
                    delay = min(sender.next_control_due() - time.time(), 0.05)
                    if delay > 0:
                        self._wake.wait(delay)
        except ChannelError as exc:
            _log.error("link_failed", error=str(exc))
            return exc.exit_code
        finally:
            if pending_sent:
                self._sent(pending_sent)
            self.stop.set()
            self._wake.set()
            intake.join(timeout=5)
            if ship is not None:
                ship.join(timeout=5)
            self.intake.stop(timeout=5)
            if self.api is not None:
                self.api.close()
            channel.close()
            for src in self._sources.values():
                if isinstance(src, FileSource):
                    src.close()
            if self.pipeline is not None:
                self.pipeline.close()
            self.spool.close()
            self.audit.close()
            _log.info(
                "outside_stopped",
                packets_sent=sender.packets_sent,
                objects_sent=sender.objects_sent,
            )
        return 0

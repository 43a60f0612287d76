"""The inside (high-side) agent: receive, verify, deliver. It never writes to the link.

``ferry inside run -c inside.yaml``. The transport's own thread drains the
link into memory; the main thread feeds the receiver machine and writes
decoded blocks into per-object spool files (``<id>.part``, named ``<id>.obj`` once
complete). Delivery threads verify completed objects: one per messages channel (its
folder and the inner consumers), one per files channel (re-checked and linked into its
folder), one for objects of no channel here, and one that hands each object spooled to
disk to the thread of its kind and channel. So a delivery folder that stops answering
(a share whose server is gone) or is full holds up its own channel only. A complete
object waiting for its delivery is kept across a restart and delivered at the next start.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import queue
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from ferry import log, selftest
from ferry.audit.agent import AgentAudit
from ferry.audit.record import AuditObject, AuditUnavailable, Result, Subject
from ferry.config_types import MAX_MESSAGE_SIZE, InsideConfig
from ferry.content.scan import Scanner
from ferry.crypto.keys import PublicKey, load_public_key, load_secret_key
from ferry.errors import FerryError, PolicyRejection, ReplayRejected, WireError
from ferry.jsondoc import JsonLimits, SchemaRegistry
from ferry.place import link_new, remove_stale_temps
from ferry.quarantine_release import REASON_JSON, ReleaseAuditor
from ferry.runtime import open_receiver, settle_gc
from ferry.state import Retention, disk_full, free_bytes, room_reserve
from ferry.status import STATUS_FILE, write_status
from ferry.wire import records as rec
from ferry.wire.linkstate import LinkMonitor
from ferry.wire.receiver import (
    BlockDecoded,
    HeartbeatReceived,
    ObjectCompleted,
    ObjectLost,
    Receiver,
    SessionStarted,
)
from inside.consumers import ConsumerServer, Outbox, OutboxItem
from inside.deliver import (
    Alone,
    Delivered,
    Duplicate,
    NotAuthentic,
    deliver,
    deliver_batch,
    fsync_dir,
    name_tag,
    open_bundle,
    restore_trailer,
    verify_stream,
    write_new_files,
)
from inside.gaps import SequenceGaps
from inside.ledger import Ledger
from inside.mirror import AuditMirror, MirrorRejected
from inside.quarantine import keep_reason
from inside.recheck import recheck

# Objects whose whole stream fits in one FEC block this small stay in memory (messages).
MEMORY_OBJECT_MAX = 256 * 1024
# Objects up to this size that were spooled to disk (a big message spans several blocks)
# are read back and verified in memory; larger ones can only be files. (Configs cap a
# message at MAX_MESSAGE_SIZE; its manifest and the bundle trailer add a few KiB.)
INLINE_OBJECT_MAX = MAX_MESSAGE_SIZE + 1024 * 1024
# The inside's bounds on a message: the size any outside config may allow (the outside
# refuses a message whose canonical form is longer than its own limit); the rest as outside.
INSIDE_MESSAGE_LIMITS = JsonLimits(max_bytes=MAX_MESSAGE_SIZE)
DELIVERY_BATCH = 32
# Refused objects kept (state/rejected/ and state/quarantine/ together), at most: past it a
# refused object is still refused and recorded, but not kept (a compromised outside, with
# the key, could otherwise fill the inside's disk with refusals, the audit log's with it).
MAX_KEPT_REFUSED = 4 * 1024**3
KEPT_RESCAN = 60.0  # seconds: while over it, the folders are measured again at most this often
# Objects recorded lost here and forgotten by the receiver (to take a later copy), remembered
# so that the rest of the copy that completed, timing out, is not recorded lost again.
MAX_FORGOTTEN = 4096
# A files channel's thread delivers up to this many files queued together (one wait for
# the disk per step for them all), of up to FILE_BATCH_BYTES in all.
FILE_BATCH = 32
FILE_BATCH_BYTES = 16 * 1024 * 1024

# (object id, length, its bytes or None: in the spool as <id>.obj, kept from before a start)
Job = tuple[bytes, int, bytes | None, bool]
FileJob = tuple[bytes, int, bool]  # (object id, length, kept from before a restart)
MirrorJob = tuple[bytes, rec.Manifest, bytes]

TICK_INTERVAL = 0.25
STATUS_INTERVAL = 0.5
# Seconds before a missing audit-mirror piece counts as a gap (its second copy comes 30 s on).
MIRROR_GAP_GRACE = 90.0
# Seconds between transfer.duplicate records of one item (repeats are expected, not news).
DUPLICATE_NOTE_INTERVAL = 60.0
# Seconds the delivery thread waits between checks while the audit log cannot write.
AUDIT_WAIT = 0.2
OBJECT_ID_LEN = 16
# Seconds the start waits for a delivery folder (a share) before going on without it: its
# channel's thread makes it, waiting as long as it takes; nothing else waits for it.
FOLDER_ANSWER = 3.0
# Seconds the stop waits, in all, for the delivery threads to finish what they hold (a file
# whose delivery is cut short stays in the spool and is delivered at the next start).
STOP_WAIT = 10.0
# Seconds on one file before status.json names its channel as held up (``delivery_held``).
HELD_REPORTED = 5.0
# Bytes of objects the messages thread's queue holds in memory; beyond, they wait in the
# spool (a messages folder that does not take them: the queue grows, memory does not).
MESSAGES_IN_MEMORY = 64 * 1024 * 1024
# A delivery folder failing with these is tried again, never refused for it: a share whose
# server is gone or reconnecting, a full or read-only disk, a permission being fixed.
RETRY_ERRNOS = frozenset(
    {
        errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.ETIMEDOUT,
        errno.ESTALE, errno.ENOTCONN, errno.ECONNRESET, errno.ECONNABORTED, errno.EHOSTDOWN,
        errno.EHOSTUNREACH, errno.ENETDOWN, errno.ENETUNREACH, errno.EAGAIN, errno.EBUSY,
        errno.EINTR,
    }
)  # fmt: skip
RETRY_FIRST = 1.0  # seconds before the first try again; doubled each time...
RETRY_MAX = 60.0  # ...up to this
LINK_EVENTS = {
    "state": "link.state",
    "heartbeat_gap": "link.heartbeat_gap",
    "params_mismatch": "link.params_mismatch",
    "clock_skew": "link.clock_skew",
    "sender_restart": "link.sender_restart",
}

_log = log.get("inside")


class RecheckFailed(FerryError):
    """The inside re-check refused a file the outside passed: it is quarantined inside, with
    its verified ``manifest`` and the re-check's ``findings`` (inside.quarantine.keep_reason)."""

    def __init__(
        self,
        message: str,
        *,
        manifest: rec.Manifest | None = None,
        findings: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.manifest = manifest
        self.findings = findings


# Numbers and key ids in a rejection's text come from the sender, who may be anyone on the
# link: rejections are counted by their text with those left out, so that varying them
# makes no new entry (and no new log line, audit record or status.json key).
_VARYING = re.compile(r"[0-9a-fA-F]{8,}|\d+")
MAX_REJECTION_KINDS = 64  # then counted under OTHER_REJECTIONS


class _RateLimitedLog:
    """Log a recurring rejection the 1st, 2nd, 4th, 8th... time, with its running count;
    rejections are counted by kind (their text without its numbers and ids), at most
    MAX_REJECTION_KINDS kinds."""

    OTHER = "(other rejections)"

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, event: str, reason: str, **kw: object) -> int:
        """Count one; return the running count when it was logged (a power of two), else 0."""
        kind = _VARYING.sub("#", reason)
        if kind not in self.counts and len(self.counts) >= MAX_REJECTION_KINDS:
            kind = self.OTHER
        n = self.counts.get(kind, 0) + 1
        self.counts[kind] = n
        if n & (n - 1) == 0:
            _log.warning(event, reason=reason, count=n, **kw)
            return n
        return 0


_J = TypeVar("_J", Job, FileJob)


def _queued_with(
    first: _J, work: queue.SimpleQueue[_J | None], count: int, size: int | None = None
) -> tuple[list[_J], bool]:
    """``first`` and the jobs queued behind it, up to ``count`` of them (and, with
    ``size``, until their lengths reach it); True with them if the stop's None was met."""
    jobs, total = [first], first[1]
    while len(jobs) < count and (size is None or total < size):
        try:
            job = work.get_nowait()
        except queue.Empty:
            break
        if job is None:
            return jobs, True
        jobs.append(job)
        total += job[1]
    return jobs, False


def _passes(exc: BaseException) -> bool:
    """A delivery failure worth trying again: a folder's RETRY_ERRNOS, or the inside's own
    disk full (ledger or outbox)."""
    return disk_full(exc) or (isinstance(exc, OSError) and exc.errno in RETRY_ERRNOS)


_CLAIM_TAIL = rec.MAX_MANIFEST + rec.SIGNATURE_LEN + rec.TRAILER_TAIL.size


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """All of ``data`` at ``offset``: a nearly full file system may write part of it and
    say so only by the count (ENOSPC comes with the next write)."""
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        if done <= 0:
            raise OSError(errno.ENOSPC, "No space left on device (nothing written)")
        view, offset = view[done:], offset + done


def _claim(data: bytes) -> tuple[str | None, str | None]:
    """The kind and channel the manifest at the end of an object stream (or of its last
    _CLAIM_TAIL bytes) claims, not yet verified: for routing only (None, None if
    unreadable). The thread it is routed to verifies everything."""
    try:
        tlen = rec.trailer_length(data[-rec.TRAILER_TAIL.size :])
        manifest_bytes, _ = rec.split_trailer(data[-tlen:] if tlen <= len(data) else b"")
        manifest = rec.decode_manifest(manifest_bytes)
    except FerryError:
        return None, None
    return manifest.kind, manifest.channel


class _Lane:
    """A files channel's delivery: its folder, its queue of complete spooled objects
    (:data:`FileJob`), and the thread that delivers them one after the other."""

    def __init__(self, channel: str, folder: Path) -> None:
        self.channel = channel
        self.folder = folder
        self.work: queue.SimpleQueue[FileJob | None] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.active = 0  # files being delivered (taken from the queue)
        # (monotonic) since when on its current file, its verification and re-check not counted
        self.busy_since: float | None = None

    def waiting(self) -> int:
        """Files queued or being delivered."""
        return self.work.qsize() + self.active

    @contextmanager
    def checking(self, lock: threading.Lock) -> Iterator[None]:
        """Hold ``lock`` (one file verified and re-checked at a time) for this channel's
        file; that time (waiting for the lock included) is not time held up by its folder."""
        self.busy_since = None
        try:
            with lock:
                yield
        finally:
            self.busy_since = time.monotonic()


class _MessageLane:
    """A messages channel's delivery (under the name "": every object that claims no
    messages channel of this inside, such as pieces of the outside's audit log): its queue
    of objects (:data:`Job`, whole in memory or read back from the spool) and the thread
    that checks and delivers them in batches. A messages folder that does not take a batch
    (full, on a share that stops answering) holds up only its own channel."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.work: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.held_since: float | None = None  # (monotonic) since when on its batch
        # the batch on its way: kept by the stop if the thread is still on it by then
        self.holding: Sequence[Job] = ()


def _prepare_folder(channel: str, folder: Path) -> None:
    """Make a channel's delivery folder (OSError if it cannot be made) and remove the temp
    files a crash left there."""
    folder.mkdir(parents=True, exist_ok=True)
    if removed := remove_stale_temps(folder):  # (a crash while copying)
        _log.info("stale_temp_files_removed", channel=channel, count=removed)


def _prepare_folders(folders: Mapping[str, Path], wait: float) -> list[str]:
    """Make each channel's delivery folder and remove temp files a crash left there, each
    on a thread of its own, waiting ``wait`` seconds in all; the channels whose folder did
    not answer in time (a share whose server is gone). A folder that cannot be made raises
    FerryError (a mistake in the configuration)."""
    errors: dict[str, OSError] = {}

    def prepare(channel: str, folder: Path) -> None:
        try:
            _prepare_folder(channel, folder)
        except OSError as exc:
            errors[channel] = exc

    threads = {
        ch: threading.Thread(target=prepare, args=(ch, f), name=f"folder-{ch}", daemon=True)
        for ch, f in folders.items()
    }
    deadline = time.monotonic() + wait
    for t in threads.values():
        t.start()
    for t in threads.values():
        t.join(max(0.0, deadline - time.monotonic()))
    for channel, exc in errors.items():
        raise FerryError(f"channel {channel}: cannot make its delivery folder: {exc}")
    return [ch for ch, t in threads.items() if t.is_alive()]


class InsideAgent:
    def __init__(self, cfg: InsideConfig, stop: threading.Event) -> None:
        self.cfg = cfg
        self.stop = stop
        selftest.run()
        # Key rotation: the current keys first, then earlier ones still accepted.
        self.kem_keys = tuple(
            load_secret_key(path, ("mlkem768x25519", "x25519"))
            for path in (cfg.kem_key, *cfg.previous_kem_keys)
        )
        self.sender_keys = tuple(
            load_public_key(key, cfg.source.parent)
            for key in (cfg.outside_public_key, *cfg.previous_outside_public_keys)
        )
        self.kem_key, self.sender_key = self.kem_keys[0], self.sender_keys[0]
        for kem in self.kem_keys:
            if kem.alg != cfg.link.kem:
                raise FerryError(f"inside key is {kem.alg} but link.kem is {cfg.link.kem}")
        for what, ids in (
            ("KEM key", [k.public.key_id for k in self.kem_keys]),
            ("outside public key", [k.key_id for k in self.sender_keys]),
        ):
            if len(set(ids)) != len(ids):
                raise FerryError(f"{cfg.source}: the same {what} is listed twice under keys")
        self._senders_by_id = {k.key_id: k for k in self.sender_keys}
        self.spool_dir = cfg.state_dir / "incoming"
        self.rejected_dir = cfg.state_dir / "rejected"
        self.quarantine_dir = cfg.state_dir / "quarantine"  # the re-check disagreed
        self._kept_lock = threading.Lock()
        self._kept_bytes = 0  # (measured below, once the folders exist)
        self._kept_measured = 0.0
        for d in (self.spool_dir, self.rejected_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._kept_bytes, self._kept_measured = self._kept_size(), time.monotonic()
        self.folders = {
            ch.name: ch.deliver for ch in cfg.channels if ch.kind == "files" and ch.deliver
        }
        self.subfolders = {ch.name: ch.subfolders for ch in cfg.channels}
        self.recheck_required = {
            ch.name for ch in cfg.channels if ch.kind == "files" and ch.recheck
        }
        self.msg_channels = {ch.name: ch for ch in cfg.channels if ch.kind == "messages"}
        self._lanes = {name: _Lane(name, folder) for name, folder in self.folders.items()}
        deliver_folders = {ch.name: ch.deliver for ch in cfg.channels if ch.deliver is not None}
        for channel in _prepare_folders(deliver_folders, FOLDER_ANSWER):
            _log.warning(
                "delivery_folder_not_answering",
                channel=channel,
                folder=str(deliver_folders[channel]),
                effect="its deliveries wait for it; everything else goes on",
            )
        self.schemas = SchemaRegistry.load() if self.msg_channels else None
        for ch in self.msg_channels.values():
            for name in ch.schemas:
                if self.schemas is not None and name not in self.schemas.ids:
                    raise FerryError(f"channel {ch.name}: unknown message schema {name!r}")
        self.ledger = Ledger(cfg.state_dir)
        self._retention = Retention(
            self.ledger.prune, cfg.retention_days * 86400, "ledger_pruned", _log
        )
        self.audit = AgentAudit(cfg.audit, "inside", cfg.state_dir, cfg.source)
        # `ferry inside quarantine release` lines, into the audit log (the CLI cannot write it)
        self.releases = ReleaseAuditor.for_agent(
            self.audit, cfg.state_dir, cfg.source, on_delivered=self._released
        )
        self.peer = Subject("peer", self.sender_key.key_id.hex())
        self._delivery_subject = Subject.component("delivery")
        self._dup_noted: dict[bytes, float] = {}
        # Messages are delivered by one thread per messages channel (_MessageLane), each a
        # batch at a time; an object id taken by one is not taken by another meanwhile.
        self._msg_taken: set[bytes] = set()
        self._msg_taken_lock = threading.Lock()
        self.gaps = SequenceGaps(
            grace=max(2 * cfg.object_timeout, 2.0),
            # mirror pieces come twice over 30 s (outside/mirror.py): give the copy its chance
            per_channel={rec.AUDIT_CHANNEL: max(2 * cfg.object_timeout, MIRROR_GAP_GRACE)},
            channels={ch.name for ch in cfg.channels} | {rec.AUDIT_CHANNEL},
        )
        for channel, seq in self.ledger.seq_floors():  # (pruned: seen long ago)
            self.gaps.seen_up_to(channel, seq)
        for channel, seq in self.ledger.channel_seqs():
            self.gaps.seen(channel, seq)
        self.scanner: Scanner | None = None
        if any(ch.kind == "files" for ch in cfg.channels):
            self.scanner = Scanner()
            self.scanner.self_test()  # YARA must see EICAR, or the agent refuses to run
        self.mirror: AuditMirror | None = None
        audit_cfg = cfg.audit
        peer_audit_keys: list[PublicKey] = []
        if audit_cfg is not None and audit_cfg.mirror_dir and audit_cfg.peer_public_key:
            peer_audit_keys = [
                load_public_key(k, cfg.source.parent)
                for k in (audit_cfg.peer_public_key, *audit_cfg.previous_peer_public_keys)
            ]
            self.mirror = AuditMirror(
                audit_cfg.mirror_dir, peer_audit_keys[0], self.audit, peer_audit_keys[1:]
            )
        self.outbox: Outbox | None = None
        self.consumers: ConsumerServer | None = None
        if cfg.consumers.endpoint or cfg.consumers.publish:
            self.outbox = Outbox(self.ledger)
            self.consumers = ConsumerServer(cfg.consumers, self.outbox, stop)
        self.audit.keys_in_use(
            [("inside-kem", k.public, i == 0) for i, k in enumerate(self.kem_keys)]
            + [("outside-signing", k, i == 0) for i, k in enumerate(self.sender_keys)]
            + ([] if self.consumers is None else self.consumers.keys.in_use("consumer-server"))
            + self.audit.own_keys()
            + [("outside-audit", k, i == 0) for i, k in enumerate(peer_audit_keys)]
        )
        self._fds: dict[bytes, int] = {}
        self._unspooled: dict[bytes, str] = {}  # objects not spooled (no room), and why
        self._to_come: dict[bytes, int] = {}  # objects being spooled: bytes not yet written
        self._here: set[bytes] = set()  # repeats of objects waiting here or finished
        # objects recorded lost as NOT_SPOOLED, taken again from a later copy: the rest of the
        # copy that completed starts one that may only time out (not a second loss)
        self._forgotten: dict[bytes, None] = {}
        # kept objects a delivery thread found damaged and removed: the receiving thread
        # takes their next copy again (a copy already under way was not spooled: _here)
        self._to_forget: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self.spool_reserve = room_reserve(cfg.spool_reserve, self.spool_dir)
        self._floors_to_save: dict[bytes, tuple[int, int]] = {}  # (a full disk refused them)
        self._mem: dict[bytes, bytes] = {}
        # Objects spooled to disk go to _work, whose thread hands each file to its
        # channel's lane and each big message (read back there) to its channel's message
        # lane, whose queue takes the objects that arrived whole in memory as well.
        self._work: queue.SimpleQueue[FileJob | None] = queue.SimpleQueue()
        self._msg_lanes = {ch: _MessageLane(ch) for ch in ["", *self.msg_channels]}
        # only one file is verified and re-checked at a time (memory: up to 256 MiB each)
        self._checking = threading.Lock()
        self._kept: list[tuple[bytes, int]] = []  # complete objects kept from before a start
        # pieces of the outside's audit log: witnessing one hashes up to a second of records,
        # so it has a thread of its own and never holds up message delivery
        self._mirror_work: queue.SimpleQueue[MirrorJob | None] = queue.SimpleQueue()
        self._count_lock = threading.Lock()
        self._mem_bytes = 0  # of the objects held in memory by the message lanes' queues
        self._reject_log = _RateLimitedLog()
        self._disk_log = _RateLimitedLog()  # (the inside's own disk: full, failing)
        self.delivered = 0
        self.delivered_bytes = 0
        self.rejected = 0
        self.lost = 0
        self.status_path = cfg.state_dir / STATUS_FILE

    # ------------------------------------------------------------ recovery
    def _recover(self) -> None:
        """Remove objects a stop cut off while they arrived; keep the complete ones for
        delivery (those the ledger left at ``delivering`` are settled by their channel's
        thread: :meth:`_confirm_interrupted`)."""
        for stale in self.spool_dir.glob("*.part"):
            stale.unlink()
        settling = {bytes(r["object_id"]) for r in self.ledger.rows_in_state("delivering")}
        for path in sorted(self.spool_dir.glob("*.obj"), key=lambda p: p.stat().st_mtime):
            try:
                oid = bytes.fromhex(path.stem)
            except ValueError:
                continue
            if len(oid) == OBJECT_ID_LEN and oid not in settling:
                self._kept.append((oid, path.stat().st_size))
        if self._kept:
            _log.info("kept_objects_to_deliver", count=len(self._kept))

    def _confirm_interrupted(self, channels: Callable[[str | None], bool]) -> None:
        """Settle the deliveries the ledger left at ``delivering`` (a crash, an audit outage)
        on the ``channels`` given: see :meth:`_settle`."""
        for row in self.ledger.rows_in_state("delivering"):
            if channels(row["channel"]):
                self._deliver_file(bytes(row["object_id"]), 0, settle=True)

    def _settle(self, oid: bytes) -> int | None:
        """A delivery the ledger left at ``delivering``: delivered if the file is in its folder,
        intact (None); else, if its spool file is still there, its trailer put back and its
        length returned, to deliver it again; else lost (None). OSError: the folder did not
        answer (try again later)."""
        row = self.ledger.row_of(oid)
        if row is None or row["state"] != "delivering":
            return None
        path, sha = row["path"], row["sha256"]
        ok = False
        if isinstance(path, str) and os.path.isfile(path) and isinstance(sha, bytes):
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            ok = h.digest() == sha
        spooled = self._spool_path(oid)
        # Linked, and the link still somewhere on this file system: a reader moved (or
        # changed) the delivered file before the ledger could say so. It was delivered;
        # delivering it again would hand it out twice, and putting the trailer back would
        # write into the reader's file (the same inode).
        taken = not ok and spooled.is_file() and os.stat(spooled).st_nlink > 1
        ok = ok or taken
        if not ok and isinstance(row["size"], int) and spooled.is_file():
            trailer = self.ledger.trailer_of(oid)
            _log.info("delivery_resumed", object_id=oid.hex(), channel=row["channel"])
            if trailer is None:
                return spooled.stat().st_size
            return restore_trailer(spooled, row["size"], trailer)
        obj = AuditObject(
            kind="file",
            item=oid.hex(),
            channel=row["channel"] if isinstance(row["channel"], str) else None,
            seq=row["seq"] if isinstance(row["seq"], int) else None,
            name=row["name"] if isinstance(row["name"], str) else None,
            size=row["size"] if isinstance(row["size"], int) else None,
            sha256=sha.hex() if isinstance(sha, bytes) else None,
            path=path if isinstance(path, str) else None,
        )
        if ok:
            self.audit.record(
                "delivery.delivered",
                subject=self._delivery_subject,
                obj=obj,
                detail={"recovered": True, "taken": True} if taken else {"recovered": True},
                corr=oid.hex(),
                durable=True,
            )
            self.ledger.record(oid, "delivered")
            spooled.unlink(missing_ok=True)
            _log.info("delivery_confirmed_after_restart", object_id=oid.hex(), path=path)
        else:
            self.audit.record(
                "delivery.rejected",
                subject=self._delivery_subject,
                result="failure",
                reason="INTERRUPTED: delivery was interrupted and the file is not intact",
                obj=obj,
                corr=oid.hex(),
                durable=True,
            )
            self.ledger.record(oid, "lost", reason="interrupted delivery")
            _log.warning("delivery_interrupted", object_id=oid.hex())
        return None

    # ------------------------------------------------------------ delivery
    def _released(self, item: str, path: str) -> None:
        """A security admin released a quarantined item and it was delivered to ``path``."""
        oid = bytes.fromhex(item)
        if self.ledger.state_of(oid) == "rejected":  # (only what this inside refused)
            self.ledger.record(oid, "delivered", path=path, reason="released from quarantine")
            _log.info("released_item_delivered", object_id=item, path=path)

    def _spool_path(self, oid: bytes) -> Path:
        """A complete object spooled to disk."""
        return self.spool_dir / f"{oid.hex()}.obj"

    def _part_path(self, oid: bytes) -> Path:
        """An object spooled to disk as its blocks arrive."""
        return self.spool_dir / f"{oid.hex()}.part"

    def _spool_fd(self, oid: bytes) -> int:
        fd = self._fds.get(oid)
        if fd is None:
            path = self._part_path(oid)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            self._fds[oid] = fd
        return fd

    def _spool_block(self, ev: BlockDecoded) -> None:
        """Write a decoded block to its object's spool file; an object's first block
        decides whether it is spooled at all (:meth:`_no_room_for`). An object that is not
        spooled (no room; or a write failed, which drops what it had at once) is recorded
        lost when it completes or times out."""
        oid = ev.object_id
        if oid in self._unspooled or oid in self._here:
            return
        if oid not in self._to_come:
            if self._spool_path(oid).exists():  # (the ledger is asked only if it is not kept)
                self._here.add(oid)
                return
            if (why := self._no_room_for(ev.object_length)) is not None:
                self._unspooled[oid] = why
                self._disk_log("object_not_spooled", why, object_id=oid.hex())
                return
            self._to_come[oid] = ev.object_length
        try:
            _pwrite_all(self._spool_fd(oid), ev.data, ev.offset)
        except OSError as exc:  # (a full disk: what it had is given back to the disk now)
            self._unspooled[oid] = str(exc)
            with contextlib.suppress(OSError):
                self._drop_part(oid)
            self._disk_log("object_not_spooled", str(exc), object_id=oid.hex())
            return
        self._to_come[oid] -= len(ev.data)

    def _already_here(self, oid: bytes) -> bool:
        """A copy of an object that waits here for its delivery (kept from before a start),
        or that this inside has delivered or refused (the receiver forgets the oldest it
        finished): not to be spooled again, nor recorded lost."""
        if self._spool_path(oid).exists():
            return True
        try:
            return self.ledger.state_of(oid) in ("delivered", "rejected")
        except sqlite3.Error:
            return False

    def _no_room_for(self, length: int) -> str | None:
        """Why an incoming object of ``length`` bytes may not be spooled, or None: it must
        leave ``spool_reserve`` bytes free on the state disk, once every object already
        being spooled has arrived (the ledger, the audit log and messages need that room;
        without it one big file would hold them all up until it had finished arriving)."""
        free = free_bytes(self.spool_dir)
        if free is None:  # (the disk did not say: its writes will)
            return None
        coming = sum(self._to_come.values())
        if free - coming - length >= self.spool_reserve:
            return None
        return (
            f"no room: its {length} bytes would leave less than {self.spool_reserve} bytes "
            f"free on the state disk ({free} free, {coming} bytes of other objects to come)"
        )

    def _completed(self, oid: bytes, length: int) -> None:
        """A complete object: to the thread of its kind (OSError: it could not be kept)."""
        data = self._mem.pop(oid, None)
        if data is not None:
            kind, channel = _claim(data)
            lane = self._lanes.get(channel or "") if kind == "file" else None
            if lane is None:
                self._to_messages(oid, length, data, channel)
            else:  # a small file: to its channel's thread (never behind messages waiting)
                self._spool_small_file(oid, lane.channel, data, on_disk=False)
        elif oid in self._unspooled:
            self._drop_part(oid)
        elif self._spooled(oid):
            self._work.put((oid, length, False))

    def _record_lost(
        self,
        oid: bytes,
        reason: str,
        *,
        size: int | None = None,
        detail: dict[str, object] | None = None,
    ) -> None:
        """The ``transfer.lost`` audit record of an object this inside could not deliver."""
        self.audit.try_record(
            "transfer.lost",
            subject=self.peer,
            result="failure",
            reason=reason[:1024],
            obj=AuditObject(item=oid.hex(), size=size),
            detail=detail,
            corr=oid.hex(),
        )

    def _drop_part(self, oid: bytes) -> None:
        self._to_come.pop(oid, None)
        fd = self._fds.pop(oid, None)
        if fd is not None:
            os.close(fd)
        self._part_path(oid).unlink(missing_ok=True)

    def _not_spooled(self, machine: Receiver, oid: bytes, length: int, why: str) -> None:
        """A complete object the inside's disk could not take (full): lost here, but not
        refused: a later copy (a channel repeat) is taken again."""
        with contextlib.suppress(OSError):
            self._drop_part(oid)
        if self._already_here(oid):  # (a copy of one the receiver no longer remembers)
            _log.info("repeat_not_spooled", object_id=oid.hex(), reason=why)
            return
        self._forget(machine, oid)
        self.lost += 1
        reason = f"NOT_SPOOLED: the inside could not keep it ({why})"
        try:
            self.ledger.record(oid, "lost", reason=reason[:1024])
        except sqlite3.Error as exc:  # (a full disk: the audit record below says it)
            _log.error("loss_not_in_ledger", object_id=oid.hex(), error=str(exc))
        self._record_lost(oid, reason, size=length)
        self._disk_log("object_not_spooled", reason, object_id=oid.hex())

    def _forget(self, machine: Receiver, oid: bytes) -> None:
        """Have the receiver take the next copy of an object recorded lost here (not kept, or
        kept but damaged); the rest of the copy that completed then starts an object that a
        later copy completes, or that times out: not a second loss (``repeat_lost``)."""
        machine.forget_finished(oid)
        self._forgotten[oid] = None
        if len(self._forgotten) > MAX_FORGOTTEN:
            del self._forgotten[next(iter(self._forgotten))]

    def _lost_here(self, oid: bytes, length: int, why: str) -> None:
        """A verified object a delivery thread could not keep (the inside's disk is full):
        recorded lost, not refused."""
        with self._count_lock:
            self.lost += 1
        reason = f"NOT_SPOOLED: the inside could not keep it ({why})"
        self._record_lost(oid, reason, size=length)
        self._disk_log("object_not_spooled", reason, object_id=oid.hex())

    def _spooled(self, oid: bytes) -> bool:
        """An object spooled to disk is complete: ``<id>.part`` becomes ``<id>.obj`` (never
        over one: False if the same object already waits for its delivery)."""
        os.close(self._spool_fd(oid))  # (made here for an empty object)
        del self._fds[oid]
        self._to_come.pop(oid, None)
        part = self._part_path(oid)
        try:
            if link_new(part, self._spool_path(oid)):
                part.unlink()
        except FileExistsError:
            part.unlink()
            return False
        return True

    def _wait_for_audit(self) -> bool:
        """Block while the audit log cannot write (fail closed); False if stopping."""
        if not self.audit.failed:
            return True
        _log.error("deliveries_halted", reason="audit log cannot be written")
        while self.audit.log.failed.is_set():
            if self.stop.wait(AUDIT_WAIT):
                return False
        _log.warning("deliveries_resumed", reason="audit log writable again")
        return True

    def _dispatch_loop(self) -> None:
        """Objects spooled to disk: each file to its channel's lane, each message (too big
        for one FEC block) to the messages thread. What it reads of them is not yet
        verified: the thread it goes to verifies everything."""
        self._confirm_interrupted(lambda channel: channel not in self._lanes)
        while (job := self._work.get()) is not None:
            oid, length, kept = job
            kind, channel = self._spooled_claim(oid, length)
            lane = self._lanes.get(channel or "") if kind == "file" else None
            if lane is not None:
                lane.work.put(job)
                continue
            if kind == "file" or length > INLINE_OBJECT_MAX:
                self._deliver_file(oid, length, kept=kept)  # refused: no folder for it here
                continue
            self._msg_lane(channel).work.put((oid, length, None, kept))  # (read back there)

    def _lane_loop(self, lane: _Lane) -> None:
        """A files channel's thread: its folder, then its files, one after the other."""
        try:
            _prepare_folder(lane.channel, lane.folder)  # (waits while a share hangs)
        except OSError as exc:
            _log.error("delivery_folder_unusable", channel=lane.channel, error=str(exc))
        lane.busy_since = time.monotonic()
        self._confirm_interrupted(lambda channel: channel == lane.channel)
        lane.busy_since = None
        last = False
        while not last and (job := lane.work.get()) is not None:
            jobs, last = _queued_with(job, lane.work, FILE_BATCH, FILE_BATCH_BYTES)
            if self.stop.is_set() or not self._wait_for_audit():
                return  # stopping: the spool files stay; the next start delivers them
            lane.active, lane.busy_since = len(jobs), time.monotonic()
            try:
                if len(jobs) == 1:
                    self._deliver_one(jobs[0], lane)
                else:
                    self._deliver_files(jobs, lane)
            finally:
                lane.active, lane.busy_since = 0, None

    def _deliver_one(self, job: FileJob, lane: _Lane, *, alone: bool = False) -> None:
        """``alone``: left by :meth:`_deliver_files`, settled first if the ledger says
        ``delivering`` (its trailer cut off, perhaps linked)."""
        oid, length, kept = job
        try:
            settle = alone and self.ledger.state_of(oid) == "delivering"
            self._deliver_file(oid, length, kept=kept, settle=settle, lane=lane)
        except Exception:  # noqa: BLE001  # keep the channel delivering; the file stays
            _log.exception("file_delivery_failed", object_id=oid.hex(), channel=lane.channel)

    def _deliver_files(self, jobs: list[FileJob], lane: _Lane) -> None:
        """Several files of a lane at once (:func:`deliver_batch`); those it leaves alone
        are then delivered one by one, as any file is."""
        try:
            results = deliver_batch(
                [(self._spool_path(oid), oid, length) for oid, length, _ in jobs],
                sender=self.sender_keys,
                folders=self.folders,
                ledger=self.ledger,
                subfolders=self.subfolders,
                on_linked=self._record_delivered_files,
                recheck=self._recheck,
                checking=lambda: lane.checking(self._checking),
            )
        except Exception:  # noqa: BLE001  # (each is then settled or delivered alone)
            _log.exception("file_batch_failed", count=len(jobs), channel=lane.channel)
            results = [Alone(oid) for oid, _, _ in jobs]
        for job, result in zip(jobs, results, strict=True):
            if not isinstance(result, Alone):
                self._delivered(result)
            elif result.error is not None and self._refuse_file(
                result.object_id, result.error, kept=job[2]
            ):
                continue
            elif self.stop.is_set() or not self._wait_for_audit():
                return  # stopping: the spool files stay; the next start delivers them
            else:
                self._deliver_one(job, lane, alone=True)

    def _messages_loop(self, lane: _MessageLane) -> None:
        """A message lane's thread: objects that arrived whole in memory (and big messages
        read back from the spool), checked and delivered in batches."""
        work = lane.work
        last = False
        while not last:
            first = work.get()
            if first is None:
                return
            if not self._wait_for_audit():  # stopping while the audit log cannot write
                self._keep_held([first, *self._until_stop(work)])
                return
            jobs, last = _queued_with(first, work, DELIVERY_BATCH)
            messages: list[tuple[bytes, rec.Manifest, bytes]] = []
            spooled: list[bytes] = []  # read from the spool: removed once settled
            carried: set[bytes] = set()  # the objects whose messages are in this batch
            for oid, _, held, kept in jobs:
                if held is None:
                    try:
                        data = self._spool_path(oid).read_bytes()
                    except OSError as exc:
                        self._reject(oid, f"spooled object unreadable: {exc}")
                        continue
                    spooled.append(oid)
                else:
                    data = held
                    with self._count_lock:
                        self._mem_bytes -= len(data)
                try:
                    manifest, content = verify_stream(data, oid, self.sender_keys)
                    members = (
                        open_bundle(manifest, content, self._senders_by_id[manifest.sender])
                        if manifest.kind == "bundle"
                        else None
                    )
                except WireError as exc:
                    removed = kept or isinstance(exc, NotAuthentic)  # (its copy, below)
                    if removed and held is None:  # (a genuine copy may come under its name
                        spooled.remove(oid)  # before the batch ends: not removed again)
                    if kept:
                        self._drop_kept(oid, exc)
                    elif isinstance(exc, NotAuthentic):
                        self._not_authentic(oid, exc, spooled=held is None)
                    else:
                        self._reject(oid, str(exc), data)
                    continue
                except FerryError as exc:
                    self._reject(oid, str(exc), data)
                    continue
                if manifest.kind == "file":  # a small file: to its channel's lane, so that a
                    if held is None:  # folder that does not answer (a share whose server is
                        spooled.remove(oid)  # gone) holds up no message
                    try:
                        self._spool_small_file(oid, manifest.channel, data, on_disk=held is None)
                    except OSError as exc:  # (the inside's disk full): lost here, the lane goes on
                        self._lost_here(oid, len(data), str(exc))
                    continue
                if members is not None:
                    messages.extend((m.object_id, m, body) for m, body in members)
                    carried.add(oid)
                elif manifest.kind == "message":  # signed alone (an outside before bundles)
                    messages.append((oid, manifest, content))
                    carried.add(oid)
                elif manifest.kind == "audit":
                    self._mirror_work.put((oid, manifest, content))
            settled = True
            holding = [job for job in jobs if job[0] in carried]
            if messages:
                lane.holding = holding
                try:
                    settled = self._deliver_messages_audited(messages, lane)
                except Exception as exc:  # noqa: BLE001  # keep the agent delivering
                    _log.exception("message_delivery_failed", count=len(messages))
                    for oid, _, content in messages:  # kept in rejected/, never dropped
                        if self.ledger.state_of(oid) != "delivered":
                            self._reject(oid, f"delivery failed: {exc}", content)
                finally:
                    lane.holding = ()
            if not settled:  # stopping before its folder took it: kept for the next start
                self._keep_held(holding)
            for oid in spooled:
                if settled or oid not in carried:
                    with contextlib.suppress(OSError):  # (a start removes what stays)
                        self._spool_path(oid).unlink(missing_ok=True)

    @staticmethod
    def _until_stop(work: queue.SimpleQueue[Job | None]) -> list[Job]:
        """What is queued up to the stop's None (the receiver has stopped by then)."""
        jobs: list[Job] = []
        while (job := work.get()) is not None:
            jobs.append(job)
        return jobs

    def _keep_held(self, jobs: Sequence[Job]) -> None:
        """Stopping with messages not delivered: those held in memory are written to the
        spool, so that the next start delivers them (those read from it are there)."""
        kept = 0
        for oid, _, held, _ in jobs:
            if held is None:
                continue
            try:
                self._spool_new(oid, held)
            except OSError as exc:  # (a full disk): a repeat can still bring it
                _log.error("message_not_kept", object_id=oid.hex(), error=str(exc))
                continue
            kept += 1
        _log.warning("messages_kept_for_next_start", objects=len(jobs), written=kept)

    def _spool_small_file(self, oid: bytes, channel: str, data: bytes, *, on_disk: bool) -> None:
        """A (verified) small file, for its channel's lane: spooled first unless it is there
        already (``on_disk``)."""
        if not on_disk and not self._spool_new(oid, data):
            return  # an earlier copy of it waits for its delivery already
        lane = self._lanes.get(channel)
        if lane is None:
            self._deliver_file(oid, len(data))  # refused: no folder for its channel here
        else:
            lane.work.put((oid, len(data), False))

    def _spool_new(self, oid: bytes, data: bytes) -> bool:
        """Write a complete object into the spool (``<id>.obj``); False if one is there (an
        earlier copy waiting for its delivery: never written over)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        path = self._spool_path(oid)
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except BaseException:
            path.unlink(missing_ok=True)  # (a full disk: no part of it stays to be taken)
            raise
        return True

    def _msg_lane(self, channel: str | None) -> _MessageLane:
        """The message lane for an object claiming ``channel`` (not verified yet: the lane
        verifies everything)."""
        return self._msg_lanes.get(channel or "") or self._msg_lanes[""]

    def _to_messages(self, oid: bytes, length: int, data: bytes, channel: str | None) -> None:
        """Queue an object that arrived whole in memory for the message lane of the
        channel it claims: held in memory while the lanes' queues hold under
        MESSAGES_IN_MEMORY bytes in all, else spooled."""
        work = self._msg_lane(channel).work
        with self._count_lock:
            in_memory = self._mem_bytes + len(data) <= MESSAGES_IN_MEMORY
            if in_memory:
                self._mem_bytes += len(data)
        if in_memory:
            work.put((oid, length, data, False))
        elif self._spool_new(oid, data):
            work.put((oid, length, None, False))

    def _drop_kept(self, oid: bytes, exc: Exception) -> None:
        """A spooled object kept from before the start is not intact (a power cut before
        the disk had it all): removed, not refused, so that a repeat can still deliver it."""
        self._spool_path(oid).unlink(missing_ok=True)
        self._to_forget.put(oid)
        reason = f"LOST: the spooled object did not survive the restart intact: {exc}"
        if self.ledger.state_of(oid) == "delivering":  # (not refused: a repeat delivers it)
            self.ledger.record(oid, "lost", reason=reason)
        self._record_lost(oid, reason)
        _log.error("kept_object_not_intact", object_id=oid.hex(), error=str(exc))

    def _not_authentic(self, oid: bytes, exc: NotAuthentic, *, spooled: bool) -> None:
        """What arrived under ``oid`` is not the object the outside signed with that id: this
        copy is lost, the item is not refused. A refusal would keep the id out for good, and
        a forged copy sent first would keep the genuine one out; a later copy is taken. Its
        spool file is removed if it is the copy that failed (``spooled``), never if the copy
        was held in memory: the spool's may be the genuine one, waiting for its lane. (Only
        a holder of the link's session key gets a copy this far.)"""
        if spooled:
            with contextlib.suppress(OSError):
                self._spool_path(oid).unlink(missing_ok=True)
        self._to_forget.put(oid)
        with self._count_lock:
            self.lost += 1
        reason = f"NOT_AUTHENTIC: this copy is not the object the outside signed ({exc})"
        self._record_lost(oid, reason)
        _log.error("object_not_authentic", object_id=oid.hex(), error=str(exc))

    def _spooled_claim(self, oid: bytes, length: int) -> tuple[str | None, str | None]:
        """The kind and channel a spooled object's manifest claims, not yet verified
        (None, None if unreadable)."""
        try:
            with open(self._spool_path(oid), "rb") as f:
                tail = min(length, _CLAIM_TAIL)
                f.seek(length - tail)
                return _claim(f.read(tail))
        except OSError:
            return None, None

    def _recheck(self, manifest: rec.Manifest, content: Path) -> None:
        """The independent inside re-check of a file the outside's pipeline passed."""
        self._record_received(manifest)  # verified (signature and hash) and complete
        if not manifest.report:
            if manifest.channel not in self.recheck_required:
                return  # a bulk channel (recheck: false on both sides' say-so)
            # the re-check must not depend on the outside choosing to send a report
            self.audit.record(
                "recheck",
                subject=Subject.component("recheck"),
                result="rejected",
                reason="RECHECK_MISSING: the file came without the outside's content report",
                obj=self._item_object(manifest, None),
                detail={"disagreement": True, "severity": "high"},
                corr=manifest.object_id.hex(),
            )
            _log.critical("recheck_report_missing", object_id=manifest.object_id.hex())
            raise RecheckFailed(
                f"RECHECK_MISSING: channel {manifest.channel} re-checks every file, and this one "
                "came without the outside's content report",
                manifest=manifest,
                findings={"problems": ["the file came without the outside's content report"]},
            )
        subject = Subject.component("recheck")
        obj = self._item_object(manifest, None)
        try:
            report = json.loads(manifest.report)
            type_name = report["type"]
            if not isinstance(type_name, str):
                raise TypeError("no type")
        except (ValueError, KeyError, TypeError) as exc:
            raise RecheckFailed(
                f"RECHECK_FAILED: the content report is unusable ({exc})",
                manifest=manifest,
                findings={"problems": [f"the outside's content report is unusable ({exc})"]},
            ) from exc
        result = recheck(content, type_name, report, scan=self._scan, size=manifest.size)
        detail = {
            "type": type_name,
            "outside_verdict": str(report.get("verdict")),
            "checks": list(result.checks)[:32],
        }
        if result.ok:
            self.audit.record("recheck", subject=subject, obj=obj, detail=detail, corr=obj.item)
            return
        problems = "; ".join(result.problems[:5])
        _log.critical(
            "recheck_disagrees",
            object_id=manifest.object_id.hex(),
            channel=manifest.channel,
            name=manifest.name,
            type=type_name,
            problems=list(result.problems[:20]),
        )
        self.audit.record(
            "recheck",
            subject=subject,
            result="rejected",
            reason=f"RECHECK_DISAGREES: {problems}"[:1024],
            obj=obj,
            detail=detail | {"disagreement": True, "severity": "high"},
            corr=obj.item,
        )
        raise RecheckFailed(
            f"RECHECK_DISAGREES: the inside re-check found: {problems}",
            manifest=manifest,
            findings=detail | {"checks": list(result.checks), "problems": list(result.problems)},
        )

    def _scan(self, data: bytes, where: str) -> None:
        if self.scanner is not None and self.scanner.scan(data):
            raise RecheckFailed(f"MALWARE_SIGNATURE: a YARA rule matched {where or 'the file'}")

    def _kept_size(self) -> int:
        """What the refused objects kept take now (their files in both folders)."""
        total = 0
        for folder in (self.rejected_dir, self.quarantine_dir):
            with contextlib.suppress(OSError), os.scandir(folder) as it:
                for entry in it:
                    with contextlib.suppress(OSError):
                        if entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
        return total

    def _room_to_keep(self, size: int, *, written: bool) -> str | None:
        """Why a refused object of ``size`` bytes may not be kept, or None (then its bytes
        are counted): the objects kept take MAX_KEPT_REFUSED already, or keeping it would
        leave less than ``spool_reserve`` free on the state disk (``written``: its copy is
        still to be written; else it is on that disk already, and kept, it is not freed).
        Refused objects are what anyone who can make the inside refuse them sends: they
        never take the room the ledger, the audit log and deliveries need. Over the limit,
        the folders are measured again (an operator may have removed or released some) at
        most every KEPT_RESCAN seconds."""
        free = free_bytes(self.rejected_dir)
        coming = sum(self._to_come.copy().values())  # (admitted, still arriving: promised)
        if free is not None and free - coming - (size if written else 0) < self.spool_reserve:
            return (
                f"keeping its {size} bytes would leave less than {self.spool_reserve} bytes "
                f"free on the state disk ({free} free, {coming} bytes of objects to come): "
                "inside.spool_reserve"
            )
        with self._kept_lock:
            now = time.monotonic()
            if (
                self._kept_bytes + size > MAX_KEPT_REFUSED
                and now - self._kept_measured >= KEPT_RESCAN
            ):
                self._kept_bytes, self._kept_measured = self._kept_size(), now
            if self._kept_bytes + size > MAX_KEPT_REFUSED:
                return (
                    f"the refused objects kept take {MAX_KEPT_REFUSED} bytes already "
                    f"({self.rejected_dir}, {self.quarantine_dir}): remove or release some"
                )
            self._kept_bytes += size
            return None

    def _reject(
        self,
        oid: bytes,
        reason: str,
        data: bytes | None = None,
        *,
        quarantine: bool = False,
        refused: RecheckFailed | None = None,
    ) -> None:
        """Keep a refused object in rejected/ or, when the re-check refused it (``quarantine``),
        in quarantine/ after its ``.reason.json`` (channel, name, SHA-256, findings), for
        ``ferry inside quarantine``."""
        with self._count_lock:
            self.rejected += 1
        folder = self.quarantine_dir if quarantine else self.rejected_dir
        target = folder / f"{oid.hex()}.obj"
        path = self._spool_path(oid)
        size = len(data) if data is not None else 0
        kept: str | None = str(target)
        if data is None:
            try:
                size = path.stat().st_size
            except OSError:
                kept = None  # (no copy to keep)
        if kept is not None and (no_room := self._room_to_keep(size, written=data is not None)):
            kept = None
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            self._disk_log("refused_copy_not_kept", no_room, object_id=oid.hex())
        if quarantine and kept is not None:
            try:
                manifest = None if refused is None else refused.manifest
                findings = None if refused is None else refused.findings
                keep_reason(folder, oid, reason, manifest, findings)
            except OSError as exc:  # the item is still kept; only its record is missing
                _log.error("quarantine_reason_not_written", object_id=oid.hex(), error=str(exc))
        # On disk, under its name, before the ledger says rejected (a repeat is then dropped
        # as a duplicate, and a start removes the spool's copy).
        placed = False  # the copy is whole under its name (only the folder's sync may fail)
        try:
            if kept is not None and data is not None:
                with open(target, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                placed = True
                fsync_dir(folder)
            elif kept is not None and path.exists():
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    if refused is not None and refused.manifest is not None:
                        os.ftruncate(fd, refused.manifest.size)  # the content, for a release
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(path, target)
                placed = True
                fsync_dir(folder)
        except OSError as exc:  # (a full disk): refused all the same, recorded without it
            if placed:  # (kept, its folder's entry maybe not yet on disk: listed all the same)
                _log.error("refused_copy_not_synced", object_id=oid.hex(), error=str(exc))
            else:
                _log.error("refused_copy_not_kept", object_id=oid.hex(), error=str(exc))
                with self._kept_lock:
                    self._kept_bytes -= size
                kept = None
                with contextlib.suppress(OSError):
                    if data is not None:
                        target.unlink(missing_ok=True)  # (what was written of it)
                    if quarantine:  # (its reason alone would be listed as an item)
                        (folder / f"{oid.hex()}.obj{REASON_JSON}").unlink(missing_ok=True)
        manifest = None if refused is None else refused.manifest
        self.audit.try_record(
            "delivery.rejected",
            subject=self._delivery_subject,
            result="rejected",
            reason=reason[:1024],
            obj=AuditObject(item=oid.hex())
            if manifest is None or kept is not None
            else AuditObject(  # (not kept: what a reason file would have said of it)
                item=oid.hex(),
                channel=manifest.channel,
                name=manifest.name[:512],
                size=manifest.size,
                sha256=manifest.sha256.hex(),
            ),
            detail={"kept": kept},
            corr=oid.hex(),
        )
        try:
            self.ledger.record(oid, "rejected", reason=reason)
        except sqlite3.Error as exc:  # (a full disk: a repeat is refused again, by its check)
            _log.error("refusal_not_in_ledger", object_id=oid.hex(), error=str(exc))
        _log.error("object_rejected", object_id=oid.hex(), reason=reason, kept=kept)

    def _deliver_file(
        self,
        oid: bytes,
        length: int,
        *,
        kept: bool = False,
        settle: bool = False,
        lane: _Lane | None = None,
    ) -> None:
        """Deliver a complete spooled file (``kept``: from before this start; ``settle``: one
        the ledger left at ``delivering``, see :meth:`_settle`). While its folder fails in a
        way that passes (a share that does not answer, a full disk: RETRY_ERRNOS), it is
        tried again, waiting longer each time up to RETRY_MAX seconds: never refused for it."""
        wait = RETRY_FIRST
        again = settle
        while True:
            try:
                if again and (settle or self.ledger.state_of(oid) == "delivering"):
                    settled = self._settle(oid)
                    if settled is None:
                        return
                    length, kept = settled, True
                settle = False
                if self._deliver_once(oid, length, kept=kept, lane=lane):
                    return
            except (OSError, sqlite3.Error) as exc:
                if not _passes(exc):
                    raise
                _log.warning(
                    "delivery_waiting_for_folder",
                    object_id=oid.hex(),
                    channel=None if lane is None else lane.channel,
                    error=str(exc),
                    retry_in=wait,
                )
                if self.stop.wait(wait):
                    return  # stopping: the spool file stays; the next start delivers it
                wait = min(2 * wait, RETRY_MAX)
            again = True

    def _deliver_once(self, oid: bytes, length: int, *, kept: bool, lane: _Lane | None) -> bool:
        """One try of :meth:`_deliver_file`: True once settled (delivered, a duplicate,
        refused), False to try again at once (the audit log is writable again). Raises an
        OSError of RETRY_ERRNOS."""
        path = self._spool_path(oid)
        try:
            result = deliver(
                path,
                oid,
                length,
                sender=self.sender_keys,
                folders=self.folders,
                ledger=self.ledger,
                subfolders=self.subfolders,
                on_linked=self._record_delivered_file,
                recheck=self._recheck,
                checking=self._checking if lane is None else lane.checking(self._checking),
            )
        except AuditUnavailable as exc:  # not recorded: settle it once the log recovers
            _log.error("delivery_not_recorded", object_id=oid.hex(), error=str(exc))
            # stopping: the spool file stays, the next start settles it; else again, at once
            return not self._wait_for_audit()
        except (OSError, FerryError) as exc:
            if not self._refuse_file(oid, exc, kept=kept):
                raise
            return True
        self._delivered(result)
        return True

    def _refuse_file(self, oid: bytes, exc: Exception, *, kept: bool) -> bool:
        """Refuse a file for ``exc``, what its delivery raised (a check it failed; a kept one
        that does not verify is dropped as not intact). False if ``exc`` refuses nothing:
        the audit log cannot write, a folder error that passes (RETRY_ERRNOS), or any other
        error."""
        if isinstance(exc, AuditUnavailable):
            return False
        if isinstance(exc, WireError) and kept:
            self._drop_kept(oid, exc)
        elif isinstance(exc, NotAuthentic):
            self._not_authentic(oid, exc, spooled=True)
        elif isinstance(exc, RecheckFailed):
            self._reject(oid, str(exc), quarantine=True, refused=exc)
        elif isinstance(exc, FerryError) or (
            isinstance(exc, OSError) and exc.errno not in RETRY_ERRNOS
        ):
            self._reject(oid, str(exc))
        else:
            return False
        return True

    def _delivered(self, result: Delivered | Duplicate) -> None:
        if isinstance(result, Duplicate):
            _log.info("duplicate_ignored", object_id=result.object_id.hex())
            self._note_duplicate(result.object_id)
            return
        with self._count_lock:
            self.delivered += 1
            self.delivered_bytes += result.manifest.size
        _log.info(
            "delivered",
            object_id=result.manifest.object_id.hex(),
            channel=result.manifest.channel,
            seq=result.manifest.seq,
            name=result.manifest.name,
            path=str(result.path),
            size=result.manifest.size,
            sha256=result.manifest.sha256.hex(),
        )

    def _mirror_loop(self) -> None:
        while (job := self._mirror_work.get()) is not None:
            try:
                self._mirror_piece(*job)
            except Exception:  # noqa: BLE001  # the mirror must keep up with later pieces
                _log.exception("mirror_piece_failed", object_id=job[0].hex())

    def _mirror_piece(self, oid: bytes, manifest: rec.Manifest, content: bytes) -> None:
        """A piece of the outside's audit log: into the mirror (repeats are harmless)."""
        self.gaps.seen(manifest.channel, manifest.seq)
        if self.mirror is None:
            return  # this inside keeps no mirror
        try:
            self.mirror.receive(manifest.name, content)
        except MirrorRejected as exc:
            _log.error("mirror_piece_refused", object_id=oid.hex(), reason=str(exc))
        except OSError as exc:
            _log.error("mirror_write_failed", object_id=oid.hex(), error=str(exc))

    def _note_duplicate(self, oid: bytes) -> None:
        now = time.monotonic()
        last = self._dup_noted.get(oid)
        if last is not None and now - last < DUPLICATE_NOTE_INTERVAL:
            return
        if len(self._dup_noted) > 100_000:
            self._dup_noted.clear()
        self._dup_noted[oid] = now
        self.audit.try_record(
            "transfer.duplicate",
            subject=self.peer,
            result="info",
            obj=AuditObject(item=oid.hex()),
            corr=oid.hex(),
        )

    def _item_object(self, m: rec.Manifest, path: Path | None) -> AuditObject:
        return AuditObject(
            kind=m.kind if m.kind in ("file", "message") else None,
            item=m.object_id.hex(),
            channel=m.channel,
            seq=m.seq,
            name=m.name,
            size=m.size,
            sha256=m.sha256.hex(),
            media_type=m.media_type,
            path=None if path is None else str(path),
        )

    def _record_received(self, m: rec.Manifest) -> None:
        self.gaps.seen(m.channel, m.seq)
        self.audit.record(
            "transfer.received",
            subject=Subject("peer", m.sender.hex()),  # the key that signed it (rotation)
            obj=self._item_object(m, None),
            corr=m.object_id.hex(),
        )

    def _record_delivered(self, m: rec.Manifest, path: Path | None, *, consumers: bool) -> int:
        return self.audit.record(
            "delivery.delivered",
            subject=self._delivery_subject,
            obj=self._item_object(m, path),
            detail={"consumers": consumers},
            corr=m.object_id.hex(),
        )

    def _record_messages(
        self,
        event: str,
        subject: Subject | None,
        messages: Sequence[tuple[bytes, rec.Manifest]],
        *,
        recorded: set[tuple[str, str]],
        detail: dict[str, object] | None = None,
        paths: Mapping[bytes, Path] | None = None,
    ) -> int:
        """Batch records of ``event`` for ``messages`` (id, manifest), one per channel
        (``paths``: where each was delivered; ``subject`` None: the peer that signed each).
        Those in ``recorded`` were written by an earlier try (``(event, item id)``) and are
        skipped; each one written is added. The last index, or -1."""
        by_channel: dict[tuple[str, str, bytes], list[dict[str, object]]] = {}
        for oid, m in messages:
            item = oid.hex()
            if (event, item) in recorded:
                continue
            entry: dict[str, object] = {
                "item": item,
                "name": m.name,
                "seq": m.seq,
                "sha256": m.sha256.hex(),
                "size": m.size,
            }
            if paths is not None and oid in paths:
                entry["path"] = str(paths[oid])
            signer = m.sender if subject is None else b""
            by_channel.setdefault((m.channel, m.media_type, signer), []).append(entry)
        last = -1
        for (channel, media_type, signer), entries in by_channel.items():
            who = subject if subject is not None else Subject("peer", signer.hex())
            last = self.audit.record_items(
                event,
                subject=who,
                shared={"channel": channel, "kind": "message", "media_type": media_type},
                entries=entries,
                detail=detail,
                recorded=lambda run: recorded.update((event, str(e["item"])) for e in run),
            )
        return last

    def _record_delivered_file(self, m: rec.Manifest, path: Path) -> None:
        self.audit.log.wait_durable(self._record_delivered(m, path, consumers=False))

    def _record_delivered_files(self, files: list[tuple[rec.Manifest, Path]]) -> None:
        """A record each, on disk together (one wait)."""
        last = -1
        for m, path in files:
            last = self._record_delivered(m, path, consumers=False)
        if last >= 0:
            self.audit.log.wait_durable(last)

    def _check_message(self, manifest: rec.Manifest, content: bytes) -> None:
        """The inside's own checks of a message: channel, schema, strict JSON, canonical."""
        ch = self.msg_channels.get(manifest.channel)
        if ch is None or self.schemas is None:
            raise FerryError(f"channel {manifest.channel!r} takes no messages on this inside")
        if manifest.schema not in ch.schemas:
            raise FerryError(f"schema {manifest.schema!r} is not accepted on {ch.name}")
        _, canonical = self.schemas.check(manifest.schema, content, INSIDE_MESSAGE_LIMITS)
        if canonical != content:
            raise FerryError("message is not in canonical form")

    def _deliver_messages_audited(
        self, batch: list[tuple[bytes, rec.Manifest, bytes]], lane: _MessageLane
    ) -> bool:
        """Deliver a batch; while the audit log cannot write, or a messages folder fails in
        a way that passes (RETRY_ERRNOS: full disk...), wait and try again (the later
        messages of the lane's channel wait in its queue, in the spool beyond
        MESSAGES_IN_MEMORY bytes; other channels go on). False: stopping, the batch not
        delivered."""
        recorded: set[tuple[str, str]] = set()  # (event, item) in the log: not twice on retry
        wait = RETRY_FIRST
        with self._msg_taken_lock:  # (a copy on another lane meanwhile: a repeat there)
            mine = [item for item in batch if item[0] not in self._msg_taken]
            self._msg_taken.update(oid for oid, _, _ in mine)
        lane.held_since = time.monotonic()  # (named held up after HELD_REPORTED seconds)
        try:
            while True:
                try:
                    self._deliver_messages(mine, recorded)
                    return True
                except AuditUnavailable as exc:
                    _log.error("message_batch_held", count=len(batch), error=str(exc))
                    if not self._wait_for_audit():
                        return False
                except (OSError, sqlite3.Error) as exc:
                    if not _passes(exc):
                        raise
                    _log.warning(
                        "messages_waiting_for_folder",
                        count=len(batch),
                        error=str(exc),
                        retry_in=wait,
                    )
                    if self.stop.wait(wait):
                        return False
                    wait = min(2 * wait, RETRY_MAX)
        finally:
            lane.held_since = None
            with self._msg_taken_lock:
                self._msg_taken.difference_update(oid for oid, _, _ in mine)

    def _deliver_messages(
        self,
        batch: list[tuple[bytes, rec.Manifest, bytes]],
        recorded: set[tuple[str, str]],
    ) -> None:
        """Check, then deliver a batch with one flush and one ledger transaction.

        Folder files are written and linked first (idempotently: a file
        already holding the same content is not written twice). Their audit
        records follow; the folders are fsynced while the audit writer syncs
        those records (two waits for the disk at once, not one after the other).
        Once both are on disk, one transaction records every message delivered
        and queues it for consumers.
        """
        ok: list[tuple[bytes, rec.Manifest, bytes]] = []
        seen: set[bytes] = set()
        known = self.ledger.states_of([oid for oid, _, _ in batch])
        for oid, manifest, content in batch:
            if oid in seen or known.get(oid) in {"delivered", "rejected"}:
                continue  # a repeat
            seen.add(oid)
            try:
                self._check_message(manifest, content)
            except (FerryError, PolicyRejection) as exc:
                self._reject(oid, f"message re-check failed: {exc}", content)
                continue
            ok.append((oid, manifest, content))
        if not ok:
            return
        paths: dict[bytes, Path] = {}
        by_folder: dict[Path, list[tuple[bytes, rec.Manifest, bytes]]] = {}
        for item in ok:
            folder = self.msg_channels[item[1].channel].deliver
            if folder is not None:
                by_folder.setdefault(folder, []).append(item)
        for folder, items in by_folder.items():
            written = write_new_files(
                folder,
                [(m.name, c, m.sha256) for _, m, c in items],
                [name_tag(oid) for oid, _, _ in items],
            )
            paths.update((oid, p) for (oid, _, _), p in zip(items, written, strict=True))
        queued = [
            OutboxItem(oid, m.channel, m.seq, m.schema, m.subject, m.created_us, c)
            for oid, m, c in ok
            if self.msg_channels[m.channel].consumers and self.outbox is not None
        ]
        to_consumers = {q.object_id for q in queued}
        for _, m, _ in ok:
            self.gaps.seen(m.channel, m.seq)
        # recorded (durably) before the ledger says delivered: one record per batch
        # and channel for each event, not one per message (docs/AUDIT.md §2)
        received = [(oid, m) for oid, m, _ in ok]
        last = self._record_messages("transfer.received", None, received, recorded=recorded)
        for consumers in (True, False):
            idx = self._record_messages(
                "delivery.delivered",
                self._delivery_subject,
                [(oid, m) for oid, m in received if (oid in to_consumers) is consumers],
                recorded=recorded,
                detail={"consumers": consumers},
                paths=paths,
            )
            last = max(last, idx)
        for folder in by_folder:  # the new names on disk, while the audit writer syncs too
            fsync_dir(folder)
        if last >= 0:
            self.audit.log.wait_durable(last)
        self.ledger.record_many(
            [
                {
                    "object_id": oid,
                    "state": "delivered",
                    "channel": m.channel,
                    "seq": m.seq,
                    "name": m.name,
                    "path": str(paths[oid]) if oid in paths else None,
                    "size": m.size,
                    "sha256": m.sha256,
                }
                for oid, m, _ in ok
            ],
            also=(lambda db: Outbox.insert(db, queued)) if queued else None,
        )
        for oid, m, _ in ok if log.enabled("debug") else ():  # (every one is in the audit log)
            _log.debug(
                "delivered",
                object_id=oid.hex(),
                channel=m.channel,
                seq=m.seq,
                schema=m.schema,
                subject=m.subject,
                path=str(paths[oid]) if oid in paths else None,
                size=m.size,
                sha256=m.sha256.hex(),
            )
        with self._count_lock:
            self.delivered += len(ok)
            self.delivered_bytes += sum(m.size for _, m, _ in ok)
        if self.consumers is not None and queued:
            self.consumers.notify(queued)

    # ---------------------------------------------------------------- main
    def run(self) -> int:
        cfg = self.cfg
        self._recover()
        machine = Receiver(
            cfg.link,
            self.sender_keys,
            self.kem_keys,
            replay_floor={k.key_id: self.ledger.replay_floor(k.key_id) for k in self.sender_keys},
            max_object_size=cfg.max_object_size,
            object_timeout=cfg.object_timeout,
        )
        for oid in self.ledger.finished_ids(50_000):
            machine.mark_finished(oid)
        for oid, length in self._kept:  # (a repeat meanwhile finds it there: _spooled)
            self._work.put((oid, length, True))
        monitor = LinkMonitor(
            cfg.link.digest(),
            degraded_after=cfg.degraded_after,
            down_after=cfg.down_after,
            max_clock_skew=cfg.max_clock_skew,
        )
        channel = open_receiver(cfg)
        sys.setswitchinterval(0.0005)  # several threads hand work along: keep hand-offs short
        if self.consumers is not None:
            self.consumers.start()
        workers = [
            threading.Thread(target=self._dispatch_loop, name="deliver-spooled", daemon=True)
        ]
        for mlane in self._msg_lanes.values():
            mlane.thread = threading.Thread(
                target=self._messages_loop,
                args=(mlane,),
                name=f"messages-{mlane.channel}" if mlane.channel else "messages",
                daemon=True,
            )
            workers.append(mlane.thread)
        lanes = []
        for lane in self._lanes.values():
            lane.thread = threading.Thread(
                target=self._lane_loop, args=(lane,), name=f"deliver-{lane.channel}", daemon=True
            )
            lanes.append(lane.thread)
        settle_gc()
        mirror = threading.Thread(target=self._mirror_loop, name="audit-mirror", daemon=True)
        for worker in (*workers, *lanes, mirror):
            worker.start()
        _log.info(
            "inside_started",
            transport=cfg.link.transport,
            kem_key=self.kem_key.public.key_id.hex(),
            trusted_sender=self.sender_key.key_id.hex(),
            previous_kem_keys=[k.public.key_id.hex() for k in self.kem_keys[1:]] or None,
            previous_senders=[k.key_id.hex() for k in self.sender_keys[1:]] or None,
            link_state=monitor.state.value,
        )
        next_tick = next_status = 0.0
        started_at = time.time()
        try:
            while not self.stop.is_set():
                batch = channel.recv_batch(0.05)
                now = time.time()
                for datagram in batch:
                    try:
                        machine.receive_datagram(datagram, now)
                    except WireError as exc:
                        n = self._reject_log("packet_rejected", str(exc), kind=type(exc).__name__)
                        if n and isinstance(exc, ReplayRejected):  # (1st, 2nd, 4th... time)
                            self.audit.try_record(
                                "transfer.replay_rejected",
                                subject=self.peer,
                                result="rejected",
                                reason=f"REPLAY: {exc}"[:1024],
                                obj=AuditObject(kind="link"),
                                detail={"count": n},
                            )
                    self._handle(machine, monitor, now)
                mono = time.monotonic()
                if mono >= next_tick:
                    next_tick = mono + TICK_INTERVAL
                    machine.tick(now)
                    self._handle(machine, monitor, now)
                    if self._floors_to_save:
                        self._save_floors()
                    self.releases.scan({self.quarantine_dir: None})  # (every 2 s at most)
                    self._retention.step(mono)  # (finished items past cfg.retention_days)
                    for ev in monitor.tick(now):
                        _log.warning("link_" + ev.kind, message=ev.message, state=ev.state.value)
                        self._record_link(ev.kind, ev.message, ev.state.value, ev.detail)
                    for gap in self.gaps.due(mono):
                        _log.error(
                            "sequence_gap", channel=gap.channel, first=gap.first, last=gap.last
                        )
                        self.audit.try_record(
                            "link.sequence_gap",
                            subject=self.peer,
                            result="failure",
                            reason=f"SEQUENCE_GAP: items {gap.first}..{gap.last} of channel "
                            f"{gap.channel} were sent but never arrived",
                            obj=AuditObject(kind="link", channel=gap.channel),
                            detail={"first": gap.first, "last": gap.last},
                        )
                if mono >= next_status:
                    next_status = mono + STATUS_INTERVAL
                    st = machine.stats
                    write_status(
                        self.status_path,
                        {
                            "role": "inside",
                            "pid": os.getpid(),
                            "written_at": now,
                            "started_at": started_at,
                            "audit_problem": self.audit.log.problem,
                            **(
                                {}
                                if self.mirror is None
                                else {"audit_mirror_problem": self.mirror.broken}
                            ),
                            "link_state": monitor.state.value,
                            "last_heartbeat_age": (
                                round(now - monitor.last_heard, 3) if monitor.last_heard else None
                            ),
                            "link_params_mismatch": monitor.params_mismatch,
                            "link_clock_skew": monitor.clock_skewed,
                            "datagrams": st.datagrams,
                            "symbols": st.symbols,
                            "blocks_decoded": st.blocks_decoded,
                            "blocks_recovered": st.blocks_recovered,
                            "objects_completed": st.objects_completed,
                            "objects_lost": self.lost,
                            "delivered": self.delivered,
                            "delivered_bytes": self.delivered_bytes,
                            "messages_waiting": sum(
                                lane.work.qsize() for lane in self._msg_lanes.values()
                            ),
                            "files_waiting": {
                                ch: n for ch, lane in self._lanes.items() if (n := lane.waiting())
                            },
                            "delivery_held": self._held_channels(time.monotonic()),
                            "rejected": self.rejected,
                            "rejections": dict(self._reject_log.counts),
                            "active_objects": machine.active_objects,
                            "framing_errors": channel.stats.framing_errors,
                            "overflow_drops": channel.stats.overflow_drops,
                            "heartbeats_missed": monitor.heartbeats_missed,
                            "consumer_previous_server_keys": (
                                [] if self.consumers is None else self.consumers.keys.status()
                            ),
                        },
                    )
        finally:
            self._stop_delivery(workers)
            self._mirror_work.put(None)  # (after the delivery threads: every piece is placed)
            mirror.join(timeout=30)
            if self.consumers is not None:
                self.consumers.close()
            if self.outbox is not None:
                self.outbox.close()
            channel.close()
            for fd in self._fds.values():
                os.close(fd)
            self.ledger.close()
            self.audit.close()
            _log.info(
                "inside_stopped", delivered=self.delivered, rejected=self.rejected, lost=self.lost
            )
        return 0

    def _held_channels(self, now: float) -> dict[str, float]:
        """Files channels whose thread has been on one file (its verification and re-check
        not counted), and messages channels whose folder has not taken a batch, for
        HELD_REPORTED seconds or more: for how long."""
        held = {
            ch: round(now - since, 1)
            for ch, lane in sorted(self._lanes.items())
            if (since := lane.busy_since) is not None and now - since >= HELD_REPORTED
        }
        held.update(
            (ch, round(now - since, 1))
            for ch, lane in sorted(self._msg_lanes.items())
            if ch and (since := lane.held_since) is not None and now - since >= HELD_REPORTED
        )
        return dict(sorted(held.items()))

    def _stop_delivery(self, workers: list[threading.Thread]) -> None:
        """Let the delivery threads finish what they hold (STOP_WAIT seconds in all); one
        still waiting on a folder that does not answer is left behind (its files stay in
        the spool, its messages are written there: all are delivered at the next start)."""
        deadline = time.monotonic() + STOP_WAIT
        self._work.put(None)
        for mlane in self._msg_lanes.values():
            mlane.work.put(None)
        for worker in workers:  # (first: they hand files on to the lanes)
            worker.join(max(0.0, deadline - time.monotonic()))
        for mlane in self._msg_lanes.values():
            if mlane.thread is not None and mlane.thread.is_alive():
                self._keep_left_behind(mlane)
        for lane in self._lanes.values():
            lane.work.put(None)
        for lane in self._lanes.values():
            assert lane.thread is not None
            lane.thread.join(max(0.0, deadline - time.monotonic()))
            if lane.thread.is_alive():
                _log.warning(
                    "delivery_thread_left_waiting",
                    channel=lane.channel,
                    folder=str(lane.folder),
                    effect="its files stay in the spool and are delivered at the next start",
                )

    def _keep_left_behind(self, lane: _MessageLane) -> None:
        """A message lane still on a batch at the end of the stop (its folder does not
        answer): the messages it holds in memory, in that batch and in its queue, are
        written to the spool for the next start. (Should the thread still deliver some
        before the process ends, the ledger makes the next start drop those as repeats.)"""
        queued: list[Job] = []
        while True:
            try:
                job = lane.work.get_nowait()
            except queue.Empty:
                break
            if job is None:
                break
            queued.append(job)
        folder = self.msg_channels[lane.channel].deliver if lane.channel else None
        _log.warning(
            "delivery_thread_left_waiting",
            channel=lane.channel,
            folder=None if folder is None else str(folder),
            effect="its messages are kept in the spool and delivered at the next start",
        )
        self._keep_held([*lane.holding, *queued])

    def _save_floors(self) -> None:
        """Persist the replay floors of the sessions started (a start after a crash refuses
        older sessions). On a full disk they wait in memory and are saved at a later tick;
        the running session is not affected."""
        for signer, (epoch, counter) in list(self._floors_to_save.items()):
            try:
                self.ledger.set_replay_floor(signer, epoch, counter)
            except sqlite3.Error as exc:
                self._disk_log("replay_floor_not_saved", str(exc), signer=signer.hex())
                return
            if self._floors_to_save.get(signer) == (epoch, counter):
                del self._floors_to_save[signer]

    def _record_link(self, kind: str, message: str, state: str, detail: dict[str, Any]) -> None:
        event = LINK_EVENTS.get(kind)
        if event is None:
            return
        result: Result = "info" if kind in ("state", "sender_restart") else "failure"
        self.audit.try_record(
            event,
            subject=self.peer,
            result=result,
            reason=None if result == "info" else f"{kind.upper()}: {message}"[:1024],
            obj=AuditObject(kind="link"),
            detail={"state": state, "message": message[:512], **detail},
        )

    def _handle(self, machine: Receiver, monitor: LinkMonitor, now: float) -> None:
        while not self._to_forget.empty():
            self._forget(machine, self._to_forget.get())
        for ev in machine.pop_events():
            if isinstance(ev, BlockDecoded):
                if ev.offset == 0 and len(ev.data) == ev.object_length <= MEMORY_OBJECT_MAX:
                    self._mem[ev.object_id] = ev.data  # the whole object (a message)
                else:
                    self._spool_block(ev)
            elif isinstance(ev, ObjectCompleted):
                if ev.object_id in self._here:  # (a copy of one waiting here, or finished)
                    self._here.discard(ev.object_id)
                    if not self._already_here(ev.object_id):  # (the one waiting was dropped)
                        self._forget(machine, ev.object_id)
                    continue
                # (an empty object's only block still went through BlockDecoded)
                try:
                    self._completed(ev.object_id, ev.length)
                except OSError as exc:
                    self._unspooled[ev.object_id] = str(exc)
                if (why := self._unspooled.pop(ev.object_id, None)) is not None:
                    self._not_spooled(machine, ev.object_id, ev.length, why)
                else:
                    self._forgotten.pop(ev.object_id, None)
            elif isinstance(ev, ObjectLost):
                self._mem.pop(ev.object_id, None)
                # (a later copy is written afresh)
                why_not = self._unspooled.pop(ev.object_id, None)
                self._drop_part(ev.object_id)
                if ev.object_id in self._here or self._already_here(ev.object_id):
                    self._here.discard(ev.object_id)  # (a copy of one waiting or finished)
                    _log.info("repeat_lost", object_id=ev.object_id.hex(), reason=ev.reason)
                    continue
                if ev.object_id in self._forgotten:  # (already recorded lost: NOT_SPOOLED)
                    del self._forgotten[ev.object_id]
                    _log.info("repeat_lost", object_id=ev.object_id.hex(), reason=ev.reason)
                    continue
                self.lost += 1
                lost_why = ev.reason if why_not is None else f"{ev.reason}; not spooled: {why_not}"
                try:
                    self.ledger.record(ev.object_id, "lost", reason=lost_why)
                except sqlite3.Error as exc:  # (a full disk: the audit record below says it)
                    _log.error("loss_not_in_ledger", object_id=ev.object_id.hex(), error=str(exc))
                self._record_lost(
                    ev.object_id,
                    f"LOST: {lost_why}",
                    size=ev.length,
                    detail={"blocks_done": ev.blocks_done, "blocks_total": ev.blocks_total},
                )
                _log.error(
                    "object_lost",
                    object_id=ev.object_id.hex(),
                    reason=lost_why,
                    blocks_done=ev.blocks_done,
                    blocks_total=ev.blocks_total,
                )
            elif isinstance(ev, SessionStarted):
                signer = ev.sender_kid or self.sender_key.key_id
                self._floors_to_save[signer] = (ev.epoch, ev.counter)
                self._save_floors()
                self.audit.try_record(
                    "link.session_started",
                    subject=Subject("peer", signer.hex()),
                    result="info",
                    obj=AuditObject(kind="link", epoch=str(ev.epoch), session=ev.session_id.hex()),
                    detail={"counter": ev.counter},
                )
                _log.info(
                    "session_started",
                    epoch=ev.epoch,
                    counter=ev.counter,
                    session_id=ev.session_id.hex(),
                )
            elif isinstance(ev, HeartbeatReceived):
                for lev in monitor.on_heartbeat(ev.heartbeat, now):
                    level = "info" if lev.kind == "state" else "warning"
                    getattr(_log, level)(
                        "link_" + lev.kind, message=lev.message, state=lev.state.value, **lev.detail
                    )
                    self._record_link(lev.kind, lev.message, lev.state.value, lev.detail)
                self.gaps.heartbeat(ev.heartbeat.last_seq, time.monotonic())

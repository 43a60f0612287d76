"""Folder intake: watched drop folders (watchdog), gateway-owned copies, quarantine.

A file is taken when the watcher reports it complete (closed after writing,
renamed into place, or size and mtime stable for ``settle_seconds``). It is
copied into gateway-owned storage with ``O_NOFOLLOW`` (symlinks, devices and
FIFOs are refused), hashed while copied, wrapped with a signed trailer and
fsynced; only then is its row committed and the clerk's original moved to
``sent/`` (or deleted). A file the channel's policy refuses goes to the
channel's quarantine folder with ``<name>.reason.json`` and ``<name>.reason.txt``.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import json
import mimetypes
import os
import shutil
import sqlite3
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from ferry import log
from ferry.audit.agent import AgentAudit
from ferry.audit.record import AuditObject, AuditUnavailable, Subject
from ferry.config_types import OutsideChannel
from ferry.content.base import FEATURES, Verdict
from ferry.crypto.keys import PublicKey, SecretKey
from ferry.errors import PolicyRejection, UnsafePathError
from ferry.names import candidate_names
from ferry.place import (
    drop_temp,
    flush_all,
    link_new,
    pinned_folder,
    remove_stale_temps,
    sync_names,
    temp_name,
)
from ferry.quarantine_release import RELEASES, ReleaseAuditor, locked
from ferry.state import disk_room, room_reserve
from ferry.wire import records as rec
from ferry.wire.records import MAX_REPORT_BYTES
from ferry.wire.sender import build_trailer
from outside.content.pipeline import ContentPipeline
from outside.quarantine import Quarantine
from outside.quarantine_cli import NOT_OVERRIDABLE, overrides_by_sha
from outside.spool import Spool, SpoolItem, now_us
from outside.watch import DropWatcher, Ready, Refused, WatchSpec, check_specs

# Small files ready together are spooled together (one flush of their contents, one
# transaction, one wait for their intake records): up to this many files or bytes, each
# of at most BATCH_FILE_MAX bytes (a larger one is spooled alone).
INTAKE_BATCH = 64
INTAKE_BATCH_BYTES = 8 * 1024 * 1024
BATCH_FILE_MAX = 1024 * 1024
# Refused files remembered per channel while their quarantine cannot take them (beyond
# this, the oldest is forgotten, and checked and recorded refused again at its next turn).
MAX_UNMOVED = 10_000
# Copy in 1 MiB pieces: large enough for throughput, small enough to keep memory flat.
COPY_CHUNK = 1024 * 1024
# Sanitizer actions listed in a verdict record and in the report sent along (the full
# report stays outside, with the quarantined item or in structlog).
MAX_AUDITED_ACTIONS = 20
CONTENT_SUBJECT = Subject.component("content")

_log = log.get("outside.intake")

ContentCheck = Callable[[OutsideChannel, Path, str], None]
"""The content-security hook: ``check(channel, gateway-owned copy, name)`` raises
PolicyRejection (reason code + message) to quarantine the file."""


def _source_key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _lstat_or_none(path: Path) -> os.stat_result | None:
    """The file's own status (a symlink's, not its target's), or None if it cannot be had."""
    try:
        return os.lstat(path)
    except OSError:
        return None


def _unmoved_key(st: os.stat_result) -> str:
    """A version of a file, as far as its metadata tell: its source key and its change time
    (which no one can set back: a file written again with its size and date restored is
    another version)."""
    return f"{_source_key(st)}:{st.st_ctime_ns}"


def _beneath(fd: int, folder: Path | None) -> bool:
    """Is the file open as ``fd`` inside ``folder``? Asked of the kernel (what was opened, not
    the path again), so a folder on the way swapped for a symlink cannot bring in a file from
    elsewhere."""
    if folder is None:
        return False
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False
    root = os.path.realpath(folder)
    return real.startswith(root.rstrip("/") + "/")


def _folder_problem(relpath: PurePosixPath) -> str | None:
    """Why the subfolders a file was found in cannot travel with it (None: they can): each
    must be valid UTF-8 without control characters, and the path fit the manifest."""
    parts = relpath.parent.parts
    for part in parts:
        try:
            part.encode("utf-8")
        except UnicodeEncodeError:
            return f"a folder name is not valid UTF-8: {part.encode('utf-8', 'replace')!r}"
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in part):
            return f"a folder name holds a control character: {part!r}"
    if len("/".join(parts).encode("utf-8")) > rec.MAX_PATH_BYTES:
        return f"the folder path is longer than {rec.MAX_PATH_BYTES} bytes"
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_type(channel: OutsideChannel, _copy: Path, name: str) -> None:
    """The channel's extension allow-list (the content pipeline checks the real type)."""
    if "*" in channel.allowed_types:
        return
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if ext not in channel.allowed_types:
        raise PolicyRejection(
            "TYPE_NOT_ALLOWED",
            f"files of type .{ext or '(none)'} are not accepted on channel {channel.name} "
            f"(allowed: {', '.join('.' + t for t in channel.allowed_types)})",
        )


@dataclass(frozen=True)
class Pending:
    """A gateway-owned content file ready to be spooled, and what its manifest will say
    (see :func:`spool_file_item` for the fields)."""

    owned: Path
    name: str
    subject: str
    relpath: str = ""
    mtime_us: int | None = None
    source_path: str = ""
    source_key: str = ""
    report: str = ""
    media_type: str | None = None
    record: Callable[[SpoolItem, str, str], int | None] | None = None


def spool_file_item(
    spool: Spool,
    key: SecretKey,
    channel: OutsideChannel,
    owned: Path,
    *,
    name: str,
    subject: str,
    relpath: str = "",
    mtime_us: int | None = None,
    source_path: str = "",
    source_key: str = "",
    submission: tuple[str, str, bytes] | None = None,
    record: Callable[[SpoolItem, str, str], int | None] | None = None,
    report: str = "",
    media_type: str | None = None,
) -> SpoolItem:
    """Turn a gateway-owned content file into a spooled item (consumes ``owned``).

    Hashes it, appends the signed trailer, fsyncs, renames it into the spool
    and commits its row. ``owned`` must be on the spool's filesystem.
    ``record(item, sha256 hex, media type)`` is called just before the commit
    (the audit record); if it raises, nothing is spooled and the error propagates.
    """
    p = Pending(
        owned, name, subject, relpath, mtime_us, source_path, source_key, report, media_type,
        record,
    )  # fmt: skip
    return spool_pending(spool, key, channel, p, submission=submission)


def spool_pending(
    spool: Spool,
    key: SecretKey,
    channel: OutsideChannel,
    p: Pending,
    *,
    submission: tuple[str, str, bytes] | None = None,
) -> SpoolItem:
    """:func:`spool_file_item` for a :class:`Pending` file."""
    opened = _open_hashed(p.owned)
    try:
        os.fsync(opened.fd)  # the content: a large file's sync holds up no one waiting
        with spool.numbering(channel.name) as seq:  # for a number
            sealed = _seal(opened, p, key, channel, spool, seq=seq)
            os.fsync(opened.fd)
            opened.close()
            _, refused = _place([p], [sealed], spool, channel, submission=submission)
    finally:
        opened.close()
    if refused is not None:
        raise refused
    return sealed.item


def spool_file_items(
    spool: Spool, key: SecretKey, channel: OutsideChannel, batch: Sequence[Pending]
) -> tuple[list[SpoolItem], AuditUnavailable | None]:
    """Spool several files of one channel at once (consumes each ``owned``): the steps of
    :func:`spool_file_item`, with one flush of all their contents (syncfs), one fsync of
    the spool folder and one transaction, not one of each per file. Each one's ``record``
    is called in turn before the commit. Returns the items spooled: every one, or those
    recorded before the audit log refused a record (with that refusal). On any other
    failure none of them is spooled and the error propagates. For small files: their
    contents are synced while the channel's numbers are held."""
    opened: list[_Opened] = []
    try:
        for p in batch:
            opened.append(_open_hashed(p.owned))
        with spool.numbering(channel.name) as seq:
            sealed = [
                _seal(o, p, key, channel, spool, seq=seq + i)
                for i, (p, o) in enumerate(zip(batch, opened, strict=True))
            ]
            flush_all([o.fd for o in opened])
            for o in opened:
                o.close()
            kept, refused = _place(batch, sealed, spool, channel)
    finally:
        for o in opened:
            o.close()
    return [s.item for s in sealed[:kept]], refused


@dataclass
class _Opened:
    """A content file open for its trailer, with its size and SHA-256."""

    fd: int
    size: int
    digest: Any  # hashlib's sha256 object

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class _Sealed:
    item: SpoolItem
    sha256: bytes
    media_type: str


def _open_hashed(owned: Path) -> _Opened:
    fd = os.open(owned, os.O_RDWR | os.O_NOFOLLOW)
    digest = hashlib.sha256()
    size = 0
    try:
        while chunk := os.read(fd, COPY_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    except BaseException:
        os.close(fd)
        raise
    return _Opened(fd, size, digest)


def _seal(
    opened: _Opened, p: Pending, key: SecretKey, channel: OutsideChannel, spool: Spool, *, seq: int
) -> _Sealed:
    """Sign the file's manifest (sequence number ``seq``) and append it as its trailer."""
    object_id = os.urandom(16)
    created = now_us()
    manifest = rec.Manifest(
        object_id=object_id,
        kind="file",
        channel=channel.name,
        seq=seq,
        name=p.name,
        media_type=p.media_type or mimetypes.guess_type(p.name)[0] or "application/octet-stream",
        size=opened.size,
        sha256=opened.digest.digest(),
        created_us=created,
        mtime_us=created if p.mtime_us is None else p.mtime_us,
        sender=key.public.key_id,
        path=p.relpath,
        subject=p.subject,
        report=p.report,
    )
    trailer = build_trailer(manifest, key)
    view = memoryview(trailer)
    at = opened.size
    while view:
        done = os.pwrite(opened.fd, view, at)
        view, at = view[done:], at + done
    item = SpoolItem(
        object_id,
        channel.name,
        seq,
        p.name,
        opened.size,
        opened.size + len(trailer),
        spool.dir / f"{object_id.hex()}.obj",
        kind="file",
        priority=channel.priority,
        sends_total=channel.repeat.count,
    )
    return _Sealed(item, manifest.sha256, manifest.media_type)


def _place(
    batch: Sequence[Pending],
    sealed: Sequence[_Sealed],
    spool: Spool,
    channel: OutsideChannel,
    *,
    submission: tuple[str, str, bytes] | None = None,
) -> tuple[int, AuditUnavailable | None]:
    """Durable contents into the spool: renamed, the spool folder synced, each ``record``
    called in turn, then one transaction. If the audit log refuses a record, the files
    recorded before it are committed (no record without its item) and the others leave
    the spool; all of them leave it on any other failure. Returns how many were
    committed (the first ones) and the refusal, if any."""
    placed: list[Path] = []
    refused: AuditUnavailable | None = None
    try:
        for p, s in zip(batch, sealed, strict=True):
            assert s.item.spool_file is not None
            os.rename(p.owned, s.item.spool_file)
            placed.append(s.item.spool_file)
        _fsync_dir(spool.dir)
        kept = 0
        idxs: list[int] = []  # (kept with each row: see OutsideAgent._record_lost_intake)
        for p, s in zip(batch, sealed, strict=True):
            idx = None
            if p.record is not None:
                try:
                    idx = p.record(s.item, s.sha256.hex(), s.media_type)
                except AuditUnavailable as exc:
                    refused = exc
                    break
            idxs.append(-1 if idx is None else idx)
            kept += 1
        for path in placed[kept:]:
            path.unlink(missing_ok=True)
        del placed[kept:]
        batch, sealed = batch[:kept], sealed[:kept]
        if batch:
            spool.add_many(
                [
                    (replace(s.item, audit_idx=idx), s.sha256, p.source_path, p.source_key)
                    for p, s, idx in zip(batch, sealed, idxs, strict=True)
                ],
                subject=batch[0].subject,
                spread_us=int(channel.repeat.spread * 1e6),
                submission=submission,
            )
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        raise
    for p, s in zip(batch, sealed, strict=True):
        _log.info(
            "taken",
            channel=s.item.channel,
            name=p.name,
            path=p.relpath,
            size=s.item.size,
            seq=s.item.seq,
            object_id=s.item.object_id.hex(),
            sha256=s.sha256.hex(),
            subject=p.subject,
        )
    return kept, refused


@dataclass(frozen=True)
class _Prepared:
    """A clerk's file copied, checked and ready to be spooled."""

    ready: Ready
    pending: Pending
    size: int
    recorded: list[int]  # its intake records' indexes (filled in when spooled)


@dataclass
class _Rate:
    per_minute: int
    tokens: float
    last: float

    def take(self, now: float) -> bool:
        if self.per_minute <= 0:
            return True
        self.tokens = min(
            float(self.per_minute), self.tokens + (now - self.last) * self.per_minute / 60
        )
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class _Refusal(NamedTuple):
    name: str
    code: str
    message: str
    report: Mapping[str, Any] | None
    sha256: str | None


class _Moved(enum.Enum):
    KEPT = "kept"  # in the quarantine
    NOT_KEPT = "not kept"  # no quarantine folder for the channel
    LED_OUT = "led out"  # a folder or the name is a symlink now: nothing moved (recorded)
    REPLACED = "replaced"  # saved again since it was checked: the new version is left
    FAILED = "failed"  # could not be moved (a full disk...): left in the drop folder


@dataclass(eq=False)
class _Lane:
    """One files channel's intake: its own watcher and thread, so that a drop, sent or
    quarantine folder that stops answering (a share whose server went away) holds up this
    channel alone."""

    channel: OutsideChannel
    watcher: DropWatcher
    rate: _Rate
    workdir: Path  # cleaned outputs of the content pipeline (fixed names: one per lane)
    deferred: deque[Ready] = field(default_factory=deque)
    waiting_for_room: set[Path] = field(default_factory=set)  # (logged once each)
    # refused files that could not be moved to the quarantine (its disk full, say), by
    # (device, inode): the version refused (_unmoved_key) and why; tried again at each turn,
    # not checked or recorded refused again while it is that version
    unmoved: dict[tuple[int, int], tuple[str, _Refusal]] = field(default_factory=dict)
    taken: int = 0
    quarantined: int = 0
    thread: threading.Thread | None = None
    # While a step is under way: when it last showed progress (monotonic); None between
    # steps and while the content pipeline (which has its own time limit) has the file.
    progress: float | None = None
    allowance: float = 0.0  # seconds of the step that are waiting for files, not a stall

    def beat(self) -> None:
        if self.progress is not None:
            self.progress = time.monotonic()


class FolderIntake:
    """Takes completed files from every ``files`` channel's drop folder, a thread each."""

    def __init__(
        self,
        channels: tuple[OutsideChannel, ...],
        spool: Spool,
        signing_key: SecretKey,
        *,
        checks: tuple[ContentCheck, ...] = (check_type,),
        rescan_interval: float = 30.0,
        audit: AgentAudit | None = None,
        pipeline: ContentPipeline | None = None,
        admin_key: PublicKey | None = None,
        reserve: int | None = None,
    ) -> None:
        """``reserve``: room to keep free on the state disk (outside.spool_reserve)."""
        self._channels = {c.name: c for c in channels if c.kind == "files" and c.drop}
        self._audit = audit
        self._pipeline = pipeline
        self._spool = spool
        self._key = signing_key
        self._checks = checks
        self._quarantine = {
            c.name: Quarantine(c.quarantine) for c in self._channels.values() if c.quarantine
        }
        self._incoming = spool.dir.parent / "intake"
        self._incoming.mkdir(parents=True, exist_ok=True)
        for stale in self._incoming.glob("*.part"):
            stale.unlink()
        self._reserve = room_reserve(reserve, self._incoming)
        self._room_lock = threading.Lock()
        self._copying = 0  # bytes of the files being copied in, by every lane
        # files waiting for room (every lane): since when, and the room each needs; a file
        # is taken only with room for those that were waiting before it as well
        self._waiters: dict[Path, tuple[float, int]] = {}
        content = self._incoming / "content"  # cleaned outputs (same file system)
        shutil.rmtree(content, ignore_errors=True)
        self._admin_key = admin_key
        self._releases = (
            None if audit is None else ReleaseAuditor(audit, spool.dir.parent, admin_key)
        )
        # per quarantine folder: releases.jsonl's (size, mtime) and its verified overrides
        self._overrides: dict[Path, tuple[tuple[int, int], dict[str, frozenset[str]]]] = {}
        specs = {
            c.name: WatchSpec(
                c.name,
                c.drop,
                recursive=c.subfolders,
                settle_seconds=c.settle_seconds,
                rescan_seconds=c.rescan_seconds,
            )
            for c in self._channels.values()
            if c.drop is not None  # (all: filtered above)
        }
        check_specs(list(specs.values()))
        now = time.monotonic()
        self._lanes = {
            c.name: _Lane(
                c,
                DropWatcher([specs[c.name]], rescan_interval=rescan_interval),
                _Rate(c.max_items_per_minute, float(c.max_items_per_minute), now),
                content / str(i),
            )
            for i, c in enumerate(self._channels.values())
        }
        self._stop = threading.Event()
        self.paused = False

    @property
    def taken(self) -> int:
        return sum(lane.taken for lane in self._lanes.values())

    @property
    def quarantined(self) -> int:
        return sum(lane.quarantined for lane in self._lanes.values())

    def start(self, deliver: Callable[[list[SpoolItem]], None], poll_interval: float) -> None:
        """Start one thread per channel: it creates and watches the drop folder, then takes
        what becomes ready and hands the new items to ``deliver`` (from that thread)."""
        for lane in self._lanes.values():
            lane.thread = threading.Thread(
                target=self._run_lane,
                args=(lane, deliver, poll_interval),
                name=f"intake:{lane.channel.name}",
                daemon=True,
            )
            lane.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every thread; one still held up by its folder after ``timeout`` is left
        behind (a daemon thread: it ends with the process)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for lane in self._lanes.values():
            if lane.thread is not None:
                lane.thread.join(max(0.0, deadline - time.monotonic()))
                if lane.thread.is_alive():
                    _log.warning("intake_thread_not_stopped", channel=lane.channel.name)
                    continue
            lane.watcher.stop()

    def pause(self, paused: bool) -> None:
        """Backpressure: while paused, files wait in their drop folders."""
        if paused == self.paused:
            return
        self.paused = paused
        for name, lane in self._lanes.items():
            (lane.watcher.pause if paused else lane.watcher.resume)(name)
        _log.warning("intake_paused" if paused else "intake_resumed")

    def stalled(self, at_least: float = 0.0) -> dict[str, float]:
        """Channels whose intake has shown no progress for at least ``at_least`` seconds in
        the step under way (a folder that stopped answering), with those seconds."""
        now = time.monotonic()
        out = {}
        for name, lane in self._lanes.items():
            since = lane.progress
            if since is not None and now - since - lane.allowance >= at_least:
                out[name] = round(now - since - lane.allowance, 1)
        return out

    def _run_lane(
        self, lane: _Lane, deliver: Callable[[list[SpoolItem]], None], poll_interval: float
    ) -> None:
        ch = lane.channel
        assert ch.drop is not None
        watching = False
        while not self._stop.is_set():
            try:
                if not watching:  # (the folder may not answer: this thread waits, no other)
                    lane.progress = time.monotonic()
                    try:
                        ch.drop.mkdir(parents=True, exist_ok=True)
                    except OSError as exc:  # the watcher reports it and retries the folder
                        _log.error("drop_folder_not_created", channel=ch.name, error=str(exc))
                    if ch.sent is not None and (removed := remove_stale_temps(ch.sent, below=True)):
                        _log.info("stale_temp_files_removed", channel=ch.name, count=removed)
                    if removed := _remove_release_temps(ch):
                        _log.info(
                            "stale_temp_files_removed",
                            channel=ch.name,
                            folder="drop",
                            count=removed,
                        )
                    if forgotten := self.forget_finished_sources(ch.name):
                        _log.info("finished_sources_forgotten", channel=ch.name, count=forgotten)
                    lane.watcher.start()
                    watching = True
                    lane.progress = None
                items = self.step(ch.name, poll_interval)
                if items:
                    deliver(items)
            except Exception:  # noqa: BLE001  # an intake thread must never die silently
                lane.progress = None
                _log.exception("intake_error", channel=ch.name)
                self._stop.wait(max(poll_interval, 1.0))

    def step(self, channel: str, timeout: float) -> list[SpoolItem]:
        """Wait up to ``timeout`` for the channel's files; take what is ready; return the
        new items."""
        lane = self._lanes[channel]
        ch = lane.channel
        lane.progress, lane.allowance = time.monotonic(), timeout
        waiting: set[Path] = set()
        try:
            ready, refused = lane.watcher.poll(timeout)
            lane.allowance = 0.0
            lane.beat()
            q = self._quarantine.get(ch.name)
            if self._releases is not None and q is not None:
                self._releases.scan({q.folder: ch.name})
            for bad in refused:
                self._refused(bad)
            taken: list[SpoolItem] = []
            now = time.monotonic()
            candidates = list(lane.deferred) + ready
            lane.deferred.clear()
            waiting = lane.waiting_for_room
            lane.waiting_for_room = set()
            blocked = self._audit is not None and self._audit.failed
            batch: list[_Prepared] = []  # small files, spooled together (one flush)

            def commit() -> None:
                if batch:
                    taken.extend(self._commit(lane, batch))
                    for x in batch:
                        lane.watcher.done(x.ready.path)
                    batch.clear()
                    lane.beat()

            for r in candidates:
                if self.paused or blocked:  # fail closed: nothing is taken unaudited
                    lane.deferred.append(r)
                    continue
                if lane.unmoved and self._retry_unmoved(ch, r):
                    lane.watcher.done(r.path)  # (still refused: found again at a rescan)
                    continue
                claimed = self._room_for(ch, r, logged=r.path in waiting)
                if claimed is None:
                    lane.deferred.append(r)  # stays in the drop folder until there is room
                    lane.waiting_for_room.add(r.path)
                    continue
                try:
                    if not claimed:  # (quarantined: it could never be taken)
                        ready_file = None
                    elif not lane.rate.take(now):
                        lane.deferred.append(r)  # stays in the drop folder until its turn
                        continue
                    else:
                        ready_file = self._prepare(ch, r)
                except OSError as exc:
                    _log.error(
                        "intake_failed", channel=ch.name, name=r.relpath.name, error=str(exc)
                    )
                    ready_file = None
                finally:
                    with self._room_lock:
                        self._copying -= claimed or 0
                lane.beat()
                if ready_file is None:
                    lane.watcher.done(r.path)
                    continue
                if ready_file.size > BATCH_FILE_MAX:
                    commit()  # (in the order taken: sequence numbers follow it)
                batch.append(ready_file)
                if (
                    ready_file.size > BATCH_FILE_MAX
                    or len(batch) >= INTAKE_BATCH
                    or sum(x.size for x in batch) >= INTAKE_BATCH_BYTES
                ):
                    commit()
            commit()
            return taken
        finally:
            lane.progress, lane.allowance = None, 0.0
            still = lane.waiting_for_room | {d.path for d in lane.deferred}
            with self._room_lock:  # (gone from the drop folder while it waited)
                for path in waiting - still:
                    self._waiters.pop(path, None)

    # ------------------------------------------------------------------ take
    def _room_for(self, ch: OutsideChannel, r: Ready, *, logged: bool) -> int | None:
        """Room for a ready file's copy in the gateway's storage: the bytes claimed for it
        (to give back once it is copied); None if it must wait in its drop folder until
        there is room; 0 if not to be taken: it never could be kept (it is quarantined), or
        it is gone or was written again while it waited (reported again once stable).

        A file must leave ``reserve`` bytes free on the state disk, with every copy under
        way and every file waiting since before it: the spool's database, the API's
        messages and the audit log need that room, and a file bigger than the room left
        would fill the disk every time it was tried."""
        # (one over the channel's own limit is refused by _prepare, unread; a content check
        # writes its cleaned output next to the copy)
        copies = 1 if ch.content is None else 2
        size = 0 if r.size > ch.max_size else r.size * copies
        room = disk_room(self._incoming)
        with self._room_lock:
            mine = self._waiters.get(r.path)
            ahead = sum(  # (first come, first served: a big file is not passed for ever)
                need
                for path, (since, need) in self._waiters.items()
                if path != r.path and (mine is None or since < mine[0])
            )
            if size == 0 or room is None or room[0] - self._copying - ahead - size >= self._reserve:
                self._waiters.pop(r.path, None)
                claimed = size + 1  # (true, even for an empty file)
                self._copying += claimed
                return claimed
        free, whole = room
        st = _lstat_or_none(r.path)
        if st is None or (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != (
            r.dev,
            r.ino,
            r.size,
            r.mtime_ns,
        ):  # (gone, or written again while it waited: reported again once stable)
            with self._room_lock:
                self._waiters.pop(r.path, None)
            return 0
        if size + self._reserve > whole:
            with self._room_lock:
                self._waiters.pop(r.path, None)
            self._reject(
                ch,
                r.path,
                r.relpath.name,
                "TOO_LARGE",
                f"the file is {r.size} bytes, more than the gateway's disk can ever take "
                f"({(whole - self._reserve) // copies} bytes at most)",
                found=(r.dev, r.ino),
                key=_unmoved_key(st),
            )
            return 0
        with self._room_lock:
            self._waiters.setdefault(r.path, (time.monotonic(), size))
        if not logged:
            _log.warning(
                "intake_waiting_for_room",
                channel=ch.name,
                name=r.relpath.name,
                size=r.size,
                free=free,
                copying=self._copying,
                reserve=self._reserve,
            )
        return None

    def _prepare(self, ch: OutsideChannel, r: Ready) -> _Prepared | None:
        """Copy a ready file into the gateway's storage and check it: what is to be spooled
        (None: taken care of otherwise: quarantined, gone, changed, or already spooled)."""
        lane = self._lanes[ch.name]
        path = r.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != (r.dev, r.ino, r.size, r.mtime_ns):
            _log.info("file_changed_since_ready", channel=ch.name, name=r.relpath.name)
            return None  # (written again while it waited its turn: reported once stable)
        key = _source_key(st)
        if self._spool.known_source(key) is not None:  # crashed after commit, before the move
            if self._finish_original(ch, r.relpath, path):
                self._forget_sources([key])
            return None
        name = r.relpath.name
        found = (st.st_dev, st.st_ino)  # (what a refusal may move: see _reject)
        if (problem := _folder_problem(r.relpath)) is not None:
            self._reject(
                ch, path, name, "FILENAME_POLICY", problem, found=found, key=_unmoved_key(st)
            )
            return None
        if st.st_size > ch.max_size:
            self._reject(
                ch,
                path,
                name,
                "TOO_LARGE",
                f"the file is {st.st_size} bytes; channel {ch.name} takes at most {ch.max_size}",
                found=found,
                key=_unmoved_key(st),
            )
            return None
        tmp = self._incoming / f"{os.urandom(8).hex()}.part"
        try:
            src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            _log.warning("refused_unopenable", channel=ch.name, name=name, error=exc.strerror)
            return None
        try:
            fst = os.fstat(src)
            if not stat.S_ISREG(fst.st_mode) or _source_key(fst) != key:
                _log.info("file_changed_before_copy", channel=ch.name, name=name)
                return None
            if not _beneath(src, ch.drop):  # (a folder on the way swapped for a symlink)
                self._led_out(ch, name)
                return None  # (nothing read, nothing moved)
            size = 0
            digest = hashlib.sha256()
            try:
                with open(tmp, "xb") as out:
                    # (no further than one byte past its size: a file that grows while it
                    # is copied is not taken, and must not fill the disk meanwhile)
                    while size <= st.st_size and (
                        chunk := os.read(src, min(COPY_CHUNK, st.st_size + 1 - size))
                    ):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                        lane.beat()
            except BaseException:  # (a full disk: no partial copy is left to fill it more)
                tmp.unlink(missing_ok=True)
                raise
            after = os.fstat(src)
            if (
                size != st.st_size
                or _source_key(after) != key
                or after.st_ctime_ns != fst.st_ctime_ns  # (rewritten, its mtime set back)
            ):
                _log.info("file_changed_during_copy", channel=ch.name, name=name)
                tmp.unlink()
                return None  # reported again once it is stable
        finally:
            os.close(src)
        sha256 = digest.hexdigest()  # (kept with a refusal: what a release may set aside)
        overrides = self._overrides_for(ch, sha256)
        overridden: list[str] = []  # refusals set aside by a verified release (audited)
        try:
            if ch.content is None:
                for check in self._checks:
                    try:
                        check(ch, tmp, name)
                    except PolicyRejection as exc:
                        if exc.reason_code not in overrides:
                            raise
                        overridden.append(exc.reason_code)
            with self._excused(lane):  # (the pipeline's own time limit applies)
                content, verdict = check_content(
                    self._pipeline,
                    self._audit,
                    ch,
                    tmp,
                    name,
                    workdir=lane.workdir,
                    overrides=overrides,
                )
        except PolicyRejection as exc:  # (ContentRefused too: with the pipeline's report)
            tmp.unlink(missing_ok=True)
            self._reject(
                ch,
                path,
                name,
                exc.reason_code,
                _plain(exc),
                report=exc.report if isinstance(exc, ContentRefused) else None,
                found=found,
                key=_unmoved_key(fst),
                sha256=sha256,
            )
            return None
        except Exception as exc:  # noqa: BLE001  # fail closed: a filter error rejects the file
            tmp.unlink(missing_ok=True)
            _log.exception("filter_error", channel=ch.name, name=name)
            self._reject(
                ch,
                path,
                name,
                "FILTER_ERROR",
                f"a content check failed: {exc}",
                found=found,
                key=_unmoved_key(fst),
                sha256=sha256,
            )
            return None
        if content != tmp:  # the cleaned output, under a name of its own (the workdir's
            tmp.unlink(missing_ok=True)  # are reused for the next file)
            owned = self._incoming / f"{os.urandom(8).hex()}.part"
            os.rename(content, owned)
            content = owned
        delivered_name = verdict.name if verdict is not None else name
        if verdict is not None:
            overridden += applied_override(verdict)
        accepted: dict[str, object] = {"source_name": name} if delivered_name != name else {}
        if overridden:
            accepted["override"] = overridden
        rel = "" if str(r.relpath.parent) == "." else str(r.relpath.parent)
        subject = self._subject(ch)
        recorded: list[int] = []

        def record(item: SpoolItem, sha256: str, media_type: str) -> int | None:
            if self._audit is None:
                return None
            if verdict is not None:
                record_verdict(self._audit, ch, name, verdict, item)
            obj = AuditObject(
                kind="file",
                item=item.object_id.hex(),
                channel=ch.name,
                name=delivered_name,
                size=item.size,
                sha256=sha256,
                seq=item.seq,
                media_type=media_type,
                path=rel or None,
            )
            recorded.append(
                self._audit.record(
                    "intake.accepted",
                    subject=subject,
                    obj=obj,
                    corr=item.object_id.hex(),
                    detail=accepted or None,
                )
            )
            return recorded[-1]

        pending = Pending(
            content,
            delivered_name,
            f"folder:{ch.name}",
            relpath=rel,
            mtime_us=st.st_mtime_ns // 1000,
            source_path=str(path),
            source_key=key,
            report=summary(ch, verdict),
            media_type=media_type_of(verdict),
            record=record,
        )
        return _Prepared(r, pending, os.stat(content).st_size, recorded)

    def _commit(self, lane: _Lane, batch: list[_Prepared]) -> list[SpoolItem]:
        """Spool prepared files (one flush, one transaction for a batch of several), then
        move their originals once their intake records are on disk. Files not spooled
        wait in the drop folder for a later turn."""
        ch = lane.channel
        refused: AuditUnavailable | None = None
        try:
            if len(batch) == 1:
                items = [spool_pending(self._spool, self._key, ch, batch[0].pending)]
            else:
                pending = [x.pending for x in batch]
                items, refused = spool_file_items(self._spool, self._key, ch, pending)
        except (AuditUnavailable, OSError) as exc:
            items = []
            if isinstance(exc, AuditUnavailable):
                refused = exc
            else:
                for x in batch:
                    _log.error(
                        "intake_failed", channel=ch.name, name=x.ready.relpath.name, error=str(exc)
                    )
        except BaseException:
            for x in batch:
                x.pending.owned.unlink(missing_ok=True)
            raise
        for x in batch[len(items) :]:  # not spooled (their copies are taken again later)
            x.pending.owned.unlink(missing_ok=True)
        if refused is not None:
            _log.error("intake_halted_audit_unavailable", channel=ch.name, error=str(refused))
        done = batch[: len(items)]
        lane.taken += len(items)
        items = [  # each is sent once its intake records are durable
            replace(item, audit_idx=x.recorded[-1]) if x.recorded else item
            for item, x in zip(items, done, strict=True)
        ]
        last = max((x.recorded[-1] for x in done if x.recorded), default=-1)
        if self._audit is not None and last >= 0:
            try:  # the clerk's original leaves the drop folder only once the record is on disk
                self._audit.log.wait_durable(last)
            except AuditUnavailable as exc:  # spooled; the original is moved on a later turn
                _log.error("intake_record_not_durable", channel=ch.name, error=str(exc))
                return items
        self._forget_sources(
            [
                x.pending.source_key
                for x in done
                if self._finish_original(ch, x.ready.relpath, x.ready.path, x.pending.source_key)
            ]
        )
        return items

    @staticmethod
    @contextlib.contextmanager
    def _excused(lane: _Lane) -> Iterator[None]:
        """No stall is counted while this runs (work with a time limit of its own)."""
        if lane.progress is None:
            yield
            return
        lane.progress = None
        try:
            yield
        finally:
            lane.progress = time.monotonic()

    def _subject(self, ch: OutsideChannel) -> Subject:
        return Subject.clerk_folder(str(ch.drop), ch.name)

    def _overrides_for(self, ch: OutsideChannel, sha256: str) -> frozenset[str]:
        """The reason codes a verified ``ferry quarantine release --override`` accepted for
        this exact file (by SHA-256) on this channel; never a NOT_OVERRIDABLE code."""
        q = self._quarantine.get(ch.name)
        if q is None or self._admin_key is None:
            return frozenset()
        try:
            st = (q.folder / RELEASES).stat()
        except FileNotFoundError:
            return frozenset()
        stamp = (st.st_size, st.st_mtime_ns)
        cached = self._overrides.get(q.folder)
        if cached is None or cached[0] != stamp:
            cached = (stamp, overrides_by_sha(q.folder, self._admin_key))
            self._overrides[q.folder] = cached
        return cached[1].get(sha256, frozenset()) - NOT_OVERRIDABLE

    def _led_out(self, ch: OutsideChannel, name: str) -> None:
        _log.warning("refused_outside_drop_folder", channel=ch.name, name=name)
        self._record_rejection(
            ch, name, "NOT_REGULAR_FILE", "the path led out of the drop folder", None
        )

    def _reject(
        self,
        ch: OutsideChannel,
        path: Path,
        name: str,
        code: str,
        message: str,
        *,
        report: Mapping[str, Any] | None = None,
        found: tuple[int, int],
        key: str,
        sha256: str | None = None,
    ) -> None:
        """Refuse a clerk's file: moved to the channel's quarantine with its reasons
        (:meth:`_move_refused`; ``found``: the device and inode checked, ``key``: the version
        checked, :func:`_unmoved_key`). A file that cannot be moved there (a full disk) stays
        in the drop folder and is remembered, that version: at each later turn only its move
        is tried again; it is not checked, logged or recorded refused again
        (:meth:`_retry_unmoved`)."""
        refusal = _Refusal(name, code, message, report, sha256)
        moved, kept = self._move_refused(ch, path, refusal, found)
        if moved is _Moved.LED_OUT:
            return
        if moved is _Moved.REPLACED:
            _log.info("refused_file_replaced", channel=ch.name, name=name, code=code)
            self._record_rejection(ch, name, code, message, None)
            return  # (the new version is taken in its turn)
        lane = self._lanes[ch.name]
        if moved is _Moved.FAILED:
            lane.unmoved.pop(found, None)
            while len(lane.unmoved) >= MAX_UNMOVED:  # (the oldest is checked again)
                del lane.unmoved[next(iter(lane.unmoved))]
            lane.unmoved[found] = (key, refusal)
        lane.quarantined += 1
        _log.warning("quarantined", channel=ch.name, name=name, reason_code=code, message=message)
        self._record_rejection(ch, name, code, message, kept)

    def _move_refused(
        self,
        ch: OutsideChannel,
        path: Path,
        refusal: _Refusal,
        found: tuple[int, int],
        *,
        quiet: bool = False,
    ) -> tuple[_Moved, str | None]:
        """Move a refused file to the channel's quarantine with its reasons, and say what
        became of it (with where it is kept). Its folder is reached one level at a time
        from the drop folder without following a symlink (:func:`ferry.place.pinned_folder`),
        and only the file that was checked (``found``: device and inode) is moved. A folder
        (or the drop folder) swapped for a symlink while the file was checked cannot have a
        file from elsewhere moved: nothing is moved, and the refusal is recorded as leading
        out of the drop folder. A file saved again meanwhile is left for its own turn.
        ``quiet``: a failed move is not logged (a move tried again)."""
        q = self._quarantine.get(ch.name)
        if q is None or ch.drop is None:
            return _Moved.NOT_KEPT, None
        try:
            rel = PurePosixPath(path.relative_to(ch.drop))
        except ValueError:  # (not under the drop folder)
            self._led_out(ch, refusal.name)
            return _Moved.LED_OUT, None
        try:
            with pinned_folder(ch.drop, rel.parent.parts, create=False) as (_, src_dir):
                placed = q.put_file(
                    Path(rel.name),
                    channel=ch.name,
                    original_name=refusal.name,
                    reason_code=refusal.code,
                    message=refusal.message,
                    details={"report": dict(refusal.report)} if refusal.report else None,
                    sha256=refusal.sha256,
                    src_dir=src_dir,
                    expect=found,
                    quiet=quiet,
                )
        except UnsafePathError:  # (a folder on the way is a symlink now)
            self._led_out(ch, refusal.name)
            return _Moved.LED_OUT, None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # (the file's own name is a symlink now)
                self._led_out(ch, refusal.name)
                return _Moved.LED_OUT, None
            if exc.errno == errno.ESTALE:  # (saved again since it was checked)
                return _Moved.REPLACED, None
            if not quiet:  # (put_file logged why)
                _log.warning(
                    "refused_file_left_in_drop_folder",
                    channel=ch.name,
                    name=refusal.name,
                    note="its move to the quarantine is tried again at each turn",
                )
            return _Moved.FAILED, None
        return _Moved.KEPT, str(placed.path)

    def _retry_unmoved(self, ch: OutsideChannel, r: Ready) -> bool:
        """A file refused before whose move to the quarantine failed: try the move again
        (True: taken care of, nothing else is to be done with it this turn). Recorded
        once it is kept (``quarantine.added``, ``late``); a file changed since (its size,
        dates or change time differ: written again, even with its date set back) is
        forgotten here and checked afresh (False)."""
        lane = self._lanes[ch.name]
        entry = lane.unmoved.get((r.dev, r.ino))
        if entry is None:
            return False
        key, refusal = entry
        st = _lstat_or_none(r.path)
        if st is None or not stat.S_ISREG(st.st_mode) or _unmoved_key(st) != key:
            del lane.unmoved[(r.dev, r.ino)]
            return False  # (gone, or saved again: a new version, checked in its turn)
        moved, kept = self._move_refused(ch, r.path, refusal, (r.dev, r.ino), quiet=True)
        if moved is _Moved.FAILED:
            return True  # (still no room: tried again at the next turn)
        del lane.unmoved[(r.dev, r.ino)]
        if moved is _Moved.KEPT and kept is not None:
            _log.warning(
                "quarantined_late", channel=ch.name, name=refusal.name, reason_code=refusal.code
            )
            self._record_kept(ch, refusal.name, refusal.code, kept, late=True)
        return True

    def _record_rejection(
        self, ch: OutsideChannel, name: str, code: str, message: str, kept: str | None
    ) -> None:
        if self._audit is None:
            return
        subject = self._subject(ch)
        obj = AuditObject(kind="file", channel=ch.name, name=name)
        reason = f"{code}: {message}"[:1024]
        detail = {"reason_code": code} | ({"quarantine": kept} if kept else {})
        self._audit.try_record(
            "intake.rejected",
            subject=subject,
            result="rejected",
            reason=reason,
            obj=obj,
            detail=detail,
        )
        if kept:
            self._record_kept(ch, name, code, kept)

    def _record_kept(
        self, ch: OutsideChannel, name: str, code: str, kept: str, *, late: bool = False
    ) -> None:
        """``quarantine.added``; ``late``: the file was refused at an earlier turn (its
        ``intake.rejected`` record has no quarantine path) and could only be moved now."""
        if self._audit is None:
            return
        self._audit.try_record(
            "quarantine.added",
            subject=self._subject(ch),
            obj=AuditObject(kind="file", channel=ch.name, name=name, path=kept),
            detail={"reason_code": code} | ({"late": True} if late else {}),
        )

    def _refused(self, r: Refused) -> None:
        ch = self._channels.get(r.channel)
        if ch is None:
            return
        self._lanes[ch.name].quarantined += 1
        _log.warning("refused_entry", channel=ch.name, name=str(r.relpath), reason=r.reason)
        q = self._quarantine.get(ch.name)
        if q is not None:
            try:
                q.put_note(
                    channel=ch.name,
                    original_name=r.relpath.name,
                    reason_code="NOT_REGULAR_FILE",
                    message=r.reason,
                )
            except OSError as exc:
                _log.error("quarantine_failed", channel=ch.name, error=str(exc))
        self._record_rejection(ch, r.relpath.name, "NOT_REGULAR_FILE", r.reason, None)

    def _finish_original(
        self, ch: OutsideChannel, rel: PurePosixPath, path: Path, copied: str = ""
    ) -> bool:
        """The clerk's original, once its item is committed: deleted, or moved to the
        channel's ``sent`` folder under its own name or the first free numbered one
        (``report (2).pdf``, kept within the 255-byte name limit), never over a file.
        ``copied``: the source key of what was copied; a file at ``path`` that is no longer
        that one (saved again meanwhile) is left where it is, to be taken in its turn.

        True once the copied file is no longer at ``path`` (moved or deleted here; renamed,
        deleted or replaced by the clerk meanwhile): its source key may then be forgotten,
        so a file moved back from ``sent`` is a new drop. A key kept for a file that is gone
        could pass an unrelated file for it later (ext4 reuses a deleted file's inode at
        once, and ``cp -p`` keeps size and time), which would then go to ``sent`` unsent: a
        file renamed after its copy is sent again instead. False: the original is still
        there, not moved (no free name, a folder that does not answer): tried again later.

        Both folders are reached one level at a time without following a symlink
        (:func:`ferry.place.pinned_folder`): a subfolder of the drop or ``sent`` folder
        swapped for a symlink cannot make the gateway move or delete a file elsewhere, or
        put one where clerks may not write."""
        drop = path.parents[len(rel.parts) - 1]
        name = rel.name
        try:
            with pinned_folder(drop, rel.parent.parts, create=False) as (_, src):
                here = _source_key(os.lstat(name, dir_fd=src))
                copied = copied or here  # (a crash left it: whatever is there was copied)
                if here != copied:
                    _log.info("original_changed_after_copy", channel=ch.name, name=name)
                    return True
                if ch.after_send == "delete" or ch.sent is None:
                    os.unlink(name, dir_fd=src)
                    return True
                try:  # (only the last folder: a share not mounted has no parent to make)
                    ch.sent.mkdir(exist_ok=True)
                except OSError as exc:
                    _log.error("cannot_move_original", channel=ch.name, name=name, error=str(exc))
                    return False
                with pinned_folder(ch.sent, rel.parent.parts) as (_, dst):
                    for candidate in candidate_names(name):
                        placed = _place_original(src, name, dst, candidate, copied)
                        if placed is _Placed.MOVED:
                            return True
                        if placed is _Placed.LEFT:
                            _log.info("original_changed_while_moved", channel=ch.name, name=name)
                            return True
            _log.error(
                "cannot_move_original",
                channel=ch.name,
                name=name,
                error="every numbered name in the sent folder is taken",
            )
        except FileNotFoundError:
            _log.info("original_gone", channel=ch.name, name=name)
            return True
        except (OSError, UnsafePathError) as exc:
            _log.error("cannot_move_original", channel=ch.name, name=name, error=str(exc))
        return False

    def _forget_sources(self, keys: list[str]) -> None:
        try:
            self._spool.forget_sources(keys)
        except sqlite3.Error as exc:  # (bookkeeping only: the items are spooled and go out)
            _log.error("source_keys_not_forgotten", count=len(keys), error=str(exc))

    def forget_finished_sources(self, channel: str) -> int:
        """At a lane's start: forget the source keys of the channel's items whose original
        is no longer where it was dropped, or no longer that file (the agent stopped between
        moving an original and forgetting its key, or a power cut took that back); how
        many. An original still there, the same file, is one the agent stopped before
        moving: kept, it is moved at its turn, not sent again."""
        ch = self._lanes[channel].channel
        if ch.drop is None:
            return 0
        try:  # (a drop folder not there, or a share not mounted: nothing is decided)
            device = os.stat(ch.drop).st_dev
        except OSError:
            return 0
        under = f"{ch.drop}/"
        stale = []
        for source_path, key in self._spool.unforgotten_sources(channel):
            self._lanes[channel].beat()  # (each lstat may wait on a share)
            if not source_path.startswith(under) or key.split(":")[0] != str(device):
                continue  # (dropped elsewhere: another folder, another mount)
            try:
                if _source_key(os.lstat(source_path)) == key:
                    continue
            except (FileNotFoundError, NotADirectoryError):
                pass
            except OSError:
                continue  # (not answering, not readable: not known to be gone)
            stale.append(key)
        self._forget_sources(stale)
        return len(stale)


class _Placed(enum.Enum):
    TAKEN = "taken"  # the name in sent/ is taken: try the next
    MOVED = "moved"  # the original is in sent/ and gone from the drop folder
    LEFT = "left"  # the name in the drop folder was given to another file meanwhile: left


def _place_original(src: int, name: str, dst: int, target: str, copied: str = "") -> _Placed:
    """Move ``name`` in folder ``src`` to ``target`` in folder ``dst`` (descriptors), never
    over a file: a link then an unlink (:func:`ferry.place.link_new`); a link left by a
    crash between the two is recognised (same inode) and finished. Another file system:
    :func:`_move_across` (a copy left by a crash there is recognised by its content).
    The name is unlinked only while it still names the file linked, and that file is the
    one copied (``copied``, its source key): an editor's save may have put another file
    there since; that one is left, to be taken in its turn."""
    try:
        linked = link_new(name, target, src_dir_fd=src, dst_dir_fd=dst)
    except FileExistsError:
        here, there = os.lstat(name, dir_fd=src), os.lstat(target, dir_fd=dst)
        if os.path.samestat(here, there):
            linked = True
        elif here.st_dev != there.st_dev and _copied_across((src, name), (dst, target)):
            os.unlink(name, dir_fd=src)  # (copied across before a crash: finished now)
            return _Placed.MOVED
        else:
            return _Placed.TAKEN
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        try:
            moved = _move_across(
                Path(f"/proc/self/fd/{src}", name), Path(f"/proc/self/fd/{dst}", target), copied
            )
        except FileExistsError:
            return _Placed.TAKEN
        return _Placed.MOVED if moved else _Placed.LEFT
    if linked:
        there = os.lstat(target, dir_fd=dst)
        if copied and _source_key(there) != copied:  # (linked another file: taken back)
            os.unlink(target, dir_fd=dst)
            return _Placed.LEFT
        if not os.path.samestat(os.lstat(name, dir_fd=src), there):
            return _Placed.LEFT
        os.unlink(name, dir_fd=src)
    return _Placed.MOVED


def _copied_across(original: tuple[int, str], copy: tuple[int, str]) -> bool:
    """Is ``copy`` (folder descriptor, name; on another file system) a copy of
    ``original``, as :func:`_move_across` makes (same size, modification time and bytes)?"""
    (src, name), (dst, target) = original, copy
    here, there = os.lstat(name, dir_fd=src), os.lstat(target, dir_fd=dst)
    if not (stat.S_ISREG(here.st_mode) and stat.S_ISREG(there.st_mode)):
        return False
    if (here.st_size, here.st_mtime_ns) != (there.st_size, there.st_mtime_ns):
        return False
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
    a = os.open(name, flags, dir_fd=src)
    try:
        b = os.open(target, flags, dir_fd=dst)
        try:
            while True:
                x, y = os.read(a, COPY_CHUNK), os.read(b, COPY_CHUNK)
                if x != y:
                    return False
                if not x:
                    return True
        finally:
            os.close(b)
    finally:
        os.close(a)


def _move_across(path: Path, target: Path, copied: str = "") -> bool:
    """``rename`` from one file system to another: the original is copied under a hidden
    temp name, synced, given the name ``target`` (never over a file), and removed only
    then; its modification time and permissions are kept. False if the original changed
    during the copy (written to, or another file renamed over its name): then it is not
    removed, and a copy of a file written to meanwhile is removed again. ``copied``: the
    source key of the file meant; another one found under the name is left, not copied."""
    tmp = target.with_name(temp_name())  # (fixed length: any name fits)
    src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if copied and _source_key(st) != copied:
            return False  # (another file saved under the name since it was copied)
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            try:
                with open(src, "rb", closefd=False) as fin, open(dst, "wb", closefd=False) as fo:
                    shutil.copyfileobj(fin, fo, COPY_CHUNK)
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
                os.fchmod(dst, st.st_mode & 0o777)  # (readable by whom it was; no set-id bits)
                os.fsync(dst)
            finally:
                os.close(dst)
            written = os.fstat(src)
            if (written.st_size, written.st_mtime_ns, written.st_ctime_ns) != (
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
            ):
                return False  # (written to during the copy: the copy is mixed; dropped below)
            link_new(tmp, target)  # (renamed where the file system has no hard links)
        finally:
            drop_temp(tmp)  # linked, or a copy cut short (a full disk): nothing left behind
        sync_names(target.parent, [target.name])
        try:
            now = os.lstat(path)
        except FileNotFoundError:
            return True  # (renamed away by the clerk: the copy is in sent/, as meant)
        if not os.path.samestat(now, st):
            return False  # (another file saved under its name meanwhile: left for its turn)
        os.unlink(path)
        return True
    finally:
        os.close(src)


def _remove_release_temps(ch: OutsideChannel) -> int:
    """Remove the temp files a release copy cut short left in the channel's drop folder.
    Only ``ferry quarantine release`` writes there (across file systems, a copy under a temp
    name), holding the quarantine folder's lock: taken here without waiting, so a release
    under way keeps its temp (it is removed at the next start)."""
    if ch.drop is None or ch.quarantine is None:
        return 0
    try:
        with locked(ch.quarantine, wait=False):
            return remove_stale_temps(ch.drop)
    except OSError:  # (a release holds it right now, or no quarantine folder yet)
        return 0


class ContentRefused(PolicyRejection):
    """The content pipeline refused a file; ``report`` is its per-object report."""

    def __init__(self, verdict: Verdict) -> None:
        assert verdict.reason is not None
        super().__init__(verdict.reason, verdict.message or verdict.reason)
        self.report: Mapping[str, Any] = verdict.report


def check_content(
    pipeline: ContentPipeline | None,
    audit: AgentAudit | None,
    ch: OutsideChannel,
    src: Path,
    name: str,
    *,
    workdir: Path,
    overrides: frozenset[str] = frozenset(),
) -> tuple[Path, Verdict | None]:
    """Run a gateway-owned copy through the channel's content policy (always, fail closed).

    Returns the file to spool (``src`` or the cleaned output in ``workdir``) and the verdict
    (None for a channel without a policy). A refusal is recorded (``verdict``) and raised as
    :class:`ContentRefused`; any other failure raises, and the caller refuses the file.
    ``overrides``: reason codes a verified release accepted for this very file; a refusal
    with one of them is checked again with that one stage set aside
    (:meth:`ContentPipeline.process_overridden`), and the report says so (``override``).
    """
    if ch.content is None:
        return src, None
    if pipeline is None:
        raise RuntimeError("the content pipeline is not running")
    verdict = pipeline.process(ch.content, src, name, workdir)
    if verdict.kind == "reject" and verdict.reason in overrides:
        verdict = pipeline.process_overridden(ch.content, src, name, workdir, verdict)
    if verdict.kind == "reject":
        record_verdict(audit, ch, name, verdict, None)
        raise ContentRefused(verdict)
    if verdict.kind == "deliver_cleaned":
        if verdict.output is None:
            raise RuntimeError("a cleaned verdict without its output")
        return verdict.output, verdict
    return src, verdict


def record_verdict(
    audit: AgentAudit | None,
    ch: OutsideChannel,
    name: str,
    verdict: Verdict,
    item: SpoolItem | None,
) -> None:
    """The content pipeline's verdict in the audit log (with the item, once it has one)."""
    if audit is None:
        return
    report = verdict.report
    actions = [a.to_json() for a in verdict.actions[:MAX_AUDITED_ACTIONS]]
    detail: dict[str, object] = {
        "verdict": verdict.kind,
        "detected_type": verdict.type_name or "unknown",
        "delivered_name": verdict.name,
        "actions": actions,
    }
    if len(verdict.actions) > MAX_AUDITED_ACTIONS:
        detail["actions_total"] = len(verdict.actions)
    if isinstance(verdict.report.get("override"), Mapping):
        detail["override"] = dict(verdict.report["override"])
    sha_in = report.get("sha256_in")
    obj = AuditObject(
        kind="file",
        item=None if item is None else item.object_id.hex(),
        channel=ch.name,
        name=name,
        size=report.get("size_in") if isinstance(report.get("size_in"), int) else None,
        sha256=sha_in if isinstance(sha_in, str) and len(sha_in) == 64 else None,
        seq=None if item is None else item.seq,
    )
    rejected = verdict.kind == "reject"
    audit.record(
        "verdict",
        subject=CONTENT_SUBJECT,
        result="rejected" if rejected else "success",
        reason=f"{verdict.reason}: {verdict.message}"[:1024] if rejected else None,
        obj=obj,
        detail=detail,
        corr=None if item is None else item.object_id.hex(),
    )


def summary(ch: OutsideChannel, verdict: Verdict | None) -> str:
    """What travels with a file for the inside re-check: its type, the verdict, the channel's
    feature switches and what was removed (compact JSON, bounded)."""
    if verdict is None or ch.content is None:
        return ""
    out: dict[str, Any] = {
        "v": 1,
        "type": verdict.type_name,
        "verdict": verdict.kind,
        "features": {f: ch.content.feature(f) for f in sorted(FEATURES)},
        "sha256_in": verdict.report.get("sha256_in"),
        "actions": [a.to_json() for a in verdict.actions[:MAX_AUDITED_ACTIONS]],
    }
    if applied_override(verdict):
        out["override"] = applied_override(verdict)[0]
    text = json.dumps(out, separators=(",", ":"), sort_keys=True, ensure_ascii=True)
    if len(text) > MAX_REPORT_BYTES:
        out["actions"] = []
        out["actions_total"] = len(verdict.actions)
        text = json.dumps(out, separators=(",", ":"), sort_keys=True, ensure_ascii=True)
    return text


def applied_override(verdict: Verdict) -> list[str]:
    """The reason code a release's override set aside for this (delivered) file, if any."""
    note = verdict.report.get("override")
    if verdict.kind == "reject" or not isinstance(note, Mapping) or not note.get("applied"):
        return []
    return [str(note.get("code"))]


def media_type_of(verdict: Verdict | None) -> str | None:
    if verdict is None or verdict.type_name is None:
        return None
    return mimetypes.guess_type(f"x.{verdict.type_name}")[0]


def _plain(exc: PolicyRejection) -> str:
    text = str(exc)
    prefix = f"{exc.reason_code}: "
    return text[len(prefix) :] if text.startswith(prefix) else text

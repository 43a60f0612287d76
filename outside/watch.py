"""Drop-folder watcher: reports completed files in clerks' drop folders and refuses the rest.

watchdog (inotify) events are only *hints*. Every decision is taken on an
``lstat`` made by the thread that calls :meth:`DropWatcher.poll`; the watcher
never opens an entry (a FIFO would block, a symlink would be followed).

A regular file is reported :class:`Ready` once:

* a close-after-write (``FileClosedEvent``) or a move into place
  (``FileMovedEvent`` with a destination) was seen and the file is still
  unchanged ``DEBOUNCE_SECONDS`` later; or
* it has been unchanged for the channel's ``settle_seconds`` (writers that keep
  the file open, network shares, missed events).

"Unchanged" means same device, inode, size, mtime and ctime. After a report a
file is not reported again until :meth:`DropWatcher.done` is called for it or
it changes. Symlinks, FIFOs, devices, sockets and folders nested deeper than
``MAX_DEPTH`` are reported once as :class:`Refused`. A full scan at start and
every ``rescan_interval`` seconds is the safety net for lost events (inotify
queue overflow) and for a drop folder that is deleted, moved away or replaced.

On a network file system (an SMB/CIFS or NFS share, FUSE, 9p...) inotify reports only what
this host writes there, not what the clerks' machines or the file server write, so the scan
is what finds their files: such a folder is rescanned every ``NETWORK_RESCAN_SECONDS``
unless its channel sets ``rescan_seconds`` (found from /proc/self/mountinfo when the folder
is attached, and logged).

Threads: watchdog calls the handler on its observer thread; the handler only
records hints in a bounded inbox. All other state belongs to the thread that
calls ``poll()``; ``done``, ``pause`` and ``resume`` post to the inbox and may
be called from any thread.
"""

from __future__ import annotations

import contextlib
import enum
import heapq
import itertools
import math
import os
import stat
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.inotify import InotifyObserver

from ferry import log
from ferry.errors import UsageError
from ferry.wire.records import MAX_PATH_BYTES

# Entries tracked at once (candidates, reported and refused files), and hints waiting in the
# inbox: ~100 bytes each, so a flood of files costs tens of MB at most. Past the cap the
# periodic rescan picks the rest up as intake frees entries with done().
MAX_TRACKED = 100_000
MAX_PENDING_HINTS = 100_000
# Folder levels entered below a recursive drop folder; deeper trees are a mistake or an attack.
MAX_DEPTH = 16
# After a close or moved-to event the file must still be unchanged this much later.
DEBOUNCE_SECONDS = 0.1
# How often a missing drop folder is looked for again.
FOLDER_RETRY_SECONDS = 1.0
# Least time between two rescans forced by a full inbox, so a burst cannot become a scan loop.
MIN_FORCED_RESCAN_GAP = 1.0
# How often a drop folder on a network file system is rescanned by default (inotify does not
# see other machines' writes there).
NETWORK_RESCAN_SECONDS = 2.0
# Past this, a network folder's files may wait long enough to surprise a clerk: logged.
SLOW_NETWORK_RESCAN = 10.0
# File system types where other machines write (as /proc/self/mountinfo names them; for FUSE,
# "fuse.<program>" or "fuse"). fuseblk is a local disk through FUSE (ntfs-3g): not listed.
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "9p", "virtiofs", "vboxsf", "ceph",
        "glusterfs", "gfs2", "ocfs2", "lustre", "beegfs", "gpfs", "afs", "coda", "davfs",
        "fuse",
    }
)  # fmt: skip
MOUNTINFO = "/proc/self/mountinfo"
# How long stop() waits for watchdog's threads.
STOP_TIMEOUT = 5.0

IGNORED_PREFIXES = (".", "~$")
IGNORED_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".swp", "~")

# Events we act on; the rest (opened, closed-without-write, folder modified) are never queued.
_EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
]
_ROOT = PurePosixPath(".")

_log = log.get("outside.watch")


def ignored(name: str) -> bool:
    """Temp and hidden names: such files are never reported, such folders never entered."""
    return name.startswith(IGNORED_PREFIXES) or name.lower().endswith(IGNORED_SUFFIXES)


def _unescape(field: str) -> str:
    """A mountinfo path field: space, tab, newline and backslash are octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def filesystem_type(path: str | Path, mountinfo: str | None = None) -> str:
    """The type of the file system ``path`` is on (``"ext4"``, ``"cifs"``, ``"fuse.sshfs"``),
    from the mount whose point is its longest leading path; ``""`` when unknown."""
    if mountinfo is None:
        try:
            with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
                mountinfo = f.read()
        except OSError:
            return ""
    target = os.path.realpath(path)
    best, found = -1, ""
    for line in mountinfo.splitlines():
        fields, sep, tail = line.partition(" - ")
        parts = fields.split(" ")
        if not sep or len(parts) < 5 or not tail:
            continue
        point = _unescape(parts[4])
        inside = point in ("/", target) or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best:  # a later mount on the same point hides the earlier
            best, found = len(point), tail.split(" ")[0]
    return found


def is_network_filesystem(fstype: str) -> bool:
    return fstype in NETWORK_FILESYSTEMS or fstype.partition(".")[0] in NETWORK_FILESYSTEMS


@dataclass(frozen=True)
class WatchSpec:
    channel: str
    folder: Path
    recursive: bool = False  # take files from subfolders (relpath kept)
    settle_seconds: float = 1.0
    # Full scans of this folder (None: the watcher's interval, or NETWORK_RESCAN_SECONDS on a
    # network file system).
    rescan_seconds: float | None = None
    # Subfolders (relative to ``folder``) never entered, e.g. a ``sent`` folder kept inside it.
    exclude: tuple[PurePosixPath, ...] = ()


@dataclass(frozen=True)
class Ready:
    """A completed regular file, ready to be taken."""

    channel: str
    path: Path
    relpath: PurePosixPath  # relative to the drop folder: "sub/report.pdf", "report.pdf" when flat
    size: int
    mtime_ns: int
    dev: int
    ino: int


@dataclass(frozen=True)
class Refused:
    """Something in a drop folder that will never be taken."""

    channel: str
    path: Path
    relpath: PurePosixPath
    reason: str  # short plain-language reason


_Sig = tuple[int, int, int, int, int]  # dev, ino, size, mtime_ns, ctime_ns


def _sig(st: os.stat_result) -> _Sig:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _refusal(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symbolic link (links are never followed)"
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "not a regular file"


_TOO_DEEP = f"folder nested deeper than {MAX_DEPTH} levels"
# A folder whose path below the drop folder is longer than a manifest carries: its files
# could not travel (the intake refuses them), and far below it paths pass the system's
# PATH_MAX, where nothing can be opened by name. Refused once, with a note for the clerk.
MAX_FOLDER_BYTES = MAX_PATH_BYTES
_TOO_LONG = f"folder path longer than {MAX_FOLDER_BYTES} bytes"


def _too_long(rel: PurePosixPath) -> bool:
    return len(os.fsencode(str(rel))) > MAX_FOLDER_BYTES


def _first_too_long(folder: PurePosixPath) -> PurePosixPath | None:
    """The outermost folder on the way to ``folder`` (itself included) whose path is too
    long (see MAX_FOLDER_BYTES), if any."""
    if not _too_long(folder):
        return None
    return next(
        top
        for n in range(1, len(folder.parts) + 1)
        if _too_long(top := PurePosixPath(*folder.parts[:n]))
    )


class _Hint(enum.IntEnum):
    LOOK = 0  # something happened to this file: lstat it
    FAST = 1  # closed after writing, or moved into place
    TREE = 2  # a folder appeared, moved or vanished: scan below it or forget what was there


class _State(enum.Enum):
    CANDIDATE = "candidate"
    REPORTED = "reported"
    REFUSED = "refused"


@dataclass(slots=True)
class _Entry:
    chan: int
    rel: PurePosixPath
    sig: _Sig
    state: _State
    since: float = 0.0  # when ``sig`` was first seen
    fast_at: float | None = None  # when a close / moved-to was seen for this ``sig``
    due: float = math.inf  # next check (inf: none, or parked while the channel is paused)


@dataclass(slots=True)
class _Channel:
    spec: WatchSpec
    root: str
    handler: FileSystemEventHandler
    watch: ObservedWatch | None = None
    root_id: tuple[int, int] | None = None
    retry_at: float = math.inf
    unavailable_logged: bool = False
    rescan_every: float = math.inf  # set when attached (depends on the file system)
    rescan_at: float = math.inf

    def relative(self, path: str) -> PurePosixPath | None:
        """The path relative to the drop folder, or None when it is not to be looked at."""
        if not path.startswith(self.root + "/"):
            return None
        rel = PurePosixPath(path[len(self.root) + 1 :])
        if not rel.parts or any(ignored(part) for part in rel.parts):
            return None
        if not self.spec.recursive and len(rel.parts) != 1:
            return None
        if self.excluded(rel):
            return None
        return rel

    def excluded(self, rel: PurePosixPath) -> bool:
        return any(x == rel or x in rel.parents for x in self.spec.exclude)


class _Handler(FileSystemEventHandler):
    """Forwards every event to the watcher (runs on watchdog's observer thread)."""

    def __init__(self, post: Callable[[FileSystemEvent], None]) -> None:
        self._post = post

    def dispatch(self, event: FileSystemEvent) -> None:
        self._post(event)


@dataclass
class _Inbox:
    """What the observer thread and callers hand to the polling thread (guarded by the cond)."""

    hints: dict[str, tuple[int, PurePosixPath, _Hint]] = field(default_factory=dict)
    lost: set[int] = field(default_factory=set)
    done: list[str] = field(default_factory=list)
    resumed: set[str] = field(default_factory=set)
    overflow: bool = False

    def __bool__(self) -> bool:
        return bool(self.hints or self.lost or self.done or self.resumed or self.overflow)


def _default_observer() -> BaseObserver:
    # Full events: a file moved in from outside the watch is a FileMovedEvent, not a creation.
    return InotifyObserver(generate_full_events=True)


def check_specs(specs: Sequence[WatchSpec]) -> list[str]:
    """Raise UsageError for repeated channel names or drop folders that overlap (one inside
    another: a file would belong to two channels); return the folders' absolute paths."""
    names = [s.channel for s in specs]
    if len(set(names)) != len(names):
        raise UsageError(f"duplicate channel names in {names}")
    roots = [os.path.abspath(s.folder) for s in specs]
    for a, ra in zip(specs, roots, strict=True):
        for b, rb in zip(specs, roots, strict=True):
            if a is not b and (ra == rb or rb.startswith(ra.rstrip("/") + "/")):
                raise UsageError(
                    f"drop folders of channels {a.channel!r} and {b.channel!r} overlap"
                )
    return roots


class DropWatcher:
    """Watches drop folders; ``poll()`` returns what became ready or was refused."""

    def __init__(
        self,
        specs: Sequence[WatchSpec],
        *,
        rescan_interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = MAX_TRACKED,
        folder_retry: float = FOLDER_RETRY_SECONDS,
        observer_factory: Callable[[], BaseObserver] = _default_observer,
    ) -> None:
        roots = check_specs(specs)
        if min(rescan_interval, max_tracked, folder_retry) <= 0:
            raise UsageError("rescan_interval, max_tracked and folder_retry must be positive")
        for spec in specs:
            if spec.rescan_seconds is not None and spec.rescan_seconds <= 0:
                raise UsageError(f"channel {spec.channel!r}: rescan_seconds must be positive")
        self._channels = [
            _Channel(spec, root, _Handler(partial(self._on_event, i)))
            for i, (spec, root) in enumerate(zip(specs, roots, strict=True))
        ]
        self._by_name = {s.channel: i for i, s in enumerate(specs)}
        self._rescan_interval = rescan_interval
        self._clock = clock
        self._max_tracked = max_tracked
        self._folder_retry = folder_retry
        self._observer_factory = observer_factory
        self._observer: BaseObserver | None = None

        self._cond = threading.Condition()
        self._inbox = _Inbox()
        self._paused: set[str] = set()
        self._stopped = False

        self._poll_lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        # While hints are handled: channel -> (folders scanned, paths seen, folders unreadable),
        # pruned once together afterwards (see _scan).
        self._deferred: dict[int, tuple[set[PurePosixPath], set[str], set[PurePosixPath]]] | None
        self._deferred = None
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._last_forced_rescan = -math.inf
        self._full_logged = False
        self._ready: list[Ready] = []
        self._refused: list[Refused] = []  # kept while their channel is paused

    # -- public API ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._observer is not None:
            raise UsageError("DropWatcher already started")
        observer = self._observer_factory()
        observer.start()  # (may fail, e.g. at the inotify instance limit: start() again)
        self._observer = observer
        now = self._clock()
        for index in range(len(self._channels)):
            self._attach(index, now, scan=False)  # the first poll() scans every folder

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(STOP_TIMEOUT)
            if self._observer.is_alive():
                _log.warning("watch_observer_not_stopped", timeout=STOP_TIMEOUT)

    def poll(self, timeout: float) -> tuple[list[Ready], list[Refused]]:
        """Wait up to ``timeout`` seconds for something to report; return as soon as there is."""
        with self._poll_lock:
            deadline = self._clock() + timeout
            while True:
                if self._stopped:
                    return [], []
                now = self._clock()
                self._step(now)
                with self._cond:
                    paused = set(self._paused)
                ready, self._ready = self._ready, []
                refused = [r for r in self._refused if r.channel not in paused]
                self._refused = [r for r in self._refused if r.channel in paused]
                if ready or refused or now >= deadline:
                    return ready, refused
                wake = min(deadline, self._next_wakeup())
                with self._cond:
                    if not self._inbox and not self._stopped:
                        self._cond.wait(max(0.0, wake - now))

    def done(self, path: Path) -> None:
        """Intake has finished with this file (taken, moved, quarantined): forget it.

        If the file is still there unchanged, the next event or rescan finds it again.
        """
        with self._cond:
            self._inbox.done.append(os.path.abspath(path))
            self._cond.notify_all()

    def pause(self, channel: str) -> None:
        """Backpressure: report nothing of this channel until resumed (its state is kept).

        Takes effect from the next check: a poll() already under way may still return some.
        """
        self._check_channel(channel)
        with self._cond:
            self._paused.add(channel)

    def resume(self, channel: str) -> None:
        """Report that channel's ready files again (those that waited are re-checked at once)."""
        self._check_channel(channel)
        with self._cond:
            self._paused.discard(channel)
            self._inbox.resumed.add(channel)
            self._cond.notify_all()

    def _check_channel(self, channel: str) -> None:
        if channel not in self._by_name:
            raise UsageError(f"unknown channel {channel!r}; known: {sorted(self._by_name)}")

    # -- observer thread ----------------------------------------------------------------------

    def _on_event(self, index: int, event: FileSystemEvent) -> None:
        ch = self._channels[index]
        src = os.fsdecode(event.src_path)
        dest = os.fsdecode(event.dest_path)
        hints: list[tuple[str, _Hint, bool]] = []  # path, hint, whether it was a write
        if isinstance(event, FileClosedEvent):
            hints.append((src, _Hint.FAST, False))
        elif isinstance(event, FileMovedEvent):
            hints += [(src, _Hint.LOOK, False), (dest, _Hint.FAST, False)]
        elif isinstance(event, DirDeletedEvent) and src == ch.root:
            with self._cond:
                self._inbox.lost.add(index)
                self._cond.notify_all()
            return
        elif isinstance(event, DirCreatedEvent | DirMovedEvent | DirDeletedEvent):
            hints += [(src, _Hint.TREE, False), (dest, _Hint.TREE, False)]
        elif isinstance(event, FileModifiedEvent):
            hints.append((src, _Hint.LOOK, True))
        else:  # created, deleted, attributes changed
            hints.append((src, _Hint.LOOK, False))
        with self._cond:
            posted = False
            for path, hint, write in hints:
                rel = ch.relative(path) if path else None
                if rel is None:
                    continue
                old = self._inbox.hints.get(path)
                if old is None:
                    if len(self._inbox.hints) >= MAX_PENDING_HINTS:
                        self._inbox.overflow = True
                        continue
                    new = hint
                elif _Hint.TREE in (old[2], hint):
                    new = _Hint.TREE
                elif hint is _Hint.LOOK and not write:
                    new = old[2]  # an attribute change does not cancel a pending close
                else:
                    new = hint  # a write after a close means the file is open again
                self._inbox.hints[path] = (index, rel, new)
                posted = True
            if posted:
                self._cond.notify_all()

    # -- polling thread -----------------------------------------------------------------------

    def _step(self, now: float) -> None:
        with self._cond:
            inbox, self._inbox = self._inbox, _Inbox()
            paused = set(self._paused)
        for path in inbox.done:
            self._entries.pop(path, None)
        for index in sorted(inbox.lost):
            self._lose(index, now, "deleted")
        for name in inbox.resumed - paused:
            self._unpark(self._by_name[name], now)
        gone: dict[int, set[PurePosixPath]] = {}
        self._deferred = {}  # (new subfolders' scans: pruned together below, one pass)
        try:
            for path, (index, rel, hint) in inbox.hints.items():
                if self._channels[index].watch is not None and self._hint(
                    index, path, rel, hint, now
                ):
                    gone.setdefault(index, set()).add(rel)
        finally:
            deferred, self._deferred = self._deferred, None
        for index, (under, seen, unreadable) in deferred.items():
            self._prune(index, under, seen, unreadable)
        for index, dirs in gone.items():
            self._prune(index, dirs, set())
        if inbox.overflow:
            _log.warning("watch_events_dropped", pending=MAX_PENDING_HINTS)
            forced = max(now, self._last_forced_rescan + MIN_FORCED_RESCAN_GAP)
            for ch in self._channels:
                if ch.watch is not None and forced < ch.rescan_at:
                    ch.rescan_at = forced
                    self._last_forced_rescan = forced
        if any(now >= ch.rescan_at for ch in self._channels):
            self._rescan(now)
        for index, ch in enumerate(self._channels):
            if ch.watch is None and now >= ch.retry_at:
                self._attach(index, now, scan=True)
        self._run_due(now, paused)

    def _next_wakeup(self) -> float:
        wake = min(
            (c.rescan_at if c.watch is not None else c.retry_at for c in self._channels),
            default=math.inf,
        )
        if self._heap:
            wake = min(wake, self._heap[0][0])
        return wake

    def _hint(self, index: int, path: str, rel: PurePosixPath, hint: _Hint, now: float) -> bool:
        """Act on one hint; True when it was about a folder that is gone (prune below it)."""
        if len(rel.parts) - 1 > MAX_DEPTH:
            self._refuse_too_deep(index, rel)
            return False
        if (top := _first_too_long(rel.parent)) is not None:
            self._refuse_top(index, top, _TOO_LONG)  # (everything below it: refused once)
            return False
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._entries.pop(path, None)
            return hint is _Hint.TREE
        except OSError as exc:
            _log.warning("watch_stat_failed", channel=self._name(index), path=path, error=str(exc))
            return False
        if stat.S_ISDIR(st.st_mode):
            if hint is _Hint.TREE and len(rel.parts) > MAX_DEPTH:
                self._refuse_too_deep(index, rel)
            elif hint is _Hint.TREE and _too_long(rel):
                self._refuse_once(index, path, rel, st, _TOO_LONG)
            elif hint is _Hint.TREE:
                self._scan(index, path, rel, now)
            return False
        self._observe(index, path, rel, st, now, fast=hint is _Hint.FAST)
        return False

    def _observe(
        self,
        index: int,
        path: str,
        rel: PurePosixPath,
        st: os.stat_result,
        now: float,
        *,
        fast: bool = False,
    ) -> None:
        """Account for a non-folder entry just lstat'ed."""
        sig = _sig(st)
        e = self._entries.get(path)
        if not stat.S_ISREG(st.st_mode):
            if e is None or e.state is not _State.REFUSED or e.sig[:2] != sig[:2]:
                self._refuse(index, path, rel, sig, _refusal(st.st_mode))
            return
        if e is None:
            if len(self._entries) >= self._max_tracked:
                self._note_full()
                return
            e = self._entries[path] = _Entry(index, rel, sig, _State.CANDIDATE, since=now)
        elif e.state is _State.REPORTED and e.sig[:4] == sig[:4]:
            return  # reported and unchanged: wait for done()
        elif e.state is not _State.CANDIDATE or e.sig != sig:
            e.state, e.sig, e.since, e.fast_at = _State.CANDIDATE, sig, now, None
        if fast:
            e.fast_at = now
        due = e.since + self._channels[index].spec.settle_seconds
        if e.fast_at is not None:
            due = min(due, e.fast_at + DEBOUNCE_SECONDS)
        if due != e.due:
            e.due = due
            heapq.heappush(self._heap, (due, next(self._seq), path))

    def _refuse(self, index: int, path: str, rel: PurePosixPath, sig: _Sig, reason: str) -> None:
        e = self._entries.get(path)
        if e is None:
            if len(self._entries) >= self._max_tracked:
                self._note_full()
                return
            self._entries[path] = _Entry(index, rel, sig, _State.REFUSED)
        else:
            e.state, e.sig, e.due, e.fast_at = _State.REFUSED, sig, math.inf, None
        name = self._name(index)
        _log.warning("refused_entry", channel=name, relpath=str(rel), reason=reason)
        self._refused.append(Refused(name, Path(path), rel, reason))

    def _refuse_too_deep(self, index: int, rel: PurePosixPath) -> None:
        self._refuse_top(index, PurePosixPath(*rel.parts[: MAX_DEPTH + 1]), _TOO_DEEP)

    def _refuse_top(self, index: int, top: PurePosixPath, reason: str) -> None:
        """Refuse the folder ``top`` once, for what was seen below it."""
        path = os.path.join(self._channels[index].root, top)
        try:
            st = os.lstat(path)
        except OSError:
            return
        self._refuse_once(index, path, top, st, reason)

    def _refuse_once(
        self, index: int, path: str, rel: PurePosixPath, st: os.stat_result, reason: str
    ) -> None:
        """Refuse a folder, unless it was refused already (the same one: device and inode)."""
        e = self._entries.get(path)
        if e is None or e.state is not _State.REFUSED or e.sig[:2] != _sig(st)[:2]:
            self._refuse(index, path, rel, _sig(st), reason)

    def _note_full(self) -> None:
        if not self._full_logged:
            _log.warning("watch_tracking_full", max_tracked=self._max_tracked)
            self._full_logged = True

    def _run_due(self, now: float, paused: Collection[str]) -> None:
        while self._heap and self._heap[0][0] <= now:
            due, _, path = heapq.heappop(self._heap)
            e = self._entries.get(path)
            if e is None or e.state is not _State.CANDIDATE or e.due != due:
                continue  # stale heap entry
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                del self._entries[path]
                continue
            except OSError as exc:
                _log.warning("watch_stat_failed", channel=self._name(e.chan), error=str(exc))
                e.due = now + self._channels[e.chan].spec.settle_seconds
                heapq.heappush(self._heap, (e.due, next(self._seq), path))
                continue
            if stat.S_ISDIR(st.st_mode):
                del self._entries[path]
                continue
            self._observe(e.chan, path, e.rel, st, now)
            if e.state is not _State.CANDIDATE or e.due > now:
                continue  # refused, or changed since the last look
            name = self._name(e.chan)
            if name in paused:
                e.due = math.inf  # parked until resume()
                continue
            e.state, e.due, e.fast_at = _State.REPORTED, math.inf, None
            dev, ino, size, mtime_ns, _ = e.sig
            self._ready.append(Ready(name, Path(path), e.rel, size, mtime_ns, dev, ino))
        if len(self._heap) > 2 * len(self._entries) + 1024:
            self._heap = [
                (e.due, next(self._seq), p)
                for p, e in self._entries.items()
                if e.state is _State.CANDIDATE and e.due < math.inf
            ]
            heapq.heapify(self._heap)

    def _unpark(self, index: int, now: float) -> None:
        for path, e in self._entries.items():
            if e.chan == index and e.state is _State.CANDIDATE and e.due == math.inf:
                e.due = now
                heapq.heappush(self._heap, (now, next(self._seq), path))

    def _scan(self, index: int, start: str, start_rel: PurePosixPath, now: float) -> None:
        """Observe every entry below ``start``; forget tracked entries there that vanished."""
        ch = self._channels[index]
        seen: set[str] = set()
        unreadable: set[PurePosixPath] = set()
        stack = [(start, start_rel)]
        while stack:
            folder, folder_rel = stack.pop()
            try:
                with os.scandir(folder) as it:
                    listing = list(it)
            except FileNotFoundError:
                continue
            except OSError as exc:
                _log.warning("watch_scan_failed", channel=ch.spec.channel, error=str(exc))
                unreadable.add(folder_rel)
                continue
            for entry in listing:
                if ignored(entry.name):
                    continue
                rel = folder_rel / entry.name
                if ch.excluded(rel):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                seen.add(entry.path)
                if not stat.S_ISDIR(st.st_mode):
                    self._observe(index, entry.path, rel, st, now)
                elif not ch.spec.recursive:
                    continue
                elif len(rel.parts) > MAX_DEPTH:
                    self._refuse_once(index, entry.path, rel, st, _TOO_DEEP)
                elif _too_long(rel):
                    self._refuse_once(index, entry.path, rel, st, _TOO_LONG)
                else:
                    stack.append((entry.path, rel))
        if self._deferred is None:
            self._prune(index, {start_rel}, seen, unreadable)
            return
        under, seen_all, unreadable_all = self._deferred.setdefault(index, (set(), set(), set()))
        under.add(start_rel)
        seen_all |= seen
        unreadable_all |= unreadable

    def _prune(
        self,
        index: int,
        under: Collection[PurePosixPath],
        keep: Collection[str],
        unreadable: Collection[PurePosixPath] = (),
    ) -> None:
        """Forget the entries below ``under`` (except ``keep``) that no longer exist. (Paths
        are compared as strings, a prefix test in C per entry: each new subfolder is scanned
        and pruned, and tens of thousands of entries may be tracked.)"""
        root = self._channels[index].root

        def folders(rels: Collection[PurePosixPath]) -> tuple[frozenset[str], tuple[str, ...]]:
            paths = [root if r == _ROOT else f"{root}/{r}" for r in rels]
            return frozenset(paths), tuple(f"{p}/" for p in paths)

        exact, prefixes = folders(under)
        skip_exact, skip_prefixes = folders(unreadable)
        for path, e in list(self._entries.items()):
            if e.chan != index or path in keep:
                continue
            if not (path in exact or path.startswith(prefixes)):
                continue
            if path in skip_exact or path.startswith(skip_prefixes):
                continue
            try:
                os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                del self._entries[path]
            except OSError:
                pass

    def _rescan(self, now: float) -> None:
        """Scan every folder that is due."""
        for index, ch in enumerate(self._channels):
            if ch.watch is None or now < ch.rescan_at:
                continue
            ch.rescan_at = now + ch.rescan_every
            try:
                st = os.lstat(ch.root)
                ident: tuple[int, int] | None = (st.st_dev, st.st_ino)
                if not stat.S_ISDIR(st.st_mode):
                    ident = None
            except OSError:
                ident = None
            if ident is None or ident != ch.root_id:
                self._lose(index, now, "missing" if ident is None else "replaced")
                continue
            self._scan(index, ch.root, _ROOT, now)
        self._full_logged = self._full_logged and len(self._entries) >= self._max_tracked

    def _attach(self, index: int, now: float, *, scan: bool) -> None:
        assert self._observer is not None
        ch = self._channels[index]
        try:
            st = os.lstat(ch.root)
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(f"{ch.root} is not a folder (symlinks are not followed)")
            watch = self._observer.schedule(
                ch.handler, ch.root, recursive=ch.spec.recursive, event_filter=_EVENT_FILTER
            )
        except OSError as exc:
            if not ch.unavailable_logged:
                _log.error(
                    "drop_folder_unavailable",
                    channel=ch.spec.channel,
                    folder=ch.root,
                    error=str(exc),
                )
                ch.unavailable_logged = True
            ch.retry_at = now + self._folder_retry
            return
        ch.watch, ch.root_id = watch, (st.st_dev, st.st_ino)
        ch.retry_at, ch.unavailable_logged = math.inf, False
        fstype = filesystem_type(ch.root)
        network = is_network_filesystem(fstype)
        every = ch.spec.rescan_seconds
        if every is None:
            every = NETWORK_RESCAN_SECONDS if network else self._rescan_interval
        ch.rescan_every = every
        _log.info(
            "drop_folder_watched",
            channel=ch.spec.channel,
            folder=ch.root,
            filesystem=fstype or "unknown",
            rescan_seconds=every,
        )
        if network and every > SLOW_NETWORK_RESCAN:
            _log.warning(
                "drop_folder_network_rescan_slow",
                channel=ch.spec.channel,
                folder=ch.root,
                filesystem=fstype,
                rescan_seconds=every,
                detail="files other machines write to this share are found only by a scan; "
                f"they may wait up to {every:g} s (lower the channel's rescan_seconds)",
            )
        if scan:
            self._scan(index, ch.root, _ROOT, now)
            ch.rescan_at = now + every
        else:
            ch.rescan_at = now

    def _lose(self, index: int, now: float, why: str) -> None:
        """The drop folder vanished or was replaced: drop its watch and state, retry soon."""
        ch = self._channels[index]
        if ch.watch is None:
            return
        # Always start over, even if a folder is back at that path: its inode number may be the
        # deleted one's, and watchdog's emitter for the deleted folder has stopped for good.
        assert self._observer is not None
        with contextlib.suppress(KeyError):  # watchdog already dropped it
            self._observer.unschedule(ch.watch)
        ch.watch, ch.root_id, ch.retry_at, ch.rescan_at = None, None, now, math.inf
        for path in [p for p, e in self._entries.items() if e.chan == index]:
            del self._entries[path]
        _log.warning("drop_folder_lost", channel=ch.spec.channel, folder=ch.root, why=why)

    def _name(self, index: int) -> str:
        return self._channels[index].spec.channel

"""The audit log writer: append-only JSON-lines segments, one writer thread, group commit.

An audit directory (mode 0700) holds ``audit-NNNNNN.jsonl`` segments (each opened
by an ``audit.segment_opened`` record, rotated at ``max_segment_bytes``),
``checkpoints.log`` (signed C2SP checkpoints, append-only) and ``.lock`` (flock of
the one writing process). docs/AUDIT.md describes the format.

:meth:`AuditLog.append` validates the record, assigns its index, timestamp and
``prev`` hash under a lock, hashes it into the tree, queues the line and returns
the index. The writer thread writes what is queued with one ``write`` and one
``fsync`` per segment (group commit: a lone record is synced at once; under load a
batch is what arrived during the previous fsync). :meth:`AuditLog.wait_durable`
(or ``append(..., durable=True)``) blocks until the record is on disk: acknowledge
an action only after that. Checkpoints are issued every ``checkpoint_every``
records, every ``checkpoint_interval`` seconds while records arrive, at open and
at close: an ``audit.checkpoint`` record announces size ``idx + 1`` (the
checkpoint covers its own announcement), and once it is durable the signed note
goes to ``checkpoints.log``.

When a write or fsync fails the log turns unhealthy (``healthy`` false, ``failed``
set) and ``append`` raises :class:`AuditUnavailable` (AU-5, FAU_STG.4 "prevent
audited events") until the writer, retrying every ``retry_interval`` s, has
written the queued records; then an ``audit.outage`` record (start, end, records
refused, records written late) comes first. Reopening verifies the last segments
against the last signed checkpoint, cuts off a torn final line (recorded as
``audit.tail_truncated``) and continues the index.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ferry import __version__, log
from ferry.audit.files import NoteFile, UnsafeFile, not_regular, open_append, open_regular
from ferry.audit.merkle import (
    Checkpoint,
    CompactRange,
    Note,
    check_origin,
    leaf_hash,
    sign_checkpoint,
)
from ferry.audit.record import (
    MAX_RECORD_BYTES,
    AuditError,
    AuditObject,
    AuditRecordInvalid,
    AuditTimeout,
    AuditUnavailable,
    Draft,
    Result,
    Subject,
    decode,
    draft,
    format_ts,
)
from ferry.audit.segments import CHECKPOINTS_FILE, iter_lines, list_segments, segment_name
from ferry.audit.verify import scan_tail
from ferry.crypto.keys import PublicKey, SecretKey

_log = log.get("audit")

SELF = Subject.component("audit")
LOCK_FILE = ".lock"
MAX_SEGMENTS = 999_999  # segment numbers have six digits
# Records before the last checkpoint's size that reopening replays, so as to see a clean
# close there: audit.stopped, its checkpoint, the outage tail of a close (audit.outage, a
# checkpoint, audit.stopped, a checkpoint) and the audit.segment_opened records among them.
CLOSE_TAIL = 10
# The records a new log holds before its first checkpoint record.
_FIRST_START = frozenset({"audit.segment_opened", "audit.started", "audit.tail_truncated"})


@dataclass(frozen=True)
class AuditSettings:
    """How one audit log is written. ``origin`` names the log in its checkpoints and is the
    note key name, e.g. "outside.gw.example/audit"."""

    origin: str
    checkpoint_every: int = 1000  # records between checkpoints
    checkpoint_interval: float = 60.0  # seconds between checkpoints while records arrive
    max_segment_bytes: int = 64 * 1024 * 1024
    retry_interval: float = 1.0  # seconds between write attempts while unhealthy
    durable_timeout: float = 5.0  # default wait of append(durable=True) and of opening
    side: str | None = None  # "outside" / "inside", recorded in audit.started
    host: str | None = None  # recorded in audit.started (default: the host name)

    def __post_init__(self) -> None:
        check_origin(self.origin)
        if self.checkpoint_every < 1 or self.checkpoint_interval <= 0:
            raise ValueError("checkpoint_every and checkpoint_interval must be positive")
        if self.max_segment_bytes < 4 * MAX_RECORD_BYTES:
            raise ValueError(f"max_segment_bytes must be at least {4 * MAX_RECORD_BYTES}")
        if self.retry_interval <= 0 or self.durable_timeout <= 0:
            raise ValueError("retry_interval and durable_timeout must be positive")


class FileOps:
    """The file system calls of the writer (a seam: tests inject faults by subclassing)."""

    def open_append(self, path: Path) -> int:
        """Open (or create) a regular file to append to. Never through a symbolic link, and
        never blocking: a FIFO, a socket or a device in its place is :class:`UnsafeFile`
        (not opened) rather than hanging the writer or an odd error. (O_NONBLOCK does nothing
        to the writes of a regular file.)"""
        return open_append(path)

    def write(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def close(self, fd: int) -> None:
        os.close(fd)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True, slots=True)
class _Note:
    """A queued checkpoint: sign and store it once records up to ``size`` are durable."""

    size: int
    root: bytes


_Item = tuple[int, bytes] | _Note  # (segment number, line with newline) or a checkpoint


@dataclass
class _Truncation:
    file: str
    offset: int
    removed: bytes


def _describe(exc: OSError) -> str:
    if isinstance(exc, UnsafeFile):
        return str(exc)
    name = errno.errorcode.get(exc.errno or 0, "EIO")
    where = f" ({Path(exc.filename).name})" if exc.filename else ""
    return f"{name}: {exc.strerror or exc}{where}"


def _say(level: str, event: str, **kw: object) -> None:
    """An operational log line; a broken log stream must never stop the audit writer."""
    with contextlib.suppress(OSError, ValueError):
        getattr(_log, level)(event, **kw)


def _now_us() -> int:
    return time.time_ns() // 1000


class AuditLog:
    """A tamper-evident audit log in ``directory``, signed with ``key`` (role "audit").

    Thread-safe: any thread may append. Use as a context manager or call
    :meth:`close`. Opening fails with :class:`AuditError` if the existing log
    does not match its last signed checkpoint, and with :class:`AuditUnavailable`
    if it cannot be written.
    """

    def __init__(
        self,
        directory: Path,
        key: SecretKey,
        settings: AuditSettings,
        *,
        clock: Callable[[], int] | None = None,
        files: FileOps | None = None,
        previous_keys: Sequence[SecretKey] = (),
    ) -> None:
        for k in (key, *previous_keys):
            if k.alg != "ed25519":
                raise AuditError(f"the audit key must be ed25519, not {k.alg}")
        ids = [k.public.key_id for k in (key, *previous_keys)]
        if len(set(ids)) != len(ids):
            raise AuditError("an audit key is given twice (the current key and earlier ones)")
        self._dir = Path(directory)
        self._key = key
        # Earlier audit keys during a rotation: each co-signs every checkpoint (a handover the
        # verifier follows), and the log may resume from a checkpoint signed by one of them.
        self._previous = tuple(previous_keys)
        self._settings = settings
        self._clock = clock or _now_us
        self._files = files or FileOps()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # wakes the writer
        self._changed = threading.Condition(self._lock)  # wakes durability waiters
        self._closing = threading.Event()
        #: Set while the log can write.
        self.available = threading.Event()
        #: Set while the log cannot write: stop intake and transfers.
        self.failed = threading.Event()

        # Assigning side (under the lock).
        self._tree = CompactRange()
        self._next_idx = 0
        self._prev_hex = "0" * 64
        self._seg_no = 0
        self._seg_bytes = 0
        self._pending: list[_Item] = []
        self._since_ckpt = 0
        self._ckpt_size = 0  # size of the last checkpoint issued
        self._ckpt_mono = time.monotonic()
        self._note_size = 0  # size of the last checkpoint durable in checkpoints.log
        self._durable_size = 0
        self._healthy = True
        self._closed = False
        self._stopping = False
        self._writer_dead = False
        self._outage_start = 0
        self._outage_error = ""
        self._refused = 0
        self._late: tuple[int, int] | None = None

        # Writer side (writer thread only, after start).
        self._inflight: deque[_Item] = deque()
        self._fd: int | None = None
        self._fd_seg = 0
        self._fd_durable = 0
        self._created: set[int] = set()
        self._ckpt_fd = -1
        self._ckpt_durable = 0
        self._lock_fd = -1

        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._take_lock()
            resumed, truncations = self._resume()
            #: records the log held when it was opened (the next index then): a record
            #: appended before a crash at or past this index did not reach the disk
            self.resumed_size = self._next_idx
        except BaseException as exc:
            self._release_files()
            if isinstance(exc, OSError):
                raise AuditUnavailable(f"{self._dir}: cannot open: {_describe(exc)}") from exc
            raise
        with self._lock:
            if not resumed:
                self._open_segment_locked()
            self._append_locked(self._started_record(resumed))
            for t in truncations:
                self._append_locked(_truncation_record(t))
            self._issue_checkpoint_locked()
            last = self._next_idx - 1
        self.available.set()
        self._thread = threading.Thread(target=self._run, name="ferry-audit-writer", daemon=True)
        self._thread.start()
        try:
            self.wait_durable(last, settings.durable_timeout)
        except AuditUnavailable as exc:
            self._abort()
            raise AuditUnavailable(f"{self._dir}: cannot write the audit log: {exc}") from exc
        seg = segment_name(self._seg_no)
        where = {"directory": str(self._dir), "origin": settings.origin, "segment": seg}
        _say("info", "audit_opened", resumed=resumed, size=self._next_idx, **where)

    # --- public API -----------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False while records cannot be written: stop intake and transfers."""
        return self._healthy and not self._writer_dead

    @property
    def problem(self) -> str | None:
        """Why records cannot be written now, or None while they can (for status and monitors)."""
        with self._lock:
            if self._healthy and not self._writer_dead:
                return None
            return self._unavailable_message_locked()

    @property
    def size(self) -> int:
        """Records appended so far (the next record's index)."""
        return self._next_idx

    @property
    def durable_size(self) -> int:
        """Records known to be on disk (every index below this is durable)."""
        return self._durable_size

    def durable_bytes(self, segment: int | None) -> int | None:
        """How many bytes of one of this log's files are on disk, for a reader of the files
        (the audit shipper) that must not take what a power cut could still undo: of
        segment number ``segment``, or of the checkpoints file (None). None: all of it
        (a segment before the one being written: synced before the writer left it)."""
        with self._lock:
            if segment is None:
                return self._ckpt_durable
            if segment < self._fd_seg:
                return None
            return self._fd_durable if segment == self._fd_seg else 0

    @property
    def origin(self) -> str:
        """The log's name in its checkpoints."""
        return self._settings.origin

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def public_key(self) -> PublicKey:
        """The key that verifies this log's checkpoints."""
        return self._key.public

    @property
    def previous_public_keys(self) -> tuple[PublicKey, ...]:
        """Earlier audit keys that also sign each checkpoint (during a key rotation)."""
        return tuple(k.public for k in self._previous)

    def append(
        self,
        event: str,
        *,
        subject: Subject,
        result: Result = "success",
        reason: str | None = None,
        obj: AuditObject | Mapping[str, object] | None = None,
        detail: Mapping[str, object] | None = None,
        corr: str | None = None,
        durable: bool = False,
        timeout: float | None = None,
    ) -> int:
        """Append one record and return its index.

        With ``durable=True`` return only once the record is on disk (waiting
        at most ``timeout``, default ``durable_timeout``). Raises
        :class:`AuditRecordInvalid` for a record the schema refuses (a bug in
        the caller) and :class:`AuditUnavailable` when the log cannot write.
        """
        rec = draft(
            event,
            subject=subject,
            result=result,
            reason=reason,
            obj=obj,
            detail=detail,
            corr=corr,
        )
        with self._lock:
            self._check_open_locked()
            idx = self._append_locked(rec)
            self._since_ckpt += 1
            if self._since_ckpt >= self._settings.checkpoint_every:
                self._issue_checkpoint_locked()
        if durable:
            self.wait_durable(idx, timeout)
        return idx

    def is_durable(self, idx: int) -> bool:
        """Whether record ``idx`` is on disk (without waiting)."""
        with self._lock:
            return self._durable_size > idx

    def wait_durable(self, idx: int, timeout: float | None = None) -> None:
        """Block until record ``idx`` is on disk.

        Raises :class:`AuditUnavailable` if the log fails (or is unhealthy)
        before that, :class:`AuditTimeout` after ``timeout`` seconds (default
        ``durable_timeout``).
        """
        with self._lock:
            if not 0 <= idx < self._next_idx:
                raise ValueError(f"no audit record {idx} has been appended")
            self._wait_locked(lambda: self._durable_size > idx, f"audit record {idx}", timeout)

    def checkpoint(self, timeout: float | None = None) -> int:
        """Issue a checkpoint now (if anything is new), wait until stored; return its size."""
        with self._lock:
            self._check_open_locked()
            if self._next_idx != self._ckpt_size:
                self._issue_checkpoint_locked()
            size = self._ckpt_size
            self._wait_locked(lambda: self._note_size >= size, f"checkpoint {size}", timeout)
        return size

    def _wait_locked(self, done: Callable[[], bool], what: str, timeout: float | None) -> None:
        limit = self._settings.durable_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while not done():
            if not self._healthy or self._writer_dead:
                raise AuditUnavailable(self._unavailable_message_locked())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AuditTimeout(f"{what} not durable after {limit:g} s")
            self._changed.wait(remaining)

    def close(self, timeout: float = 10.0) -> None:
        """Record audit.stopped, issue a final checkpoint, write everything and stop.

        Raises :class:`AuditUnavailable` if records could not be written.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._healthy and not self._writer_dead:
                self._append_locked(draft("audit.stopped", subject=SELF, result="info"))
                self._issue_checkpoint_locked()
            self._stopping = True
            self._work.notify()
        self._closing.set()
        self._thread.join(timeout)
        with self._lock:
            unwritten = self._next_idx - self._durable_size
        if self._thread.is_alive():
            _say("error", "audit_writer_stuck", directory=str(self._dir), unwritten=unwritten)
        else:
            self._release_files()
        self.available.clear()
        if unwritten:
            raise AuditUnavailable(f"{unwritten} audit records could not be written")
        _say("info", "audit_closed", directory=str(self._dir), size=self._next_idx)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- assigning (caller threads, under the lock) -----------------------------------------

    def _check_open_locked(self) -> None:
        if self._closed:
            raise AuditUnavailable("the audit log is closed")
        if not self._healthy or self._writer_dead:
            self._refused += 1
            raise AuditUnavailable(self._unavailable_message_locked())

    def _unavailable_message_locked(self) -> str:
        if self._writer_dead:
            return f"audit log writer stopped: {self._outage_error}"
        if not self._healthy:
            since = format_ts(self._outage_start)
            return f"audit log unavailable since {since}: {self._outage_error}"
        return "the audit log is closed"

    def _append_locked(self, rec: Draft) -> int:
        if self._seg_bytes >= self._settings.max_segment_bytes:
            self._open_segment_locked()
        return self._add_locked(rec)

    def _add_locked(self, rec: Draft) -> int:
        idx = self._next_idx
        line = rec.finish(idx, format_ts(self._clock()), self._prev_hex)
        if len(line) > MAX_RECORD_BYTES:
            raise AuditRecordInvalid(
                f"audit record ({rec.event}) is {len(line)} bytes; max {MAX_RECORD_BYTES}"
            )
        leaf = leaf_hash(line)
        self._tree.append(leaf)
        self._prev_hex = leaf.hex()
        self._next_idx = idx + 1
        self._seg_bytes += len(line) + 1
        self._pending.append((self._seg_no, line + b"\n"))
        self._work.notify()
        return idx

    def _open_segment_locked(self) -> None:
        if self._seg_no >= MAX_SEGMENTS:
            raise AuditError("the audit log has no segment numbers left")
        previous = (
            {"segment": segment_name(self._seg_no), "bytes": self._seg_bytes}
            if self._seg_no
            else None
        )
        self._seg_no += 1
        self._seg_bytes = 0
        detail = {
            "segment": segment_name(self._seg_no),
            "previous": previous,
            "tree_size": self._next_idx,
            "root": self._tree.root().hex(),
            "frontier": [h.hex() for h in self._tree.hashes],
        }
        self._add_locked(draft("audit.segment_opened", subject=SELF, result="info", detail=detail))

    def _issue_checkpoint_locked(self) -> None:
        if self._seg_bytes >= self._settings.max_segment_bytes:
            self._open_segment_locked()
        size = self._next_idx + 1
        detail = {"size": size, "origin": self._settings.origin}
        self._add_locked(draft("audit.checkpoint", subject=SELF, result="info", detail=detail))
        self._pending.append(_Note(size, self._tree.root()))
        self._ckpt_size = size
        self._since_ckpt = 0
        self._ckpt_mono = time.monotonic()

    def _started_record(self, resumed: bool) -> Draft:
        s = self._settings
        detail: dict[str, object] = {
            "origin": s.origin,
            "checkpoint_key": self._key.public.to_string(),
            "resumed": resumed,
            "tree_size": self._next_idx,
            "pid": os.getpid(),
            "host": s.host or socket.gethostname(),
            "version": __version__,
        }
        if resumed:
            # The records from the last checkpoint stored in checkpoints.log up to here were
            # written by a run that stopped without signing them; this run signs them now
            # (it cannot tell them from records someone added to the stopped log's disk), so
            # it says which they are: verify reports them as adopted (ADOPTED).
            detail["signed_size"] = self._note_size
        if s.side is not None:
            detail["side"] = s.side
        if self._previous:
            detail["previous_checkpoint_keys"] = [k.public.to_string() for k in self._previous]
        return draft("audit.started", subject=SELF, result="success", detail=detail)

    # --- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001  # the writer fails closed, whatever happened
            _say("exception", "audit_writer_crashed", directory=str(self._dir))
            with self._lock:
                self._mark_failed_locked(f"writer crashed: {exc!r}")
                self._writer_dead = True
                self._changed.notify_all()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._pending:
                    if self._stopping:
                        return
                    wait = self._checkpoint_wait_locked()
                    if wait is not None and wait <= 0:
                        self._issue_checkpoint_locked()
                        break
                    self._work.wait(wait)
                self._inflight.extend(self._pending)
                self._pending.clear()
            try:
                self._commit()
            except OSError as exc:
                if not self._ride_out(exc):
                    return

    def _checkpoint_wait_locked(self) -> float | None:
        if not self._healthy or self._next_idx == self._ckpt_size or self._stopping:
            return None
        return self._ckpt_mono + self._settings.checkpoint_interval - time.monotonic()

    def _commit(self) -> None:
        """Write and fsync everything in flight, in order; notes after their records."""
        inflight = self._inflight
        while inflight:
            head = inflight[0]
            if isinstance(head, _Note):
                self._write_note(head)
                inflight.popleft()
                continue
            seg = head[0]
            run: list[bytes] = []
            for item in inflight:
                if isinstance(item, _Note) or item[0] != seg:
                    break
                run.append(item[1])
            if seg != self._fd_seg or self._fd is None:
                self._rotate(seg)
            assert self._fd is not None
            data = b"".join(run)
            self._write_all(self._fd, data)
            self._files.fsync(self._fd)
            for _ in range(len(run)):
                inflight.popleft()
            with self._lock:
                self._fd_durable += len(data)
                self._durable_size += len(run)
                self._changed.notify_all()

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self._files.write(fd, view)
            view = view[n:]

    def _write_note(self, note: _Note) -> None:
        cp = Checkpoint(self._settings.origin, note.size, note.root)
        data = sign_checkpoint(cp, self._key, *self._previous) + b"\n"
        self._write_all(self._ckpt_fd, data)
        self._files.fsync(self._ckpt_fd)
        with self._lock:
            self._ckpt_durable += len(data)
            self._note_size = note.size
            self._changed.notify_all()

    def _rotate(self, seg: int) -> None:
        path = self._dir / segment_name(seg)
        fd = self._files.open_append(path)
        try:
            if self._files.size(fd):
                if seg not in self._created:
                    raise OSError(errno.EEXIST, "segment exists and is not empty", str(path))
                self._files.truncate(fd, 0)  # our own half-written attempt
            self._created.add(seg)
            self._files.fsync_dir(self._dir)
        except BaseException:
            with contextlib.suppress(OSError):
                self._files.close(fd)
            raise
        if self._fd is not None:
            with contextlib.suppress(OSError):  # already fsynced
                self._files.close(self._fd)
        with self._lock:
            self._fd, self._fd_seg, self._fd_durable = fd, seg, 0

    def _mark_failed_locked(self, error: str) -> None:
        if self._healthy:
            self._healthy = False
            self._outage_start = self._clock()
            self._refused = 0
            first, last = self._durable_size, self._next_idx - 1
            self._late = (first, last) if last >= first else None
            self.available.clear()
            self.failed.set()
        self._outage_error = error
        self._changed.notify_all()

    def _ride_out(self, exc: OSError) -> bool:
        """Retry until the queued records are written; False if the log closed first."""
        with self._lock:
            self._mark_failed_locked(_describe(exc))
        _say("error", "audit_unavailable", directory=str(self._dir), error=_describe(exc))
        while True:
            closing = self._closing.wait(self._settings.retry_interval)
            try:
                self._reset_files()
                with self._lock:
                    self._inflight.extend(self._pending)
                    self._pending.clear()
                self._commit()
            except OSError as again:
                with self._lock:
                    self._outage_error = _describe(again)
                    self._changed.notify_all()
                if closing:
                    with contextlib.suppress(OSError):  # (no partial line left behind)
                        self._reset_files()
                    _say("error", "audit_closed_unwritten", directory=str(self._dir))
                    return False
                continue
            with self._lock:
                self._recovered_locked()
            return True

    def _reset_files(self) -> None:
        """Cut off whatever a failed attempt left after the last durable byte."""
        if self._fd is not None:
            self._files.truncate(self._fd, self._fd_durable)
        self._files.truncate(self._ckpt_fd, self._ckpt_durable)

    def _recovered_locked(self) -> None:
        now = self._clock()
        detail: dict[str, object] = {
            "start": format_ts(self._outage_start),
            "end": format_ts(now),
            "refused": self._refused,
            "late": list(self._late) if self._late else None,
            "error": self._outage_error,
        }
        self._healthy = True
        self._append_locked(
            draft(
                "audit.outage",
                subject=SELF,
                result="failure",
                reason="AUDIT_UNAVAILABLE",
                detail=detail,
            )
        )
        self._issue_checkpoint_locked()
        if self._closed:
            self._append_locked(draft("audit.stopped", subject=SELF, result="info"))
            self._issue_checkpoint_locked()
        _say("warning", "audit_recovered", directory=str(self._dir), **detail)
        self.failed.clear()
        self.available.set()
        self._changed.notify_all()

    # --- opening and resuming ------------------------------------------------------------------

    def _take_lock(self) -> None:
        path = self._dir / LOCK_FILE
        self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise AuditError(f"{self._dir}: another process is writing this audit log") from exc

    def _release_files(self) -> None:
        for fd in (self._fd, self._ckpt_fd):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    self._files.close(fd)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
        self._fd, self._ckpt_fd, self._lock_fd = None, -1, -1

    def _abort(self) -> None:
        with self._lock:
            self._closed = True
            self._stopping = True
            self._work.notify()
        self._closing.set()
        self._thread.join(self._settings.retry_interval + 1.0)
        if not self._thread.is_alive():
            self._release_files()

    def _fail_open(self, message: str) -> AuditError:
        return AuditError(f"{self._dir}: {message}; run `ferry audit verify {self._dir}`")

    def _resume(self) -> tuple[bool, list[_Truncation]]:
        """Load the state of an existing log (False for a new one), checking it first."""
        truncations: list[_Truncation] = []
        last = self._open_checkpoints(truncations)
        segs = list_segments(self._dir, any_type=True)
        for _, path in segs:  # (first: a stray FIFO or socket is not a missing segment)
            if (unsafe := not_regular(path)) is not None:
                raise self._fail_open(f"{unsafe}: the writer does not read or follow it")
        for expected, (number, _) in enumerate(segs, 1):
            if number != expected:
                raise self._fail_open(f"segment {segment_name(expected)} is missing")
        segs = self._drop_empty_tail(segs, truncations)
        if last is None and len(segs) == 1 and self._drop_first_start(segs[0][1], truncations):
            segs = []
        if not segs:
            if last is not None:
                raise self._fail_open("checkpoints.log exists but there are no segments")
            return False, truncations
        publics = [k.public for k in (self._key, *self._previous)]
        if last is not None and last.signature_by_any(publics) != "valid":
            raise self._fail_open(
                "the last checkpoint is not signed by this audit key (after a key change, "
                "name the earlier key in audit.previous_keys: docs/OPERATIONS.md)"
            )
        # Replay from the segment holding the last checkpoint's size: that checkpoint
        # then confirms the frontier saved in the segment's first record.
        start = len(segs) - 1
        # (and from far enough back to see a close before it: audit.stopped, the outage tail)
        while (
            start > 0
            and last is not None
            and _first_idx(segs[start][1]) > max(0, last.checkpoint.size - CLOSE_TAIL)
        ):
            start -= 1
        tail = scan_tail(self._dir, segs[start][0], publics)
        if tail.report.problems:
            p = tail.report.problems[0]
            raise self._fail_open(f"{p.code} at {p.location()}: {p.message}")
        self._tree, self._prev_hex = tail.tree, tail.prev
        self._next_idx = self._durable_size = tail.tree.size
        for size, root in tail.unstored:  # announced, but the writer stopped before storing
            self._pending.append(_Note(size, root))
        self._ckpt_size = tail.unstored[-1][0] if tail.unstored else self._note_size
        self._seg_no, last_path = segs[-1]
        self._fd = self._files.open_append(last_path)
        self._created.add(self._seg_no)
        self._fd_seg = self._seg_no
        if tail.torn is not None:
            name, offset, data = tail.torn
            truncations.append(_Truncation(name, offset, data))
            self._files.truncate(self._fd, offset)
            self._files.fsync(self._fd)
        self._fd_durable = self._seg_bytes = self._files.size(self._fd)
        return True, truncations

    def _open_checkpoints(self, truncations: list[_Truncation]) -> Note | None:
        """Open checkpoints.log to append, check every note as it is read (one at a time:
        the file may hold any number) and return the last one."""
        path = self._dir / CHECKPOINTS_FILE
        try:
            self._ckpt_fd = self._files.open_append(path)
            notes = NoteFile(path, same_as=self._ckpt_fd)
        except UnsafeFile as exc:
            raise self._fail_open(str(exc)) from None
        last = foreign = None
        with notes:
            for note in notes.first_pass():
                if foreign is None and note.checkpoint.origin != self._settings.origin:
                    foreign = note
                last = note
        end = notes.end
        assert end is not None  # (the first pass was read to its end)
        if end.error is not None:
            raise self._fail_open(f"{CHECKPOINTS_FILE} {end.error}")
        if foreign is not None:
            raise self._fail_open(
                f"{CHECKPOINTS_FILE} line {foreign.line} is for origin "
                f"{foreign.checkpoint.origin!r}, not {self._settings.origin!r}"
            )
        self._ckpt_durable = end.size  # the file's length: it parsed to its end
        if end.torn_at is not None:
            truncations.append(_Truncation(CHECKPOINTS_FILE, end.torn_at, end.torn))
            self._files.truncate(self._ckpt_fd, end.torn_at)
            self._files.fsync(self._ckpt_fd)
            self._ckpt_durable = end.torn_at
        if last is not None:
            self._note_size = last.checkpoint.size
        return last

    def _drop_first_start(self, path: Path, truncations: list[_Truncation]) -> bool:
        """Remove a log's only segment if it holds nothing but a first start that stopped
        before its first checkpoint record was written (so nothing was ever signed), and
        start the log again; else False."""
        with open(open_regular(path), "rb") as f:
            data = f.read(4 * MAX_RECORD_BYTES + 1)
        if len(data) > 4 * MAX_RECORD_BYTES:
            return False
        for line in data.split(b"\n")[:-1]:  # (complete lines; the last may be torn)
            try:
                event = decode(line).get("event")
            except ValueError:
                return False
            if event not in _FIRST_START:
                return False
        truncations.append(_Truncation(path.name, 0, data))
        _say("warning", "audit_segment_removed", segment=path.name, bytes=len(data))
        path.unlink()
        self._files.fsync_dir(self._dir)
        return True

    def _drop_empty_tail(
        self, segs: list[tuple[int, Path]], truncations: list[_Truncation]
    ) -> list[tuple[int, Path]]:
        """Remove a last segment without one complete line (a crash right after rotation)."""
        while segs:
            path = segs[-1][1]
            with open(open_regular(path), "rb") as f:
                head = f.read(MAX_RECORD_BYTES + 2)
            if b"\n" in head or len(head) > MAX_RECORD_BYTES + 1:
                break
            if head:
                truncations.append(_Truncation(path.name, 0, head))
            _say("warning", "audit_segment_removed", segment=path.name, bytes=len(head))
            path.unlink()
            self._files.fsync_dir(self._dir)
            segs = segs[:-1]
        return segs


def _first_idx(path: Path) -> int:
    """The index of a segment's first record (0 if unreadable: replay then starts earlier)."""
    for line in iter_lines(path):
        with contextlib.suppress(ValueError):
            idx = decode(line.data).get("idx")
            if isinstance(idx, int):
                return idx
        break
    return 0


def _truncation_record(t: _Truncation) -> Draft:
    _say("warning", "audit_tail_truncated", file=t.file, offset=t.offset, bytes=len(t.removed))
    return draft(
        "audit.tail_truncated",
        subject=SELF,
        result="info",
        reason="TORN_WRITE",
        detail={
            "file": t.file,
            "offset": t.offset,
            "bytes": len(t.removed),
            "sha256": hashlib.sha256(t.removed).hexdigest(),
        },
    )

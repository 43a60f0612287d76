"""Export an audit log to a SIEM as RFC 5424 syslog, over TCP (RFC 6587 octet counting) or UDP.

The exporter is a separate reader of the log files. It takes no lock and never
writes into the log directory, so it cannot block or slow the writer, and a SIEM
outage never touches the local audit trail (AU-5, AU-9(2)). It follows the
segments as they grow, exports complete lines only, and keeps its position in a
cursor file in its own state directory.

Message (one per record)::

    <PRI>1 TIMESTAMP HOSTNAME ferry - EVENT [ferry@32473 origin=".." idx=".." event=".."
    result=".." item=".." channel=".." subject=".."] {the record line, byte for byte}

PRI is facility (default 13, "log audit") x 8 + a severity from the result
(:func:`severity`); TIMESTAMP is the record's own ``ts``; MSGID is the event;
the message is the exact record line, so a SIEM can recompute its leaf hash.
32473 is the private enterprise number RFC 5612 reserves for documentation:
ferry has none of its own, and the SD-ID is only a namespace.

Delivery is **at least once** over TCP: the cursor advances past a record only
once the peer's TCP stack has acknowledged all of its bytes (Linux ``SIOCOUTQ``
reports the bytes sent but not yet acknowledged). After an outage, reconnecting
resumes at the cursor: records that were written to the socket but not
acknowledged are sent again, in order. A record can therefore arrive twice
(after a crash of the exporter, or when the SIEM's stack acknowledged bytes its
application never read); ``origin`` and ``idx`` identify duplicates. UDP
(RFC 5426) has no acknowledgement: the exporter notices a refused datagram only
when the host reports it (ICMP port unreachable, which loopback does at once),
and otherwise a lost datagram stays lost; prefer TCP.

The cursor also holds the leaf hash of the last exported record; on resuming,
the next record's ``prev`` must equal it, so a log replaced behind the
exporter's back is refused (:class:`CursorMismatch`) rather than exported from
the middle.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import struct
import termios
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from ferry import log
from ferry.audit.merkle import leaf_hash
from ferry.audit.record import MAX_RECORD_BYTES
from ferry.audit.segments import segment_name
from ferry.audit.timeline import item_of, safe, subject_label
from ferry.errors import FerryError, UsageError

_log = log.get("audit.export")

SD_ID = "ferry@32473"  # RFC 5612 documentation PEN; see the module docstring
APP_NAME = "ferry"
DEFAULT_FACILITY = 13  # "log audit" (RFC 5424 table 1)
MAX_UDP_PAYLOAD = 65507  # IPv4 UDP payload limit; a record is at most 16 KiB anyway
# Severities by result, raised for the events that need a person (RFC 5424 table 2).
SEVERITY_BY_RESULT = {"success": 6, "info": 6, "rejected": 5, "failure": 4}
SEVERITY_BY_EVENT = {
    "audit.witness_inconsistent": 2,  # critical: the outside log forked or was rewritten
    "audit.outage": 3,
    "audit.tail_truncated": 3,
    "agent.abnormal_termination": 3,
    "link.params_mismatch": 3,
    "api.auth_failed": 4,
}
_HOSTNAME_OK = re.compile(r"[!-~]{1,255}")  # PRINTUSASCII


class CursorMismatch(FerryError):
    """The cursor does not fit the log (another log, or records changed): refuse to export."""


def severity(event: str, result: str) -> int:
    return SEVERITY_BY_EVENT.get(event, SEVERITY_BY_RESULT.get(result, 5))


def _sd_value(value: object) -> bytes:
    """A PARAM-VALUE: UTF-8, with ``"``, ``\\`` and ``]`` escaped (RFC 5424 6.3.3)."""
    text = safe(value)
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")
    return text.encode("utf-8")


def format_message(
    line: bytes, *, hostname: str, origin: str, facility: int = DEFAULT_FACILITY
) -> bytes:
    """The RFC 5424 message for one record line (without framing)."""
    try:
        rec: Any = json.loads(line)
        if not isinstance(rec, dict):
            raise ValueError("not an object")
        event = str(rec.get("event", "-"))
        result = str(rec.get("result", "-"))
        ts = str(rec.get("ts", "-"))
        params: dict[str, object] = {"origin": origin, "idx": rec.get("idx"), "event": event}
        params["result"] = result
        item = item_of(rec) if isinstance(rec.get("object", {}), dict) else None
        if item:
            params["item"] = item
        obj = rec.get("object")
        if isinstance(obj, dict) and isinstance(obj.get("items"), list):
            params["items"] = len(obj["items"])  # a batch record: the ids are in the JSON
        if isinstance(obj, dict) and isinstance(obj.get("channel"), str):
            params["channel"] = obj["channel"]
        if isinstance(rec.get("subject"), dict):
            params["subject"] = subject_label(rec["subject"])
        sev = severity(event, result)
    except (ValueError, RecursionError, TypeError, KeyError):
        event, ts, sev = "-", "-", 3
        params = {"origin": origin, "malformed": 1}
    msgid = event if re.fullmatch(r"[!-~]{1,32}", event) else "-"
    if not re.fullmatch(r"[0-9T:.Z-]{20,32}", ts):
        ts = "-"
    sd = (
        b"["
        + SD_ID.encode()
        + b"".join(
            b" " + k.encode() + b'="' + _sd_value(v) + b'"'
            for k, v in params.items()
            if v is not None
        )
        + b"]"
    )
    head = f"<{facility * 8 + sev}>1 {ts} {hostname} {APP_NAME} - {msgid} ".encode("ascii")
    return head + sd + b" " + line


def frame_octet_counting(msg: bytes) -> bytes:
    """RFC 6587 3.4.1: ``MSG-LEN SP SYSLOG-MSG``."""
    return b"%d %b" % (len(msg), msg)


@dataclass(frozen=True)
class Destination:
    """Where to send: ``tcp://HOST:PORT`` or ``udp://HOST:PORT``."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        parts = urlsplit(text)
        if parts.scheme not in ("tcp", "udp") or not parts.hostname or parts.path not in ("", "/"):
            raise UsageError(f"--syslog wants tcp://HOST:PORT or udp://HOST:PORT, not {text!r}")
        try:
            port = parts.port
        except ValueError as exc:
            raise UsageError(f"--syslog: bad port in {text!r}") from exc
        if port is None:
            port = 514 if parts.scheme == "udp" else 601  # RFC 5426 / RFC 3195 ports
        return cls(parts.scheme, parts.hostname, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def cursor_name(self) -> str:
        digest = hashlib.sha256(str(self).encode()).hexdigest()[:12]
        return f"siem-{self.scheme}-{digest}.cursor.json"


@dataclass
class Position:
    """The next record to export: its index, segment and byte offset, and the prior leaf."""

    idx: int = 0
    segment: int = 1
    offset: int = 0
    prev: str = "0" * 64  # leaf hash (hex) of the record before ``idx``

    def to_json(self) -> dict[str, Any]:
        return {"idx": self.idx, "segment": self.segment, "offset": self.offset, "prev": self.prev}


class Cursor:
    """The committed position, in ``state_dir`` (written atomically: temp file, fsync, rename)."""

    def __init__(self, path: Path, log_dir: Path, destination: Destination) -> None:
        self.path = path
        self.log_dir = log_dir
        self.destination = destination

    def load(self) -> Position:
        try:
            data = json.loads(self.path.read_bytes()[:4096])
            pos = data["next"]
            return Position(int(pos["idx"]), int(pos["segment"]), int(pos["offset"]), pos["prev"])
        except FileNotFoundError:
            return Position()
        except (ValueError, KeyError, TypeError) as exc:
            raise CursorMismatch(f"{self.path}: unreadable cursor: {exc}") from exc

    def save(self, pos: Position) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        doc = {
            "log": str(self.log_dir),
            "destination": str(self.destination),
            "next": pos.to_json(),
            "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(doc, indent=1).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)


# fsync(2) errors that mean there is nothing this reader could flush: a file system that
# does not sync (EINVAL) or is read-only.
_NOTHING_TO_SYNC = frozenset({errno.EINVAL, errno.EROFS})


class Follower:
    """Complete record lines of a log directory from a position, following new segments."""

    def __init__(
        self, directory: Path, pos: Position, durable: Callable[[], int] | None = None
    ) -> None:
        """``durable()``: how many records of the log are on disk (the writer's
        :attr:`AuditLog.durable_size`, when it runs in this process): none past them is
        read, so none a power cut could still take back leaves the host. Without it (a
        reader in a process of its own cannot ask the writer), the follower makes the
        lines durable itself before it returns them: one fsync of the segment it reads
        covers every byte written before it, so a line read before that fsync is on disk
        after it."""
        self.dir = directory
        self._durable = durable
        self.pos = Position(pos.idx, pos.segment, pos.offset, pos.prev)
        self._file: IO[bytes] | None = None
        self._file_seg = 0
        self._file_synced = 0  # (the open segment's bytes known to be on disk)
        self._checked = False  # the first line read after a seek matches pos.prev

    def seek(self, pos: Position) -> None:
        self.pos = Position(pos.idx, pos.segment, pos.offset, pos.prev)
        self._checked = False

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self) -> IO[bytes] | None:
        if self._file is not None and self._file_seg == self.pos.segment:
            return self._file
        self.close()
        try:
            self._file = (self.dir / segment_name(self.pos.segment)).open("rb")
        except FileNotFoundError:
            return None
        self._file_seg = self.pos.segment
        self._file_synced = 0
        return self._file

    def _on_disk(self, f: IO[bytes], end: int) -> bool:
        """Are the open segment's first ``end`` bytes on disk? Synced here when not known
        to be (an error, e.g. EIO, is raised: nothing unsynced is exported)."""
        if self._durable is not None or end <= self._file_synced:
            return True
        size = os.fstat(f.fileno()).st_size
        try:
            os.fsync(f.fileno())
        except OSError as exc:
            if exc.errno not in _NOTHING_TO_SYNC:
                raise
        self._file_synced = size
        return end <= size

    def read(self, limit: int) -> list[tuple[bytes, Position]]:
        """Up to ``limit`` new lines, each with the position after it."""
        out: list[tuple[bytes, Position]] = []
        if self._durable is not None:
            limit = min(limit, self._durable() - self.pos.idx)
        while len(out) < limit:
            f = self._open()
            if f is None:
                if self.pos.idx == 0 and self.pos.offset == 0 and not self.dir.is_dir():
                    raise UsageError(f"{self.dir}: no such audit log directory")
                break
            f.seek(self.pos.offset)
            raw = f.readline(MAX_RECORD_BYTES + 2)
            if raw.endswith(b"\n"):
                if not self._on_disk(f, self.pos.offset + len(raw)):
                    break  # (cut back by the writer meanwhile: read again next time)
                self._take(raw, out)
                continue
            if len(raw) > MAX_RECORD_BYTES:
                raise CursorMismatch(
                    f"{segment_name(self.pos.segment)} byte {self.pos.offset}: "
                    f"a line longer than {MAX_RECORD_BYTES} bytes; run ferry audit verify"
                )
            # End of this segment's complete lines: move on only once the next one
            # exists (the writer finishes a segment before it creates the next).
            nxt = self.dir / segment_name(self.pos.segment + 1)
            if raw or not nxt.exists():
                break
            f.seek(self.pos.offset)
            if f.readline(MAX_RECORD_BYTES + 2):  # written just before the rotation
                continue
            self.pos = Position(self.pos.idx, self.pos.segment + 1, 0, self.pos.prev)
        return out

    def _take(self, raw: bytes, out: list[tuple[bytes, Position]]) -> None:
        line = raw[:-1]
        if not self._checked:
            self._check(line)
        leaf = leaf_hash(line).hex()
        self.pos = Position(self.pos.idx + 1, self.pos.segment, self.pos.offset + len(raw), leaf)
        out.append((line, Position(self.pos.idx, self.pos.segment, self.pos.offset, leaf)))

    def _check(self, line: bytes) -> None:
        where = f"{self.dir / segment_name(self.pos.segment)} byte {self.pos.offset}"
        advice = (
            "the log is not the one exported so far (verify it; remove the cursor file to "
            "export it from the start)"
        )
        try:
            rec = json.loads(line)
            idx, prev = rec["idx"], rec["prev"]
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise CursorMismatch(
                f"{where}: no audit record where the cursor points: {advice}"
            ) from exc
        if idx != self.pos.idx or prev != self.pos.prev:
            raise CursorMismatch(
                f"{where}: the cursor expects record {self.pos.idx} following leaf "
                f"{self.pos.prev[:16]}..., found record {idx}: {advice}"
            )
        self._checked = True


def _outq(sock: socket.socket) -> int:
    """Bytes written to a TCP socket that the peer has not acknowledged yet (Linux SIOCOUTQ)."""
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    value: int = struct.unpack("i", raw)[0]
    return value


@dataclass(frozen=True)
class ExportOptions:
    hostname: str | None = None  # default: this host's name
    facility: int = DEFAULT_FACILITY
    batch: int = 500  # records per read
    poll: float = 0.5  # seconds between looks at the log when idle
    backoff_min: float = 0.2  # seconds before the first retry after a failure
    backoff_max: float = 30.0
    connect_timeout: float = 5.0
    ack_wait: float = 2.0  # seconds to wait for TCP acknowledgements before idling
    save_interval: float = 1.0  # seconds between cursor writes while busy


class Exporter:
    """Follow one audit log and send every record to one syslog destination, in order."""

    def __init__(
        self,
        log_dir: Path,
        destination: Destination,
        state_dir: Path,
        *,
        origin: str | None = None,
        options: ExportOptions | None = None,
        on_exported: Callable[[int, int], None] | None = None,
        durable: Callable[[], int] | None = None,
    ) -> None:
        """``durable``: see :class:`Follower`."""
        self.log_dir = Path(log_dir)
        self.dest = destination
        self.opts = options or ExportOptions()
        if not 0 <= self.opts.facility <= 23:
            raise UsageError("syslog facility must be 0..23")
        host = self.opts.hostname or socket.gethostname()
        self.hostname = host if _HOSTNAME_OK.fullmatch(host) else "-"
        self.origin = origin or str(self.log_dir)
        self.cursor = Cursor(Path(state_dir) / destination.cursor_name(), self.log_dir, destination)
        self.committed = self.cursor.load()
        self.follower = Follower(self.log_dir, self.committed, durable)
        #: Called with (first idx, last idx) of each range whose export is committed;
        #: the agent can record ``audit.exported`` with it (the exporter never writes the log).
        self.on_exported = on_exported
        self.exported = 0  # records committed by this exporter
        self.failures = 0
        self.last_error: str | None = None
        self._sock: socket.socket | None = None
        self._sent = 0  # bytes written on the current TCP connection
        self._unacked: deque[tuple[int, Position]] = deque()  # (end byte, position after)
        self._saved_idx = self.committed.idx
        self._saved_at = time.monotonic()
        self._backoff = self.opts.backoff_min

    # --- connection -------------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        kind = socket.SOCK_STREAM if self.dest.scheme == "tcp" else socket.SOCK_DGRAM
        family, _, _, _, addr = socket.getaddrinfo(self.dest.host, self.dest.port, 0, kind)[0]
        sock = socket.socket(family, kind)
        try:
            sock.settimeout(self.opts.connect_timeout)
            sock.connect(addr)
        except OSError:
            sock.close()
            raise
        self._sock, self._sent = sock, 0
        self._unacked.clear()
        _log.info("siem_connected", destination=str(self.dest), next_idx=self.committed.idx)
        return sock

    def _disconnect(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        self._unacked.clear()

    def _peer_closed(self, sock: socket.socket) -> bool:
        """Did a TCP peer close or reset (a syslog receiver never sends anything)?"""
        timeout = sock.gettimeout()
        sock.setblocking(False)  # a socket timeout would make recv wait for data
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return False
        except OSError:
            return True
        finally:
            sock.settimeout(timeout)
        return not data  # anything a receiver sends is read and ignored

    # --- sending ----------------------------------------------------------------------------

    def _send(self, lines: list[tuple[bytes, Position]]) -> None:
        sock = self._connect()
        if self.dest.scheme == "tcp":
            if self._peer_closed(sock):
                raise ConnectionResetError(errno.ECONNRESET, "the syslog receiver closed")
            data = bytearray()
            for line, after in lines:
                msg = format_message(
                    line, hostname=self.hostname, origin=self.origin, facility=self.opts.facility
                )
                data += frame_octet_counting(msg)
                self._unacked.append((self._sent + len(data), after))
            sock.settimeout(self.opts.connect_timeout)
            sock.sendall(data)
            self._sent += len(data)
            self._settle_acks()
            return
        for line, after in lines:
            msg = format_message(
                line, hostname=self.hostname, origin=self.origin, facility=self.opts.facility
            )
            sock.send(msg[:MAX_UDP_PAYLOAD])
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            self._commit(after)

    def _settle_acks(self, wait: float = 0.0) -> bool:
        """Commit every record whose bytes the peer acknowledged; True when none is pending."""
        sock = self._sock
        deadline = time.monotonic() + wait
        while sock is not None and self._unacked:
            acked = self._sent - _outq(sock)
            last = None
            while self._unacked and self._unacked[0][0] <= acked:
                last = self._unacked.popleft()[1]
            if last is not None:
                self._commit(last)
            if not self._unacked or time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        return not self._unacked

    def _commit(self, pos: Position) -> None:
        first = self.committed.idx
        self.committed = pos
        self.exported += pos.idx - first
        if self.on_exported is not None and pos.idx > first:
            self.on_exported(first, pos.idx - 1)
        if time.monotonic() - self._saved_at >= self.opts.save_interval:
            self.save()

    def save(self) -> None:
        """Write the cursor if it moved."""
        if self.committed.idx != self._saved_idx:
            self.cursor.save(self.committed)
            self._saved_idx = self.committed.idx
        self._saved_at = time.monotonic()

    # --- loop -------------------------------------------------------------------------------

    def step(self) -> int:
        """Send what is new (up to one batch); return the number of records sent."""
        lines = self.follower.read(self.opts.batch)
        if lines:
            self._send(lines)
        elif self._sock is not None and self.dest.scheme == "tcp":
            self._settle_acks(self.opts.ack_wait)
            if self._unacked and self._peer_closed(self._sock):
                raise ConnectionResetError(errno.ECONNRESET, "the syslog receiver closed")
        return len(lines)

    def _failed(self, exc: OSError) -> None:
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        _log.warning(
            "siem_unreachable",
            destination=str(self.dest),
            error=self.last_error,
            next_idx=self.committed.idx,
            retry_in=round(self._backoff, 2),
        )
        if self._sock is not None and self.dest.scheme == "tcp":
            with contextlib.suppress(OSError):  # keep what the peer did acknowledge
                self._settle_acks()
        self._disconnect()
        self.follower.seek(self.committed)  # resend whatever was not acknowledged

    @property
    def pending(self) -> bool:
        """Records read but not yet acknowledged."""
        return bool(self._unacked) or self.follower.pos.idx != self.committed.idx

    def run(
        self, stop: threading.Event, *, once: bool = False, timeout: float | None = None
    ) -> bool:
        """Export until ``stop`` is set (``once``: until all complete lines are acknowledged).

        Returns True when everything read was exported (always, unless ``once``
        ran out of ``timeout`` seconds or ``stop`` came first with records pending).
        Raises :class:`CursorMismatch` if the log does not fit the cursor.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not stop.is_set():
                try:
                    sent = self.step()
                    self._backoff = self.opts.backoff_min
                except OSError as exc:
                    self._failed(exc)
                    wait = self._backoff
                    self._backoff = min(self._backoff * 2, self.opts.backoff_max)
                    if deadline is not None:
                        wait = min(wait, max(0.0, deadline - time.monotonic()))
                    stop.wait(wait)
                    sent = -1
                if sent == 0:
                    self.save()
                    if once and not self.pending:
                        return True
                    if not once:
                        stop.wait(self.opts.poll)
                if deadline is not None and time.monotonic() >= deadline:
                    return sent == 0 and not self.pending
            return not self.pending
        finally:
            self.save()
            self._disconnect()
            self.follower.close()

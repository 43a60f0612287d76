"""Ship the outside's audit log across the diode, so the inside keeps a verified mirror.

Every ``interval`` seconds :meth:`AuditShipper.step` reads what was appended to the audit
segments and to ``checkpoints.log`` since the last piece it spooled, cut at a line (a
segment) or at a note (the checkpoints), and spools it as one object of kind ``audit`` on
channel ``_audit``. The manifest names the file and the byte offset (``audit-000001.jsonl@4096``;
docs/PROTOCOL.md), so pieces are idempotent and the inside can put them in place. Pieces go
with the channel-independent repeat schedule ``repeat`` (several copies over a spread), the
same protection messages get. Shipping itself writes no audit records (no feedback loop):
the pieces are accounted for by the mirror and its checkpoints. The offsets shipped are kept
in ``<state>/audit-mirror.json`` (written after the piece is spooled: a crash re-ships a
piece, which the inside recognises).

Nothing tells the outside that both copies of a piece were lost (the inside records a
``link.sequence_gap`` on channel ``_audit`` and its mirror stops growing there). An operator
then asks for the log to be shipped again from a point: ``ferry outside mirror resend``
(:func:`request_resend`) leaves ``<state>/audit-mirror-resend.json``, which the shipper takes
at its next step (also at the agent's next start): every file from that piece on is shipped
again, in order, and the inside keeps what it already had (a repeat copy must match it byte for
byte) and fills its gap. The request is recorded as ``audit.resend``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ferry import log
from ferry.audit.files import open_regular
from ferry.audit.segments import (
    CHECKPOINTS_FILE,
    PIECE_NAME,
    list_segments,
    segment_name,
    segment_number,
)
from ferry.crypto.keys import SecretKey
from ferry.errors import UsageError
from ferry.wire import records as rec
from ferry.wire.sender import build_trailer
from outside.spool import Spool, SpoolItem, now_us

CHANNEL = rec.AUDIT_CHANNEL
# Largest piece: one FEC block, taken in memory inside (its 256 KiB limit).
MAX_PIECE = 128 * 1024
# Pieces spooled per step at most (a long backlog drains over several steps).
MAX_PIECES_PER_STEP = 64
STATE_FILE = "audit-mirror.json"
RESEND_FILE = "audit-mirror-resend.json"
MAX_RESEND_BYTES = 4096
FIRST_PIECE = f"{segment_name(1)}@0"

_log = log.get("outside.mirror")


def _cut(data: bytes, sep: bytes) -> int:
    """Length of the prefix of ``data`` that ends at the last ``sep`` (0 if none)."""
    at = data.rfind(sep)
    return 0 if at < 0 else at + len(sep)


SIGNATURE_LINE = "\u2014 ".encode()


def _cut_notes(data: bytes) -> int:
    """Length of the prefix of ``data`` that holds whole checkpoint notes: each ends with a
    signature line ("— name sig") and a blank line."""
    end = len(data)
    while (at := data.rfind(b"\n\n", 0, end)) >= 0:
        start = data.rfind(b"\n", 0, at) + 1
        if data.startswith(SIGNATURE_LINE, start):
            return at + 2
        end = at
    return 0


def _write_json(path: Path, doc: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parse_piece(name: str) -> tuple[str, int]:
    """``"audit-000003.jsonl@40960"`` as (file, offset); UsageError if it is not one."""
    m = PIECE_NAME.fullmatch(name)
    if m is None:
        raise UsageError(
            f"not a place in the audit log: {name[:80]!r} (expected FILE@OFFSET, e.g. "
            f"{FIRST_PIECE} or checkpoints.log@0)"
        )
    return m.group(1), int(m.group(2))


def request_resend(state_dir: Path, start: str | None = None) -> dict[str, Any]:
    """Ask the outside agent to ship its audit log again from ``start`` (FILE@OFFSET; the
    first segment's start by default); returns the request. A request already waiting is
    replaced."""
    start = FIRST_PIECE if start is None else start
    parse_piece(start)
    doc = {
        "version": 1,
        "from": start,
        "requested_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    _write_json(state_dir / RESEND_FILE, doc)
    return doc


def pending_resend(state_dir: Path) -> dict[str, Any] | None:
    """The request waiting for the agent, if any (as written; not checked)."""
    try:
        with open(state_dir / RESEND_FILE, "rb") as f:
            doc = json.loads(f.read(MAX_RESEND_BYTES))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


class AuditShipper:
    def __init__(
        self,
        audit_dir: Path,
        spool: Spool,
        key: SecretKey,
        state_dir: Path,
        *,
        interval: float = 1.0,
        copies: int = 2,
        spread: float = 30.0,
        max_piece: int = MAX_PIECE,
        on_resend: Callable[[str, str | None], None] | None = None,
        durable_bytes: Callable[[int | None], int | None] | None = None,
    ) -> None:
        """``on_resend(start, error)``: a resend request was taken from ``start``, or
        refused (``error``). ``durable_bytes(segment number, or None for the checkpoints
        file)``: how much of that file is on disk (:meth:`AuditLog.durable_bytes`, None:
        all): nothing past it is shipped, so a power cut cannot take back bytes the mirror
        already holds (the log would then go on with other bytes at those offsets)."""
        self._durable_bytes = durable_bytes
        self.max_piece = max(16 * 1024 + 64, max_piece)  # a whole record always fits
        self.audit_dir = audit_dir
        self.spool = spool
        self.key = key
        self.interval = interval
        self.copies = copies
        self.spread_us = int(spread * 1e6)
        self._state_path = state_dir / STATE_FILE
        self._resend_path = state_dir / RESEND_FILE
        self._on_resend = on_resend
        self._next = 0.0
        self.shipped: dict[str, int] = self._load()
        self.pieces = 0

    def _load(self) -> dict[str, int]:
        try:
            raw = json.loads(self._state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            _log.error("mirror_state_unreadable", path=str(self._state_path), error=str(exc))
            return {}  # ship everything again: the inside skips what it has
        return {str(k): int(v) for k, v in raw.items() if isinstance(v, int) and v >= 0}

    def _save(self) -> None:
        _write_json(self._state_path, self.shipped)

    def _take_resend(self) -> None:
        """Apply a resend request waiting in the state folder, then remove it."""
        try:
            with open(self._resend_path, "rb") as f:
                raw = f.read(MAX_RESEND_BYTES + 1)
        except FileNotFoundError:
            return
        start: str | None = None
        try:
            if len(raw) > MAX_RESEND_BYTES:
                raise ValueError(f"larger than {MAX_RESEND_BYTES} bytes")
            doc = json.loads(raw)
            start = doc.get("from") if isinstance(doc, dict) else None
            if not isinstance(start, str):
                raise ValueError("no 'from' place")
            file, offset = parse_piece(start)
        except (ValueError, UsageError) as exc:
            error = str(exc)[:200]
            _log.error("mirror_resend_refused", path=str(self._resend_path), error=error)
            self._resend_path.unlink(missing_ok=True)
            if self._on_resend is not None:
                self._on_resend(start[:80] if isinstance(start, str) else "", error)
            return
        number = segment_number(file)
        for name in list(self.shipped):
            later = number is not None and (segment_number(name) or 0) > number
            if (name == CHECKPOINTS_FILE and file != CHECKPOINTS_FILE) or later:
                self.shipped[name] = 0
            elif name == file:
                self.shipped[name] = min(self.shipped[name], offset)
        self._save()
        self._resend_path.unlink()
        _log.warning("mirror_resend", start=start)
        if self._on_resend is not None:
            self._on_resend(start, None)

    def step(self, mono: float | None = None) -> list[SpoolItem]:
        """Spool what is new (at most every ``interval`` s); return the new items."""
        mono = time.monotonic() if mono is None else mono
        if mono < self._next:
            return []
        self._next = mono + self.interval
        self._take_resend()
        items: list[tuple[SpoolItem, bytes]] = []
        before = dict(self.shipped)
        first_seq = self.spool.next_seq(CHANNEL)  # (this thread alone numbers the channel)
        try:
            segments = list_segments(self.audit_dir)
            for i, (number, path) in enumerate(segments):
                name = segment_name(number)
                last = i == len(segments) - 1
                self._ship_file(path, name, b"\n", items, first_seq, segment=number)
                if not last and self.shipped.get(name, 0) < path.stat().st_size:
                    break  # an older segment still has bytes to go: keep the order
                if len(items) >= MAX_PIECES_PER_STEP:
                    break
            else:  # the checkpoints after the records they cover
                checkpoints = self.audit_dir / CHECKPOINTS_FILE
                self._ship_file(
                    checkpoints, CHECKPOINTS_FILE, b"\n\n", items, first_seq, segment=None
                )
            if items:  # one transaction for the whole step
                self.spool.add_blobs(items, "component:audit-mirror", self.spread_us)
        except BaseException:
            self.shipped = before  # nothing spooled: the same pieces go next time
            raise
        if items:  # then where the mirror got to
            self.pieces += len(items)
            self._save()
        return [item for item, _ in items]

    def _ship_file(
        self,
        path: Path,
        name: str,
        sep: bytes,
        items: list[tuple[SpoolItem, bytes]],
        first_seq: int,
        *,
        segment: int | None,
    ) -> None:
        offset = self.shipped.get(name, 0)
        try:  # (UnsafeFile, not a hang, for a FIFO in the file's place)
            fd = open_regular(path)
        except FileNotFoundError:
            return
        try:
            size = os.fstat(fd).st_size
            durable = None if self._durable_bytes is None else self._durable_bytes(segment)
            if durable is not None:
                size = min(size, durable)
            while offset < size and len(items) < MAX_PIECES_PER_STEP:
                data = os.pread(fd, min(self.max_piece, size - offset), offset)
                n = _cut_notes(data) if sep == b"\n\n" else _cut(data, sep)
                if n == 0:
                    if len(data) >= self.max_piece:  # cannot happen with valid records (16 KiB max)
                        n = len(data)
                    else:
                        break  # an incomplete line: it is shipped once complete
                items.append(self._piece(name, offset, data[:n], first_seq + len(items)))
                offset += n
                self.shipped[name] = offset
        finally:
            os.close(fd)

    def _piece(self, name: str, offset: int, content: bytes, seq: int) -> tuple[SpoolItem, bytes]:
        object_id = os.urandom(16)
        created = now_us()
        sha = hashlib.sha256(content).digest()
        manifest = rec.Manifest(
            object_id=object_id,
            kind="audit",
            channel=CHANNEL,
            seq=seq,
            name=f"{name}@{offset}",
            media_type="application/x-ndjson",
            size=len(content),
            sha256=sha,
            created_us=created,
            mtime_us=created,
            sender=self.key.public.key_id,
            subject="component:audit-mirror",
        )
        stream = content + build_trailer(manifest, self.key)
        item = SpoolItem(
            object_id,
            CHANNEL,
            seq,
            manifest.name,
            len(content),
            len(stream),
            None,
            kind="audit",
            priority=0,
            data=stream,
            sends_total=self.copies,
        )
        return item, sha

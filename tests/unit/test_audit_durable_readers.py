"""Readers of an audit log in the writer's process (the audit shipper to the inside's mirror,
the SIEM export) take only what the writer has synced: bytes a power cut could still take
back never leave the host. Real audit logs and files; the disk's fsync is held back. A reader
in a process of its own (``ferry audit export --log``) syncs what it reads itself."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest

from ferry.audit.log import AuditLog, AuditSettings, FileOps
from ferry.audit.record import Subject
from ferry.audit.segments import list_segments
from ferry.audit.siem import Follower, Position
from ferry.crypto.keys import SecretKey
from outside.mirror import AuditShipper
from outside.spool import Spool

KEY = SecretKey("ed25519", bytes(range(32)))


class _HeldSync(FileOps):
    """fsync waits while ``hold`` is set (``waiting`` says one does), as a slow disk would:
    the records are written to the segment, but not on disk yet."""

    def __init__(self) -> None:
        self.hold, self.waiting, self.release = (
            threading.Event(),
            threading.Event(),
            threading.Event(),
        )

    def fsync(self, fd: int) -> None:
        if self.hold.is_set():
            self.waiting.set()
            self.release.wait(10)
        super().fsync(fd)


def _append(log: AuditLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        log.append("transfer.sent", subject=Subject.component("sender"), obj={"item": f"{i:032x}"})


def _lines(path: Path) -> list[bytes]:
    return [
        line for seg in sorted(path.glob("audit-*.jsonl")) for line in seg.read_bytes().splitlines()
    ]


def test_the_shipper_takes_only_what_is_on_disk(tmp_path: Path) -> None:
    """A piece shipped from bytes a power cut could still take back would splice the
    mirror: the log goes on with other bytes at those offsets. The shipper stops at what
    the log has synced."""
    files = _HeldSync()
    settings = AuditSettings(origin="test/outside", checkpoint_every=1000)
    log = AuditLog(tmp_path / "audit", SecretKey.generate("ed25519"), settings, files=files)
    state = tmp_path / "outside-state"
    state.mkdir()
    spool = Spool(state)

    def append(n: int) -> int:
        return log.append(
            "intake.accepted", subject=Subject.component("test"), obj={"item": f"{n:032x}"}
        )

    try:
        log.wait_durable(max(append(n) for n in range(20)))
        shipper = AuditShipper(
            log.directory, spool, SecretKey.generate("ed25519"), state,
            durable_bytes=log.durable_bytes,
        )  # fmt: skip
        (_, segment), *_ = list_segments(log.directory)
        synced = segment.stat().st_size
        shipped = shipper.step(mono=10.0)
        assert sum(i.size for i in shipped if i.name.startswith(segment.name)) == synced
        files.hold.set()
        last = append(20)
        assert files.waiting.wait(10)  # written, its fsync not done
        assert segment.stat().st_size > synced
        assert log.durable_bytes(1) == synced
        assert [i for i in shipper.step(mono=20.0) if i.name.startswith(segment.name)] == []
        files.release.set()
        log.wait_durable(last)
        (piece,) = [i for i in shipper.step(mono=30.0) if i.name.startswith(segment.name)]
        assert piece.name == f"{segment.name}@{synced}"
        assert piece.size == segment.stat().st_size - synced
    finally:
        files.release.set()
        log.close()
        spool.close()


def test_an_agent_exports_only_records_on_disk(tmp_path: Path) -> None:
    """Records a power cut could still take back never leave the host (the SIEM would hold
    records the log no longer has, and the cursor would then refuse the log)."""
    files = _HeldSync()
    settings = AuditSettings(origin="outside.test/audit", checkpoint_every=1000)
    log = AuditLog(tmp_path / "audit", KEY, settings, files=files)
    try:
        _append(log, 10)
        log.wait_durable(log.size - 1)
        synced = log.durable_size  # (the log's own records too)
        follower = Follower(tmp_path / "audit", Position(), lambda: log.durable_size)
        assert len(follower.read(100)) == synced
        files.hold.set()
        _append(log, 1, start=10)
        assert files.waiting.wait(10)  # written, not yet synced
        assert len(_lines(tmp_path / "audit")) == synced + 1
        assert follower.read(100) == []
        files.release.set()
        log.wait_durable(synced)
        [(line, pos)] = follower.read(100)
        assert json.loads(line)["object"]["item"] == f"{10:032x}"
        assert pos.idx == synced + 1
    finally:
        files.release.set()
        log.close()


def test_a_standalone_export_syncs_what_it_reads_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ferry audit export`` run as its own process cannot ask the writer what is on disk:
    each line it returns was covered by an fsync of its segment made after the line was
    read, and when that fsync fails, nothing is returned and the position stays (the
    exporter then retries as after a failure to send)."""
    files = _HeldSync()
    settings = AuditSettings(origin="outside.test/audit", checkpoint_every=1000)
    log = AuditLog(tmp_path / "audit", KEY, settings, files=files)
    synced: dict[int, int] = {}  # inode -> size when an fsync of it began
    failing = threading.Event()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        if failing.is_set():
            raise OSError(errno.EIO, "I/O error")
        real_fsync(fd)
        synced[st.st_ino] = max(synced.get(st.st_ino, 0), st.st_size)

    monkeypatch.setattr(os, "fsync", fsync)
    try:
        files.hold.set()  # the writer's own fsync waits: its lines are written, not synced
        _append(log, 5)
        assert files.waiting.wait(10)  # (the first records are written, their sync waits)
        follower = Follower(tmp_path / "audit", Position())
        first = follower.read(100)
        assert first
        assert [line for line, _ in first] == _lines(tmp_path / "audit")[: len(first)]
        segment = tmp_path / "audit" / "audit-000001.jsonl"
        assert synced[segment.stat().st_ino] >= first[-1][1].offset
        again = Follower(tmp_path / "audit", Position())  # (knows nothing synced yet)
        failing.set()
        with pytest.raises(OSError):
            again.read(100)
        assert again.pos == Position()
        failing.clear()
        assert [line for line, _ in again.read(100)] == [line for line, _ in first]
    finally:
        files.release.set()
        log.close()

"""verify reads checkpoints.log in passes, one note at a time (ferry.audit.files): what each
pass sees, what is left out past the bound on out-of-order notes, which keys are checked, and
what is left open when a read fails. Real logs written by the real writer, the real verify."""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ferry.audit import AuditLog, AuditSettings, AuditUnavailable, Subject, verify
from ferry.audit.files import MAX_UNORDERED_NOTES
from ferry.audit.log import FileOps
from ferry.audit.merkle import SIG_PREFIX, Checkpoint, Note, note_key_id, parse_notes
from ferry.audit.merkle import sign_checkpoint as sign
from ferry.crypto.keys import PublicKey, SecretKey

KEY = SecretKey("ed25519", bytes(range(32)))
OTHER = SecretKey("ed25519", bytes(range(1, 33)))
ORIGIN = "outside.test/audit"
SENDER = Subject.component("sender")
HANG = 20.0  # seconds
SETTINGS = AuditSettings(
    origin=ORIGIN, checkpoint_every=10, max_segment_bytes=4 * 16384, retry_interval=0.02
)


def write_log(path: Path, records: int, key: SecretKey = KEY) -> Path:
    with AuditLog(path, key, SETTINGS) as log:
        for i in range(records):
            log.append("link.heartbeat_gap", subject=SENDER, result="info", detail={"n": i})
    return path


def notes(path: Path) -> tuple[bytes, tuple[Note, ...]]:
    raw = (path / "checkpoints.log").read_bytes()
    return raw, parse_notes(raw).notes


def chunk(raw: bytes, note: Note) -> bytes:
    """A note as the writer stored it, with its blank line."""
    return raw[note.offset : note.end] + b"\n"


def codes(report: Any) -> list[str]:
    return [p.code for p in report.problems]


# --- a live log: the writer cuts a half-written note back during an outage -----------------


class HalfANoteThenFull(FileOps):
    """The disk fills up while a note is written: half of it goes to checkpoints.log, then
    ENOSPC; each of the writer's retries cuts the file back to its last durable byte."""

    def __init__(self) -> None:
        self.ckpt_fd = -1
        self.full = False
        self.half = False
        self.cut = threading.Event()

    def open_append(self, path: Path) -> int:
        fd = super().open_append(path)
        if path.name == "checkpoints.log":
            self.ckpt_fd = fd
        return fd

    def write(self, fd: int, data: memoryview) -> int:
        if self.full and fd == self.ckpt_fd:
            if not self.half:
                self.half = True
                return super().write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(fd, data)

    def truncate(self, fd: int, size: int) -> None:
        super().truncate(fd, size)
        if self.full and fd == self.ckpt_fd:
            self.cut.set()


def test_a_half_written_note_cut_back_during_verify_is_a_torn_note(tmp_path: Path) -> None:
    """verify read the half note in its first pass and, after the writer's retry cut it, not
    in the later ones: "checkpoints.log changed while it was being verified"
    (CHECKPOINT_MALFORMED) on a log nobody touched. The later passes now read the first
    pass's copy: the half note is CHECKPOINT_TORN, its record CHECKPOINT_PENDING, as when the
    notes were read once."""
    path = tmp_path / "audit"
    files = HalfANoteThenFull()
    log = AuditLog(path, KEY, replace(SETTINGS, retry_interval=0.3), files=files)
    waiting: threading.Thread | None = None
    try:
        for i in range(200):
            log.append("link.heartbeat_gap", subject=SENDER, result="info", detail={"n": i})
        log.checkpoint()
        durable = os.fstat(files.ckpt_fd).st_size
        files.full = True
        log.append("link.heartbeat_gap", subject=SENDER, result="info")

        def store() -> None:  # (the note waits for the disk, while the writer retries)
            with contextlib.suppress(AuditUnavailable):
                log.checkpoint(timeout=30)

        waiting = threading.Thread(target=store, daemon=True)
        waiting.start()
        for _ in range(2000):  # (the half note is written at once; 2 s at most)
            if (path / "checkpoints.log").stat().st_size != durable:
                break
            threading.Event().wait(0.001)
        files.cut.clear()
        # (verify waits at the first record until the retry has cut the half note off, as
        # a verify of a big log would be slow enough to)
        report = verify(path, KEY.public, on_record=lambda rec, covered: files.cut.wait(10))
        assert files.cut.is_set()
        assert (path / "checkpoints.log").stat().st_size == durable
    finally:
        files.full = False
        log.close()
        if waiting is not None:
            waiting.join(HANG)
    assert report.ok, report.problems
    assert {w.code for w in report.warnings} == {
        "CHECKPOINT_TORN",
        "CHECKPOINT_PENDING",
        "UNCOVERED_TAIL",
    }
    assert verify(path, KEY.public).verified  # (the writer recovered)


# --- more out-of-order notes than verify compares -----------------------------------------------


def not_compared(report: Any) -> list[tuple[str, str | None, int | None]]:
    return [
        (p.code, p.file, p.line)
        for p in report.problems
        if "not compared with the records" in p.message
    ]


def test_a_mismatch_past_the_out_of_order_bound_is_said_to_be_unchecked(tmp_path: Path) -> None:
    """After MAX_UNORDERED_NOTES copies of the first note (each out of order), a note with a
    wrong root is not compared with the records: its CHECKPOINT_MISMATCH is not found, and
    the report now says so, with how many notes were left out and where they start."""
    path = write_log(tmp_path / "audit", 200)
    raw, ns = notes(path)
    bogus = sign(Checkpoint(ORIGIN, ns[1].checkpoint.size, b"\1" * 32), OTHER) + b"\n"
    (path / "checkpoints.log").write_bytes(raw + chunk(raw, ns[0]) * MAX_UNORDERED_NOTES + bogus)
    report = verify(path, KEY.public)
    assert not report.ok
    assert "CHECKPOINT_MISMATCH" not in codes(report)
    line = raw.count(b"\n") + MAX_UNORDERED_NOTES * chunk(raw, ns[0]).count(b"\n") + 1
    assert not_compared(report) == [("CHECKPOINT_REGRESSION", "checkpoints.log", line)]
    (message,) = [p.message for p in report.problems if "not compared" in p.message]
    assert message.startswith(
        f"more than {MAX_UNORDERED_NOTES} checkpoints are smaller than one before them: "
        "1 more checkpoint was not compared with the records, from this line on"
    )


def test_an_announced_note_past_the_out_of_order_bound_is_not_missing(tmp_path: Path) -> None:
    """The genuine note of an announced size, moved behind MAX_UNORDERED_NOTES out-of-order
    notes, is in the file: it was a false CHECKPOINT_MISSING ("checkpoints were removed")."""
    path = write_log(tmp_path / "audit", 200)
    raw, ns = notes(path)
    moved = ns[5]
    rest = b"".join(chunk(raw, n) for n in ns if n is not moved)
    copies = chunk(raw, ns[0]) * MAX_UNORDERED_NOTES
    (path / "checkpoints.log").write_bytes(rest + copies + chunk(raw, moved))
    report = verify(path, KEY.public)
    assert "CHECKPOINT_MISSING" not in codes(report)
    assert set(codes(report)) == {"CHECKPOINT_REGRESSION"}
    assert len(not_compared(report)) == 1


def test_out_of_order_notes_within_the_bound_are_all_compared(tmp_path: Path) -> None:
    """(the bound itself: as many out-of-order notes as it allows say nothing more)"""
    path = write_log(tmp_path / "audit", 200)
    raw, ns = notes(path)
    extra = chunk(raw, ns[0]) * (MAX_UNORDERED_NOTES - 1) + chunk(raw, ns[5])
    (path / "checkpoints.log").write_bytes(raw + extra)
    report = verify(path, KEY.public)
    assert set(codes(report)) == {"CHECKPOINT_REGRESSION"}
    assert not not_compared(report)
    assert report.checkpoints_verified == len(ns) + MAX_UNORDERED_NOTES


# --- which keys are checked -------------------------------------------------------------------


def test_keys_nothing_trusts_are_never_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forged log (another key's) whose runs name made-up "earlier" keys, and notes full of
    signature lines with those keys' ids: verify with the real key checked every matched
    note against every key any audit.started names (a signature check each; 3.7 s against
    1 s for 300 such notes). Only keys that a trusted checkpoint hands over are checked."""
    forger = SecretKey("ed25519", b"\7" * 32)
    path = tmp_path / "audit"
    named: list[SecretKey] = []
    for run in range(5):
        earlier = [SecretKey("ed25519", bytes([run, j]) + b"\21" * 30) for j in range(3)]
        named += earlier
        with AuditLog(path, forger, SETTINGS, previous_keys=earlier) as log:
            log.append("link.heartbeat_gap", subject=SENDER, result="info", detail={"n": run})
    _, ns = notes(path)
    last = ns[-1].checkpoint
    lines = b"".join(
        SIG_PREFIX
        + ORIGIN.encode()
        + b" "
        + base64.b64encode(note_key_id(ORIGIN, k.public) + os.urandom(64))
        + b"\n"
        for k in named
    )
    with (path / "checkpoints.log").open("ab") as f:
        f.write((last.text() + b"\n" + lines + b"\n") * 20)
    untrusted = {k.public.key_id for k in (forger, *named)}
    checked: list[bytes] = []
    real = PublicKey.verify

    def counted(self: PublicKey, signature: bytes, data: bytes) -> bool:
        checked.append(self.key_id)
        return real(self, signature, data)

    monkeypatch.setattr(PublicKey, "verify", counted)
    report = verify(path, KEY.public)
    assert not report.ok
    assert set(codes(report)) == {"CHECKPOINT_UNSIGNED"}
    assert [k for k in checked if k in untrusted] == []
    # (given the forger's key, the handovers it signed are followed, as before)
    checked.clear()
    assert len(verify(path, forger.public).keys) == 1 + len(named)


# --- a read that fails ---------------------------------------------------------------------------


def open_note_files() -> int:
    """Descriptors of this process open on a checkpoints.log."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").endswith("/checkpoints.log")
        except OSError:
            continue
    return count


def failing_reads(monkeypatch: pytest.MonkeyPatch, after: int) -> list[int]:
    """os.pread of a checkpoints.log fails (EIO, a bad sector) on its ``after``-th read from
    the start of the file, and on none other. Returns the count of such reads, as they go."""
    real = os.pread
    starts: list[int] = []

    def pread(fd: int, n: int, offset: int) -> bytes:
        if offset == 0 and os.readlink(f"/proc/self/fd/{fd}").endswith("/checkpoints.log"):
            starts.append(fd)
            if len(starts) == after:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    return starts


def test_a_failed_read_of_the_notes_is_reported_and_leaves_nothing_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify raised the error and left checkpoints.log open (the first pass failed before
    the index that closes the file existed): one descriptor more at each verify."""
    path = write_log(tmp_path / "audit", 200)
    before = open_note_files()
    for _ in range(3):
        starts = failing_reads(monkeypatch, after=1)
        report = verify(path, KEY.public)
        assert len(starts) == 1
        assert report.problems[0].code == "FILE_UNREADABLE"
        assert report.problems[0].message == (
            "checkpoints.log could not be read: Input/output error: its checkpoints are not "
            "verified"
        )
        assert "CHECKPOINT_MISSING" not in codes(report)
    assert open_note_files() == before


def test_the_writer_leaves_nothing_open_when_its_replay_cannot_read_the_notes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reopening, the writer reads checkpoints.log, then replays the log's tail with verify's
    scan, which reads it again: that read fails. The log cannot be opened now (an outage,
    not a refused log), and no descriptor is left behind."""
    path = write_log(tmp_path / "audit", 200)
    before = open_note_files()
    starts = failing_reads(monkeypatch, after=2)
    with pytest.raises(AuditUnavailable, match="EIO"):
        AuditLog(path, KEY, SETTINGS)
    assert len(starts) == 2
    assert open_note_files() == before
    monkeypatch.undo()
    write_log(path, 1)  # (and it opens once the notes can be read)
    assert verify(path, KEY.public).verified


def test_verify_and_the_writer_need_no_temporary_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The passes over checkpoints.log read the log's own file: with TMPDIR gone (or full),
    a sound log verifies and its writer opens it. (A private copy in TMPDIR made verify
    report a sound log's checkpoints removed, and the agent fail to start.)"""
    log_dir = write_log(tmp_path / "audit", 40)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))  # (removed once chosen)
    before = len(os.listdir("/proc/self/fd"))
    report = verify(log_dir, KEY.public)
    assert report.ok, report.problems
    assert report.checkpoints_verified > 1
    log = AuditLog(log_dir, KEY, SETTINGS)
    log.append("transfer.sent", subject=SENDER, detail={"n": 41})
    log.close()
    assert verify(log_dir, KEY.public).ok
    assert len(os.listdir("/proc/self/fd")) == before

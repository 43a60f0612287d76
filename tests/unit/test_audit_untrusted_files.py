"""The audit log's files as an attacker leaves them: a checkpoints.log of many notes (read in
bounded memory), segments that are FIFOs, sockets or symbolic links (refused, never followed,
never blocking, never an uncaught error), a checkpoints.log that changes while it is
verified."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ferry.audit import (
    AuditError,
    AuditLog,
    AuditSettings,
    AuditUnavailable,
    Subject,
    timeline,
    verify,
)
from ferry.audit.files import UnsafeFile
from ferry.audit.merkle import parse_notes
from ferry.crypto.keys import SecretKey

KEY = SecretKey("ed25519", bytes(range(32)))
ORIGIN = "outside.test/audit"
SENDER = Subject.component("sender")
SETTINGS = AuditSettings(
    origin=ORIGIN,
    checkpoint_every=10,
    max_segment_bytes=4 * 16384,
    retry_interval=0.02,
)
HANG = 20.0  # seconds after which a call counts as hung
T = TypeVar("T")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "audit"
    with AuditLog(path, KEY, SETTINGS) as log:
        for i in range(700):
            log.append("link.heartbeat_gap", subject=SENDER, result="info", detail={"n": i})
    assert len(list(path.glob("audit-*.jsonl"))) >= 3
    return path


@pytest.fixture
def log_dir(pristine: Path, tmp_path: Path) -> Iterator[Path]:
    path = Path(shutil.copytree(pristine, tmp_path / "audit", symlinks=True))
    yield path
    release_fifos(path)


def release_fifos(path: Path) -> None:
    """Let a call blocked in opening a FIFO of ``path`` go on (after a failed test)."""
    for p in path.iterdir():
        if p.is_fifo():
            fd = os.open(p, os.O_RDWR | os.O_NONBLOCK)
            os.close(fd)


def within(call: Callable[[], T], seconds: float = HANG) -> T:
    """``call()``, failing the test if it has not returned after ``seconds`` (a hang)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001  # (re-raised in the test's thread)
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still running after {seconds} s: it hangs")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def segment(path: Path, n: int) -> Path:
    return path / f"audit-{n:06d}.jsonl"


def last_segment(path: Path) -> int:
    return len(list(path.glob("audit-*.jsonl")))


# --- a checkpoints.log of many notes -------------------------------------------------------

NOTES = 5000
MEMORY_BOUND = 1 << 20  # bytes: the notes cost about 5 MB when they were all kept


def add_notes(path: Path, count: int) -> None:
    """Append ``count`` well-formed notes of growing sizes with the log's origin and a bogus
    signature (what anyone can write, e.g. a compromised outside into the inside's mirror)."""
    root = base64.b64encode(b"\0" * 32)
    sig = f"\u2014 {ORIGIN} ".encode() + base64.b64encode(b"\0" * 68)
    note = ORIGIN.encode() + b"\n%d\n" + root + b"\n\n" + sig + b"\n\n"
    with (path / "checkpoints.log").open("ab") as f:
        f.write(b"".join(note % (100_000 + i) for i in range(count)))


def peak(call: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_verify_memory_does_not_grow_with_the_notes(log_dir: Path) -> None:
    """verify kept every parsed note (about 8 times the file's size); now it reads
    checkpoints.log note by note, in passes, and keeps a few counts."""
    add_notes(log_dir, NOTES)
    report: dict[str, Any] = {}
    used = peak(lambda: report.setdefault("r", verify(log_dir, KEY.public)))
    r = report["r"]
    assert r.checkpoints > NOTES
    assert {p.code for p in r.problems} == {"TRUNCATED", "CHECKPOINT_UNSIGNED"}
    assert used < MEMORY_BOUND, used


def test_the_writer_reads_many_notes_in_bounded_memory(log_dir: Path) -> None:
    """Opening a log, the writer checks every note but keeps only the last one."""
    add_notes(log_dir, NOTES)

    def reopen() -> None:
        with pytest.raises(AuditError, match="last checkpoint is not signed"):
            AuditLog(log_dir, KEY, SETTINGS)

    assert peak(reopen) < MEMORY_BOUND


def test_verify_memory_does_not_grow_with_the_checkpoint_records(tmp_path: Path) -> None:
    """verify kept every audit.checkpoint record it met (to look for its note at the end): a
    segment of them, which anyone can write, grew its memory without bound. With the notes
    removed, each of them is CHECKPOINT_MISSING."""
    path = tmp_path / "audit"
    every = AuditSettings(origin=ORIGIN, checkpoint_every=1)
    with AuditLog(path, KEY, every) as log:
        for _ in range(3000):
            log.append("link.heartbeat_gap", subject=SENDER, result="info")
    (path / "checkpoints.log").unlink()
    report: dict[str, Any] = {}
    used = peak(lambda: report.setdefault("r", verify(path, KEY.public)))
    problems = report["r"].problems
    assert [p.code for p in problems[:10]] == ["CHECKPOINT_MISSING"] * 10
    more = problems[-1].message.split()
    assert (more[:2], more[3:]) == (["...", "and"], ["more", "CHECKPOINT_MISSING"])
    assert int(more[2]) > 2990  # (3000, and those of the log's start and close)
    assert used < MEMORY_BOUND // 4, used  # (it was over 1 MB)


def test_a_checkpoints_file_changed_during_verify_is_reported(log_dir: Path) -> None:
    """The passes over checkpoints.log must read the same bytes up to the end of its last
    whole note: a change in between (here, one signature byte, not the last, whose base64
    has pad bits; while the records are scanned) is CHECKPOINT_MALFORMED, never a report of
    bytes no pass read whole. (A writer cutting a half-written note back during an outage
    changes nothing before that end: see test_audit_note_passes.py.)"""
    ckpt = log_dir / "checkpoints.log"
    note = parse_notes(ckpt.read_bytes()).notes[-1]
    done: list[bool] = []

    def tamper(rec: dict[str, Any], covered: bool) -> None:
        if not done:
            done.append(True)
            with ckpt.open("r+b") as f:  # (the same file, changed in place)
                f.seek(note.end - 4)
                byte = f.read(1)
                f.seek(note.end - 4)
                f.write(b"A" if byte != b"A" else b"B")

    report = verify(log_dir, KEY.public, on_record=tamper)
    assert done
    assert not report.ok
    assert any(
        p.code == "CHECKPOINT_MALFORMED" and "changed while it was being verified" in p.message
        for p in report.problems
    ), report.problems
    after = verify(log_dir, KEY.public)  # (the change is there for the next verify)
    assert [p.code for p in after.problems] == ["CHECKPOINT_BAD_SIGNATURE"]


# --- segments that are not regular files ------------------------------------------------------


def not_file(path: Path) -> Any:
    report = within(lambda: verify(path, KEY.public))
    assert not report.ok
    assert not report.verified
    assert report.first is not None
    assert report.first.code == "SEGMENT_NOT_FILE"
    return report.first


def test_verify_reports_a_fifo_in_place_of_a_segment(log_dir: Path) -> None:
    segment(log_dir, 2).unlink()
    os.mkfifo(segment(log_dir, 2))
    p = not_file(log_dir)
    assert (p.file, p.line, p.offset) == ("audit-000002.jsonl", 1, 0)
    assert "not a regular file" in p.message


def test_verify_reports_a_fifo_after_the_last_segment(log_dir: Path) -> None:
    os.mkfifo(segment(log_dir, last_segment(log_dir) + 1))
    assert "not a regular file" in not_file(log_dir).message


def plant_socket(path: Path, monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    """A UNIX socket bound at ``path`` (which any local user who can write the folder can
    make), in place of the file there."""
    path.unlink(missing_ok=True)
    monkeypatch.chdir(path.parent)  # (a socket's path is at most 108 bytes)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path.name)
    return sock


def test_verify_reports_a_socket_in_place_of_a_segment(
    log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a socket fails (ENXIO): verify raised that error instead of reporting."""
    with plant_socket(segment(log_dir, 2), monkeypatch):
        p = not_file(log_dir)
    assert (p.file, p.line, p.offset) == ("audit-000002.jsonl", 1, 0)
    assert "audit-000002.jsonl is not a regular file (a socket)" in p.message


def test_verify_reports_a_socket_as_checkpoints_log(
    log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The notes are not read: the problem says why, and no audit.checkpoint record is said
    to have lost its note (CHECKPOINT_MISSING: "checkpoints were removed"), nor the log to
    have none (NO_CHECKPOINT: it reads as a removal)."""
    with plant_socket(log_dir / "checkpoints.log", monkeypatch):
        report = within(lambda: verify(log_dir, KEY.public))
    assert not report.ok
    assert [(p.code, p.message) for p in report.problems] == [
        ("CHECKPOINT_MALFORMED", "checkpoints.log is not a regular file (a socket)"),
    ]


@pytest.mark.parametrize("kind", ["socket", "fifo"])
def test_a_stray_file_named_like_a_far_segment_is_reported_as_what_it_is(
    log_dir: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Not a regular file, numbered past a segment that does not exist: SEGMENT_NOT_FILE
    naming it (it was SEGMENT_MISSING for the number after the last segment, which nothing
    removed; before e54de8e it was left out and the log verified)."""
    stray = segment(log_dir, 99)
    if kind == "fifo":
        os.mkfifo(stray)
        report = within(lambda: verify(log_dir, KEY.public))
    else:
        with plant_socket(stray, monkeypatch):
            report = within(lambda: verify(log_dir, KEY.public))
    what = "a socket" if kind == "socket" else "a FIFO"
    gap = segment(log_dir, last_segment(log_dir)).name  # (the stray counts in the glob)
    assert [(p.code, p.file, p.message) for p in report.problems] == [
        (
            "SEGMENT_NOT_FILE",
            stray.name,
            f"{stray.name} is not a regular file ({what}): it is not read (it comes after "
            f"{gap}, which does not exist)",
        )
    ]
    stray.unlink()
    assert verify(log_dir, KEY.public).verified  # (the segments were all read)


def test_verify_does_not_follow_a_symlinked_segment(log_dir: Path, tmp_path: Path) -> None:
    segment(log_dir, 2).rename(tmp_path / "elsewhere.jsonl")
    segment(log_dir, 2).symlink_to(tmp_path / "elsewhere.jsonl")
    p = not_file(log_dir)
    assert p.file == "audit-000002.jsonl"
    assert "symbolic link" in p.message


def refused(path: Path) -> str:
    def attempt() -> None:
        AuditLog(path, KEY, SETTINGS).close()

    with pytest.raises(AuditError) as info:
        within(attempt)
    assert not isinstance(info.value, AuditUnavailable)  # the log is refused, not unwritable
    assert "ferry audit verify" in str(info.value)
    return str(info.value)


def test_the_writer_refuses_a_fifo_segment(log_dir: Path) -> None:
    """A FIFO past the last segment: the writer would block for good rotating into it."""
    name = segment(log_dir, last_segment(log_dir) + 1)
    os.mkfifo(name)
    assert f"{name.name} is not a regular file" in refused(log_dir)


def test_the_writer_refuses_a_fifo_as_its_last_segment(log_dir: Path) -> None:
    last = segment(log_dir, last_segment(log_dir))
    last.unlink()
    os.mkfifo(last)
    assert f"{last.name} is not a regular file" in refused(log_dir)


def test_the_writer_refuses_a_symlinked_segment(log_dir: Path, tmp_path: Path) -> None:
    last = segment(log_dir, last_segment(log_dir))
    last.rename(tmp_path / "elsewhere.jsonl")
    last.symlink_to(tmp_path / "elsewhere.jsonl")
    assert f"{last.name} is a symbolic link" in refused(log_dir)


def test_the_writer_refuses_a_socket_as_a_segment(
    log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with plant_socket(segment(log_dir, 2), monkeypatch):
        assert "audit-000002.jsonl is not a regular file (a socket)" in refused(log_dir)


def test_the_writer_refuses_a_socket_as_checkpoints_log(
    log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with plant_socket(log_dir / "checkpoints.log", monkeypatch):
        assert "checkpoints.log is not a regular file (a socket)" in refused(log_dir)


def test_the_writer_names_a_stray_socket_past_its_last_segment(
    log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not "segment audit-000NNN.jsonl is missing" (the one after the last): the socket."""
    with plant_socket(segment(log_dir, 99), monkeypatch):
        message = refused(log_dir)
    assert "audit-000099.jsonl is not a regular file (a socket)" in message
    assert "missing" not in message


def test_the_writer_refuses_a_fifo_as_checkpoints_log(log_dir: Path) -> None:
    """Opening checkpoints.log to append blocked on a FIFO (O_WRONLY waits for a reader)."""
    (log_dir / "checkpoints.log").unlink()
    os.mkfifo(log_dir / "checkpoints.log")
    assert "checkpoints.log is not a regular file" in refused(log_dir)


def test_a_fifo_planted_as_the_next_segment_stops_the_writer_without_hanging(
    log_dir: Path,
) -> None:
    """Rotating into a FIFO planted while the log is open turns the log unavailable (and
    fails closed) instead of blocking the writer thread; it recovers once the FIFO is gone."""
    log = AuditLog(log_dir, KEY, SETTINGS)
    fifo = segment(log_dir, last_segment(log_dir) + 1)
    os.mkfifo(fifo)
    try:

        def fill() -> None:
            for _ in range(1000):  # (a segment holds fewer records)
                log.append("link.heartbeat_gap", subject=SENDER, result="info", durable=True)

        with pytest.raises(AuditUnavailable):
            within(fill)
        assert log.problem is not None
        assert f"{fifo.name} is not a regular file" in log.problem
        fifo.unlink()
        within(lambda: log.available.wait(HANG))
        assert log.healthy
    finally:
        release_fifos(log_dir)
        within(log.close)
    report = verify(log_dir, KEY.public)
    assert report.verified, report.problems
    assert "audit.outage" in (log_dir / fifo.name).read_text()


def test_reconcile_reading_a_log_unverified_does_not_hang_on_a_fifo(tmp_path: Path) -> None:
    """read_log's segment reader (reconcile without a key) reads only a regular file: a FIFO
    put in a segment's place after the segments were listed is refused, not waited on."""
    fifo = tmp_path / "audit-000001.jsonl"
    os.mkfifo(fifo)

    def read() -> Any:
        try:
            return list(timeline._lines(fifo, timeline.LogStats("outside", str(tmp_path))))
        except UnsafeFile as exc:
            return exc

    assert isinstance(within(read), UnsafeFile)

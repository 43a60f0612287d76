"""Quarantine: safe names, no overwrites, reason files, never losing the item."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

import pytest
from structlog.testing import capture_logs

from outside import quarantine as q
from outside.quarantine import Quarantine, QuarantineRecord, safe_name

FIXED = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


class Reason(TypedDict):
    channel: str
    reason_code: str
    message: str


REASON: Reason = {"channel": "partners", "reason_code": "TYPE_NOT_ALLOWED", "message": "type x/y"}


@pytest.fixture
def qdir(tmp_path: Path) -> Path:
    return tmp_path / "quarantine"


@pytest.fixture
def quarantine(qdir: Path) -> Quarantine:
    return Quarantine(qdir, clock=lambda: FIXED)


def drop(tmp_path: Path, name: str, data: bytes = b"content") -> Path:
    folder = tmp_path / "drop"
    folder.mkdir(exist_ok=True)
    p = folder / name
    p.write_bytes(data)
    return p


def reason(record: QuarantineRecord) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(record.reason_json.read_text("ascii"))
    return doc


def test_put_file_moves_and_records_everything(
    tmp_path: Path, quarantine: Quarantine, qdir: Path
) -> None:
    src = drop(tmp_path, "report.exe", b"MZ...")
    rec = quarantine.put_file(
        src,
        original_name="report.exe",
        item_id="it-0001",
        sha256="ab" * 32,
        details={"detected": "application/x-dosexec"},
        **REASON,
    )
    assert not src.exists()
    assert rec.path == qdir / "report.exe"
    assert rec.path.read_bytes() == b"MZ..."
    assert stat.S_IMODE(qdir.stat().st_mode) == 0o700
    assert sorted(os.listdir(qdir)) == [
        "report.exe",
        "report.exe.reason.json",
        "report.exe.reason.txt",
    ]
    assert reason(rec) == {
        "version": 1,
        "reason_code": "TYPE_NOT_ALLOWED",
        "message": "type x/y",
        "channel": "partners",
        "original_name": "report.exe",
        "stored_name": "report.exe",
        "size": 5,
        "sha256": "ab" * 32,
        "item_id": "it-0001",
        "quarantined_at": "2024-05-06T07:08:09.123456Z",
        "details": {"detected": "application/x-dosexec"},
    }


def test_put_file_copy_keeps_the_source(tmp_path: Path, quarantine: Quarantine) -> None:
    src = drop(tmp_path, "a.pdf", b"%PDF-1.7")
    rec = quarantine.put_file(src, original_name="a.pdf", move=False, **REASON)
    assert src.read_bytes() == rec.path.read_bytes() == b"%PDF-1.7"
    assert os.stat(src).st_ino != os.stat(rec.path).st_ino


def test_move_across_filesystems_copies_then_unlinks(
    tmp_path: Path, quarantine: Quarantine, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = drop(tmp_path, "big.bin", os.urandom(3 * q.COPY_CHUNK + 7))
    data = src.read_bytes()
    real_rename = os.rename

    def rename(a: Any, b: Any, **kw: Any) -> None:
        if kw.get("src_dir_fd") is None:  # the item itself, not our temp files
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(a, b, **kw)

    monkeypatch.setattr(os, "rename", rename)
    rec = quarantine.put_file(src, original_name="big.bin", **REASON)
    assert not src.exists()
    assert rec.path.read_bytes() == data
    assert reason(rec)["size"] == len(data)


def test_a_copy_that_cannot_fit_is_not_started(
    tmp_path: Path, quarantine: Quarantine, qdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Across file systems a file is copied in; one bigger than the room there would fill
    that disk on every try (a file refused as too large for the gateway's own disk)."""
    src = drop(tmp_path, "huge.bin", os.urandom(4096))
    real = os.fstatvfs
    room: dict[str, int] = {}

    def fstatvfs(fd: int) -> Any:
        st = real(fd)
        return os.statvfs_result((*st[:4], room["blocks"], *st[5:]))  # f_bavail

    monkeypatch.setattr(q.os, "fstatvfs", fstatvfs)
    frsize = os.statvfs(tmp_path).f_frsize
    room["blocks"] = (q.COPY_ROOM_MARGIN + 4095) // frsize  # (short of 4096 + the margin)
    with pytest.raises(OSError) as full:
        quarantine.put_file(src, original_name="huge.bin", move=False, **REASON)
    assert full.value.errno == errno.ENOSPC
    assert src.read_bytes() != b""
    assert not qdir.exists() or not any(p.name.startswith("huge.bin") for p in qdir.iterdir())
    room["blocks"] = (q.COPY_ROOM_MARGIN + 4096) // frsize + 1
    rec = quarantine.put_file(src, original_name="huge.bin", move=False, **REASON)
    assert rec.path.read_bytes() == src.read_bytes()

    # a file system that does not say (FUSE without statfs: every count 0) is not checked
    monkeypatch.setattr(
        q.os, "fstatvfs", lambda fd: os.statvfs_result((512, 512, 0, 0, 0, 0, 0, 0, 0, 255))
    )
    again = quarantine.put_file(src, original_name="huge.bin", move=False, **REASON)
    assert again.path.read_bytes() == src.read_bytes()


def test_a_name_swapped_after_the_check_keeps_nothing_of_elsewhere_and_loses_nothing(
    tmp_path: Path, quarantine: Quarantine, qdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the file's open (and identity check) and its move, a clerk swaps its name.
    For a symlink to a file elsewhere: nothing is kept (a release would follow it). For
    another version of theirs: it is kept as it is (never lost), and said."""
    elsewhere = tmp_path / "secret.key"
    elsewhere.write_text("not the clerk's\n")
    src = drop(tmp_path, "memo.txt", b"the clerk's memo\n")
    real = os.rename
    swap: list[Callable[[], None]] = []

    def swapped(a: Any, b: Any, **kw: Any) -> None:
        if kw.get("src_dir_fd") is None and swap:  # (the item's own move)
            real(src, src.with_name(".old"))
            swap.pop()()
        real(a, b, **kw)

    monkeypatch.setattr(os, "rename", swapped)
    swap.append(lambda: os.symlink(elsewhere, src))
    with pytest.raises(OSError) as caught:
        quarantine.put_file(src, original_name="memo.txt", **REASON)
    assert caught.value.errno == errno.ESTALE
    assert not qdir.exists() or not any(p.name.startswith("memo") for p in qdir.iterdir())
    assert elsewhere.read_text() == "not the clerk's\n"

    real(src.with_name(".old"), src)
    swap.append(lambda: src.write_bytes(b"saved again\n"))
    with capture_logs() as logs:
        rec = quarantine.put_file(src, original_name="memo.txt", **REASON)
    assert rec.path.read_bytes() == b"saved again\n"
    assert "quarantine_source_replaced" in [e["event"] for e in logs]
    assert src.with_name(".old").read_bytes() == b"the clerk's memo\n"


def test_a_version_saved_during_a_copy_across_file_systems_is_kept(
    tmp_path: Path, quarantine: Quarantine, qdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Across file systems the refused file is copied, then its name removed: only while it
    still names that file; a version saved meanwhile stays, to be taken in its turn."""
    src = drop(tmp_path, "memo.txt", b"version 1 (refused)\n")

    real_rename = os.rename

    def across(a: Any, b: Any, **kw: Any) -> None:
        if kw.get("src_dir_fd") is None:  # (the item's own move, not our temp files)
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(a, b, **kw)

    real_copy = q._copy_from

    def copy_then_save(src_fd: int) -> Callable[[int], None]:
        fill = real_copy(src_fd)

        def hooked(fd: int) -> None:
            fill(fd)
            newer = src.with_name(".~memo.tmp")
            newer.write_bytes(b"version 2 (never checked)\n")
            real_rename(newer, src)

        return hooked

    monkeypatch.setattr(os, "rename", across)
    monkeypatch.setattr(q, "_copy_from", copy_then_save)
    rec = quarantine.put_file(src, original_name="memo.txt", **REASON)
    assert rec.path.read_bytes() == b"version 1 (refused)\n"
    assert src.read_bytes() == b"version 2 (never checked)\n"


def test_a_copy_across_file_systems_whose_original_cannot_be_removed_is_not_kept(
    tmp_path: Path, quarantine: Quarantine, qdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clerk's subfolder the agent may not write: the copy would stay beside the original,
    and every rescan would add another. Nothing is kept; the original stays."""
    src = drop(tmp_path, "memo.txt", b"refused\n")
    real_rename, real_unlink = os.rename, os.unlink

    def across(a: Any, b: Any, **kw: Any) -> None:
        if kw.get("src_dir_fd") is None:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(a, b, **kw)

    def refused(path: Any, **kw: Any) -> None:
        if str(path) == str(src):
            raise OSError(errno.EACCES, "Permission denied")
        real_unlink(path, **kw)

    monkeypatch.setattr(os, "rename", across)
    monkeypatch.setattr(os, "unlink", refused)
    with pytest.raises(OSError) as caught:
        quarantine.put_file(src, original_name="memo.txt", **REASON)
    assert caught.value.errno == errno.EACCES
    assert src.read_bytes() == b"refused\n"
    assert not qdir.exists() or [p for p in qdir.iterdir() if not p.name.startswith(".")] == []


def test_collisions_never_overwrite(tmp_path: Path, quarantine: Quarantine, qdir: Path) -> None:
    stored = [
        quarantine.put_bytes(f"v{i}".encode(), original_name="same.pdf", **REASON).path.name
        for i in range(3)
    ]
    assert stored == ["same.pdf", "same (2).pdf", "same (3).pdf"]
    assert [(qdir / n).read_bytes() for n in stored] == [b"v0", b"v1", b"v2"]
    # A name that equals another item's reason file, and a file that was already there.
    taken = quarantine.put_bytes(b"r", original_name="same.pdf.reason.json", **REASON)
    assert taken.path.name == "same.pdf.reason (2).json"
    assert json.loads((qdir / "same.pdf.reason.json").read_text())["stored_name"] == "same.pdf"
    (qdir / "notes.txt").write_bytes(b"operator's")
    rec = quarantine.put_file(drop(tmp_path, "notes.txt"), original_name="notes.txt", **REASON)
    assert rec.path.name == "notes (2).txt"
    assert (qdir / "notes.txt").read_bytes() == b"operator's"


@pytest.mark.parametrize(
    ("untrusted", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\windows\\win.ini", "win.ini"),
        ("\u202ecod.exe", "_cod.exe"),
        ("CON", "_CON"),
        ("lpt1.txt", "_lpt1.txt"),
        ("", "unnamed"),
        ("..", "unnamed"),
        (".bashrc", "_bashrc"),
        ("a\x00b\nc.txt", "a_b_c.txt"),
        ("what?.txt", "what_.txt"),
        ("trailing. . ", "trailing"),
        ("Cafe\u0301.txt", "Café.txt"),
        ("bad\udcff.txt", "bad_.txt"),
        ("报告.docx", "报告.docx"),
    ],
)
def test_safe_name(untrusted: str, expected: str) -> None:
    assert safe_name(untrusted) == expected


def test_long_names_keep_their_extension() -> None:
    name = safe_name("文" * 300 + ".pdf")
    assert name.endswith(".pdf")
    assert len(name.encode()) <= q.MAX_NAME_BYTES
    assert len(safe_name("x" * 300).encode()) == q.MAX_NAME_BYTES


@pytest.mark.parametrize(
    "hostile",
    ["../../etc/passwd", "/etc/shadow", "\u202ecod.exe", "CON", "x" * 1000 + ".pdf", "", ".", "/"],
)
def test_hostile_names_stay_inside(
    tmp_path: Path, quarantine: Quarantine, qdir: Path, hostile: str
) -> None:
    for i in range(2):  # and their collisions
        rec = quarantine.put_file(drop(tmp_path, f"f{i}"), original_name=hostile, **REASON)
        for p in (rec.path, rec.reason_json, rec.reason_txt):
            assert p.parent == qdir
            assert p.is_file()
            assert not p.name.startswith(".")
            assert len(p.name.encode()) <= 255
        assert reason(rec)["original_name"] == hostile
    assert all(not n.endswith(".tmp") for n in os.listdir(qdir))


@pytest.mark.parametrize("code", sorted(q._REASONS))
def test_reason_txt_in_both_languages(quarantine: Quarantine, code: str) -> None:
    rec = quarantine.put_bytes(
        b"x", channel="c", original_name="f.doc", reason_code=code, message="m", item_id="ID-42"
    )
    text = rec.reason_txt.read_text("utf-8")
    why, why_zh, todo, todo_zh = q.reason_text(code)
    for sentence in (why, why_zh, todo, todo_zh, "ID-42", "f.doc", code):
        assert sentence in text


def test_reason_txt_fallback_and_display(quarantine: Quarantine) -> None:
    rec = quarantine.put_bytes(
        b"x", channel="c", original_name="\u202eevil\x1b[2J.txt", reason_code="NEW", message="m"
    )
    text = rec.reason_txt.read_text("utf-8")
    assert q.reason_text("NEW") == q._GENERIC
    assert q._GENERIC[0] in text
    assert q._GENERIC[1] in text
    assert "\u202e" not in text
    assert "\x1b" not in text
    assert "\\u202eevil\\u001b[2J.txt" in text
    assert "file name and time" in text  # no item id to quote


def test_put_note_writes_only_reasons(tmp_path: Path, quarantine: Quarantine, qdir: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to("/etc/passwd")
    rec = quarantine.put_note(
        original_name="link", reason_code="NOT_REGULAR_FILE", message="link", channel="c"
    )
    assert link.is_symlink()
    assert not rec.path.exists()
    assert sorted(os.listdir(qdir)) == ["link.reason.json", "link.reason.txt"]
    assert reason(rec)["stored_name"] is None
    assert reason(rec)["size"] is None
    # The name stays reserved: a later item of that name does not look like the note's.
    assert quarantine.put_bytes(b"x", original_name="link", **REASON).path.name == "link (2)"


@pytest.mark.parametrize("make", ["symlink", "fifo"])
def test_put_file_refuses_what_is_not_a_regular_file(
    tmp_path: Path, quarantine: Quarantine, qdir: Path, make: str
) -> None:
    secret = drop(tmp_path, "secret", b"hunter2")
    odd = tmp_path / "drop" / "odd"
    if make == "symlink":
        odd.symlink_to(secret)
    else:
        os.mkfifo(odd)
    with pytest.raises(OSError):  # ELOOP or EINVAL: either way, not taken
        quarantine.put_file(odd, original_name="odd", **REASON)
    assert os.path.lexists(odd)
    assert not qdir.exists() or os.listdir(qdir) == []


def test_unusable_folder_raises_and_keeps_the_source(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "quarantine"
    not_a_folder.write_bytes(b"oops")
    src = drop(tmp_path, "keep.pdf")
    with pytest.raises(OSError):  # any OSError: the caller alarms
        Quarantine(not_a_folder).put_file(src, original_name="keep.pdf", **REASON)
    assert src.read_bytes() == b"content"


@pytest.mark.parametrize("fail_at", [1, 2])
def test_failure_while_writing_reasons_keeps_the_source(
    tmp_path: Path,
    quarantine: Quarantine,
    qdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    fail_at: int,
) -> None:
    src = drop(tmp_path, "keep.pdf")
    real: Callable[..., None] = q._write_atomic
    calls = []

    def flaky(dfd: int, name: str, fill: Callable[[int], None]) -> None:
        calls.append(name)
        if len(calls) == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(dfd, name, fill)

    monkeypatch.setattr(q, "_write_atomic", flaky)
    with pytest.raises(OSError, match="No space"):
        quarantine.put_file(src, original_name="keep.pdf", **REASON)
    assert src.read_bytes() == b"content"
    assert os.listdir(qdir) == []  # no reason file left pointing at nothing


def test_failure_placing_the_item_keeps_the_source(
    tmp_path: Path, quarantine: Quarantine, qdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = drop(tmp_path, "keep.pdf")

    def rename(*_a: Any, **_kw: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(q, "_fsync_dir", lambda _p: None)
    real_rename = os.rename
    monkeypatch.setattr(
        os,
        "rename",
        lambda a, b, **kw: real_rename(a, b, **kw) if kw.get("src_dir_fd") else rename(),
    )
    with pytest.raises(OSError, match="Input/output"):
        quarantine.put_file(src, original_name="keep.pdf", **REASON)
    assert src.read_bytes() == b"content"
    assert os.listdir(qdir) == []

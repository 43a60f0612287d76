"""outside.intake._move_across: archiving an original to a sent folder on another file
system (rename(2) says EXDEV), as when the drop folder is a share."""

from __future__ import annotations

import errno
import os
import shutil as shutil_mod
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ferry.place import fsync_named, remove_stale_temps, temp_name
from outside.intake import _move_across, _place_original, _Placed


def test_the_copy_is_whole_dated_and_the_original_gone(tmp_path: Path) -> None:
    src, sent = tmp_path / "report.pdf", tmp_path / "sent"
    sent.mkdir()
    data = os.urandom(3 * 1024 * 1024 + 17)  # more than one copy chunk
    src.write_bytes(data)
    then = time.time() - 86400
    os.utime(src, (then, then))
    _move_across(src, sent / "report.pdf")
    assert not src.exists()
    assert (sent / "report.pdf").read_bytes() == data
    assert abs((sent / "report.pdf").stat().st_mtime - then) < 1e-3
    assert os.listdir(sent) == ["report.pdf"]  # no temp file left


def test_a_name_as_long_as_the_file_system_allows_is_moved(tmp_path: Path) -> None:
    name = "申" * 80 + ".pdf"  # 244 bytes of UTF-8: a temp name built on it would not fit
    assert len(name.encode()) <= 255
    src, sent = tmp_path / name, tmp_path / "sent"
    sent.mkdir()
    src.write_bytes(b"long")
    _move_across(src, sent / name)
    assert os.listdir(sent) == [name]
    assert not src.exists()


def test_an_existing_file_in_sent_is_never_overwritten(tmp_path: Path) -> None:
    src, sent = tmp_path / "a.txt", tmp_path / "sent"
    sent.mkdir()
    src.write_bytes(b"new")
    (sent / "a.txt").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        _move_across(src, sent / "a.txt")
    assert (sent / "a.txt").read_bytes() == b"old"
    assert src.read_bytes() == b"new"  # the original stays until a copy is in place
    assert os.listdir(sent) == ["a.txt"]


def test_a_symlink_or_a_fifo_is_not_followed_or_read(tmp_path: Path) -> None:
    sent = tmp_path / "sent"
    sent.mkdir()
    secret = tmp_path / "secret"
    secret.write_bytes(b"not the clerk's")
    (tmp_path / "link").symlink_to(secret)
    with pytest.raises(OSError) as info:  # the errno is checked below
        _move_across(tmp_path / "link", sent / "link")
    assert info.value.errno == errno.ELOOP
    os.mkfifo(tmp_path / "pipe")
    started = time.monotonic()
    with pytest.raises(OSError, match="not a regular file"):
        _move_across(tmp_path / "pipe", sent / "pipe")  # O_NONBLOCK: no writer, no wait
    assert time.monotonic() - started < 1
    assert os.listdir(sent) == []
    assert (tmp_path / "link").is_symlink()
    assert (tmp_path / "pipe").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_copy_cut_short_by_a_full_disk_leaves_nothing_and_keeps_the_original(
    tmp_path: Path,
) -> None:
    src, sent = tmp_path / "big.bin", tmp_path / "sent"
    sent.mkdir()
    data = os.urandom(3 * 1024 * 1024)
    src.write_bytes(data)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(sent)], check=True)
    try:
        with pytest.raises(OSError) as info:  # the errno is checked below
            _move_across(src, sent / "big.bin")
        assert info.value.errno == errno.ENOSPC
        assert os.listdir(sent) == []  # no partial copy, no temp file
    finally:
        subprocess.run(["umount", str(sent)], check=True)
    assert src.read_bytes() == data


def _dirs(a: Path, b: Path) -> tuple[int, int]:
    return os.open(a, os.O_RDONLY | os.O_DIRECTORY), os.open(b, os.O_RDONLY | os.O_DIRECTORY)


@pytest.fixture
def other_fs(tmp_path: Path) -> Path:
    """A folder on another file system than tmp_path (tmpfs)."""
    folder = Path("/dev/shm") / f"ferry-test-{os.getpid()}-{tmp_path.name}"
    folder.mkdir()
    assert os.stat(folder).st_dev != os.stat(tmp_path).st_dev
    yield folder  # type: ignore[misc]
    subprocess.run(["rm", "-rf", str(folder)], check=False)


def test_a_copy_a_crash_left_in_sent_is_recognised_not_made_twice(
    tmp_path: Path, other_fs: Path
) -> None:
    """Copied across and named in sent/, then the agent died before removing the original:
    found again, it is removed, and sent/ holds one copy (not 'c.txt' and 'c (2).txt')."""
    src = tmp_path / "c.txt"
    src.write_bytes(b"the clerk's file\n")
    (other_fs / "c.txt").write_bytes(b"the clerk's file\n")
    st = src.stat()
    os.utime(other_fs / "c.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    a, b = _dirs(tmp_path, other_fs)
    try:
        assert _place_original(a, "c.txt", b, "c.txt") is _Placed.MOVED
        assert not src.exists()
        assert os.listdir(other_fs) == ["c.txt"]
        (tmp_path / "d.txt").write_bytes(b"mine\n")
        (other_fs / "d.txt").write_bytes(b"someone else's\n")
        assert _place_original(a, "d.txt", b, "d.txt") is _Placed.TAKEN
    finally:
        os.close(a)
        os.close(b)


def test_an_original_saved_again_during_the_copy_is_left(
    tmp_path: Path, other_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An editor's save (a new file renamed over the name) while the original is copied
    across: the new version stays to be taken; the copy in sent/ is the version sent."""
    src = tmp_path / "memo.txt"
    src.write_bytes(b"version 1\n")
    real = shutil_mod.copyfileobj

    def copy_then_save(fin: object, fo: object, n: int = 0) -> None:
        real(fin, fo, n)  # type: ignore[arg-type]
        (tmp_path / ".memo.tmp").write_bytes(b"version 2\n")
        os.rename(tmp_path / ".memo.tmp", src)

    monkeypatch.setattr(shutil_mod, "copyfileobj", copy_then_save)
    assert _move_across(src, other_fs / "memo.txt") is False
    assert src.read_bytes() == b"version 2\n"
    # (version 1 lost its last name: its ctime changed, so its copy counts as made from a
    # file changed meanwhile and is not kept; it was sent all the same)
    assert os.listdir(other_fs) == []


def test_an_original_written_to_during_the_copy_is_left_and_no_mixed_copy_kept(
    tmp_path: Path, other_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "log.txt"
    src.write_bytes(b"line 1\n")
    real = shutil_mod.copyfileobj

    def copy_then_append(fin: object, fo: object, n: int = 0) -> None:
        real(fin, fo, n)  # type: ignore[arg-type]
        with open(src, "ab") as f:
            f.write(b"line 2\n")

    monkeypatch.setattr(shutil_mod, "copyfileobj", copy_then_append)
    assert _move_across(src, other_fs / "log.txt") is False
    assert src.read_bytes() == b"line 1\nline 2\n"
    assert os.listdir(other_fs) == []


@pytest.mark.parametrize(
    ("mode", "kept"),
    [
        (0o644, 0o644),  # readable by whom the original was (not the agent's 0600)
        (0o6755, 0o755),  # no set-uid/gid bits: the copy is the agent's, not a program as it
    ],
)
def test_the_copy_keeps_the_original_permissions_without_set_id_bits(
    tmp_path: Path, other_fs: Path, mode: int, kept: int
) -> None:
    src = tmp_path / "shared"
    src.write_bytes(b"#!/bin/sh\n")
    src.chmod(mode)
    assert _move_across(src, other_fs / "shared") is True
    assert (other_fs / "shared").stat().st_mode & 0o7777 == kept


def test_a_fifo_put_under_a_name_just_synced_holds_nothing_up(tmp_path: Path) -> None:
    """On a share each new name is synced by opening its file: a FIFO swapped in under it
    meanwhile must not make the intake (or delivery) thread wait for a writer for ever."""
    os.mkfifo(tmp_path / "report.pdf")
    (tmp_path / "plain.txt").write_bytes(b"x")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        work = threading.Thread(target=fsync_named, args=(fd, ["report.pdf", "plain.txt"]))
        work.daemon = True
        work.start()
        work.join(5)
        assert not work.is_alive()
    finally:
        os.close(fd)


def test_stale_temps_are_removed_below_too(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for folder in (tmp_path, tmp_path / "sub", tmp_path / "sub" / "deeper"):
        (folder / temp_name()).write_bytes(b"cut short")
        (folder / "kept.txt").write_bytes(b"a clerk's")
    assert remove_stale_temps(tmp_path) == 1
    assert remove_stale_temps(tmp_path, below=True) == 2
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["kept.txt"] * 3

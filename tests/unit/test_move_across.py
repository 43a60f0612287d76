"""outside.intake._move_across: archiving an original to a sent folder on another file
system (rename(2) says EXDEV), as when the drop folder is a share."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from outside.intake import _move_across


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

"""The inside's folder writes on a share (a real FUSE mount, bindfs), which has no O_TMPFILE:
files are written under a hidden temp name first, never visible half-written under their
own, and never over another file; a temp file a crash left behind is removed at start-up."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
from cli_helpers import Share

from ferry.place import TEMP_PREFIX, remove_stale_temps
from inside.deliver import _link_copy, _link_temp, _open_temp, write_new_files

pytestmark = pytest.mark.integration


def test_the_share_has_no_o_tmpfile(network_share: Share) -> None:
    with pytest.raises(OSError) as info:  # (what makes the fallback needed at all)
        os.close(os.open(network_share.mount, os.O_TMPFILE | os.O_WRONLY, 0o600))
    assert info.value.errno == errno.EOPNOTSUPP


def test_messages_written_to_a_share_get_their_names_and_no_temp_is_left(
    network_share: Share,
) -> None:
    items = [(f"消息-{i}.json", f'{{"n": {i}}}'.encode(), b"") for i in range(3)]
    items = [(n, c, hashlib.sha256(c).digest()) for n, c, _ in items]
    (network_share.server / "消息-1.json").write_bytes(b"somebody else's")
    out = write_new_files(network_share.mount, items)
    assert [p.name for p in out] == ["消息-0.json", "消息-1 (2).json", "消息-2.json"]
    assert (network_share.server / "消息-1.json").read_bytes() == b"somebody else's"
    for path, (_, content, _) in zip(out, items, strict=True):
        assert (network_share.server / path.name).read_bytes() == content
    assert not [n for n in os.listdir(network_share.server) if n.startswith(TEMP_PREFIX)]
    again = write_new_files(network_share.mount, items[:1])  # a repeat after a crash
    assert again == out[:1]  # the same content under its name counts as delivered
    assert len(os.listdir(network_share.server)) == 4


def test_a_file_copied_onto_a_share_never_replaces_one(
    network_share: Share, tmp_path: Path
) -> None:
    src = tmp_path / "spooled"
    src.write_bytes(b"verified content" + b"trailer")
    (network_share.server / "report.pdf").write_bytes(b"already there")
    fd = os.open(src, os.O_RDONLY)
    try:
        with pytest.raises(FileExistsError):
            _link_copy(fd, 16, network_share.mount, network_share.mount / "report.pdf")
        _link_copy(fd, 16, network_share.mount, network_share.mount / "report (2).pdf")
    finally:
        os.close(fd)
    assert (network_share.server / "report.pdf").read_bytes() == b"already there"
    assert (network_share.server / "report (2).pdf").read_bytes() == b"verified content"
    assert sorted(os.listdir(network_share.server)) == ["report (2).pdf", "report.pdf"]


def test_where_hard_links_are_refused_a_rename_stands_in_but_never_over_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(*_a: object, **_k: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    real_open = os.open

    def no_tmpfile(path: str, flags: int, *args: object, **kw: object) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(os, "open", no_tmpfile)
    (tmp_path / "taken.txt").write_bytes(b"keep me")
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for target, expect in (("taken.txt", FileExistsError), ("free.txt", None)):
            fd, name = _open_temp(dir_fd)
            os.write(fd, b"new")
            os.close(fd)
            assert name is not None
            if expect is None:
                _link_temp(-1, name, dir_fd, target)
            else:
                with pytest.raises(expect):
                    _link_temp(-1, name, dir_fd, target)
                os.unlink(name, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    assert (tmp_path / "taken.txt").read_bytes() == b"keep me"
    assert (tmp_path / "free.txt").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["free.txt", "taken.txt"]


def test_temps_a_crash_left_are_removed_and_nothing_else(tmp_path: Path) -> None:
    stale = tmp_path / f"{TEMP_PREFIX}{'ab' * 8}.part"
    stale.write_bytes(b"half")
    keep = [".ferry-notes.part", "report.part", ".ferry-0123456789abcdef.pdf", "a.json"]
    for name in keep:
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_temps(tmp_path) == 1
    assert sorted(os.listdir(tmp_path)) == sorted(keep)
    assert remove_stale_temps(tmp_path / "missing") == 0

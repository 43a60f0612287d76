"""The room each agent keeps free on its state disk (``spool_reserve``): its default, a
reserve that leaves nothing, and the inside's spool writes, which a nearly full file system
may cut short without an error."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ferry.config_types import DEFAULT_SPOOL_RESERVE
from ferry.state import disk_room, room_reserve
from inside import agent as agent_mod


def test_the_default_reserve_is_256_mib_but_at_most_a_tenth_of_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    room = disk_room(tmp_path)
    assert room is not None
    free, whole = room
    assert 0 < free <= whole
    assert room_reserve(None, tmp_path) == min(DEFAULT_SPOOL_RESERVE, whole // 10)
    monkeypatch.setattr("ferry.state.disk_room", lambda _: (10, 1000))
    assert room_reserve(None, tmp_path) == 100
    assert room_reserve(5, tmp_path) == 5  # (as configured)
    monkeypatch.setattr("ferry.state.disk_room", lambda _: None)
    assert room_reserve(None, tmp_path) == DEFAULT_SPOOL_RESERVE


def test_a_file_system_that_does_not_say_its_size_has_no_room_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FUSE without a statfs operation answers every count 0: not "full", unknown."""
    monkeypatch.setattr(
        "ferry.state.os.statvfs", lambda _: os.statvfs_result((512, 512, 0, 0, 0, 0, 0, 0, 0, 255))
    )
    assert disk_room(tmp_path) is None


def test_a_reserve_as_big_as_the_disk_is_warned_about(tmp_path: Path) -> None:
    room = disk_room(tmp_path)
    assert room is not None
    with capture_logs() as logs:
        assert room_reserve(room[1], tmp_path) == room[1]
        assert room_reserve(room[1] // 2, tmp_path) == room[1] // 2
    assert [e["event"] for e in logs] == ["spool_reserve_too_big"]
    assert logs[0]["disk"] == room[1]


def test_a_spool_write_cut_short_is_finished_or_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "x.part"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    real = os.pwrite
    calls: list[int] = []

    def short(f: int, data: bytes, offset: int) -> int:
        calls.append(len(data))
        return real(f, bytes(data[:100]), offset)  # (at most 100 bytes a call)

    try:
        data = os.urandom(1000)
        monkeypatch.setattr(agent_mod.os, "pwrite", short)
        agent_mod._pwrite_all(fd, data, 50)
        assert len(calls) == 10
        assert path.read_bytes() == bytes(50) + data

        def full(f: int, data: bytes, offset: int) -> int:
            if calls.append(len(data)) or len(calls) > 12:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(f, bytes(data[:100]), offset)

        monkeypatch.setattr(agent_mod.os, "pwrite", full)
        with pytest.raises(OSError) as caught:
            agent_mod._pwrite_all(fd, data, 2000)
        assert caught.value.errno == errno.ENOSPC
        monkeypatch.setattr(agent_mod.os, "pwrite", lambda f, d, o: 0)
        with pytest.raises(OSError) as nothing:
            agent_mod._pwrite_all(fd, data, 0)
        assert nothing.value.errno == errno.ENOSPC
    finally:
        os.close(fd)

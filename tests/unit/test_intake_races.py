"""What a clerk's folder can do between the moment a file is found complete and the moment the
gateway is done with it: a folder on the way swapped for a symlink, the file written again
while it waits its turn or while it is copied (its date set back), saved again while it is
checked, a disk that fills during the copy, folder names that cannot travel. Real files on a
real `ferry init` deployment (the ``gateway`` fixture), the intake driven by hand."""

from __future__ import annotations

import errno
import os
from pathlib import Path, PurePosixPath

import pytest
from intake_helpers import Gateway

from outside import intake as intake_mod
from outside.watch import Ready


def _ready(gateway: Gateway, rel: str) -> Ready:
    path = gateway.drop / rel
    st = os.stat(path)
    return Ready(
        "documents", path, PurePosixPath(rel), st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino
    )


def _parts(gateway: Gateway) -> list[Path]:
    return list(gateway.intake._incoming.glob("*.part"))


def test_a_file_reached_through_a_symlinked_folder_is_not_taken(
    gateway: Gateway, tmp_path: Path
) -> None:
    """The watcher follows the path it has; a clerk who swaps a subfolder for a symlink must
    not have the gateway read, send or move a file from elsewhere."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "report.txt").write_text("not the clerk's to send\n")
    gateway.drop.mkdir(parents=True, exist_ok=True)
    os.symlink(elsewhere, gateway.drop / "sub")
    ready = _ready(gateway, "sub/report.txt")  # (as the watcher would report it)
    assert gateway.intake._prepare(gateway.channel, ready) is None
    assert (elsewhere / "report.txt").read_text() == "not the clerk's to send\n"
    assert _parts(gateway) == []
    rejected = [r for r in gateway.records() if r["event"] == "intake.rejected"]
    assert [r["reason"] for r in rejected] == [
        "NOT_REGULAR_FILE: the path led out of the drop folder"
    ]


def test_a_file_written_again_while_it_waited_is_left_to_settle(gateway: Gateway) -> None:
    gateway.drop.mkdir(parents=True, exist_ok=True)
    (gateway.drop / "a.txt").write_text("first version, complete\n")
    ready = _ready(gateway, "a.txt")
    (gateway.drop / "a.txt").write_text("second vers")  # (half written when its turn comes)
    assert gateway.intake._prepare(gateway.channel, ready) is None
    assert _parts(gateway) == []
    assert (gateway.drop / "a.txt").exists()


def test_a_file_rewritten_during_its_copy_with_its_date_set_back_is_not_taken(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rsync --inplace, touch -r: same inode, size and mtime, other bytes; only ctime tells."""
    monkeypatch.setattr(intake_mod, "COPY_CHUNK", 16)
    gateway.drop.mkdir(parents=True, exist_ok=True)
    path = gateway.drop / "ledger.txt"
    path.write_text("a" * 64)
    ready = _ready(gateway, "ledger.txt")
    real_read, done = os.read, []

    def read(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        if not done and os.readlink(f"/proc/self/fd/{fd}") == str(path):
            done.append(1)
            st = os.stat(path)
            with open(path, "r+b") as f:
                f.write(b"b" * 64)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        return data

    monkeypatch.setattr(intake_mod.os, "read", read)
    assert gateway.intake._prepare(gateway.channel, ready) is None
    assert done
    assert _parts(gateway) == []


def test_an_original_saved_again_while_it_was_checked_stays_to_be_taken(
    gateway: Gateway,
) -> None:
    """A word processor saves by writing a new file and renaming it over the old one: the
    new version must not go to sent/ unsent."""
    gateway.drop.mkdir(parents=True, exist_ok=True)
    (gateway.drop / "memo.txt").write_text("version 1, with the typo\n")
    prepared = gateway.intake._prepare(gateway.channel, _ready(gateway, "memo.txt"))
    assert prepared is not None
    (gateway.drop / ".memo.tmp").write_text("version 2, corrected\n")
    os.rename(gateway.drop / ".memo.tmp", gateway.drop / "memo.txt")
    lane = gateway.intake._lanes["documents"]
    assert gateway.intake._commit(lane, [prepared]) != []
    assert (gateway.drop / "memo.txt").read_text() == "version 2, corrected\n"
    sent = gateway.channel.sent
    assert sent is None or not any(sent.rglob("memo*"))


def test_a_copy_cut_short_by_a_full_disk_leaves_nothing(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(intake_mod, "COPY_CHUNK", 16)
    gateway.drop.mkdir(parents=True, exist_ok=True)
    (gateway.drop / "big.txt").write_text("x" * 64)
    ready = _ready(gateway, "big.txt")
    real_read, calls = os.read, []

    def read(fd: int, n: int) -> bytes:
        calls.append(n)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_read(fd, n)

    monkeypatch.setattr(intake_mod.os, "read", read)
    with pytest.raises(OSError):
        gateway.intake._prepare(gateway.channel, ready)
    assert _parts(gateway) == []  # (before: the partial copy stayed until a restart)


@pytest.mark.parametrize(
    ("folder", "why"),
    [
        ("line1\nline2", "control character"),
        (os.fsdecode(b"bad\xff"), "not valid UTF-8"),
        ("/".join(["d" * 100] * 11), "longer than 1024 bytes"),
    ],
)
def test_folder_names_that_cannot_travel_are_refused_with_a_reason(
    gateway: Gateway, folder: str, why: str
) -> None:
    """Such a folder made the seal fail (the whole turn, every file of it) or the inside
    refuse the manifest after the original had gone to sent/."""
    (gateway.drop / folder).mkdir(parents=True)
    (gateway.drop / folder / "f.txt").write_text("content\n")
    assert gateway.intake._prepare(gateway.channel, _ready(gateway, f"{folder}/f.txt")) is None
    rejected = [r for r in gateway.records() if r["event"] == "intake.rejected"]
    assert len(rejected) == 1
    assert rejected[0]["reason"].startswith("FILENAME_POLICY")
    assert why in rejected[0]["reason"]
    assert not (gateway.drop / folder / "f.txt").exists()  # (quarantined, with its reason)

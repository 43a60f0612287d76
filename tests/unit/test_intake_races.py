"""What a clerk's folder can do between the moment a file is found complete and the moment the
gateway is done with it: a folder on the way swapped for a symlink, the file written again
while it waits its turn or while it is copied (its date set back), saved again while it is
checked, a disk that fills during the copy, folder names that cannot travel. Real files on a
real `ferry init` deployment (the ``gateway`` fixture), the intake driven by hand."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any

import pytest
from intake_helpers import Gateway

from ferry.errors import PolicyRejection
from outside import intake as intake_mod
from outside.agent import OutsideAgent
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


def _spooled(gateway: Gateway) -> int:
    return int(gateway.intake._spool._db.execute("SELECT count(*) FROM items").fetchone()[0])


def test_a_file_moved_back_from_sent_is_sent_again(gateway: Gateway) -> None:
    """A clerk who moves a file back from sent/ to send it again drops it again: the same
    inode, size and mtime must not pass for a file the agent crashed before moving."""
    gateway.drop.mkdir(parents=True, exist_ok=True)
    assert gateway.drop_file("permit.txt", b"application 2026-118\n")
    sent = gateway.channel.sent
    assert sent is not None
    assert (sent / "permit.txt").exists()
    os.rename(sent / "permit.txt", gateway.drop / "permit.txt")
    assert gateway.take("permit.txt")  # spooled a second time
    assert _spooled(gateway) == 2
    assert not (gateway.drop / "permit.txt").exists()
    assert (sent / "permit.txt").exists()  # (its name there was free again)


def test_a_second_hard_link_to_a_file_sent_is_sent(gateway: Gateway) -> None:
    gateway.drop.mkdir(parents=True, exist_ok=True)
    (gateway.drop / "a.txt").write_bytes(b"the same bytes under two names\n")
    os.link(gateway.drop / "a.txt", gateway.drop / "b.txt")
    assert gateway.take("a.txt")
    assert gateway.take("b.txt")
    assert _spooled(gateway) == 2


def test_an_original_left_by_a_crash_after_its_commit_is_moved_not_sent_again(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spooled, then the agent died before moving the original: found again at start-up,
    it is moved to sent/ and not sent twice; moved back afterwards, it is a new drop."""
    gateway.drop.mkdir(parents=True, exist_ok=True)
    with monkeypatch.context() as m:
        m.setattr(intake_mod.FolderIntake, "_finish_original", lambda *a, **k: False)
        assert gateway.drop_file("notice.txt", b"notice 7\n")
    assert (gateway.drop / "notice.txt").exists()  # (the crash: still in the drop folder)
    assert not gateway.take("notice.txt")  # recognised: moved, not spooled again
    assert _spooled(gateway) == 1
    sent = gateway.channel.sent
    assert sent is not None
    assert (sent / "notice.txt").exists()
    assert not (gateway.drop / "notice.txt").exists()
    os.rename(sent / "notice.txt", gateway.drop / "notice.txt")
    assert gateway.take("notice.txt")
    assert _spooled(gateway) == 2


def test_a_symlink_planted_in_sent_does_not_redirect_the_original(
    gateway: Gateway, tmp_path: Path
) -> None:
    """Clerks who may write in sent/ (to move files back) must not be able to have the
    gateway put a file where they may not write, by a subfolder there made a symlink."""
    sent = gateway.channel.sent
    assert sent is not None
    elsewhere = tmp_path / "agent-only"  # (say, the API's allow-list folder)
    elsewhere.mkdir()
    sent.mkdir(parents=True, exist_ok=True)
    os.symlink(elsewhere, sent / "sub")
    (gateway.drop / "sub").mkdir(parents=True)
    assert gateway.drop_file("sub/key.txt", b"a planted public key\n")  # spooled: it is sent
    assert list(elsewhere.iterdir()) == []
    assert (gateway.drop / "sub" / "key.txt").exists()  # (not moved: left, and logged)
    os.unlink(sent / "sub")  # the planted link removed: the next turn moves it, unsent
    assert not gateway.take("sub/key.txt")
    assert (sent / "sub" / "key.txt").read_bytes() == b"a planted public key\n"
    assert _spooled(gateway) == 1


def test_a_drop_subfolder_swapped_after_the_copy_moves_nothing_elsewhere(
    gateway: Gateway, tmp_path: Path
) -> None:
    """The original is reached again after its commit; a subfolder swapped for a symlink
    to a folder holding another link to the same file must not have that one moved."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (gateway.drop / "sub").mkdir(parents=True)
    (gateway.drop / "sub" / "a.txt").write_text("mine\n")
    os.link(gateway.drop / "sub" / "a.txt", elsewhere / "a.txt")
    prepared = gateway.intake._prepare(gateway.channel, _ready(gateway, "sub/a.txt"))
    assert prepared is not None
    os.rename(gateway.drop / "sub", gateway.drop / "sub.old")
    os.symlink(elsewhere, gateway.drop / "sub")
    lane = gateway.intake._lanes["documents"]
    assert gateway.intake._commit(lane, [prepared]) != []
    assert (elsewhere / "a.txt").read_text() == "mine\n"
    sent = gateway.channel.sent
    assert sent is None or not any(sent.rglob("a.txt"))


def test_a_file_renamed_after_its_copy_is_sent_again_rather_than_risk_a_loss(
    gateway: Gateway,
) -> None:
    """Copied and checked, then renamed by the clerk before the move: the key of a file no
    longer where it was is forgotten, because a key kept for a file that is gone could pass
    an unrelated file for it later (a reused inode, same size and time) and send that one
    to sent/ unsent. The renamed file is sent again: a second copy, nothing lost."""
    gateway.drop.mkdir(parents=True, exist_ok=True)
    (gateway.drop / "report.txt").write_text("the report\n")
    prepared = gateway.intake._prepare(gateway.channel, _ready(gateway, "report.txt"))
    assert prepared is not None
    os.rename(gateway.drop / "report.txt", gateway.drop / "report-final.txt")
    lane = gateway.intake._lanes["documents"]
    assert gateway.intake._commit(lane, [prepared]) != []
    assert gateway.take("report-final.txt")
    assert _spooled(gateway) == 2


def test_a_save_between_the_check_and_the_move_is_left_to_be_taken(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An editor's save (a new file renamed over the name) just before the original is
    linked into sent/: the new version must stay, not go to sent/ unsent."""
    gateway.drop.mkdir(parents=True, exist_ok=True)
    path = gateway.drop / "memo.txt"
    path.write_text("version 1\n")
    prepared = gateway.intake._prepare(gateway.channel, _ready(gateway, "memo.txt"))
    assert prepared is not None
    real = intake_mod.link_new

    def save_then_link(*args: Any, **kw: Any) -> bool:
        (gateway.drop / ".memo.tmp").write_text("version 2\n")
        os.rename(gateway.drop / ".memo.tmp", path)
        return real(*args, **kw)

    monkeypatch.setattr(intake_mod, "link_new", save_then_link)
    lane = gateway.intake._lanes["documents"]
    assert gateway.intake._commit(lane, [prepared]) != []
    assert path.read_text() == "version 2\n"
    sent = gateway.channel.sent
    assert sent is not None
    assert [p.read_text() for p in sent.rglob("memo*")] == []


def test_a_sent_folder_whose_parent_is_missing_is_not_made(gateway: Gateway) -> None:
    """A sent folder on a share that is not mounted: nothing is made under the mount point
    (the original would be hidden there once the share is back); the original stays."""
    sent = gateway.channel.sent
    assert sent is not None
    if sent.exists():
        sent.rmdir()
    sent.parent.rename(sent.parent.with_name("sent-share"))  # (the share's mount point gone)
    gateway.drop.mkdir(parents=True, exist_ok=True)
    assert gateway.drop_file("c.txt", b"c\n")
    assert not sent.parent.exists()
    assert (gateway.drop / "c.txt").read_bytes() == b"c\n"


def test_no_key_is_forgotten_while_the_drop_folder_is_not_there(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a start with the drop share not mounted, an original a crash left there (spooled,
    not moved) must keep its key: forgotten, it would be sent again once the share is back."""
    gateway.drop.mkdir(parents=True, exist_ok=True)
    with monkeypatch.context() as m:
        m.setattr(intake_mod.FolderIntake, "_finish_original", lambda *a, **k: False)
        assert gateway.drop_file("left.txt", b"left by a crash\n")
    away = gateway.drop.with_name("drop-share")
    gateway.drop.rename(away)
    assert gateway.intake.forget_finished_sources("documents") == 0
    away.rename(gateway.drop)
    assert not gateway.take("left.txt")  # recognised: moved, not sent again
    assert _spooled(gateway) == 1


def test_a_key_not_forgotten_before_a_crash_is_forgotten_at_the_next_start(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway.drop.mkdir(parents=True, exist_ok=True)
    with monkeypatch.context() as m:  # (the agent died between the move and the forget)
        m.setattr(gateway.intake._spool, "forget_sources", lambda keys: None)
        assert gateway.drop_file("form.txt", b"form 12\n")
    sent = gateway.channel.sent
    assert sent is not None
    assert (sent / "form.txt").exists()
    (gateway.drop / "kept.txt").write_bytes(b"crashed before its move\n")  # (and one still
    with monkeypatch.context() as m:  # there, spooled, not moved: its key must stay)
        m.setattr(intake_mod.FolderIntake, "_finish_original", lambda *a, **k: False)
        assert gateway.take("kept.txt")
    assert gateway.intake.forget_finished_sources("documents") == 1  # (at the lane's start)
    os.rename(sent / "form.txt", gateway.drop / "form.txt")
    assert gateway.take("form.txt")  # a new drop
    assert not gateway.take("kept.txt")  # recognised: moved, not sent again
    assert _spooled(gateway) == 3


def test_a_missing_sent_folder_is_made_again_and_its_subfolders_take_its_permissions(
    gateway: Gateway,
) -> None:
    """(Subfolders used to follow the agent's umask: 0700 under the systemd unit's 0077.)"""
    sent = gateway.channel.sent
    assert sent is not None
    if sent.exists():
        sent.rmdir()
    (gateway.drop / "team").mkdir(parents=True)
    old = os.umask(0o002)  # (a folder shared by a group of clerks)
    try:
        assert gateway.drop_file("team/minutes.txt", b"minutes\n")
    finally:
        os.umask(old)
    assert (sent / "team" / "minutes.txt").read_bytes() == b"minutes\n"
    assert (sent).stat().st_mode & 0o777 == 0o775  # (made again, under the umask)
    assert (sent / "team").stat().st_mode & 0o777 == 0o770  # (its bits, none for others)
    assert not (gateway.drop / "team" / "minutes.txt").exists()


def test_a_verdict_on_record_is_found_so_a_recovery_does_not_write_it_twice(
    gateway: Gateway,
) -> None:
    """At a start after a crash, a file whose intake record was lost gets its verdict record
    written again only if the log does not hold it (outside.agent._verdicts_on_record)."""
    gateway.drop.mkdir(parents=True, exist_ok=True)
    assert gateway.drop_file("letter.txt", b"a letter\n")
    [verdict] = [r for r in gateway.records() if r["event"] == "verdict"]
    item = verdict["corr"]
    agent = SimpleNamespace(cfg=SimpleNamespace(audit=SimpleNamespace(dir=gateway.audit_dir)))
    found = OutsideAgent._verdicts_on_record(agent, {item, "0" * 32})  # type: ignore[arg-type]
    assert found == {item}


def test_room_is_claimed_for_each_copy_under_way_and_a_file_that_never_fits_is_quarantined(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """outside.spool_reserve: the room a file's copy needs is claimed until it is copied, so
    two lanes cannot both count on the same free bytes; a file the disk could never hold
    with the reserve kept is quarantined, not tried again and again."""
    intake = gateway.intake
    reserve = intake._reserve
    bulk = replace(gateway.channel, content=None)  # (one copy: no cleaned output beside it)
    gateway.drop.mkdir(parents=True, exist_ok=True)
    for name in ("a.txt", "b.txt"):
        (gateway.drop / name).write_text("x" * 1000)
    a, b = _ready(gateway, "a.txt"), _ready(gateway, "b.txt")
    disk = {"free": reserve + 1500, "whole": 10 * reserve}
    monkeypatch.setattr(intake_mod, "disk_room", lambda _: (disk["free"], disk["whole"]))

    claimed = intake._room_for(bulk, a, logged=False)
    assert claimed == 1001
    assert intake._copying == 1001
    assert intake._room_for(bulk, b, logged=False) is None  # waits: a's claim
    intake._copying -= claimed
    disk["free"] -= 1000  # (a copied: its bytes are on the disk now)
    assert intake._room_for(bulk, b, logged=False) is None  # 500 left over
    disk["free"] += 1000  # (a sent and gone)
    assert intake._room_for(bulk, b, logged=False) == 1001
    intake._copying -= 1001
    assert (gateway.drop / "b.txt").exists()
    assert not any(r["event"] == "intake.rejected" for r in gateway.records())

    disk["free"], disk["whole"] = 0, reserve + 999  # never room for b's 1000 bytes
    assert intake._room_for(bulk, b, logged=False) == 0
    assert intake._copying == 0
    assert not (gateway.drop / "b.txt").exists()
    assert (gateway.quarantine / "b.txt").read_text() == "x" * 1000
    rejected = [r for r in gateway.records() if r["event"] == "intake.rejected"]
    assert len(rejected) == 1
    assert rejected[0]["reason"].startswith("TOO_LARGE: the file is 1000 bytes, more than")

    assert gateway.channel.content is not None
    (gateway.drop / "d.txt").write_text("x" * 1000)
    disk["free"], disk["whole"] = reserve + 1500, 10 * reserve
    d = _ready(gateway, "d.txt")
    assert intake._room_for(gateway.channel, d, logged=False) is None  # copy + cleaned output
    disk["free"] = reserve + 2001
    assert intake._room_for(gateway.channel, d, logged=False) == 2001
    intake._copying -= 2001

    small = replace(gateway.channel, max_size=10)
    (gateway.drop / "c.txt").write_text("x" * 1000)
    c = _ready(gateway, "c.txt")
    assert intake._room_for(small, c, logged=False) == 1  # (_prepare refuses it unread)


@pytest.mark.parametrize("refusal", ["no room, ever", "over the channel's max_size"])
def test_a_file_too_large_reached_through_a_symlinked_folder_is_not_moved(
    gateway: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: str
) -> None:
    """A refusal moves the file to the quarantine: it must not move one from elsewhere."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "big.img").write_bytes(b"x" * 5000)
    gateway.drop.mkdir(parents=True, exist_ok=True)
    os.symlink(elsewhere, gateway.drop / "sub")
    ready = _ready(gateway, "sub/big.img")
    if refusal == "no room, ever":
        reserve = gateway.intake._reserve
        monkeypatch.setattr(intake_mod, "disk_room", lambda _: (0, reserve + 1000))
        assert gateway.intake._room_for(gateway.channel, ready, logged=False) == 0
    else:
        assert gateway.intake._prepare(replace(gateway.channel, max_size=10), ready) is None
    assert (elsewhere / "big.img").read_bytes() == b"x" * 5000
    assert not any(p.name.startswith("big.img") for p in gateway.quarantine.iterdir())
    rejected = [r for r in gateway.records() if r["event"] == "intake.rejected"]
    assert [r["reason"] for r in rejected] == [
        "NOT_REGULAR_FILE: the path led out of the drop folder"
    ]


def test_a_file_that_grows_while_it_is_copied_is_read_no_further_than_its_size(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clerk's tool still appending (or a hostile one that never stops): the copy stops one
    byte past the size the file was found with, so it cannot fill the gateway's disk."""
    monkeypatch.setattr(intake_mod, "COPY_CHUNK", 16)
    gateway.drop.mkdir(parents=True, exist_ok=True)
    path = gateway.drop / "log.txt"
    path.write_text("a" * 64)
    ready = _ready(gateway, "log.txt")
    real_read, got = os.read, []

    def read(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        if os.readlink(f"/proc/self/fd/{fd}") == str(path):
            got.append(len(data))
            assert len(got) < 100, "the copy did not stop"
            with open(path, "ab") as f:
                f.write(b"b" * 1000)
        return data

    monkeypatch.setattr(intake_mod.os, "read", read)
    assert gateway.intake._prepare(gateway.channel, ready) is None
    assert sum(got) == 65
    assert _parts(gateway) == []
    assert path.exists()


def test_a_subfolder_swapped_for_a_symlink_while_its_file_is_checked_has_nothing_moved(
    gateway: Gateway, tmp_path: Path
) -> None:
    """A refusal comes after the content check (seconds, for a big file); the file it moves
    to the quarantine is reached from the drop folder one level at a time, so a subfolder
    swapped for a symlink meanwhile cannot bring in a file from elsewhere."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "report.txt").write_text("not the clerk's\n")
    gateway.drop.mkdir(parents=True, exist_ok=True)
    (gateway.drop / "sub").mkdir()
    (gateway.drop / "sub" / "report.txt").write_text("the clerk's own\n")
    ready = _ready(gateway, "sub/report.txt")

    def swap_then_refuse(ch: Any, tmp: Path, name: str) -> None:
        os.rename(gateway.drop / "sub", gateway.drop / "sub.old")
        os.symlink(elsewhere, gateway.drop / "sub")
        raise PolicyRejection("BLOCKED_TYPE", "refused by a content check")

    gateway.intake._checks = (swap_then_refuse,)
    assert gateway.intake._prepare(replace(gateway.channel, content=None), ready) is None
    assert (elsewhere / "report.txt").read_text() == "not the clerk's\n"
    assert (gateway.drop / "sub.old" / "report.txt").read_text() == "the clerk's own\n"
    assert not any(p.name.startswith("report") for p in gateway.quarantine.iterdir())
    rejected = [r for r in gateway.records() if r["event"] == "intake.rejected"]
    assert [r["reason"] for r in rejected] == [
        "NOT_REGULAR_FILE: the path led out of the drop folder"
    ]


def test_a_file_replaced_while_it_was_checked_is_not_moved_in_its_place(
    gateway: Gateway,
) -> None:
    """The refusal moves only the file that was checked (same device and inode)."""
    gateway.drop.mkdir(parents=True, exist_ok=True)
    (gateway.drop / "memo.txt").write_text("checked and refused\n")
    ready = _ready(gateway, "memo.txt")

    def replace_then_refuse(ch: Any, tmp: Path, name: str) -> None:
        (gateway.drop / ".new").write_text("saved again meanwhile\n")
        os.rename(gateway.drop / ".new", gateway.drop / "memo.txt")
        raise PolicyRejection("BLOCKED_TYPE", "refused by a content check")

    gateway.intake._checks = (replace_then_refuse,)
    assert gateway.intake._prepare(replace(gateway.channel, content=None), ready) is None
    assert (gateway.drop / "memo.txt").read_text() == "saved again meanwhile\n"
    assert not any(p.name.startswith("memo") for p in gateway.quarantine.iterdir())
    assert gateway.intake.quarantined == 0  # (nothing kept: the new version has its turn)
    rejected = [r for r in gateway.records() if r["event"] == "intake.rejected"]
    assert [r["reason"] for r in rejected] == ["BLOCKED_TYPE: refused by a content check"]


def test_a_file_waiting_for_room_is_not_passed_by_smaller_files_dropped_after_it(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """First come, first served: room that frees up goes to the file that has waited longest,
    not to each smaller file dropped meanwhile (which would leave the big one waiting for
    ever while clerks keep dropping)."""
    intake = gateway.intake
    reserve = intake._reserve
    bulk = replace(gateway.channel, content=None)
    gateway.drop.mkdir(parents=True, exist_ok=True)
    (gateway.drop / "big.bin").write_bytes(b"x" * 5000)
    (gateway.drop / "small.txt").write_text("y" * 1000)
    big, small = _ready(gateway, "big.bin"), _ready(gateway, "small.txt")
    disk = {"free": reserve + 3000}
    monkeypatch.setattr(intake_mod, "disk_room", lambda _: (disk["free"], 100 * reserve))

    assert intake._room_for(bulk, big, logged=False) is None  # waits: 5000 > 3000
    assert intake._room_for(bulk, small, logged=False) is None  # would fit, but big was first
    disk["free"] = reserve + 5500
    assert intake._room_for(bulk, small, logged=True) is None  # (still only room for big)
    assert intake._room_for(bulk, big, logged=True) == 5001  # its turn
    assert intake._room_for(bulk, small, logged=True) is None  # (big's copy claims the room)
    intake._copying -= 5001
    disk["free"] = reserve + 1000
    assert intake._room_for(bulk, small, logged=True) == 1001
    intake._copying -= 1001
    assert intake._waiters == {}

    # a waiting file its clerk deletes holds up no one
    (gateway.drop / "big2.bin").write_bytes(b"x" * 5000)
    big2 = _ready(gateway, "big2.bin")
    assert intake._room_for(bulk, big2, logged=False) is None
    assert intake._room_for(bulk, small, logged=True) is None  # (behind big2)
    (gateway.drop / "big2.bin").unlink()
    assert intake._room_for(bulk, big2, logged=True) == 0
    assert list(intake._waiters) == [small.path]
    assert intake._room_for(bulk, small, logged=True) == 1001
    assert intake._waiters == {}


def test_a_file_refused_by_a_check_keeps_its_sha256_with_its_reasons(gateway: Gateway) -> None:
    """What a release may set aside is the content that was checked: its hash is written with
    the refusal, not taken from the quarantined file when it is released (its clerk may still
    be able to change it there)."""
    gateway.drop.mkdir(parents=True, exist_ok=True)
    data = b"refused content\n"
    (gateway.drop / "memo.txt").write_bytes(data)
    ready = _ready(gateway, "memo.txt")

    def refuse(ch: Any, tmp: Path, name: str) -> None:
        raise PolicyRejection("BLOCKED_TYPE", "refused by a content check")

    gateway.intake._checks = (refuse,)
    assert gateway.intake._prepare(replace(gateway.channel, content=None), ready) is None
    reason = json.loads((gateway.quarantine / "memo.txt.reason.json").read_text())
    assert reason["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_refused_file_its_quarantine_cannot_take_is_refused_once_and_moved_when_there_is_room(
    gateway: Gateway,
) -> None:
    """A quarantine on a full disk: the refused file stays in the drop folder. At its later
    turns (each rescan) only its move is tried again: it is not copied, checked, logged or
    recorded refused again; once there is room it is moved, recorded ``quarantine.added``
    (late) once. A version saved since is checked afresh."""
    gateway.drop.mkdir(parents=True, exist_ok=True)
    gateway.quarantine.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(gateway.quarantine)], check=True
    )
    try:
        filler = gateway.quarantine / "filler"
        filler.write_bytes(b"\0" * (3 * 1024 * 1024 + 512 * 1024))
        data = os.urandom(300_000)
        (gateway.drop / "memo.txt").write_bytes(data)
        ready = _ready(gateway, "memo.txt")
        checked: list[str] = []

        def refuse(ch: Any, tmp: Path, name: str) -> None:
            checked.append(name)
            raise PolicyRejection("BLOCKED_TYPE", "refused by a content check")

        intake = gateway.intake
        intake._checks = (refuse,)
        bulk = replace(gateway.channel, content=None)
        assert intake._prepare(bulk, ready) is None
        assert (gateway.drop / "memo.txt").read_bytes() == data  # left where it was
        for _ in range(3):  # (three rescans)
            assert intake._retry_unmoved(bulk, ready)
        assert checked == ["memo.txt"]
        assert (gateway.drop / "memo.txt").read_bytes() == data
        assert not (gateway.quarantine / "memo.txt").exists()
        assert [p.name for p in gateway.quarantine.iterdir()] == ["filler"]
        events = [r["event"] for r in gateway.records()]
        assert events.count("intake.rejected") == 1
        assert "quarantine.added" not in events

        filler.unlink()  # room again
        assert intake._retry_unmoved(bulk, ready)
        assert (gateway.quarantine / "memo.txt").read_bytes() == data
        assert not (gateway.drop / "memo.txt").exists()
        reason = json.loads((gateway.quarantine / "memo.txt.reason.json").read_text())
        assert reason["reason_code"] == "BLOCKED_TYPE"
        assert reason["sha256"] == hashlib.sha256(data).hexdigest()
        records = gateway.records()
        assert [r["event"] for r in records].count("intake.rejected") == 1
        added = [r for r in records if r["event"] == "quarantine.added"]
        assert len(added) == 1
        assert added[0]["detail"] == {"reason_code": "BLOCKED_TYPE", "late": True}
        assert not intake._retry_unmoved(bulk, ready)  # forgotten once moved
        assert checked == ["memo.txt"]

        filler.write_bytes(b"\0" * (3 * 1024 * 1024 + 512 * 1024))  # full again
        (gateway.drop / "inplace.txt").write_bytes(data)
        kept = _ready(gateway, "inplace.txt")
        assert intake._prepare(bulk, kept) is None
        assert intake._retry_unmoved(bulk, kept)  # (still that version: only its move)
        with open(gateway.drop / "inplace.txt", "r+b") as f:  # rewritten in place, same size
            f.write(os.urandom(len(data)))
        os.utime(gateway.drop / "inplace.txt", ns=(kept.mtime_ns, kept.mtime_ns))  # date too
        assert _ready(gateway, "inplace.txt") == kept  # (what a scan sees is the same)
        assert not intake._retry_unmoved(bulk, kept)  # another version: checked afresh
        assert checked[-1] == "inplace.txt"
        assert intake._prepare(bulk, kept) is None
        assert checked[-2:] == ["inplace.txt", "inplace.txt"]
        (gateway.drop / "next.txt").write_bytes(data)
        first = _ready(gateway, "next.txt")
        assert intake._prepare(bulk, first) is None
        os.utime(gateway.drop / "next.txt", ns=(first.mtime_ns + 10**9,) * 2)  # saved again
        again = _ready(gateway, "next.txt")
        assert not intake._retry_unmoved(bulk, again)  # a new version: checked afresh
        assert not intake._retry_unmoved(bulk, first)  # (and the old one forgotten)
        assert intake._prepare(bulk, again) is None
        assert checked[-2:] == ["next.txt", "next.txt"]
    finally:
        subprocess.run(["umount", "-l", str(gateway.quarantine)], check=True)

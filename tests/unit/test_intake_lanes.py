"""Each files channel's intake runs on its own; ``FolderIntake.stalled`` tells which one has
shown no progress (a folder that stopped answering), but not one merely waiting for files.
(The real thing, a FUSE share that stops answering, is in tests/integration/test_share_drop.py.)"""

from __future__ import annotations

import threading
import time

import pytest
from intake_helpers import Gateway

from ferry.place import TEMP_PREFIX
from ferry.quarantine_release import locked
from outside.intake import _remove_release_temps


def test_a_channel_waiting_for_files_is_not_stalled(gateway: Gateway) -> None:
    gateway.intake._lanes["documents"].watcher.start()
    waiting = threading.Thread(target=gateway.intake.step, args=("documents", 1.5))
    waiting.start()
    time.sleep(0.8)
    assert gateway.intake.stalled(0.3) == {}  # (its wait for files is not a stall)
    waiting.join(5)
    assert gateway.intake.stalled() == {}  # between steps: nothing to report


def test_a_channel_held_up_by_its_folder_is_named_with_its_wait(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    lane = gateway.intake._lanes["documents"]

    def hung(timeout: float) -> tuple[list[object], list[object]]:
        release.wait(10)  # as a stat on a share whose server is gone
        return [], []

    monkeypatch.setattr(lane.watcher, "poll", hung)
    stuck = threading.Thread(target=gateway.intake.step, args=("documents", 0.1))
    stuck.start()
    try:
        time.sleep(0.6)
        found = gateway.intake.stalled(0.3)
        assert list(found) == ["documents"]
        assert 0.3 <= found["documents"] < 5
    finally:
        release.set()
        stuck.join(5)
    assert gateway.intake.stalled() == {}


def test_a_release_copy_cut_short_leaves_no_temp_in_the_drop_folder(gateway: Gateway) -> None:
    """A release across file systems copies under a hidden temp name in the drop folder; one
    cut short (a crash, a full disk) leaves it there. The channel's thread removes such
    temps when it starts, but never one a release under way still holds (the quarantine
    folder's lock), and nothing else that only looks similar."""
    gateway.drop.mkdir(parents=True, exist_ok=True)
    stale = gateway.drop / f"{TEMP_PREFIX}{'cd' * 8}.part"
    other = gateway.drop / ".ferry-notes.part"  # (a clerk's, not ours)
    for path in (stale, other):
        path.write_bytes(b"half a copy")
    with locked(gateway.quarantine):  # a release at work
        assert _remove_release_temps(gateway.channel) == 0
        assert stale.exists()
    gateway.intake.start(lambda items: None, poll_interval=0.1)
    try:
        deadline = time.monotonic() + 10
        while stale.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not stale.exists()
        assert other.read_bytes() == b"half a copy"
    finally:
        gateway.intake.stop()

"""Each files channel's intake runs on its own; ``FolderIntake.stalled`` tells which one has
shown no progress (a folder that stopped answering), but not one merely waiting for files.
(The real thing, a FUSE share that stops answering, is in tests/integration/test_share_drop.py.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_quarantine_override import Gateway, pipeline  # noqa: F401 (a fixture)

from outside.content.pipeline import ContentPipeline


@pytest.fixture
def gw(tmp_path: Path, pipeline: ContentPipeline) -> Iterator[Gateway]:  # noqa: F811
    g = Gateway(tmp_path, pipeline)
    yield g
    g.close()


def test_a_channel_waiting_for_files_is_not_stalled(gw: Gateway) -> None:
    gw.intake._lanes["documents"].watcher.start()
    waiting = threading.Thread(target=gw.intake.step, args=("documents", 1.5))
    waiting.start()
    time.sleep(0.8)
    assert gw.intake.stalled(0.3) == {}  # (its wait for files is not a stall)
    waiting.join(5)
    assert gw.intake.stalled() == {}  # between steps: nothing to report


def test_a_channel_held_up_by_its_folder_is_named_with_its_wait(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    lane = gw.intake._lanes["documents"]

    def hung(timeout: float) -> tuple[list[object], list[object]]:
        release.wait(10)  # as a stat on a share whose server is gone
        return [], []

    monkeypatch.setattr(lane.watcher, "poll", hung)
    stuck = threading.Thread(target=gw.intake.step, args=("documents", 0.1))
    stuck.start()
    try:
        time.sleep(0.6)
        found = gw.intake.stalled(0.3)
        assert list(found) == ["documents"]
        assert 0.3 <= found["documents"] < 5
    finally:
        release.set()
        stuck.join(5)
    assert gw.intake.stalled() == {}

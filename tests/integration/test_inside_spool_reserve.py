"""The inside keeps room on its state disk for its ledger, audit log and messages
(``inside.spool_reserve``). An incoming object that would leave less is not spooled at
all: recorded lost (not refused: a repeat is taken once there is room), while messages and
smaller files go on. A spool file whose write fails (the disk filled up from elsewhere)
gives its room back at once, not when the rest of its object has arrived. Real agents; the
inside's state folder is a real tmpfs."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import application, drop_file, edit_yaml, fast_bulk, fill_disk, init, opaque
from test_audit_agents import records, wait_for

from ferry.client import Client
from ferry.state import free_bytes

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@contextmanager
def lowest_free(folder: Path) -> Iterator[list[int]]:
    """The least room seen on ``folder``'s file system while the block runs (sampled every
    2 ms), in a one-item list."""
    low = [free_bytes(folder) or 0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            low[0] = min(low[0], free_bytes(folder) or 0)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield low
    finally:
        done.set()
        t.join()


def _deployment(
    tmp_path: Path, *, reserve: str, rate: str | None = None, repeat: bool = False
) -> dict[str, Any]:
    dep = init(tmp_path / "d")

    def outside(data: dict[str, Any]) -> None:
        fast_bulk(data)
        if rate is not None:
            data["link"]["rate"] = rate
        for ch in data["channels"]:
            if repeat and ch["name"] == "documents":
                ch["repeat"] = {"count": 2, "spread": 6}

    def inside(data: dict[str, Any]) -> None:
        opaque(data)
        data.setdefault("inside", {})["spool_reserve"] = reserve
        data["inside"]["object_timeout"] = 3

    edit_yaml(dep["outside"]["config"], outside)
    edit_yaml(dep["inside"]["config"], inside)
    return dep


@pytest.mark.slow  # (10-40 s: run with `python3 tasks.py test --slow`)
def test_an_object_that_would_leave_less_than_the_reserve_is_not_spooled_and_the_rest_goes_on(
    tmp_path: Path, agents: Any, small_audit_disk: Any
) -> None:
    dep = _deployment(tmp_path, reserve="8M", repeat=True)
    state = small_audit_disk(dep["inside"]["state_dir"], size="24m")
    inside = agents("inside", dep["inside"]["config"])
    inside.wait_event("inside_started")
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("api_listening")
    drop = Path(dep["channels"]["documents"]["drop"])
    deliver = Path(dep["channels"]["documents"]["deliver"])
    filler = state / "filler"
    filler.write_bytes(bytes(6 * MiB))
    room = free_bytes(state)
    assert room is not None
    assert 14 * MiB < room < 18 * MiB

    big = os.urandom(12 * MiB)
    with lowest_free(state) as low:
        drop_file(drop, "big.bin", big)  # 12 + 8 > what is free
        refused = inside.wait_event("object_not_spooled", timeout=60)
        assert "no room" in refused["reason"], refused
        assert f"less than {8 * MiB} bytes free" in refused["reason"], refused
        with Client.from_config(dep["api"]["client_config"]) as client:
            client.submit("messages", application(1), schema="citizen-application")
        messages = Path(dep["channels"]["messages"]["deliver"])
        wait_for(lambda: list(messages.glob("*.json")), what="the message", timeout=60)
        small = os.urandom(2 * MiB)
        drop_file(drop, "small.bin", small)  # 2 + 8 fit
        wait_for((deliver / "small.bin").exists, what="the smaller file", timeout=60)
        wait_for(
            lambda: any(
                r["event"] == "transfer.lost" and "no room" in r.get("reason", "")
                for r in records(dep["inside"]["audit_dir"])
            ),
            what="the big file recorded lost",
            timeout=60,
        )
    # Only small.bin's 2 MiB were spooled; without the reserve, big.bin's spool file would
    # have taken 12 of the ~17 MiB free.
    assert low[0] > 10 * MiB, low[0]
    assert (deliver / "small.bin").read_bytes() == small
    assert not (deliver / "big.bin").exists()

    filler.unlink()  # room again: the big file's repeat is taken
    wait_for((deliver / "big.bin").exists, what="the big file's repeat", timeout=60)
    assert (deliver / "big.bin").read_bytes() == big
    # the rest of the refused copy (its last repair symbols) timed out 3 s after it, before
    # the repeat: not recorded lost a second time
    inside.wait_event("repeat_lost", timeout=10)
    lost = [r for r in records(dep["inside"]["audit_dir"]) if r["event"] == "transfer.lost"]
    assert len(lost) == 1, lost
    assert lost[0]["reason"].startswith("NOT_SPOOLED: "), lost
    assert list(state.glob("incoming/*.part")) == []
    assert inside.proc.poll() is None
    assert outside.proc.poll() is None


@pytest.mark.slow  # (10-40 s: run with `python3 tasks.py test --slow`)
def test_a_spool_file_whose_write_fails_gives_its_room_back_at_once(
    tmp_path: Path, agents: Any, small_audit_disk: Any
) -> None:
    # about 5 MB/s: the 16 MiB file takes seconds to arrive
    dep = _deployment(tmp_path, reserve="1", rate="40M")
    state = small_audit_disk(dep["inside"]["state_dir"], size="24m")
    inside = agents("inside", dep["inside"]["config"])
    inside.wait_event("inside_started")
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("api_listening")
    drop_file(Path(dep["channels"]["documents"]["drop"]), "big.bin", os.urandom(16 * MiB))

    def part_size() -> int:
        return sum(p.stat().st_size for p in state.glob("incoming/*.part"))

    wait_for(lambda: part_size() > 2 * MiB, what="the spool file growing", timeout=60)
    filler = fill_disk(state)  # the rest of its blocks cannot be written
    failed = inside.wait_event("object_not_spooled", timeout=30)
    assert "No space left on device" in failed["reason"], failed
    # (about 14 MiB, nearly 3 s of the link, were still to come)
    wait_for(lambda: part_size() == 0, what="the spool file removed", timeout=1)
    room = free_bytes(state)
    assert room is not None
    assert room > 2 * MiB  # (its blocks given back to the disk)

    def arrived() -> bool:
        return any(
            e.get("event") == "object_not_spooled" and e["reason"].startswith("NOT_SPOOLED")
            for e in inside.events()
        )

    assert not arrived(), "the object had already finished arriving"
    wait_for(arrived, what="the object recorded lost once it had arrived", timeout=60)
    filler.unlink()
    lost = [r for r in records(dep["inside"]["audit_dir"]) if r["event"] == "transfer.lost"]
    assert len(lost) == 1, lost
    assert "No space left on device" in lost[0]["reason"], lost
    assert inside.proc.poll() is None

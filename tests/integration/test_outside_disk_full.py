"""The outside's own disk fills up (its state: spool, status file): nothing is acknowledged
that is not spooled, the agent keeps running, and everything goes through once there is
room again. Real agents; the outside's state folder is a real 2 MiB tmpfs, filled up."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import (
    application,
    drop_file,
    edit_yaml,
    empty_wal,
    fast,
    fill_disk,
    init,
    wait_files,
)

from ferry.client import ApiUnavailable, Client

pytestmark = pytest.mark.integration


def test_a_full_outside_disk_answers_busy_keeps_the_file_and_recovers(
    tmp_path: Path, agents: Any, small_audit_disk: Any
) -> None:
    dep = init(tmp_path / "d")

    def quick_rescan(data: dict[str, Any]) -> None:
        fast(data)
        for ch in data["channels"]:
            if ch["name"] == "documents":
                ch["rescan_seconds"] = 1.0

    edit_yaml(dep["outside"]["config"], quick_rescan)
    state = small_audit_disk(dep["outside"]["state_dir"])
    agents("inside", dep["inside"]["config"])
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("api_listening")
    status = state / "status.json"
    empty_wal(state / "outside.db")
    filler = fill_disk(state)

    drop = Path(dep["channels"]["documents"]["drop"])
    drop_file(drop, "a.txt", b"a clerk's letter\n")
    sid = str(uuid.uuid4())
    with Client.from_config(dep["api"]["client_config"]) as client:
        with pytest.raises(ApiUnavailable, match="busy"):
            client.submit(
                "messages", application(1), schema="citizen-application",
                submission_id=sid, timeout=3.0,
            )  # fmt: skip
        held = outside.wait_event("submissions_held")
        assert held["reason"] == "the spool's disk is full"
        waiting = outside.wait_event("intake_waiting_for_room")  # (not even tried)
        assert waiting["name"] == "a.txt"
        outside.wait_event("status_not_written")
        time.sleep(1.0)
        assert outside.proc.poll() is None  # it keeps running
        assert (drop / "a.txt").exists()  # not taken: it waits in the drop folder
        events = [e["event"] for e in outside.events()]
        assert "spool_commit_failed" not in events

        filler.unlink()  # room again
        room_again = time.time()
        ack = client.submit(
            "messages", application(1), schema="citizen-application",
            submission_id=sid, timeout=30.0,
        )  # fmt: skip
        assert ack.id == sid  # accepted, with the same submission id
    assert wait_files(dep["channels"]["documents"]["deliver"], {"a.txt"}, timeout=60) == {
        "a.txt": b"a clerk's letter\n"
    }
    messages = Path(dep["channels"]["messages"]["deliver"])
    deadline = time.monotonic() + 30
    while not list(messages.glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    (delivered,) = messages.glob("*.json")
    assert json.loads(delivered.read_bytes())["application_id"] == str(uuid.UUID(int=2))
    # written again (twice a second; the file may never have been written before the disk
    # filled, so wait for it rather than expect it at once)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        not status.exists() or json.loads(status.read_text())["written_at"] < room_again
    ):
        time.sleep(0.1)
    assert json.loads(status.read_text())["written_at"] >= room_again


@pytest.mark.slow  # (5-20 s: run with `python3 tasks.py test --slow`)
def test_sends_the_full_disk_cannot_record_are_recorded_later_and_nothing_is_lost(
    tmp_path: Path, agents: Any, small_audit_disk: Any
) -> None:
    """The disk fills while accepted messages are still being sent (three copies each over
    4 s): the sender keeps sending, the agent keeps running, and once there is room its
    records catch up; every message arrives once."""
    dep = init(tmp_path / "d")

    def repeats(data: dict[str, Any]) -> None:
        fast(data)
        for ch in data["channels"]:
            if ch["name"] == "messages":
                ch["repeat"] = {"count": 3, "spread": 4}

    edit_yaml(dep["outside"]["config"], repeats)
    state = small_audit_disk(dep["outside"]["state_dir"])
    agents("inside", dep["inside"]["config"])
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("api_listening")
    with Client.from_config(dep["api"]["client_config"]) as client:
        for n in range(30):
            client.submit("messages", application(n), schema="citizen-application")
    empty_wal(state / "outside.db")
    filler = fill_disk(state)
    outside.wait_event("sends_not_recorded")
    time.sleep(1.0)
    assert outside.proc.poll() is None
    filler.unlink()
    messages = Path(dep["channels"]["messages"]["deliver"])
    deadline = time.monotonic() + 30
    while len(list(messages.glob("*.json"))) < 30 and time.monotonic() < deadline:
        time.sleep(0.1)
    got = {json.loads(p.read_bytes())["application_id"] for p in messages.glob("*.json")}
    assert got == {str(uuid.UUID(int=n + 1)) for n in range(30)}
    with sqlite3.connect(state / "outside.db") as db:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            (left,) = db.execute(
                "SELECT count(*) FROM items WHERE kind='message' AND state!='sent'"
            ).fetchone()
            if left == 0:
                break
            time.sleep(0.2)
    assert left == 0  # every copy recorded in the end
    assert outside.proc.poll() is None

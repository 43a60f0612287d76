"""The inside's own disk fills up (its state: spool, ledger, status file). The agent keeps
running; a message whose ledger commit does not fit waits and is delivered once there is
room; a file that arrives while nothing can be spooled is recorded as lost (not refused:
a repeat of it is delivered); later files cross. Real agents; the inside's state folder
is a real 2 MiB tmpfs, filled up before the outside starts (so its session's replay floor
waits in memory until it can be saved)."""

from __future__ import annotations

import json
import sqlite3
import time
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
from test_audit_agents import wait_for

from ferry.client import Client

pytestmark = pytest.mark.integration


@pytest.mark.slow  # (5-10 s: run with `python3 tasks.py test --slow`)
def test_a_full_inside_disk_holds_messages_loses_nothing_it_could_keep_and_recovers(
    tmp_path: Path, agents: Any, small_audit_disk: Any
) -> None:
    dep = init(tmp_path / "d")

    def repeat_files(data: dict[str, Any]) -> None:
        fast(data)
        for ch in data["channels"]:
            if ch["name"] == "documents":
                ch["repeat"] = {"count": 2, "spread": 6}

    edit_yaml(dep["outside"]["config"], repeat_files)
    state = small_audit_disk(dep["inside"]["state_dir"])
    inside = agents("inside", dep["inside"]["config"])
    inside.wait_event("inside_started")
    empty_wal(state / "inside.db")
    filler = fill_disk(state)
    outside = agents("outside", dep["outside"]["config"])  # its session starts on a full disk
    outside.wait_event("api_listening")
    inside.wait_event("replay_floor_not_saved")

    drop_file(Path(dep["channels"]["documents"]["drop"]), "a.txt", b"a clerk's letter\n")
    with Client.from_config(dep["api"]["client_config"]) as client:
        client.submit("messages", application(1), schema="citizen-application")
    inside.wait_event("object_not_spooled")
    inside.wait_event("messages_waiting_for_folder")
    time.sleep(1.0)
    assert inside.proc.poll() is None  # it keeps running
    assert list((state / "rejected").iterdir()) == []

    filler.unlink()  # room again
    messages = Path(dep["channels"]["messages"]["deliver"])
    wait_for(lambda: list(messages.glob("*.json")), what="the message", timeout=60)
    assert wait_files(dep["channels"]["documents"]["deliver"], {"a.txt"}, timeout=60) == {
        "a.txt": b"a clerk's letter\n"  # its repeat
    }
    drop_file(Path(dep["channels"]["documents"]["drop"]), "b.txt", b"a later letter\n")
    assert wait_files(dep["channels"]["documents"]["deliver"], {"b.txt"}, timeout=60)
    wait_for(
        lambda: json.loads((state / "status.json").read_text())["delivered"] == 3,
        what="the status file written again, counting the three",
    )
    assert inside.proc.poll() is None
    with sqlite3.connect(state / "inside.db") as db:  # the session's floor, saved since
        assert db.execute("SELECT count(*) FROM replay").fetchone() == (1,)

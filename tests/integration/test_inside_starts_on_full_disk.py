"""An inside started when its state disk is already full: it does not start half-way; it
exits at once with an error that names the full disk (not SQLite's "disk I/O error"), and
once there is room again it starts and delivers. Real agents; the inside's state folder
is a real 2 MiB tmpfs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cli_helpers import application, edit_yaml, fast, fill_disk, init
from test_audit_agents import wait_for

from ferry.client import Client

pytestmark = pytest.mark.integration


def test_an_inside_started_on_a_full_disk_says_so_and_starts_once_there_is_room(
    tmp_path: Path, agents: Any, small_audit_disk: Any
) -> None:
    dep = init(tmp_path / "d")
    edit_yaml(dep["outside"]["config"], fast)
    state = small_audit_disk(dep["inside"]["state_dir"])
    first = agents("inside", dep["inside"]["config"])
    first.wait_event("inside_started")
    assert first.stop() == 0
    assert not (state / "inside.db-wal").exists()  # (a clean stop: the next open makes it)
    filler = fill_disk(state)

    refused = agents("inside", dep["inside"]["config"])
    assert refused.proc.wait(timeout=30) != 0
    text = refused.log.read_text()
    assert "inside.db: cannot open state database: its disk is full" in text
    assert "make room there and start again" in text
    assert "Traceback" not in text

    filler.unlink()
    inside = agents("inside", dep["inside"]["config"])
    inside.wait_event("inside_started")
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("api_listening")
    with Client.from_config(dep["api"]["client_config"]) as client:
        client.submit("messages", application(1), schema="citizen-application")
    messages = Path(dep["channels"]["messages"]["deliver"])
    wait_for(lambda: list(messages.glob("*.json")), what="the message", timeout=60)
    assert inside.proc.poll() is None

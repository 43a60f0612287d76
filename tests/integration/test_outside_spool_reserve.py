"""The outside keeps room on its state disk for the spool's database, the API's messages and
the audit log (``outside.spool_reserve``). A clerk's file that would leave less waits in its
drop folder, untouched, and is taken once there is room; the API goes on accepting
meanwhile. A file that could never leave it is quarantined with a reason a clerk can read.
Real agents; the outside's state folder is a real tmpfs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import application, drop_file, edit_yaml, fast_bulk, init, opaque, wait_files
from test_audit_agents import records, wait_for

from ferry.client import Client
from ferry.state import free_bytes

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def test_a_file_that_would_leave_less_than_the_reserve_waits_and_one_that_never_fits_is_quarantined(
    tmp_path: Path, agents: Any, small_audit_disk: Any
) -> None:
    dep = init(tmp_path / "d")

    def outside(data: dict[str, Any]) -> None:
        fast_bulk(data)
        data["outside"]["spool_reserve"] = "8M"

    edit_yaml(dep["outside"]["config"], outside)
    edit_yaml(dep["inside"]["config"], opaque)
    state = small_audit_disk(dep["outside"]["state_dir"], size="24m")
    inside = agents("inside", dep["inside"]["config"])
    inside.wait_event("inside_started")
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("api_listening")
    docs = dep["channels"]["documents"]
    drop, deliver = Path(docs["drop"]), Path(docs["deliver"])

    filler = state / "filler"
    filler.write_bytes(b"\0" * (8 * MiB))  # about 15 MiB left
    free = free_bytes(state)
    assert free is not None
    assert 10 * MiB + 8 * MiB > free > 10 * MiB
    data = os.urandom(10 * MiB)
    drop_file(drop, "waits.bin", data)
    waiting = outside.wait_event("intake_waiting_for_room")
    assert waiting["name"] == "waits.bin"
    assert waiting["reserve"] == 8 * MiB
    with Client.from_config(dep["api"]["client_config"]) as client:  # not BUSY
        ack = client.submit("messages", application(1), schema="citizen-application")
    assert ack.item
    messages = Path(dep["channels"]["messages"]["deliver"])
    wait_for(lambda: list(messages.glob("*.json")), what="the message", timeout=60)
    time.sleep(1.0)  # (about ten of the intake's turns)
    assert (drop / "waits.bin").read_bytes() == data  # untouched, still waiting
    assert list(state.glob("intake/*.part")) == []
    waits = [e for e in outside.events() if e.get("event") == "intake_waiting_for_room"]
    assert len(waits) == 1, waits  # (said once, not every turn)

    filler.unlink()  # room again: taken at the next turn
    assert wait_files(deliver, {"waits.bin"}, timeout=60) == {"waits.bin": data}
    assert not (drop / "waits.bin").exists()

    drop_file(drop, "never.bin", os.urandom(20 * MiB))  # 20 + 8 > the 24 MiB disk
    quarantine = Path(docs["quarantine"])
    reason = wait_for(
        lambda: list(quarantine.glob("never.bin.reason.json")), what="the reason", timeout=30
    )[0]
    why = json.loads(reason.read_text())
    assert why["reason_code"] == "TOO_LARGE", why
    assert "more than the gateway's disk can ever take" in why["message"], why
    assert (quarantine / "never.bin").stat().st_size == 20 * MiB
    assert not (drop / "never.bin").exists()
    refused = [
        r
        for r in records(dep["outside"]["audit_dir"])
        if r["event"] == "intake.rejected" and r.get("reason", "").startswith("TOO_LARGE")
    ]
    assert len(refused) == 1, refused
    assert outside.proc.poll() is None
    assert inside.proc.poll() is None

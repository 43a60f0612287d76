"""A quarantine folder whose disk is full: a refused file stays in its drop folder, is
refused (recorded, logged) once, not again at every rescan, and is moved to the quarantine
with its reasons once there is room. Real agents; the quarantine folder is a real tmpfs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import drop_file, edit_yaml, fast, init
from test_audit_agents import records, wait_for

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def test_a_refused_file_waits_for_room_in_the_quarantine_refused_once(
    tmp_path: Path, agents: Any, small_audit_disk: Any
) -> None:
    dep = init(tmp_path / "d")

    def outside(data: dict[str, Any]) -> None:
        fast(data)
        for ch in data["channels"]:
            if ch["name"] == "documents":
                ch["max_size"] = 100_000
                ch["rescan_seconds"] = 0.2  # (a rescan about every 0.2 s)

    edit_yaml(dep["outside"]["config"], outside)
    docs = dep["channels"]["documents"]
    drop, quarantine = Path(docs["drop"]), Path(docs["quarantine"])
    quarantine.mkdir(parents=True, exist_ok=True)
    small_audit_disk(quarantine, size="4m")
    filler = quarantine / "filler"
    filler.write_bytes(b"\0" * (3 * MiB + MiB // 2))  # room for no 300 kB file (and margin)
    outside_agent = agents("outside", dep["outside"]["config"])
    outside_agent.wait_event("api_listening")

    data = os.urandom(300_000)
    drop.mkdir(parents=True, exist_ok=True)
    drop_file(drop, "scan.tif", data)

    def rejected() -> list[dict[str, Any]]:
        return [r for r in records(dep["outside"]["audit_dir"]) if r["event"] == "intake.rejected"]

    first = wait_for(rejected, what="the refusal", timeout=30)
    assert first[0]["reason"].startswith("TOO_LARGE: the file is 300000 bytes"), first
    time.sleep(2.0)  # (about ten rescans)
    assert len(rejected()) == 1
    assert (drop / "scan.tif").read_bytes() == data  # left where the clerk put it
    assert not (quarantine / "scan.tif").exists()
    left = [
        e for e in outside_agent.events() if e.get("event") == "refused_file_left_in_drop_folder"
    ]
    assert len(left) == 1, left
    failed = [
        e
        for e in outside_agent.events()
        if e.get("event") == "quarantine_failed" and e.get("level") != "debug"
    ]
    assert len(failed) == 1, failed

    filler.unlink()  # room again: moved at the next turn
    wait_for((quarantine / "scan.tif").exists, what="the quarantined file", timeout=30)
    assert (quarantine / "scan.tif").read_bytes() == data
    assert not (drop / "scan.tif").exists()
    why = json.loads((quarantine / "scan.tif.reason.json").read_text())
    assert why["reason_code"] == "TOO_LARGE"
    assert (quarantine / "scan.tif.reason.txt").exists()
    added = wait_for(
        lambda: [
            r for r in records(dep["outside"]["audit_dir"]) if r["event"] == "quarantine.added"
        ],
        what="the quarantine record",
    )
    assert len(added) == 1
    assert added[0]["detail"] == {"reason_code": "TOO_LARGE", "late": True}
    assert len(rejected()) == 1
    assert outside_agent.proc.poll() is None

"""A channel repeat schedule and an outside stopped for more than a week: the copies still due
when it comes back, past their deadline (a week after the first copy), are not sent (the
inside's ledger may have forgotten the item by then, and would deliver it a second time).
Real agents; the restarted ones run with their wall clocks eight days ahead."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import application, drop_file, edit_yaml, fast_bulk, ferry, init, opaque
from test_audit_agents import records, wait_for

from ferry.client import Client

pytestmark = pytest.mark.integration

DAYS = 8 * 24 * 3600.0


@pytest.mark.slow  # (5-20 s: run with `python3 tasks.py test --slow`)
def test_copies_due_past_their_deadline_are_not_sent(tmp_path: Path, agents: Any) -> None:
    dep = init(tmp_path / "d")

    def outside(data: dict[str, Any]) -> None:
        fast_bulk(data)
        for ch in data["channels"]:
            if ch["name"] in ("documents", "messages"):
                ch["repeat"] = {"count": 2, "spread": 60}  # (the second copy: a minute on)

    edit_yaml(dep["outside"]["config"], outside)
    edit_yaml(dep["inside"]["config"], opaque)
    inside = agents("inside", dep["inside"]["config"])
    inside.wait_event("inside_started")
    out = agents("outside", dep["outside"]["config"])
    out.wait_event("api_listening")
    docs, messages = dep["channels"]["documents"], dep["channels"]["messages"]
    drop_file(docs["drop"], "report.bin", os.urandom(200_000))
    with Client.from_config(dep["api"]["client_config"]) as client:
        ack = client.submit(
            "messages", application(1), schema="citizen-application", submission_id="app-1"
        )
    wait_for((Path(docs["deliver"]) / "report.bin").exists, what="the file")
    wait_for(lambda: list(Path(messages["deliver"]).glob("*.json")), what="the message")
    items = {ack.item}

    def sent() -> list[dict[str, Any]]:
        return [r for r in records(dep["outside"]["audit_dir"]) if r["event"] == "transfer.sent"]

    wait_for(lambda: len(sent()) >= 2, what="both first copies recorded")
    items |= {r["object"]["item"] for r in sent()}
    assert len(items) == 2
    spool = Path(dep["outside"]["state_dir"]) / "spool"
    assert [p for p in spool.iterdir() if p.is_file() and not p.name.startswith("outside")]
    out.proc.kill()  # kill -9, before the second copies are due
    out.proc.wait()
    inside.stop()

    # eight days later (both hosts' clocks): the second copies are past their deadline
    inside = agents("inside", dep["inside"]["config"], clock_offset=DAYS)
    inside.wait_event("inside_started")
    out = agents("outside", dep["outside"]["config"], clock_offset=DAYS)
    out.wait_event("repeats_expired")
    expired = wait_for(
        lambda: [
            r for r in records(dep["outside"]["audit_dir"]) if r["event"] == "transfer.expired"
        ],
        what="transfer.expired",
    )
    assert sorted(r["object"]["item"] for r in expired) == sorted(items)
    assert all(r["detail"] == {"sent": 1, "of": 2} for r in expired), expired
    assert all(r["result"] == "info" for r in expired)
    time.sleep(1.5)  # (what the outside would send, it sends at once)
    assert not [
        r for r in records(dep["outside"]["audit_dir"]) if r["event"] == "transfer.repeated"
    ]
    in_events = [r["event"] for r in records(dep["inside"]["audit_dir"])]
    assert "transfer.duplicate" not in in_events
    assert in_events.count("delivery.delivered") == 2
    assert not [p for p in spool.iterdir() if p.is_file() and not p.name.startswith("outside")]
    status = json.loads(ferry("status", "-c", dep["api"]["client_config"], "app-1").stdout)
    assert (status["state"], status["sends"], status["sends_planned"]) == ("sent", 1, 2), status
    assert status["expired"] is True
    assert out.proc.poll() is None

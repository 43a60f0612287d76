"""Intake records a crash took back. The outside commits an item to its spool and writes its
intake.accepted record; nothing is sent, and no ACCEPTED answered, before the record is on
disk. A crash while the record is not on disk yet (a power cut; kill -9 before the audit
writer wrote it) leaves the item in the spool without its record: at the next start, it is
recorded accepted again from the spool, marked recovered, and on disk before it is sent.

A real outside agent (subprocess) whose audit log is on a real FUSE mount (bindfs): its
daemon is stopped, so the audit writer's writes wait as they would for a disk that never
got them, while the spool (on the gateway's disk) commits; then kill -9.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import Share, drop_file, edit_yaml, fast, ferry, init
from test_audit_agents import wait_for
from test_intake_crash import RawClient, _db_rows, _kill

from ferry.audit.record import decode
from ferry.audit.segments import iter_lines, list_segments

pytestmark = pytest.mark.integration


def _records(audit_dir: Path) -> list[tuple[dict[str, Any], str]]:
    return [
        (decode(line.data), line.data.decode())
        for _, seg in list_segments(audit_dir)
        for line in iter_lines(seg)
    ]


def test_items_whose_intake_records_a_crash_took_back_are_recorded_before_they_are_sent(
    tmp_path: Path, agents: Any, network_share: Share
) -> None:
    dep = init(tmp_path / "d")
    config = dep["outside"]["config"]

    def audit_on(folder: Path) -> Any:
        def change(data: dict[str, Any]) -> None:
            fast(data)
            data["audit"]["dir"] = str(folder)
            data["audit"]["mirror"] = False  # (not the subject here)

        return change

    edit_yaml(config, audit_on(network_share.mount))
    db = Path(dep["outside"]["state_dir"]) / "outside.db"
    outside = agents("outside", config)
    outside.wait_event("api_listening")
    daemon = network_share.daemon()
    os.kill(daemon, signal.SIGSTOP)  # the audit log's disk takes nothing from now on
    client = RawClient(dep["api"]["client_config"])
    try:
        for n in range(2):
            drop_file(dep["channels"]["documents"]["drop"], f"note-{n}.txt", b"note %d" % n)

        def spooled() -> list[tuple[Any, ...]]:
            return _db_rows(db, "SELECT hex(object_id), kind, sends_done FROM items")

        wait_for(
            lambda: sum(k == "file" for _, k, _ in spooled()) == 2, what="both files in the spool"
        )
        # (the messages after the files: the API waits 5 s for their records, then says BUSY;
        # the files' content checks must not use up that time before the replies are read)
        for n in range(3):
            client.send(f"lost-{n}", n)
        wait_for(
            lambda: sum(k == "message" for _, k, _ in spooled()) > 0,
            what="the messages in the spool",
        )
        assert client.replies(500) == []  # no ACCEPTED: their records are not on disk
        _kill(outside)
    finally:
        os.kill(daemon, signal.SIGCONT)
        client.close()
    rows = spooled()
    assert all(sends == 0 for _, _, sends in rows)  # nothing was sent
    items = {oid.lower() for oid, _, _ in rows}
    files = {oid.lower() for oid, kind, _ in rows if kind == "file"}
    subprocess.run(["umount", str(network_share.mount)], check=True)
    audit_dir = network_share.server  # (the same files, now on the gateway's own disk)
    assert not any(i in line for _, line in _records(audit_dir) for i in items)

    edit_yaml(config, audit_on(audit_dir))
    outside = agents("outside", config)
    assert outside.wait_event("intake_records_recovered")["count"] == len(items)
    wait_for(
        lambda: all(s > 0 for _, _, s in _db_rows(db, "SELECT 1, 2, sends_done FROM items")),
        what="every item sent",
    )
    assert outside.stop() == 0
    verified = ferry(
        "audit", "verify", str(audit_dir), "--key", dep["outside"]["audit_public_key"],
        check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    records = _records(audit_dir)
    for item in items:
        about = [r for r, line in records if item in line]
        accepted = [r for r in about if r["event"] == "intake.accepted"]
        assert len(accepted) == 1, item  # once: never twice for one item
        assert accepted[0]["detail"] == {"recovered": True}
        assert accepted[0]["object"]["item"] == item
        sent = [r["idx"] for r in about if r["event"] == "transfer.sent"]
        assert sent, item
        assert accepted[0]["idx"] < min(sent)  # on record before it crossed
        verdicts = [r for r in about if r["event"] == "verdict"]
        if item in files:  # (the documents channel checks content: its verdict was lost too)
            assert len(verdicts) == 1, item
            assert verdicts[0]["detail"]["recovered"] is True
            assert verdicts[0]["detail"]["verdict"] in {"deliver_as_is", "deliver_cleaned"}
            assert verdicts[0]["detail"]["delivered_name"].startswith("note-")
            assert verdicts[0]["idx"] < accepted[0]["idx"]
        else:
            assert verdicts == []
    assert _db_rows(db, "SELECT count(*) FROM items WHERE intake_idx IS NULL") == [(0,)]
    again = agents("outside", config)  # a later start has nothing more to do
    again.wait_event("outside_started")
    assert again.stop() == 0
    assert "intake_records_recovered" not in [e["event"] for e in again.events()]

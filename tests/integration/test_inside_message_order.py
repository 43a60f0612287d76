"""The order of the durable steps when the inside delivers a batch of messages.

A real InsideAgent on a real ``ferry init`` deployment (keys, ledger, audit log, the
messages channel's folder); the messages are exactly what a bundle from the outside holds.
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import init
from test_recheck_inside import close_agent

from ferry.audit.record import AuditUnavailable, decode
from ferry.audit.segments import iter_lines, list_segments
from ferry.config import load_inside_config
from ferry.crypto.keys import load_secret_key
from ferry.jsondoc import SchemaRegistry
from ferry.wire import records as rec
from inside import agent as agent_mod
from inside.agent import InsideAgent
from outside.api import message_manifest

pytestmark = pytest.mark.integration

SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "messages"


def _message(key_id: bytes, seq: int) -> tuple[bytes, rec.Manifest, bytes]:
    doc = json.loads((SCHEMA / "citizen-application.schema.json").read_text())["examples"][0]
    doc["application_id"] = str(uuid.UUID(int=seq))
    _, canonical = SchemaRegistry.load().check("citizen-application", json.dumps(doc).encode())
    manifest = message_manifest(
        "messages", seq, "citizen-application", canonical, sender=key_id, client="portal"
    )
    oid = manifest.object_id
    return oid, manifest, canonical


def test_a_batch_is_on_disk_and_recorded_before_the_ledger_says_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files linked, their delivery records appended, then the folder fsynced while the
    audit writer syncs those records (not one wait after the other), and only when both
    are on disk does the ledger say delivered (and the consumers get them)."""
    dep = init(tmp_path / "d")
    cfg = load_inside_config(Path(dep["inside"]["config"]))
    agent = InsideAgent(cfg, threading.Event())
    folder = Path(dep["channels"]["messages"]["deliver"])
    key = load_secret_key(Path(dep["outside"]["signing_key"]), ("ed25519",))
    batch = [_message(key.public.key_id, seq) for seq in (1, 2, 3)]
    steps: list[tuple[str, Any]] = []
    real_fsync_dir, real_record_many = agent_mod.fsync_dir, agent.ledger.record_many

    def fsync_dir(path: Path) -> None:
        log = agent.audit.log
        steps.append(
            (
                "fsync_dir",
                (path, sorted(p.name for p in path.iterdir()), log.size, log.durable_size),
            )
        )
        real_fsync_dir(path)

    def record_many(rows: list[dict[str, Any]], **kw: Any) -> None:
        steps.append(("ledger", (len(rows), agent.audit.log.size, agent.audit.log.durable_size)))
        real_record_many(rows, **kw)

    monkeypatch.setattr(agent_mod, "fsync_dir", fsync_dir)
    monkeypatch.setattr(agent.ledger, "record_many", record_many)
    try:
        before = agent.audit.log.size
        agent._deliver_messages_audited(batch, agent._msg_lanes["messages"])
        states = agent.ledger.states_of([oid for oid, _, _ in batch])
        assert agent.outbox is not None
        queued = {i.object_id for i in agent.outbox.pending()}
    finally:
        close_agent(agent)
    names = sorted(m.name for _, m, _ in batch)
    assert [s[0] for s in steps] == ["fsync_dir", "ledger"]
    path, linked, size_at_fsync, _ = steps[0][1]
    assert path == folder
    assert linked == names  # every file already has its name when the folder is synced
    assert size_at_fsync == before + 2  # one received and one delivered record for the batch
    count, size_at_ledger, durable_at_ledger = steps[1][1]
    assert count == len(batch)
    assert durable_at_ledger >= size_at_ledger == before + 2
    assert states == {oid: "delivered" for oid, _, _ in batch}
    assert queued == {oid for oid, _, _ in batch}  # for the consumers, in the same transaction
    assert sorted(p.name for p in folder.iterdir()) == names


def test_a_batch_held_by_the_audit_log_is_recorded_once_when_it_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log refuses the batch's delivery record after taking its receipt record: the
    batch waits, then is delivered with one record of each event, files not doubled."""
    dep = init(tmp_path / "d")
    agent = InsideAgent(load_inside_config(Path(dep["inside"]["config"])), threading.Event())
    folder = Path(dep["channels"]["messages"]["deliver"])
    key = load_secret_key(Path(dep["outside"]["signing_key"]), ("ed25519",))
    batch = [_message(key.public.key_id, seq) for seq in (1, 2, 3)]
    real_record = agent.audit.record
    calls: list[str] = []

    def record(event: str, **kw: Any) -> int:
        calls.append(event)
        if event == "delivery.delivered" and calls.count(event) == 1:
            raise AuditUnavailable("disk full (test)")
        return real_record(event, **kw)

    waits: list[bool] = []
    monkeypatch.setattr(agent.audit, "record", record)
    monkeypatch.setattr(agent, "_wait_for_audit", lambda: waits.append(True) or True)
    try:
        before = agent.audit.log.size
        agent._deliver_messages_audited(batch, agent._msg_lanes["messages"])
        states = agent.ledger.states_of([oid for oid, _, _ in batch])
        audit_dir = agent.audit.log.directory
    finally:
        close_agent(agent)
    assert waits == [True]  # held once, then delivered
    assert calls[:3] == ["transfer.received", "delivery.delivered", "delivery.delivered"]
    assert "transfer.received" not in calls[1:]  # not written again on the retry
    assert states == {oid: "delivered" for oid, _, _ in batch}
    assert sorted(p.name for p in folder.iterdir()) == sorted(m.name for _, m, _ in batch)
    lines = [
        decode(line.data)
        for _, seg in list_segments(audit_dir)
        for line in iter_lines(seg)
        if line.complete
    ][before:]
    mine = [r for r in lines if r["event"] in ("transfer.received", "delivery.delivered")]
    assert [r["event"] for r in mine] == ["transfer.received", "delivery.delivered"]
    for r in mine:
        listed = sorted(e["item"] for e in r["object"]["items"])
        assert listed == sorted(oid.hex() for oid, _, _ in batch)
    assert {e["path"] for e in mine[1]["object"]["items"]} == {
        str(folder / m.name) for _, m, _ in batch
    }

"""Both agents, as subprocesses on a `ferry init` deployment, forget finished items older
than their ``retention_days`` when they start (and every 10 minutes after)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

from cli_helpers import Agent, init

from ferry.config import load_inside_config, load_outside_config
from inside.ledger import Ledger
from outside.spool import Accepted, MessageRequest, Sealed, Spool, now_us

DAY = 86_400_000_000


def _accept(spool: Spool, sid: str) -> Accepted:
    req = MessageRequest("portal", sid, hashlib.sha256(sid.encode()).digest(), "messages", 1, 0, 0)
    body = b"{}"
    ((acc, _),) = spool.accept_messages(
        [req], lambda r, seq: Sealed(os.urandom(16), body, f"m-{seq}.json", 2, bytes(32))
    )
    assert isinstance(acc, Accepted)
    return acc


def _age(state_dir: Path, object_id: bytes, by_us: int) -> None:
    with sqlite3.connect(state_dir / "outside.db") as db:
        db.execute(
            "UPDATE items SET next_send_us=next_send_us-?1, sent_us=sent_us-?1 WHERE object_id=?2",
            (by_us, object_id),
        )


def test_the_outside_agent_prunes_its_spool(tmp_path: Path) -> None:
    dep = init(tmp_path / "d")
    state = load_outside_config(Path(dep["outside"]["config"])).state_dir
    spool = Spool(state)
    old, fresh = _accept(spool, "old"), _accept(spool, "fresh")
    spool.mark_sent([old.object_id, fresh.object_id])
    spool.close()
    _age(state, old.object_id, 31 * DAY)  # the default retention is 30 days
    agent = Agent("outside", dep["outside"]["config"], tmp_path / "outside.log")
    try:
        agent.wait_event("spool_pruned", items=1)
    finally:
        assert agent.stop() == 0
    with sqlite3.connect(state / "outside.db") as db:
        left = db.execute("SELECT object_id FROM items WHERE kind='message'").fetchall()
        subs = db.execute("SELECT submission_id FROM submissions").fetchall()
    assert [bytes(r[0]) for r in left] == [fresh.object_id]
    assert subs == [("fresh",)]


def test_the_inside_agent_prunes_its_ledger(tmp_path: Path) -> None:
    dep = init(tmp_path / "d")
    state = load_inside_config(Path(dep["inside"]["config"])).state_dir
    ledger = Ledger(state)
    ledger.record(b"\x01" * 16, "delivered", channel="messages", seq=1)
    ledger.record(b"\x02" * 16, "delivered", channel="messages", seq=2)
    ledger.close()
    with sqlite3.connect(state / "inside.db") as db:
        db.execute("UPDATE objects SET updated_us=? WHERE seq=1", (now_us() - 31 * DAY,))
    agent = Agent("inside", dep["inside"]["config"], tmp_path / "inside.log")
    try:
        agent.wait_event("ledger_pruned", items=1)
    finally:
        assert agent.stop() == 0
    ledger = Ledger(state)
    assert ledger.state_of(b"\x01" * 16) is None
    assert ledger.state_of(b"\x02" * 16) == "delivered"
    assert ledger.seq_floors() == [("messages", 1)]
    ledger.close()

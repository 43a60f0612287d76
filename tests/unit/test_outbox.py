"""The consumer outbox (inside/consumers.py) on a real SQLite ledger: acknowledged rows lose
their bodies at once and go after the retention, so the outbox stays bounded."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from inside.consumers import Outbox, OutboxItem
from inside.ledger import Ledger


def _item(n: int) -> OutboxItem:
    return OutboxItem(
        bytes([n]) * 16, "messages", n, "citizen-application", "api:portal", n, b"{}" * 500
    )


def _rows(path: Path) -> dict[int, tuple[int | None, str | None, int]]:
    """seq -> (acked_us, acked_by, body length)"""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT seq, acked_us, acked_by, length(body) FROM outbox").fetchall()
    return {int(r[0]): (r[1], r[2], int(r[3])) for r in rows}


def test_acknowledged_messages_lose_their_bodies_and_are_pruned_after_retention(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path)
    outbox = Outbox(ledger)
    outbox.add_many([_item(n) for n in range(1, 7)])
    outbox.ack_many([_item(1).object_id, _item(2).object_id], "reader-a")
    rows = _rows(ledger.path)
    assert rows[1][1:] == ("reader-a", 0)  # body dropped, who acknowledged kept
    assert rows[3][1:] == (None, 1000)  # waiting: untouched
    assert [i.seq for i in outbox.pending()] == [3, 4, 5, 6]
    assert outbox.pending()[0].body == b"{}" * 500
    assert outbox.counts() == (4, 2)

    assert outbox.prune(int(time.time() * 1e6) - 10_000_000) == 0  # acked too recently
    outbox.ack_many([_item(1).object_id], "reader-b")  # a late second ack changes nothing
    assert _rows(ledger.path)[1][1] == "reader-a"
    assert outbox.prune(int(time.time() * 1e6) + 1, limit=1) == 1  # a batch at a time
    assert outbox.prune(int(time.time() * 1e6) + 1) == 1
    assert sorted(_rows(ledger.path)) == [3, 4, 5, 6]  # waiting messages are never pruned
    assert [i.seq for i in outbox.pending()] == [3, 4, 5, 6]
    outbox.close()
    ledger.close()

"""Retention: the outside spool and the inside ledger forget finished items after
``retention_days`` (real SQLite files), without forgetting anything still on its way, and a
restart does not take forgotten sequence numbers for gaps."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from pathlib import Path

from ferry.state import PRUNE_BATCH, PRUNE_INTERVAL, Retention
from inside.gaps import Gap, SequenceGaps
from inside.ledger import Ledger
from outside.spool import Accepted, MessageRequest, Sealed, Spool, now_us


def _req(sid: str) -> MessageRequest:
    return MessageRequest(
        client="portal",
        submission_id=sid,
        request_sha256=hashlib.sha256(sid.encode()).digest(),
        channel="messages",
        sends_total=1,
        spread_us=0,
        priority=0,
    )


def _seal(req: MessageRequest, seq: int) -> Sealed:
    return Sealed(os.urandom(16), b"{}" + b"T" * 10, f"m-{seq}.json", 2, bytes(32))


def _accept(spool: Spool, sid: str) -> Accepted:
    ((acc, _),) = spool.accept_messages([_req(sid)], _seal)
    assert isinstance(acc, Accepted)
    return acc


def _age(state_dir: Path, object_id: bytes, by_us: int) -> None:
    """Make an item accepted, due and sent ``by_us`` earlier than it was."""
    with sqlite3.connect(state_dir / "outside.db") as db:
        db.execute(
            "UPDATE items SET created_us=created_us-?1, next_send_us=next_send_us-?1,"
            " first_sent_us=first_sent_us-?1, sent_us=sent_us-?1 WHERE object_id=?2",
            (by_us, object_id),
        )


def test_the_spool_forgets_items_sent_before_the_retention_and_only_those(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path)
    old, recent, queued = (_accept(spool, sid) for sid in ("old", "recent", "queued"))
    day = 86_400_000_000
    t = now_us()
    spool.mark_sent([old.object_id, recent.object_id], now=t)
    _age(tmp_path, old.object_id, 40 * day)
    _age(tmp_path, recent.object_id, 1 * day)
    assert spool.prune(t - 30 * day) == 1
    assert spool.prune(t - 30 * day) == 0
    assert spool.submission("portal", "old") is None  # forgotten: a status query says unknown
    assert spool.submission("portal", "recent") is not None
    assert spool.submission("portal", "queued") is not None  # never sent: never forgotten
    assert [i.object_id for i in spool.due(t + day)] == [queued.object_id]
    again = _accept(spool, "old")  # the forgotten id makes a new item, with a new number
    assert not again.duplicate
    assert again.object_id != old.object_id
    assert again.seq == 4
    assert spool.prune(t + 1) == 1  # (recent: sent a day ago)
    spool.close()
    with sqlite3.connect(tmp_path / "outside.db") as db:
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        assert db.execute("SELECT count(*) FROM submissions").fetchone() == (2,)


def test_the_spool_prunes_a_batch_at_a_time(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    ids = [_accept(spool, f"s{i}").object_id for i in range(8)]
    spool.mark_sent(ids)
    later = now_us() + 1
    assert [spool.prune(later, limit=3) for _ in range(4)] == [3, 3, 1, 0]
    assert spool.queued() == []  # (all eight finished)
    assert spool.submission("portal", "s7") is not None  # the newest row is kept (Spool.last_row)
    spool.close()


def test_the_ledger_forgets_finished_items_and_keeps_each_channels_floor(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path)
    for seq, state in ((1, "delivered"), (2, "rejected"), (3, "lost"), (5, "delivering")):
        ledger.record(bytes([seq]) * 16, state, channel="messages", seq=seq)
    ledger.record(b"\x09" * 16, "delivered", channel="documents", seq=9)
    cutoff = int(time.time() * 1e6) + 1
    ledger.record(b"\x04" * 16, "delivered", channel="messages", seq=4)  # after the cutoff
    time.sleep(0.002)
    assert ledger.prune(cutoff, limit=2) == 2  # oldest first
    assert ledger.prune(cutoff) == 2
    assert ledger.prune(cutoff) == 0
    assert ledger.state_of(b"\x05" * 16) == "delivering"  # an interrupted delivery stays
    assert ledger.state_of(b"\x04" * 16) == "delivered"
    assert ledger.state_of(b"\x01" * 16) is None
    assert sorted(ledger.seq_floors()) == [("documents", 9), ("messages", 3)]
    ledger.close()
    again = Ledger(tmp_path)  # and after a restart
    assert sorted(again.seq_floors()) == [("documents", 9), ("messages", 3)]
    again.close()


def test_numbers_below_a_pruned_floor_are_not_gaps_after_a_restart() -> None:
    gaps = SequenceGaps(grace=1.0)
    gaps.seen("messages", 7)  # what the ledger still remembers
    gaps.seen_up_to("messages", 5)  # 1..5 were forgotten
    gaps.heartbeat({"messages": 9}, now=0.0)
    assert gaps.due(2.0) == [Gap("messages", 6, 6), Gap("messages", 8, 9)]
    fresh = SequenceGaps(grace=1.0)  # without the floor, everything forgotten is "missing"
    fresh.seen("messages", 7)
    fresh.heartbeat({"messages": 7}, now=0.0)
    assert fresh.due(2.0) == [Gap("messages", 1, 6)]


class _Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, object]]] = []

    def info(self, event: str, **kw: object) -> None:
        self.lines.append(("info", event, kw))

    def error(self, event: str, **kw: object) -> None:
        self.lines.append(("error", event, kw))


def test_retention_prunes_a_batch_per_step_while_behind_then_waits_and_survives_errors() -> None:
    backlog = [PRUNE_BATCH + 2]
    calls: list[int] = []
    fail = [False]

    def prune(before_us: int, limit: int) -> int:
        calls.append(before_us)
        if fail[0]:
            raise sqlite3.OperationalError("disk I/O error")
        gone = min(limit, backlog[0])
        backlog[0] -= gone
        return gone

    logged = _Log()
    retention = Retention(prune, 30 * 86400, "spool_pruned", logged)
    t0 = time.time()
    retention.step(100.0)  # the first step prunes
    assert abs(calls[0] / 1e6 - (t0 - 30 * 86400)) < 5  # rows older than 30 days
    retention.step(100.1)  # a full batch went: the next step goes on
    retention.step(100.2)  # 2 went: now it waits
    retention.step(100.0 + PRUNE_INTERVAL - 1)
    assert len(calls) == 2
    assert [kw["items"] for _, _, kw in logged.lines] == [PRUNE_BATCH, 2]
    fail[0] = True
    retention.step(100.2 + PRUNE_INTERVAL)
    retention.step(100.3 + PRUNE_INTERVAL)  # an error is not retried at once
    assert len(calls) == 3
    assert logged.lines[-1][:2] == ("error", "spool_pruned_failed")
    fail[0] = False
    retention.step(100.2 + 2 * PRUNE_INTERVAL)
    assert len(calls) == 4


def test_an_item_whose_original_is_still_in_its_drop_folder_is_not_forgotten(
    tmp_path: Path,
) -> None:
    """Its original could not be moved (it still has its source key): forgotten, the file
    still in the drop folder would be taken again as a new drop, and sent twice."""
    spool = Spool(tmp_path)
    ids = [_accept(spool, f"s{i}").object_id for i in range(2)]
    spool.mark_sent(ids)
    _accept(spool, "newest")  # (the newest row is never forgotten: Spool.last_row)
    with sqlite3.connect(tmp_path / "outside.db") as db:
        db.execute("UPDATE items SET source_key='1:2:3:4' WHERE object_id=?", (ids[0],))
    later = now_us() + 1
    assert spool.prune(later) == 1
    assert spool.prune(later) == 0
    spool.forget_sources(["1:2:3:4"])  # (once the original has left the drop folder)
    assert spool.prune(later) == 1
    spool.close()

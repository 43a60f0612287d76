"""Spool (SQLite file), repeat schedule, message priority in the sender, repeats inside."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from ferry.audit import AuditLog, AuditSettings, AuditUnavailable, FileOps, Subject
from ferry.config_types import FecParams, LinkParams
from ferry.crypto.keys import SecretKey
from ferry.errors import StateError
from ferry.wire import records as rec
from ferry.wire.receiver import ObjectCompleted, ObjectLost, Receiver
from ferry.wire.sender import (
    BytesSource,
    ObjectSent,
    OutgoingObject,
    Sender,
    build_trailer,
    send_priority,
)
from outside import spool as spool_mod
from outside.agent import OutsideAgent, batch_for
from outside.spool import Accepted, Conflict, MessageRequest, Sealed, Spool, SpoolItem, now_us

SIGN = SecretKey(alg="ed25519", raw=bytes(range(32)))
KEM = SecretKey(alg="x25519", raw=bytes(range(32, 64)))
LINK = LinkParams(kem="x25519", fec=FecParams(codec="zfec", source=8, repair=2, interleave=4))


def _req(sid: str, body: bytes = b"{}", *, total: int = 1, spread_us: int = 0) -> MessageRequest:
    return MessageRequest(
        client="portal",
        submission_id=sid,
        request_sha256=hashlib.sha256(body).digest(),
        channel="messages",
        sends_total=total,
        spread_us=spread_us,
        priority=0,
    )


def _seal(req: MessageRequest, seq: int) -> Sealed:
    content = f'{{"seq":{seq}}}'.encode()
    return Sealed(os.urandom(16), content + b"T" * 10, f"m-{seq}.json", len(content), bytes(32))


def test_accepting_messages_is_idempotent_per_client_and_id(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = spool.accept_messages([_req("a"), _req("b"), _req("a")], _seal)
    (a, item_a), (b, item_b), (a2, item_a2) = first
    assert isinstance(a, Accepted)
    assert isinstance(b, Accepted)
    assert isinstance(a2, Accepted)
    assert (a.seq, b.seq) == (1, 2)
    assert item_a is not None
    assert item_b is not None
    assert item_a2 is None
    assert a2.duplicate
    assert a2.object_id == a.object_id
    spool.close()
    spool = Spool(tmp_path)  # and after a restart
    (again, none), (clash, _) = spool.accept_messages([_req("a"), _req("b", b"other")], _seal)
    assert isinstance(again, Accepted)
    assert again.duplicate
    assert again.object_id == a.object_id
    assert none is None
    assert isinstance(clash, Conflict)
    assert clash.object_id == b.object_id
    assert spool.backlog_items == 2
    assert spool.next_seq("messages") == 3  # neither a duplicate nor a conflict took a number
    st = spool.submission("portal", "b")
    assert st is not None
    assert st.state == "queued"
    assert st.seq == 2
    assert spool.submission("other-client", "b") is None


def test_repeat_schedule_spreads_copies_then_finishes(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    ((acc, item),) = spool.accept_messages([_req("r", total=3, spread_us=10_000_000)], _seal)
    assert item is not None
    assert isinstance(acc, Accepted)
    t0 = now_us() + 1_000_000
    assert [i.object_id for i in spool.due(t0)] == [acc.object_id]
    (copy1,) = spool.mark_sent([acc.object_id], now=t0)
    assert not copy1.finished
    assert copy1.sends_done == 1
    assert spool.due(t0 + 4_999_999) == []  # next copy after spread / (count - 1)
    assert len(spool.due(t0 + 5_000_000)) == 1
    (_copy2,) = spool.mark_sent([acc.object_id], now=t0 + 5_000_000)
    assert spool.next_due_us() == t0 + 10_000_000
    (copy3,) = spool.mark_sent([acc.object_id], now=t0 + 10_000_000)
    assert copy3.finished
    assert copy3.sends_done == 3
    assert spool.due(t0 + 10**12) == []
    assert spool.backlog_items == 0
    assert spool.backlog_bytes == 0
    st = spool.submission("portal", "r")
    assert st is not None
    assert st.state == "sent"
    assert st.sends_done == 3
    assert spool.mark_sent([acc.object_id]) == []  # finished items are not counted again


def test_copies_due_past_their_deadline_are_not_sent(tmp_path: Path) -> None:
    """The outside stopped (or its backlog held a repeat back) for a week: by then the inside
    may have forgotten the item (its ledger keeps 8 days at least), so its last copies are
    not sent; the item is finished, its spool file to be removed. The deadline is 7 days
    after the first copy, or an hour after a longer spread's end. Copies late by less are
    still sent, and the audit log's pieces never expire."""
    spool = Spool(tmp_path)
    week = spool_mod.REPEAT_DEADLINE_US
    reqs = [_req(f"x{i}", total=3, spread_us=60_000_000) for i in range(3)]
    reqs.append(_req("long", total=2, spread_us=week))
    accepted = [acc for acc, _ in spool.accept_messages(reqs, _seal)]
    ids = [acc.object_id for acc in accepted]
    t0 = now_us() + 1_000_000
    spool.mark_sent([ids[0], ids[1], ids[3]], now=t0)  # (x2: never sent, so never late)
    backlog = spool.backlog_items
    assert spool.expire_repeats(t0 + week) == []  # late by days, but within the week
    assert len(spool.due(t0 + week, repeats_only=True)) == 3  # (long: due just now)
    assert spool.expire_repeats(t0 + week + 1, skip={ids[1]}) == [
        spool_mod.Expired(ids[0], "messages", accepted[0].seq, 1, 3, None)
    ]  # (the one in flight is left for now; the long spread has its hour)
    assert sorted(i.object_id for i in spool.due(t0 + week + 1)) == sorted(ids[1:])
    assert spool.backlog_items == backlog - 1
    status = spool.submission("portal", "x0")
    assert status is not None
    assert (status.state, status.sends_done, status.sends_total) == ("sent", 1, 3)
    assert spool.mark_sent([ids[0]]) == []  # finished: a copy in flight is not counted
    end = t0 + week + spool_mod.REPEAT_SPREAD_GRACE_US
    assert spool.expire_repeats(end) == [
        spool_mod.Expired(ids[1], "messages", accepted[1].seq, 1, 3, None)
    ]
    assert spool.expire_repeats(end + 1) == [
        spool_mod.Expired(ids[3], "messages", accepted[3].seq, 1, 2, None)
    ]
    assert [i.object_id for i in spool.due(end + 1)] == [ids[2]]


def test_pieces_of_the_audit_log_copy_never_expire(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    piece = SpoolItem(os.urandom(16), "_audit", 1, "piece", 10, 10, None, kind="audit")
    spool.add_blob(replace(piece, data=b"x" * 10, sends_total=3), bytes(32), "mirror", 60_000_000)
    t0 = now_us() + 1_000_000
    spool.mark_sent([piece.object_id], now=t0)
    late = t0 + 10 * spool_mod.REPEAT_DEADLINE_US
    assert spool.expire_repeats(late) == []
    assert [i.object_id for i in spool.due(late, repeats_only=True)] == [piece.object_id]


def test_the_repeat_scan_returns_only_items_sent_before_and_reads_only_those(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path)
    reqs = [_req(f"b{i}", total=2, spread_us=1_000_000) for i in range(50)]
    accepted = [acc for acc, _ in spool.accept_messages(reqs, _seal)]
    t0 = now_us() + 1_000_000
    sent = [accepted[3].object_id, accepted[7].object_id]
    spool.mark_sent(sent, now=t0)
    later = t0 + 1_000_000
    assert len(spool.due(later)) == 50  # every item is due, new ones too
    repeats = spool.due(later, repeats_only=True)
    assert sorted(i.object_id for i in repeats) == sorted(sent)
    assert spool.due(later, repeats_only=True, skip={sent[0]})[0].object_id == sent[1]
    assert spool.due(t0 + 999_999, repeats_only=True) == []  # not yet due again
    # a backlog of new items is not read by the periodic scan (a partial index)
    db = sqlite3.connect(tmp_path / "outside.db")
    plan = db.execute("EXPLAIN QUERY PLAN " + spool_mod._DUE_REPEATS, (later, 10)).fetchall()
    db.close()
    assert any("items_repeats" in str(row) for row in plan), plan


def _mark_sent_work(tmp_path: Path, backlog: int) -> int:
    """SQLite virtual-machine steps (in thousands) to mark 20 items sent out of ``backlog``."""
    spool = Spool(tmp_path)
    accepted = [
        acc for acc, _ in spool.accept_messages([_req(f"w{i}") for i in range(backlog)], _seal)
    ]
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    spool._db.set_progress_handler(count, 1000)
    done = spool.mark_sent([acc.object_id for acc in accepted[:20]])
    spool._db.set_progress_handler(None, 0)
    spool.close()
    assert len(done) == 20
    assert all(copy.finished for copy in done)
    return steps[0]


def test_marking_items_sent_costs_the_same_whatever_the_backlog(tmp_path: Path) -> None:
    # (the items were once looked up through the state index: the whole backlog was
    # walked for every batch of sends, and a long backlog slowed the sender)
    small = _mark_sent_work(tmp_path / "small", 200)
    large = _mark_sent_work(tmp_path / "large", 20_000)
    assert large <= small + 3, (small, large)


def _statements(spool: Spool) -> list[str]:
    seen: list[str] = []
    spool._db.set_trace_callback(seen.append)
    return seen


def test_recording_a_sent_message_does_not_wait_for_the_disk_but_a_finished_file_does(
    tmp_path: Path,
) -> None:
    # A lost "sent" record only means one more copy (the inside drops repeats): no fsync
    # for it. A file's spool copy is deleted once its last copy is recorded, so that
    # record must be on disk first. Either way the connection is durable afterwards.
    spool = Spool(tmp_path)
    (acc, _), (twice, _) = spool.accept_messages([_req("m"), _req("r", total=2)], _seal)
    seen = _statements(spool)
    spool.mark_sent([acc.object_id, twice.object_id])
    assert "PRAGMA synchronous=NORMAL" in seen
    assert seen[-1] == "PRAGMA synchronous=FULL"
    assert spool._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    seen.clear()
    spool.accept_messages([_req("after")], _seal)  # intake commits stay durable
    assert not any("synchronous" in s for s in seen)

    data = b"file body"
    (tmp_path / "f1.obj").write_bytes(data)
    item = SpoolItem(
        os.urandom(16), "docs", 1, "a.pdf", len(data), len(data), tmp_path / "f1.obj",
        kind="file", priority=0,
    )  # fmt: skip
    spool.add(item, bytes(32), str(tmp_path / "a.pdf"), "key-1")
    seen.clear()
    (copy,) = spool.mark_sent([item.object_id, os.urandom(16)])  # (an unknown id is skipped)
    assert copy.finished
    assert copy.spool_file == spool.dir / "f1.obj"
    assert not any("synchronous" in s for s in seen)  # a durable commit (FULL)
    assert any(s.startswith("UPDATE items SET state='sent'") for s in seen)
    assert spool.backlog_items == 2  # ("r" has a copy to go, "after" is queued)
    seen.clear()
    assert spool.mark_sent([item.object_id]) == []  # finished already: nothing written
    assert seen  # (it looked)
    assert not any(s.startswith(("BEGIN", "UPDATE")) for s in seen)
    spool.close()
    again = Spool(tmp_path)  # what was recorded survived
    assert again.backlog_items == 2
    assert again.counts() == {"queued": 2, "sent": 2}


def test_spool_refuses_a_database_of_another_schema_version(tmp_path: Path) -> None:
    Spool(tmp_path).close()

    db = sqlite3.connect(tmp_path / "outside.db")
    db.execute("UPDATE meta SET value=1 WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="schema version 1"):
        Spool(tmp_path)


def _object(oid: bytes, size: int) -> tuple[bytes, int]:
    content = os.urandom(size)
    m = rec.Manifest(
        oid, "file", "c", 1, "x", "a/b", size, hashlib.sha256(content).digest(), 0, 0,
        SIGN.public.key_id,
    )  # fmt: skip
    stream = content + build_trailer(m, SIGN)
    return stream, len(stream)


def test_messages_pre_empt_bulk_files_in_the_sender() -> None:
    sender = Sender(LINK, SIGN, KEM.public, epoch=1, rng=os.urandom, now=0.0)
    bulk, blen = _object(b"B" * 16, 2_000_000)
    sender.submit(OutgoingObject(b"B" * 16, blen, BytesSource(bulk), "files", 1))
    sent_before = len(sender.datagrams(0.0, 300))
    assert sent_before == 300
    msg, mlen = _object(b"M" * 16, 1500)
    sender.submit(
        OutgoingObject(b"M" * 16, mlen, BytesSource(msg), "messages", 1, priority=0, fec=(4, 4))
    )
    nxt = sender.datagrams(0.0, 64)
    events = sender.pop_events()
    # the message's 2 source + 2 repair symbols go out in the very next batch
    assert ObjectSent(b"M" * 16, "messages", 1) in events
    assert len(nxt) == 64
    assert not sender.idle  # the bulk file is still going


def test_a_first_copy_goes_before_queued_repeats_and_repeats_before_files() -> None:
    """Priorities 0-3 (send_priority): a message's first copy is not held behind a backlog
    of message repeats, and a message's repeat still pre-empts a bulk file."""
    sender = Sender(LINK, SIGN, KEM.public, epoch=1, rng=os.urandom, now=0.0)
    bulk, blen = _object(b"B" * 16, 2_000_000)
    sender.submit(OutgoingObject(b"B" * 16, blen, BytesSource(bulk), "files", 1))
    assert len(sender.datagrams(0.0, 50)) == 50  # the file is on its way
    repeats = []
    for i in range(200):  # a backlog of repeats: about 800 packets
        oid = b"R" + i.to_bytes(15, "big")
        stream, length = _object(oid, 1500)
        repeats.append(oid)
        sender.submit(
            OutgoingObject(
                oid, length, BytesSource(stream), "messages", i + 1,
                priority=send_priority(0, repeat=True), fec=(4, 4),
            )
        )  # fmt: skip
    sender.datagrams(0.0, 8)  # the repeats have started
    first, flen = _object(b"N" * 16, 1500)
    sender.submit(
        OutgoingObject(
            b"N" * 16, flen, BytesSource(first), "messages", 201,
            priority=send_priority(0, repeat=False), fec=(4, 4),
        )
    )  # fmt: skip
    sender.datagrams(0.0, 64)
    done = [e.object_id for e in sender.pop_events()]
    assert b"N" * 16 in done  # in the very next batch, ahead of the ~190 repeats queued
    assert len([oid for oid in done if oid in repeats]) < 20
    while not set(repeats) <= set(done):  # then every repeat, all before the file ends
        assert sender.datagrams(0.0, 64)
        done += [e.object_id for e in sender.pop_events()]
        assert b"B" * 16 not in done
    assert [send_priority(p, r) for p in (0, 1) for r in (False, True)] == [0, 1, 2, 3]


def test_an_object_lost_once_completes_from_a_repeat() -> None:
    recv = Receiver(LINK, SIGN.public, KEM, object_timeout=1.0)
    sender = Sender(LINK, SIGN, KEM.public, epoch=5, rng=os.urandom, now=0.0)
    stream, length = _object(b"R" * 16, 20_000)
    obj = OutgoingObject(b"R" * 16, length, BytesSource(stream), "files", 1)
    sender.submit(obj)
    first = sender.datagrams(0.0, 1000)
    # deliver the announcement and only a third of the symbols: the object is lost
    for i, d in enumerate(first):
        if rec.peek_type(d) == rec.TYPE_ANNOUNCE or i % 3 == 0:
            recv.receive_datagram(d, 0.0)
    recv.tick(5.0)
    assert any(isinstance(e, ObjectLost) for e in recv.pop_events())
    sender.submit(obj)  # the repeat schedule sends it again
    for d in sender.datagrams(6.0, 1000):
        recv.receive_datagram(d, 6.0)
    done = [e for e in recv.pop_events() if isinstance(e, ObjectCompleted)]
    assert [e.object_id for e in done] == [b"R" * 16]


def test_audit_pieces_count_in_bytes_but_not_in_the_item_backlog(tmp_path: Path) -> None:
    """busy_items is about what clients queued: ferry's own audit-mirror pieces do not
    make the API answer BUSY (they still count toward the spool's bytes)."""
    spool = Spool(tmp_path)
    piece = SpoolItem(
        os.urandom(16),
        rec.AUDIT_CHANNEL,
        1,
        "seg@0",
        5,
        9,
        None,
        kind="audit",
        priority=0,
        data=b"abcdeTTTT",
        sends_total=1,
    )
    spool.add_blob(piece, bytes(32), "component:audit-mirror")
    spool.accept_messages([_req("m")], _seal)
    assert spool.backlog_items == 1
    assert spool.backlog_bytes == 9 + len(_seal(_req("m"), 1).stream)
    spool.close()
    spool = Spool(tmp_path)  # the same after a restart
    assert spool.backlog_items == 1
    (done,) = spool.mark_sent([piece.object_id])
    assert done.finished
    assert spool.backlog_items == 1
    assert spool.backlog_bytes == len(_seal(_req("m"), 1).stream)


class _GatedFsync(FileOps):
    """fsync waits until ``gate`` is open, then fails while ``broken`` is set."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.broken = False

    def fsync(self, fd: int) -> None:
        self.gate.wait(10)
        if self.broken:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "audit-000001.jsonl")
        super().fsync(fd)


def test_new_items_reach_the_sender_only_once_their_intake_records_are_durable(
    tmp_path: Path,
) -> None:
    """Fail closed: an item never crosses while the record of its acceptance could still be
    lost (not yet on disk, or the audit log failing)."""
    files = _GatedFsync()
    files.gate.set()
    log = AuditLog(tmp_path / "audit", SIGN, AuditSettings(origin="t"), files=files)
    submitted: list[SpoolItem] = []
    agent = SimpleNamespace(
        audit=SimpleNamespace(log=log),
        _awaiting=[],
        _submit=lambda _sender, item: submitted.append(item),
    )

    def item(n: int, idx: int) -> SpoolItem:
        return SpoolItem(bytes([n]) * 16, "messages", n, f"m{n}", 1, 1, None, audit_idx=idx)

    try:
        files.gate.clear()  # the disk is slow: the record is written but not yet synced
        pending = log.append("intake.accepted", subject=Subject.component("api"))
        agent._awaiting = [item(1, pending), item(2, -1)]
        OutsideAgent._submit_durable(agent, None)  # type: ignore[arg-type]
        assert [i.seq for i in submitted] == [2]  # resumed from the spool: nothing to wait for
        assert [i.seq for i in agent._awaiting] == [1]
        files.gate.set()
        OutsideAgent._submit_durable(agent, None)  # type: ignore[arg-type]
        assert [i.seq for i in submitted] == [2, 1]
        assert agent._awaiting == []

        files.broken = True  # the audit disk fails: the item waits, it is not sent
        lost = log.append("intake.accepted", subject=Subject.component("api"))
        agent._awaiting = [item(3, lost)]
        OutsideAgent._submit_durable(agent, None)  # type: ignore[arg-type]
        assert [i.seq for i in submitted] == [2, 1]
        assert [i.seq for i in agent._awaiting] == [3]
        assert log.failed.is_set()
    finally:
        files.broken = False
        files.gate.set()
        with contextlib.suppress(AuditUnavailable):
            log.close()


def test_each_item_keeps_the_index_of_its_own_intake_record(tmp_path: Path) -> None:
    """(What a start checks against the audit log: OutsideAgent._record_lost_intake.)"""
    spool = Spool(tmp_path)
    other = replace(_req("x"), client="registry")
    results = spool.accept_messages(
        [_req("a"), other, _req("b")],
        _seal,
        lambda: {("portal", "messages"): 7, ("registry", "messages"): 9},
    )
    assert [item.audit_idx for _, item in results if item is not None] == [7, 9, 7]
    assert [r["intake_idx"] for r in spool.unrecorded(8)] == [9]
    assert [r["intake_idx"] for r in spool.unrecorded(0)] == [7, 7, 9]
    (nine,) = spool.unrecorded(9)
    spool.set_intake_idx([(bytes(nine["object_id"]), 3)])
    assert spool.unrecorded(8) == []
    spool.close()


def test_a_spool_from_before_intake_indexes_gets_the_column(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.accept_messages([_req("old")], _seal)
    spool.close()
    with sqlite3.connect(tmp_path / "outside.db") as db:
        db.execute("ALTER TABLE items DROP COLUMN intake_idx")
    spool = Spool(tmp_path)  # (what an upgrade finds)
    spool.accept_messages([_req("new")], _seal, lambda: {("portal", "messages"): 4})
    assert [r["intake_idx"] for r in spool.unrecorded(0)] == [4]
    assert spool.counts() == {"queued": 2}  # the old item is still there
    spool.close()


def test_a_batch_of_datagrams_is_at_most_a_few_ms_of_the_link() -> None:
    """A message that arrives while a batch is paced out waits for it (batch_for)."""
    assert batch_for(800e6 / 8, 1500) == 64  # fast links: the whole batch (0.1 ms)
    assert batch_for(10e6 / 8, 1500) == 4  # 4.8 ms at 10 Mb/s
    assert batch_for(1e6 / 8, 1500) == 1  # 12 ms at 1 Mb/s (64 would be 0.77 s)
    assert batch_for(11_520, 1500) == 1  # a 115200-baud serial line


def _starting_agent(spool: Spool) -> tuple[SimpleNamespace, list[SpoolItem]]:
    """What OutsideAgent._resume and _schedule use of an agent, and the items they hand to
    its sender (in flight from then on)."""
    submitted: list[SpoolItem] = []

    def submit(_sender: object, item: SpoolItem) -> None:
        submitted.append(item)
        agent._in_bundles.add(item.object_id)

    agent = SimpleNamespace(
        spool=spool, _sources={}, _in_bundles=set(), _sent_unsaved=[], _submit=submit,
        _expire_repeats=lambda in_flight: None,
    )  # fmt: skip
    return agent, submitted


def test_a_start_with_more_than_due_limit_unsent_items_sends_them_all(tmp_path: Path) -> None:
    """The spool holds more unsent items than a start takes at once (a slow link's backlog,
    then a restart): the rest are taken later, once what went first has gone out; items
    made since the start are not (their intake records may not be on disk yet)."""
    spool = Spool(tmp_path)
    total = spool_mod.DUE_LIMIT + 50
    for start in range(0, total, 1000):
        reqs = [
            _req(f"s{n}", f'{{"n":{n}}}'.encode()) for n in range(start, min(total, start + 1000))
        ]
        spool.accept_messages(reqs, _seal)
    agent, submitted = _starting_agent(spool)
    OutsideAgent._resume(agent, None)  # type: ignore[arg-type]  # (what run does at its start)
    assert len(submitted) == spool_mod.DUE_LIMIT
    assert agent._unsent_left
    # since the start, with the clock set back an hour: it looks older than the rest
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(spool_mod, "now_us", lambda: now_us() - 3600 * 10**6)
        ((new, item),) = spool.accept_messages([_req("new", b'{"new":1}')], _seal)
    assert item is not None
    OutsideAgent._schedule(agent, None)  # type: ignore[arg-type]
    assert len(submitted) == spool_mod.DUE_LIMIT  # (the first ones still on their way)
    spool.mark_sent([i.object_id for i in submitted])
    agent._in_bundles.clear()
    OutsideAgent._schedule(agent, None)  # type: ignore[arg-type]
    assert len(submitted) == total
    assert len({i.object_id for i in submitted}) == total
    assert new.object_id not in {i.object_id for i in submitted}
    assert not agent._unsent_left
    spool.close()


def test_a_repeat_held_back_past_its_deadline_is_dropped_unsent() -> None:
    """First copies held a repeat back in the sender's queue until its deadline passed (the
    inside may have forgotten the item by then): it is not begun, and pop_dropped names it;
    one begun before its deadline is finished."""
    sender = Sender(LINK, SIGN, KEM.public, epoch=1, rng=os.urandom, now=0.0)
    late, llen = _object(b"L" * 16, 1500)
    ok, olen = _object(b"K" * 16, 1500)
    sender.submit(
        OutgoingObject(b"L" * 16, llen, BytesSource(late), "m", 1, priority=1, not_after=10.0)
    )
    sender.submit(
        OutgoingObject(b"K" * 16, olen, BytesSource(ok), "m", 2, priority=1, not_after=99.0)
    )
    sender.datagrams(11.0, 64)
    assert [e.object_id for e in sender.pop_events()] == [b"K" * 16]
    assert sender.pop_dropped() == [b"L" * 16]
    assert sender.pop_dropped() == []
    assert sender.idle


def test_spooled_repeats_carry_their_deadline_and_the_outside_releases_dropped_ones(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path)
    ((_, item),) = spool.accept_messages([_req("d", total=3, spread_us=60_000_000)], _seal)
    assert item is not None
    assert item.deadline_us is None  # (a first copy: no deadline yet)
    spool.mark_sent([item.object_id], now=1_000)
    (again,) = spool.due(2_000_000_000_000_000)
    assert again.deadline_us == spool_mod.repeat_deadline(1_000, 60_000_000)
    assert again.deadline_us == 1_000 + spool_mod.REPEAT_DEADLINE_US
    spool.close()
    other = SpoolItem(b"O" * 16, "messages", 9, "o", 1, 1, None, kind="message")
    agent = SimpleNamespace(
        _sources={b"F" * 16: BytesSource(b"x")},
        _bundles={b"B" * 16: [again, other]},
        _in_bundles={again.object_id, other.object_id, b"Z" * 16},
    )
    OutsideAgent._release(agent, [b"B" * 16, b"F" * 16])  # type: ignore[arg-type]
    assert agent._bundles == {}
    assert agent._sources == {}
    assert agent._in_bundles == {b"Z" * 16}  # (no longer on their way: due again)


def test_items_made_while_the_clock_was_ahead_are_sent_at_the_next_start(tmp_path: Path) -> None:
    """The outside stopped with items made while its clock was an hour ahead (then put
    right): their first copies looked due an hour later, and waited for a start after that."""
    spool = Spool(tmp_path)
    spool.accept_messages([_req("now")], _seal)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(spool_mod, "now_us", lambda: now_us() + 3600 * 10**6)
        spool.accept_messages([_req(f"ahead{n}", f'{{"n":{n}}}'.encode()) for n in range(3)], _seal)
    agent, submitted = _starting_agent(spool)
    OutsideAgent._resume(agent, None)  # type: ignore[arg-type]
    assert len(submitted) == 1  # (due now)
    OutsideAgent._schedule(agent, None)  # type: ignore[arg-type]
    assert len(submitted) == 4
    assert len({i.object_id for i in submitted}) == 4
    assert not agent._unsent_left
    OutsideAgent._schedule(agent, None)  # type: ignore[arg-type]
    assert len(submitted) == 4  # (nothing twice)
    spool.close()


def test_pruning_never_forgets_the_newest_row(tmp_path: Path) -> None:
    """A start tells what the spool held by row number (Spool.last_row): a number given again
    to a new item would let that item cross before its intake record is on disk."""
    spool = Spool(tmp_path)
    accepted = spool.accept_messages(
        [_req(f"p{n}", f'{{"n":{n}}}'.encode()) for n in range(3)], _seal
    )
    spool.mark_sent([item.object_id for _, item in accepted if item is not None])
    last = spool.last_row()
    assert spool.prune(now_us() + 10**6) == 2  # (all three finished and old enough)
    assert spool.last_row() == last
    ((_, item),) = spool.accept_messages([_req("after")], _seal)
    assert item is not None
    assert spool.last_row() == last + 1
    spool.close()


def test_items_sent_whose_sending_is_not_recorded_yet_are_not_handed_out_again(
    tmp_path: Path,
) -> None:
    """A full disk: the sending of copies already on the wire could not be recorded
    (OutsideAgent._sent_unsaved), so the spool still says they were never sent."""
    spool = Spool(tmp_path)
    spool.accept_messages([_req(f"u{n}", f'{{"n":{n}}}'.encode()) for n in range(4)], _seal)
    submitted: list[SpoolItem] = []
    agent = SimpleNamespace(
        spool=spool, _sources={}, _in_bundles=set(), _sent_unsaved=[],
        _submit=lambda _s, item: submitted.append(item), _expire_repeats=lambda in_flight: None,
    )  # fmt: skip
    agent._resumed_rows = spool.last_row()
    agent._unsent_left = True
    on_the_wire = spool.unsent(agent._resumed_rows)[:3]
    agent._sent_unsaved = [(SimpleNamespace(object_id=i.object_id), None) for i in on_the_wire]
    OutsideAgent._schedule(agent, None)  # type: ignore[arg-type]
    wire = {i.object_id for i in on_the_wire}
    assert len(submitted) == 1
    assert submitted[0].object_id not in wire
    spool.close()

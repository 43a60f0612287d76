"""A files channel's thread delivers the files queued together as one batch (one wait for
the disk per step for them all); what the batch cannot deliver is refused or delivered
alone, as any file is. A real ``ferry init`` deployment's inside agent, in this process, its
spool staged with objects signed as the outside signs them."""

from __future__ import annotations

import errno
import threading
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import init
from test_inside_kept_objects import records, signed_message
from test_recheck_inside import close_agent, png, stage, text_chunk

from ferry.audit.record import AuditUnavailable
from ferry.config import load_inside_config
from ferry.wire.receiver import BlockDecoded, ObjectCompleted, ObjectLost
from inside import agent as agent_module
from inside.agent import MEMORY_OBJECT_MAX, InsideAgent

pytestmark = pytest.mark.integration


def _agent(dep: dict[str, Any]) -> InsideAgent:
    return InsideAgent(load_inside_config(Path(dep["inside"]["config"])), threading.Event())


def test_a_batch_delivers_each_file_once_and_refuses_the_one_the_recheck_refuses(
    tmp_path: Path,
) -> None:
    dep = init(tmp_path / "d")
    agent = _agent(dep)
    key = dep["outside"]["signing_key"]
    deliver = Path(dep["channels"]["documents"]["deliver"])
    try:
        pngs = {f"scan-{n}.png": png() for n in range(5)}
        jobs = [
            (*stage(agent, key, name, data, n + 1), False)
            for n, (name, data) in enumerate(pngs.items())
        ]
        bad = stage(agent, key, "hidden.png", png(text_chunk()), 9)
        jobs.insert(2, (*bad, False))
        agent._deliver_files(jobs, agent._lanes["documents"])
        assert {p.name: p.read_bytes() for p in deliver.iterdir()} == pngs
        for oid, _, _ in jobs:
            assert not agent._spool_path(oid).exists()
        states = {oid: agent.ledger.state_of(oid) for oid, _, _ in jobs}
    finally:
        close_agent(agent)
    assert states == {oid: "rejected" if oid == bad[0] else "delivered" for oid, _, _ in jobs}
    kept = Path(dep["inside"]["state_dir"]) / "quarantine" / f"{bad[0].hex()}.obj"
    assert b"payload for the high side" in kept.read_bytes()
    refused = [r["event"] for r in records(dep, bad[0])]
    assert refused.count("recheck") == 1  # checked once, not again when refused
    assert refused[-1] == "delivery.rejected"
    for oid, _, _ in jobs:
        if oid != bad[0]:
            events = [r["event"] for r in records(dep, oid)]
            assert events.count("recheck") == 1
            assert events.count("delivery.delivered") == 1


def test_a_batch_whose_audit_records_fail_is_settled_and_delivered_once_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit log refuses the batch's delivery records after its files are linked (the
    ledger says delivering): each file is then settled alone, as after a crash: found
    intact in its folder, recorded delivered (recovered), never a second copy."""
    dep = init(tmp_path / "d")
    agent = _agent(dep)
    key = dep["outside"]["signing_key"]
    deliver = Path(dep["channels"]["documents"]["deliver"])
    failed: list[int] = []

    def audit_down(files: list[Any]) -> None:
        failed.append(len(files))
        raise AuditUnavailable("the audit log cannot be written")

    try:
        pngs = {f"scan-{n}.png": png() for n in range(4)}
        jobs = [
            (*stage(agent, key, name, data, n + 1), False)
            for n, (name, data) in enumerate(pngs.items())
        ]
        monkeypatch.setattr(agent, "_record_delivered_files", audit_down)
        agent._deliver_files(jobs, agent._lanes["documents"])
        states = [agent.ledger.state_of(oid) for oid, _, _ in jobs]
        spooled = [agent._spool_path(oid).exists() for oid, _, _ in jobs]
    finally:
        close_agent(agent)
    assert failed == [4]
    assert states == ["delivered"] * 4
    assert spooled == [False] * 4
    assert {p.name: p.read_bytes() for p in deliver.iterdir()} == pngs
    for oid, _, _ in jobs:
        delivered = [r for r in records(dep, oid) if r["event"] == "delivery.delivered"]
        assert len(delivered) == 1
        assert delivered[0]["detail"]["recovered"] is True


def test_a_message_lane_whose_disk_will_not_take_a_small_file_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small file arrives whole in memory on a message lane, to be spooled for its
    channel's files lane; the inside's disk refuses it (full). It is recorded lost, not
    refused (a repeat can still bring it), and the lane delivers the message behind it."""
    dep = init(tmp_path / "d")
    agent = _agent(dep)
    key = dep["outside"]["signing_key"]
    try:
        oid, _ = stage(agent, key, "scan.png", png(), 1)
        data = agent._spool_path(oid).read_bytes()
        agent._spool_path(oid).unlink()  # (held in memory instead)
        message, stream = signed_message(key, 1)

        def disk_full(*_a: object) -> bool:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(agent, "_spool_new", disk_full)
        lane = agent._msg_lanes[""]
        for job in ((oid, len(data), data, False), (message, len(stream), stream, False), None):
            lane.work.put(job)
        agent._messages_loop(lane)  # (returns at the None, having gone on)
        states = (agent.ledger.state_of(oid), agent.ledger.state_of(message))
    finally:
        close_agent(agent)
    assert states == (None, "delivered")
    assert len(list(Path(dep["channels"]["messages"]["deliver"]).iterdir())) == 1
    (lost,) = [r for r in records(dep, oid) if r["event"] == "transfer.lost"]
    assert lost["reason"].startswith("NOT_SPOOLED")


def test_a_copy_after_one_lost_to_a_full_disk_is_written_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk refuses a block of an object (full); the object is then lost (timed out).
    A later copy (the channel's repeat), once there is room, is spooled and queued for
    delivery (it used to be dropped too: the failed write was still remembered)."""
    dep = init(tmp_path / "d")
    agent = _agent(dep)
    oid, size = b"\x31" * 16, MEMORY_OBJECT_MAX + 10  # (spooled, not held in memory)
    block = bytes(size)

    class Machine:
        def __init__(self, events: list[object]) -> None:
            self.events = events

        def pop_events(self) -> list[object]:
            out, self.events = self.events, []
            return out

        def forget_finished(self, _oid: bytes) -> None:
            pass

    real_fd = agent._spool_fd
    try:

        def full(_oid: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(agent, "_spool_fd", full)
        first = [BlockDecoded(oid, size, 0, block), ObjectLost(oid, size, 0, 2, "timeout")]
        agent._handle(Machine(first), None, 0.0)  # type: ignore[arg-type]
        monkeypatch.setattr(agent, "_spool_fd", real_fd)  # room again
        again = [BlockDecoded(oid, size, 0, block), ObjectCompleted(oid, size)]
        agent._handle(Machine(again), None, 1.0)  # type: ignore[arg-type]
        queued = agent._work.get_nowait()
        spooled = agent._spool_path(oid).read_bytes()
    finally:
        close_agent(agent)
    assert queued == (oid, size, False)
    assert spooled == block


def test_refused_objects_are_kept_up_to_a_limit_then_refused_without_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compromised outside (with the key) could fill the inside's disk with objects it
    knows will be refused, and with it the audit log's: copies are kept up to
    MAX_KEPT_REFUSED; past it each is still refused and recorded, without its copy. Room
    made by an operator is found again (KEPT_RESCAN)."""
    monkeypatch.setattr(agent_module, "MAX_KEPT_REFUSED", 100_000)
    monkeypatch.setattr(agent_module, "KEPT_RESCAN", 0.0)
    dep = init(tmp_path / "d")
    agent = _agent(dep)
    rejected = Path(dep["inside"]["state_dir"]) / "rejected"
    oids = [bytes([n]) * 16 for n in range(1, 6)]
    try:
        for oid in oids:
            agent._reject(oid, "WIRE: not signed by the outside", bytes(40_000))
        kept = sorted(p.name for p in rejected.iterdir())
        states = {agent.ledger.state_of(oid) for oid in oids}
        (rejected / f"{oids[0].hex()}.obj").unlink()  # an operator makes room
        extra = b"\x09" * 16
        agent._reject(extra, "WIRE: not signed by the outside", bytes(40_000))
    finally:
        close_agent(agent)
    assert kept == [f"{oid.hex()}.obj" for oid in oids[:2]]  # 80,000 bytes; a third: over
    assert states == {"rejected"}  # every one refused all the same
    assert (rejected / f"{extra.hex()}.obj").exists()
    for oid, was_kept in zip(oids, [True, True, False, False, False], strict=True):
        (record,) = [r for r in records(dep, oid) if r["event"] == "delivery.rejected"]
        assert (record["detail"]["kept"] is not None) is was_kept


def test_a_file_its_reader_took_while_the_audit_log_was_down_is_not_delivered_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is linked (visible), its audit record fails, and a reader moves it away
    before the ledger can say delivered. Settling found the name empty and delivered it a
    second time, after putting the trailer back on the spool file: the very inode the reader
    had, so the reader's file grew by the trailer."""
    dep = init(tmp_path / "d")
    agent = _agent(dep)
    key = dep["outside"]["signing_key"]
    deliver = Path(dep["channels"]["documents"]["deliver"])
    reader = tmp_path / "d" / "reader-took.png"
    data = png()

    def audit_down_and_taken(files: list[Any]) -> None:
        (linked,) = files
        Path(linked[1]).rename(reader)  # (the reader takes it during the outage)
        raise AuditUnavailable("the audit log cannot be written")

    try:
        oid, length = stage(agent, key, "scan.png", data, 1)
        monkeypatch.setattr(agent, "_record_delivered_files", audit_down_and_taken)
        agent._deliver_files([(oid, length, False)], agent._lanes["documents"])
        state = agent.ledger.state_of(oid)
        spooled = agent._spool_path(oid).exists()
    finally:
        close_agent(agent)
    assert reader.read_bytes() == data  # (before: the trailer appended)
    assert list(deliver.iterdir()) == []  # (before: a second copy)
    assert (state, spooled) == ("delivered", False)
    (delivered,) = [r for r in records(dep, oid) if r["event"] == "delivery.delivered"]
    assert delivered["detail"] == {"recovered": True, "taken": True}

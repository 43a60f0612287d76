"""A file the inside has received whole but not yet delivered survives a restart of the
inside: the next start delivers it, also when a crash came in the middle of its delivery
(its signed trailer already cut off for the hard link: the ledger holds it). A kept object
that is not intact (a power cut before the disk had it all) is removed and recorded as
lost, not refused: a repeat of it can still be delivered.

Objects are staged in a real ``ferry init`` deployment's spool exactly as the outside
sends them (signed with its key), then a real inside agent process is started.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import init, wait_files
from test_audit_agents import wait_for
from test_recheck_inside import close_agent, png, stage

from ferry.audit.record import decode
from ferry.audit.segments import iter_lines, list_segments
from ferry.config import load_inside_config
from ferry.crypto.keys import load_secret_key
from ferry.jsondoc import SchemaRegistry
from ferry.wire import records as rec
from ferry.wire.sender import build_trailer
from inside import agent as agent_module
from inside import deliver as deliver_module
from inside.agent import InsideAgent, _prepare_folders

pytestmark = pytest.mark.integration
SCHEMAS = Path(__file__).resolve().parents[2] / "schemas" / "messages"


def records(dep: dict[str, Any], item: bytes) -> list[dict[str, Any]]:
    return [
        r
        for _, seg in list_segments(Path(dep["inside"]["audit_dir"]))
        for line in iter_lines(seg)
        if (r := decode(line.data)).get("corr") == item.hex()
    ]


def ledger_state(dep: dict[str, Any], item: bytes) -> str | None:
    cfg = load_inside_config(Path(dep["inside"]["config"]))
    with sqlite3.connect(cfg.state_dir / "inside.db") as db:
        row = db.execute("SELECT state FROM objects WHERE object_id=?", (item,)).fetchone()
    return None if row is None else str(row[0])


def staged(dep: dict[str, Any], *files: tuple[str, bytes]) -> list[tuple[bytes, int]]:
    """Stage signed file objects in the inside's spool (channel documents, seq 1, 2...)."""
    cfg = load_inside_config(Path(dep["inside"]["config"]))
    agent = InsideAgent(cfg, threading.Event())
    try:
        key = dep["outside"]["signing_key"]
        return [stage(agent, key, name, data, i + 1) for i, (name, data) in enumerate(files)]
    finally:
        close_agent(agent)


def test_a_file_received_but_not_delivered_is_delivered_at_the_next_start(
    tmp_path: Path, agents: Any
) -> None:
    dep = init(tmp_path / "d")
    ((oid, _),) = staged(dep, ("kept.png", png()))
    inside = agents("inside", dep["inside"]["config"])
    deliver = dep["channels"]["documents"]["deliver"]
    assert wait_files(deliver, {"kept.png"}, timeout=30) == {"kept.png": png()}
    assert inside.wait_event("kept_objects_to_deliver")["count"] == 1
    wait_for(lambda: ledger_state(dep, oid) == "delivered", what="the ledger")
    spool = load_inside_config(Path(dep["inside"]["config"])).state_dir / "incoming"
    assert list(spool.iterdir()) == []
    assert [r["event"] for r in records(dep, oid)].count("delivery.delivered") == 1


def test_a_delivery_cut_short_after_its_trailer_was_cut_off_is_done_at_the_next_start(
    tmp_path: Path, agents: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent dies between recording ``delivering`` (trailer cut off) and the link."""
    dep = init(tmp_path / "d")
    cfg = load_inside_config(Path(dep["inside"]["config"]))
    agent = InsideAgent(cfg, threading.Event())

    class Crash(BaseException):
        pass

    def crash_before_link(*args: Any, before_link: Any, **kw: Any) -> Path:
        before_link(Path(args[3]) / "cut.png")  # the ledger says delivering; trailer cut off
        raise Crash

    try:
        oid, length = stage(agent, dep["outside"]["signing_key"], "cut.png", png(), 1)
        monkeypatch.setattr(deliver_module, "link_under_free_name", crash_before_link)
        with pytest.raises(Crash):
            agent._deliver_file(oid, length)
        monkeypatch.undo()
        spooled = agent._spool_path(oid)
        assert spooled.stat().st_size == len(png()) < length  # only the content is left
        assert agent.ledger.state_of(oid) == "delivering"
        assert agent.ledger.trailer_of(oid) is not None
    finally:
        close_agent(agent)
    deliver = Path(dep["channels"]["documents"]["deliver"])
    assert list(deliver.iterdir()) == []

    agent_process = agents("inside", dep["inside"]["config"])
    assert wait_files(deliver, {"cut.png"}, timeout=30) == {"cut.png": png()}
    assert agent_process.wait_event("delivery_resumed")["object_id"] == oid.hex()
    wait_for(lambda: ledger_state(dep, oid) == "delivered", what="the ledger")
    assert not spooled.exists()
    events = [r["event"] for r in records(dep, oid)]
    assert events.count("delivery.delivered") == 1, events
    assert "delivery.rejected" not in events
    assert sorted(p.name for p in deliver.iterdir()) == ["cut.png"]


def test_a_kept_object_that_is_not_intact_is_recorded_lost_not_refused(
    tmp_path: Path, agents: Any
) -> None:
    dep = init(tmp_path / "d")
    (bad, _), (good, _) = staged(dep, ("torn.png", png()), ("whole.png", png()))
    cfg = load_inside_config(Path(dep["inside"]["config"]))
    torn = cfg.state_dir / "incoming" / f"{bad.hex()}.obj"
    data = bytearray(torn.read_bytes())
    data[10:20] = bytes(10)  # as after a power cut: a page the disk never had
    torn.write_bytes(bytes(data))

    inside = agents("inside", dep["inside"]["config"])
    deliver = dep["channels"]["documents"]["deliver"]
    assert wait_files(deliver, {"whole.png"}, timeout=30) == {"whole.png": png()}
    assert inside.wait_event("kept_object_not_intact")["object_id"] == bad.hex()
    assert not torn.exists()
    wait_for(lambda: ledger_state(dep, good) == "delivered", what="the ledger")
    assert ledger_state(dep, bad) is None  # not refused: a repeat of it is still delivered
    (lost,) = [r for r in records(dep, bad) if r["event"] == "transfer.lost"]
    assert "did not survive the restart intact" in lost["reason"]
    assert not (cfg.state_dir / "rejected" / f"{bad.hex()}.obj").exists()
    assert sorted(p.name for p in Path(deliver).iterdir()) == ["whole.png"]


def test_a_delivery_folder_that_cannot_be_made_stops_the_start(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    ok = tmp_path / "ok"
    with pytest.raises(Exception, match="channel bad: cannot make its delivery folder"):
        _prepare_folders({"good": ok, "bad": blocker / "deliver"}, 5.0)
    assert ok.is_dir()
    assert _prepare_folders({"good": ok}, 5.0) == []


def test_a_copy_completed_while_the_same_object_waits_is_dropped(tmp_path: Path) -> None:
    """A repeat completes while the first copy still waits for its delivery: the waiting
    file is never written over (a lane may be linking it), the new copy goes."""
    dep = init(tmp_path / "d")
    cfg = load_inside_config(Path(dep["inside"]["config"]))
    agent = InsideAgent(cfg, threading.Event())
    try:
        oid, _ = stage(agent, dep["outside"]["signing_key"], "a.png", png(), 1)
        waiting = agent._spool_path(oid).read_bytes()
        os.pwrite(agent._spool_fd(oid), b"a second copy, as it arrives", 0)
        assert agent._spooled(oid) is False
        assert agent._spool_path(oid).read_bytes() == waiting
        assert not agent._part_path(oid).exists()
        assert agent._fds == {}
        other = bytes(16)
        os.pwrite(agent._spool_fd(other), b"complete", 0)
        assert agent._spooled(other) is True
        assert agent._spool_path(other).read_bytes() == b"complete"
        assert not agent._part_path(other).exists()
    finally:
        close_agent(agent)


def signed_message(key_path: str, n: int) -> tuple[bytes, bytes]:
    """(object id, stream) of a citizen-application message signed alone, as the outside
    signs one (canonical JSON, schema named)."""
    schema = "citizen-application"
    registry = SchemaRegistry.load()
    example = json.loads((SCHEMAS / f"{schema}.schema.json").read_text())["examples"][0]
    example["application_id"] = str(uuid.UUID(int=n))
    _, content = registry.check(schema, json.dumps(example).encode())
    key = load_secret_key(Path(key_path), ("ed25519",))
    oid = os.urandom(16)
    manifest = rec.Manifest(
        object_id=oid, kind="message", channel="messages", seq=n, name=f"application-{n}.json",
        media_type="application/json", size=len(content),
        sha256=hashlib.sha256(content).digest(), created_us=1, mtime_us=1,
        sender=key.public.key_id, schema=schema, subject="api:portal",
    )  # fmt: skip
    return oid, content + build_trailer(manifest, key)


def test_messages_beyond_the_memory_bound_wait_in_the_spool_and_are_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the messages thread is held (a messages folder that does not take them), what
    arrives beyond MESSAGES_IN_MEMORY bytes waits in the spool, not in memory; all of it is
    delivered in order of arrival, and the spool is empty after."""
    dep = init(tmp_path / "d")
    cfg = load_inside_config(Path(dep["inside"]["config"]))
    agent = InsideAgent(cfg, threading.Event())
    try:
        objects = [signed_message(dep["outside"]["signing_key"], n) for n in range(1, 7)]
        lane = agent._msg_lanes["messages"]
        monkeypatch.setattr(agent_module, "MESSAGES_IN_MEMORY", 2 * len(objects[0][1]) + 10)
        for oid, stream in objects:
            agent._to_messages(oid, len(stream), stream, "messages")
        jobs = []
        while not lane.work.empty():
            job = lane.work.get()
            assert job is not None
            jobs.append(job)
        held = [job[2] is not None for job in jobs]
        assert held == [True, True, False, False, False, False]
        spooled = sorted(p.name for p in (cfg.state_dir / "incoming").iterdir())
        assert spooled == sorted(f"{oid.hex()}.obj" for oid, _ in objects[2:])
        for job in jobs:
            lane.work.put(job)
        lane.work.put(None)
        agent._messages_loop(lane)
        assert agent._mem_bytes == 0
    finally:
        close_agent(agent)
    folder = Path(dep["channels"]["messages"]["deliver"])
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"application-{n}.json" for n in range(1, 7)
    )
    assert list((cfg.state_dir / "incoming").iterdir()) == []
    for oid, _ in objects:
        assert ledger_state(dep, oid) == "delivered"


def test_messages_held_by_an_audit_outage_at_a_stop_are_delivered_at_the_next_start(
    tmp_path: Path, agents: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit log cannot write (fail closed: nothing is delivered), messages wait in
    memory, and the inside is stopped: they are written to the spool, not dropped, and a
    real inside started next delivers each of them once."""
    dep = init(tmp_path / "d")
    cfg = load_inside_config(Path(dep["inside"]["config"]))
    folder = Path(dep["channels"]["messages"]["deliver"])
    stop = threading.Event()
    agent = InsideAgent(cfg, stop)
    objects = [signed_message(dep["outside"]["signing_key"], n) for n in range(1, 4)]
    lane = agent._msg_lanes["messages"]
    monkeypatch.setattr(agent_module, "AUDIT_WAIT", 0.01)
    try:
        agent.audit.log.failed.set()
        for oid, stream in objects:
            agent._to_messages(oid, len(stream), stream, "messages")
        worker = threading.Thread(target=agent._messages_loop, args=(lane,))
        worker.start()
        wait_for(lambda: lane.work.qsize() == 2, what="the messages thread to take one")
        assert worker.is_alive()  # held by the audit log
        late = signed_message(dep["outside"]["signing_key"], 4)  # arrives while held
        agent._to_messages(late[0], len(late[1]), late[1], "messages")
        objects.append(late)
        stop.set()
        lane.work.put(None)
        worker.join(10)
        assert not worker.is_alive()
    finally:
        agent.audit.log.failed.clear()
        close_agent(agent)
    assert list(folder.iterdir()) == []
    spool = cfg.state_dir / "incoming"
    assert sorted(p.name for p in spool.iterdir()) == sorted(f"{o.hex()}.obj" for o, _ in objects)
    inside = agents("inside", dep["inside"]["config"])
    names = {f"application-{n}.json" for n in range(1, 5)}
    assert set(wait_files(str(folder), names, timeout=30)) == names
    assert inside.wait_event("kept_objects_to_deliver")["count"] == 4
    for oid, _ in objects:
        wait_for(lambda oid=oid: ledger_state(dep, oid) == "delivered", what="the ledger")
        assert [r["event"] for r in records(dep, oid)].count("delivery.delivered") <= 1
    wait_for(lambda: list(spool.iterdir()) == [], what="the spool to be emptied")

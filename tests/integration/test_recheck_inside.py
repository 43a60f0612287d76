"""The inside re-check in the inside agent: a file the outside vouched for, signed with the
real outside key, whose content the inside's independent check refuses, is quarantined
inside (never delivered), recorded as a high-severity ``recheck`` disagreement, and the
agent keeps delivering. A clean file with the same report is delivered and recorded.

The agent is a real InsideAgent on a real ``ferry init`` deployment (keys, ledger, audit
log, folders); the object streams are exactly what the outside would send.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import init

from ferry.audit.record import decode
from ferry.audit.segments import iter_lines, list_segments
from ferry.config import load_inside_config
from ferry.crypto.keys import load_secret_key
from ferry.wire import records as rec
from ferry.wire.sender import build_trailer
from inside.agent import InsideAgent

pytestmark = pytest.mark.integration


def png(extra_chunks: bytes = b"") -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    raw = b"".join(b"\x00" + bytes([x % 256, 0, 0] * 4) for x in range(4))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0))
        + extra_chunks
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def text_chunk() -> bytes:
    data = b"Comment\x00payload for the high side"
    return (
        struct.pack(">I", len(data))
        + b"tEXt"
        + data
        + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    )


def stage(
    agent: InsideAgent,
    key_path: str,
    name: str,
    content: bytes,
    seq: int,
    *,
    with_report: bool = True,
) -> tuple[bytes, int]:
    """Write an object stream (content + signed trailer) into the inside's spool."""
    key = load_secret_key(Path(key_path), ("ed25519",))
    oid = os.urandom(16)
    report = {"v": 1, "type": "png", "verdict": "deliver_cleaned", "features": {}, "actions": []}
    if not with_report:
        report = {}
    manifest = rec.Manifest(
        object_id=oid,
        kind="file",
        channel="documents",
        seq=seq,
        name=name,
        media_type="image/png",
        size=len(content),
        sha256=hashlib.sha256(content).digest(),
        created_us=1,
        mtime_us=1,
        sender=key.public.key_id,
        subject="folder:documents",
        report=json.dumps(report) if report else "",
    )
    stream = content + build_trailer(manifest, key)
    agent._spool_path(oid).write_bytes(stream)
    return oid, len(stream)


def close_agent(agent: InsideAgent) -> None:
    """Close what an InsideAgent that never ran holds (its consumer socket frees its port
    for an agent a test starts later)."""
    if agent.consumers is not None:
        agent.consumers.close()
    if agent.outbox is not None:
        agent.outbox.close()
    agent.audit.close()
    agent.ledger.close()


def test_a_disagreement_quarantines_inside_and_delivery_goes_on(tmp_path: Path) -> None:
    dep = init(tmp_path / "d")
    cfg = load_inside_config(Path(dep["inside"]["config"]))
    agent = InsideAgent(cfg, threading.Event())
    try:
        bad_oid, bad_len = stage(
            agent, dep["outside"]["signing_key"], "scan.png", png(text_chunk()), 1
        )
        agent._deliver_file(bad_oid, bad_len)
        good_oid, good_len = stage(agent, dep["outside"]["signing_key"], "clean.png", png(), 2)
        agent._deliver_file(good_oid, good_len)
    finally:
        close_agent(agent)
    deliver = Path(dep["channels"]["documents"]["deliver"])
    assert sorted(p.name for p in deliver.iterdir()) == ["clean.png"]
    kept = cfg.state_dir / "quarantine" / f"{bad_oid.hex()}.obj"
    assert kept.is_file()
    assert b"payload for the high side" in kept.read_bytes()
    records = [
        decode(line.data)
        for _, seg in list_segments(Path(dep["inside"]["audit_dir"]))
        for line in iter_lines(seg)
    ]
    bad = [r for r in records if r.get("corr") == bad_oid.hex()]
    assert [r["event"] for r in bad] == ["transfer.received", "recheck", "delivery.rejected"]
    assert bad[1]["result"] == "rejected"
    assert bad[1]["detail"]["disagreement"] is True
    assert bad[1]["detail"]["severity"] == "high"
    assert "tEXt" in bad[1]["reason"]
    good = [r["event"] for r in records if r.get("corr") == good_oid.hex()]
    assert good == ["transfer.received", "recheck", "delivery.delivered"]


def test_a_file_without_the_outside_report_is_refused_on_a_rechecked_channel(
    tmp_path: Path,
) -> None:
    """A compromised outside cannot skip the inside re-check by leaving the report out."""
    dep = init(tmp_path / "d")
    cfg = load_inside_config(Path(dep["inside"]["config"]))
    agent = InsideAgent(cfg, threading.Event())
    try:
        oid, length = stage(
            agent, dep["outside"]["signing_key"], "clean.png", png(), 1, with_report=False
        )
        agent._deliver_file(oid, length)
    finally:
        close_agent(agent)
    assert list(Path(dep["channels"]["documents"]["deliver"]).iterdir()) == []
    assert (cfg.state_dir / "quarantine" / f"{oid.hex()}.obj").is_file()
    records = [
        decode(line.data)
        for _, seg in list_segments(Path(dep["inside"]["audit_dir"]))
        for line in iter_lines(seg)
    ]
    [check] = [r for r in records if r["event"] == "recheck"]
    assert check["result"] == "rejected"
    assert "RECHECK_MISSING" in check["reason"]


def test_a_refused_file_is_on_disk_in_quarantine_before_the_ledger_says_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the ledger says rejected, a repeat is dropped as a duplicate and a start removes
    what the spool still holds of it: the quarantined copy must be on disk by then, its
    content and its name (else a power cut could leave nothing, or an empty file a release
    would call tampered)."""
    dep = init(tmp_path / "d")
    cfg = load_inside_config(Path(dep["inside"]["config"]))
    agent = InsideAgent(cfg, threading.Event())
    events: list[str] = []
    real_fsync, real_record = os.fsync, agent.ledger.record

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}")

    def record(oid: bytes, state: str, **kw: Any) -> None:
        real_record(oid, state, **kw)
        events.append(f"ledger {state}")

    try:
        oid, length = stage(agent, dep["outside"]["signing_key"], "scan.png", png(text_chunk()), 1)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(agent.ledger, "record", record)
        agent._deliver_file(oid, length)
    finally:
        monkeypatch.undo()
        close_agent(agent)
    folder = cfg.state_dir / "quarantine"
    kept = folder / f"{oid.hex()}.obj"
    assert kept.read_bytes() == png(text_chunk())
    rejected = events.index("ledger rejected")
    synced = events[:rejected]
    # (its fd still names the spool file when it is synced, just before it is moved)
    assert f"fsync {cfg.state_dir / 'incoming' / kept.name}" in synced, events
    assert (
        f"fsync {folder}"
        in synced[synced.index(f"fsync {cfg.state_dir / 'incoming' / kept.name}") :]
    )

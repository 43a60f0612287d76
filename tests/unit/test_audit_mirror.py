"""The audit mirror: pieces cut outside, placed and witnessed inside; sequence gaps.

Real audit logs, a real spool (SQLite) and real files; only the diode is left out: the
pieces the outside spools are handed to the inside's mirror directly, in any order.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from test_audit_untrusted_files import release_fifos, within

from ferry.audit.agent import AgentAudit
from ferry.audit.files import UnsafeFile
from ferry.audit.log import AuditLog, AuditSettings
from ferry.audit.merkle import Checkpoint, sign_checkpoint
from ferry.audit.record import Subject, decode
from ferry.audit.segments import CHECKPOINTS_FILE, iter_lines, list_segments, segment_name
from ferry.audit.verify import verify
from ferry.config_types import AuditParams
from ferry.crypto.keys import PublicKey, SecretKey, write_secret_key
from ferry.errors import UsageError
from ferry.wire import records as rec
from inside import mirror as mirror_module
from inside.gaps import Gap, SequenceGaps
from inside.mirror import AuditMirror, MirrorRejected
from inside.mirror_cli import status as mirror_status
from outside.mirror import RESEND_FILE, AuditShipper, pending_resend, request_resend
from outside.spool import Spool


def _outside_log(tmp_path: Path, records: int, *, segment_bytes: int = 64 * 1024) -> AuditLog:
    key = SecretKey.generate("ed25519")
    settings = AuditSettings(
        origin="test/outside", checkpoint_every=7, max_segment_bytes=segment_bytes
    )
    log = AuditLog(tmp_path / "outside-audit", key, settings)
    for n in range(records):
        log.append(
            "intake.accepted",
            subject=Subject.component("test"),
            obj={"item": f"{n:032x}", "channel": "documents", "seq": n + 1},
            detail={"pad": "x" * 200},
        )
    log.checkpoint()
    return log


def _inside(
    tmp_path: Path, peer: SecretKey, previous: list[PublicKey] | None = None
) -> tuple[AuditMirror, AgentAudit]:
    key = SecretKey.generate("ed25519")
    write_secret_key(tmp_path / "inside-audit.key", key, "audit")
    config = tmp_path / "inside.yaml"
    config.write_text("# test\n")
    state = tmp_path / "inside-state"
    state.mkdir()
    params = AuditParams(dir=tmp_path / "inside-audit", key=tmp_path / "inside-audit.key")
    audit = AgentAudit(params, "inside", state, config)
    return AuditMirror(tmp_path / "mirror", peer.public, audit, previous or ()), audit


def _pieces(tmp_path: Path, log: AuditLog) -> list[tuple[str, bytes]]:
    spool_state = tmp_path / "outside-state"
    spool_state.mkdir(exist_ok=True)
    spool = Spool(spool_state)
    shipper = AuditShipper(
        log.directory, spool, SecretKey.generate("ed25519"), spool_state, max_piece=20_000
    )
    out: list[tuple[str, bytes]] = []
    while items := shipper.step(mono=float(len(out) + 1) * 10):
        for item in items:
            assert item.data is not None
            assert item.channel == rec.AUDIT_CHANNEL
            out.append((item.name, item.data[: item.size]))
    spool.close()
    return out


def _events(directory: Path) -> list[str]:
    return [
        decode(line.data)["event"]
        for _, seg in list_segments(directory)
        for line in iter_lines(seg)
    ]


def test_pieces_in_any_order_and_repeated_rebuild_a_verified_mirror(tmp_path: Path) -> None:
    log = _outside_log(tmp_path, 450, segment_bytes=64 * 1024)
    key = log._key  # the test plays both sides
    pieces = _pieces(tmp_path, log)
    assert len({p[0].split("@")[0] for p in pieces}) > 2  # several segments plus checkpoints
    assert all(len(content) <= 20_000 for _, content in pieces)
    mirror, audit = _inside(tmp_path, key)
    shuffled = pieces + random.Random(5).sample(pieces, len(pieces) // 2)  # repeat copies
    random.Random(7).shuffle(shuffled)
    for name, content in shuffled:
        mirror.receive(name, content)
    audit.close()
    assert mirror.broken is None
    for _, seg in list_segments(log.directory):  # byte-identical, segment by segment
        assert (tmp_path / "mirror" / seg.name).read_bytes() == seg.read_bytes()
    report = verify(tmp_path / "mirror", key.public)
    assert report.verified
    assert report.records == log.size
    witnessed = _events(tmp_path / "inside-audit").count("audit.witnessed")
    assert witnessed == report.checkpoints_verified
    assert mirror.witnessed == report.last_checkpoint
    log.close()


def test_a_step_spools_its_pieces_in_one_transaction_or_none(tmp_path: Path) -> None:
    # (one durable commit per step, not one per piece: each commit holds the spool lock
    # through an fsync, and the API waits for that lock)
    log = _outside_log(tmp_path, 400)
    state = tmp_path / "outside-state"
    state.mkdir()
    spool = Spool(state)
    shipper = AuditShipper(log.directory, spool, SecretKey.generate("ed25519"), state,
                           max_piece=20_000)  # fmt: skip
    real = spool.add_blobs
    calls = []

    def failing(*args: object, **kw: object) -> None:
        calls.append(args)
        raise OSError(28, "No space left on device")

    spool.add_blobs = failing  # type: ignore[method-assign]
    with pytest.raises(OSError, match="No space"):
        shipper.step(mono=10.0)
    assert len(calls) == 1
    assert spool.counts() == {}  # nothing spooled ...
    assert shipper.shipped == {}  # ... and nothing counted as shipped
    spool.add_blobs = real  # type: ignore[method-assign]
    seen: list[str] = []
    spool._db.set_trace_callback(seen.append)
    items = shipper.step(mono=20.0)
    spool._db.set_trace_callback(None)
    assert len(items) > 3
    assert seen.count("COMMIT") == 1
    assert [i.seq for i in items] == list(range(1, len(items) + 1))
    assert items[0].name == f"{items[0].name.split('@')[0]}@0"  # from the start again
    assert spool.counts() == {"queued": len(items)}
    assert spool.next_seq(rec.AUDIT_CHANNEL) == len(items) + 1
    assert spool.backlog_bytes == sum(i.length for i in items)
    for n in range(50):
        log.append("intake.accepted", subject=Subject.component("test"), obj={"seq": 500 + n})
    log.checkpoint()
    more = shipper.step(mono=30.0)  # what came since, numbered on
    assert more
    assert [i.seq for i in more] == list(range(len(items) + 1, len(items) + len(more) + 1))
    spool.close()


def test_a_piece_contradicting_the_mirror_is_refused_and_recorded(tmp_path: Path) -> None:
    log = _outside_log(tmp_path, 30)
    pieces = _pieces(tmp_path, log)
    mirror, audit = _inside(tmp_path, log._key)
    for name, content in pieces:
        mirror.receive(name, content)
    name, content = pieces[0]
    forged = content.replace(b"intake.accepted", b"intake.rejected", 1)
    with pytest.raises(MirrorRejected):
        mirror.receive(name, forged)
    audit.close()
    assert mirror.broken is not None
    assert "audit.witness_inconsistent" in _events(tmp_path / "inside-audit")
    log.close()


def test_a_checkpoint_not_signed_by_the_outside_key_is_inconsistent(tmp_path: Path) -> None:
    log = _outside_log(tmp_path, 10)
    pieces = _pieces(tmp_path, log)
    mirror, audit = _inside(tmp_path, log._key)
    for name, content in pieces:
        mirror.receive(name, content)
    before = mirror.witnessed
    assert before > 0
    size = (tmp_path / "mirror" / "checkpoints.log").stat().st_size
    rogue = sign_checkpoint(
        Checkpoint("test/outside", log.size, b"\x01" * 32), SecretKey.generate("ed25519")
    )
    mirror.receive(f"checkpoints.log@{size}", rogue + b"\n")
    audit.close()
    assert mirror.broken is not None
    assert "not validly signed" in mirror.broken
    assert mirror.witnessed == before
    assert _events(tmp_path / "inside-audit").count("audit.witness_inconsistent") == 1
    log.close()


def test_a_checkpoint_whose_signatures_arrive_in_two_pieces_is_witnessed_whole(
    tmp_path: Path,
) -> None:
    """During a key rotation a note has two signature lines; a piece may end between them:
    the witness waits for the rest instead of taking the note and choking on its tail."""
    old, new = SecretKey.generate("ed25519"), SecretKey.generate("ed25519")
    settings = AuditSettings(origin="test/outside", checkpoint_every=5)
    with AuditLog(tmp_path / "outside-audit", new, settings, previous_keys=[old]) as log:
        for n in range(12):
            log.append("intake.accepted", subject=Subject.component("test"), detail={"n": n})
    outside = tmp_path / "outside-audit"
    (tmp_path / "in").mkdir()
    mirror, audit = _inside(tmp_path / "in", new)
    for _, seg in list_segments(outside):
        mirror.receive(f"{seg.name}@0", seg.read_bytes())
    data = (outside / CHECKPOINTS_FILE).read_bytes()
    cut = data.index(b"\n", data.index("\u2014 ".encode())) + 1  # after the first signature
    mirror.receive(f"{CHECKPOINTS_FILE}@0", data[:cut])
    assert mirror.witnessed == 0
    mirror.receive(f"{CHECKPOINTS_FILE}@{cut}", data[cut:])
    audit.close()
    assert mirror.broken is None
    report = verify(tmp_path / "in" / "mirror", new.public)
    assert report.verified
    assert mirror.witnessed == report.last_checkpoint > 0


@pytest.mark.parametrize(
    "name", ["../x@0", "audit-1.jsonl@0", "checkpoints.log@-1", "checkpoints.log@01", "a@b"]
)
def test_bad_piece_names_are_refused(tmp_path: Path, name: str) -> None:
    mirror, audit = _inside(tmp_path, SecretKey.generate("ed25519"))
    with pytest.raises(MirrorRejected):
        mirror.receive(name, b"{}\n")
    audit.close()
    assert [p.name for p in (tmp_path / "mirror").iterdir()] == []


def test_sequence_gaps_are_reported_once_after_the_grace() -> None:
    gaps = SequenceGaps(grace=10.0, per_channel={"slow": 100.0})
    for seq in (1, 2, 4, 7):
        gaps.seen("a", seq)
    gaps.heartbeat({"a": 7, "slow": 3}, now=0.0)
    assert gaps.due(5.0) == []  # still in flight, or a repeat may come
    gaps.seen("a", 5)  # late arrival within the grace
    assert gaps.due(10.0) == [Gap("a", 3, 3), Gap("a", 6, 6)]
    assert gaps.due(20.0) == []  # each range once
    gaps.heartbeat({"a": 9, "slow": 3}, now=20.0)
    gaps.seen("a", 9)
    assert gaps.due(31.0) == [Gap("a", 8, 8)]
    assert gaps.due(99.0) == []
    assert gaps.due(100.0) == [Gap("slow", 1, 3)]


def test_gaps_are_tracked_only_for_the_channels_configured() -> None:
    """A heartbeat names channels as its sender likes (up to a few hundred each): state for
    every name would grow with each one."""
    gaps = SequenceGaps(grace=10.0, channels={"documents", "messages"})
    for n in range(1000):
        gaps.heartbeat({f"made-up-{n}-{i}": 5 for i in range(200)} | {"documents": 2}, now=0.0)
        gaps.seen(f"made-up-{n}", 3)
    assert set(gaps._marks) | set(gaps._floor) | set(gaps._above) <= {"documents", "messages"}
    gaps.seen("documents", 1)
    assert gaps.due(10.0) == [Gap("documents", 2, 2)]


def _shipper(tmp_path: Path, log: AuditLog, seen: list[tuple[str, str | None]]) -> AuditShipper:
    state = tmp_path / "outside-state"
    state.mkdir(exist_ok=True)
    return AuditShipper(
        log.directory, Spool(state), log._key, state, max_piece=20_000,
        on_resend=lambda start, error: seen.append((start, error)),
    )  # fmt: skip


def _drain(shipper: AuditShipper, start: float) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    mono = start
    while items := shipper.step(mono=mono):
        out += [(i.name, i.data[: i.size]) for i in items if i.data is not None]
        mono += 10
    return out


def test_a_resend_fills_a_gap_both_copies_of_a_piece_left(tmp_path: Path) -> None:
    """Pieces of the second segment never arrive; the mirror stops there. A resend from
    where the mirror ends ships that segment, the later ones and the checkpoints again, and
    the mirror is whole and verified."""
    log = _outside_log(tmp_path, 450, segment_bytes=64 * 1024)
    seen: list[tuple[str, str | None]] = []
    shipper = _shipper(tmp_path, log, seen)
    first = _drain(shipper, 10.0)
    second = segment_name(2)
    lost = [p for p in first if p[0].startswith(second)][1:3]
    assert lost
    mirror, audit = _inside(tmp_path, log._key)
    for name, content in first:
        if (name, content) not in lost:
            mirror.receive(name, content)
    assert (tmp_path / "mirror" / second).stat().st_size < (log.directory / second).stat().st_size
    at = mirror_status(tmp_path / "mirror")["resend_from"]  # where the mirror ends
    assert at == f"{second}@{(tmp_path / 'mirror' / second).stat().st_size}"
    state = tmp_path / "outside-state"
    assert request_resend(state, at)["from"] == at
    again = _drain(shipper, 1000.0)
    assert seen == [(at, None)]
    assert not (state / RESEND_FILE).exists()
    assert again[0][0] == at  # from exactly there, in order
    assert not any(name.startswith(segment_name(1)) for name, _ in again)
    assert any(name == f"{CHECKPOINTS_FILE}@0" for name, _ in again)
    for name, content in again:
        mirror.receive(name, content)
    audit.close()
    assert mirror.broken is None
    for _, seg in list_segments(log.directory):
        assert (tmp_path / "mirror" / seg.name).read_bytes() == seg.read_bytes()
    assert verify(tmp_path / "mirror", log._key.public).verified
    assert _drain(shipper, 5000.0) == []  # and then nothing more
    log.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"{not json",
        b"[]",
        b'{"from": 7}',
        b'{"from": "../../etc/passwd@0"}',
        b'{"from": "audit-000001.jsonl@-5"}',
        b'{"from": "audit-000001.jsonl@0", "pad": "' + b"x" * 5000 + b'"}',
    ],
)
def test_a_bad_resend_request_is_refused_recorded_and_removed(
    tmp_path: Path, request_bytes: bytes
) -> None:
    log = _outside_log(tmp_path, 60)
    seen: list[tuple[str, str | None]] = []
    shipper = _shipper(tmp_path, log, seen)
    shipped = _drain(shipper, 10.0)
    assert shipped
    state = tmp_path / "outside-state"
    (state / RESEND_FILE).write_bytes(request_bytes)
    assert _drain(shipper, 1000.0) == []  # nothing shipped again
    assert len(seen) == 1
    assert seen[0][1]  # the reason
    assert not (state / RESEND_FILE).exists()
    log.append("intake.accepted", subject=Subject.component("test"), obj={"seq": 9}, durable=True)
    assert _drain(shipper, 2000.0)  # and the shipper goes on
    log.close()


def test_a_resend_place_must_name_a_file_and_an_offset(tmp_path: Path) -> None:
    for bad in ("audit-1.jsonl@0", "checkpoints.log", "audit-000001.jsonl@01", "x@0"):
        with pytest.raises(UsageError, match="FILE@OFFSET"):
            request_resend(tmp_path, bad)
    assert not (tmp_path / RESEND_FILE).exists()
    assert request_resend(tmp_path)["from"] == f"{segment_name(1)}@0"  # the whole log


def test_a_waiting_request_is_read_only_so_far(tmp_path: Path) -> None:
    """(``ferry outside mirror status`` shows a waiting request; a huge or broken file in
    its place is read up to the bound and shown as none.)"""
    request_resend(tmp_path, "checkpoints.log@0")
    assert pending_resend(tmp_path)["from"] == "checkpoints.log@0"  # type: ignore[index]
    (tmp_path / RESEND_FILE).write_bytes(b'{"from": "' + b"x" * (8 * 1024 * 1024) + b'"}')
    assert pending_resend(tmp_path) is None


def test_empty_and_tiny_out_of_order_pieces_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pieces come from the outside (a compromised one has the key): an empty piece is
    refused, and out-of-order pieces held for a gap count what holding them costs, not
    only their bytes (a million one-byte pieces would otherwise all be held)."""
    monkeypatch.setattr(mirror_module, "MAX_PENDING_BYTES", 10_000)
    mirror, audit = _inside(tmp_path, SecretKey.generate("ed25519"))
    with pytest.raises(MirrorRejected, match="empty"):
        mirror.receive("audit-000001.jsonl@5", b"")
    for offset in range(1000, 2000):
        mirror.receive(f"audit-000001.jsonl@{offset}", b"x")
    held = mirror._pending["audit-000001.jsonl"]
    assert len(held) == 10_000 // (1 + mirror_module.PIECE_COST)
    assert mirror._pending_bytes <= 10_000
    audit.close()


# --- files that are not regular files, in the mirror's folder or the outside log's --------------


def test_a_fifo_as_the_mirrored_checkpoints_log_stops_the_witness_without_hanging(
    tmp_path: Path,
) -> None:
    """Only the mirror writes its folder: a FIFO there blocked the inside's start for good
    (the witness opened it to read); now the witness stops and says why, in the inside's log
    too (at a start it said so only in the agent's log lines)."""
    (tmp_path / "mirror").mkdir()
    os.mkfifo(tmp_path / "mirror" / CHECKPOINTS_FILE)
    try:
        mirror, audit = within(lambda: _inside(tmp_path, SecretKey.generate("ed25519")))
        audit.close()
    finally:
        release_fifos(tmp_path / "mirror")
    assert mirror.broken == (
        "checkpoints.log is not a regular file (a FIFO): the mirror does not read it"
    )
    assert _events(tmp_path / "inside-audit").count("audit.witness_inconsistent") == 1


def test_a_fifo_as_a_mirrored_segment_is_refused_without_hanging(tmp_path: Path) -> None:
    """Placing a piece opened the segment to append (a FIFO blocks that), the witness opened
    it to count and hash records: the piece is refused (the inside logs it) and the witness
    stops, saying why."""
    log = _outside_log(tmp_path, 30)
    pieces = _pieces(tmp_path, log)
    log.close()
    (tmp_path / "mirror").mkdir()
    fifo = tmp_path / "mirror" / segment_name(1)
    os.mkfifo(fifo)
    mirror, audit = _inside(tmp_path, log._key)
    try:
        for name, content in pieces:
            if name.startswith(fifo.name):
                with pytest.raises(UnsafeFile, match="not a regular file"):
                    within(lambda n=name, c=content: mirror.receive(n, c))
            else:
                within(lambda n=name, c=content: mirror.receive(n, c))
        audit.close()
    finally:
        release_fifos(tmp_path / "mirror")
    assert mirror.broken == (
        f"{fifo.name} is not a regular file (a FIFO): the mirror does not read it"
    )
    assert mirror.witnessed == 0


def test_the_shipper_does_not_hang_on_a_fifo_as_checkpoints_log(tmp_path: Path) -> None:
    """The outside's shipper opened checkpoints.log to read, and a FIFO in its place blocked
    the shipping thread for good; now the step fails (the agent logs it) and ships nothing."""
    log = _outside_log(tmp_path, 30)
    log.close()
    ckpt = log.directory / CHECKPOINTS_FILE
    ckpt.unlink()
    os.mkfifo(ckpt)
    seen: list[tuple[str, str | None]] = []
    shipper = _shipper(tmp_path, log, seen)
    try:
        with pytest.raises(UnsafeFile, match=r"checkpoints\.log is not a regular file"):
            within(lambda: shipper.step(mono=10.0))
    finally:
        release_fifos(log.directory)
    assert shipper.shipped == {}

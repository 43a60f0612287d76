"""Audit key rotation: the handover from one audit key to the next, in the log, in the
verifier and in the inside's witness.

While ``previous_keys`` names the old key, every checkpoint is signed by the new key and the
old one, and the run's ``audit.started`` names the old key (``previous_checkpoint_keys``). A
verifier given only the new key follows that record back to the old key, but only when a
checkpoint the new key signed covers it; nothing leads forward from an old key.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_audit_mirror import _inside, _pieces

from ferry.audit.log import AuditError, AuditLog, AuditSettings
from ferry.audit.merkle import parse_notes
from ferry.audit.record import AuditRecordInvalid, Subject, decode
from ferry.audit.segments import CHECKPOINTS_FILE, iter_lines, list_segments
from ferry.audit.verify import verify
from ferry.crypto.keys import SecretKey

SETTINGS = AuditSettings(origin="test/outside", checkpoint_every=5)


def _run(directory: Path, key: SecretKey, previous: list[SecretKey], records: int) -> None:
    with AuditLog(directory, key, SETTINGS, previous_keys=previous) as log:
        for n in range(records):
            log.append("intake.accepted", subject=Subject.component("test"), detail={"n": n})


def _records(directory: Path) -> list[dict]:
    return [decode(line.data) for _, seg in list_segments(directory) for line in iter_lines(seg)]


def _rotated(directory: Path) -> tuple[SecretKey, SecretKey, int]:
    """A log written with key A, then with B while A hands over, then with B alone."""
    a, b = SecretKey.generate("ed25519"), SecretKey.generate("ed25519")
    _run(directory, a, [], 12)
    before = len(parse_notes((directory / CHECKPOINTS_FILE).read_bytes()).notes)
    with pytest.raises(AuditError, match=r"audit\.previous_keys"):
        AuditLog(directory, b, SETTINGS)  # a new key alone: the log is not taken over
    _run(directory, b, [a], 12)
    _run(directory, b, [], 12)
    return a, b, before


def test_the_handover_run_signs_with_both_keys_and_names_the_old_one(tmp_path: Path) -> None:
    a, b, before = _rotated(tmp_path / "log")
    notes = parse_notes((tmp_path / "log" / CHECKPOINTS_FILE).read_bytes()).notes
    signers = [
        tuple(k for k, key in (("a", a), ("b", b)) if n.signature_status(key.public) == "valid")
        for n in notes
    ]
    overlap = signers[before:].index(("b",)) + before  # where B signs alone
    assert signers[:before] == [("a",)] * before
    assert signers[before:overlap] == [("a", "b")] * (overlap - before)
    assert overlap - before >= 3  # the opening checkpoint, two every 5 records, the closing one
    assert set(signers[overlap:]) == {("b",)}
    started = [r["detail"] for r in _records(tmp_path / "log") if r["event"] == "audit.started"]
    assert [d["checkpoint_key"] for d in started] == [k.public.to_string() for k in (a, b, b)]
    assert [d.get("previous_checkpoint_keys") for d in started] == [
        None, [a.public.to_string()], None
    ]  # fmt: skip
    assert len({n.checkpoint.origin for n in notes}) == 1


def test_the_new_key_alone_verifies_the_whole_log(tmp_path: Path) -> None:
    a, b, _ = _rotated(tmp_path / "log")
    report = verify(tmp_path / "log", b.public)
    assert report.verified, [p.to_json() for p in report.problems]
    assert report.checkpoints_verified == report.checkpoints
    handover = next(
        r["idx"]
        for r in _records(tmp_path / "log")
        if "previous_checkpoint_keys" in r.get("detail", {})
    )
    assert report.keys == [
        {"key_id": b.public.key_id.hex(), "trusted": "given"},
        {"key_id": a.public.key_id.hex(), "trusted": f"handed over at record {handover}"},
    ]
    assert report.key_id == b.public.key_id.hex()


def test_the_old_key_does_not_vouch_for_the_new_one(tmp_path: Path) -> None:
    a, _, _ = _rotated(tmp_path / "log")
    notes = parse_notes((tmp_path / "log" / CHECKPOINTS_FILE).read_bytes()).notes
    b_only = [n for n in notes if n.signature_status(a.public) == "absent"]
    report = verify(tmp_path / "log", a.public)
    assert not report.ok
    assert {p.code for p in report.problems} == {"CHECKPOINT_UNSIGNED"}
    assert len(report.problems) == min(len(b_only), 10) + (len(b_only) > 10)
    assert report.keys == [{"key_id": a.public.key_id.hex(), "trusted": "given"}]
    stranger = verify(tmp_path / "log", SecretKey.generate("ed25519").public)
    assert stranger.checkpoints_verified == 0
    assert len(stranger.keys) == 1


def test_a_handover_no_trusted_checkpoint_covers_is_not_followed(tmp_path: Path) -> None:
    """Records naming an earlier key count only under a checkpoint a trusted key signed:
    here the handover run's checkpoints are gone, so the old key's are not trusted."""
    log = tmp_path / "log"
    a, b = SecretKey.generate("ed25519"), SecretKey.generate("ed25519")
    _run(log, a, [], 12)
    kept = (log / CHECKPOINTS_FILE).read_bytes()
    _run(log, b, [a], 3)
    (log / CHECKPOINTS_FILE).write_bytes(kept)  # B's signatures removed
    report = verify(log, b.public)
    assert report.keys == [{"key_id": b.public.key_id.hex(), "trusted": "given"}]
    assert report.checkpoints_verified == 0
    codes = {p.code for p in report.problems}
    assert "CHECKPOINT_UNSIGNED" in codes
    assert "CHECKPOINT_MISSING" in codes


def test_without_a_key_every_key_the_log_names_is_used_and_it_is_not_authenticated(
    tmp_path: Path,
) -> None:
    a, b, _ = _rotated(tmp_path / "log")
    report = verify(tmp_path / "log")
    assert report.ok
    assert not report.verified
    assert [k["key_id"] for k in report.keys] == [a.public.key_id.hex(), b.public.key_id.hex()]
    assert {k["trusted"] for k in report.keys} == {"named by the log"}
    assert any(w.code == "UNAUTHENTICATED" for w in report.warnings)


def test_the_same_key_as_current_and_previous_is_refused(tmp_path: Path) -> None:
    a = SecretKey.generate("ed25519")
    with pytest.raises(AuditError, match="given twice"):
        AuditLog(tmp_path / "log", a, SETTINGS, previous_keys=[a])


def test_the_witness_takes_checkpoints_of_the_keys_it_is_given(tmp_path: Path) -> None:
    """The inside witnesses a rotated outside log with the new key and the old one listed
    (audit.previous_peer_public_keys); with the new key alone it stops at the first
    checkpoint only the old key signed."""
    a, b = SecretKey.generate("ed25519"), SecretKey.generate("ed25519")
    _run(tmp_path / "outside-audit", a, [], 12)
    _run(tmp_path / "outside-audit", b, [a], 12)
    _run(tmp_path / "outside-audit", b, [], 12)
    with AuditLog(tmp_path / "outside-audit", b, SETTINGS) as log:
        pieces = _pieces(tmp_path, log)
    for previous, broken in (([a.public], False), ([], True)):
        where = tmp_path / ("with-old" if previous else "new-only")
        where.mkdir()
        mirror, audit = _inside(where, b, previous)
        for name, content in pieces:
            mirror.receive(name, content)
        audit.close()
        assert (mirror.broken is not None) == broken
        if broken:
            assert "not validly signed" in str(mirror.broken)
            assert mirror.witnessed == 0
        else:
            report = verify(where / "mirror", b.public)
            assert report.verified
            assert mirror.witnessed == report.last_checkpoint


def test_a_log_reopens_when_the_handover_is_in_a_segment_it_does_not_rescan(
    tmp_path: Path,
) -> None:
    """Reopening replays only the last segments; checkpoints before them, signed by the old
    key alone, are left to a whole-log verification (which follows the handover)."""
    log = tmp_path / "log"
    small = AuditSettings(origin="test/outside", checkpoint_every=5, max_segment_bytes=65536)
    a, b = SecretKey.generate("ed25519"), SecretKey.generate("ed25519")
    pad = {"pad": "x" * 2000}
    for key, previous, records in ((a, [], 40), (b, [a], 5), (b, [], 40), (b, [], 3)):
        with AuditLog(log, key, small, previous_keys=previous) as audit:
            for _ in range(records):
                audit.append("intake.accepted", subject=Subject.component("test"), detail=pad)
    segments = list_segments(log)
    assert len(segments) >= 3
    handover = next(r for r in _records(log) if "previous_checkpoint_keys" in r.get("detail", {}))
    last_first = decode(next(iter_lines(segments[-1][1])).data)["idx"]
    assert handover["idx"] < last_first  # the last reopening did not read it
    assert verify(log, b.public).verified
    assert verify(segments[-1][1], b.public).ok  # one segment: its own checkpoints are b's


def test_keys_a_log_names_that_are_not_audit_keys_are_ignored(tmp_path: Path) -> None:
    """A start record naming strings that are not Ed25519 public keys hands over nothing;
    a value the schema refuses is not written at all."""
    log = tmp_path / "log"
    a = SecretKey.generate("ed25519")
    x25519 = SecretKey.generate("x25519").public.to_string()
    with AuditLog(log, a, SETTINGS) as audit:
        started = {"origin": "test/outside", "checkpoint_key": "x", "resumed": True}
        earlier = ["not a key", x25519, "ferry-pk:ed25519:" + "A" * 10]
        audit.append(
            "audit.started",
            subject=Subject.component("test"),
            detail={**started, "previous_checkpoint_keys": earlier},
        )
        for bad in ("one string", ["k"] * 4, ["k" * 201]):
            with pytest.raises(AuditRecordInvalid):
                audit.append(
                    "audit.started",
                    subject=Subject.component("test"),
                    detail={**started, "previous_checkpoint_keys": bad},
                )
    report = verify(log, a.public)
    assert report.verified, [p.to_json() for p in report.problems]
    assert report.keys == [{"key_id": a.public.key_id.hex(), "trusted": "given"}]

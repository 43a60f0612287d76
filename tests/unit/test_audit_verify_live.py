"""verify of a log whose writer is still appending (an auditor checking a running agent): the
checkpoints stored while verify reads, and the segment begun while it lists them, are not
problems; checkpoints removed are, live or not. The real writer, the real verify; the writer
appends at the exact point between verify's reads (a wrapper around that read)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.audit import AuditLog, AuditSettings, Subject, verify
from ferry.audit.merkle import parse_notes
from ferry.audit.verify import _Verifier
from ferry.crypto.keys import SecretKey

KEY = SecretKey("ed25519", bytes(range(32)))
SENDER = Subject.component("sender")
verify_module = importlib.import_module("ferry.audit.verify")  # (ferry.audit.verify: the function)
SETTINGS = AuditSettings(
    origin="outside.test/audit", checkpoint_every=10, max_segment_bytes=4 * 16384
)


def append(log: AuditLog, records: int) -> None:
    for i in range(records):
        log.append("link.heartbeat_gap", subject=SENDER, result="info", detail={"n": i})
    log.wait_durable(log.size - 1, 10.0)


def codes(report: Any) -> list[str]:
    return [p.code for p in report.problems]


@pytest.fixture
def live(tmp_path: Path) -> Iterator[AuditLog]:
    with AuditLog(tmp_path / "log", KEY, SETTINGS) as log:
        append(log, 25)
        yield log


def between(monkeypatch: pytest.MonkeyPatch, step: str, action: Callable[[], None]) -> None:
    """Run ``action`` once, right after verify's ``step`` (a _Verifier method)."""
    original = getattr(_Verifier, step)

    def wrapped(self: _Verifier, *args: Any) -> Any:
        result = original(self, *args)
        action()
        return result

    monkeypatch.setattr(_Verifier, step, wrapped)


def test_checkpoints_stored_after_the_notes_were_read_are_not_missing(
    live: AuditLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log_dir = tmp_path / "log"
    before = len(parse_notes((log_dir / "checkpoints.log").read_bytes()).notes)
    between(monkeypatch, "_load_notes", lambda: append(live, 35))  # three more checkpoints
    report = verify(log_dir, KEY.public)
    after = len(parse_notes((log_dir / "checkpoints.log").read_bytes()).notes)
    assert after >= before + 3  # (the writer did store them meanwhile)
    assert report.problems == [], codes(report)
    assert report.tree_size == live.size


def test_checkpoints_stored_only_after_the_scan_passed_their_records_are_found(
    live: AuditLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan can be ahead of the writer: it reads an audit.checkpoint record before the
    writer stores its note. Those are looked for once more after the scan. (The notes are
    held back from checkpoints.log until the scan is over, as a writer behind it would.)"""
    ckpts = tmp_path / "log" / "checkpoints.log"
    held = {}

    def grow_and_hold_back() -> None:
        start = ckpts.stat().st_size
        append(live, 35)
        raw = ckpts.read_bytes()
        held["tail"] = raw[start:]
        os.truncate(ckpts, start)

    def store_the_rest() -> None:
        with ckpts.open("ab") as f:
            f.write(held["tail"])

    between(monkeypatch, "_load_notes", grow_and_hold_back)
    original = _Verifier._check_note_signatures

    def after_the_scan(self: _Verifier, keys: Any) -> Any:
        store_the_rest()
        return original(self, keys)

    monkeypatch.setattr(_Verifier, "_check_note_signatures", after_the_scan)
    report = verify(tmp_path / "log", KEY.public)
    assert held["tail"].count(b"\n\n") >= 3  # (three notes or more were held back)
    assert report.problems == [], codes(report)


def test_a_segment_begun_as_the_segments_are_listed_is_not_a_truncation(
    live: AuditLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer begins a segment, and stores checkpoints covering its records, just after
    verify lists the segments: no note read may cover records in a segment not listed."""
    log_dir = tmp_path / "log"
    segments = sorted(log_dir.glob("audit-*.jsonl"))

    def rotate() -> None:  # records enough for a new segment, and its checkpoints
        big = {"text": "x" * 2000}
        while sorted(log_dir.glob("audit-*.jsonl")) == segments:
            live.append("link.heartbeat_gap", subject=SENDER, result="info", detail=big)
            live.wait_durable(live.size - 1, 10.0)
        append(live, 25)

    listed = verify_module.list_segments

    def list_then_rotate(*args: Any, **kw: Any) -> Any:
        found = listed(*args, **kw)
        if found and len(found) == len(segments):
            rotate()
        return found

    monkeypatch.setattr(verify_module, "list_segments", list_then_rotate)
    report = verify(log_dir, KEY.public)
    assert len(sorted(log_dir.glob("audit-*.jsonl"))) > len(segments)
    assert report.problems == [], codes(report)


def test_a_checkpoint_stored_meanwhile_that_does_not_match_the_records_stays_missing(
    live: AuditLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found past the notes read, a note counts only if it is the records' own: signed by
    the key and with their root."""
    log_dir = tmp_path / "log"
    ckpts = log_dir / "checkpoints.log"

    def grow_and_forge() -> None:
        append(live, 35)
        raw = ckpts.read_bytes()
        last = parse_notes(raw).notes[-2]  # (a checkpoint stored meanwhile, not the last)
        body = raw[last.offset : last.end]
        root_line = body.split(b"\n")[2]
        forged = body.replace(root_line, b"A" * len(root_line), 1)
        ckpts.write_bytes(raw[: last.offset] + forged + raw[last.end :])

    between(monkeypatch, "_load_notes", grow_and_forge)
    report = verify(log_dir, KEY.public)
    assert "CHECKPOINT_MISSING" in codes(report)


def test_checkpoints_removed_from_the_end_are_still_missing(tmp_path: Path) -> None:
    """The read past the notes finds nothing the writer did not store: removing the last
    notes of a stopped log is still CHECKPOINT_MISSING."""
    log_dir = tmp_path / "log"
    with AuditLog(log_dir, KEY, SETTINGS) as log:
        append(log, 45)
    ckpts = log_dir / "checkpoints.log"
    raw = ckpts.read_bytes()
    notes = parse_notes(raw).notes
    ckpts.write_bytes(raw[: notes[-3].offset])  # the last three notes gone
    report = verify(log_dir, KEY.public)
    assert "CHECKPOINT_MISSING" in codes(report)

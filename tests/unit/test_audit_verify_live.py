"""verify of a log whose writer is still appending (an auditor checking a running agent): the
checkpoints stored while verify reads, and the segment begun while it lists them, are not
problems; checkpoints removed are, live or not. The real writer, the real verify; the writer
appends at the exact point between verify's reads (a wrapper around that read)."""

from __future__ import annotations

import base64
import importlib
import json
import os
import shutil
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ferry.audit import AuditLog, AuditSettings, Subject, verify
from ferry.audit.locate import LogLocation
from ferry.audit.merkle import SIG_PREFIX, parse_notes
from ferry.audit.reconcile import Accountant, _check, _Counted
from ferry.audit.timeline import LogStats
from ferry.audit.verify import _Verifier
from ferry.crypto.keys import SecretKey

KEY = SecretKey("ed25519", bytes(range(32)))
NEW = SecretKey("ed25519", bytes(range(1, 33)))
THIRD = SecretKey("ed25519", bytes(range(2, 34)))
ORIGIN = "outside.test/audit"
SENDER = Subject.component("sender")
verify_module = importlib.import_module("ferry.audit.verify")  # (ferry.audit.verify: the function)
SETTINGS = AuditSettings(origin=ORIGIN, checkpoint_every=10, max_segment_bytes=4 * 16384)
BIG_SEGMENTS = AuditSettings(origin=ORIGIN, checkpoint_every=10, max_segment_bytes=1 << 24)


def append(log: AuditLog, records: int) -> None:
    for i in range(records):
        log.append("link.heartbeat_gap", subject=SENDER, result="info", detail={"n": i})
    log.wait_durable(log.size - 1, 10.0)


def stored(log: AuditLog) -> None:
    """Wait until the writer has stored the note of every checkpoint announced (it stores a
    note after its records: before the bytes of checkpoints.log are held back or cut)."""
    log.checkpoint(10.0)


def codes(report: Any) -> list[str]:
    return [p.code for p in report.problems]


def before_finish(monkeypatch: pytest.MonkeyPatch, action: Callable[[], None]) -> None:
    """Run ``action`` once the scan is over, before verify's checks after it (the writer,
    behind the scan, stores its notes then)."""
    original = _Verifier._finish
    done: list[int] = []

    def wrapped(self: _Verifier) -> None:
        if self.report_io and not done:  # (verify's, not a writer's scan_tail)
            done.append(1)
            action()
        original(self)

    monkeypatch.setattr(_Verifier, "_finish", wrapped)


def notes_after_the_scan(
    monkeypatch: pytest.MonkeyPatch, ckpts: Path, action: Callable[[], None]
) -> dict[str, bytes]:
    """Run ``action`` (the writer goes on; it ends with :func:`stored`) right after verify read
    the notes, and hold the notes it stored back from ``ckpts`` until the scan is over, as a
    writer behind the scan would store them. Returns {"tail": the notes held back}."""
    held: dict[str, bytes] = {}

    def hold_back() -> None:
        start = ckpts.stat().st_size
        action()
        held["tail"] = ckpts.read_bytes()[start:]
        os.truncate(ckpts, start)

    def store_the_rest() -> None:
        with ckpts.open("ab") as f:
            f.write(held["tail"])

    between(monkeypatch, "_load_notes", hold_back)
    before_finish(monkeypatch, store_the_rest)
    return held


class Runs:
    """The writer's runs a test starts (while verify reads), closed at its end or when said."""

    def __init__(self) -> None:
        self.logs: list[AuditLog] = []

    def start(
        self,
        d: Path,
        key: SecretKey,
        settings: AuditSettings = SETTINGS,
        previous: Sequence[SecretKey] = (),
    ) -> AuditLog:
        log = AuditLog(d, key, settings, previous_keys=previous)
        self.logs.append(log)
        return log

    def close(self) -> None:
        while self.logs:
            self.logs.pop().close()


@pytest.fixture
def runs() -> Iterator[Runs]:
    started = Runs()
    yield started
    started.close()


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    d = tmp_path / "log"
    with AuditLog(d, KEY, SETTINGS) as log:
        append(log, 25)
    return d


@pytest.fixture
def live(tmp_path: Path) -> Iterator[AuditLog]:
    with AuditLog(tmp_path / "log", KEY, SETTINGS) as log:
        append(log, 25)
        yield log


def between(monkeypatch: pytest.MonkeyPatch, step: str, action: Callable[[], None]) -> None:
    """Run ``action`` once, right after verify's ``step`` (a _Verifier method)."""
    original = getattr(_Verifier, step)
    done = []

    def wrapped(self: _Verifier, *args: Any, **kw: Any) -> Any:
        result = original(self, *args, **kw)
        if not done:
            done.append(1)
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

    def grow() -> None:
        append(live, 35)
        stored(live)

    held = notes_after_the_scan(monkeypatch, ckpts, grow)
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


# --- found by review: memory, mismatches, restarts, rotations, a new agent -----------------


def junk_signed(raw: bytes, note: Any, sigs: int = 100) -> bytes:
    """The note's own text (origin, size, root: it matches the records) with ``sigs``
    signature lines by a key nobody trusts, each near the line limit."""
    body = raw[note.offset : note.end].split(b"\n\n", 1)[0] + b"\n\n"
    line = SIG_PREFIX + b"x " + base64.b64encode(b"\1\2\3\4" + b"\0" * 700) + b"\n"
    return body + line * sigs + b"\n"


def test_memory_stays_bounded_with_unsigned_notes_past_the_first_read(tmp_path: Path) -> None:
    """Memory stays bounded whatever checkpoints.log holds: a malformed first line makes
    every note "later", and each copy of a real note here has 100 long signature lines by a
    key nobody trusts. A checkpoint waiting for its second look keeps the offset of such a
    note, never the note (kept whole, 250 of them took 20 MiB)."""
    d = tmp_path / "log"
    settings = AuditSettings(origin=ORIGIN, checkpoint_every=1, max_segment_bytes=1 << 26)
    with AuditLog(d, KEY, settings) as log:
        append(log, 250)
    ckpts = d / "checkpoints.log"
    raw = ckpts.read_bytes()
    notes = parse_notes(raw).notes
    assert len(notes) >= 250
    ckpts.write_bytes(b"\xff\n\n" + b"".join(junk_signed(raw, n) for n in notes))
    tracemalloc.start()
    try:
        report = verify(d, KEY.public)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "CHECKPOINT_MALFORMED" in codes(report)
    assert peak < 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"


def test_a_signed_late_note_contradicting_the_last_checkpoint_record_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer stores its note after verify's first read; the record it covers (the last
    one) is changed on disk. That signed note contradicts the records: not verified (it was
    dropped, and the last checkpoint only CHECKPOINT_PENDING, a warning), as the same change
    in a stopped log is CHECKPOINT_MISMATCH."""
    d = tmp_path / "log"
    with AuditLog(d, KEY, SETTINGS) as live:
        append(live, 25)

        def write_then_tamper() -> None:
            append(live, 5)
            live.checkpoint(10.0)  # the last record is this audit.checkpoint; its note stored
            seg = sorted(d.glob("audit-*.jsonl"))[-1]
            data = seg.read_bytes()
            head, last = data[:-1].rsplit(b"\n", 1)
            rec = json.loads(last)
            assert rec["event"] == "audit.checkpoint"
            ts = rec["ts"]
            bumped = ts[:-2] + str((int(ts[-2]) + 1) % 10) + "Z"  # (a few µs later)
            seg.write_bytes(head + b"\n" + last.replace(ts.encode(), bumped.encode()) + b"\n")

        between(monkeypatch, "_load_notes", write_then_tamper)
        report = verify(d, KEY.public)
    assert not report.verified, (codes(report), [w.code for w in report.warnings])


def test_a_restart_during_verify_is_not_data_after_close(
    log_dir: Path, monkeypatch: pytest.MonkeyPatch, runs: Runs
) -> None:
    """The stopped agent starts again after verify read checkpoints.log: its opening
    checkpoint's note is past the first read, and still the opening of a run of the writer
    (it was taken as unsigned, and the next record as DATA_AFTER_CLOSE)."""
    between(monkeypatch, "_load_notes", lambda: append(runs.start(log_dir, KEY), 15))
    report = verify(log_dir, KEY.public)
    assert report.problems == [], codes(report)


def test_a_key_rotation_restart_during_verify_leaves_old_checkpoints_signed(
    log_dir: Path, monkeypatch: pytest.MonkeyPatch, runs: Runs
) -> None:
    """The agent restarts with a new key (previous_keys names the old one) after verify read
    checkpoints.log: a note stored since, signed by the new key, covers the handover, so
    the earlier notes are trusted (each was CHECKPOINT_UNSIGNED)."""
    between(
        monkeypatch, "_load_notes", lambda: append(runs.start(log_dir, NEW, previous=[KEY]), 15)
    )
    report = verify(log_dir, NEW.public)
    assert report.problems == [], codes(report)


def test_notes_all_stored_after_the_first_read_are_not_no_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new agent creates checkpoints.log before its first segment and stores its first
    note after its opening records: verify reading it empty, then the records, counts the
    notes found later (it reported NO_CHECKPOINT, and checkpoints_verified 0)."""
    d = tmp_path / "log"
    with AuditLog(d, KEY, SETTINGS) as live:
        append(live, 25)
        stored(live)
        ckpts = d / "checkpoints.log"
        held = ckpts.read_bytes()
        os.truncate(ckpts, 0)  # (as the file was before the first note)

        def store() -> None:
            with ckpts.open("ab") as f:
                f.write(held)

        between(monkeypatch, "_load_notes", store)
        report = verify(d, KEY.public)
    assert report.problems == [], codes(report)


def test_a_note_read_before_its_second_signature_line_does_not_hide_later_notes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """During a rotation each note has two signature lines. A first read that ends after
    the first one (the writer's write not yet all visible) takes the note as whole; the
    rest, "— <second signature>", belongs to it, not to a next note (read as one, it failed,
    and every later checkpoint was CHECKPOINT_MISSING)."""
    d = tmp_path / "log"
    with AuditLog(d, NEW, SETTINGS, previous_keys=[KEY]) as live:
        append(live, 25)
        stored(live)
        ckpts = d / "checkpoints.log"
        raw = ckpts.read_bytes()
        last = parse_notes(raw).notes[-1]
        assert len(last.signatures) == 2
        cut = raw.index(b"\n", raw.index(SIG_PREFIX, last.offset)) + 1  # after signature 1
        os.truncate(ckpts, cut)

        def finish_and_go_on() -> None:
            with ckpts.open("ab") as f:
                f.write(raw[cut:])
            append(live, 35)

        between(monkeypatch, "_load_notes", finish_and_go_on)
        report = verify(d, NEW.public)
    assert report.problems == [], codes(report)


def test_the_first_missing_checkpoint_is_reported_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_LATE checkpoints waiting for a second look, later ones are missing during the
    scan and the waiting ones only after it: the first CHECKPOINT_MISSING listed is still
    the first removed note. (MAX_LATE lowered to 3 to keep the log small.)"""
    monkeypatch.setattr(importlib.import_module("ferry.audit.live"), "MAX_LATE", 3)
    d = tmp_path / "log"
    with AuditLog(d, KEY, SETTINGS) as log:
        append(log, 160)
    ckpts = d / "checkpoints.log"
    raw = ckpts.read_bytes()
    notes = parse_notes(raw).notes
    ckpts.write_bytes(raw[: notes[1].offset])  # only the opening checkpoint left
    report = verify(d, KEY.public)
    missing = [p for p in report.problems if p.code == "CHECKPOINT_MISSING" and p.idx is not None]
    assert missing
    assert missing[0].idx == notes[1].checkpoint.size - 1, [p.idx for p in missing]


def test_a_checkpoints_log_not_there_yet_when_verify_began_is_read_once_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new agent: no checkpoints.log when verify looked for the notes, and the writer's
    notes there once it reads the records."""
    d = tmp_path / "log"
    with AuditLog(d, KEY, SETTINGS) as live:
        append(live, 25)
        ckpts = d / "checkpoints.log"
        aside = tmp_path / "aside"
        ckpts.rename(aside)
        between(monkeypatch, "_load_notes", lambda: aside.rename(ckpts))
        report = verify(d, KEY.public)
    assert report.problems == [], codes(report)
    assert report.checkpoints_verified >= 2


# --- found by a second review: reconcile, a rotation judged after the scan, bounds ------------


def test_reconcile_of_a_log_whose_writer_stores_checkpoints_meanwhile_does_not_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint stored while verify read raises last_checkpoint, but on_record says a
    record is covered only below the notes read first: reconcile counts up to those (the
    rest wait for its next run) and does not fail ("records 0..N were counted, but the signed
    checkpoints cover M", for every live log whose writer stored a note meanwhile)."""
    d = tmp_path / "log"
    with AuditLog(d, KEY, BIG_SEGMENTS) as live:
        append(live, 25)
        between(monkeypatch, "_load_notes", lambda: append(live, 35))  # three more checkpoints
        loc = LogLocation("outside", d, KEY.public.to_string())
        counted = _Counted(Accountant(), LogStats("outside", str(d)), unsigned=False)
        check = _check(loc, enabled=True, unsigned=False, counted=counted)
    assert check.report is not None
    assert check.report.verified
    assert not check.failed, check.note
    assert counted.end == check.report.covered_when_read < (check.report.last_checkpoint or 0)
    assert "signed while reconcile read the log" in check.note


def test_a_key_rotation_restart_whose_notes_are_stored_after_the_scan_leaves_old_checkpoints_signed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runs: Runs
) -> None:
    """As test_a_key_rotation_restart_during_verify_leaves_old_checkpoints_signed, but the
    new run's notes are stored only after the scan passed their records (the writer behind
    the scan, as at a log's end). Found by the second look after the scan, they cover the
    handover too (every old note was CHECKPOINT_UNSIGNED)."""
    d = tmp_path / "log"
    with AuditLog(d, KEY, BIG_SEGMENTS) as log:
        append(log, 25)
    ckpts = d / "checkpoints.log"

    def rotate() -> None:
        log = runs.start(d, NEW, BIG_SEGMENTS, previous=[KEY])
        append(log, 15)
        stored(log)

    held = notes_after_the_scan(monkeypatch, ckpts, rotate)
    report = verify(d, NEW.public)
    assert held["tail"].count(b"\n\n") >= 2
    assert report.problems == [], codes(report)


def test_data_after_close_is_reported_past_the_openings_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's opening whose note is not found when the scan reaches it is judged after the
    scan; past the first MAX_HANDOVERS (100) such openings, at once (they were never judged,
    and the records after them never DATA_AFTER_CLOSE). Here (MAX_HANDOVERS lowered to 1): a
    genuine run 2 restarts while verify reads and its notes are stored after the scan; then
    records are appended after run 2's clean close (a run 3's opening and data, no signed
    note, as anyone who can write the directory can append): DATA_AFTER_CLOSE, as when the
    same log is verified again after."""
    monkeypatch.setattr(verify_module, "MAX_HANDOVERS", 1)
    d = tmp_path / "log"
    with AuditLog(d, KEY, BIG_SEGMENTS) as log:
        append(log, 25)
    ckpts = d / "checkpoints.log"
    seg = sorted(d.glob("audit-*.jsonl"))[-1]
    held: dict[str, bytes] = {}

    def run2_then_forged_run3() -> None:
        start = ckpts.stat().st_size
        with AuditLog(d, KEY, BIG_SEGMENTS) as log:  # run 2: genuine, clean close
            append(log, 15)
        held["tail"] = ckpts.read_bytes()[start:]
        # run 3's records as a writer would write them (made on a copy), without its notes,
        # cut before its audit.stopped: an opening, then data
        scratch = tmp_path / "scratch"
        shutil.copytree(d, scratch)
        end = seg.stat().st_size
        with AuditLog(
            scratch,
            KEY,
            AuditSettings(origin=ORIGIN, checkpoint_every=1000, max_segment_bytes=1 << 24),
        ) as log:
            append(log, 5)
        extra = (scratch / seg.name).read_bytes()[end:]
        lines = extra.splitlines(keepends=True)
        stop = next(i for i, ln in enumerate(lines) if b'"audit.stopped"' in ln)
        with seg.open("ab") as f:
            f.write(b"".join(lines[:stop]))
        os.truncate(ckpts, start)  # (run 2's notes held back until the scan is over)

    def store_run2_notes() -> None:
        with ckpts.open("ab") as f:
            f.write(held["tail"])

    between(monkeypatch, "_load_notes", run2_then_forged_run3)
    before_finish(monkeypatch, store_run2_notes)
    report = verify(d, KEY.public)
    monkeypatch.undo()
    monkeypatch.setattr(verify_module, "MAX_HANDOVERS", 1)
    again = verify(d, KEY.public)
    assert "DATA_AFTER_CLOSE" in codes(again)  # (the same log, read when not live)
    assert "DATA_AFTER_CLOSE" in codes(report), (codes(report), [w.code for w in report.warnings])


def test_a_note_half_written_at_the_first_read_and_found_whole_is_not_torn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first read catches the writer in the middle of a note; the rest of it is stored
    just after, and verify finds it whole and counts it: no CHECKPOINT_TORN warning ("the
    writer stopped while writing it") then."""
    d = tmp_path / "log"
    with AuditLog(d, KEY, BIG_SEGMENTS) as live:
        append(live, 25)
        stored(live)
        ckpts = d / "checkpoints.log"
        raw = ckpts.read_bytes()
        cut = raw.rindex(b"\n\n", 0, len(raw) - 2) + 2 + 10  # ten bytes into the last note
        os.truncate(ckpts, cut)

        def finish() -> None:
            with ckpts.open("ab") as f:
                f.write(raw[cut:])

        between(monkeypatch, "_load_notes", finish)
        report = verify(d, KEY.public)
    assert report.problems == [], codes(report)
    assert report.checkpoints_verified == len(parse_notes(raw).notes)  # (the torn one too)
    assert "CHECKPOINT_TORN" not in [w.code for w in report.warnings]


# --- found by a third review: a rotation of a running agent, judged after the scan --------


def _rotate_running_agent(d: Path, old: AuditLog, runs: Runs) -> None:
    """The running agent (KEY) is restarted with a new key (NEW, previous_keys=[KEY]) after
    verify read checkpoints.log: the old run's closing note (signed by KEY alone) and the new
    run's notes (NEW+KEY) are stored after the first read."""
    append(old, 5)
    old.close()  # audit.stopped + its checkpoint: a note signed by KEY only
    log = runs.start(d, NEW, BIG_SEGMENTS, previous=[KEY])
    append(log, 15)
    stored(log)


def test_control_rotation_of_a_running_agent_notes_found_during_the_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runs: Runs
) -> None:
    """The same restart, every note stored before the scan reaches its record."""
    d = tmp_path / "log"
    old = runs.start(d, KEY, BIG_SEGMENTS)
    append(old, 25)
    between(monkeypatch, "_load_notes", lambda: _rotate_running_agent(d, old, runs))
    report = verify(d, NEW.public)
    assert report.problems == [], codes(report)


def test_rotation_of_a_running_agent_new_notes_found_only_after_the_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runs: Runs
) -> None:
    """As test_a_key_rotation_restart_whose_notes_are_stored_after_the_scan_leaves_old_
    checkpoints_signed, but the agent was running when verify began (any restart of a running
    agent stores a closing note after the first read): the old run's closing note, signed by
    the old key alone, is judged again once the new run's notes hand over from it (it was
    CHECKPOINT_MISSING)."""
    d = tmp_path / "log"
    old = runs.start(d, KEY, BIG_SEGMENTS)
    append(old, 25)
    held = notes_after_the_scan(
        monkeypatch, d / "checkpoints.log", lambda: _rotate_running_agent(d, old, runs)
    )
    report = verify(d, NEW.public)
    runs.close()
    assert held["tail"].count(b"\n\n") >= 3
    again = verify(d, NEW.public)  # the same log, stopped, verifies
    assert again.problems == [], codes(again)
    assert report.problems == [], [(p.code, p.idx) for p in report.problems]


def test_two_rotations_during_verify_opening_judged_with_the_first_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runs: Runs
) -> None:
    """A stopped log (KEY); while verify reads, a run with NEW (previous KEY) opens and closes,
    then a run with THIRD (previous NEW) opens; every new note is stored after the scan.
    NEW's opening is judged again with the keys THIRD's notes hand over to (it was not, and
    the record after it was DATA_AFTER_CLOSE, NEW's closing note CHECKPOINT_MISSING)."""
    d = tmp_path / "log"
    with AuditLog(d, KEY, BIG_SEGMENTS) as log:
        append(log, 25)
    ckpts = d / "checkpoints.log"

    def two_rotations() -> None:
        with AuditLog(d, NEW, BIG_SEGMENTS, previous_keys=[KEY]) as log:
            append(log, 15)
        log = runs.start(d, THIRD, BIG_SEGMENTS, previous=[NEW])
        append(log, 15)
        stored(log)

    notes_after_the_scan(monkeypatch, ckpts, two_rotations)
    report = verify(d, THIRD.public)
    runs.close()
    again = verify(d, THIRD.public)
    assert again.problems == [], codes(again)
    assert report.problems == [], [(p.code, p.idx) for p in report.problems]

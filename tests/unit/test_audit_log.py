"""ferry.audit.record and ferry.audit.log: records, group commit, rotation, resume, failure."""

from __future__ import annotations

import contextlib
import errno
import importlib
import itertools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from ferry.audit import (
    AuditError,
    AuditLog,
    AuditObject,
    AuditRecordInvalid,
    AuditSettings,
    AuditUnavailable,
    FileOps,
    Subject,
    verify,
)
from ferry.audit import cli as audit_cli
from ferry.audit import record as rec
from ferry.audit.merkle import SIG_PREFIX, CompactRange, leaf_hash, parse_notes
from ferry.crypto.keys import SecretKey

REPO = Path(__file__).resolve().parents[2]
KEY = SecretKey("ed25519", bytes(range(32)))
SENDER = Subject.component("sender")
ITEM = AuditObject(
    item="0193f2c4-7d1e-7b3a-9d55-0a1b2c3d4e5f",
    channel="files/default",
    name="report.pdf",
    size=1_048_576,
    sha256="ab" * 32,
    seq=7,
)


def settings(**kw: Any) -> AuditSettings:
    base: dict[str, Any] = {
        "origin": "outside.test/audit",
        "checkpoint_every": 10,
        "retry_interval": 0.02,
        "durable_timeout": 5.0,
    }
    base.update(kw)
    return AuditSettings(**base)


def lines(path: Path) -> list[dict[str, Any]]:
    """Every record of a log directory, read with a separate file handle."""
    out: list[dict[str, Any]] = []
    for seg in sorted(path.glob("audit-*.jsonl")):
        with seg.open("rb") as f:
            out.extend(json.loads(line) for line in f)
    return out


def events(path: Path) -> list[str]:
    return [r["event"] for r in lines(path)]


def sent(log: AuditLog, n: int, **kw: Any) -> list[int]:
    return [log.append("transfer.sent", subject=SENDER, obj=ITEM, **kw) for _ in range(n)]


def assert_verifies(path: Path) -> None:
    report = verify(path, KEY.public)
    assert report.verified, [p.to_json() for p in report.problems]


# --- records --------------------------------------------------------------------------------


def test_schema_copies_are_identical() -> None:
    name = "audit-record.schema.json"
    assert (REPO / "ferry" / "schemas" / name).read_bytes() == (
        REPO / "schemas" / name
    ).read_bytes(), f"schemas/{name} differs from ferry/schemas/{name}: copy it over"


def test_record_encoding_is_one_ascii_line_in_a_fixed_key_order() -> None:
    r = rec.build(
        "intake.accepted",
        subject=Subject.clerk_folder("/srv/drop/公文", "files/default"),
        result="success",
        obj=ITEM,
        detail={"z": 1, "a": {"y": 2, "b": 3}},
        corr="c-1",
    )
    r["idx"], r["ts"], r["prev"] = 5, rec.format_ts(1_763_751_344_123_456), "cd" * 32
    line = rec.encode(r)
    assert line.isascii()
    assert b"\n" not in line
    assert b" " not in line.replace(b"report.pdf", b"")
    assert list(json.loads(line)) == [
        "v", "idx", "ts", "event", "result", "reason", "subject", "object", "corr", "detail", "prev"
    ]  # fmt: skip
    assert b'"detail":{"a":{"b":3,"y":2},"z":1}' in line
    assert b'"ts":"2025-11-21T18:55:44.123456Z"' in line
    assert rec.decode(line) == json.loads(line)
    rec.validate(rec.decode(line))


def test_timestamps_round_trip_at_microseconds() -> None:
    for us in (0, 1, 1_763_751_344_123_456, 4_102_444_799_999_999):
        assert rec.parse_ts(rec.format_ts(us)) == us


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"event": "transfer.teleported"}, "event"),
        ({"result": "maybe"}, "result"),
        ({"subject": Subject("robot", "x")}, "subject.kind"),  # type: ignore[arg-type]
        ({"obj": {"size": -1}}, "object.size"),
        ({"obj": {"size": 4.0}}, "object.size"),
        ({"obj": {"colour": "red"}}, "object"),
        ({"obj": AuditObject(sha256="not-a-hash")}, "object.sha256"),
        ({"reason": ""}, "reason"),
    ],
)
def test_a_record_outside_the_schema_is_a_programming_error(
    kwargs: dict[str, Any], fragment: str
) -> None:
    args: dict[str, Any] = {"event": "transfer.sent", "subject": SENDER, "result": "success"}
    args.update(kwargs)
    event = args.pop("event")
    with pytest.raises(AuditRecordInvalid, match=fragment.replace(".", r"\.")):
        rec.build(event, **args)


def test_event_specific_details_are_required_by_the_schema() -> None:
    with pytest.raises(AuditRecordInvalid, match="detail"):
        rec.build("audit.checkpoint", subject=SENDER, result="info")
    with pytest.raises(AuditRecordInvalid, match="size"):
        rec.build("audit.checkpoint", subject=SENDER, result="info", detail={"origin": "o"})
    assert "quarantine.added" in rec.events()
    assert "link.clock_skew" in rec.events()


def test_the_reference_validator_gives_the_same_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    good = rec.build("transfer.sent", subject=SENDER, result="success", obj=ITEM)
    bad = [
        {**good, "event": "transfer.teleported"},
        {**good, "object": {"size": 4.0}},
        {**good, "object": {"size": -1}},
        {**good, "ts": "2026-11-21T31:12:38.137979Z"},
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "prev"},
        {**good, "event": "audit.checkpoint", "detail": {"origin": "o"}},
    ]
    fast = [bool(rec.record_errors(r)) for r in [good, *bad]]
    real_import = importlib.import_module

    def no_rs(name: str) -> object:
        if name == "jsonschema_rs":
            raise ImportError(name)
        return real_import(name)

    monkeypatch.setattr(importlib, "import_module", no_rs)
    rec._checker.cache_clear()
    try:
        reference = [bool(rec.record_errors(r)) for r in [good, *bad]]
    finally:
        monkeypatch.undo()
        rec._checker.cache_clear()
    assert fast == reference == [False] + [True] * len(bad)


@pytest.mark.parametrize(
    "line",
    [b'{"a":1,"a":2}', b'{"a":NaN}', b"[1]", '{"a":"é"}'.encode(), b"{", b"x" * 20000],
)
def test_decode_refuses_what_the_writer_never_writes(line: bytes) -> None:
    with pytest.raises(ValueError):  # json.JSONDecodeError is a ValueError
        rec.decode(line)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="origin"):
        AuditSettings(origin="no spaces allowed")
    with pytest.raises(ValueError, match="max_segment_bytes"):
        AuditSettings(origin="o", max_segment_bytes=1000)
    with pytest.raises(ValueError, match="positive"):
        AuditSettings(origin="o", checkpoint_every=0)


# --- writing ---------------------------------------------------------------------------------


def test_a_new_log_opens_with_segment_started_and_a_checkpoint(tmp_path: Path) -> None:
    with capture_logs() as logs, AuditLog(tmp_path / "a", KEY, settings(side="outside")) as log:
        assert log.healthy
        assert log.available.is_set()
        assert not log.failed.is_set()
        assert log.durable_size == log.size == 3
        assert log.public_key == KEY.public
        assert log.directory == tmp_path / "a"
    records = lines(tmp_path / "a")
    assert [r["event"] for r in records] == [
        "audit.segment_opened",
        "audit.started",
        "audit.checkpoint",
        "audit.stopped",
        "audit.checkpoint",
    ]
    started = records[1]["detail"]
    assert started["checkpoint_key"] == KEY.public.to_string()
    assert started["resumed"] is False
    assert started["side"] == "outside"
    assert [r["idx"] for r in records] == list(range(5))
    for r in records:
        rec.validate(r)
    assert [e["event"] for e in logs] == ["audit_opened", "audit_closed"]
    assert os.stat(tmp_path / "a").st_mode & 0o777 == 0o700
    assert os.stat(tmp_path / "a" / "audit-000001.jsonl").st_mode & 0o777 == 0o600
    notes = parse_notes((tmp_path / "a" / "checkpoints.log").read_bytes()).notes
    assert [n.checkpoint.size for n in notes] == [3, 5]
    assert_verifies(tmp_path / "a")


def test_append_returns_consecutive_indexes_and_durable_append_waits(tmp_path: Path) -> None:
    with AuditLog(tmp_path, KEY, settings(checkpoint_every=1000)) as log:
        first = log.append("intake.accepted", subject=Subject.api_client("z85:abc"), obj=ITEM)
        second = log.append(
            "verdict", subject=SENDER, result="rejected", reason="MACRO", durable=True
        )
        assert second == first + 1
        assert log.durable_size > second
        with (tmp_path / "audit-000001.jsonl").open("rb") as f:
            on_disk = [json.loads(line) for line in f]
        assert on_disk[second]["reason"] == "MACRO"
        assert on_disk[second]["result"] == "rejected"
        with pytest.raises(ValueError, match="no audit record"):
            log.wait_durable(log.size + 5)


def test_group_commit_makes_every_record_of_many_threads_durable(tmp_path: Path) -> None:
    fsyncs = 0

    class Counting(FileOps):
        def fsync(self, fd: int) -> None:
            nonlocal fsyncs
            fsyncs += 1
            super().fsync(fd)
            time.sleep(0.001)  # a disk, even when the test folder is in memory

    per_thread, threads = 500, 4
    with AuditLog(tmp_path, KEY, settings(checkpoint_every=100_000), files=Counting()) as log:
        got: list[list[int]] = [[] for _ in range(threads)]

        def work(slot: int) -> None:
            got[slot] = sent(log, per_thread, corr=f"t{slot}")

        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        last = max(max(g) for g in got)
        log.wait_durable(last, timeout=10)
        with (tmp_path / "audit-000001.jsonl").open("rb") as f:  # a separate handle
            on_disk = [json.loads(line) for line in f]
        assert len(on_disk) >= last + 1
        for slot, idxs in enumerate(got):
            assert idxs == sorted(idxs)
            assert all(on_disk[i]["corr"] == f"t{slot}" for i in idxs)
        assert sorted(i for g in got for i in g) == list(range(3, 3 + per_thread * threads))
    assert fsyncs < per_thread * threads / 2  # batched, not one fsync per record
    assert_verifies(tmp_path)


def test_segments_rotate_and_each_names_the_previous_one(tmp_path: Path) -> None:
    s = settings(max_segment_bytes=4 * rec.MAX_RECORD_BYTES)
    with AuditLog(tmp_path, KEY, s) as log:
        sent(log, 400)
    segs = sorted(tmp_path.glob("audit-*.jsonl"))
    assert len(segs) >= 3
    for before, seg in itertools.pairwise(segs):
        first = json.loads(seg.open("rb").readline())
        assert first["event"] == "audit.segment_opened"
        assert first["detail"]["previous"] == {
            "segment": before.name,
            "bytes": before.stat().st_size,
        }
        assert first["detail"]["tree_size"] == first["idx"]
    assert_verifies(tmp_path)


def test_checkpoints_come_every_n_records_and_every_interval(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "n", KEY, settings(checkpoint_every=10)) as log:
        sent(log, 35)
    sizes = [
        n.checkpoint.size for n in parse_notes((tmp_path / "n/checkpoints.log").read_bytes()).notes
    ]
    assert len(sizes) == 1 + 3 + 1  # open, every 10 records, close
    with AuditLog(
        tmp_path / "t", KEY, settings(checkpoint_every=10**6, checkpoint_interval=0.05)
    ) as log:
        sent(log, 1)
        deadline = time.monotonic() + 5
        while events(tmp_path / "t").count("audit.checkpoint") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert events(tmp_path / "t").count("audit.checkpoint") == 2
        time.sleep(0.2)  # nothing new: no more checkpoints
        assert events(tmp_path / "t").count("audit.checkpoint") == 2
        size = log.checkpoint()
        assert size == log.size
    assert_verifies(tmp_path / "t")


def test_reopening_resumes_the_index_and_the_tree(tmp_path: Path) -> None:
    with AuditLog(tmp_path, KEY, settings()) as log:
        sent(log, 25)
        size = log.size
    with AuditLog(tmp_path, KEY, settings()) as log:
        assert (
            log.size == size + 2 + 2
        )  # audit.stopped + checkpoint, then audit.started + checkpoint
        idx = log.append("agent.started", subject=Subject.component("outside"))
        assert idx == log.size - 1
    records = lines(tmp_path)
    assert [r["idx"] for r in records] == list(range(len(records)))
    restarted = [r for r in records if r["event"] == "audit.started"]
    assert [r["detail"]["resumed"] for r in restarted] == [False, True]
    assert_verifies(tmp_path)


def test_reopening_resumes_after_rotation(tmp_path: Path) -> None:
    s = settings(max_segment_bytes=4 * rec.MAX_RECORD_BYTES, checkpoint_every=50)
    for _ in range(3):
        with AuditLog(tmp_path, KEY, s) as log:
            sent(log, 150)
    assert len(list(tmp_path.glob("audit-*.jsonl"))) >= 4
    assert_verifies(tmp_path)


CRASH = """
import os, signal, sys
from pathlib import Path
from ferry.audit import AuditLog, AuditSettings, Subject
from ferry.crypto.keys import SecretKey
log = AuditLog(Path(sys.argv[1]), SecretKey("ed25519", bytes(range(32))),
               AuditSettings(origin="outside.test/audit", checkpoint_every=10))
for i in range(int(sys.argv[2])):
    log.append("transfer.sent", subject=Subject.component("sender"), durable=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def crash(path: Path, records: int) -> None:
    """Write ``records`` durably in another process, then kill -9 it (no close)."""
    proc = subprocess.run(
        [sys.executable, "-c", CRASH, str(path), str(records)], capture_output=True, check=False
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


def test_a_killed_writer_resumes_and_a_torn_final_line_is_cut_off(tmp_path: Path) -> None:
    crash(tmp_path, 15)
    seg = tmp_path / "audit-000001.jsonl"
    good = seg.stat().st_size
    assert len(lines(tmp_path)) == 3 + 15 + 1  # opened, started, checkpoint; 15; checkpoint
    with seg.open("ab") as f:
        f.write(b'{"v":1,"idx":19,"ts":"2026-')  # the crash came in mid-write
    report = verify(tmp_path, KEY.public)
    assert report.verified
    assert [w.code for w in report.warnings] == ["TORN_TAIL", "UNCOVERED_TAIL"]
    assert report.warnings[0].offset == good
    assert report.warnings[0].idx == 19
    with AuditLog(tmp_path, KEY, settings()) as log:
        assert log.size == 19 + 3  # audit.started, audit.tail_truncated, audit.checkpoint
    records = lines(tmp_path)
    cut = next(r for r in records if r["event"] == "audit.tail_truncated")
    assert cut["detail"]["file"] == seg.name
    assert cut["detail"]["offset"] == good
    assert cut["detail"]["bytes"] == 27
    assert cut["reason"] == "TORN_WRITE"
    assert_verifies(tmp_path)


def test_data_after_a_clean_close_is_not_a_torn_write(tmp_path: Path) -> None:
    with AuditLog(tmp_path, KEY, settings()) as log:
        sent(log, 5)
    with (tmp_path / "audit-000001.jsonl").open("ab") as f:
        f.write(b'{"v":1,"idx":3,')  # (not the next record's start: it would be 12)
    report = verify(tmp_path, KEY.public)
    assert report.first is not None
    assert report.first.code == "DATA_AFTER_CLOSE"
    with pytest.raises(AuditError, match="DATA_AFTER_CLOSE"):
        AuditLog(tmp_path, KEY, settings())


def append_forged(path: Path) -> int:
    """Append a record, hash chain and all, as anyone who can write the log's disk can
    (without the key): a copy of the last transfer.sent with the next index. Its index."""
    seg = sorted(path.glob("audit-*.jsonl"))[-1]
    last = seg.read_bytes().splitlines()[-1]
    model = next(r for r in reversed(lines(path)) if r["event"] == "transfer.sent")
    forged = {**model, "idx": json.loads(last)["idx"] + 1, "prev": leaf_hash(last).hex()}
    with seg.open("ab") as f:
        f.write(rec.encode(forged) + b"\n")
    return int(forged["idx"])


def test_records_a_crashed_run_left_unsigned_are_adopted_and_reported(tmp_path: Path) -> None:
    """The writer signs, when it reopens, the records after the last stored checkpoint; it
    cannot tell a crashed run's from records someone added while the agent was stopped, so
    its audit.started says which they were, and verify reports them (ADOPTED)."""
    crash(tmp_path, 15)
    signed = parse_notes((tmp_path / "checkpoints.log").read_bytes()).notes[-1].checkpoint.size
    forged = append_forged(tmp_path)
    assert signed < forged
    with AuditLog(tmp_path, KEY, settings()):
        pass
    with AuditLog(tmp_path, KEY, settings()):  # (a clean stop before: nothing adopted)
        pass
    started = [r for r in lines(tmp_path) if r["event"] == "audit.started"]
    assert started[1]["detail"]["signed_size"] == signed
    assert started[1]["detail"]["tree_size"] == forged + 1 == started[1]["idx"]
    assert started[2]["detail"]["signed_size"] == started[2]["detail"]["tree_size"]
    report = verify(tmp_path, KEY.public)
    assert report.verified
    assert report.adopted == [{"from": signed, "to": forged + 1, "at": forged + 1}]
    assert report.adopted_records == forged + 1 - signed
    adopted = [w for w in report.warnings if w.code == "ADOPTED"]
    assert len(adopted) == 1
    assert f"records {signed}..{forged}" in adopted[0].message
    assert "ADOPTED" in audit_cli.render(report)


def test_a_record_added_after_a_clean_close_is_refused(tmp_path: Path) -> None:
    """After audit.stopped and its checkpoint only a new run (audit.started) may add
    records: the writer used to adopt and sign whatever was appended to a closed log."""
    with AuditLog(tmp_path, KEY, settings()) as log:
        sent(log, 5)
    forged = append_forged(tmp_path)
    report = verify(tmp_path, KEY.public)
    assert not report.verified
    assert report.first is not None
    assert report.first.code == "DATA_AFTER_CLOSE"
    assert report.first.idx == forged
    with pytest.raises(AuditError, match="DATA_AFTER_CLOSE"):
        AuditLog(tmp_path, KEY, settings())


def test_a_new_segment_may_open_a_closed_log_s_next_run(tmp_path: Path) -> None:
    """A closed log whose last segment is full reopens with audit.segment_opened before
    audit.started: not data after the close."""
    limit = 4 * rec.MAX_RECORD_BYTES
    s = settings(max_segment_bytes=limit, checkpoint_every=1000)
    AuditLog(tmp_path, KEY, s).close()
    closing = [len(r) + 1 for r in (tmp_path / "audit-000001.jsonl").read_bytes().splitlines()]
    stopped = closing[-2]  # (audit.stopped; its checkpoint follows)
    seg = tmp_path / "audit-000001.jsonl"
    with AuditLog(tmp_path, KEY, s) as log:
        while True:  # fill the segment so that the closing checkpoint crosses its limit
            log.append("transfer.sent", subject=SENDER, obj=ITEM, durable=True)
            room = limit - seg.stat().st_size
            if room < 1500:
                break
        line = len(seg.read_bytes().splitlines()[-1]) + 1
        name = ITEM.name + "x" * (room - stopped - 50 - line)
        log.append("transfer.sent", subject=SENDER, obj=replace(ITEM, name=name), durable=True)
        assert 0 < limit - seg.stat().st_size < stopped + 100
    assert seg.stat().st_size >= limit
    with AuditLog(tmp_path, KEY, s) as log:
        sent(log, 1)
    second = lines(tmp_path)
    opened = [i for i, r in enumerate(second) if r["event"] == "audit.segment_opened"]
    assert second[opened[-1] - 2]["event"] == "audit.stopped"  # (the closed log's last)
    assert second[opened[-1] + 1]["event"] == "audit.started"
    assert_verifies(tmp_path)


def test_the_next_run_s_first_record_torn_after_a_clean_close_is_cut_off(
    tmp_path: Path,
) -> None:
    """A crash or a full disk as the next run began leaves the start of its first record
    after the close: a torn write, cut off when the log reopens (it was refused for good)."""
    with AuditLog(tmp_path, KEY, settings()) as log:
        sent(log, 5)
    size = len(lines(tmp_path))  # (the next record's index)
    with (tmp_path / "audit-000001.jsonl").open("ab") as f:
        f.write(b'{"v":1,"idx":%d,"ts":"2026-11-23T' % size)
    report = verify(tmp_path, KEY.public)
    assert report.verified
    assert [w.code for w in report.warnings] == ["TORN_TAIL"]
    with AuditLog(tmp_path, KEY, settings()):
        pass
    assert "audit.tail_truncated" in events(tmp_path)
    assert_verifies(tmp_path)


def test_a_short_failure_while_closing_leaves_a_log_that_reopens(tmp_path: Path) -> None:
    """One failed write as close() writes audit.stopped: the writer retries at once and
    records the outage after the close (audit.outage, a checkpoint, audit.stopped, a
    checkpoint). That is its own tail, not data after the close."""
    files = Faulty()
    log = AuditLog(tmp_path, KEY, settings(), files=files)
    sent(log, 3, durable=True)
    original = files.write

    def fail_once(fd: int, data: memoryview) -> int:
        files.write = original  # type: ignore[method-assign]
        raise OSError(errno.ENOSPC, "No space left on device", "audit-000001.jsonl")

    files.write = fail_once  # type: ignore[method-assign]
    log.close()
    tail = events(tmp_path)[-6:]
    assert tail == [
        "audit.stopped", "audit.checkpoint", "audit.outage", "audit.checkpoint",
        "audit.stopped", "audit.checkpoint",
    ]  # fmt: skip
    assert_verifies(tmp_path)
    with AuditLog(tmp_path, KEY, settings()):
        pass
    assert_verifies(tmp_path)


def test_a_run_started_after_a_clean_close_adopts_nothing_it_did_not_write(
    tmp_path: Path,
) -> None:
    """After a clean close, someone who can write the disk adds an audit.started (so that
    the records look like a new run's) and item records: no run of the writer writes a
    record after its first checkpoint before that checkpoint's note, so they are refused."""
    with AuditLog(tmp_path, KEY, settings()) as log:
        sent(log, 5)
    seg = tmp_path / "audit-000001.jsonl"
    started = next(r for r in lines(tmp_path) if r["event"] == "audit.started")
    last = seg.read_bytes().splitlines()[-1]
    fake = {**started, "idx": json.loads(last)["idx"] + 1, "prev": leaf_hash(last).hex()}
    with seg.open("ab") as f:
        f.write(rec.encode(fake) + b"\n")
    forged = append_forged(tmp_path)
    report = verify(tmp_path, KEY.public)
    assert report.first is not None
    assert report.first.code == "DATA_AFTER_CLOSE"
    assert report.first.idx == forged
    with pytest.raises(AuditError, match="DATA_AFTER_CLOSE"):
        AuditLog(tmp_path, KEY, settings())


def append_drafts(path: Path, *events_: str) -> list[int]:
    """Append audit.* records of the writer's kinds, hash chain and all, without the key."""
    seg = sorted(path.glob("audit-*.jsonl"))[-1]
    last = seg.read_bytes().splitlines()[-1]
    idx, prev = json.loads(last)["idx"] + 1, leaf_hash(last).hex()
    me = Subject.component("audit")
    out, at = [], []
    for event in events_:
        if event == "audit.outage":
            detail: dict[str, Any] = {"start": "2026-11-23T20:59:00.000000Z", "refused": 0,
                                      "end": "2026-11-23T21:00:00.000000Z", "late": None,
                                      "error": "ENOSPC"}  # fmt: skip
            d = rec.draft(event, subject=me, result="failure", reason="AUDIT_UNAVAILABLE",
                          detail=detail)  # fmt: skip
        elif event == "audit.checkpoint":
            detail = {"size": idx + 1, "origin": "outside.test/audit"}
            d = rec.draft(event, subject=me, result="info", detail=detail)
        elif event == "audit.tail_truncated":
            detail = {"file": "x", "offset": 0, "bytes": 1, "sha256": "ab" * 32}
            d = rec.draft(event, subject=me, result="info", reason="TORN_WRITE", detail=detail)
        else:
            d = rec.draft(event, subject=me, result="info")
        line = d.finish(idx, "2026-11-23T21:00:00.000000Z", prev)
        out.append(line + b"\n")
        at.append(idx)
        prev, idx = leaf_hash(line).hex(), idx + 1
    with seg.open("ab") as f:
        f.write(b"".join(out))
    return at


@pytest.mark.parametrize(
    "forged",
    [
        ("audit.outage", "audit.checkpoint", "audit.stopped"),  # (an outage tail, then data)
        # (an opening whose cuts carry data, adopted as a run that died before its note)
        ("audit.started",) + ("audit.tail_truncated",) * 9 + ("audit.checkpoint",),
    ],
)
def test_records_after_a_clean_close_dressed_as_the_writer_s_are_refused(
    tmp_path: Path, forged: tuple[str, ...]
) -> None:
    with AuditLog(tmp_path, KEY, settings()) as log:
        sent(log, 5)
    if forged[0] == "audit.started":
        started = next(r for r in lines(tmp_path) if r["event"] == "audit.started")
        seg = tmp_path / "audit-000001.jsonl"
        last = seg.read_bytes().splitlines()[-1]
        fake = {**started, "idx": json.loads(last)["idx"] + 1, "prev": leaf_hash(last).hex()}
        with seg.open("ab") as f:
            f.write(rec.encode(fake) + b"\n")
        append_drafts(tmp_path, *forged[1:])
    else:
        append_drafts(tmp_path, *forged)
        append_forged(tmp_path)
    report = verify(tmp_path, KEY.public)
    assert [p.code for p in report.problems][:1] == ["DATA_AFTER_CLOSE"]
    with pytest.raises(AuditError, match="DATA_AFTER_CLOSE"):
        AuditLog(tmp_path, KEY, settings())


def test_a_close_in_an_earlier_segment_is_seen_on_reopening(tmp_path: Path) -> None:
    """The writer replays from the segment holding the last checkpoint's size: a new segment
    opened right after a clean close (as a next run does when the last one is full; the
    frontier it needs is public) hid the close from it, and it signed what followed."""
    with AuditLog(tmp_path, KEY, settings()) as log:
        sent(log, 5)
    seg = tmp_path / "audit-000001.jsonl"
    tree = CompactRange()
    for line in seg.read_bytes().splitlines():
        tree.append(leaf_hash(line))
    new = tmp_path / "audit-000002.jsonl"
    detail = {
        "segment": new.name,
        "previous": {"segment": seg.name, "bytes": seg.stat().st_size},
        "tree_size": tree.size,
        "root": tree.root().hex(),
        "frontier": [h.hex() for h in tree.hashes],
    }
    opened = rec.draft("audit.segment_opened", subject=Subject.component("audit"),
                       result="info", detail=detail)  # fmt: skip
    last = seg.read_bytes().splitlines()[-1]
    new.write_bytes(opened.finish(tree.size, "2026-11-23T21:00:00.000000Z",
                                  leaf_hash(last).hex()) + b"\n")  # fmt: skip
    append_forged(tmp_path)
    assert verify(tmp_path, KEY.public).problems[0].code == "DATA_AFTER_CLOSE"
    with pytest.raises(AuditError, match="DATA_AFTER_CLOSE"):
        AuditLog(tmp_path, KEY, settings())


def test_zeros_after_a_clean_close_are_a_torn_write(tmp_path: Path) -> None:
    """A power cut can leave a file's new length without its data: zeros where the next
    run's first record was due."""
    with AuditLog(tmp_path, KEY, settings()) as log:
        sent(log, 5)
    with (tmp_path / "audit-000001.jsonl").open("ab") as f:
        f.write(b"\0" * 300)
    assert [w.code for w in verify(tmp_path, KEY.public).warnings] == ["TORN_TAIL"]
    with AuditLog(tmp_path, KEY, settings()):
        pass
    assert_verifies(tmp_path)


def test_a_run_that_stopped_before_its_first_checkpoint_after_a_clean_close(
    tmp_path: Path,
) -> None:
    """The next run wrote audit.started and died before its first checkpoint record; the
    run after it starts again: two audit.started in a row are a writer's."""
    with AuditLog(tmp_path, KEY, settings()) as log:
        sent(log, 5)
    seg = tmp_path / "audit-000001.jsonl"
    with AuditLog(tmp_path, KEY, settings()):
        pass
    rows = seg.read_bytes().splitlines(keepends=True)
    # keep the second run's audit.started only (as if it died right after writing it)
    second = [i for i, r in enumerate(rows) if b'"audit.started"' in r][1]
    seg.write_bytes(b"".join(rows[: second + 1]))
    notes = (tmp_path / "checkpoints.log").read_bytes()
    later = next(n for n in parse_notes(notes).notes if n.checkpoint.size > second)
    (tmp_path / "checkpoints.log").write_bytes(notes[: later.offset])
    assert verify(tmp_path, KEY.public).ok
    with AuditLog(tmp_path, KEY, settings()):
        pass
    assert_verifies(tmp_path)
    assert events(tmp_path).count("audit.started") == 3


def test_a_first_start_that_stopped_before_its_first_checkpoint_starts_again(
    tmp_path: Path,
) -> None:
    """Killed while a new log's first checkpoint record was being written: nothing was ever
    signed (NO_CHECKPOINT), and the writer refused the log for good. It starts it again and
    records what it removed."""
    AuditLog(tmp_path, KEY, settings()).close()
    seg = tmp_path / "audit-000001.jsonl"
    rows = seg.read_bytes().splitlines(keepends=True)
    assert b'"audit.checkpoint"' in rows[2]
    seg.write_bytes(rows[0] + rows[1] + rows[2][:40])
    (tmp_path / "checkpoints.log").write_bytes(b"")
    assert not verify(tmp_path, KEY.public).verified
    with AuditLog(tmp_path, KEY, settings()) as log:
        sent(log, 1)
    records = lines(tmp_path)
    assert [r["event"] for r in records[:3]] == [
        "audit.segment_opened", "audit.started", "audit.tail_truncated",
    ]  # fmt: skip
    assert records[1]["detail"]["resumed"] is False
    assert records[2]["detail"]["bytes"] == len(rows[0] + rows[1]) + 40
    assert_verifies(tmp_path)


def test_a_torn_checkpoint_and_an_unstored_one_are_repaired_on_reopening(tmp_path: Path) -> None:
    with AuditLog(tmp_path, KEY, settings()) as log:
        sent(log, 5)
    ckpt = tmp_path / "checkpoints.log"
    notes = parse_notes(ckpt.read_bytes()).notes
    # The writer stopped after the last audit.checkpoint record was durable, while
    # writing its note.
    ckpt.write_bytes(ckpt.read_bytes()[: notes[-1].offset + 20])
    report = verify(tmp_path, KEY.public)
    assert report.verified
    codes = {w.code for w in report.warnings}
    assert codes == {"CHECKPOINT_TORN", "CHECKPOINT_PENDING", "UNCOVERED_TAIL"}
    with AuditLog(tmp_path, KEY, settings()):
        pass
    assert lines(tmp_path)[-4]["detail"]["file"] == "checkpoints.log"
    report = verify(tmp_path, KEY.public)
    assert report.verified
    # (the torn note's records were signed only when the log reopened)
    assert [w.code for w in report.warnings] == ["ADOPTED"]
    assert report.checkpoints == report.checkpoints_verified == len(notes) + 2


@pytest.mark.parametrize("extra", [b"\n", b"\n" * 100_000, b"not a checkpoint!\n"])
def test_bytes_after_the_last_checkpoint_that_are_no_checkpoint_stop_the_log_opening(
    tmp_path: Path, extra: bytes
) -> None:
    with AuditLog(tmp_path, KEY, settings()) as log:
        sent(log, 3)
    ckpt = tmp_path / "checkpoints.log"
    line = ckpt.read_bytes().count(b"\n") + 1
    with ckpt.open("ab") as f:
        f.write(extra)
    with pytest.raises(AuditError, match=rf"checkpoints.log line {line}: .*ferry audit verify"):
        AuditLog(tmp_path, KEY, settings())


def test_a_checkpoint_torn_inside_its_second_signature_is_cut_off_whole(tmp_path: Path) -> None:
    old = SecretKey("ed25519", bytes(range(1, 33)))
    with AuditLog(tmp_path, KEY, settings(), previous_keys=[old]) as log:
        sent(log, 3)
    ckpt = tmp_path / "checkpoints.log"
    data = ckpt.read_bytes()
    last = parse_notes(data).notes[-1]
    second = data.index(b"\n", data.index(SIG_PREFIX, last.offset)) + 1
    ckpt.write_bytes(data[: second + 20])  # the writer stopped inside the second signature
    with AuditLog(tmp_path, KEY, settings(), previous_keys=[old]):
        pass
    cut = lines(tmp_path)[-4]
    assert cut["event"] == "audit.tail_truncated"
    assert (cut["detail"]["offset"], cut["detail"]["bytes"]) == (
        last.offset,
        second + 20 - last.offset,
    )
    data = ckpt.read_bytes()
    assert data.endswith(b"\n\n")
    assert b"\n\n\n" not in data
    assert {len(n.signatures) for n in parse_notes(data).notes} == {2}
    assert_verifies(tmp_path)


def test_a_log_that_does_not_match_its_checkpoint_is_not_reopened(tmp_path: Path) -> None:
    with AuditLog(tmp_path, KEY, settings()) as log:
        sent(log, 12)
    seg = tmp_path / "audit-000001.jsonl"
    seg.write_bytes(seg.read_bytes().replace(b'"seq":7', b'"seq":8', 1))
    with pytest.raises(AuditError, match=r"RECORD_MODIFIED.*ferry audit verify"):
        AuditLog(tmp_path, KEY, settings())
    other = SecretKey("ed25519", bytes(range(7, 39)))
    seg.write_bytes(seg.read_bytes().replace(b'"seq":8', b'"seq":7', 1))
    with pytest.raises(AuditError, match="not signed by this audit key"):
        AuditLog(tmp_path, other, settings())
    with pytest.raises(AuditError, match="origin"):
        AuditLog(tmp_path, KEY, settings(origin="inside.test/audit"))
    AuditLog(tmp_path, KEY, settings()).close()  # the lock was released each time


def test_one_writer_per_directory(tmp_path: Path) -> None:
    with AuditLog(tmp_path, KEY, settings()), pytest.raises(AuditError, match="another process"):
        AuditLog(tmp_path, KEY, settings())
    with pytest.raises(AuditError, match="ed25519"):
        AuditLog(tmp_path, SecretKey("x25519", bytes(32)), settings())


def test_closed_log_refuses_appends_and_close_is_idempotent(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, KEY, settings())
    log.close()
    log.close()
    assert not log.available.is_set()
    with pytest.raises(AuditUnavailable, match="closed"):
        log.append("transfer.sent", subject=SENDER)


# --- failure and recovery ----------------------------------------------------------------------


class Faulty(FileOps):
    """Raise a chosen OSError from write/fsync/open while ``broken`` is set."""

    def __init__(self, err: int = errno.ENOSPC) -> None:
        self.broken = threading.Event()
        self.err = err
        self.partial = False

    def _check(self, what: str) -> None:
        if self.broken.is_set():
            raise OSError(self.err, os.strerror(self.err), what)

    def write(self, fd: int, data: memoryview) -> int:
        if self.broken.is_set() and self.partial and len(data) > 10:
            self.partial = False
            return super().write(fd, data[:10])  # a short write before the error
        self._check("audit-000001.jsonl")
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._check("audit-000001.jsonl")
        super().fsync(fd)

    def open_append(self, path: Path) -> int:
        self._check(str(path))
        return super().open_append(path)


def wait_for(cond: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO, errno.EROFS])
def test_injected_write_failure_fails_closed_then_recovers(tmp_path: Path, err: int) -> None:
    files = Faulty(err)
    with capture_logs() as logs, AuditLog(tmp_path, KEY, settings(), files=files) as log:
        sent(log, 3, durable=True)
        files.broken.set()
        files.partial = True
        late = log.append("transfer.sent", subject=SENDER, obj=ITEM)
        with pytest.raises(AuditUnavailable, match=errno.errorcode[err]):
            log.wait_durable(late, timeout=5)
        assert not log.healthy
        assert log.failed.is_set()
        assert not log.available.is_set()
        for _ in range(3):
            with pytest.raises(AuditUnavailable, match="unavailable since"):
                log.append("intake.accepted", subject=SENDER)
        files.broken.clear()
        assert log.available.wait(5)
        assert (log.healthy, log.failed.is_set()) == (True, False)
        log.wait_durable(late)
        after = log.append("intake.accepted", subject=SENDER, durable=True)
    records = lines(tmp_path)
    assert records[late]["event"] == "transfer.sent"
    outage = records[late + 1]
    assert outage["event"] == "audit.outage"
    assert outage["reason"] == "AUDIT_UNAVAILABLE"
    assert outage["detail"]["refused"] == 3
    assert outage["detail"]["late"] == [late, late]
    assert outage["detail"]["error"].startswith(errno.errorcode[err])
    assert outage["detail"]["start"] <= outage["detail"]["end"]
    assert records[after]["event"] == "intake.accepted"
    assert {"audit_unavailable", "audit_recovered"} <= {e["event"] for e in logs}
    assert_verifies(tmp_path)


def test_failure_while_rotating_and_while_storing_a_checkpoint(tmp_path: Path) -> None:
    files = Faulty(errno.EIO)
    s = settings(max_segment_bytes=4 * rec.MAX_RECORD_BYTES, checkpoint_every=7)
    with AuditLog(tmp_path, KEY, s, files=files) as log:
        for round_ in range(6):
            sent(log, 100)
            files.broken.set()
            with contextlib.suppress(AuditUnavailable):
                sent(log, 40, durable=True)
            wait_for(lambda: not log.healthy)
            files.broken.clear()
            assert log.available.wait(5), round_
    assert len(list(tmp_path.glob("audit-*.jsonl"))) > 2
    assert events(tmp_path).count("audit.outage") == 6
    assert_verifies(tmp_path)


def test_a_log_that_cannot_write_at_open_raises(tmp_path: Path) -> None:
    files = Faulty(errno.EROFS)
    files.broken.set()
    with pytest.raises(AuditUnavailable, match="EROFS"):
        AuditLog(tmp_path, KEY, settings(), files=files)


def test_closing_while_unavailable_reports_the_unwritten_records(tmp_path: Path) -> None:
    files = Faulty(errno.EIO)
    log = AuditLog(tmp_path, KEY, settings(), files=files)
    files.broken.set()
    idx = log.append("transfer.sent", subject=SENDER)
    with pytest.raises(AuditUnavailable):
        log.wait_durable(idx)
    with pytest.raises(AuditUnavailable, match="1 audit records could not be written"):
        log.close(timeout=5)


def test_a_crashed_writer_fails_closed(tmp_path: Path) -> None:
    class Buggy(FileOps):
        armed = False

        def fsync(self, fd: int) -> None:
            if self.armed:
                raise RuntimeError("bug")
            super().fsync(fd)

    files = Buggy()
    log = AuditLog(tmp_path, KEY, settings(), files=files)
    files.armed = True
    with capture_logs() as logs:
        idx = log.append("transfer.sent", subject=SENDER)
        with pytest.raises(AuditUnavailable, match="writer stopped"):
            log.wait_durable(idx)
    assert not log.healthy
    assert log.failed.is_set()
    assert "audit_writer_crashed" in [e["event"] for e in logs]
    with pytest.raises(AuditUnavailable):
        log.append("transfer.sent", subject=SENDER)
    with pytest.raises(AuditUnavailable):
        log.close()


@contextlib.contextmanager
def small_filesystem(path: Path) -> Iterator[str]:
    """A 256 KiB tmpfs at ``path`` (tests run as root); else a file-size rlimit.

    Both are real kernel faults: ENOSPC from a full tmpfs, EFBIG from RLIMIT_FSIZE.
    """
    path.mkdir()
    try:
        mounted = (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(path)],
                capture_output=True,
                check=False,
            ).returncode
            == 0
        )
    except OSError:  # no mount(8)
        mounted = False
    try:
        yield "tmpfs" if mounted else "rlimit"
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    filler = path / "filler"
    with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    return filler


def fill_log(log: AuditLog) -> None:
    for _ in range(10_000):  # the last page may hold a few more records
        log.append("transfer.sent", subject=SENDER, obj=ITEM, durable=True)


def test_real_disk_full_stops_appends_and_recovery_records_the_outage(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with small_filesystem(mnt) as kind:
        audit = mnt / "audit"
        old_fsize = resource.getrlimit(resource.RLIMIT_FSIZE)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        log = AuditLog(audit, KEY, settings(checkpoint_every=1000))
        try:
            sent(log, 20, durable=True)
            seg = audit / "audit-000001.jsonl"
            if kind == "tmpfs":
                filler = fill(mnt)
            else:
                limit = seg.stat().st_size + 4096
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_fsize[1]))
            started = time.monotonic()
            with pytest.raises(AuditUnavailable, match=r"ENOSPC|EFBIG"):
                fill_log(log)
            assert time.monotonic() - started < 5  # intake stops within seconds
            assert log.failed.is_set()
            assert not log.healthy
            with pytest.raises(AuditUnavailable):
                log.append("intake.accepted", subject=SENDER)
            if kind == "tmpfs":
                filler.unlink()
            else:
                resource.setrlimit(resource.RLIMIT_FSIZE, old_fsize)
            assert log.available.wait(5)
            log.append("intake.accepted", subject=SENDER, durable=True)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old_fsize)
            signal.signal(signal.SIGXFSZ, old_handler)
            log.close()
        outage = [r for r in lines(audit) if r["event"] == "audit.outage"]
        assert len(outage) == 1
        assert outage[0]["detail"]["refused"] >= 1
        assert outage[0]["detail"]["late"] is not None
        assert_verifies(audit)
        shutil.copytree(audit, tmp_path / "copy")
    assert_verifies(tmp_path / "copy")


def test_records_no_signed_checkpoint_covers_are_not_verified(tmp_path: Path) -> None:
    """A log whose checkpoints.log is gone and whose one audit.checkpoint record has no note
    looked like a crash before the first note (CHECKPOINT_PENDING, a warning) and was
    reported verified: anyone can write such a log, hash chain and all, without the key."""
    with AuditLog(tmp_path, KEY, settings()) as log:
        sent(log, 5)
    seg = tmp_path / "audit-000001.jsonl"
    rows = seg.read_bytes().splitlines(keepends=True)
    first = next(i for i, r in enumerate(rows) if b'"audit.checkpoint"' in r)
    seg.write_bytes(b"".join(rows[: first + 1]))  # (as if it stopped before its first note)
    (tmp_path / "checkpoints.log").unlink()
    report = verify(tmp_path, KEY.public)
    assert report.ok  # (nothing contradicts the records...)
    assert report.records == first + 1
    assert report.checkpoints_verified == 0
    assert not report.signed  # (...but nothing vouches for them either)
    assert not report.verified
    assert "NOT SIGNED" in audit_cli.render(report)
    with AuditLog(tmp_path, KEY, settings()):  # the writer stores the note when it reopens
        pass
    assert verify(tmp_path, KEY.public).verified


def test_a_record_nested_too_deeply_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    with AuditLog(tmp_path, KEY, settings()) as log:
        sent(log, 3)
    seg = tmp_path / "audit-000001.jsonl"
    rows = seg.read_bytes().split(b"\n")
    rows[2] = b'{"v":' + b"[" * 6000 + b"]" * 6000 + b"}"
    seg.write_bytes(b"\n".join(rows))
    report = verify(tmp_path, KEY.public)
    assert report.first is not None
    assert not report.verified
    with pytest.raises(AuditError):
        AuditLog(tmp_path, KEY, settings())

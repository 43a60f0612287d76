"""ferry.audit.verify and `ferry audit verify`: every tampering case is caught at its position."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ferry.audit import AuditLog, AuditObject, AuditSettings, Subject, verify
from ferry.audit import cli as audit_cli
from ferry.audit.merkle import Checkpoint, CompactRange, leaf_hash, parse_notes, sign_checkpoint
from ferry.audit.record import ZERO_HASH, encode
from ferry.crypto.keys import SecretKey, write_public_key

REPO = Path(__file__).resolve().parents[2]

KEY = SecretKey("ed25519", bytes(range(32)))
FORGER = SecretKey("ed25519", bytes(range(100, 132)))
ORIGIN = "outside.test/audit"
SENDER = Subject.component("sender")
SETTINGS = AuditSettings(origin=ORIGIN, checkpoint_every=10, max_segment_bytes=4 * 16384)
RECORDS = 520


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "audit"
    with AuditLog(path, KEY, SETTINGS) as log:
        for i in range(RECORDS):
            obj = AuditObject(item=f"item-{i:05d}", channel="files/default", size=1000 + i, seq=i)
            log.append("transfer.sent", subject=SENDER, obj=obj, detail={"n": i})
    return path


@pytest.fixture
def log_dir(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "audit"))


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("audit-*.jsonl"))


def find(path: Path, idx: int) -> tuple[Path, int, int]:
    """(segment, 1-based line, byte offset) of record ``idx``."""
    for seg in segments(path):
        offset = 0
        for number, line in enumerate(seg.read_bytes().splitlines(keepends=True), 1):
            if json.loads(line)["idx"] == idx:
                return seg, number, offset
            offset += len(line)
    raise AssertionError(f"no record {idx}")


def edit_lines(seg: Path, change: Callable[[list[bytes]], list[bytes]]) -> None:
    seg.write_bytes(b"".join(change(seg.read_bytes().splitlines(keepends=True))))


def first(path: Path, key: SecretKey = KEY) -> Any:
    report = verify(path, key.public)
    assert not report.ok
    assert not report.verified
    assert report.first is not None
    return report.first


def total(path: Path) -> int:
    return sum(len(s.read_bytes().splitlines()) for s in segments(path))


def middle(path: Path) -> int:
    """A transfer.sent record in the middle of the second segment."""
    seg = segments(path)[1]
    rows = [json.loads(line) for line in seg.read_bytes().splitlines()]
    rows = [r for r in rows if r["event"] == "transfer.sent"]
    idx: int = rows[len(rows) // 2]["idx"]
    return idx


# --- a clean log -------------------------------------------------------------------------------


def test_a_clean_log_verifies(pristine: Path) -> None:
    report = verify(pristine, KEY.public)
    assert report.verified
    assert report.problems == []
    assert report.warnings == []
    assert report.segments == len(segments(pristine)) >= 3
    assert report.records == report.tree_size == total(pristine)
    assert report.checkpoints == report.checkpoints_verified
    assert report.last_checkpoint == report.tree_size  # the close checkpoint covers everything
    assert report.key_id == KEY.public.key_id.hex()
    assert report.origin == ORIGIN


def test_one_segment_can_be_verified_alone(pristine: Path) -> None:
    report = verify(segments(pristine)[1], KEY.public)
    assert report.verified
    assert report.first_idx > 0
    assert [w.code for w in report.warnings] == ["SEGMENT_ONLY"]


# --- tampering ---------------------------------------------------------------------------------


def test_one_changed_byte_in_a_value_names_the_record(log_dir: Path) -> None:
    k = middle(log_dir)
    seg, line, offset = find(log_dir, k)
    edit_lines(
        seg,
        lambda ls: [*ls[: line - 1], ls[line - 1].replace(b'"seq":', b'"seq":1', 1), *ls[line:]],
    )
    p = first(log_dir)
    assert (p.code, p.idx, p.file, p.line, p.offset) == (
        "RECORD_MODIFIED",
        k,
        seg.name,
        line,
        offset,
    )


def test_one_changed_byte_in_a_timestamp_names_the_record(log_dir: Path) -> None:
    k = middle(log_dir)
    seg, line, _ = find(log_dir, k)
    data = bytearray(seg.read_bytes())
    at = find(log_dir, k)[2] + data[find(log_dir, k)[2] :].index(b'"ts":"') + 6 + 21  # a µs digit
    data[at] = ord("0") if data[at] != ord("0") else ord("1")
    seg.write_bytes(bytes(data))
    p = first(log_dir)
    assert (p.code, p.idx, p.line) == ("RECORD_MODIFIED", k, line)


def test_one_changed_byte_in_a_prev_hash_names_that_record(log_dir: Path) -> None:
    k = middle(log_dir)
    seg, line, offset = find(log_dir, k)
    data = bytearray(seg.read_bytes())
    at = offset + data[offset:].index(b'"prev":"') + 8
    data[at] = ord("a") if data[at] != ord("a") else ord("b")
    seg.write_bytes(bytes(data))
    p = first(log_dir)
    assert (p.code, p.idx, p.line) == ("RECORD_MODIFIED", k, line)
    assert "its prev field" in p.message


def test_a_changed_byte_that_breaks_the_json_names_the_line(log_dir: Path) -> None:
    k = middle(log_dir)
    seg, line, offset = find(log_dir, k)
    data = bytearray(seg.read_bytes())
    data[offset] = ord("[")
    seg.write_bytes(bytes(data))
    p = first(log_dir)
    assert (p.code, p.file, p.line, p.offset) == ("MALFORMED_LINE", seg.name, line, offset)


def test_a_changed_event_type_fails_the_schema(log_dir: Path) -> None:
    k = middle(log_dir)
    seg, line, _ = find(log_dir, k)
    edit_lines(
        seg,
        lambda ls: [
            *ls[: line - 1],
            ls[line - 1].replace(b"transfer.sent", b"transfer.sEnt"),
            *ls[line:],
        ],
    )
    p = first(log_dir)
    assert (p.code, p.idx, p.line) == ("SCHEMA", k, line)
    assert "event" in p.message


def test_a_deleted_record_is_named(log_dir: Path) -> None:
    k = middle(log_dir)
    seg, line, offset = find(log_dir, k)
    edit_lines(seg, lambda ls: [*ls[: line - 1], *ls[line:]])
    p = first(log_dir)
    assert (p.code, p.idx, p.file, p.line, p.offset) == (
        "RECORDS_MISSING",
        k,
        seg.name,
        line,
        offset,
    )
    assert "1 record deleted" in p.message


def test_two_deleted_records_are_counted(log_dir: Path) -> None:
    k = middle(log_dir)
    seg, line, _ = find(log_dir, k)
    edit_lines(seg, lambda ls: [*ls[: line - 1], *ls[line + 1 :]])
    p = first(log_dir)
    assert (p.code, p.idx, p.line) == ("RECORDS_MISSING", k, line)
    assert "2 records deleted" in p.message


def test_an_inserted_copy_of_an_old_record_is_named(log_dir: Path) -> None:
    k = middle(log_dir)
    seg, line, _ = find(log_dir, k)
    old = seg.read_bytes().splitlines(keepends=True)[2]
    edit_lines(seg, lambda ls: [*ls[:line], old, *ls[line:]])
    p = first(log_dir)
    assert (p.code, p.idx, p.line) == ("INDEX_DUPLICATE", k + 1, line + 1)


def test_an_inserted_forged_record_is_named(log_dir: Path) -> None:
    k = middle(log_dir)
    seg, line, _ = find(log_dir, k)
    original = seg.read_bytes().splitlines(keepends=True)
    genuine = json.loads(original[line - 1])
    forged = dict(json.loads(original[line]), detail={"n": -1})
    forged["prev"] = leaf_hash(original[line - 1].rstrip(b"\n")).hex()
    assert forged["idx"] == genuine["idx"] + 1
    edit_lines(seg, lambda ls: [*ls[:line], encode(forged) + b"\n", *ls[line:]])
    p = first(log_dir)
    assert (p.code, p.idx, p.line) == ("INDEX_DUPLICATE", k + 1, line + 1)
    assert "inserted" in p.message


def test_two_swapped_records_are_named(log_dir: Path) -> None:
    k = middle(log_dir)
    seg, line, offset = find(log_dir, k)
    edit_lines(seg, lambda ls: [*ls[: line - 1], ls[line], ls[line - 1], *ls[line + 1 :]])
    p = first(log_dir)
    assert (p.code, p.idx, p.line, p.offset) == ("RECORDS_SWAPPED", k, line, offset)


def test_a_truncated_tail_is_caught_by_the_last_checkpoint(log_dir: Path) -> None:
    size = total(log_dir)
    last = segments(log_dir)[-1]
    edit_lines(last, lambda ls: ls[:-2])
    p = first(log_dir)
    assert (p.code, p.idx, p.file) == ("TRUNCATED", size - 2, last.name)
    assert p.offset == last.stat().st_size
    assert f"records {size - 2}..{size - 1} are missing" in p.message


def test_a_log_truncated_below_earlier_checkpoints_is_caught(log_dir: Path) -> None:
    segs = segments(log_dir)
    segs[-1].unlink()
    edit_lines(segs[-2], lambda ls: ls[: len(ls) // 2])
    report = verify(log_dir, KEY.public)
    p = report.first
    assert p is not None
    assert p.code == "TRUNCATED"
    assert p.idx == report.tree_size
    assert p.file == segs[-2].name
    assert report.last_checkpoint is not None
    assert report.last_checkpoint <= report.tree_size


def test_a_torn_last_line_of_a_closed_log_is_caught(log_dir: Path) -> None:
    last = segments(log_dir)[-1]
    last.write_bytes(last.read_bytes()[:-30])
    report = verify(log_dir, KEY.public)
    assert report.first is not None
    assert report.first.code == "TRUNCATED"
    assert [w.code for w in report.warnings][:1] == ["TORN_TAIL"]


def test_a_changed_last_record_is_caught_by_the_checkpoint(log_dir: Path) -> None:
    size = total(log_dir)
    last = segments(log_dir)[-1]
    data = last.read_bytes()
    at = data.rindex(b'"ts":"') + 6 + 21  # a µs digit
    last.write_bytes(data[:at] + (b"1" if data[at : at + 1] != b"1" else b"2") + data[at + 1 :])
    p = first(log_dir)
    assert (p.code, p.idx, p.file) == ("CHECKPOINT_MISMATCH", size - 1, last.name)
    assert f"record {size - 1} was changed" in p.message


def test_a_deleted_middle_segment_is_named(log_dir: Path) -> None:
    segs = segments(log_dir)
    segs[1].unlink()
    p = first(log_dir)
    assert (p.code, p.file) == ("SEGMENT_MISSING", segs[1].name)


def test_swapped_segment_files_break_the_segment_link(log_dir: Path) -> None:
    segs = segments(log_dir)
    tmp = segs[1].with_suffix(".tmp")
    segs[1].rename(tmp)
    segs[2].rename(segs[1])
    tmp.rename(segs[2])
    p = first(log_dir)
    assert (p.code, p.file, p.line) == ("SEGMENT_LINK", segs[1].name, 1)


# --- checkpoints ---------------------------------------------------------------------------------


def resign(path: Path, key: SecretKey) -> None:
    ckpt = path / "checkpoints.log"
    notes = parse_notes(ckpt.read_bytes()).notes
    ckpt.write_bytes(b"".join(sign_checkpoint(n.checkpoint, key) + b"\n" for n in notes))


def rebuild(path: Path, key: SecretKey, change: Callable[[list[dict[str, Any]]], None]) -> None:
    """Rewrite the whole log consistently (chain, segment links, tree, checkpoints) with ``key``."""
    segs = segments(path)
    rows = [[json.loads(x) for x in s.read_bytes().splitlines()] for s in segs]
    change([r for seg in rows for r in seg])
    tree, prev, roots = CompactRange(), ZERO_HASH, {}
    previous: dict[str, Any] | None = None
    for seg, records in zip(segs, rows, strict=True):
        out = b""
        for r in records:
            if r["event"] == "audit.segment_opened":
                r["detail"].update(
                    previous=previous,
                    tree_size=tree.size,
                    root=tree.root().hex(),
                    frontier=[h.hex() for h in tree.hashes],
                )
            r["prev"] = prev
            line = encode(r)
            tree.append(leaf_hash(line))
            prev = leaf_hash(line).hex()
            roots[tree.size] = tree.root()
            out += line + b"\n"
        seg.write_bytes(out)
        previous = {"bytes": len(out), "segment": seg.name}
    ckpt = path / "checkpoints.log"
    sizes = [n.checkpoint.size for n in parse_notes(ckpt.read_bytes()).notes]
    notes = [sign_checkpoint(Checkpoint(ORIGIN, s, roots[s]), key) + b"\n" for s in sizes]
    ckpt.write_bytes(b"".join(notes))


def test_checkpoints_re_signed_with_another_key_are_caught(log_dir: Path) -> None:
    resign(log_dir, FORGER)
    p = first(log_dir)
    assert (p.code, p.file, p.line) == ("CHECKPOINT_UNSIGNED", "checkpoints.log", 1)
    assert FORGER.public.key_id.hex() not in p.message  # names the expected audit key
    assert verify(log_dir, FORGER.public).verified  # only the right key authenticates


def test_a_log_rebuilt_without_the_audit_key_is_caught(log_dir: Path) -> None:
    k = middle(log_dir)

    def change(rows: list[dict[str, Any]]) -> None:
        rows[k]["object"]["size"] = 1  # a consistent rewrite of one record

    rebuild(log_dir, FORGER, change)
    report = verify(log_dir, KEY.public)
    assert report.records == report.tree_size  # every record and link is consistent
    codes = {p.code for p in report.problems}
    assert codes == {"CHECKPOINT_UNSIGNED"}
    assert report.first is not None
    assert report.first.line == 1
    assert report.checkpoints_verified == 0


def test_removed_checkpoints_are_caught(log_dir: Path) -> None:
    (log_dir / "checkpoints.log").unlink()
    report = verify(log_dir, KEY.public)
    p = report.first
    assert p is not None
    assert (p.code, p.idx) == ("CHECKPOINT_MISSING", 2)
    assert "NO_CHECKPOINT" in {q.code for q in report.problems}


def test_one_removed_checkpoint_is_named(log_dir: Path) -> None:
    ckpt = log_dir / "checkpoints.log"
    notes = parse_notes(ckpt.read_bytes()).notes
    data = ckpt.read_bytes()
    victim = notes[5]
    ckpt.write_bytes(data[: victim.offset] + data[victim.end + 1 :])
    p = first(log_dir)
    assert (p.code, p.idx) == ("CHECKPOINT_MISSING", victim.checkpoint.size - 1)


def test_reordered_checkpoints_are_a_regression(log_dir: Path) -> None:
    ckpt = log_dir / "checkpoints.log"
    notes = parse_notes(ckpt.read_bytes()).notes
    data = ckpt.read_bytes()
    a, b = notes[3], notes[4]
    swapped = data[b.offset : b.end + 1] + data[a.offset : a.end + 1]
    ckpt.write_bytes(data[: a.offset] + swapped + data[b.end + 1 :])
    p = first(log_dir)
    assert (p.code, p.file, p.line) == ("CHECKPOINT_REGRESSION", "checkpoints.log", a.line + 6)


def test_a_changed_byte_in_a_checkpoint_is_caught(log_dir: Path) -> None:
    ckpt = log_dir / "checkpoints.log"
    note = parse_notes(ckpt.read_bytes()).notes[2]
    data = bytearray(ckpt.read_bytes())
    data[note.offset + len(ORIGIN) + 1] ^= 0x01  # the size line
    ckpt.write_bytes(bytes(data))
    report = verify(log_dir, KEY.public)
    assert report.first is not None
    assert report.first.code in {"CHECKPOINT_BAD_SIGNATURE", "CHECKPOINT_MISMATCH"}
    assert "CHECKPOINT_BAD_SIGNATURE" in {p.code for p in report.problems}


@pytest.mark.parametrize(
    "extra", [b"\n", b"\n" * 100_000, b"not a checkpoint!\n", b"A" * 5000, b"\x00\x01\n"]
)
def test_bytes_after_the_last_checkpoint_that_are_no_checkpoint_are_malformed(
    log_dir: Path, extra: bytes
) -> None:
    """A closed log's checkpoints.log ends with one blank line: more blank lines or junk are
    named (neither skipped nor taken for a torn write)."""
    ckpt = log_dir / "checkpoints.log"
    line = ckpt.read_bytes().count(b"\n") + 1
    with ckpt.open("ab") as f:
        f.write(extra)
    report = verify(log_dir, KEY.public)
    assert [(p.code, p.file, p.line) for p in report.problems] == [
        ("CHECKPOINT_MALFORMED", "checkpoints.log", line)
    ]


VERIFY_IN_LITTLE_MEMORY = """
import resource, sys
from pathlib import Path
limit = 256 << 20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from ferry.audit import verify
from ferry.crypto.keys import PublicKey
report = verify(Path(sys.argv[1]), PublicKey("ed25519", bytes.fromhex(sys.argv[2])))
print(*[p.code for p in report.problems])
"""


def test_a_flood_of_blank_lines_is_refused_in_bounded_memory(log_dir: Path) -> None:
    """checkpoints.log is read line by line: 32 MiB of newlines (which cost gigabytes when the
    file was split into a list of lines) verify within a 256 MiB address space."""
    with (log_dir / "checkpoints.log").open("ab") as f:
        f.write(b"\n" * (32 << 20))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", VERIFY_IN_LITTLE_MEMORY, str(log_dir), KEY.public.raw.hex()],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["CHECKPOINT_MALFORMED"]


def test_a_checkpoints_file_that_is_not_a_regular_file_is_malformed(
    log_dir: Path, tmp_path: Path
) -> None:
    def malformed() -> str:
        report = verify(log_dir, KEY.public)
        assert not report.ok
        (p,) = [p for p in report.problems if p.code == "CHECKPOINT_MALFORMED"]
        assert p.file == "checkpoints.log"
        return p.message

    ckpt = log_dir / "checkpoints.log"
    ckpt.rename(tmp_path / "elsewhere.log")
    ckpt.symlink_to(tmp_path / "elsewhere.log")
    assert "symbolic link" in malformed()
    ckpt.unlink()
    os.mkfifo(ckpt)  # opened without blocking
    assert "not a regular file" in malformed()


def test_clock_steps_back_are_warnings(tmp_path: Path) -> None:
    times = iter(
        [1_000_000_000_000_000 + i * 1000 for i in range(10)]
        + [1_000_000_000_000_000 - 5_000_000] * 100
    )
    with AuditLog(tmp_path, KEY, SETTINGS, clock=lambda: next(times)) as log:
        for _ in range(12):
            log.append("link.heartbeat_gap", subject=SENDER, result="info")
    report = verify(tmp_path, KEY.public)
    assert report.verified
    assert [w.code for w in report.warnings] == ["TS_REGRESSION"]


# --- the command line --------------------------------------------------------------------------


def test_cli_verifies_with_a_key_file_and_prints_json(
    pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pub = tmp_path / "audit.pub"
    write_public_key(pub, KEY.public)
    assert audit_cli.run(["verify", str(pristine), "--key", str(pub)]) == 0
    assert capsys.readouterr().out.startswith("VERIFIED")
    assert audit_cli.run(["verify", str(pristine), "--key", KEY.public.to_string(), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verified"] is True
    assert out["first_problem"] is None


def test_cli_names_the_first_problem_and_exits_1(
    log_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    k = middle(log_dir)
    seg, line, _ = find(log_dir, k)
    edit_lines(seg, lambda ls: [*ls[: line - 1], *ls[line:]])
    assert audit_cli.run(["verify", str(log_dir), "--key", KEY.public.to_string()]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED")
    assert f"first problem: RECORDS_MISSING at {seg.name} line {line} (record {k}," in out
    assert audit_cli.run(["verify", str(log_dir), "--key", KEY.public.to_string(), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["first_problem"]["code"] == "RECORDS_MISSING"
    assert report["first_problem"]["idx"] == k
    assert report["first_problem"]["line"] == line


def test_cli_without_a_key_is_not_verified(
    pristine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert audit_cli.run(["verify", str(pristine)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("NOT AUTHENTICATED")
    assert "UNAUTHENTICATED" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["verify", "/nonexistent/audit", "--key", KEY.public.to_string()],
        ["verify", ".", "--key", "ferry-pk:ed25519:00:AAAA"],
        ["verify", ".", "--key", SecretKey("x25519", bytes(32)).public.to_string()],
        ["verify"],
        ["nonsense"],
    ],
)
def test_cli_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert audit_cli.run(argv) == 2
    assert "error" in capsys.readouterr().err


def test_add_parser_registers_audit_verify() -> None:
    parser = argparse.ArgumentParser(prog="ferry")
    audit_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["audit", "verify", "DIR", "--key", "K", "--json"])
    assert (args.path, args.key, args.json, args.func) == ("DIR", "K", True, audit_cli.cmd_verify)

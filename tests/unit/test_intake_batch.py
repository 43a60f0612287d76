"""Small files ready together are spooled together: one flush of their contents, one
transaction, one wait for their intake records. Each still gets its own item, sequence
number (in the order taken), signed trailer and audit record; a larger file is spooled
alone, in its turn. If the audit log refuses one record of a batch, the files recorded
before it are spooled and the others wait in the drop folder. A real deployment's intake (its
content pipeline, spool and audit log), driven by hand."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from intake_helpers import Gateway

from ferry.audit.record import AuditUnavailable
from ferry.wire import records as rec
from outside import intake as intake_mod
from outside.spool import SpoolItem


def _take_all(g: Gateway, want: int) -> list[SpoolItem]:
    items: list[SpoolItem] = []
    deadline = time.monotonic() + 30
    while len(items) < want and time.monotonic() < deadline:
        items += g.intake.step("documents", 0.5)
    return items


def _manifest(path: Path) -> tuple[rec.Manifest, bytes]:
    stream = path.read_bytes()
    cut = len(stream) - rec.trailer_length(stream[-8:])
    tail = stream[cut:]
    (mlen,) = rec.TRAILER_TAIL.unpack(tail[-8:])[:1]
    return rec.decode_manifest(tail[:mlen]), stream[:cut]


def _rows(g: Gateway) -> list[tuple[Any, ...]]:
    with sqlite3.connect(g.intake._spool.dir.parent / "outside.db") as db:
        return db.execute("SELECT seq, name FROM items ORDER BY seq").fetchall()


def test_small_files_are_spooled_together_and_a_large_one_alone(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(intake_mod, "BATCH_FILE_MAX", 1000)  # "large": over 1,000 bytes
    calls: list[list[str]] = []  # the names of each transaction's items
    real = gateway.intake._spool.add_many

    def add_many(entries: list[Any], **kw: Any) -> None:
        calls.append([e[0].name for e in entries])
        real(entries, **kw)

    monkeypatch.setattr(gateway.intake._spool, "add_many", add_many)
    texts = {f"note-{i:02d}.txt": f"note {i}\n".encode() * (300 if i == 5 else 3) for i in range(9)}
    for name, data in texts.items():
        (gateway.drop / name).write_bytes(data)
    gateway.intake._lanes["documents"].watcher.start()
    items = _take_all(gateway, len(texts))

    assert sorted(i.name for i in items) == sorted(texts)
    assert [i.seq for i in items] == list(range(1, len(texts) + 1))  # in the order taken
    assert sorted(n for names in calls for n in names) == sorted(texts)
    assert max(len(names) for names in calls) > 1  # small files together
    assert ["note-05.txt"] in calls  # the large one alone
    big = next(n for n, i in enumerate(items) if i.name == "note-05.txt")
    assert _rows(gateway) == [(i.seq, i.name) for i in items]
    for item in items:  # each its own signed trailer, numbered as the spool says
        assert item.spool_file is not None
        assert item.audit_idx >= 0
        manifest, content = _manifest(item.spool_file)
        assert (manifest.object_id, manifest.seq, manifest.name) == (
            item.object_id,
            item.seq,
            item.name,
        )
        assert hashlib.sha256(content).digest() == manifest.sha256
        assert content == texts[item.name]
    assert items[big].size == len(texts["note-05.txt"])
    accepted = [r for r in gateway.records() if r["event"] == "intake.accepted"]
    assert sorted(r["corr"] for r in accepted) == sorted(i.object_id.hex() for i in items)
    assert sorted(os.listdir(gateway.drop)) == []
    assert sorted(os.listdir(gateway.channel.sent)) == sorted(texts)  # type: ignore[arg-type]
    assert list(gateway.intake._incoming.glob("*.part")) == []


def test_a_refused_audit_record_spools_the_files_recorded_before_it_and_no_other(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit log refuses the third record of a batch of five: the two files recorded
    before it are spooled and their originals moved (no record without its item, no item
    without its record); the other three are not spooled and wait in the drop folder,
    and are taken once the log writes again."""
    real = gateway.audit.record
    seen: list[str] = []

    def record(event: str, **kw: Any) -> int:
        if event == "intake.accepted":
            seen.append(event)
            if len(seen) == 3:
                raise AuditUnavailable("disk full (test)")
        return real(event, **kw)

    batches: list[tuple[int, int, bool]] = []  # (files, spooled, refused)
    real_batch = intake_mod.spool_file_items

    def spool_file_items(*args: Any) -> Any:
        items, refused = real_batch(*args)
        batches.append((len(args[3]), len(items), refused is not None))
        return items, refused

    monkeypatch.setattr(gateway.audit, "record", record)
    monkeypatch.setattr(intake_mod, "spool_file_items", spool_file_items)
    monkeypatch.setattr(gateway.intake._lanes["documents"].watcher, "_rescan_interval", 0.5)
    names = [f"letter-{i}.txt" for i in range(5)]
    for name in names:  # (all there before the watcher starts: one batch)
        (gateway.drop / name).write_bytes(f"{name}\n".encode())
    gateway.intake._lanes["documents"].watcher.start()
    first: list[SpoolItem] = []
    deadline = time.monotonic() + 10
    while len(seen) < 3 and time.monotonic() < deadline:
        first += gateway.intake.step("documents", 0.5)
    assert batches == [(5, 2, True)]
    assert [i.seq for i in first] == [1, 2]
    assert _rows(gateway) == [(i.seq, i.name) for i in first]
    assert len(list(gateway.intake._spool.dir.glob("*.obj"))) == 2
    accepted = [r for r in gateway.records() if r["event"] == "intake.accepted"]
    assert sorted(r["corr"] for r in accepted) == sorted(i.object_id.hex() for i in first)
    moved = sorted(i.name for i in first)
    assert sorted(os.listdir(gateway.channel.sent)) == moved  # type: ignore[arg-type]
    assert sorted(os.listdir(gateway.drop)) == sorted(set(names) - set(moved))  # they wait
    assert list(gateway.intake._incoming.glob("*.part")) == []

    monkeypatch.setattr(gateway.audit, "record", real)  # the log writes again
    rest = _take_all(gateway, 3)
    assert sorted(i.name for i in first + rest) == names
    assert [i.seq for i in rest] == [3, 4, 5]
    assert os.listdir(gateway.drop) == []

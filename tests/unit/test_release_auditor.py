"""ReleaseAuditor: the lines of releases.jsonl into the agent's audit log.

A release line becomes ``quarantine.released``; the signed line an inside release appends
after delivering becomes ``delivery.delivered`` with the path (and the agent's callback
marks the item delivered). Lines not signed by the admin key, or signed but malformed, are
recorded as failures and never reach the callback; a line the audit log refuses is read
again at the next scan, not skipped.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ferry.audit.record import AuditUnavailable
from ferry.crypto.keys import SecretKey
from ferry.quarantine_release import (
    AUDITED_STATE,
    MAX_DELIVERED_PATH,
    RELEASES,
    ReleaseAuditor,
    append_release,
    delivered_record,
    new_record,
    sign_record,
)

ITEM = "ab" * 16


class FakeLog:
    """The audit log's durability, as the auditor sees it: ``wait_durable`` records the
    index it waited for (and whether the position file existed then), or fails."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.waits: list[tuple[int, bool]] = []
        self.down = False

    def wait_durable(self, idx: int) -> None:
        if self.down:
            raise AuditUnavailable("the audit disk is gone")
        self.waits.append((idx, self.state.exists()))


class FakeAudit:
    def __init__(self, state: Path | None = None) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []
        self.refuse = False
        self.log = FakeLog(state or Path("/nonexistent"))

    def try_record(self, event: str, **kw: Any) -> int | None:
        if self.refuse:
            return None
        self.records.append((event, kw))
        return len(self.records) - 1


def _release(key: SecretKey) -> dict[str, Any]:
    doc = {"original_name": "scan.png", "item_id": ITEM, "reason_code": "RECHECK_DISAGREES"}
    return new_record(
        doc, f"{ITEM}.obj", "cd" * 32, channel="documents", key=key, override=None, note="",
        clock=lambda: "2026-11-22T10:00:00.000000Z",
    )  # fmt: skip


@dataclass
class Rig:
    """A quarantine folder, the admin key, and an auditor that records into ``audit`` and
    reports delivered items into ``seen``; every scan is due."""

    tmp: Path
    key: SecretKey = field(default_factory=lambda: SecretKey.generate("ed25519"))
    audit: FakeAudit = field(default_factory=FakeAudit)
    seen: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.audit = FakeAudit(self.tmp / "state" / AUDITED_STATE)
        self.folder = self.tmp / "q"
        self.folder.mkdir()
        (self.tmp / "state").mkdir()
        self.auditor = ReleaseAuditor(
            self.audit,  # type: ignore[arg-type]
            self.tmp / "state",
            self.key.public,
            clock=iter(range(0, 10_000, 10)).__next__,
            on_delivered=lambda item, path: self.seen.append((item, path)),
        )

    def scan(self) -> None:
        self.auditor.scan({self.folder: None})

    def released_and_delivered(self, name: str, size: int) -> None:
        """The two lines a release appends: the release, then where it delivered."""
        release = _release(self.key)
        append_release(self.folder, release)
        path = self.folder / name
        append_release(
            self.folder, delivered_record(release, path, size, key=self.key, clock=lambda: "t")
        )

    def delivered_line(self, key: SecretKey | None = None, **change: Any) -> dict[str, Any]:
        """A delivered line with ``change`` (None: the field left out), signed by ``key``."""
        line = delivered_record(
            _release(self.key), self.folder / "x.png", 1, key=self.key, clock=lambda: "t"
        )
        line = {k: v for k, v in line.items() if k != "signature"}
        line.update(change)
        return sign_record({k: v for k, v in line.items() if v is not None}, key or self.key)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def test_a_delivered_line_is_recorded_with_its_path(rig: Rig) -> None:
    rig.released_and_delivered("scan (2).png", 123)
    rig.scan()
    assert [e for e, _ in rig.audit.records] == ["quarantine.released", "delivery.delivered"]
    kw = rig.audit.records[1][1]
    assert kw["obj"].path == str(rig.folder / "scan (2).png")
    assert kw["obj"].size == 123
    assert kw["obj"].item == ITEM
    assert kw["obj"].sha256 == "cd" * 32
    assert kw["detail"] == {"released": True, "stored_name": f"{ITEM}.obj"}
    assert kw["subject"].id.endswith(rig.key.public.key_id.hex())
    assert rig.seen == [(ITEM, str(rig.folder / "scan (2).png"))]
    rig.scan()  # recorded once, also after the offsets were kept
    assert len(rig.audit.records) == 2


def test_bad_delivered_lines_are_failures_and_never_reach_the_ledger(rig: Rig) -> None:
    other = SecretKey.generate("ed25519")
    lines = [
        # claims the admin key's id; another key signed it
        rig.delivered_line(other, admin_key_id=rig.key.public.key_id.hex()),
        rig.delivered_line(delivered_as=None),
        rig.delivered_line(delivered_as="/" + "p" * MAX_DELIVERED_PATH),
        rig.delivered_line(size="1"),
        rig.delivered_line(size=-1),
        rig.delivered_line(stored_name=None),
        rig.delivered_line(item_id="../" + "a" * 29),  # well formed but for the item id
    ]
    for line in lines:
        append_release(rig.folder, line)
    with open(rig.folder / RELEASES, "a") as f:
        f.write("not json\n")
    rig.scan()
    events = [(e, kw.get("result"), (kw.get("reason") or "")[:13]) for e, kw in rig.audit.records]
    assert events == [
        ("quarantine.released", "failure", "BAD_SIGNATURE"),
        *[("quarantine.released", "failure", "BAD_RECORD: a")] * 5,
        ("delivery.delivered", None, ""),  # signed and well formed; no item id to mark
        ("quarantine.released", "failure", "BAD_SIGNATURE"),
    ]
    assert rig.audit.records[6][1]["obj"].item is None
    assert rig.seen == []  # the ledger is never touched without a signed, well-formed item


def test_a_line_the_audit_log_refuses_is_read_again(rig: Rig) -> None:
    rig.released_and_delivered("scan.png", 5)
    rig.audit.refuse = True
    rig.scan()
    assert rig.audit.records == []
    assert rig.seen == []
    rig.audit.refuse = False
    rig.scan()
    assert [e for e, _ in rig.audit.records] == ["quarantine.released", "delivery.delivered"]
    assert rig.seen == [(ITEM, str(rig.folder / "scan.png"))]
    kept = json.loads((rig.tmp / "state" / "releases-audited.json").read_text())
    assert kept == {str(rig.folder / RELEASES): (rig.folder / RELEASES).stat().st_size}


def test_odd_bytes_never_stop_the_scan(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A carriage return inside a line, a line longer than one read, or a partial last line
    (still being written) never make the auditor skip or stall on later lines."""
    import ferry.quarantine_release as qr  # noqa: PLC0415

    monkeypatch.setattr(qr, "MAX_RELEASE_SCAN", 4096)
    with open(rig.folder / RELEASES, "ab") as f:
        f.write(b'{"stored_name": "a\rb"}\r\n')
        f.write(b"x" * 5000 + b"\n")
    rig.scan()  # the CR line; then a read of 4096 bytes with no newline
    rig.scan()  # the rest of the long line, up to its newline
    append_release(rig.folder, _release(rig.key))
    with open(rig.folder / RELEASES, "ab") as f:
        f.write(b'{"stored_name": "partial')
    rig.scan()
    results = [(e, kw["result"]) for e, kw in rig.audit.records]
    assert results == [
        ("quarantine.released", "failure"),  # the CR line
        ("quarantine.released", "failure"),  # the first 4096 bytes of the long line
        ("quarantine.released", "failure"),  # its last 904
        ("quarantine.released", "success"),  # the real release, after all of them
    ]
    with open(rig.folder / RELEASES, "ab") as f:
        f.write(b'"}\n')
    rig.scan()
    assert [kw["result"] for _, kw in rig.audit.records[4:]] == ["failure"]  # (no signature)


def test_each_folder_has_its_own_turn_and_one_that_hangs_holds_up_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outside's intake threads each scan their own channel's quarantine folder: one
    whose folder stopped answering (a share) must not stop another's releases."""
    key = SecretKey.generate("ed25519")
    audit = FakeAudit()
    (tmp_path / "state").mkdir()
    hung, local = tmp_path / "hung", tmp_path / "local"
    for folder in (hung, local):
        folder.mkdir()
        append_release(folder, _release(key))
    auditor = ReleaseAuditor(audit, tmp_path / "state", key.public, clock=lambda: 100.0)  # type: ignore[arg-type]
    inside, release = threading.Event(), threading.Event()
    read = auditor._scan_file

    def scan_file(path: Path, channel: str | None, done: int, recorded: list[int]) -> int:
        if path.parent == hung:
            inside.set()
            release.wait(10)
        return read(path, channel, done, recorded)

    monkeypatch.setattr(auditor, "_scan_file", scan_file)
    stuck = threading.Thread(target=auditor.scan, args=({hung: "documents"},))
    stuck.start()
    try:
        assert inside.wait(5)
        auditor.scan({local: "archive"})  # same instant, another folder: its turn
        assert [kw["obj"].channel for _, kw in audit.records] == ["archive"]
        kept = json.loads((tmp_path / "state" / AUDITED_STATE).read_text())
        assert kept == {str(local / RELEASES): (local / RELEASES).stat().st_size}
        auditor.scan({hung: "documents", local: "archive"})  # neither is due again
        assert len(audit.records) == 1
    finally:
        release.set()
        stuck.join(10)
    assert [kw["obj"].channel for _, kw in audit.records] == ["archive", "documents"]
    kept = json.loads((tmp_path / "state" / AUDITED_STATE).read_text())
    assert set(kept) == {str(hung / RELEASES), str(local / RELEASES)}


def test_the_read_position_moves_only_once_the_records_are_on_disk(rig: Rig) -> None:
    """Else a power cut could keep the position past lines whose records it took back."""
    state = rig.tmp / "state" / AUDITED_STATE
    rig.released_and_delivered("scan.png", 5)
    rig.audit.log.down = True  # recorded, but the log cannot say they are on disk
    rig.scan()
    assert len(rig.audit.records) == 2
    assert not state.exists()  # the position stays: the lines are read again
    rig.audit.log.down = False
    rig.scan()
    assert len(rig.audit.records) == 4  # twice rather than never
    assert rig.audit.log.waits == [(3, False)]  # waited for the last, before the position
    assert json.loads(state.read_text()) == {
        str(rig.folder / RELEASES): (rig.folder / RELEASES).stat().st_size
    }

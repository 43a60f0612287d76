"""ReleaseAuditor: the lines of releases.jsonl into the agent's audit log.

A release line becomes ``quarantine.released``; the signed line an inside release appends
after delivering becomes ``delivery.delivered`` with the path (and the agent's callback
marks the item delivered). Lines not signed by the admin key, or signed but malformed, are
recorded as failures and never reach the callback; a line the audit log refuses is read
again at the next scan, not skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ferry.crypto.keys import SecretKey
from ferry.quarantine_release import (
    RELEASES,
    ReleaseAuditor,
    append_release,
    delivered_record,
    new_record,
    sign_record,
)

ITEM = "ab" * 16


class FakeAudit:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []
        self.refuse = False

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


def _auditor(tmp_path: Path, key: SecretKey) -> tuple[ReleaseAuditor, FakeAudit, list[Any]]:
    audit = FakeAudit()
    seen: list[tuple[str, str]] = []
    auditor = ReleaseAuditor(
        audit,  # type: ignore[arg-type]
        tmp_path / "state",
        key.public,
        clock=iter(range(0, 10_000, 10)).__next__,  # every scan is due
        on_delivered=lambda item, path: seen.append((item, path)),
    )
    (tmp_path / "state").mkdir()
    return auditor, audit, seen


def test_a_delivered_line_is_recorded_with_its_path(tmp_path: Path) -> None:
    key = SecretKey.generate("ed25519")
    folder = tmp_path / "q"
    folder.mkdir()
    auditor, audit, seen = _auditor(tmp_path, key)
    release = _release(key)
    append_release(folder, release)
    append_release(
        folder,
        delivered_record(release, folder / "scan (2).png", 123, key=key, clock=lambda: "t"),
    )
    auditor.scan({folder: None})
    assert [e for e, _ in audit.records] == ["quarantine.released", "delivery.delivered"]
    kw = audit.records[1][1]
    assert kw["obj"].path == str(folder / "scan (2).png")
    assert kw["obj"].size == 123
    assert kw["obj"].item == ITEM
    assert kw["obj"].sha256 == "cd" * 32
    assert kw["detail"] == {"released": True, "stored_name": f"{ITEM}.obj"}
    assert kw["subject"].id.endswith(key.public.key_id.hex())
    assert seen == [(ITEM, str(folder / "scan (2).png"))]
    auditor.scan({folder: None})  # recorded once, also after the offsets were kept
    assert len(audit.records) == 2


def test_bad_delivered_lines_are_failures_and_never_reach_the_ledger(tmp_path: Path) -> None:
    key = SecretKey.generate("ed25519")
    other = SecretKey.generate("ed25519")
    folder = tmp_path / "q"
    folder.mkdir()
    auditor, audit, seen = _auditor(tmp_path, key)
    release = _release(key)
    forged = delivered_record(release, folder / "x.png", 1, key=other, clock=lambda: "t")
    forged["admin_key_id"] = key.public.key_id.hex()  # claims the admin key; not its signature
    forged = sign_record({k: v for k, v in forged.items() if k != "signature"}, other)
    no_path = delivered_record(release, folder / "y.png", 1, key=key, clock=lambda: "t")
    no_path = sign_record(
        {k: v for k, v in no_path.items() if k not in ("signature", "delivered_as")}, key
    )
    bad_size = delivered_record(release, folder / "z.png", 1, key=key, clock=lambda: "t")
    bad_size = sign_record(
        {**{k: v for k, v in bad_size.items() if k != "signature"}, "size": "1"}, key
    )
    odd_item = delivered_record(
        {**release, "item_id": "../" + "a" * 29}, folder / "w.png", 1, key=key, clock=lambda: "t"
    )
    for line in (forged, no_path, bad_size, odd_item):
        append_release(folder, line)
    with open(folder / RELEASES, "a") as f:
        f.write("not json\n")
    auditor.scan({folder: None})
    events = [(e, kw.get("result"), (kw.get("reason") or "")[:13]) for e, kw in audit.records]
    assert events == [
        ("quarantine.released", "failure", "BAD_SIGNATURE"),
        ("quarantine.released", "failure", "BAD_RECORD: a"),
        ("quarantine.released", "failure", "BAD_RECORD: a"),
        ("delivery.delivered", None, ""),  # signed and well formed; no item id to mark
        ("quarantine.released", "failure", "BAD_SIGNATURE"),
    ]
    assert audit.records[3][1]["obj"].item is None
    assert seen == []  # the ledger is never touched without a signed, well-formed item


def test_a_line_the_audit_log_refuses_is_read_again(tmp_path: Path) -> None:
    key = SecretKey.generate("ed25519")
    folder = tmp_path / "q"
    folder.mkdir()
    auditor, audit, seen = _auditor(tmp_path, key)
    release = _release(key)
    append_release(folder, release)
    append_release(
        folder, delivered_record(release, folder / "scan.png", 5, key=key, clock=lambda: "t")
    )
    audit.refuse = True
    auditor.scan({folder: None})
    assert audit.records == []
    assert seen == []
    audit.refuse = False
    auditor.scan({folder: None})
    assert [e for e, _ in audit.records] == ["quarantine.released", "delivery.delivered"]
    assert seen == [(ITEM, str(folder / "scan.png"))]
    kept = json.loads((tmp_path / "state" / "releases-audited.json").read_text())
    assert kept == {str(folder / RELEASES): (folder / RELEASES).stat().st_size}


def test_odd_bytes_never_stop_the_scan(tmp_path: Path, monkeypatch: Any) -> None:
    """A carriage return inside a line, a line longer than one read, or a partial last line
    (still being written) never make the auditor skip or stall on later lines."""
    import ferry.quarantine_release as qr  # noqa: PLC0415

    monkeypatch.setattr(qr, "MAX_RELEASE_SCAN", 4096)
    key = SecretKey.generate("ed25519")
    folder = tmp_path / "q"
    folder.mkdir()
    auditor, audit, _ = _auditor(tmp_path, key)
    with open(folder / RELEASES, "ab") as f:
        f.write(b'{"stored_name": "a\rb"}\r\n')
        f.write(b"x" * 5000 + b"\n")
    auditor.scan({folder: None})  # the CR line; then a read of 4096 bytes with no newline
    auditor.scan({folder: None})  # the rest of the long line, up to its newline
    append_release(folder, _release(key))
    with open(folder / RELEASES, "ab") as f:
        f.write(b'{"stored_name": "partial')
    auditor.scan({folder: None})
    results = [(e, kw["result"]) for e, kw in audit.records]
    assert results == [
        ("quarantine.released", "failure"),  # the CR line
        ("quarantine.released", "failure"),  # the first 4096 bytes of the long line
        ("quarantine.released", "failure"),  # its last 904
        ("quarantine.released", "success"),  # the real release, after all of them
    ]
    with open(folder / RELEASES, "ab") as f:
        f.write(b'"}\n')
    auditor.scan({folder: None})
    assert [kw["result"] for _, kw in audit.records[4:]] == ["failure"]  # (no signature)

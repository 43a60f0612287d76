"""A scripted scenario in which every event type of the vocabulary occurs, each record as the
agents write it, and every record validates and verifies.

Agent events are appended once each, with the subjects and objects docs/AUDIT.md §7 gives.
The log's own events come from real situations: opening (``audit.segment_opened``,
``audit.started``), a write failure and its recovery (``audit.outage``), a torn tail found
when the log is reopened (``audit.tail_truncated``) and closing (``audit.stopped``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from ferry.audit.log import AuditLog, AuditSettings, FileOps
from ferry.audit.record import (
    AuditObject,
    AuditUnavailable,
    Result,
    Subject,
    decode,
    events,
    validate,
)
from ferry.audit.segments import iter_lines, list_segments
from ferry.audit.verify import verify
from ferry.crypto.keys import SecretKey

KEY = SecretKey.generate("ed25519")
ITEM = "0193f2c47d1e7b3a9d550a1b2c3d4e5f"
SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
FOLDER = Subject.clerk_folder("/srv/ferry/drop/documents", "documents")
CLIENT = Subject.api_client("portal")
PEER = Subject("peer", "2f65c2ef665d2f26")
FILE = AuditObject(
    kind="file", item=ITEM, channel="documents", name="report.pdf", size=48213, sha256=SHA, seq=7
)
KEY_OBJ = AuditObject(kind="key", key_id="8db09f4b3ae5bdcf")
LINK = AuditObject(kind="link")
LOG_OWN = {
    "audit.segment_opened",
    "audit.started",
    "audit.stopped",
    "audit.checkpoint",
    "audit.outage",
    "audit.tail_truncated",
}

# (event, subject, result, reason, object, detail) as the agents write them
SCRIPT: list[tuple[str, Subject, Result, str | None, AuditObject | None, dict[str, Any] | None]] = [
    ("agent.started", Subject.component("outside-agent"), "success", None, None, {"pid": 4242}),
    ("config.loaded", Subject.component("outside-agent"), "info", None,
     AuditObject(kind="config", path="/etc/ferry/outside.yaml", sha256=SHA), None),
    ("config.changed", Subject.component("outside-agent"), "info", None,
     AuditObject(kind="config", path="/etc/ferry/outside.yaml", sha256=SHA),
     {"previous_sha256": "0" * 64}),
    ("agent.abnormal_termination", Subject.component("outside-agent"), "failure",
     "the previous run did not stop cleanly", None, {"pid": 4241}),
    ("key.generated", Subject.user("root"), "success", None, KEY_OBJ, {"role": "audit"}),
    ("key.imported", Subject.user("root"), "success", None, KEY_OBJ, {"role": "inside-kem"}),
    ("key.activated", Subject.component("inside-agent"), "info", None, KEY_OBJ,
     {"role": "outside-signing", "alg": "ed25519", "current": False}),
    ("key.retired", Subject.component("inside-agent"), "info", None, KEY_OBJ,
     {"role": "inside-kem", "alg": "mlkem768x25519"}),
    ("key.revoked", Subject.user("root"), "success", "compromised laptop", KEY_OBJ, None),
    ("key.destroyed", Subject.user("root"), "success", None, KEY_OBJ, None),
    ("api.connected", CLIENT, "success", None, None,
     {"server_key": "19909fdab14c22f6", "previous_key": True, "endpoint": "tcp://0.0.0.0:47100"}),
    ("api.auth_failed", Subject("api_client", "20n+(TC+e[>UJ3te"), "rejected",
     "UNKNOWN_KEY: CURVE handshake from a key not on the allow-list", None, None),
    ("api.rate_limited", CLIENT, "rejected", "RATE_LIMIT: more than 50 submissions/s", None,
     {"retry_after": 0.25}),
    ("spool.full", Subject.component("spool"), "info", None, None, {"items": 100000}),
    ("intake.received", FOLDER, "info", None, AuditObject(kind="file", name="report.pdf"), None),
    ("verdict", Subject.component("content"), "success", None, FILE,
     {"verdict": "deliver_cleaned", "actions": [{"what": "removed", "target": "/OpenAction"}]}),
    ("intake.accepted", FOLDER, "success", None, FILE, None),
    ("intake.rejected", FOLDER, "rejected", "POLYGLOT: a ZIP follows the PNG",
     AuditObject(kind="file", channel="documents", name="scan.png"), {"reason_code": "POLYGLOT"}),
    ("quarantine.added", FOLDER, "success", None,
     AuditObject(kind="file", channel="documents", name="scan.png", path="/q/scan.png"), None),
    ("quarantine.released", Subject.user("security-admin"), "success", None,
     AuditObject(kind="file", channel="documents", name="scan.png"), {"override": "POLYGLOT"}),
    ("quarantine.deleted", Subject.user("security-admin"), "success", None,
     AuditObject(kind="file", channel="documents", name="old.png"), None),
    ("transfer.queued", Subject.component("sender"), "info", None, FILE, None),
    ("transfer.sent", Subject.component("sender"), "success", None, FILE, {"send": 1, "of": 2}),
    ("transfer.repeated", Subject.component("sender"), "success", None, FILE,
     {"send": 2, "of": 2}),
    ("transfer.expired", Subject.component("sender"), "info", None, FILE, {"sent": 1, "of": 3}),
    ("transfer.received", PEER, "success", None, FILE, None),
    ("transfer.duplicate", PEER, "info", None, AuditObject(item=ITEM), None),
    ("transfer.lost", PEER, "failure", "LOST: no news for 60 s", AuditObject(item=ITEM), None),
    ("transfer.replay_rejected", PEER, "rejected", "REPLAY: counter below the floor", LINK, None),
    ("recheck", Subject.component("recheck"), "success", None, FILE, {"type": "pdf"}),
    ("delivery.delivered", Subject.component("delivery"), "success", None, FILE, None),
    ("delivery.rejected", Subject.component("delivery"), "rejected", "RECHECK_DISAGREES: /JS",
     AuditObject(item=ITEM), {"kept": "/q/x.obj"}),
    ("delivery.duplicate", Subject.component("delivery"), "info", None, AuditObject(item=ITEM),
     None),
    ("link.state", PEER, "info", None, LINK, {"state": "up"}),
    ("link.heartbeat_gap", PEER, "failure", "HEARTBEAT_GAP: 3 heartbeats lost", LINK,
     {"missed": 3}),
    ("link.clock_skew", PEER, "failure", "CLOCK_SKEW: +130.2 s", LINK, {"skew_seconds": 130.2}),
    ("link.sequence_gap", PEER, "failure", "SEQUENCE_GAP: items 8..8 never arrived",
     AuditObject(kind="link", channel="documents"), {"first": 8, "last": 8}),
    ("link.params_mismatch", PEER, "failure", "PARAMS_MISMATCH: link parameters differ", LINK,
     None),
    ("link.session_started", PEER, "info", None, AuditObject(kind="link", epoch="17"), None),
    ("link.sender_restart", PEER, "info", None, LINK, {"old_epoch": 16, "new_epoch": 17}),
    ("audit.exported", Subject.component("siem-export"), "info", None, None,
     {"first": 0, "last": 40}),
    ("audit.reviewed", Subject.user("auditor"), "success", None, None, {"through": 40}),
    ("audit.witnessed", Subject.component("audit-mirror"), "success", None,
     AuditObject(kind="checkpoint", size=40), {"origin": "ferry/outside/8db0", "size": 40}),
    ("audit.witness_inconsistent", Subject.component("audit-mirror"), "failure",
     "WITNESS_INCONSISTENT: checkpoint 41 is not signed by the outside key",
     AuditObject(kind="checkpoint"), None),
    ("audit.resend", Subject.component("audit-mirror"), "success", None,
     AuditObject(kind="segment", name="audit-000003.jsonl@40960"), None),
    ("agent.stopped", Subject.component("outside-agent"), "success", None, None, None),
]  # fmt: skip


class Breakable(FileOps):
    def __init__(self) -> None:
        self.broken = threading.Event()

    def write(self, fd: int, data: memoryview) -> int:
        if self.broken.is_set():
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return super().write(fd, data)


def test_every_event_type_occurs_and_every_record_validates(tmp_path: Path) -> None:
    settings = AuditSettings(origin="test/every-event", checkpoint_every=10**6, retry_interval=0.05)
    files = Breakable()
    log = AuditLog(tmp_path, KEY, settings, files=files)
    for i, (event, subject, result, reason, obj, detail) in enumerate(SCRIPT):
        if i == len(SCRIPT) // 2:  # an I/O error half way: refused, then recovered
            files.broken.set()
            idx = log.append("transfer.queued", subject=Subject.component("probe"), result="info")
            with contextlib.suppress(AuditUnavailable):
                log.wait_durable(idx, timeout=2)
            assert not log.healthy
            files.broken.clear()
            assert log.available.wait(5)  # the writer retried and wrote what was queued
            log.wait_durable(idx, timeout=5)
        corr = ITEM if obj is not None and obj.item else None
        last = log.append(
            event, subject=subject, result=result, reason=reason, obj=obj, detail=detail, corr=corr
        )
    log.wait_durable(last)
    log._abort()  # the process dies: no audit.stopped, and a write torn in the middle
    segment = list_segments(tmp_path)[-1][1]
    with open(segment, "ab") as f:  # a crash in the middle of a write
        f.write(b'{"v":1,"idx":')
    AuditLog(tmp_path, KEY, settings).close()  # reopened: the torn tail is cut and recorded

    records = [decode(line.data) for _, seg in list_segments(tmp_path) for line in iter_lines(seg)]
    for rec in records:
        validate(rec)
    seen = Counter(r["event"] for r in records)
    assert set(seen) == events()  # every type of the vocabulary
    scripted = Counter(e for e, *_ in SCRIPT)
    for event in events() - LOG_OWN:
        want = 2 if event == "transfer.queued" else 1  # (+ the probe of the outage)
        assert seen[event] == want, event
        assert scripted[event] == 1, event
    assert seen["audit.outage"] == 1
    assert seen["audit.tail_truncated"] == 1
    outage = next(r for r in records if r["event"] == "audit.outage")
    assert "EIO" in outage["detail"]["error"]
    report = verify(tmp_path, KEY.public)
    assert report.verified, [p.to_json() for p in report.problems]
    assert report.records == len(records)

"""The outside's transfer.sent records of bundled messages: batch records, none lost or
written twice when the audit log refuses one midway (a real OutsideAgent and audit log)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import init

from ferry.audit.record import MAX_BATCH_ITEMS, AuditUnavailable, decode
from ferry.audit.segments import iter_lines, list_segments
from ferry.config import load_outside_config
from ferry.wire.sender import ObjectSent
from outside.agent import OutsideAgent

pytestmark = pytest.mark.integration


def test_a_bundle_is_recorded_in_batch_records_and_a_refusal_loses_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dep = init(tmp_path / "d")
    agent = OutsideAgent(load_outside_config(Path(dep["outside"]["config"])), threading.Event())
    bundle = os.urandom(16).hex()
    copies = [ObjectSent(os.urandom(16), "messages", seq) for seq in range(1, 101)]
    a_file = ObjectSent(os.urandom(16), "documents", 1)
    agent._unrecorded.extend((c, 1, 1, bundle) for c in copies)
    agent._unrecorded.append((a_file, 1, 2, None))
    real_record = agent.audit.record
    calls: list[int] = []

    def record(event: str, **kw: Any) -> int:
        calls.append(len(kw["obj"]["items"]) if isinstance(kw.get("obj"), dict) else 1)
        if len(calls) == 2:
            raise AuditUnavailable("disk full (test)")
        return real_record(event, **kw)

    monkeypatch.setattr(agent.audit, "record", record)
    try:
        before = agent.audit.log.size
        agent._record_sends()  # the second record is refused
        assert len(agent._unrecorded) == 100 - MAX_BATCH_ITEMS + 1  # the first 64 are in
        agent._record_sends()  # the log is back
        assert not agent._unrecorded
        audit_dir = agent.audit.log.directory
    finally:
        if agent.pipeline is not None:
            agent.pipeline.close()
        if agent.api is not None:
            agent.api.close()
        agent.spool.close()
        agent.audit.close()
    # (then agent.stopped, at close)
    assert calls[:4] == [MAX_BATCH_ITEMS, 100 - MAX_BATCH_ITEMS, 100 - MAX_BATCH_ITEMS, 1]
    sent = [
        r
        for r in (
            decode(line.data)
            for _, seg in list_segments(audit_dir)
            for line in iter_lines(seg)
            if line.complete
        )
        if r["idx"] >= before and r["event"] == "transfer.sent"
    ]
    batch, file_record = sent[:-1], sent[-1]
    listed = [(e["item"], e["seq"]) for r in batch for e in r["object"]["items"]]
    assert listed == [(c.object_id.hex(), c.seq) for c in copies]  # each once, in order
    for r in batch:
        assert r["detail"] == {"bundle": bundle, "send": 1, "of": 1}
        assert r["object"]["channel"] == "messages"
    assert file_record["object"]["item"] == file_record["corr"] == a_file.object_id.hex()
    assert file_record["detail"] == {"send": 1, "of": 2}

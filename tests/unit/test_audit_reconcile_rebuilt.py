"""Reconcile after a rebuilt outside (docs/OPERATIONS.md, "The outside's disk is lost").

The old outside log is witnessed by the inside, the outside's disk is lost, a new log
begins (the same keys: the same origin, or another after an audit-key rotation), the inside's
mirror of the old log is set aside and the new log is mirrored and witnessed from its start.
Real writers, the real inside mirror and witness, real files; only the diode is left out
(the outside's files are handed to the mirror whole).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from ferry.audit import AuditLog, AuditObject, AuditSettings, Subject
from ferry.audit.agent import AgentAudit
from ferry.audit.locate import Locations, LogLocation
from ferry.audit.reconcile import Reconciliation, reconcile, reconcile_logs
from ferry.audit.timeline import LogStats, note_audit_record
from ferry.audit.verify import CHECKPOINTS_FILE, list_segments
from ferry.config_types import AuditParams
from ferry.crypto.keys import SecretKey, write_secret_key
from inside.mirror import AuditMirror

OUT_KEY = SecretKey("ed25519", bytes(range(1, 33)))
IN_KEY = SecretKey("ed25519", bytes(range(100, 132)))
DROP = Subject.clerk_folder("/srv/ferry/drop/docs", "files/docs")
DAY = 86_400 * 1_000_000  # microseconds


def _item(log: str, n: int) -> str:
    return f"{log}{n:031x}"


def _obj(item: str, seq: int, *, name: str | None = None, path: str | None = None) -> AuditObject:
    return AuditObject(kind="file", item=item, channel="files/docs", seq=seq, name=name, path=path)


def _outside(directory: Path, origin: str, name: str, items: int) -> AuditLog:
    """An outside log that accepted ``items`` items (a few checkpoints), left open."""
    settings = AuditSettings(origin=origin, side="outside", checkpoint_every=4)
    log = AuditLog(directory, OUT_KEY, settings)
    for n in range(1, items + 1):
        item = _item(name, n)
        log.append("intake.accepted", subject=DROP, obj=_obj(item, n, name=f"{n}.txt"), corr=item)
        log.append("transfer.sent", subject=Subject.component("sender"), obj=_obj(item, n),
                   detail={"send": 1, "of": 1}, corr=item)  # fmt: skip
    return log


def _deliver(audit: AgentAudit, item: str, seq: int) -> None:
    audit.record("transfer.received", subject=Subject("peer", "a1b2c3d4"), obj=_obj(item, seq),
                 corr=item)  # fmt: skip
    audit.record("delivery.delivered", subject=Subject.component("delivery"),
                 obj=_obj(item, seq, path=f"/srv/ferry/in/{item}"), corr=item)  # fmt: skip


def _ship(src: Path, mirror: AuditMirror) -> None:
    for _, segment in list_segments(src):
        mirror.receive(f"{segment.name}@0", segment.read_bytes())
    mirror.receive(f"{CHECKPOINTS_FILE}@0", (src / CHECKPOINTS_FILE).read_bytes())


class Rebuilt:
    """The inside's log, the old log's copy set aside (and a stale copy of it), the new
    log's mirror, and the item ids of each."""

    def __init__(self, root: Path, old_origin: str, new_origin: str) -> None:
        write_secret_key(root / "in.key", IN_KEY, "audit")
        (root / "inside.yaml").write_text("# test\n")
        (root / "state").mkdir()
        params = AuditParams(dir=root / "inside-audit", key=root / "in.key")
        audit = AgentAudit(params, "inside", root / "state", root / "inside.yaml")
        self.inside = root / "inside-audit"
        # the old outside accepts 12 items; the inside receives 1..10 (11 and 12 were
        # accepted but never sent when the disk was lost)
        old = _outside(root / "old", old_origin, "a", 6)
        old.checkpoint()
        self.stale = root / "old-copy-from-a-backup"  # an early copy of the old log
        shutil.copytree(root / "old", self.stale)
        for n in range(7, 13):
            item = _item("a", n)
            old.append("intake.accepted", subject=DROP, obj=_obj(item, n), corr=item)
        old.close()
        for n in range(1, 11):
            _deliver(audit, _item("a", n), n)
        mirror = AuditMirror(root / "mirror", OUT_KEY.public, audit)
        _ship(root / "old", mirror)
        assert mirror.broken is None
        old_witnessed = mirror.witnessed
        # the disk is lost: a new outside log; the inside receives its item 1, not 2
        new = _outside(root / "new", new_origin, "b", 2)
        new.close()
        _deliver(audit, _item("b", 1), 1)
        self.kept = root / "mirror.before-rebuild"  # step 3: the copy set aside
        (root / "mirror").rename(self.kept)
        self.mirror = root / "mirror"
        mirror = AuditMirror(self.mirror, OUT_KEY.public, audit)
        _ship(root / "new", mirror)
        assert mirror.broken is None
        assert 0 < mirror.witnessed < old_witnessed  # (a smaller checkpoint: another log)
        audit.close()
        self.now = time.time_ns() // 1000 + DAY

    def reconcile(self, outside: Path) -> Reconciliation:
        key = OUT_KEY.public.to_string()
        locations = Locations(
            outside=LogLocation("outside", outside, key, mirror=True),
            inside=LogLocation("inside", self.inside, IN_KEY.public.to_string()),
        )
        checks, result = reconcile_logs(locations, now_us=self.now)
        assert [c.note for c in checks] == ["verified", "verified"]
        assert result is not None
        # (read unverified, the same facts)
        plain = reconcile(outside, self.inside, now_us=self.now, limits=(None, None))
        assert [d.code for d in plain.discrepancies] == [d.code for d in result.discrepancies]
        return result


ORIGINS = {
    "same keys, same origin": ("outside.test/audit", "outside.test/audit"),
    "another origin (an audit key rotated before the loss)": ("ferry/outside/1", "ferry/outside/2"),
}


@pytest.fixture(scope="module", params=list(ORIGINS))
def rebuilt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Rebuilt:
    old, new = ORIGINS[request.param]
    return Rebuilt(tmp_path_factory.mktemp("rebuilt"), old, new)


def states(r: Reconciliation) -> dict[str, str]:
    return {s.item: s.state for s in [*r.accepted, *r.unexplained]}


def test_the_old_logs_copy_says_the_inside_witnesses_another_log_now(rebuilt: Rebuilt) -> None:
    """The copy set aside accounts for the old log's items, and says that it is an old log:
    the new log's items (here one delivered, one accepted and never sent) are not accounted
    for by this run. They passed silently before: the one delivered arrived within minutes
    of the copy's last record ("mirror lag"), the other is in no log read."""
    r = rebuilt.reconcile(rebuilt.kept)
    found = states(r)
    assert found[_item("a", 11)] == found[_item("a", 12)] == "missing"
    assert [found[_item("a", n)] for n in range(1, 11)] == ["delivered"] * 10
    assert found[_item("b", 1)] == "not_yet_in_outside_log"
    assert [d.code for d in r.discrepancies] == ["OUTSIDE_LOG_SUPERSEDED"]
    message = r.discrepancies[0].message
    assert "the outside log given is an older log than the one the inside witnesses now" in (
        message
    )
    assert "what that log accepted is not accounted for by this run" in message


def test_the_new_logs_mirror_is_reconciled_as_before(rebuilt: Rebuilt) -> None:
    """The log the inside witnesses now: checked against its own checkpoints only."""
    r = rebuilt.reconcile(rebuilt.mirror)
    found = states(r)
    assert found[_item("b", 1)] == "delivered"
    assert found[_item("b", 2)] == "missing"
    # (the old log's items are its copy's to account for: they arrived before the new log's
    # first record, here within seconds of it)
    assert {found[_item("a", n)] for n in range(1, 11)} == {"not_yet_in_outside_log"}
    assert r.discrepancies == []


def test_a_stale_copy_of_the_old_log_is_behind_what_the_inside_witnessed_of_it(
    rebuilt: Rebuilt,
) -> None:
    """Checked against the log it is a copy of (the old one), not the new log's smaller
    checkpoints: before, those hid that the copy lacks what the old log recorded after it."""
    r = rebuilt.reconcile(rebuilt.stale)
    assert [d.code for d in r.discrepancies] == ["OUTSIDE_LOG_SUPERSEDED", "OUTSIDE_LOG_BEHIND"]
    assert "of the outside log" in r.discrepancies[1].message
    assert "an old or rolled-back copy" in r.discrepancies[1].message


def test_what_is_kept_of_the_witness_records_does_not_grow() -> None:
    """One witnessed checkpoint a minute is half a million a year: only each log's summary
    is kept, and the current log's due size."""
    stats = LogStats("inside", "-")
    stats.witness_cutoff = "2026-11-21T10:00:00.000000Z"
    for n in range(1, 5001):
        ts = f"2026-11-21T{9 + n // 3600:02d}:{n // 60 % 60:02d}:{n % 60:02d}.000000Z"
        detail = {"origin": "o", "size": 10 * n, "root": f"{n:064x}"}
        note_audit_record(stats, {"event": "audit.witnessed", "ts": ts, "detail": detail})
    assert stats.witnessing is not None
    assert stats.witnessing.size == 50_000
    assert stats.witnessing.due == ("2026-11-21T10:00:00.000000Z", 36_000)
    kept = [v for v in vars(stats).values() if isinstance(v, (list, dict, set, tuple))]
    assert all(len(v) <= 8 for v in kept)  # (witnessed_origins: at most 8)

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

import ferry.audit.log as audit_log
from ferry.audit import AuditLog, AuditObject, AuditSettings, Subject
from ferry.audit.agent import AgentAudit
from ferry.audit.locate import Locations, LogLocation
from ferry.audit.reconcile import Reconciliation, reconcile, reconcile_logs, render_text
from ferry.audit.segments import CHECKPOINTS_FILE, list_segments
from ferry.audit.timeline import LogStats, note_audit_record
from ferry.audit.verify import verify
from ferry.audit.witnessed import MAX_WITNESSED_LOGS, Point, Witnessed
from ferry.config_types import AuditParams
from ferry.crypto.keys import SecretKey, write_secret_key
from inside.mirror import AuditMirror, MirrorRejected

OUT_KEY = SecretKey("ed25519", bytes(range(1, 33)))
IN_KEY = SecretKey("ed25519", bytes(range(100, 132)))
DROP = Subject.clerk_folder("/srv/ferry/drop/docs", "files/docs")
DAY = 86_400 * 1_000_000  # microseconds


def _item(log: str, n: int) -> str:
    return f"{log}{n:031x}"


def _obj(item: str, seq: int, *, name: str | None = None, path: str | None = None) -> AuditObject:
    return AuditObject(kind="file", item=item, channel="files/docs", seq=seq, name=name, path=path)


def _open(directory: Path, origin: str = "outside.test/audit", every: int = 4) -> AuditLog:
    settings = AuditSettings(origin=origin, side="outside", checkpoint_every=every)
    return AuditLog(directory, OUT_KEY, settings)


def _accept(log: AuditLog, item: str, n: int, *, sent: bool = True) -> None:
    log.append("intake.accepted", subject=DROP, obj=_obj(item, n, name=f"{n}.txt"), corr=item)
    if sent:
        log.append("transfer.sent", subject=Subject.component("sender"), obj=_obj(item, n),
                   detail={"send": 1, "of": 1}, corr=item)  # fmt: skip


def _run(directory: Path, numbers: range, *, unsent_from: int | None = None) -> None:
    """The outside runs once more on ``directory``: it accepts items a<n> (sent, unless from
    ``unsent_from`` on), then stops."""
    log = _open(directory)
    for n in numbers:
        _accept(log, _item("a", n), n, sent=unsent_from is None or n < unsent_from)
    log.close()


def _outside(directory: Path, origin: str, name: str, items: int) -> AuditLog:
    """An outside log that accepted ``items`` items (a few checkpoints), left open."""
    log = _open(directory, origin)
    for n in range(1, items + 1):
        _accept(log, _item(name, n), n)
    return log


def _inside(root: Path) -> AgentAudit:
    """The inside's audit (started again if it was before)."""
    if not (root / "in.key").exists():
        write_secret_key(root / "in.key", IN_KEY, "audit")
        (root / "inside.yaml").write_text("# test\n")
        (root / "state").mkdir()
    params = AuditParams(dir=root / "inside-audit", key=root / "in.key")
    return AgentAudit(params, "inside", root / "state", root / "inside.yaml")


def _reconcile(
    outside: Path, inside: Path, now: int, *, unsigned: bool = False, mirror: bool = True
) -> Reconciliation:
    """reconcile_logs (verified), and the same facts read unverified."""
    key = OUT_KEY.public.to_string()
    locations = Locations(
        outside=LogLocation("outside", outside, key, mirror=mirror),
        inside=LogLocation("inside", inside, IN_KEY.public.to_string()),
    )
    checks, result = reconcile_logs(locations, now_us=now, unsigned=unsigned)
    assert [c.note.split(" (")[0] for c in checks] == ["verified", "verified"]
    assert result is not None
    limits = (None, None) if unsigned else tuple(c.limit for c in checks)
    plain = reconcile(outside, inside, now_us=now, limits=limits)  # type: ignore[arg-type]
    assert [d.code for d in plain.discrepancies] == [d.code for d in result.discrepancies]
    return result


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
        audit = _inside(root)
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
        return _reconcile(outside, self.inside, self.now)


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
    is kept (its first, due and last checkpoints), and at most MAX_WITNESSED_LOGS logs."""
    stats = LogStats("inside", "-")
    stats.witnessed.cutoff = "2026-11-21T10:00:00.000000Z"
    for n in range(1, 5001):
        ts = f"2026-11-21T{9 + n // 3600:02d}:{n // 60 % 60:02d}:{n % 60:02d}.000000Z"
        detail = {"origin": "o", "size": 10 * n, "root": f"{n:064x}"}
        note_audit_record(stats, {"event": "audit.witnessed", "ts": ts, "detail": detail})
    (log,) = stats.witnessed.logs
    assert log.size == 50_000
    assert log.due == Point("2026-11-21T10:00:00.000000Z", 36_000, f"{3600:064x}")
    assert len(list(log.points())) == 3
    assert stats.witnessed.sizes() == {10, 36_000, 50_000}
    kept = [v for v in vars(stats).values() if isinstance(v, (list, dict, set, tuple))]
    assert all(len(v) <= 8 for v in kept)  # (witnessed_origins: at most 8)
    # an outside that presents a new log at every checkpoint (a smaller or another root)
    for n in range(1, 3 * MAX_WITNESSED_LOGS):
        detail = {"origin": "o", "size": 3, "root": f"{n:064x}"}
        rec = {"event": "audit.witnessed", "ts": "2026-11-21T12:00:00.000000Z", "detail": detail}
        note_audit_record(stats, rec)
    assert len(stats.witnessed.logs) == MAX_WITNESSED_LOGS
    assert stats.witnessed.count == 3 * MAX_WITNESSED_LOGS
    assert stats.witnessed.left_out == 2 * MAX_WITNESSED_LOGS


# --- an outside restored from a backup or snapshot, a forked log -----------------------------


def _codes(r: Reconciliation) -> list[str]:
    return [d.code for d in r.discrepancies]


def test_an_outside_restored_from_a_snapshot_is_another_log(tmp_path: Path) -> None:
    """An outside restored from a backup or a snapshot of its disk (not wiped) goes on from
    the old log's first records: its first checkpoint is the old log's. The log read was
    known by its first checkpoint, and taken for the last witnessed log that had it, the new
    one: the old log's copy set aside passed (exit 0) with the new log's items in no log
    read, and a stale copy of the old log was compared with the new log's checkpoints (no
    OUTSIDE_LOG_BEHIND), its items witnessed and never arrived in no log read."""
    audit = _inside(tmp_path)
    old = tmp_path / "outside"
    _run(old, range(1, 5))
    shutil.copytree(old, tmp_path / "snapshot")
    _run(old, range(5, 9))
    stale = tmp_path / "stale-copy"
    shutil.copytree(old, stale)
    _run(old, range(9, 13), unsent_from=9)  # accepted, never sent: lost with the disk
    for n in range(1, 9):
        _deliver(audit, _item("a", n), n)
    mirror = AuditMirror(tmp_path / "mirror", OUT_KEY.public, audit)
    _ship(old, mirror)
    assert mirror.broken is None
    restored = tmp_path / "restored"
    shutil.copytree(tmp_path / "snapshot", restored)
    log = _open(restored)
    _accept(log, _item("b", 1), 101)
    _accept(log, _item("b", 2), 102, sent=False)  # accepted, never arrives
    log.close()
    _deliver(audit, _item("b", 1), 101)
    kept = tmp_path / "mirror.before-restore"  # (docs/OPERATIONS.md, step 3)
    (tmp_path / "mirror").rename(kept)
    mirror = AuditMirror(tmp_path / "mirror", OUT_KEY.public, audit)
    _ship(restored, mirror)
    assert mirror.broken is None
    audit.close()
    now = time.time_ns() // 1000 + DAY

    r = _reconcile(kept, tmp_path / "inside-audit", now)
    assert _codes(r) == ["OUTSIDE_LOG_SUPERSEDED"]
    found = states(r)
    assert [found[_item("a", n)] for n in range(9, 13)] == ["missing"] * 4
    assert found[_item("b", 1)] == "not_yet_in_outside_log"
    r = _reconcile(stale, tmp_path / "inside-audit", now)
    assert _codes(r) == ["OUTSIDE_LOG_SUPERSEDED", "OUTSIDE_LOG_BEHIND"]
    assert f"witnessed checkpoint {verify(kept).last_checkpoint} of" in r.discrepancies[1].message
    r = _reconcile(tmp_path / "mirror", tmp_path / "inside-audit", now)  # (the daily job)
    assert _codes(r) == []
    assert states(r)[_item("b", 2)] == "missing"


def test_an_outside_log_that_forks_from_the_one_witnessed_is_a_discrepancy(
    tmp_path: Path,
) -> None:
    """Only the number of records was compared with the checkpoints the inside witnessed,
    never their roots: an outside log that shares the first records of the log witnessed
    and then goes another way (an outside rolled back to a snapshot and run on, or a log
    re-signed by whoever holds its key without the acceptances to hide) passed once it was
    long enough (exit 0), and the mirror's refusal of it (audit.witness_inconsistent) was
    not read. Then the mirror is set aside and the fork mirrored from its start, as after a
    rebuild: it is the log witnessed now, and the refusal is a note, not a discrepancy."""
    audit = _inside(tmp_path)
    out = tmp_path / "outside"
    log = _open(out)
    for n in range(1, 5):
        _accept(log, _item("a", n), n)
    log.close()
    shutil.copytree(out, tmp_path / "snapshot")
    log = _open(out)
    for n in range(5, 13):  # accepted, not sent yet
        _accept(log, _item("a", n), n, sent=False)
    log.close()
    for n in range(1, 5):
        _deliver(audit, _item("a", n), n)
    mirror = AuditMirror(tmp_path / "mirror", OUT_KEY.public, audit)
    _ship(out, mirror)
    witnessed = mirror.witnessed
    shutil.rmtree(out)
    shutil.copytree(tmp_path / "snapshot", out)
    log = _open(out)
    for n in range(1, 13):
        _accept(log, _item("b", n), 100 + n)
    log.close()
    for n in range(1, 13):
        _deliver(audit, _item("b", n), 100 + n)
    with pytest.raises(MirrorRejected):
        _ship(out, mirror)
    assert verify(out, OUT_KEY.public).tree_size > witnessed  # (long enough to pass)
    audit.close()
    now = time.time_ns() // 1000 + DAY
    inside = tmp_path / "inside-audit"

    r = _reconcile(out, inside, now, mirror=False)  # (the outside's own log)
    assert _codes(r) == ["WITNESS_INCONSISTENT", "OUTSIDE_LOG_FORKED"]
    refused, forked = (d.message for d in r.discrepancies)
    assert "has witnessed none of its checkpoints since (1 refusal(s)" in refused
    assert f"the inside witnessed checkpoint {witnessed} of 'outside.test/audit'" in forked
    assert f"but the first {witnessed} records of the log given hash to another root" in forked
    assert "a fork" in forked

    (tmp_path / "mirror").rename(tmp_path / "mirror.before-fork")
    audit = _inside(tmp_path)
    mirror = AuditMirror(tmp_path / "mirror", OUT_KEY.public, audit)
    _ship(out, mirror)
    assert mirror.broken is None
    audit.close()
    r = _reconcile(tmp_path / "mirror", inside, now)
    assert _codes(r) == []
    text = "\n".join(render_text(r))
    assert "its witness refused the outside's log 1 time(s)" in text
    assert r.to_json()["read"][1]["witness_refusals"] == 1
    # the old log's copy: the log witnessed before, whose a5..a12 never arrived
    r = _reconcile(tmp_path / "mirror.before-fork", inside, now)
    assert _codes(r) == ["OUTSIDE_LOG_SUPERSEDED"]
    assert {states(r)[_item("a", n)] for n in range(5, 13)} == {"missing"}


def test_a_new_log_not_smaller_than_the_old_ones_last_checkpoint_is_another_log(
    tmp_path: Path,
) -> None:
    """Every log's first checkpoint is signed as it opens, at the same size. An old log
    witnessed only up to it (lost within its first minute) was merged with the next log,
    whose first checkpoint is not smaller: its copy was not OUTSIDE_LOG_SUPERSEDED."""
    audit = _inside(tmp_path)
    log = _open(tmp_path / "old", every=1000)
    _accept(log, _item("a", 1), 1)
    log.wait_durable(log.size - 1)  # (the disk is lost here: never closed)
    mirror = AuditMirror(tmp_path / "mirror", OUT_KEY.public, audit)
    _ship(tmp_path / "old", mirror)
    first = mirror.witnessed
    _deliver(audit, _item("a", 1), 1)
    kept = tmp_path / "mirror.before-rebuild"
    (tmp_path / "mirror").rename(kept)
    new = _open(tmp_path / "new", every=1000)
    _accept(new, _item("b", 1), 1)
    _accept(new, _item("b", 2), 2, sent=False)
    new.close()
    _deliver(audit, _item("b", 1), 1)
    mirror = AuditMirror(tmp_path / "mirror", OUT_KEY.public, audit)
    _ship(tmp_path / "new", mirror)
    assert mirror.broken is None
    assert mirror.witnessed >= first
    audit.close()
    now = time.time_ns() // 1000 + 5 * 60 * 1_000_000  # (within 10 minutes: no BEHIND)
    r = _reconcile(kept, tmp_path / "inside-audit", now, unsigned=True)
    assert _codes(r) == ["OUTSIDE_LOG_SUPERSEDED"]
    assert f"(up to checkpoint {first})" in r.discrepancies[0].message
    r = _reconcile(tmp_path / "mirror", tmp_path / "inside-audit", now, unsigned=True)
    assert _codes(r) == []


def test_the_same_log_mirrored_again_from_its_start_is_one_log(tmp_path: Path) -> None:
    """A mirror set aside and the same log shipped again (the witness takes its notes again
    from the first): one log once the witness reaches the last checkpoint witnessed before.
    Neither copy is an older log than the one witnessed now."""
    audit = _inside(tmp_path)
    out = tmp_path / "outside"
    _outside(out, "outside.test/audit", "a", 6).close()
    for n in range(1, 7):
        _deliver(audit, _item("a", n), n)
    mirror = AuditMirror(tmp_path / "mirror", OUT_KEY.public, audit)
    _ship(out, mirror)
    (tmp_path / "mirror").rename(tmp_path / "mirror.aside")
    mirror = AuditMirror(tmp_path / "mirror", OUT_KEY.public, audit)
    _ship(out, mirror)
    audit.close()
    now = time.time_ns() // 1000 + DAY
    for copy in (tmp_path / "mirror.aside", tmp_path / "mirror"):
        r = _reconcile(copy, tmp_path / "inside-audit", now)
        assert _codes(r) == []
        assert r.stats[1].witnessed.count == 1


def _witnessed(*logs: list[tuple[str, int, str]]) -> Witnessed:
    """Witness records of outside logs one after the other: (ts, size, root) each."""
    w = Witnessed(cutoff="2026-01-01T00:10:00.000000Z")
    for points in logs:
        for ts, size, root in points:
            w.note(ts, "outside.test/audit", size, root)
    return w


OLD = [("2026-01-01T00:00:00.000000Z", 3, "a" * 64), ("2026-01-01T00:01:00.000000Z", 38, "b" * 64)]
YOUNG = [
    ("2026-01-01T00:20:00.000000Z", 3, "a" * 64),
    ("2026-01-01T00:21:00.000000Z", 25, "c" * 64),
]


def test_a_log_holding_the_last_checkpoint_witnessed_now_is_the_log_witnessed_now() -> None:
    """The same log shipped again to a new mirror, which has reached the old mirror's end
    before the inside signed its witness of it that far: it holds the old run's largest
    checkpoint, but also everything witnessed of the current run, so it is the log witnessed
    now (it was taken for the older run: a false OUTSIDE_LOG_SUPERSEDED on the daily job)."""
    w = _witnessed(OLD, [OLD[0], ("2026-01-01T00:20:00.000000Z", 20, "d" * 64)])
    assert w.count == 2
    identity = w.identify({3: "a" * 64, 20: "d" * 64, 38: "b" * 64}, 38)
    assert identity.log is w.current
    assert identity.earlier is None


def test_a_copy_of_what_two_logs_share_is_behind_the_earlier_one_while_the_newer_is_young() -> None:
    """An outside restored from a snapshot: its new log (witnessed minutes ago, nothing of it
    due yet) begins like the old one. A stale copy of the old log holding only those shared
    records was taken for the new log and passed; while nothing witnessed tells them apart
    it is behind the old log's due checkpoint."""
    w = _witnessed(OLD, YOUNG)
    identity = w.identify({3: "a" * 64}, 10)
    assert identity.log is w.current
    assert identity.earlier is w.logs[0]
    # the old log's full copy is the old log (it contradicts the new one's last checkpoint)
    full = w.identify({3: "a" * 64, 25: "e" * 64, 38: "b" * 64}, 38)
    assert full.log is w.logs[0]
    assert full.earlier is None
    # the new log's mirror holds all that was witnessed of it: only while none of it is due
    # is it still possibly a stale copy of the old log
    mirror = {3: "a" * 64, 25: "c" * 64}
    assert w.identify(mirror, 25).earlier is w.logs[0]
    w = _witnessed(OLD, [(YOUNG[0][0].replace("00:20", "00:05"), 3, "a" * 64), YOUNG[1]])
    assert w.current is not None
    assert w.current.due is not None
    assert w.identify(mirror, 25).earlier is None
    assert w.identify({3: "a" * 64}, 10).earlier is w.logs[0]  # (the stale copy: still)


def test_a_stale_backup_after_a_restore_is_behind_until_the_new_log_has_a_checkpoint_due(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole path with the real writers, mirror and witness: the old log witnessed three
    hours ago, the restored outside's log witnessed a minute ago, a backup of the old log
    taken before the snapshot point reconciled right away (exit 0 before)."""
    offset = [-3 * 3600 * 1_000_000]
    monkeypatch.setattr(audit_log, "_now_us", lambda: time.time_ns() // 1000 + offset[0])
    audit = _inside(tmp_path)
    out = tmp_path / "outside"
    _run(out, range(1, 3))
    shutil.copytree(out, tmp_path / "backup")
    _run(out, range(3, 5))
    shutil.copytree(out, tmp_path / "snapshot")
    _run(out, range(5, 13), unsent_from=9)
    for n in range(1, 9):
        _deliver(audit, _item("a", n), n)
    mirror = AuditMirror(tmp_path / "mirror", OUT_KEY.public, audit)
    _ship(out, mirror)
    offset[0] = -60 * 1_000_000
    shutil.copytree(tmp_path / "snapshot", tmp_path / "restored")
    log = _open(tmp_path / "restored")
    _accept(log, _item("b", 1), 101)
    log.close()
    _deliver(audit, _item("b", 1), 101)
    (tmp_path / "mirror").rename(tmp_path / "mirror.before-restore")
    mirror = AuditMirror(tmp_path / "mirror", OUT_KEY.public, audit)
    _ship(tmp_path / "restored", mirror)
    assert mirror.broken is None
    audit.close()
    now = time.time_ns() // 1000
    r = _reconcile(tmp_path / "backup", tmp_path / "inside-audit", now)
    assert "OUTSIDE_LOG_BEHIND" in _codes(r)
    assert any("stale copy of that earlier log" in d.message for d in r.discrepancies)


def test_witness_records_in_an_outside_log_are_not_read() -> None:
    """Only the inside's witness writes audit.witnessed and audit.witness_inconsistent: in an
    outside log they are forged, and counted nothing (they showed as witness refusals)."""
    for side, expected in (("outside", 0), ("inside", 1)):
        st = LogStats(side, "/x")
        note_audit_record(st, {"event": "audit.witness_inconsistent", "ts": "t", "detail": {}})
        note_audit_record(
            st,
            {"event": "audit.witnessed", "ts": "t",
             "detail": {"origin": "o", "size": 5, "root": "ab" * 32}},
        )  # fmt: skip
        assert st.witnessed.refused == expected
        assert st.witnessed.count == expected

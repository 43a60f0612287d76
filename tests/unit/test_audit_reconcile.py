"""ferry.audit.reconcile and ``ferry audit reconcile``: the accounting rule of docs/AUDIT.md §7."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from audit_scenario import IN_KEY, OUT_KEY, T0, Builder, S, Standard, configs, item_id, standard

from ferry.audit import AuditLog, AuditSettings, verify
from ferry.audit import cli as audit_cli
from ferry.audit import reconcile as reconcile_mod
from ferry.audit import report as report_mod
from ferry.audit.locate import locate
from ferry.audit.reconcile import Reconciliation, reconcile, stream_json
from ferry.audit.reconcile import render_text as render
from ferry.audit.record import AuditObject, Subject, format_ts
from ferry.audit.timeline import LogStats


@pytest.fixture(scope="module")
def scn(tmp_path_factory: pytest.TempPathFactory) -> Standard:
    return standard(tmp_path_factory.mktemp("scenario"))


@pytest.fixture(scope="module")
def result(scn: Standard) -> Reconciliation:
    return reconcile(scn.outside, scn.inside, now_us=scn.now, grace=600)


def states(r: Reconciliation) -> dict[str, str]:
    return {s.item: s.state for s in [*r.accepted, *r.unexplained]}


def test_every_accepted_item_ends_in_exactly_one_state(
    scn: Standard, result: Reconciliation
) -> None:
    by_name = {name: states(result)[item] for name, item in scn.items.items()}
    assert by_name == {
        "delivered": "delivered",
        "cleaned": "delivered",
        "gone": "delivered",
        "hostile": "delivered",
        "verdict_rejected": "rejected",
        "inside_rejected": "rejected",
        "all_lost": "missing",
        "gave_up": "missing",
        "stuck": "missing",
        "in_flight": "in_flight",
        "unexplained": "unexplained",
    }
    assert result.counts() == {"delivered": 4, "rejected": 2, "in_flight": 1, "missing": 3}
    assert len(result.accepted) == 10
    assert sum(result.accountant.intake_rejected.values()) == 2


def test_a_transfer_whose_packets_were_all_suppressed_is_missing(
    scn: Standard, result: Reconciliation
) -> None:
    [lost] = [s for s in result.accepted if s.item == scn.items["all_lost"]]
    assert lost.state == "missing"
    assert lost.sends == 2
    assert lost.received_ts is None
    assert lost.evidence[0] == "sent 2 time(s), never received inside"
    assert any(
        e.startswith("overtaken: a later item of its channel (seq 9)") for e in lost.evidence
    )


def test_rejections_carry_their_reason(scn: Standard, result: Reconciliation) -> None:
    rejected = {s.item: s for s in result.by_state("rejected")}
    verdict = rejected[scn.items["verdict_rejected"]]
    assert (verdict.rejected_by, verdict.reason) == ("verdict", "MACRO: VBA macros in the document")
    inside = rejected[scn.items["inside_rejected"]]
    assert (inside.rejected_by, inside.reason) == ("delivery", "TYPE: not a PDF")


def test_sequence_gap_and_lost_are_evidence(scn: Standard, result: Reconciliation) -> None:
    [gap] = result.gaps
    assert (gap.channel, gap.first, gap.last, gap.unknown) == ("files/permits", 8, 8, 0)
    assert gap.items == (scn.items["gave_up"],)
    [gave_up] = [s for s in result.accepted if s.item == scn.items["gave_up"]]
    assert gave_up.evidence[0] == "inside gave up on it (LOST: timeout; 3 of 8 blocks decoded)"
    assert any("sequence gap 8..8" in e for e in gave_up.evidence)
    [stuck] = [s for s in result.accepted if s.item == scn.items["stuck"]]
    assert stuck.evidence == ["received inside at 2026-11-21T09:08:03.000000Z, never delivered"]


def test_unexplained_arrival_is_a_discrepancy(scn: Standard, result: Reconciliation) -> None:
    assert [(d.code, d.item) for d in result.discrepancies] == [
        ("UNEXPLAINED_ARRIVAL", scn.items["unexplained"])
    ]


def test_grace_and_now_decide_in_flight_against_missing(scn: Standard) -> None:
    early = reconcile(scn.outside, scn.inside, now_us=T0 + 9 * 60 * S, grace=600)
    assert early.counts()["missing"] == 0
    late = reconcile(scn.outside, scn.inside, now_us=scn.now + 3600 * S, grace=600)
    assert late.counts()["missing"] == 4  # in_flight is now past the grace period too
    nograce = reconcile(scn.outside, scn.inside, now_us=scn.now, grace=0)
    assert nograce.counts()["in_flight"] == 0


def test_text_output_is_escaped_and_names_the_result(result: Reconciliation) -> None:
    text = "\n".join(render(result))
    assert "MISSING: accepted more than 600 s ago" in text
    assert "RESULT: 3 item(s) MISSING" in text
    assert "\x1b" not in text
    assert "UNEXPLAINED_ARRIVAL" in text


def test_json_is_deterministic(scn: Standard) -> None:
    a = reconcile(scn.outside, scn.inside, now_us=scn.now).to_json()
    b = reconcile(scn.outside, scn.inside, now_us=scn.now).to_json()
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert a["counts"]["missing"] == 3
    assert a["now"] == "2026-11-21T10:00:00.000000Z"
    assert [m["item"] for m in a["missing"]] == [item_id(0xA006), item_id(0xA007), item_id(0xA008)]


def _clean(root: Path, n: int = 3) -> Builder:
    b = Builder(root)
    for i in range(n):
        item, t = item_id(i + 1), T0 + i * 60 * S
        b.accept(item, t, seq=i + 1)
        b.verdict(item, t + S, seq=i + 1)
        b.send(item, t + 2 * S, seq=i + 1)
        b.receive(item, t + 3 * S, seq=i + 1)
        b.recheck(item, t + 4 * S, seq=i + 1)
        b.deliver(item, t + 5 * S, seq=i + 1, path=f"/nonexistent/{i}", content=b"x")
    return b


def test_discrepancies(tmp_path: Path) -> None:
    b = _clean(tmp_path)
    t = T0 + 10 * 60 * S
    # sent and received with different hashes; both delivered and rejected inside
    b.accept(item_id(10), t, seq=4)
    b.send(item_id(10), t + S, seq=4, sha="aa" * 32)
    b.receive(item_id(10), t + 2 * S, seq=4, sha="bb" * 32)
    b.deliver(item_id(10), t + 3 * S, seq=4, path="/nonexistent/10", content=b"y")
    b.reject_inside(item_id(10), t + 4 * S, seq=4, reason="TYPE: late refusal")
    # accepted twice; outside records with no acceptance
    b.accept(item_id(11), t, seq=5)
    b.accept(item_id(11), t + S, seq=5)
    b.verdict(item_id(11), t + 2 * S, seq=5, reject="SIZE: too big")
    b.send(item_id(12), t, seq=6)
    outside, inside = b.write()
    r = reconcile(outside, inside, now_us=t + 3600 * S)
    codes = sorted((d.code, d.item) for d in r.discrepancies)
    assert codes == [
        ("ACCEPTED_TWICE", item_id(11)),
        ("CONFLICTING_OUTCOME", item_id(10)),
        ("HASH_CONFLICT", item_id(10)),
        ("NOT_ACCEPTED", item_id(12)),
    ]
    assert states(r)[item_id(10)] == "delivered"
    assert r.missing == 0


def _rejected_inside(b: Builder, *ns: int) -> None:
    """Items ``ns`` accepted, sent, received, then refused by the inside re-check."""
    for n in ns:
        item, t = item_id(n), T0 + n * 60 * S
        b.accept(item, t, seq=n)
        b.send(item, t + S, seq=n)
        b.receive(item, t + 2 * S, seq=n)
        b.reject_inside(item, t + 3 * S, seq=n, reason="TYPE: not a PDF")


def test_an_inside_rejection_released_by_the_security_admin_counts_as_delivered(
    tmp_path: Path,
) -> None:
    b = _clean(tmp_path, n=0)
    admin = Subject.user("security-admin:0123abcd")
    _rejected_inside(b, 1, 2, 3)
    obj = AuditObject(kind="file", item=item_id(1), channel="files/permits")
    b.add("inside", T0 + 600 * S, "quarantine.released", subject=admin, obj=obj, corr=item_id(1))
    forged = AuditObject(kind="file", item=item_id(2), channel="files/permits")
    b.add(  # a line not signed by the admin key: recorded as a failure, never trusted
        "inside",
        T0 + 601 * S,
        "quarantine.released",
        subject=Subject.user("security-admin:unknown"),
        result="failure",
        reason="BAD_SIGNATURE: a release line not signed by the admin key",
        obj=forged,
        corr=item_id(2),
    )
    outside, inside = b.write()
    r = reconcile(outside, inside, now_us=T0 + 3600 * S)
    assert states(r) == {item_id(1): "delivered", item_id(2): "rejected", item_id(3): "rejected"}
    assert r.discrepancies == []  # a release is not a conflicting outcome
    [released] = r.released
    assert released.item == item_id(1)
    assert released.released_by == "user:security-admin:0123abcd"
    assert released.released_ts == format_ts(T0 + 600 * S)
    assert released.reason == "TYPE: not a PDF"
    assert "released from quarantine by user:security-admin:0123abcd" in released.evidence[0]
    doc = r.to_json()
    assert [x["item"] for x in doc["released"]] == [item_id(1)]
    assert doc["counts"]["delivered"] == 1
    text = "\n".join(render(r))
    assert "delivered 1 (released from quarantine 1)" in text
    assert "RELEASED FROM QUARANTINE" in text


def test_a_released_item_is_delivered_where_its_release_record_says(tmp_path: Path) -> None:
    """An inside release writes delivery.delivered (subject the security admin) after
    quarantine.released: delivered at that path, no conflict. The same record for an
    item nobody released is still a conflicting outcome."""
    b = _clean(tmp_path, n=0)
    admin = Subject.user("security-admin:0123abcd")
    content = b"%PDF-1.7 released"
    _rejected_inside(b, 1, 2)
    obj = AuditObject(kind="file", item=item_id(1), channel="files/permits")
    b.add("inside", T0 + 600 * S, "quarantine.released", subject=admin, obj=obj, corr=item_id(1))
    for n, t in ((1, T0 + 601 * S), (2, T0 + 602 * S)):
        delivered = AuditObject(
            kind="file",
            item=item_id(n),
            channel="files/permits",
            path=str(tmp_path / f"released-{n}.pdf"),
            size=len(content),
            sha256=hashlib.sha256(content).hexdigest(),
        )
        detail = {"released": True, "stored_name": f"{item_id(n)}.obj"}
        b.add("inside", t, "delivery.delivered", subject=admin, obj=delivered, detail=detail,
              corr=item_id(n))  # fmt: skip
    outside, inside = b.write()
    r = reconcile(outside, inside, now_us=T0 + 3600 * S)
    assert states(r) == {item_id(1): "delivered", item_id(2): "delivered"}
    assert [(d.code, d.item) for d in r.discrepancies] == [("CONFLICTING_OUTCOME", item_id(2))]
    [released] = r.released
    assert released.item == item_id(1)
    assert released.delivered_path == str(tmp_path / "released-1.pdf")
    assert released.delivered_sha256 == hashlib.sha256(content).hexdigest()
    assert "released from quarantine by user:security-admin:0123abcd" in released.evidence[0]


def test_an_arrival_ahead_of_the_mirror_is_not_a_discrepancy(tmp_path: Path) -> None:
    b = _clean(tmp_path)
    late = T0 + 4 * 60 * S  # after the outside log's last record, within the grace period
    b.receive(item_id(50), late, seq=50)
    b.deliver(item_id(50), late + S, seq=50, path="/nonexistent/50", content=b"z")
    outside, inside = b.write()
    r = reconcile(outside, inside, now_us=late + 60 * S)
    assert r.discrepancies == []
    assert [s.state for s in r.unexplained] == ["not_yet_in_outside_log"]
    # (a mirror may lag 10 minutes, whatever the grace period of items in flight)
    r = reconcile(outside, inside, now_us=late + 60 * S, grace=0)
    assert r.discrepancies == []
    assert [s.state for s in r.unexplained] == ["not_yet_in_outside_log"]


def test_an_arrival_long_after_the_outside_log_ends_is_a_discrepancy(tmp_path: Path) -> None:
    """An outside log that stopped growing (a mirror the outside no longer ships, an old
    copy) excused every later arrival as mirror lag, without limit."""
    b = _clean(tmp_path)
    late = T0 + 20 * 60 * S  # the outside log's last record: about T0 + 2 min
    b.receive(item_id(50), late, seq=50)
    b.deliver(item_id(50), late + S, seq=50, path="/nonexistent/50", content=b"z")
    outside, inside = b.write()
    # (just arrived: what accepted it may still be on its way to the mirror)
    r = reconcile(outside, inside, now_us=late + 60 * S)
    assert [s.state for s in r.unexplained] == ["not_yet_in_outside_log"]
    assert r.discrepancies == []
    r = reconcile(outside, inside, now_us=late + 11 * 60 * S)
    assert [s.state for s in r.unexplained] == ["after_outside_log"]
    (d,) = r.discrepancies
    assert d.code == "OUTSIDE_LOG_BEHIND"
    assert d.item is None
    assert f"1 item(s) arrived inside from {format_ts(late)}" in d.message
    assert reconcile(outside, inside, now_us=late + 11 * 60 * S, grace=3600).discrepancies == []


def test_an_outside_log_older_than_the_inside_witnessed_is_a_discrepancy(tmp_path: Path) -> None:
    """A rolled-back or stale mirror hides what the outside accepted after it; the inside's
    own signed log says how far it had witnessed the outside's checkpoints."""
    b = _clean(tmp_path)
    outside, _ = b.write()
    records = verify(outside, OUT_KEY.public).tree_size
    roots = verify(outside, OUT_KEY.public, want_roots={3, records - 1}).roots_at

    def witnessed(b: Builder, when: int, size: int, root: str) -> None:
        b.add("inside", when, "audit.witnessed", subject=Subject.component("audit-mirror"),
              obj=AuditObject(kind="checkpoint", size=size),
              detail={"origin": "outside.test/audit", "size": size, "root": root})  # fmt: skip

    b = _clean(tmp_path / "again")
    # (a checkpoint of this log, then a later one the log read does not reach)
    for size, root in ((records - 1, roots[records - 1]), (records + 40, "ab" * 32)):
        witnessed(b, T0 + 3 * 60 * S + size, size, root)
    outside, inside = b.write()
    now = T0 + 3 * 60 * S + records + 40 + 600 * S  # (the grace period after the witness)
    assert reconcile(outside, inside, now_us=now - S).discrepancies == []  # (may be racing)
    r = reconcile(outside, inside, now_us=now)
    (d,) = r.discrepancies
    assert d.code == "OUTSIDE_LOG_BEHIND"
    assert f"witnessed checkpoint {records + 40} of the outside log" in d.message
    assert f"holds {records} records" in d.message

    # After a rebuilt outside the inside witnesses a new log from its start (its mirror moved
    # aside): the old log's checkpoints (another log's: other roots) no longer count against
    # the one now witnessed, the log given.
    b = _clean(tmp_path / "rebuilt")
    for size in (records - 1, records + 40):
        witnessed(b, T0 + 3 * 60 * S + size, size, "ab" * 32)
    witnessed(b, T0 + 5 * 60 * S, 3, roots[3])
    outside, inside = b.write()
    assert reconcile(outside, inside, now_us=now + 600 * S).discrepancies == []


def test_outside_sequence_holes_are_noted(tmp_path: Path) -> None:
    b = _clean(tmp_path)
    b.accept(item_id(60), T0 + 5 * 60 * S, seq=9)  # seqs 4..8 never accepted
    outside, inside = b.write()
    r = reconcile(outside, inside, now_us=T0 + 6 * 60 * S)
    assert r.hole_count == 5
    assert r.holes == [{"channel": "files/permits", "epoch": None, "first": 4, "last": 8}]


# --- the command ------------------------------------------------------------------------------


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = audit_cli.run(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_locate_reads_the_audit_section(tmp_path: Path, scn: Standard) -> None:
    out_cfg, in_cfg = configs(tmp_path, scn)
    outside = locate(out_cfg)
    assert outside.role == "outside"
    assert outside.inside is None
    assert outside.outside is not None
    assert outside.outside.directory == tmp_path / "outside" / "audit"
    assert outside.outside.key == str(tmp_path / "outside" / "keys" / "audit.pub")
    inside = locate(in_cfg)
    assert inside.outside is not None
    assert inside.inside is not None
    assert inside.outside.mirror
    assert inside.outside.directory == tmp_path / "inside" / "audit-outside-mirror"
    assert inside.outside.public_key() == OUT_KEY.public


def test_cli_from_the_inside_config_verifies_then_exits_10_for_missing(
    tmp_path: Path, scn: Standard, capsys: pytest.CaptureFixture[str]
) -> None:
    _, in_cfg = configs(tmp_path, scn)
    now = format_ts(scn.now)
    rc, out, _ = run(["reconcile", "-c", str(in_cfg), "--now", now], capsys)
    assert rc == 10
    assert out.count(": verified;") == 2
    assert "outside log (mirror held inside)" in out
    rc, out, _ = run(["reconcile", "-c", str(in_cfg), "--now", now, "--json"], capsys)
    doc = json.loads(out)
    assert rc == 10
    assert [log["verified"] for log in doc["logs"]] == [True, True]
    assert doc["logs"][0]["tree_size"] > 0
    assert len(doc["items"]) == 10


def test_cli_exit_0_when_all_accounted_and_11_for_a_discrepancy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outside, inside = _clean(tmp_path / "a").write()
    args = ["reconcile", "--outside", str(outside), "--inside", str(inside), "--now", "2026-11-22"]
    rc, out, _ = run(args, capsys)
    assert rc == 0, out
    assert "RESULT: every accepted item is accounted for" in out
    assert "not verified: no public key" in out
    b = _clean(tmp_path / "b")
    b.receive(item_id(77), T0 + S, seq=77)
    outside, inside = b.write()
    args = ["reconcile", "--outside", str(outside), "--inside", str(inside), "--now", "2026-11-22"]
    # within the grace period of the outside log's end: possibly mirror lag, not yet a finding
    assert run(args, capsys)[0] == 0
    rc, out, _ = run([*args, "--grace", "60"], capsys)
    assert rc == 11
    assert "RESULT: nothing missing, 1 discrepancy(ies)" in out


def test_cli_refuses_a_log_that_fails_verification(
    tmp_path: Path, scn: Standard, capsys: pytest.CaptureFixture[str]
) -> None:
    _, in_cfg = configs(tmp_path, scn)
    seg = tmp_path / "inside" / "audit-outside-mirror" / "audit-000001.jsonl"
    data = seg.read_bytes()
    seg.write_bytes(data.replace(b"all_lost.pdf", b"all_lust.pdf"))
    rc, out, err = run(["reconcile", "-c", str(in_cfg)], capsys)
    assert rc == 12
    assert out == ""
    assert "failed verification" in err
    # --no-verify reconciles anyway (the auditor's choice), and says so
    rc, out, _ = run(
        ["reconcile", "-c", str(in_cfg), "--no-verify", "--now", "2026-11-21T10:00"], capsys
    )
    assert rc == 10
    assert "not verified (--no-verify)" in out


def test_cli_usage_errors(
    tmp_path: Path, scn: Standard, capsys: pytest.CaptureFixture[str]
) -> None:
    out_cfg, _ = configs(tmp_path, scn)
    rc, _, err = run(["reconcile", "-c", str(out_cfg)], capsys)
    assert rc == 2
    assert "needs both logs" in err
    assert (
        run(
            [
                "reconcile",
                "--outside",
                str(scn.outside),
                "--inside",
                str(scn.inside),
                "--grace",
                "-1",
            ],
            capsys,
        )[0]
        == 2
    )
    assert run(["reconcile", "-c", str(tmp_path / "missing.yaml")], capsys)[0] == 2
    (tmp_path / "bad.yaml").write_text("role: sideways\n")
    assert run(["reconcile", "-c", str(tmp_path / "bad.yaml")], capsys)[0] == 2


def test_control_objects_are_left_out(tmp_path: Path) -> None:
    from ferry.audit import AuditObject, Subject  # noqa: PLC0415

    b = _clean(tmp_path)
    segment = AuditObject(kind="segment", item=item_id(900), channel="_audit", name="x.jsonl")
    b.add("outside", T0 + S, "transfer.sent", subject=Subject.component("sender"), obj=segment)
    outside, inside = b.write()
    r = reconcile(outside, inside, now_us=T0 + 3600 * S)
    assert r.discrepancies == []
    assert r.control == 1
    assert r.counts()["delivered"] == 3


def test_cli_verify_with_a_config_checks_every_log_it_names(
    tmp_path: Path, scn: Standard, capsys: pytest.CaptureFixture[str]
) -> None:
    out_cfg, in_cfg = configs(tmp_path, scn)
    rc, out, _ = run(["verify", "-c", str(in_cfg)], capsys)
    assert rc == 0
    assert out.count("VERIFIED") == 2
    assert "audit-outside-mirror" in out
    rc, out, _ = run(["verify", "-c", str(out_cfg), "--json"], capsys)
    doc = json.loads(out)
    assert rc == 0
    assert doc["verified"] is True
    assert len(doc["logs"]) == 1
    (tmp_path / "inside" / "keys" / "outside-audit.pub").unlink()  # the mirror's key is gone
    rc, out, err = run(["verify", "-c", str(in_cfg)], capsys)
    assert rc == 2  # (the config names it: an error, never a log read unverified)
    assert "outside-audit.pub" in err
    rc, out, err = run(["reconcile", "-c", str(in_cfg)], capsys)
    assert rc == 2
    assert "outside-audit.pub" in err
    assert "accounted for" not in out


@pytest.mark.parametrize("grace", ["nan", "inf", "-1", "1e300"])
def test_cli_refuses_a_grace_that_is_no_number_of_seconds(
    tmp_path: Path, grace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    outside, inside = _clean(tmp_path).write()
    args = ["reconcile", "--outside", str(outside), "--inside", str(inside), "--grace", grace]
    rc, _, err = run(args, capsys)
    assert rc == 2
    assert "--grace must be from 0 to" in err


def test_records_after_the_last_signed_checkpoint_are_not_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A running agent signs its newest records within a minute; until then whoever can
    write its disk could change or add records there without the key (a forged
    delivery.delivered hid a missing item from the accounting). They are left out."""
    b = _clean(tmp_path)
    outside, inside = b.write(leave_open=("inside",))
    args = [
        "reconcile", "--outside", str(outside), "--inside", str(inside), "--now", "2026-11-22",
        "--outside-key", OUT_KEY.public.to_string(), "--inside-key", IN_KEY.public.to_string(),
    ]  # fmt: skip
    rc, out, _ = run(args, capsys)
    assert rc == 10, out  # the deliveries are all in the inside's unsigned tail
    assert "records after its last signed checkpoint are not counted yet" in out
    rc, out, _ = run([*args, "--include-unsigned"], capsys)  # (knowingly)
    assert rc == 0, out
    assert "records after its last signed checkpoint: not signed yet" in out
    (log,) = b.open_logs
    log.close()  # (its next checkpoint signs them)
    rc, out, _ = run(args, capsys)
    assert rc == 0, out
    assert "RESULT: every accepted item is accounted for" in out


def test_records_signed_only_when_a_stopped_agent_restarted_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The inside stops without closing its log (a crash): its restart signs the records it
    left unsigned, which it cannot tell from records added to its disk meanwhile. They are
    counted, and the log's line says which they were (ADOPTED)."""
    b = _clean(tmp_path)
    outside, inside = b.write(leave_open=("inside",))
    (log,) = b.open_logs
    log._abort()  # (the writer stops without audit.stopped and its checkpoint)
    settings = AuditSettings(origin="inside.test/audit", side="inside", host="test")
    AuditLog(inside, IN_KEY, settings).close()
    args = [
        "reconcile", "--outside", str(outside), "--inside", str(inside), "--now", "2026-11-22",
        "--outside-key", OUT_KEY.public.to_string(), "--inside-key", IN_KEY.public.to_string(),
    ]  # fmt: skip
    rc, out, _ = run(args, capsys)
    assert rc == 0, out
    report = verify(inside, IN_KEY.public)
    assert report.adopted_records > 0
    (adopted,) = report.adopted
    assert (
        f"{report.adopted_records} records, {adopted['from']}..{adopted['to'] - 1}, were signed "
        "only when the agent restarted"
    ) in out
    assert out.count("were signed only when") == 1  # (the outside closed its log)


def test_an_item_is_a_control_object_only_if_both_sides_say_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The outside's records are read first and the first channel named won: a compromised
    outside could name `_audit` (control objects, left out of the accounting) for an item it
    smuggled in, and the inside's delivery of it on a clerks' channel was not reported."""
    b = _clean(tmp_path)
    smuggled, t = item_id(50), T0 + 10 * 60 * S
    b.accept(smuggled, t, seq=50, channel="_audit")
    b.receive(smuggled, t + S, seq=50)
    b.recheck(smuggled, t + 2 * S, seq=50)
    b.deliver(smuggled, t + 3 * S, seq=50, path="/nonexistent/s", content=b"x")
    outside, inside = b.write()
    args = ["reconcile", "--outside", str(outside), "--inside", str(inside), "--now", "2026-11-22"]
    rc, out, _ = run(args, capsys)
    assert rc == 11, out
    assert "CHANNEL_MISMATCH" in out
    assert "_audit, files/permits" in out
    assert "control objects" not in out


def test_the_accounting_does_not_depend_on_which_log_is_read_first(tmp_path: Path) -> None:
    """Reconcile reads the inside's log first (its audit.witnessed records say which roots
    of the outside log's records to take as they are verified): the items, their channel
    (the outside's first that names one, where the two sides disagree) and the order of the
    discrepancies are those of reading the outside's log first."""
    (tmp_path / "standard").mkdir()
    scn = standard(tmp_path / "standard")
    b = _clean(tmp_path / "mixed")
    smuggled, t = item_id(50), T0 + 10 * 60 * S
    b.accept(smuggled, t, seq=50, channel="_audit")
    b.receive(smuggled, t + S, seq=50)
    b.deliver(smuggled, t + 3 * S, seq=50, path="/nonexistent/s", content=b"x")
    outside, inside = b.write()
    for out_dir, in_dir, now in (
        (scn.outside, scn.inside, scn.now),
        (outside, inside, T0 + 3600 * S),
    ):
        results = []
        for order in (("outside", "inside"), ("inside", "outside")):
            acc = reconcile_mod.Accountant()
            stats = {side: LogStats(side, side) for side in order}
            for side in order:
                acc.feed_log(side, out_dir if side == "outside" else in_dir, stats[side], None)
            r = reconcile_mod.settle(
                acc, stats["outside"], stats["inside"], now_us=now, grace=600, checks=[]
            )
            results.append(json.dumps(r.to_json(), sort_keys=True))
        assert results[0] == results[1]
    assert (
        reconcile(outside, inside, now_us=T0 + 3600 * S).discrepancies[0].code == "CHANNEL_MISMATCH"
    )


def test_logs_given_for_the_wrong_side_are_a_discrepancy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Swapped --outside/--inside, or one log given for both, were accounted without a word."""
    outside, inside = _clean(tmp_path).write()
    swapped = [
        "reconcile",
        "--outside",
        str(inside),
        "--inside",
        str(outside),
        "--now",
        "2026-11-22",
    ]
    rc, out, _ = run(swapped, capsys)
    assert rc == 11, out
    assert out.count("WRONG_SIDE") == 2
    assert "the log given as the outside log was written by the inside agent" in out
    both = ["reconcile", "--outside", str(outside), "--inside", str(outside), "--now", "2026-11-22"]
    rc, out, _ = run(both, capsys)
    assert rc in (10, 11), out
    assert out.count("WRONG_SIDE") == 1
    rc, out, _ = run(["reconcile", "--outside", str(outside), "--inside", str(inside),
                      "--now", "2026-11-22"], capsys)  # fmt: skip
    assert rc == 0, out
    assert "WRONG_SIDE" not in out


# --- --json written as it is made -------------------------------------------------------------


def test_the_json_written_as_it_is_made_is_the_document(scn: Standard, tmp_path: Path) -> None:
    """``--json`` (and the report's JSON) is written member by member and item by item; the
    text is what json.dumps gives for the whole document."""
    r = reconcile(scn.outside, scn.inside, now_us=scn.now)
    out = io.StringIO()
    stream_json(r.json_fields(), out, indent=1)
    assert out.getvalue() == json.dumps(r.to_json(), indent=1)
    out = io.StringIO()
    stream_json(r.json_fields(items=False), out)
    assert out.getvalue() == json.dumps(r.to_json(items=False), separators=(",", ":"))
    empty = io.StringIO()
    stream_json(
        iter([("a", iter([])), ("b", {}), ("c", iter([{"x": [1, "\n"]}]))]), empty, indent=1
    )
    assert empty.getvalue() == json.dumps({"a": [], "b": {}, "c": [{"x": [1, "\n"]}]}, indent=1)
    rep = report_mod.build(r, check_files=False)
    out = io.StringIO()
    report_mod.write_json(rep, out)
    assert out.getvalue() == json.dumps(report_mod.to_json(rep), separators=(",", ":")) + "\n"


# The peak RSS of this process image, in KiB: VmHWM (ru_maxrss would do, but Linux carries it
# over from the parent across fork and exec: a child of a large pytest starts that large).
_RSS_CHILD = """
import contextlib, io, json, sys
from ferry.audit import cli
def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
def run(*extra):
    out = io.StringIO() if not extra else open(sys.argv[1], "w")
    with contextlib.redirect_stdout(out):
        rc = cli.run(["reconcile", "--outside", sys.argv[2], "--inside", sys.argv[3],
                      "--now", "2026-11-22", *extra])
    out.close()
    return rc, peak()
print(json.dumps([run(), run("--json")]))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM (Linux)")
def test_reconcile_json_does_not_hold_the_document_in_memory(tmp_path: Path) -> None:
    """``reconcile --json`` built the whole document, then its text, in memory: 2.56 GB for
    200,000 items. Now the peak is that of the text output: what the accounting needs.
    (In one child process: the text output first, then --json; with 8,000 items the old
    code grew by about 45 MiB.)"""
    b = Builder(tmp_path)
    n = 8000
    for i in range(n):
        item, t = item_id(i + 1), T0 + i * S
        b.accept(item, t, seq=i + 1)
        b.send(item, t + S // 10, seq=i + 1, times=1)
        b.receive(item, t + S // 5, seq=i + 1)
        b.deliver(item, t + S // 4, seq=i + 1, path=f"/nonexistent/{i}", content=b"x")
    outside, inside = b.write()
    out = tmp_path / "out.json"
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(out), str(outside), str(inside)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        check=True,
    )
    (rc_text, rss_text), (rc_json, rss_json) = json.loads(proc.stdout.splitlines()[-1])
    assert (rc_text, rc_json) == (0, 0), proc.stderr
    doc = json.loads(out.read_text())
    assert doc["counts"]["delivered"] == n
    assert len(doc["items"]) == n
    assert rss_json - rss_text < 16 * 1024, (rss_text, rss_json)  # KiB


# --- what is counted is what was verified -----------------------------------------------------


def _tamper_after_verify(
    monkeypatch: pytest.MonkeyPatch, directory: Path, change: Callable[[bytes], bytes]
) -> list[str]:
    """Make reconcile's verify rewrite a segment of ``directory`` right after it returns."""
    real = reconcile_mod.verify
    done: list[str] = []

    def verify_then_tamper(path: Any, *args: Any, **kw: Any) -> Any:
        report = real(path, *args, **kw)
        if Path(path) == directory and not done:
            seg = directory / "audit-000001.jsonl"
            seg.write_bytes(change(seg.read_bytes()))
            done.append(str(seg))
        return report

    monkeypatch.setattr(reconcile_mod, "verify", verify_then_tamper)
    return done


def test_records_changed_after_verification_are_not_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reconcile verified each log, then read the files again by path: whoever could write
    them in between (an attacker; a live agent appending) had records counted that were
    never verified. Here a missing item's inside record is rewritten as its delivery right
    after the inside log verified: it is still missing (what is counted is what verify read)."""
    b = _clean(tmp_path)
    stuck, t = item_id(50), T0 + 5 * 60 * S
    b.accept(stuck, t, seq=4)
    b.send(stuck, t + S, seq=4)
    b.receive(stuck, t + 2 * S, seq=4)
    b.recheck(stuck, t + 3 * S, seq=4)
    outside, inside = b.write()
    args = [
        "reconcile", "--outside", str(outside), "--inside", str(inside), "--now", "2026-11-22",
        "--outside-key", OUT_KEY.public.to_string(), "--inside-key", IN_KEY.public.to_string(),
    ]  # fmt: skip

    def forge(data: bytes) -> bytes:
        lines = data.split(b"\n")
        for i, line in enumerate(lines):
            if b'"event":"recheck"' in line and stuck.encode() in line:
                rec = json.loads(line)
                rec["event"] = "delivery.delivered"
                lines[i] = json.dumps(rec, separators=(",", ":")).encode()
                return b"\n".join(lines)
        raise AssertionError("no recheck record of the item")

    rc, out, _ = run(args, capsys)
    assert rc == 10, out  # (untouched: the item is missing)
    done = _tamper_after_verify(monkeypatch, inside, forge)
    rc, out, _ = run(args, capsys)
    assert done, "the segment was not rewritten"
    assert rc == 10, out
    assert f"{stuck}  channel files/permits #4" in out
    assert ": verified;" in out
    # (the rewritten log no longer verifies, of course)
    monkeypatch.undo()
    assert run(args, capsys)[0] == 12


def test_records_appended_after_verification_are_not_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --include-unsigned, every verified record counts: a line appended after verify
    returned (a live agent's, or anyone's) is not one of them."""
    b = _clean(tmp_path)
    stuck, t = item_id(50), T0 + 5 * 60 * S
    b.accept(stuck, t, seq=4)
    outside, inside = b.write()
    args = [
        "reconcile", "--outside", str(outside), "--inside", str(inside), "--now", "2026-11-22",
        "--outside-key", OUT_KEY.public.to_string(), "--inside-key", IN_KEY.public.to_string(),
        "--include-unsigned", "--json",
    ]  # fmt: skip
    last = json.loads((inside / "audit-000001.jsonl").read_bytes().splitlines()[-1])
    forged = {
        **last,
        "idx": last["idx"] + 1,
        "event": "delivery.delivered",
        "object": {"kind": "file", "item": stuck, "channel": "files/permits", "seq": 4},
        "detail": {"consumers": 0},
        "corr": stuck,
    }
    line = json.dumps(forged, separators=(",", ":")).encode() + b"\n"
    _tamper_after_verify(monkeypatch, inside, lambda data: data + line)
    capsys.readouterr()  # (the writer's own log lines)
    rc, out, _ = run(args, capsys)
    doc = json.loads(out)
    assert rc == 10, out
    assert [m["item"] for m in doc["missing"]] == [stuck]
    assert doc["read"][1]["last_idx"] < forged["idx"]


# --- the origin of each log -------------------------------------------------------------------


def test_a_log_whose_origin_is_not_the_expected_one_is_a_discrepancy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each log's origin (its name in its checkpoints) was never compared with the one its
    agent's config names: another gateway's log signed by the same key, or an old log, was
    accounted for as the one expected."""
    b = _clean(tmp_path / "logs")
    outside, inside = b.write()
    scn = Standard(outside, inside, T0 + 3600 * S, {}, {})
    _, in_cfg = configs(tmp_path, scn)
    base = ["reconcile", "-c", str(in_cfg), "--now", "2026-11-22"]
    rc, out, _ = run(base, capsys)
    assert rc == 0, out
    assert run([*base, "--inside-origin", "inside.test/audit"], capsys)[0] == 0
    text = in_cfg.read_text().replace(
        "  dir: audit\n", "  dir: audit\n  origin: inside.gw2/audit\n"
    )
    in_cfg.write_text(text)
    rc, out, _ = run(base, capsys)
    assert rc == 11, out
    assert out.count("ORIGIN_MISMATCH") == 1
    assert "the inside log given is the log 'inside.test/audit', but 'inside.gw2/audit'" in out
    rc, out, _ = run([*base, "--outside-origin", "outside.gw2/audit", "--json"], capsys)
    assert rc == 11, out
    found = json.loads(out)["discrepancies"]
    assert [d["code"] for d in found] == ["ORIGIN_MISMATCH", "ORIGIN_MISMATCH"]
    assert found[0]["message"].startswith(
        "the outside log given is the log 'outside.test/audit', but 'outside.gw2/audit' was "
        "expected (audit.origin in its agent's config, or --outside-origin)"
    )
    assert found[1]["message"].startswith("the inside log given is the log 'inside.test/audit'")


def test_an_outside_log_other_than_the_one_the_inside_witnessed_is_a_discrepancy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The inside's own log names the outside log it mirrored (audit.witnessed): an outside
    log with another origin is not that log. (Any log it witnessed is: after a rebuilt
    outside whose audit key had changed, the old log's copy and the new one.)"""
    outside, _ = _clean(tmp_path / "probe").write()  # (the log: the root of 10 records)
    root = verify(outside, OUT_KEY.public, want_roots={10}).roots_at[10]
    b = _clean(tmp_path / "both")
    witnessed = {"origin": "outside.test/audit", "size": 10, "root": root}
    b.add("inside", T0 + 30 * S, "audit.witnessed", subject=Subject.component("audit-mirror"),
          obj=AuditObject(kind="checkpoint", size=10), detail=witnessed)  # fmt: skip
    other = {**witnessed, "origin": "outside.elsewhere/audit"}
    b.add("inside", T0 + 40 * S, "audit.witnessed", subject=Subject.component("audit-mirror"),
          obj=AuditObject(kind="checkpoint", size=10), detail=other)  # fmt: skip
    outside, inside = b.write()
    assert reconcile(outside, inside, now_us=T0 + 3600 * S).discrepancies == []
    b = _clean(tmp_path)
    b.add("inside", T0 + 40 * S, "audit.witnessed", subject=Subject.component("audit-mirror"),
          obj=AuditObject(kind="checkpoint", size=10), detail=other)  # fmt: skip
    outside, inside = b.write()
    r = reconcile(outside, inside, now_us=T0 + 3600 * S)
    assert [(d.code, d.message) for d in r.discrepancies] == [
        (
            "ORIGIN_MISMATCH",
            "the outside log given is the log 'outside.test/audit', but the inside log "
            "witnessed the outside's log as 'outside.elsewhere/audit' (audit.witnessed): it "
            "is not a log the inside mirrored",
        )
    ]
    args = [
        "reconcile", "--outside", str(outside), "--inside", str(inside), "--now", "2026-11-22",
        "--outside-key", OUT_KEY.public.to_string(), "--inside-key", IN_KEY.public.to_string(),
    ]  # fmt: skip
    rc, out, _ = run(args, capsys)  # (verified: the same facts from the records verified)
    assert rc == 11, out
    assert out.count("ORIGIN_MISMATCH") == 1

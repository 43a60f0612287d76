"""ferry.audit.timeline and ``ferry audit replay``: reading logs, joining items, filters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from audit_scenario import HOSTILE_NAME, T0, S, Standard, configs, standard

from ferry.audit import cli as audit_cli
from ferry.audit.record import format_ts
from ferry.audit.timeline import (
    LogStats,
    ReplayFilter,
    parse_when,
    read_log,
    render_text,
    replay,
    safe,
    ts_us,
)
from ferry.errors import UsageError


@pytest.fixture(scope="module")
def scn(tmp_path_factory: pytest.TempPathFactory) -> Standard:
    return standard(tmp_path_factory.mktemp("scenario"))


def both(scn: Standard) -> list[tuple[str, Path]]:
    return [("outside", scn.outside), ("inside", scn.inside)]


def test_an_item_replays_across_both_sides_in_time_order(scn: Standard) -> None:
    result = replay(both(scn), ReplayFilter(items=(scn.items["delivered"],)))
    [tl] = result.timelines
    assert [(e.side, e.event) for e in tl.entries] == [
        ("outside", "intake.accepted"),
        ("outside", "verdict"),
        ("outside", "transfer.sent"),
        ("inside", "transfer.received"),
        ("inside", "recheck"),
        ("inside", "delivery.delivered"),
        ("outside", "transfer.repeated"),  # the planned repeat 5 s after the first send
    ]
    assert [e.ts for e in tl.entries] == sorted(e.ts for e in tl.entries)
    assert (tl.outcome, tl.channel, tl.seq, tl.kind) == ("delivered", "files/permits", 1, "file")
    assert tl.sides == {"outside", "inside"}


def test_outcomes_and_order_of_items(scn: Standard) -> None:
    result = replay(both(scn))
    outcome = {tl.item: tl.outcome for tl in result.timelines}
    assert outcome[scn.items["verdict_rejected"]] == "rejected"
    assert outcome[scn.items["inside_rejected"]] == "rejected"
    assert outcome[scn.items["all_lost"]] == "open"
    assert outcome[scn.items["unexplained"]] == "delivered"
    firsts = [tl.entries[0].sort_key() for tl in result.timelines]
    assert firsts == sorted(firsts)
    assert len(result.timelines) == 11
    all_lost = next(t for t in result.timelines if t.item == scn.items["all_lost"])
    assert {e.side for e in all_lost.entries} == {"outside"}  # every packet suppressed


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (ReplayFilter(items=("0000000000000000000000000000a00",)), 10),  # a prefix
        (ReplayFilter(channels=("files/permits",)), 11),
        (ReplayFilter(channels=("messages/none",)), 0),
        (ReplayFilter(subjects=("/srv/ferry/drop/permits",)), 10),  # the clerk folder
        (ReplayFilter(subjects=("component:delivery",)), 6),  # kind:id, any record
        (ReplayFilter(since=format_ts(T0 + 4 * 60 * S), until=format_ts(T0 + 6 * 60 * S)), 2),
    ],
)
def test_filters(scn: Standard, filters: ReplayFilter, expected: int) -> None:
    assert len(replay(both(scn), filters).timelines) == expected


def test_one_log_alone_replays(scn: Standard) -> None:
    result = replay([("inside", scn.inside)])
    assert all(tl.sides == {"inside"} for tl in result.timelines)
    assert scn.items["all_lost"] not in {tl.item for tl in result.timelines}


def test_system_records_are_listed_apart(scn: Standard) -> None:
    result = replay(both(scn), system=True)
    events = {e.event for e in result.other}
    assert {"audit.started", "audit.stopped", "link.sequence_gap", "intake.rejected"} <= events
    assert "audit.checkpoint" not in events  # housekeeping is verify's business


def test_text_escapes_hostile_strings(scn: Standard) -> None:
    text = "\n".join(render_text(replay(both(scn))))
    assert "\x1b" not in text
    assert "\u202e" not in text
    assert "\\u001b[31m" in text or "\\u001b" in text
    assert "DELIVERED" in text
    assert "MISSING" not in text  # replay shows open items, reconcile decides "missing"
    assert safe("a\x00b\u2066c") == "a\\u0000b\\u2066c"


def test_json_keeps_object_and_detail(scn: Standard) -> None:
    doc = replay(both(scn), ReplayFilter(items=(scn.items["hostile"],)), keep_records=True)
    data = json.loads(json.dumps(doc.to_json()))
    [item] = data["items"]
    first = item["records"][0]
    assert first["event"] == "intake.accepted"
    assert first["object"]["name"] == HOSTILE_NAME
    assert first["corr"] == scn.items["hostile"]
    [delivered] = [r for r in item["records"] if r["event"] == "delivery.delivered"]
    assert delivered["object"]["path"].endswith("hostile.pdf")


def test_reader_skips_malformed_lines_and_waits_for_a_torn_tail(tmp_path: Path) -> None:
    scn = standard(tmp_path)
    seg = sorted(scn.inside.glob("audit-*.jsonl"))[-1]
    with seg.open("ab") as f:
        f.write(b"not json\n")
        f.write(b"[" * 100_000 + b"\n")  # deep nesting: RecursionError in json
        f.write(b'{"v":1,"idx":"x"}\n')  # wrong shape
        f.write(b"\xff\xfe\n")
        f.write(b"x" * 20_000 + b"\n")  # longer than a record may be
        f.write(b'{"v":1,"idx":999,"ts":"2026-11-21T1')  # torn: no newline
    st = LogStats("inside", str(scn.inside))
    records = list(read_log(scn.inside, "inside", stats=st, skip_audit=False))
    assert st.malformed == 5
    assert st.torn == 1
    assert all(isinstance(r["idx"], int) for r in records)
    assert len(replay([("inside", scn.inside)]).timelines) == 8


def test_reader_stops_at_a_limit(scn: Standard) -> None:
    recs = list(read_log(scn.outside, "outside", limit=10, skip_audit=False))
    assert [r["idx"] for r in recs] == list(range(10))


def test_reader_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        list(read_log(tmp_path / "nope", "outside"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-21", "2026-11-21T00:00:00.000000Z"),
        ("2026-11-21T21:25", "2026-11-21T21:25:00.000000Z"),
        ("2026-11-21 21:25:07Z", "2026-11-21T21:25:07.000000Z"),
        ("2026-11-21T21:25:07.5Z", "2026-11-21T21:25:07.500000Z"),
    ],
)
def test_parse_when(text: str, expected: str) -> None:
    assert parse_when(text) == expected
    assert format_ts(ts_us(expected)) == expected


def test_parse_when_refuses_nonsense() -> None:
    with pytest.raises(UsageError):
        parse_when("yesterday")


def test_cli_replay_from_the_inside_config(
    tmp_path: Path, scn: Standard, capsys: pytest.CaptureFixture[str]
) -> None:
    _, inside_cfg = configs(tmp_path, scn)
    item = scn.items["gave_up"]
    assert audit_cli.run(["replay", "-c", str(inside_cfg), "--item", item, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    [tl] = data["items"]
    assert [r["event"] for r in tl["records"]] == [
        "intake.accepted",
        "verdict",
        "transfer.sent",
        "transfer.repeated",
        "transfer.lost",
    ]
    assert [s["side"] for s in data["logs"]] == ["outside", "inside"]
    assert data["logs"][0]["path"].endswith("audit-outside-mirror")
    assert audit_cli.run(["replay", "-c", str(inside_cfg), "--since", "2026-11-21T09:09"]) == 0
    out = capsys.readouterr().out
    assert "# 1 item(s)" in out  # only in_flight has records after 09:09
    assert scn.items["in_flight"] in out


def test_cli_replay_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert audit_cli.run(["replay"]) == 2
    assert "no audit log" in capsys.readouterr().err
    assert audit_cli.run(["replay", "--inside", str(tmp_path / "none")]) == 2
    assert audit_cli.run(["replay", "--inside", str(tmp_path), "--since", "soon"]) == 2

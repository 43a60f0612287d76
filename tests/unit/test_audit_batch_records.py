"""Batch records (docs/AUDIT.md §2): one record for several messages, read back one per item."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from audit_scenario import PEER, T0, Builder, S, item_id

from ferry.audit.reconcile import reconcile
from ferry.audit.record import (
    MAX_BATCH_ITEMS,
    MAX_RECORD_BYTES,
    AuditRecordInvalid,
    Subject,
    build,
    encode,
    item_batches,
    per_item,
    record_errors,
)
from ferry.audit.siem import format_message
from ferry.audit.timeline import ReplayFilter, replay

CLIENT = Subject.api_client("portal")
SHARED = {"channel": "messages", "kind": "message", "media_type": "application/json"}


def entry(n: int, **extra: object) -> dict[str, object]:
    body = f"message {n}".encode()
    return {
        "item": item_id(n),
        "name": f"citizen-application-{n:08d}.json",
        "seq": n,
        "sha256": hashlib.sha256(body).hexdigest(),
        "size": len(body),
        **extra,
    }


def batch(event: str, entries: list[dict[str, object]], **kw: Any) -> dict[str, Any]:
    return build(
        event,
        subject=kw.pop("subject", CLIENT),
        result="success",
        obj={**SHARED, "items": entries},
        **kw,
    )


# ----------------------------------------------------------------------- splitting


def test_batches_keep_every_entry_once_in_order_and_fit_a_record() -> None:
    small = [entry(n) for n in range(1, 200)]
    runs = item_batches(small)
    assert [e for run in runs for e in run] == small
    assert [len(r) for r in runs] == [64, 64, 64, 7]  # at most MAX_BATCH_ITEMS each
    long = [entry(n, path="/srv/ferry/deliver/" + "d" * 3000 + f"/{n}.json") for n in range(9)]
    runs = item_batches(long)
    assert [e for run in runs for e in run] == long
    assert len(runs) > 1
    for run in [*item_batches(small), *runs]:
        rec = batch("delivery.delivered", run, subject=Subject.component("delivery"))
        line = json.dumps(rec, separators=(",", ":")).encode()
        assert len(line) < MAX_RECORD_BYTES
    assert item_batches([]) == []


# ----------------------------------------------------------------------- the schema


def test_a_batch_record_validates_and_malformed_ones_do_not() -> None:
    ok = batch(
        "intake.accepted",
        [
            entry(1, submission="s-1", schema="citizen-application"),
            entry(2, submission="s-2", schema="notice"),
        ],
    )
    assert record_errors(ok) == []
    bad_objects: list[dict[str, Any]] = [
        {**SHARED, "item": item_id(1), "items": [entry(2)]},  # both forms at once
        {**SHARED, "items": []},
        {**SHARED, "items": [entry(n) for n in range(MAX_BATCH_ITEMS + 1)]},
        {**SHARED, "items": [{"seq": 1}]},  # no item id
        {**SHARED, "items": [entry(1, colour="red")]},  # an unknown field
        {**SHARED, "items": [entry(1, seq=-1)]},
        {**SHARED, "items": [entry(1, sha256="zz")]},
        {**SHARED, "items": "not a list"},
    ]
    for obj in bad_objects:
        rec = {**ok, "object": obj}
        assert record_errors(rec), obj
    floaty = {**ok, "object": {**SHARED, "items": [entry(1, size=4.0)]}}
    assert record_errors(floaty)  # an integral float is not an integer in a record
    with pytest.raises(AuditRecordInvalid):
        batch("intake.accepted", [entry(1, colour="red")])


# ----------------------------------------------------------------------- reading back


def test_per_item_gives_each_entry_with_the_shared_fields() -> None:
    rec = batch(
        "intake.accepted",
        [
            entry(1, submission="s-1", schema="citizen-application"),
            entry(2, submission="s-2", schema="notice"),
        ],
        detail={"note": "shared"},
    )
    one, two = per_item(rec)
    assert one["object"] == {**SHARED, **entry(1)}
    assert one["detail"] == {"note": "shared", "submission": "s-1", "schema": "citizen-application"}
    assert (one["corr"], two["corr"]) == (item_id(1), item_id(2))
    assert two["detail"]["schema"] == "notice"
    assert one["event"] == two["event"] == "intake.accepted"
    assert one["subject"] == CLIENT.to_json()
    assert "items" in rec["object"]  # the record itself is not changed
    single = build("agent.started", subject=Subject.component("agent"), result="success")
    assert per_item(single) == [single]


def test_per_item_skips_what_a_tampered_file_could_hold() -> None:
    rec = batch("transfer.received", [entry(1), entry(2)], subject=PEER)
    rec["object"]["items"] = [entry(1), "x", {"item": 5}, {"item": ""}, {"seq": 3}, entry(2)]
    assert [r["corr"] for r in per_item(rec)] == [item_id(1), item_id(2)]
    rec["object"]["items"] = {"item": item_id(1)}
    assert per_item(rec) == []
    rec["detail"] = ["not", "a", "map"]  # left for the reader's own checks (timeline)
    rec["object"]["items"] = [entry(3, submission="s-3")]
    assert [r["detail"] for r in per_item(rec)] == [{"submission": "s-3"}]


def test_siem_line_counts_the_items() -> None:
    rec = batch("intake.accepted", [entry(1), entry(2), entry(3)])
    rec["ts"] = "2026-11-22T09:00:00.000000Z"
    msg = format_message(
        json.dumps(rec, separators=(",", ":")).encode(), hostname="gw", origin="o"
    ).decode()
    assert 'items="3"' in msg
    assert 'item="' not in msg


# ----------------------------------------------------------------------- the tools


def _messages(root: Path) -> tuple[Path, Path]:
    """Four messages accepted in one record and sent in one bundle; three arrive and
    are delivered (two in one batch record, one alone); the fourth never arrives."""
    b = Builder(root)
    sender, delivery = Subject.component("sender"), Subject.component("delivery")
    four = [entry(n, submission=f"s-{n}", schema="citizen-application") for n in range(1, 5)]
    b.add("outside", T0, "intake.accepted", subject=CLIENT, obj={**SHARED, "items": four})
    b.add(
        "outside",
        T0 + S,
        "transfer.sent",
        subject=sender,
        obj={
            "channel": "messages",
            "kind": "message",
            "items": [{"item": e["item"], "seq": e["seq"]} for e in four],
        },
        detail={"send": 1, "of": 1, "bundle": "ab" * 16},
    )
    arrived = four[:3]
    bare = [{k: v for k, v in e.items() if k not in ("submission", "schema")} for e in arrived]
    b.add("inside", T0 + 2 * S, "transfer.received", subject=PEER, obj={**SHARED, "items": bare})
    for t, run in ((T0 + 3 * S, bare[:2]), (T0 + 4 * S, bare[2:])):
        b.add(
            "inside",
            t,
            "delivery.delivered",
            subject=delivery,
            obj={**SHARED, "items": [{**e, "path": f"/srv/in/{e['name']}"} for e in run]},
            detail={"consumers": True},
        )
    return b.write()


def test_reconcile_accounts_for_each_message_of_a_batch_record(tmp_path: Path) -> None:
    outside, inside = _messages(tmp_path)
    r = reconcile(outside, inside, now_us=T0 + 3600 * S, grace=600)
    by_item = {s.item: s for s in r.accepted}
    assert {i: s.state for i, s in by_item.items()} == {
        item_id(1): "delivered",
        item_id(2): "delivered",
        item_id(3): "delivered",
        item_id(4): "missing",
    }
    assert r.discrepancies == []
    three = by_item[item_id(3)]
    assert three.delivered_path == "/srv/in/citizen-application-00000003.json"
    assert (three.channel, three.seq, three.sends) == ("messages", 3, 1)
    assert three.sha256 == entry(3)["sha256"]
    assert three.subject == "api_client:portal"


def test_replay_puts_a_batch_record_in_each_of_its_items_timelines(tmp_path: Path) -> None:
    outside, inside = _messages(tmp_path)
    logs = [("outside", outside), ("inside", inside)]
    result = replay(logs, ReplayFilter(items=(item_id(2),)), keep_records=True)
    [tl] = result.timelines
    assert [(e.side, e.event) for e in tl.entries] == [
        ("outside", "intake.accepted"),
        ("outside", "transfer.sent"),
        ("inside", "transfer.received"),
        ("inside", "delivery.delivered"),
    ]
    assert (tl.outcome, tl.channel, tl.seq, tl.kind) == ("delivered", "messages", 2, "message")
    accepted = tl.entries[0].record
    assert accepted is not None
    assert accepted["object"]["item"] == item_id(2)
    assert accepted["detail"]["submission"] == "s-2"
    everyone = {t.item: t.outcome for t in replay(logs).timelines}
    assert everyone == {
        item_id(1): "delivered",
        item_id(2): "delivered",
        item_id(3): "delivered",
        item_id(4): "open",
    }


def test_entries_and_lists_of_maps_are_written_with_sorted_keys() -> None:
    shuffled = {"size": 3, "item": item_id(1), "seq": 1, "name": "a.json"}
    rec = batch(
        "transfer.received",
        [shuffled],
        subject=PEER,
        detail={"z": [{"b": 1, "a": {"d": [1, {"y": 2, "x": 1}], "c": 2}}], "a": None},
    )
    line = encode(rec).decode()
    assert '{"item":"' + item_id(1) + '","name":"a.json","seq":1,"size":3}' in line
    assert '"detail":{"a":null,"z":[{"a":{"c":2,"d":[1,{"x":1,"y":2}]},"b":1}]}' in line

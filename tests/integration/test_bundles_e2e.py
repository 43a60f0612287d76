"""Message bundles end to end (docs/PROTOCOL.md, "Message bundles"): real agents from a fresh
``ferry init`` deployment, real ZeroMQ API, real UDP on loopback.

1. Many messages submitted at once travel in few bundles, each arrives exactly once (repeats
   included), and the outside's audit log names the bundle each message went in.
2. A bundle signed with the real outside key but holding one bad member (wrong SHA-256, or
   another channel) is refused whole by a real inside, kept in ``rejected/`` and audited; the
   inside keeps running and delivers the next good bundle.
3. A message larger than one FEC block (a bundle of one, several blocks, spooled to disk
   inside) is delivered.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import Agent, edit_yaml, fast, init

from ferry.audit.record import MAX_BATCH_ITEMS, decode, per_item
from ferry.audit.segments import iter_lines, list_segments
from ferry.channels.udp import UdpSender
from ferry.client import Ack, ApiRejected, Client
from ferry.config import load_outside_config
from ferry.crypto.keys import load_public_key, load_secret_key
from ferry.jsondoc import SchemaRegistry
from ferry.wire import records as rec
from ferry.wire.sender import BytesSource, OutgoingObject, Sender, build_trailer, symbol_size_for
from outside.agent import BUNDLE_ONE_BLOCK, bundle_fec

pytestmark = pytest.mark.integration

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas" / "messages"
StartAgent = Callable[[str, str], Agent]


# ------------------------------------------------------------------------------ helpers
def application(n: int, form: list[dict[str, str]] | None = None) -> bytes:
    doc = json.loads((SCHEMAS / "citizen-application.schema.json").read_text())["examples"][0]
    doc = copy.deepcopy(doc)
    doc["application_id"] = str(uuid.UUID(int=n + 1))
    if form is not None:
        doc["content"]["form"] = form
    return json.dumps(doc, ensure_ascii=False).encode()


@functools.cache
def schemas() -> SchemaRegistry:
    return SchemaRegistry.load()


def canonical(data: bytes, schema: str = "citizen-application") -> bytes:
    """The bytes the gateway delivers: the canonical form (RFC 8785) of a valid message."""
    _, out = schemas().check(schema, data)
    return out


def deploy(tmp_path: Path, change_out: Callable[[dict[str, Any]], None] | None = None) -> Any:
    dep = init(tmp_path / "d")

    def out(data: dict[str, Any]) -> None:
        fast(data)
        if change_out is not None:
            change_out(data)

    edit_yaml(dep["outside"]["config"], out)
    return dep


def wait_for(what: str, predicate: Callable[[], bool], *agents: Agent, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for a in agents:
            assert a.proc.poll() is None, f"agent exited: {a.log.read_text()[-3000:]}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data


def raw_records(audit_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete record of an audit log (the segments `ferry audit` reads)."""
    return [
        decode(line.data)
        for _, segment in list_segments(Path(audit_dir))
        for line in iter_lines(segment)
        if line.complete
    ]


def audit_records(audit_dir: str | Path) -> list[dict[str, Any]]:
    """One record per item: batch records (messages) expanded, as replay reads them."""
    return [one for r in raw_records(audit_dir) for one in per_item(r)]


def delivered_json(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob("*.json"))


# ------------------------------------------------------- 1. many messages, few bundles
def test_many_messages_travel_in_bundles_and_arrive_exactly_once(
    tmp_path: Path, agents: StartAgent
) -> None:
    n = 300

    def repeat_soon(data: dict[str, Any]) -> None:
        for ch in data["channels"]:
            if ch.get("kind") == "messages":
                ch["repeat"] = {"count": 2, "spread": 1}  # the repeat comes in the test too

    dep = deploy(tmp_path, repeat_soon)
    entry = Path(dep["api"]["allowlist_entry"])
    entry.write_text(entry.read_text().replace("rate: 5000", "rate: 100000"))
    inside = agents("inside", dep["inside"]["config"])
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("api_listening")
    bodies = {i: canonical(application(i)) for i in range(n)}
    acks: list[Ack] = []
    with Client.from_config(dep["api"]["client_config"]) as client:
        stream = (("messages", application(i), "citizen-application") for i in range(n))
        for _sid, answer in client.submit_many(stream, window=n, timeout=20):
            assert not isinstance(answer, ApiRejected), answer
            acks.append(answer)
    assert len({a.item for a in acks}) == n
    folder = dep["channels"]["messages"]["deliver"]
    wait_for(f"{n} messages", lambda: len(delivered_json(folder)) >= n, inside, outside)
    outside_status = Path(dep["outside"]["state_dir"]) / "status.json"
    # every copy sent (the repeats 1 s later too); then the inside has had time for them
    wait_for(
        "the outside backlog to drain",
        lambda: (
            (st := read_json(outside_status)).get("api_accepted") == n
            and st.get("backlog_items") == 0
        ),
        inside,
        outside,
    )
    time.sleep(1.0)
    status = read_json(outside_status)
    assert outside.stop() == 0
    assert inside.stop() == 0

    files = delivered_json(folder)
    assert len(files) == n  # each exactly once: no repeat delivered a second copy
    assert sorted(p.read_bytes() for p in files) == sorted(bodies.values())

    # ---- the outside bundled them: far fewer bundles than messages (repeats included)
    assert 0 < status["bundles_sent"] < n, status

    # ---- the outside audit names the bundle of every copy sent
    out_records = audit_records(dep["outside"]["audit_dir"])
    items = {a.item for a in acks}
    sent = [
        r for r in out_records if r["event"] == "transfer.sent" and r["object"]["item"] in items
    ]
    repeated = [
        r for r in out_records if r["event"] == "transfer.repeated" and r["object"]["item"] in items
    ]
    assert sorted(r["object"]["item"] for r in sent) == sorted(items)
    assert sorted(r["object"]["item"] for r in repeated) == sorted(items)
    for r in sent + repeated:
        assert r["corr"] == r["object"]["item"]
        assert r["object"]["channel"] == "messages"
        assert len(bytes.fromhex(r["detail"]["bundle"])) == 16
        assert r["detail"]["of"] == 2
    first_bundles = {r["detail"]["bundle"] for r in sent}
    repeat_bundles = {r["detail"]["bundle"] for r in repeated}
    assert not first_bundles & repeat_bundles  # a repeat travels in a new bundle
    assert not first_bundles & items  # bundle ids are not message ids
    assert len(first_bundles) + len(repeat_bundles) == status["bundles_sent"]
    assert len(first_bundles) < n
    members: dict[str, int] = {}
    for r in sent:
        members[r["detail"]["bundle"]] = members.get(r["detail"]["bundle"], 0) + 1
    assert max(members.values()) >= 2  # some bundle held several messages

    # ---- the inside recorded one delivery per message, none for a bundle id
    in_records = audit_records(dep["inside"]["audit_dir"])
    delivered = [r["object"]["item"] for r in in_records if r["event"] == "delivery.delivered"]
    assert sorted(delivered) == sorted(items)
    assert not [r for r in in_records if r["event"] == "delivery.rejected"]

    # ---- ... in batch records: one per bundle sent, one per batch received and delivered
    for side, events in (
        ("outside", ("intake.accepted", "transfer.sent", "transfer.repeated")),
        ("inside", ("transfer.received", "delivery.delivered")),
    ):
        raw = raw_records(dep[side]["audit_dir"])
        for event in events:
            batch = [r for r in raw if r["event"] == event and r["object"]["channel"] == "messages"]
            assert all("item" not in r["object"] and "corr" not in r for r in batch), event
            listed = [e["item"] for r in batch for e in r["object"]["items"]]
            assert sorted(listed) == sorted(items), event  # each message exactly once
            assert len(batch) < n, event  # several messages per record
    sent_raw = [
        r for r in raw_records(dep["outside"]["audit_dir"]) if r["event"] == "transfer.sent"
    ]
    # a bundle's copies: one record (one per MAX_BATCH_ITEMS of a big bundle)
    assert len(sent_raw) == sum(-(-k // MAX_BATCH_ITEMS) for k in members.values())


# ------------------------------------------------- 2. a bad member refuses the bundle
class CraftedOutside:
    """Sends objects over the real UDP link with the deployment's real outside keys, as the
    outside agent would (announcement, heartbeats, sealed symbols)."""

    def __init__(self, dep: dict[str, Any]) -> None:
        cfg = load_outside_config(Path(dep["outside"]["config"]))
        self.key = load_secret_key(cfg.signing_key, ("ed25519",))
        self.symbol_size = symbol_size_for(cfg.link)
        self.sender = Sender(
            cfg.link,
            self.key,
            load_public_key(cfg.inside_public_key, cfg.source.parent),
            epoch=int(time.time() * 1e6),
            rng=os.urandom,
            now=time.time(),
        )
        assert cfg.udp is not None
        self.tx = UdpSender(cfg.udp.host, cfg.udp.port)

    def member(
        self, seq: int, content: bytes, channel: str = "messages"
    ) -> tuple[rec.Manifest, bytes]:
        manifest = rec.Manifest(
            object_id=os.urandom(16),
            kind="message",
            channel=channel,
            seq=seq,
            name=f"citizen-application-{seq:08d}.json",
            media_type="application/json",
            size=len(content),
            sha256=hashlib.sha256(content).digest(),
            created_us=int(time.time() * 1e6),
            mtime_us=int(time.time() * 1e6),
            sender=self.key.public.key_id,
            schema="citizen-application",
            subject="api:portal",
        )
        return manifest, content

    def send_bundle(self, members: list[tuple[rec.Manifest, bytes]]) -> tuple[bytes, bytes]:
        """Sign and send a bundle of these members; return its id and object stream."""
        content = rec.encode_bundle([rec.encode_member(m, c) for m, c in members])
        now = int(time.time() * 1e6)
        manifest = rec.Manifest(
            object_id=os.urandom(16),
            kind="bundle",
            channel="messages",
            seq=0,
            name="bundle-1",
            media_type=rec.BUNDLE_MEDIA_TYPE,
            size=len(content),
            sha256=hashlib.sha256(content).digest(),
            created_us=now,
            mtime_us=now,
            sender=self.key.public.key_id,
            subject="component:sender",
        )
        stream = content + build_trailer(manifest, self.key)
        fec = bundle_fec(-(-len(stream) // self.symbol_size))
        self.sender.submit(
            OutgoingObject(
                manifest.object_id,
                len(stream),
                BytesSource(stream),
                "messages",
                max(m.seq for m, _ in members),
                priority=0,
                fec=fec,
            )
        )
        while not self.sender.idle:
            for datagram in self.sender.datagrams(time.time(), 64):
                self.tx.send(datagram)
        return manifest.object_id, stream

    def close(self) -> None:
        self.tx.close()


def test_a_bundle_with_a_bad_member_is_refused_whole_and_the_next_one_delivered(
    tmp_path: Path, agents: StartAgent
) -> None:
    dep = deploy(tmp_path)
    inside = agents("inside", dep["inside"]["config"])
    inside.wait_event("inside_started")
    state = Path(dep["inside"]["state_dir"])
    folder = dep["channels"]["messages"]["deliver"]
    link = CraftedOutside(dep)
    try:
        # wrong SHA-256: the second member's content is not what its manifest says
        good_1 = link.member(1, canonical(application(1)))
        manifest_2, content_2 = link.member(2, canonical(application(2)))
        bad_hash = (manifest_2, content_2.upper())  # same length, other bytes
        assert len(bad_hash[1]) == len(content_2)
        assert bad_hash[1] != content_2
        hash_id, hash_stream = link.send_bundle([good_1, bad_hash])
        inside.wait_event("object_rejected", timeout=10, object_id=hash_id.hex())
        # another channel: every member valid on its own, one names channel "documents"
        good_3 = link.member(3, canonical(application(3)))
        other = link.member(4, canonical(application(4)), channel="documents")
        channel_id, channel_stream = link.send_bundle([good_3, other])
        inside.wait_event("object_rejected", timeout=10, object_id=channel_id.hex())
        # a good bundle after them is delivered
        good = [link.member(5 + i, canonical(application(5 + i))) for i in range(3)]
        link.send_bundle(good)
        wait_for("the good bundle", lambda: len(delivered_json(folder)) >= 3, inside)
    finally:
        link.close()
    time.sleep(0.3)  # nothing else may come
    assert inside.proc.poll() is None  # the inside kept running
    assert sorted(p.read_bytes() for p in delivered_json(folder)) == sorted(c for _, c in good)
    assert (state / "rejected" / f"{hash_id.hex()}.obj").read_bytes() == hash_stream
    assert (state / "rejected" / f"{channel_id.hex()}.obj").read_bytes() == channel_stream
    assert sorted(p.name for p in (state / "rejected").iterdir()) == sorted(
        f"{oid.hex()}.obj" for oid in (hash_id, channel_id)
    )
    assert inside.stop() == 0
    records = audit_records(dep["inside"]["audit_dir"])
    rejected = {r["object"]["item"]: r for r in records if r["event"] == "delivery.rejected"}
    assert set(rejected) == {hash_id.hex(), channel_id.hex()}
    assert "SHA-256" in rejected[hash_id.hex()]["reason"]
    assert "another channel" in rejected[channel_id.hex()]["reason"]
    for oid, r in ((hash_id, rejected[hash_id.hex()]), (channel_id, rejected[channel_id.hex()])):
        assert r["result"] == "rejected"
        assert r["corr"] == oid.hex()
        assert r["detail"]["kept"].endswith(f"rejected/{oid.hex()}.obj")
    delivered = {r["object"]["item"] for r in records if r["event"] == "delivery.delivered"}
    assert delivered == {m.object_id.hex() for m, _ in good}
    refused_members = {m.object_id.hex() for m, _ in (good_1, bad_hash, good_3, other)}
    # no record of any member of a refused bundle: neither received nor delivered
    assert not [r for r in records if r.get("object", {}).get("item") in refused_members]


# ------------------------------------------------------------ 3. a big message arrives
def big_application(n: int, target: int) -> bytes:
    """A valid citizen application of about ``target`` bytes (form values of 2,000 CJK
    characters, 6,000 UTF-8 bytes each, within the schema and the JSON limits)."""
    value = "申请材料说明" * 333 + "附件"  # 2,000 characters
    count = target // (len(value.encode()) + 60)
    assert count <= 100  # the schema's maxItems
    form = [{"field": f"item_{i}", "label": f"材料{i}", "value": value} for i in range(count)]
    return application(n, form)


def test_a_message_larger_than_one_fec_block_is_delivered(
    tmp_path: Path, agents: StartAgent
) -> None:
    dep = deploy(tmp_path)
    inside = agents("inside", dep["inside"]["config"])
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("api_listening")
    big = big_application(1, 400_000)
    body = canonical(big)
    assert 380_000 < len(body) < 1024 * 1024  # under the channel's max_message_size (1 MiB)
    cfg = load_outside_config(Path(dep["outside"]["config"]))
    symbols = -(-len(body) // symbol_size_for(cfg.link))
    assert symbols > BUNDLE_ONE_BLOCK  # so it gets the link's FEC: several blocks
    assert len(body) > cfg.link.fec.source * symbol_size_for(cfg.link)
    with Client.from_config(dep["api"]["client_config"]) as client:
        ack = client.submit("messages", big, schema="citizen-application")
        small = client.submit("messages", application(2), schema="citizen-application")
    folder = Path(dep["channels"]["messages"]["deliver"])
    # (up to the channel's repeat 30 s later: on a loaded VM the loopback can drop more of
    # the first copy's burst than its FEC repairs; it failed so twice in one day's runs)
    wait_for("both messages", lambda: len(delivered_json(folder)) >= 2, inside, outside, timeout=45)
    assert (folder / f"citizen-application-{ack.seq:08d}.json").read_bytes() == body
    assert (folder / f"citizen-application-{small.seq:08d}.json").read_bytes() == canonical(
        application(2)
    )
    state = Path(dep["inside"]["state_dir"])
    wait_for(
        "the inside status",
        lambda: read_json(state / "status.json").get("delivered") == 2,
        inside,
    )
    status = read_json(state / "status.json")
    assert status["rejected"] == 0
    assert status["blocks_decoded"] >= -(-symbols // cfg.link.fec.source)
    assert not list((state / "rejected").iterdir())
    assert not list((state / "incoming").iterdir())  # read back from the spool, then removed
    assert outside.stop() == 0
    assert inside.stop() == 0
    records = audit_records(dep["inside"]["audit_dir"])
    [delivered] = [
        r for r in records if r["event"] == "delivery.delivered" and r["object"]["item"] == ack.item
    ]
    assert delivered["object"]["size"] == len(body)
    assert delivered["object"]["sha256"] == hashlib.sha256(body).hexdigest()
    [sent] = [
        r
        for r in audit_records(dep["outside"]["audit_dir"])
        if r["event"] == "transfer.sent" and r["object"]["item"] == ack.item
    ]
    assert "bundle" in sent["detail"]

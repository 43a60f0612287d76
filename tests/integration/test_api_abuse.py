"""What one allow-listed client (or anyone with a fresh key) can do to the outer API, and what
it must not: cost other clients their answers, stall the API thread, flood the audit log, get
a second item for one submission id, or have a file spooled short.

An in-process ApiServer on a `ferry init` deployment, with real ZeroMQ CURVE sockets, the real
spool, audit log and content pipeline. Two clients: ``portal`` (the victim) and ``mallory``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from test_api import application

from ferry.audit.agent import AgentAudit
from ferry.config import load_client_config, load_outside_config
from ferry.crypto.keys import SecretKey, load_public_key, load_secret_key
from ferry.provision import init_deployment
from ferry.zmqsec import curve_client
from outside import api as api_mod
from outside.api import ApiServer
from outside.content.pipeline import ContentPipeline
from outside.spool import Spool, SpoolItem

pytestmark = pytest.mark.integration

P = b"FERRY/1"
APP = "citizen-application"


@dataclass
class Rig:
    server: ApiServer
    dep: dict[str, Any]
    items: list[SpoolItem]
    audit_dir: Path
    mallory: SecretKey
    ctx: zmq.Context[Any]

    def sock(self, who: str = "portal", **opts: int) -> zmq.Socket[Any]:
        ccfg = load_client_config(Path(self.dep["api"]["client_config"]))
        key = load_secret_key(ccfg.client_key) if who == "portal" else self.mallory
        if who not in {"portal", "mallory"}:
            key = SecretKey.generate("x25519")  # a stranger
        sock = curve_client(self.ctx, zmq.DEALER, key, load_public_key(ccfg.server_public_key))
        for opt, value in opts.items():
            sock.setsockopt(getattr(zmq, opt), value)
        sock.connect(ccfg.endpoint)
        return sock

    def records(self, event: str) -> list[dict[str, Any]]:
        self.server.audit.log.checkpoint()  # type: ignore[union-attr]
        out = []
        for seg in sorted(self.audit_dir.glob("audit-*.jsonl")):
            out += [r for r in map(json.loads, seg.read_text().splitlines()) if r["event"] == event]
        return out


def ask(
    sock: zmq.Socket[Any], verb: bytes, body: dict[str, Any], data: bytes | None = None
) -> tuple[bytes | None, dict[str, Any]]:
    sock.send_multipart([P, verb, msgpack.packb(body), *([] if data is None else [data])])
    if not sock.poll(10_000):
        return None, {}
    frames = sock.recv_multipart()
    return frames[1], msgpack.unpackb(frames[2])


def submit(sock: zmq.Socket[Any], sid: str, n: int = 1, channel: str = "messages") -> Any:
    return ask(sock, b"SUBMIT", {"id": sid, "channel": channel, "schema": APP}, application(n))


def upload(sock: zmq.Socket[Any], sid: str, data: bytes) -> tuple[bytes | None, dict[str, Any]]:
    sha = hashlib.sha256(data).digest()
    head = {"id": sid, "channel": "bulk", "name": "d.bin", "size": len(data), "sha256": sha}
    verb, body = ask(sock, b"UPLOAD", head)
    if verb != b"CREDIT":
        return verb, body
    return ask(sock, b"CHUNK", {"id": sid, "upload": body["upload"], "offset": 0}, data)


@pytest.fixture
def rig(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Rig]:
    mallory_rate = getattr(request, "param", 5000)
    dep = init_deployment(tmp_path / "d", port=47994, bulk=("bulk",))
    allow = Path(dep["api"]["allowlist_entry"])
    allow.write_text(
        allow.read_text().replace("channels: [messages]", "channels: [messages, bulk]")
    )
    mallory = SecretKey.generate("x25519")
    (allow.parent / "mallory.yaml").write_text(
        f"version: 1\nname: mallory\npublic_key: {mallory.public.to_string()}\n"
        f"channels: [messages, bulk]\nrate: {mallory_rate}\n"
    )
    cfg = load_outside_config(Path(dep["outside"]["config"]))
    assert cfg.audit is not None
    audit = AgentAudit(cfg.audit, "outside", cfg.state_dir, cfg.source)
    spool = Spool(cfg.state_dir)
    pipeline = ContentPipeline(workers=1)
    pipeline.start()
    items: list[SpoolItem] = []
    server = ApiServer(
        cfg,
        spool,
        load_secret_key(cfg.signing_key),
        items.extend,
        threading.Event(),
        audit=audit,
        pipeline=pipeline,
    )
    server.start()
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        yield Rig(server, dep, items, cfg.audit.dir, mallory, ctx)
    finally:
        ctx.destroy(linger=0)
        server.close()
        pipeline.close()
        spool.close()
        audit.close()


def test_a_malformed_id_costs_no_one_else_their_answer(rig: Rig) -> None:
    """An id of 4,000 'é' made the refusal's audit record too large; the error left the batch
    and every request read with it went unanswered."""
    portal = rig.sock()
    big = "\u00e9" * 4000
    head = {"id": "v-1", "channel": "messages", "schema": APP}
    portal.send_multipart([P, b"SUBMIT", msgpack.packb(head), application(1)])
    chunk = {"id": big, "upload": "x", "offset": 0}
    portal.send_multipart([P, b"CHUNK", msgpack.packb(chunk), b"x"])
    answers = []
    while len(answers) < 2 and portal.poll(10_000):
        frames = portal.recv_multipart()
        answers.append((frames[1], msgpack.unpackb(frames[2])))
    by_verb = dict(answers)  # (refusals go first: no commit to wait)
    assert by_verb[b"ACCEPTED"]["id"] == "v-1"
    assert (by_verb[b"REJECTED"]["id"], by_verb[b"REJECTED"]["code"]) == ("", "UNKNOWN_UPLOAD")
    deadline = time.monotonic() + 10  # (the refusal is answered first, then recorded)
    while not rig.records("intake.rejected") and time.monotonic() < deadline:
        time.sleep(0.05)
    (refused,) = rig.records("intake.rejected")
    assert "submission" not in refused["detail"]  # (an id over 256 characters is not echoed)


def test_a_client_that_reads_no_replies_holds_up_no_one(rig: Rig) -> None:
    """Once such a client's reply queue was full, each reply to it held the API thread for
    100 ms: every other client waited behind it."""
    portal = rig.sock()
    assert ask(portal, b"PING", {"id": "p"})[0] == b"PONG"
    mallory = rig.sock("mallory", RCVHWM=1, SNDHWM=100_000)
    body = msgpack.packb({"id": "M" * 256})  # (echoed: about 300 bytes a reply)
    for _ in range(80_000):
        mallory.send_multipart([P, b"PING", body])  # (never reads a reply)
    deadline = time.monotonic() + 30
    while rig.server.undeliverable == 0:  # (its queue and the socket's buffers are full)
        assert time.monotonic() < deadline
        time.sleep(0.1)
    for i in range(3):
        started = time.monotonic()
        assert submit(portal, f"v{i}", i)[0] == b"ACCEPTED"
        assert time.monotonic() - started < 2


@pytest.mark.parametrize("rig", [0.5], indirect=True)
def test_a_rate_under_one_a_second_admits_one_now_and_then(rig: Rig) -> None:
    """The bucket held at most ``rate`` tokens: under 1/s it never held the one a submission
    takes. And an id already answered gets its answer while the client is over its rate."""
    mallory = rig.sock("mallory")
    assert submit(mallory, "m-1", 1)[0] == b"ACCEPTED"
    verb, body = submit(mallory, "m-2", 2)
    assert verb == b"BUSY"
    assert body["retry_after"] > 0
    verb, body = submit(mallory, "m-1", 1)  # (over its rate still)
    assert verb == b"ACCEPTED"
    assert body["duplicate"] is True
    verb, body = submit(mallory, "m-1", 3)  # the same id, other content
    assert verb == b"REJECTED"
    assert body["code"] == "SUBMISSION_ID_REUSED"
    time.sleep(2.1)
    assert submit(mallory, "m-2", 2)[0] == b"ACCEPTED"


def test_refusals_before_the_rate_do_not_flood_the_audit_log(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused before the rate is charged (a channel not allowed, an unknown upload...):
    each got a record; now one per client and reason a minute, and a count of the rest."""
    monkeypatch.setattr(api_mod, "NOTE_INTERVAL", 1.5)
    portal = rig.sock()
    for i in range(300):
        verb, body = submit(portal, f"x{i}", channel="nope")
        assert (verb, body["code"]) == (b"REJECTED", "CHANNEL_NOT_ALLOWED")
    assert len(rig.records("intake.rejected")) == 1
    time.sleep(2)
    assert ask(portal, b"PING", {"id": "p"})[0] == b"PONG"  # (a turn of the loop)
    deadline = time.monotonic() + 5
    while len(rig.records("intake.rejected")) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    summary = rig.records("intake.rejected")[-1]
    assert summary["detail"] == {"suppressed": 299}


def test_the_start_up_self_test_is_not_recorded_as_a_stranger(rig: Rig) -> None:
    """The API checks at start that a throwaway key is refused (ZAP is on): that refusal is
    its own, not an intruder's; each start wrote an api.auth_failed record for it (an alarm
    for auditors and the SIEM). A stranger's handshake still is recorded."""
    portal = rig.sock()
    assert ask(portal, b"PING", {"id": "p"})[0] == b"PONG"  # (started, and a turn of the loop)
    assert rig.records("api.auth_failed") == []
    stranger = rig.sock("stranger")
    deadline = time.monotonic() + 10
    while not rig.records("api.auth_failed"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    stranger.close(0)
    assert len(rig.records("api.auth_failed")) == 1


def test_strangers_do_not_flood_the_audit_log(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each handshake with a fresh key wrote a record (the limit was per key; keys are free)."""
    monkeypatch.setattr(api_mod, "NOTE_INTERVAL", 3.0)
    socks = [rig.sock("stranger") for _ in range(60)]
    deadline = time.monotonic() + 20
    while len(rig.records("api.auth_failed")) < api_mod.NOTES_PER_INTERVAL:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1)
    for sock in socks:
        sock.close(0)
    records = rig.records("api.auth_failed")
    assert len(records) == api_mod.NOTES_PER_INTERVAL
    time.sleep(3)
    portal = rig.sock()
    assert ask(portal, b"PING", {"id": "p"})[0] == b"PONG"
    deadline = time.monotonic() + 5
    while len(rig.records("api.auth_failed")) <= api_mod.NOTES_PER_INTERVAL:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    summary = rig.records("api.auth_failed")[-1]
    assert summary["detail"]["suppressed"] >= 1
    assert "SUPPRESSED" in summary["reason"]


def test_an_upload_may_not_reuse_an_id_for_other_content(rig: Rig) -> None:
    portal = rig.sock()
    file_x, file_y = b"X" * 1000, b"Y" * 1000
    verb, first = upload(portal, "up-1", file_x)
    assert verb == b"ACCEPTED"
    verb, again = upload(portal, "up-1", file_x)
    assert (verb, again["item"], again["duplicate"]) == (b"ACCEPTED", first["item"], True)
    verb, body = upload(portal, "up-1", file_y)  # was ACCEPTED with file X's item
    assert (verb, body["code"]) == (b"REJECTED", "SUBMISSION_ID_REUSED")
    assert submit(portal, "msg-1")[0] == b"ACCEPTED"
    verb, body = upload(portal, "msg-1", file_x)
    assert (verb, body["code"]) == (b"REJECTED", "SUBMISSION_ID_REUSED")
    assert sorted(i.channel for i in rig.items) == ["bulk", "messages"]


def test_a_submit_may_not_take_the_id_of_an_upload_in_progress(rig: Rig) -> None:
    """The message was committed first; the upload's commit then failed on the id, after its
    intake.accepted record was written: the log named an item never spooled."""
    portal = rig.sock()
    data = b"D" * 1000
    sha = hashlib.sha256(data).digest()
    head = {"id": "same", "channel": "bulk", "name": "d.bin", "size": len(data), "sha256": sha}
    verb, credit = ask(portal, b"UPLOAD", head)
    assert verb == b"CREDIT"
    verb, body = submit(portal, "same")
    assert (verb, body["code"]) == (b"REJECTED", "SUBMISSION_ID_REUSED")
    chunk = {"id": "same", "upload": credit["upload"], "offset": 0}
    verb, body = ask(portal, b"CHUNK", chunk, data)
    assert verb == b"ACCEPTED"
    accepted = [r["object"]["item"] for r in rig.records("intake.accepted")]
    assert accepted == [i.object_id.hex() for i in rig.items] == [body["item"]]


def test_a_short_write_does_not_spool_a_short_file(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.write may write less than it was given (a disk nearly full, a file size limit);
    the rest was lost, and the hash check (over the chunk in memory) let it through."""
    real = os.write
    short = {"left": 1}

    def write(fd: int, data: bytes | memoryview) -> int:
        if short["left"] and os.readlink(f"/proc/self/fd/{fd}").endswith(".part"):
            short["left"] -= 1
            return real(fd, bytes(data)[: len(data) // 2])
        return real(fd, data)

    monkeypatch.setattr(api_mod.os, "write", write)
    portal = rig.sock()
    data = bytes(range(256)) * 400
    assert upload(portal, "sw", data)[0] == b"ACCEPTED"
    assert short["left"] == 0
    (item,) = rig.items
    assert item.size == len(data)


def test_slow_documents_cost_their_sender_not_everyone(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A document within the size limit made of a few hundred thousand numbers takes the
    single API thread a tenth of a second or more to refuse; sent in a loop, it held up every
    other client. Such checks are charged to their sender, who gets BUSY past its share."""
    monkeypatch.setattr(api_mod, "SLOW_SHARE", 0.05)
    monkeypatch.setattr(api_mod, "SLOW_BURST", 0.02)
    mallory, portal = rig.sock("mallory"), rig.sock()
    crafted = b'{"applicant":[' + b"0," * 150_000 + b"0]}"
    head = {"channel": "messages", "schema": APP}
    for n in range(4):
        mallory.send_multipart([P, b"SUBMIT", msgpack.packb(head | {"id": f"m-{n}"}), crafted])
    answers = []
    while len(answers) < 4 and mallory.poll(30_000):
        frames = mallory.recv_multipart()
        answers.append((frames[1], msgpack.unpackb(frames[2])))
    verbs = [v for v, _ in answers]
    assert verbs[0] == b"REJECTED"  # (checked, and charged)
    assert verbs[1:] == [b"BUSY"] * 3  # (not read: the share is spent)
    assert all(b["retry_after"] > 0 for v, b in answers if v == b"BUSY")
    assert submit(portal, "p-1")[0] == b"ACCEPTED"  # (others are not charged)
    deadline = time.monotonic() + 10
    while not (limited := rig.records("api.rate_limited")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r["reason"].split(":")[0] for r in limited] == ["SLOW_REQUESTS"]

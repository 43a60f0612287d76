"""Uploads are checked and spooled on a thread of their own: while the content pipeline works
on one client's file, other clients' messages are acknowledged, and the same submission sent
again waits for the first answer (BUSY, then the same item), never a second item.

An in-process ApiServer on a `ferry init` deployment, with real ZeroMQ CURVE sockets, the
real spool, audit log and content pipeline; the pipeline is held on the upload until the
test lets it go, so the order of the answers is certain.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from test_api import application
from test_audit_agents import wait_for

from ferry.audit.agent import AgentAudit
from ferry.client import Ack, Client
from ferry.config import load_client_config, load_outside_config
from ferry.content.base import Policy, Verdict
from ferry.crypto.keys import load_public_key, load_secret_key
from ferry.provision import init_deployment
from ferry.zmqsec import curve_client
from outside.api import ApiServer
from outside.content.pipeline import ContentPipeline
from outside.spool import Spool, SpoolItem

pytestmark = pytest.mark.integration

TEXT = "第{}行：申请材料扫描件的文字内容。\n"


class HeldPipeline:
    """The real content pipeline, held before each file until ``release`` is set."""

    def __init__(self, real: ContentPipeline) -> None:
        self.real = real
        self.entered = threading.Event()
        self.release = threading.Event()

    def process(self, policy: Policy, src: Path, name: str, workdir: Path) -> Verdict:
        self.entered.set()
        assert self.release.wait(60)
        return self.real.process(policy, src, name, workdir)


Rig = tuple[ApiServer, HeldPipeline, dict[str, Any], list[SpoolItem]]


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    monkeypatch.setattr("outside.api.UPLOAD_IDLE_TIMEOUT", 0.3)  # (idle uploads expire)
    dep = init_deployment(tmp_path / "d", port=47996)
    allow = Path(dep["api"]["allowlist_entry"])
    allow.write_text(
        allow.read_text().replace("channels: [messages]", "channels: [messages, documents]")
    )
    cfg = load_outside_config(Path(dep["outside"]["config"]))
    audit = AgentAudit(cfg.audit, "outside", cfg.state_dir, cfg.source)
    spool = Spool(cfg.state_dir)
    real = ContentPipeline(workers=1)
    real.start()
    held = HeldPipeline(real)
    items: list[SpoolItem] = []
    server = ApiServer(
        cfg,
        spool,
        load_secret_key(cfg.signing_key),
        items.extend,
        threading.Event(),
        audit=audit,
        pipeline=held,  # type: ignore[arg-type]
    )
    server.start()
    try:
        yield server, held, dep, items
    finally:
        held.release.set()
        server.close()
        real.close()
        spool.close()
        audit.close()


def test_messages_are_answered_while_an_upload_is_checked(api: Rig, tmp_path: Path) -> None:
    server, held, dep, items = api
    src = tmp_path / "扫描件.txt"
    src.write_text("".join(TEXT.format(i) for i in range(20_000)), encoding="utf-8")
    sid = str(uuid.uuid4())
    answers: dict[str, Ack | BaseException] = {}

    def upload(who: str) -> None:
        try:
            with Client.from_config(dep["api"]["client_config"]) as client:
                answers[who] = client.upload("documents", src, submission_id=sid, timeout=60)
        except BaseException as exc:  # noqa: BLE001  # asserted below
            answers[who] = exc

    first = threading.Thread(target=upload, args=("first",))
    first.start()
    assert held.entered.wait(30)  # every byte is in; the pipeline holds the file

    with Client.from_config(dep["api"]["client_config"]) as client:
        ack = client.submit("messages", application(7), schema="citizen-application", timeout=10)
    assert ack.channel == "messages"
    assert "first" not in answers  # the message was answered while the upload waits

    again = threading.Thread(target=upload, args=("again",))
    again.start()  # the same submission while it is being checked: BUSY, not a 2nd item
    wait_for(lambda: server.busy >= 1, what="BUSY for the same submission")
    assert "again" not in answers

    held.release.set()
    first.join(60)
    again.join(60)
    one, two = answers["first"], answers["again"]
    assert isinstance(one, Ack), one
    assert isinstance(two, Ack), two
    assert (one.duplicate, two.duplicate) == (False, True)
    assert one.item == two.item
    assert [i.object_id.hex() for i in items if i.channel == "documents"] == [one.item]
    assert server.accepted == 2  # the message and the upload, each once


def test_an_upload_being_checked_longer_than_the_idle_timeout_is_not_expired(
    api: Rig, tmp_path: Path
) -> None:
    server, held, dep, items = api
    src = tmp_path / "notice.txt"
    src.write_text("通知\n" * 1000, encoding="utf-8")
    result: list[Ack] = []
    with Client.from_config(dep["api"]["client_config"]) as client:
        t = threading.Thread(
            target=lambda: result.append(client.upload("documents", src, timeout=60))
        )
        t.start()
        assert held.entered.wait(30)
        time.sleep(1.0)  # the API thread looks for idle uploads at each turn
        held.release.set()
        t.join(60)
    assert result
    assert [i.object_id.hex() for i in items] == [result[0].item]
    assert server._uploads == {}  # answered, then forgotten


def test_an_upload_begun_again_under_its_id_starts_over(api: Rig) -> None:
    """A client that restarted sends UPLOAD again with the same id: the half-received upload
    is dropped (its chunks are refused) and the new one is what counts: one item."""
    _server, held, dep, items = api
    held.release.set()
    cfg = load_client_config(Path(dep["api"]["client_config"]))
    ctx: zmq.Context[Any] = zmq.Context()
    sock = curve_client(
        ctx, zmq.DEALER, load_secret_key(cfg.client_key), load_public_key(cfg.server_public_key)
    )
    sock.connect(cfg.endpoint)

    def ask(verb: bytes, body: dict[str, Any], data: bytes | None = None) -> tuple[bytes, Any]:
        sock.send_multipart([b"FERRY/1", verb, msgpack.packb(body), *([data] if data else [])])
        assert sock.poll(10_000), verb
        reply = sock.recv_multipart()
        return reply[1], msgpack.unpackb(reply[2])

    def send(token: str, offset: int, piece: bytes) -> tuple[bytes, Any]:
        return ask(b"CHUNK", {"id": "restart-1", "upload": token, "offset": offset}, piece)

    data = "公告\n".encode() * 50_000  # several chunks
    begin = {
        "id": "restart-1",
        "channel": "documents",
        "name": "公告.txt",
        "size": len(data),
        "sha256": hashlib.sha256(data).digest(),
    }
    try:
        verb, first = ask(b"UPLOAD", begin)
        assert verb == b"CREDIT"
        chunk = int(first["chunk_size"])
        verb, _ = ask(
            b"CHUNK", {"id": "restart-1", "upload": first["upload"], "offset": 0}, data[:chunk]
        )
        assert verb == b"CREDIT"
        verb, second = ask(b"UPLOAD", begin)  # the client starts over
        assert verb == b"CREDIT"
        assert second["upload"] != first["upload"]
        verb, old = ask(
            b"CHUNK",
            {"id": "restart-1", "upload": first["upload"], "offset": chunk},
            data[chunk : 2 * chunk],
        )
        assert (verb, old["code"]) == (b"REJECTED", "UNKNOWN_UPLOAD")
        offset, verb, reply = 0, b"CREDIT", second
        while verb == b"CREDIT":
            piece = data[offset : offset + chunk]
            verb, reply = ask(
                b"CHUNK", {"id": "restart-1", "upload": second["upload"], "offset": offset}, piece
            )
            offset += len(piece)
        assert verb == b"ACCEPTED", reply
        assert [i.object_id.hex() for i in items] == [reply["item"]]
    finally:
        sock.close(0)
        ctx.term()

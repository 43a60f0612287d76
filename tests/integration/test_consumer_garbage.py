"""Garbage on the inner consumer socket (ROUTER with CURVE) changes nothing for real consumers.

Real agents over UDP loopback deliver messages into the inside's outbox; a
stranger key is refused at the CURVE handshake; an allow-listed key sends
malformed frames and acknowledgements of items it was never given; afterwards
the well-behaved consumer still receives (and is the one to acknowledge)
every message.
"""

from __future__ import annotations

import copy
import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from cli_helpers import Agent, edit_yaml, fast, init
from zmq.utils import monitor

from ferry.client import Client, Consumer
from ferry.config import load_client_config
from ferry.crypto.keys import SecretKey, load_public_key, write_secret_key
from ferry.zmqsec import curve_client

pytestmark = pytest.mark.integration

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas" / "messages"
P = b"FERRY/1"
REDELIVER_AFTER = 1.0

StartAgent = Callable[[str, str], Agent]


def _application(n: int) -> bytes:
    doc = json.loads((SCHEMAS / "citizen-application.schema.json").read_text())["examples"][0]
    doc = copy.deepcopy(doc)
    doc["application_id"] = str(uuid.UUID(int=n + 1))
    return json.dumps(doc, ensure_ascii=False).encode()


class Gateway:
    def __init__(self, dep: dict[str, Any], inside: Agent, tmp: Path) -> None:
        self.dep = dep
        self.inside = inside
        self.tmp = tmp
        self.cfg = load_client_config(Path(dep["consumers"]["client_config"]))
        self.server = load_public_key(self.cfg.server_public_key, self.cfg.source.parent)
        self.ctx: zmq.Context[Any] = zmq.Context()

    def key(self, name: str, *, allow: bool) -> SecretKey:
        """A fresh consumer key, allow-listed for ``messages`` if ``allow``."""
        key = SecretKey.generate("x25519")
        write_secret_key(self.tmp / f"{name}.key", key, "consumer")
        if allow:
            entry = Path(self.dep["consumers"]["allowlist"]) / f"{name}.yaml"
            entry.write_text(
                f"version: 1\nname: {name}\npublic_key: {key.public.to_string()}\n"
                "channels: [messages]\nrate: 5000\n"
            )
        return key

    def socket(self, key: SecretKey) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
        """A connected DEALER with ``key`` and a monitor of its handshake events."""
        sock = curve_client(self.ctx, zmq.DEALER, key, self.server)
        sock.sndtimeo = 2000  # a DEALER without a peer would block forever
        mon = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_DISCONNECTED
        )
        sock.connect(self.cfg.endpoint)
        return sock, mon

    def submit(self, numbers: range) -> list[str]:
        with Client.from_config(self.dep["api"]["client_config"]) as client:
            items = [
                client.submit("messages", _application(n), schema="citizen-application").item
                for n in numbers
            ]
        folder = Path(self.dep["channels"]["messages"]["deliver"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # delivered inside: now waiting in the outbox
            if len(self.outbox(acked=None)) >= len(items) + self.acked_count():
                break
            assert self.inside.proc.poll() is None, self.inside.log.read_text()[-3000:]
            time.sleep(0.05)
        assert len(list(folder.glob("*.json"))) >= len(items)
        return items

    def outbox(self, *, acked: bool | None) -> dict[str, str | None]:
        """item -> acked_by, for all (None), acknowledged (True) or waiting (False) items."""
        db = Path(self.dep["inside"]["state_dir"]) / "inside.db"
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            where = "" if acked is None else f" WHERE acked_us IS {'NOT ' if acked else ''}NULL"
            rows = con.execute("SELECT object_id, acked_by FROM outbox" + where).fetchall()
        finally:
            con.close()
        return {bytes(r[0]).hex(): r[1] for r in rows}

    def acked_count(self) -> int:
        return len(self.outbox(acked=True))

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def _events(mon: zmq.Socket[Any], seconds: float) -> list[int]:
    out = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and mon.poll(int(left * 1000)):
        out.append(monitor.recv_monitor_message(mon)["event"])
    return out


def _consume(consumer: Consumer, want: set[str], timeout: float = 20) -> dict[str, int]:
    """Receive (and acknowledge) until every item in ``want`` came; count deliveries."""
    seen: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while not want <= seen.keys() and time.monotonic() < deadline:
        batch = consumer.receive(timeout=0.2)
        for d in batch:
            seen[d.item] = seen.get(d.item, 0) + 1
        if batch:
            consumer.ack([d.item for d in batch])
    return seen


@pytest.fixture
def gateway(tmp_path: Path, agents: StartAgent) -> Iterator[Gateway]:
    def out(data: dict[str, Any]) -> None:
        fast(data)
        for ch in data["channels"]:
            if ch["name"] == "messages":
                ch["repeat"] = {"count": 1, "spread": 0}

    dep = init(tmp_path / "d")
    edit_yaml(dep["outside"]["config"], out)
    edit_yaml(dep["inside"]["config"], lambda d: d["consumers"].update(redeliver_after=1.0))
    inside = agents("inside", dep["inside"]["config"])
    inside.wait_event("consumers_listening")
    agents("outside", dep["outside"]["config"]).wait_event("api_listening")
    gw = Gateway(dep, inside, tmp_path)
    yield gw
    gw.close()


def test_unknown_key_is_refused_and_gets_nothing(gateway: Gateway) -> None:
    items = gateway.submit(range(3))
    sock, mon = gateway.socket(gateway.key("stranger", allow=False))
    sock.send_multipart([P, b"READY", msgpack.packb({"credit": 100, "channels": ["messages"]})])
    events = _events(mon, 2.0)
    assert zmq.EVENT_HANDSHAKE_FAILED_AUTH in events
    assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in events
    assert not sock.poll(500)
    assert gateway.outbox(acked=True) == {}
    with Consumer.from_config(gateway.dep["consumers"]["client_config"]) as consumer:
        assert set(_consume(consumer, set(items))) == set(items)
    assert gateway.inside.proc.poll() is None


GARBAGE: list[list[bytes]] = [
    # wrong frame counts
    [b"garbage"],
    [P],
    [P, b"READY"],
    [P, b"READY", msgpack.packb({"credit": 5}), b"extra", b"frames"],
    [],
    # wrong protocol, unknown verb
    [b"FERRY/2", b"READY", msgpack.packb({"credit": 5})],
    [P, b"LAUNCH", msgpack.packb({"credit": 0})],
    # bodies that are not msgpack maps
    [P, b"READY", b"\xc1 not msgpack"],
    [P, b"READY", b'{"credit": 5, "channels": ["messages"]}'],  # JSON
    [P, b"ACK", b""],
    [P, b"ACK", msgpack.packb([1, 2, 3])],
    [P, b"ACK", msgpack.packb("items")],
    [P, b"READY", b"\x91" * 60_000 + b"\xc0"],  # nested 60,000 deep
    [P, b"READY", b"\x81\x01\x02"],  # {1: 2}: a map with an integer key
    # credit of the wrong type or sign (never a valid grant)
    *(
        [P, b"READY", msgpack.packb({"credit": c, "channels": ["messages"]})]
        for c in (-5, 0, 1.5, "10", True, None, [1], {"n": 1})
    ),
    # channels it may not read, of the wrong type, unhashable
    [P, b"READY", msgpack.packb({"credit": 0, "channels": ["secret", 7, {"a": 1}, ["x"]]})],
    [P, b"READY", msgpack.packb({"credit": 0, "channels": "messages"})],
    # ACKs of nothing in particular: malformed ids, unknown ids, many ids
    [P, b"ACK", msgpack.packb({"items": "not a list"})],
    [P, b"ACK", msgpack.packb({"items": [1, None, b"\x00" * 16, "zz" * 16, "0" * 31, "0" * 33]})],
    [P, b"ACK", msgpack.packb({"items": [uuid.uuid4().hex for _ in range(2000)]})],
    [P, b"ACK", msgpack.packb({"items": ["ab" * 16] * 20_000})],
]


def test_malformed_frames_change_nothing_for_a_well_behaved_consumer(gateway: Gateway) -> None:
    items = gateway.submit(range(4))
    key = gateway.key("prober", allow=True)
    time.sleep(1.5)  # the allow-list is re-read at most once a second
    sock, mon = gateway.socket(key)
    for frames in GARBAGE:
        if frames:
            sock.send_multipart(frames)
    assert zmq.EVENT_HANDSHAKE_SUCCEEDED in _events(mon, 1.0)  # it was let in
    assert not sock.poll(500)  # never granted credit: nothing delivered to it
    # Over the size limit: the server drops the connection (and keeps serving others).
    sock.send_multipart([P, b"READY", msgpack.packb({"credit": 0}), b"x" * (200 * 1024)])
    assert zmq.EVENT_DISCONNECTED in _events(mon, 2.0)
    time.sleep(0.5)
    assert gateway.outbox(acked=True) == {}  # no garbage counted as an acknowledgement

    more = gateway.submit(range(4, 6))  # delivered after the garbage
    with Consumer.from_config(gateway.dep["consumers"]["client_config"]) as consumer:
        seen = _consume(consumer, set(items + more))
        time.sleep(0.5)  # acknowledgements are recorded in batches
    assert set(seen) == set(items + more)
    deadline = time.monotonic() + 5
    while len(gateway.outbox(acked=True)) < 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gateway.outbox(acked=None) == dict.fromkeys(items + more, "inner-app")
    assert gateway.inside.proc.poll() is None
    assert not any(e.get("event") == "consumer_loop_error" for e in gateway.inside.events())


@pytest.mark.parametrize("who", ["another-consumer", "same-key-other-connection"])
def test_ack_from_a_connection_never_given_the_item_does_not_acknowledge_it(
    gateway: Gateway, who: str
) -> None:
    """ACK before RECEIVE: an item id learnt elsewhere (the outer API returns it) and
    acknowledged by a connection it was never delivered to must still reach the
    consumer that processes it."""
    [item] = gateway.submit(range(1))
    if who == "another-consumer":
        key = gateway.key("prober", allow=True)
        time.sleep(1.5)  # allow-list reload
    else:
        from ferry.crypto.keys import load_secret_key  # noqa: PLC0415

        key = load_secret_key(gateway.cfg.client_key)
    sock, mon = gateway.socket(key)
    sock.send_multipart([P, b"ACK", msgpack.packb({"items": [item], "credit": 0})])
    assert zmq.EVENT_HANDSHAKE_SUCCEEDED in _events(mon, 1.0)
    time.sleep(0.5)  # the acknowledgement is processed (and would be flushed)
    with Consumer.from_config(gateway.dep["consumers"]["client_config"]) as consumer:
        seen = _consume(consumer, {item}, timeout=3 * REDELIVER_AFTER + 2)
    assert seen.get(item, 0) >= 1, f"{item} was never delivered after a stray ACK ({who})"

"""A consumer's connection to the inside is made again: after a restart of the inside, or when
the network dropped it. The inside knows consumers by their connection only, so a consumer
that outlives a restart must say READY again, or it would wait for ever; and connections that
are gone must not pile up in the inside. Real agents over UDP loopback, real CURVE sockets."""

from __future__ import annotations

import copy
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from cli_helpers import Agent, edit_yaml, fast, init

from ferry.client import Client, Consumer
from ferry.config import load_client_config, load_inside_config
from ferry.crypto.keys import load_public_key, load_secret_key
from ferry.provision import init_deployment
from ferry.zmqsec import curve_client
from inside import consumers
from inside.consumers import ConsumerServer, Outbox, OutboxItem
from inside.ledger import Ledger

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas" / "messages"
P = b"FERRY/1"


def _application() -> bytes:
    doc = copy.deepcopy(
        json.loads((SCHEMAS / "citizen-application.schema.json").read_text())["examples"][0]
    )
    doc["application_id"] = str(uuid.uuid4())
    return json.dumps(doc, ensure_ascii=False).encode()


def _receive(consumer: Consumer, want: set[str], timeout: float = 30.0) -> set[str]:
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while not want <= seen and time.monotonic() < deadline:
        batch = consumer.receive(timeout=0.2)
        seen.update(d.item for d in batch)
        if batch:
            consumer.ack([d.item for d in batch])
    return seen


@pytest.mark.integration
def test_a_consumer_outlives_a_restart_of_the_inside(tmp_path: Path, agents: Any) -> None:
    dep = init(tmp_path / "d")
    edit_yaml(dep["outside"]["config"], fast)
    inside: Agent = agents("inside", dep["inside"]["config"])
    inside.wait_event("consumers_listening")
    agents("outside", dep["outside"]["config"]).wait_event("api_listening")
    with (
        Client.from_config(dep["api"]["client_config"]) as client,
        Consumer.from_config(dep["consumers"]["client_config"]) as consumer,
    ):

        def submit(n: int) -> set[str]:
            return {
                client.submit("messages", _application(), schema="citizen-application").item
                for _ in range(n)
            }

        first = submit(2)
        assert _receive(consumer, first) >= first
        assert consumer.reconnects == 0
        assert inside.stop() == 0
        inside = agents("inside", dep["inside"]["config"])
        inside.wait_event("consumers_listening")
        later = submit(3)
        assert _receive(consumer, later) >= later  # (without READY again: nothing, for ever)
        assert consumer.reconnects == 1


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ConsumerServer, Any]]:
    """The inside's consumer server alone, in this process, on a fresh deployment."""
    monkeypatch.setattr(consumers, "PROBE_AFTER", 0.5)
    dep = init_deployment(tmp_path / "d", port=47981)
    cfg = load_inside_config(Path(dep["inside"]["config"]))
    assert cfg.consumers is not None
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(cfg.state_dir)
    srv = ConsumerServer(cfg.consumers, Outbox(ledger), threading.Event())
    srv.start()
    yield srv, dep
    srv.close()
    srv.outbox.close()
    ledger.close()


def _dealer(ctx: zmq.Context[Any], dep: dict[str, Any], *, ready: bool = True) -> zmq.Socket[Any]:
    """A consumer's DEALER, connected; it says READY (credit 10) if ``ready``."""
    ccfg = load_client_config(Path(dep["consumers"]["client_config"]))
    sock = curve_client(
        ctx,
        zmq.DEALER,
        load_secret_key(ccfg.client_key, ("x25519",)),
        load_public_key(ccfg.server_public_key, ccfg.source.parent),
    )
    sock.connect(ccfg.endpoint)
    if ready:
        sock.send_multipart([P, b"READY", msgpack.packb({"credit": 10})])
    return sock


def _wait(cond: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(cond())


@pytest.mark.integration
def test_a_consumer_whose_connection_is_gone_is_forgotten(
    server: tuple[ConsumerServer, Any],
) -> None:
    srv, dep = server
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        live, gone = _dealer(ctx, dep), _dealer(ctx, dep)
        assert _wait(lambda: len(srv._consumers) == 2)
        gone.close(0)
        assert _wait(lambda: srv.forgotten == 1)
        assert len(srv._consumers) == 1
        # the one still there was asked, and answered nothing: it stays
        assert live.poll(5000)
        frames = live.recv_multipart()
        assert frames[:2] == [P, b"PING"]
        time.sleep(1.5)  # (probed again meanwhile)
        assert srv.forgotten == 1
        assert len(srv._consumers) == 1
        live.close(0)
    finally:
        ctx.destroy(linger=0)


def _offer(srv: ConsumerServer, channel: str, n: int) -> list[bytes]:
    items = [
        OutboxItem(os.urandom(16), channel, i + 1, "s", "api:x", 0, b'{"n":%d}' % i)
        for i in range(n)
    ]
    srv.outbox.add_many(items)
    srv.notify(items)
    return [i.object_id for i in items]


@pytest.mark.slow  # (5-10 s: run with `python3 tasks.py test --slow`)
@pytest.mark.integration
@pytest.mark.parametrize("change", ["removed", "narrowed"])
def test_a_consumer_whose_key_is_taken_off_gets_nothing_more(
    server: tuple[ConsumerServer, Any], change: str
) -> None:
    """The allow-list file says a removal takes effect within a second, also for connected
    clients; the consumer server kept serving what a connection was allowed at READY."""
    srv, dep = server
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        sock = _dealer(ctx, dep)
        _offer(srv, "messages", 1)
        assert sock.poll(5000)
        assert sock.recv_multipart()[1] == b"DELIVER"
        entry = Path(dep["consumers"]["allowlist_entry"])
        if change == "removed":
            entry.unlink()
        else:
            entry.write_text(entry.read_text().replace("channels: [messages]", "channels: [x]"))
        time.sleep(2.5)  # (the allow-list is read again within a second or two)
        _offer(srv, "messages", 3)
        verbs = []
        deadline = time.monotonic() + 3
        while (left := deadline - time.monotonic()) > 0:  # (PINGs come: it is silent)
            if sock.poll(int(left * 1000)):
                verbs.append(sock.recv_multipart()[1])
        assert b"DELIVER" not in verbs  # (before: all three)
    finally:
        ctx.destroy(linger=0)


@pytest.mark.integration
def test_only_ready_makes_a_consumer(server: tuple[ConsumerServer, Any]) -> None:
    """An ACK from a connection the server does not know (forgotten) made a consumer of it
    with every channel its key may read, not those it asked for."""
    srv, dep = server
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        sock = _dealer(ctx, dep, ready=False)
        sock.send_multipart([P, b"ACK", msgpack.packb({"items": [], "credit": 5})])
        time.sleep(1)
        assert srv._consumers == {}
        _offer(srv, "messages", 1)
        assert not sock.poll(1500)  # (not a consumer: not even a PING)
        sock.send_multipart([P, b"READY", msgpack.packb({"credit": 5})])
        assert sock.poll(5000)
        assert sock.recv_multipart()[1] == b"DELIVER"
    finally:
        ctx.destroy(linger=0)

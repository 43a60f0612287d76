"""Connections past the API's limits (``api.max_connections``,
``max_connections_per_address``; the inner consumer endpoint has the same) are shut, whoever
opens them: a stranger who never finishes a handshake, or an allow-listed client opening
hundreds. Before, one address could open connections until the outside ran out of descriptors
(the API stopped answering everyone, the audit shipper failed with EMFILE).

An in-process ApiServer on a `ferry init` deployment (test_api_abuse's rig), real TCP and
CURVE sockets from several loopback addresses.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
import zmq
from test_api_abuse import Rig, submit

from ferry.audit.agent import AgentAudit
from ferry.config import load_client_config, load_inside_config, load_outside_config
from ferry.crypto.keys import SecretKey, load_public_key, load_secret_key
from ferry.provision import init_deployment
from ferry.zmqsec import curve_client
from inside.consumers import ConsumerServer, Outbox
from inside.ledger import Ledger
from outside import api as api_mod
from outside.api import ApiServer
from outside.spool import Spool, SpoolItem

pytestmark = pytest.mark.integration

PER_ADDRESS = 5
TOTAL = 12


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    dep = init_deployment(tmp_path / "d", port=47996)
    path = Path(dep["outside"]["config"])
    data = yaml.safe_load(path.read_text())
    data["api"]["max_connections"] = TOTAL
    data["api"]["max_connections_per_address"] = PER_ADDRESS
    path.write_text(yaml.safe_dump(data))
    cfg = load_outside_config(path)
    assert cfg.audit is not None
    assert cfg.api is not None
    assert (cfg.api.max_connections, cfg.api.max_connections_per_address) == (TOTAL, PER_ADDRESS)
    audit = AgentAudit(cfg.audit, "outside", cfg.state_dir, cfg.source)
    spool = Spool(cfg.state_dir)
    items: list[SpoolItem] = []
    server = ApiServer(
        cfg, spool, load_secret_key(cfg.signing_key), items.extend, threading.Event(), audit=audit
    )
    server.start()
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        yield Rig(server, dep, items, cfg.audit.dir, SecretKey.generate("x25519"), ctx)
    finally:
        ctx.destroy(linger=0)
        server.close()
        spool.close()
        audit.close()


def _port(rig: Rig) -> int:
    return int(rig.server.endpoint.rsplit(":", 1)[1])


def _raw(rig: Rig, source: str, n: int) -> list[socket.socket]:
    """``n`` TCP connections from ``source`` that never say a word."""
    return [
        socket.create_connection(("127.0.0.1", _port(rig)), timeout=5, source_address=(source, 0))
        for _ in range(n)
    ]


def _closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True if the server closed this connection (EOF or reset after its greeting)."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


def _client(rig: Rig, source: str) -> zmq.Socket[Any]:
    """The allow-listed portal client, connecting from ``source``."""
    ccfg = load_client_config(Path(rig.dep["api"]["client_config"]))
    sock = curve_client(
        rig.ctx,
        zmq.DEALER,
        load_secret_key(ccfg.client_key),
        load_public_key(ccfg.server_public_key),
    )
    sock.connect(f"tcp://{source}:0;127.0.0.1:{_port(rig)}")
    return sock


def _until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_flood_from_one_address_is_cut_to_its_share_and_others_are_served(rig: Rig) -> None:
    flood = _raw(rig, "127.0.0.2", 40)
    try:
        _until(lambda: rig.server.guard.refused >= 40 - PER_ADDRESS)
        assert rig.server.guard.counts()[1].get("127.0.0.2") == PER_ADDRESS
        closed = [s for s in flood if _closed_by_server(s, timeout=0.5)]
        assert len(closed) == 40 - PER_ADDRESS
        portal = _client(rig, "127.0.0.1")
        assert submit(portal, "after-flood")[0] == b"ACCEPTED"
        # recorded once (not 35 times), naming the address and the limit
        (record,) = [
            r for r in rig.records("api.rate_limited") if r["reason"].startswith("CONNECTIONS:")
        ]
        assert record["detail"]["address"] == "127.0.0.2"
        assert f"more than {PER_ADDRESS} connections from 127.0.0.2" in record["reason"]
        assert record["result"] == "rejected"
    finally:
        for s in flood:
            s.close()
    # the address is not banned: once its connections are gone it is served again
    _until(lambda: "127.0.0.2" not in rig.server.guard.counts()[1])
    again = _client(rig, "127.0.0.2")
    assert submit(again, "from-2-again")[0] == b"ACCEPTED"


def test_an_allow_listed_client_cannot_hold_more_than_its_share(rig: Rig) -> None:
    """60 authenticated connections from one address: PER_ADDRESS stay, the rest are shut
    (zmq reconnects them, and they are shut again); another address is answered meanwhile."""
    many = [_client(rig, "127.0.0.3") for _ in range(60)]
    try:
        _until(lambda: rig.server.guard.refused >= 60 - PER_ADDRESS)
        held, by_address = rig.server.guard.counts()
        assert by_address.get("127.0.0.3", 0) <= PER_ADDRESS
        assert held <= TOTAL
        portal = _client(rig, "127.0.0.1")
        for i in range(3):
            assert submit(portal, f"v{i}", i)[0] == b"ACCEPTED"
        # the connections the guard kept work as usual
        answered = 0
        for sock in many:
            sock.send_multipart([b"FERRY/1", b"PING", b"\x80"])
        deadline = time.monotonic() + 5
        for sock in many:
            if sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                sock.recv_multipart()
                answered += 1
        assert answered >= 1
    finally:
        for sock in many:
            sock.close(0)


def test_past_the_total_limit_new_connections_wait_for_room(rig: Rig) -> None:
    sources = ["127.0.0.4", "127.0.0.5", "127.0.0.6"]
    socks = [s for source in sources for s in _raw(rig, source, 4)]  # 12: the total
    try:
        _until(lambda: rig.server.guard.counts()[0] == TOTAL)
        extra = _raw(rig, "127.0.0.7", 2)
        assert all(_closed_by_server(s) for s in extra)
        assert rig.server.guard.counts()[0] == TOTAL
        records = [
            r for r in rig.records("api.rate_limited") if r["reason"].startswith("CONNECTIONS:")
        ]
        assert [r["detail"]["address"] for r in records] == ["127.0.0.7"]
        assert f"more than {TOTAL} connections in all" in records[0]["reason"]
        for s in socks[:3]:
            s.close()
        _until(lambda: rig.server.guard.counts()[0] == TOTAL - 3)
        portal = _client(rig, "127.0.0.7")
        assert submit(portal, "room-again")[0] == b"ACCEPTED"
    finally:
        for s in socks:
            s.close()


def test_the_inner_consumer_endpoint_is_guarded_too(tmp_path: Path) -> None:
    dep = init_deployment(tmp_path / "d", port=47997)
    cfg = load_inside_config(Path(dep["inside"]["config"]))
    assert cfg.consumers is not None
    assert cfg.consumers.endpoint
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(cfg.state_dir)
    params = dataclasses.replace(cfg.consumers, max_connections_per_address=2)
    server = ConsumerServer(params, Outbox(ledger), threading.Event())
    server.start()
    port = int(server.endpoint.rsplit(":", 1)[1])
    flood = [
        socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
        for _ in range(5)
    ]
    try:
        (guard,) = server.guards
        _until(lambda: guard.refused == 3)
        assert guard.counts() == (2, {"127.0.0.2": 2})
        assert sum(_closed_by_server(s, timeout=0.5) for s in flood) == 3
    finally:
        for s in flood:
            s.close()
        server.close()
        ledger.close()


def test_connection_refusals_from_many_addresses_hold_back_no_rate_records(rig: Rig) -> None:
    """Refused connections have their own share of api.rate_limited records: a flood from
    more addresses than that share does not keep a client's RATE_LIMIT record out of the log."""
    for i in range(40):
        rig.server._connection_refused(f"10.0.0.{i}", "more than 5 connections from …", 6)
    assert rig.server._first_in_a_while("api.rate_limited", "portal")
    refused = [r for r in rig.records("api.rate_limited") if r["reason"].startswith("CONNECTIONS:")]
    assert len(refused) == api_mod.NOTES_PER_INTERVAL  # (the rest counted, recorded later)

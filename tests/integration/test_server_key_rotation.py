"""Rotating the CURVE server keys of the outer API and of the inner consumers, with overlap.

During the overlap the earlier key stays on the endpoint its clients know it by and the new
key is served on a new endpoint (docs/OPERATIONS.md, "Rotating the CURVE server keys").
Real agents from ``ferry init``, real ZeroMQ sockets with CURVE.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from cli_helpers import client_config_like, edit_yaml, fast, ferry, init
from test_api import application
from test_audit_agents import records
from zmq.auth.thread import ThreadAuthenticator

from ferry.client import ApiUnavailable, Client, Consumer
from ferry.config_types import ApiClient
from ferry.crypto.keys import SecretKey, load_public_key, load_secret_key
from ferry.errors import ConfigError
from ferry.provision import free_tcp_port
from ferry.zmqsec import ServerKeys, curve_client, curve_server

pytestmark = pytest.mark.integration


def _free_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_tcp_port()}"


def _new_key(keys: Path, role: str, name: str) -> dict[str, Any]:
    out = ferry("keygen", "--role", role, "--out", str(keys), "--name", name, "--json")
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _client_config(src: str, dst: Path, endpoint: str, server_pub: str) -> Path:
    """A copy of the client config ``src`` that connects to ``endpoint`` with ``server_pub``."""
    return Path(client_config_like(src, dst, endpoint=endpoint, server_public_key=server_pub))


def _consume(consumer: Consumer, n: int, timeout: float = 30.0) -> set[str]:
    got: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        batch = consumer.receive(timeout=0.5)
        got.update(d.item for d in batch)
        if batch:
            consumer.ack([d.item for d in batch])
    return got


def _status(path: Path, key: str, want: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """``key`` of a status file once its entries name ``want`` clients in all."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = json.loads(path.read_text())[key]
        except (OSError, ValueError, KeyError):
            found = []
        if sum(len(e["clients"]) for e in found) >= want or time.monotonic() > deadline:
            return found  # type: ignore[no-any-return]
        time.sleep(0.1)


def _server_key_events(audit_dir: str, role: str) -> list[tuple[str, str, object]]:
    return [
        (r["event"], r["object"]["key_id"], r["detail"].get("current"))
        for r in records(audit_dir)
        if r["event"] in {"key.activated", "key.retired"} and r["detail"]["role"] == role
    ]


@pytest.mark.slow  # (10-40 s: run with `python3 tasks.py test --slow`)
def test_server_keys_rotate_with_an_overlap(tmp_path: Path, agents) -> None:
    dep = init(tmp_path / "d")
    out_keys = Path(dep["outside"]["config"]).parent / "keys"
    in_keys = Path(dep["inside"]["config"]).parent / "keys"
    api_new = _new_key(out_keys, "api-server", "api-server-2")
    con_new = _new_key(in_keys, "consumer-server", "consumer-server-2")
    old_api, new_api = dep["api"]["endpoint"], _free_endpoint()
    old_con, new_con = dep["consumers"]["endpoint"], _free_endpoint()
    old_pub, new_pub = _free_endpoint(), _free_endpoint()
    old_api_id = load_public_key(dep["api"]["server_public_key"]).key_id.hex()
    old_con_id = load_public_key(dep["consumers"]["server_public_key"]).key_id.hex()

    def outside_overlap(data: dict[str, Any]) -> None:
        fast(data)
        data["api"]["previous_server_keys"] = [
            {"key": data["api"]["server_key"], "endpoint": old_api}
        ]
        data["api"].update(server_key=api_new["secret_key"], endpoint=new_api)

    def inside_overlap(data: dict[str, Any]) -> None:
        data["consumers"]["previous_server_keys"] = [
            {"key": data["consumers"]["server_key"], "endpoint": old_con, "publish": old_pub}
        ]
        data["consumers"].update(
            server_key=con_new["secret_key"], endpoint=new_con, publish=new_pub
        )

    edit_yaml(dep["outside"]["config"], outside_overlap)
    edit_yaml(dep["inside"]["config"], inside_overlap)
    inside = agents("inside", dep["inside"]["config"])
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("api_listening")
    inside.wait_event("consumers_listening")

    old_client = dep["api"]["client_config"]  # as ferry init wrote it: old endpoint, old key
    new_client = _client_config(
        old_client, tmp_path / "portal-new.yaml", new_api, api_new["public_key"]
    )
    wrong_client = _client_config(
        old_client, tmp_path / "portal-wrong.yaml", new_api, dep["api"]["server_public_key"]
    )
    old_consumer = dep["consumers"]["client_config"]
    new_consumer = _client_config(
        old_consumer, tmp_path / "inner-new.yaml", new_con, con_new["public_key"]
    )

    # subscribers on both PUB endpoints, each with the key served there
    ctx: zmq.Context[Any] = zmq.Context()
    consumer_key = load_secret_key(Path(old_consumer).parent / "inner-app.key", ("x25519",))
    subs = {}
    for endpoint, server in (
        (old_pub, load_public_key(dep["consumers"]["server_public_key"])),
        (new_pub, load_public_key(con_new["public_key"])),
    ):
        sub = curve_client(ctx, zmq.SUB, consumer_key, server)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(endpoint)
        subs[endpoint] = sub
    time.sleep(1.0)  # (PUB drops messages for subscribers not connected yet)

    acks = {}
    for name, cfg, n in (("old", old_client, 1), ("new", new_client, 2)):
        with Client.from_config(cfg) as client:
            acks[name] = client.submit("messages", application(n), schema="citizen-application")
    with Client.from_config(wrong_client) as client, pytest.raises(ApiUnavailable):
        client.submit("messages", application(3), schema="citizen-application", timeout=3)

    with Consumer.from_config(old_consumer) as consumer:
        assert _consume(consumer, 2) == {acks["old"].item, acks["new"].item}
    for endpoint, sub in subs.items():  # both PUB endpoints publish every message
        items = set()
        deadline = time.monotonic() + 10
        while len(items) < 2 and sub.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            _, meta, _ = sub.recv_multipart()
            items.add(msgpack.unpackb(meta)["item"])
        assert items == {acks["old"].item, acks["new"].item}, endpoint
        sub.close(0)
    ctx.term()
    with Client.from_config(new_client) as client:
        acks["third"] = client.submit("messages", application(4), schema="citizen-application")
    with Consumer.from_config(new_consumer) as consumer:
        assert _consume(consumer, 1) == {acks["third"].item}

    # who still uses the earlier keys: the status files, the logs, the outside's audit log
    api_prev = _status(
        Path(dep["outside"]["state_dir"]) / "status.json", "api_previous_server_keys", 1
    )
    assert [(e["key_id"], e["endpoints"], list(e["clients"])) for e in api_prev] == [
        (old_api_id, {"api": old_api}, ["portal"])
    ]
    con_prev = _status(
        Path(dep["inside"]["state_dir"]) / "status.json", "consumer_previous_server_keys", 1
    )
    assert [(e["key_id"], e["endpoints"], list(e["clients"])) for e in con_prev] == [
        (old_con_id, {"consumers": old_con, "publish": old_pub}, ["inner-app"])
    ]
    outside.wait_event("client_on_previous_server_key", client="portal", server_key=old_api_id)
    inside.wait_event("consumer_on_previous_server_key", consumer="inner-app")
    connected = {
        (r["subject"]["id"], r["detail"]["server_key"], r["detail"]["previous_key"])
        for r in records(dep["outside"]["audit_dir"])
        if r["event"] == "api.connected"
    }
    new_api_id = api_new["key_id"]
    assert ("portal", old_api_id, True) in connected
    assert ("portal", new_api_id, False) in connected
    assert _server_key_events(dep["outside"]["audit_dir"], "api-server") == [
        ("key.activated", new_api_id, True),
        ("key.activated", old_api_id, False),
    ]

    # end of the overlap: the earlier key is gone, its endpoint with it
    outside.stop()
    edit_yaml(dep["outside"]["config"], lambda d: d["api"].pop("previous_server_keys"))
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("api_listening")
    with Client.from_config(old_client) as client, pytest.raises(ApiUnavailable):
        client.submit("messages", application(5), schema="citizen-application", timeout=3)
    with Client.from_config(new_client) as client:
        assert client.submit("messages", application(6), schema="citizen-application").seq == 4
    assert _server_key_events(dep["outside"]["audit_dir"], "api-server")[2:] == [
        ("key.retired", old_api_id, None)
    ]


@pytest.mark.slow  # (5-10 s: run with `python3 tasks.py test --slow`)
def test_one_socket_answers_each_endpoint_with_its_own_key() -> None:
    """ServerKeys on real CURVE sockets, no agents: each endpoint is bound with its key and
    ZAP domain, handshakes are attributed to the key used, and a key given twice is refused."""
    current, earlier, client_key = (SecretKey.generate("x25519") for _ in range(3))
    with pytest.raises(ConfigError, match="given twice"):
        ServerKeys("test", current, [earlier, SecretKey("x25519", earlier.raw)])
    keys = ServerKeys("test", current, [earlier])
    client = ApiClient("app", "unused", ("messages",))
    seen: list[tuple[str, bool, bool]] = []
    keys.on_handshake = lambda served, c, first: seen.append((served.domain, served.current, first))

    class Provider:  # the Allowlist's part: every key allowed, reported to ServerKeys
        def callback(self, domain: str, key: bytes) -> bool:
            keys.handshake(domain, client)
            return True

    ctx: zmq.Context[Any] = zmq.Context()
    auth = ThreadAuthenticator(ctx)
    auth.start()
    for domain in keys.domains:
        auth.configure_curve_callback(domain, credentials_provider=Provider())
    server = curve_server(ctx, zmq.ROUTER, current, "test", max_message=1024)
    keys.bind(server, "api", [_free_endpoint(), _free_endpoint()])
    try:
        assert server.zap_domain == b"test"
        later = _free_endpoint()  # bound afterwards: the options were left at the current key
        server.bind(later)

        def hello(endpoint: str, server_key: SecretKey) -> bool:
            sock = curve_client(ctx, zmq.DEALER, client_key, server_key.public)
            sock.connect(endpoint)
            sock.send(b"hello")
            ok = bool(server.poll(2000))
            if ok:
                server.recv_multipart()
            sock.close(0)
            return ok

        new_ep, old_ep = keys.served[0].endpoints["api"], keys.served[1].endpoints["api"]
        assert hello(old_ep, earlier)
        assert hello(new_ep, current)
        assert not hello(new_ep, earlier)  # the wrong key for that endpoint
        assert not hello(old_ep, current)
        assert hello(old_ep, earlier)
        assert hello(later, current)
        assert not hello(later, earlier)
        assert seen == [("test/previous-1", False, True), ("test", True, True),
                        ("test/previous-1", False, False), ("test", True, False)]  # fmt: skip
        [status] = keys.status()
        assert status["key_id"] == earlier.public.key_id.hex()
        assert status["endpoints"] == {"api": old_ep}
        assert list(status["clients"]) == ["app"]
        assert keys.in_use("api-server") == [
            ("api-server", current.public, True),
            ("api-server", earlier.public, False),
        ]
    finally:
        server.close(0)
        auth.stop()
        ctx.term()

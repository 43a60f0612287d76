"""Messages handed to inner consumers and not acknowledged yet: what the inside keeps of
them, how they are offered again, and who may acknowledge them. The inside's consumer
server alone, in this process, with real CURVE sockets and a real SQLite outbox."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from ferry.client import Consumer
from ferry.config import load_client_config, load_inside_config
from ferry.crypto.keys import SecretKey, load_public_key, load_secret_key
from ferry.provision import init_deployment
from ferry.zmqsec import curve_client
from inside import consumers
from inside.consumers import ConsumerServer, Outbox, OutboxItem, _Consumer
from inside.ledger import Ledger

P = b"FERRY/1"
WINDOW = 40
REDELIVER = 0.5


class _Server:
    def __init__(self, root: Path) -> None:
        self.dep = init_deployment(root, port=47987)
        cfg = load_inside_config(Path(self.dep["inside"]["config"]))
        assert cfg.consumers is not None
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        ccfg = load_client_config(Path(self.dep["consumers"]["client_config"]))
        self.server_public = load_public_key(ccfg.server_public_key, ccfg.source.parent)
        self.endpoint = ccfg.endpoint
        self.key = load_secret_key(ccfg.client_key, ("x25519",))
        # a second consumer key, allowed on another channel only
        self.other = SecretKey.generate("x25519")
        self.entry = Path(self.dep["consumers"]["allowlist_entry"])
        (self.entry.parent / "other-app.yaml").write_text(
            "version: 1\nname: other-app\n"
            f"public_key: {self.other.public.to_string()}\nchannels: [other]\n"
        )
        self.ledger = Ledger(cfg.state_dir)
        self.outbox = Outbox(self.ledger)
        params = dataclasses.replace(cfg.consumers, redeliver_after=REDELIVER)
        self.srv = ConsumerServer(params, self.outbox, threading.Event())
        self.srv.start()
        self.ctx: zmq.Context[Any] = zmq.Context()

    def dealer(
        self, *, key: SecretKey | None = None, routing_id: bytes | None = None, credit: int = 10
    ) -> zmq.Socket[Any]:
        """A consumer's DEALER, connected; it says READY with ``credit`` unless 0."""
        sock = curve_client(self.ctx, zmq.DEALER, key or self.key, self.server_public)
        if routing_id is not None:
            sock.setsockopt(zmq.ROUTING_ID, routing_id)
        sock.connect(self.endpoint)
        if credit:
            sock.send_multipart([P, b"READY", msgpack.packb({"credit": credit})])
        return sock

    def offer(self, n: int, *, size: int = 0, channel: str = "messages") -> list[OutboxItem]:
        items = [
            OutboxItem(
                os.urandom(16), channel, i + 1, "s", "api:x", 0,
                b'{"n":%d,"pad":"%s"}' % (i, os.urandom(size // 2).hex().encode()),
            )
            for i in range(n)
        ]  # fmt: skip
        self.outbox.add_many(items)
        self.srv.notify(items)
        return items

    def close(self) -> None:
        self.ctx.destroy(linger=0)
        self.srv.close()
        self.outbox.close()
        self.ledger.close()


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Server]:
    monkeypatch.setattr(consumers, "WINDOW_ITEMS", WINDOW)
    s = _Server(tmp_path / "d")
    yield s
    s.close()


def _delivered(sock: zmq.Socket[Any], n: int, timeout: float = 10.0) -> list[tuple[str, bytes]]:
    """The next ``n`` DELIVERs on ``sock`` (fewer if the time is up): (item id, body)."""
    out: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000) + 1):
            break
        frames = sock.recv_multipart()
        if frames[1] == b"DELIVER":
            out.append((msgpack.unpackb(frames[2])["item"], frames[3]))
    return out


def _wait(cond: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(cond())


@pytest.mark.integration
def test_messages_in_flight_are_not_kept_in_memory_and_come_again_from_the_outbox(
    server: _Server,
) -> None:
    """A consumer that takes messages and never acknowledges them held them in the inside's
    memory (up to 10,000 a consumer, whatever their sizes); the outbox has them."""
    items = server.offer(5, size=200_000)
    first = server.dealer(credit=5)  # (none left for when they are offered again)
    got = _delivered(first, 5)
    assert sorted(i for i, _ in got) == sorted(i.object_id.hex() for i in items)
    assert len(server.srv._inflight) == 5
    kept = [part for entry in server.srv._inflight.values() for part in entry]
    assert not any(isinstance(part, (OutboxItem, bytes)) for part in kept)
    assert server.srv._waiting == {}
    # not acknowledged in time: offered again, bodies read back from the outbox
    second = server.dealer(credit=10)
    again = dict(_delivered(second, 5))
    assert again == {i.object_id.hex(): i.body for i in items}
    holders = {entry[2] for entry in server.srv._inflight.values()}
    assert len(holders) == 1
    assert next(iter(holders)).holding == 5
    assert sum(c.holding for c in server.srv._consumers.values()) == 5  # (the first: none)


@pytest.mark.integration
def test_messages_offered_again_into_a_full_window_are_paged_in_again(
    server: _Server,
) -> None:
    """Offered again while their channel's window is full: they wait in the outbox and are
    read in again in their turn, so the window stays bounded and none is lost."""
    early = server.offer(WINDOW)
    first = server.dealer(credit=WINDOW)
    assert len(_delivered(first, WINDOW)) == WINDOW
    late = server.offer(WINDOW)  # (the window full again)
    assert _wait(lambda: len(server.srv._waiting) == WINDOW)
    assert _wait(lambda: server.srv._inflight == {}, timeout=5)  # (given up on)
    assert server.srv._unread.get("messages") == 0  # (read again from the first row)
    assert len(server.srv._waiting) == WINDOW
    second = server.dealer(credit=2 * WINDOW)
    seen: list[str] = []
    deadline = time.monotonic() + 20
    while len(seen) < 2 * WINDOW and time.monotonic() < deadline:
        batch = _delivered(second, 1, timeout=1)
        assert len(server.srv._waiting) <= WINDOW
        for item, _ in batch:
            seen.append(item)
            second.send_multipart([P, b"ACK", msgpack.packb({"items": [item], "credit": 1})])
    assert sorted(seen) == sorted(i.object_id.hex() for i in early + late)  # each once
    assert _wait(lambda: server.outbox.counts()[0] == 0)


@pytest.mark.slow  # (5-10 s: run with `python3 tasks.py test --slow`)
@pytest.mark.integration
@pytest.mark.parametrize("change", ["removed", "narrowed"])
def test_a_key_put_back_on_the_allow_list_is_served_again_without_a_new_ready(
    server: _Server, change: str
) -> None:
    """A consumer whose key was briefly off the allow-list (an operator's edit saved half
    done) was forgotten, or kept its narrowed channels: unserved until it reconnected,
    though ferry.client says READY only on a new connection."""
    sock = server.dealer(credit=10)
    server.offer(1)
    ((item, _),) = _delivered(sock, 1)
    sock.send_multipart([P, b"ACK", msgpack.packb({"items": [item]})])
    assert _wait(lambda: server.srv.acked == 1)
    text = server.entry.read_text()
    if change == "removed":
        server.entry.unlink()
    else:
        server.entry.write_text(text.replace("channels: [messages]", "channels: [x]"))
    time.sleep(2.5)  # (the allow-list is read again within a second or two)
    server.offer(2)
    assert _delivered(sock, 1, timeout=2) == []  # (off the list: nothing)
    server.entry.write_text(text)
    assert len(_delivered(sock, 2, timeout=10)) == 2  # (back on it: served, no READY)


@pytest.mark.slow  # (5-20 s: run with `python3 tasks.py test --slow`)
@pytest.mark.integration
def test_another_key_on_a_routing_id_in_use_is_another_consumer(server: _Server) -> None:
    """A client picks its routing id. Another allowed key presenting the id of a consumer
    the inside still knew was taken for that consumer: its channels and what it held."""
    first = server.dealer(routing_id=b"consumer-1", credit=1)  # (so none is sent to it
    # once gone, which would have it forgotten at once)
    server.offer(1)
    ((item, _),) = _delivered(first, 1)
    first.close(linger=0)
    time.sleep(0.5)  # (the ROUTER drops the first connection; the server still knows it)
    assert b"consumer-1" in server.srv._consumers
    other = server.dealer(key=server.other, routing_id=b"consumer-1", credit=0)
    other.send_multipart([P, b"ACK", msgpack.packb({"items": [item], "credit": 10})])
    assert _wait(lambda: b"consumer-1" not in server.srv._consumers)  # (not the first)
    time.sleep(0.3)
    assert server.srv.acked == 0  # (before: acknowledged, by a key never given it)
    server.offer(3)  # (the first key's channel)
    assert _delivered(other, 1, timeout=2) == []  # (not a consumer until READY)
    other.send_multipart([P, b"READY", msgpack.packb({"credit": 10})])
    assert _delivered(other, 1, timeout=2) == []  # (a consumer now, of its own channel)
    mine = server.offer(1, channel="other")
    assert _delivered(other, 1) == [(mine[0].object_id.hex(), mine[0].body)]


@pytest.mark.slow  # (5-10 s: run with `python3 tasks.py test --slow`)
@pytest.mark.integration
@pytest.mark.parametrize("credit", [2, 50])
def test_credit_granted_while_off_the_allow_list_is_kept_for_when_the_key_is_back(
    server: _Server, monkeypatch: pytest.MonkeyPatch, credit: int
) -> None:
    """ferry.client.Consumer acknowledges (granting credit) while its key is briefly off the
    list: the whole message was dropped, the credit with it, and the consumer, which says
    READY only on a new connection, was never served again. (Then the credit was kept but
    cut by what it held, those not acknowledged counted: at MAX_CREDIT, all of it.)"""
    monkeypatch.setattr(consumers, "MAX_CREDIT", 50)
    # (not offered again before its ACK: what it acknowledged while off the list stays held
    # until then, and counts against MAX_CREDIT; offered again, it no longer does)
    server.srv.params = dataclasses.replace(server.srv.params, redeliver_after=6)
    consumer = Consumer.from_config(server.dep["consumers"]["client_config"], credit=credit)
    try:
        server.offer(credit)
        got: list[Any] = []
        deadline = time.monotonic() + 10
        while len(got) < credit and time.monotonic() < deadline:
            got += consumer.receive(timeout=0.5)
        assert len(got) == credit
        text = server.entry.read_text()
        server.entry.unlink()
        assert _wait(lambda: not next(iter(server.srv._consumers.values())).allowed)
        consumer.ack([d.item for d in got])  # (not taken: offered again in time)
        time.sleep(0.3)
        assert server.srv.acked == 0
        server.entry.write_text(text)
        assert _wait(lambda: next(iter(server.srv._consumers.values())).allowed)
        fresh = {i.object_id.hex() for i in server.offer(2)}
        seen: set[str] = set()
        deadline = time.monotonic() + 20
        while not fresh <= seen and time.monotonic() < deadline:
            batch = consumer.receive(timeout=0.5)
            seen.update(d.item for d in batch)
            if batch:
                consumer.ack([d.item for d in batch])
        assert fresh <= seen  # (before: nothing, for ever)
    finally:
        consumer.close()


class _Bare:
    """A consumer server over a real SQLite outbox, its thread not started: its steps are
    driven one by one."""

    def __init__(self, root: Path) -> None:
        dep = init_deployment(root, port=47989)
        cfg = load_inside_config(Path(dep["inside"]["config"]))
        assert cfg.consumers is not None
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(cfg.state_dir)
        self.outbox = Outbox(self.ledger)
        params = dataclasses.replace(cfg.consumers, redeliver_after=REDELIVER, endpoint="")
        self.srv = ConsumerServer(params, self.outbox, threading.Event())
        self.seq = 0

    def add(self, n: int, size: int = 10) -> list[OutboxItem]:
        items = []
        for _ in range(n):
            self.seq += 1
            body = b'{"n":%d,"pad":"%s"}' % (self.seq, b"x" * size)
            items.append(OutboxItem(os.urandom(16), "messages", self.seq, "s", "x", 0, body))
        self.outbox.add_many(items)
        return items

    def hand_out(self, items: list[OutboxItem], con: _Consumer, ago: float = 10.0) -> None:
        """As _dispatch does, ``ago`` seconds ago."""
        for item in items:
            con.holding += 1
            self.srv._inflight[item.object_id] = (item.channel, time.monotonic() - ago, con)

    def close(self) -> None:
        self.srv.close()
        self.outbox.close()
        self.ledger.close()


@pytest.fixture
def bare(tmp_path: Path) -> Iterator[_Bare]:
    b = _Bare(tmp_path / "bare")
    yield b
    b.close()


def _con(identity: bytes = b"c1", key: str = "k") -> _Consumer:
    channels = frozenset({"messages"})
    return _Consumer(identity, "inner-app", channels, key, channels=channels)


def test_messages_offered_again_are_read_back_only_as_far_as_the_window_has_room(
    bare: _Bare, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Late messages were read from the outbox a thousand at a time, bodies and all, even
    into a full window (150 MiB at once for 150 messages of 1 MiB)."""
    monkeypatch.setattr(consumers, "WINDOW_BYTES", 4 << 20)
    late = bare.add(40, size=1 << 20)
    bare.hand_out(late, _con())
    tracemalloc.start()
    try:
        bare.srv._redeliver()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # (the window's 4 MiB and a message's worth, not 40 MiB)
    assert list(bare.srv._queues["messages"]) == [i.object_id for i in late[:3]]
    assert bare.srv._unread["messages"] == late[3].seq - 1  # (the rest: paged in their turn)
    assert bare.srv._inflight == {}


def test_the_oldest_late_messages_take_the_room_and_come_first(
    bare: _Bare, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consumers, "WINDOW_ITEMS", 4)
    late = bare.add(3)  # (handed out in this order)
    waiting = bare.add(2)
    for item in waiting:
        bare.srv._hold(item)
    bare.srv._read_to["messages"] = 0
    bare.hand_out(late, _con())
    bare.srv._redeliver()
    order = list(bare.srv._queues["messages"])
    assert order == [late[0].object_id, late[1].object_id] + [i.object_id for i in waiting]
    assert bare.srv._unread["messages"] == late[2].seq - 1  # (the newest: no room)


def test_the_holders_late_ack_counts_also_for_a_message_sent_back_to_the_outbox(
    bare: _Bare, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consumers, "WINDOW_ITEMS", 2)
    holder = _con()
    for item in bare.add(2):
        bare.srv._hold(item)  # (the window full)
    (late,) = bare.add(1)
    bare.hand_out([late], holder)
    bare.srv._redeliver()
    assert late.object_id not in bare.srv._waiting  # (in the outbox only)
    bare.srv._ack(_con(b"c2"), [late.object_id.hex()])  # (another: not its to acknowledge)
    assert bare.srv.acked == 0
    bare.srv._ack(holder, [late.object_id.hex()])
    assert bare.srv.acked == 1  # (before: dropped, and the message offered again)
    bare.srv._flush_acks(force=True)
    for oid in list(bare.srv._waiting):
        bare.srv._unhold(oid)
    bare.srv._read_in()
    assert late.object_id not in bare.srv._waiting  # (not read in again)
    assert holder.holding == 0


def test_the_same_key_on_a_new_connection_with_the_same_routing_id_may_acknowledge(
    bare: _Bare,
) -> None:
    first = _con(b"fixed", "K")
    (item,) = bare.add(1)
    bare.hand_out([item], first, ago=0.0)
    again = _con(b"fixed", "K")  # (the first forgotten; its READY on the new connection)
    bare.srv._ack(again, [item.object_id.hex()])
    assert bare.srv.acked == 1
    assert item.object_id not in bare.srv._inflight
    assert first.holding == 0
    other = _con(b"fixed", "L")
    (item2,) = bare.add(1)
    bare.hand_out([item2], first, ago=0.0)
    bare.srv._ack(other, [item2.object_id.hex()])  # (another key: no)
    assert bare.srv.stray_acks == 1
    assert item2.object_id in bare.srv._inflight


class _Frame:
    def __init__(self, data: bytes, key: str) -> None:
        self.bytes, self._key = data, key

    def get(self, name: str) -> str:
        assert name == "User-Id"
        return self._key


class _Client:
    name = "inner-app"
    channels = ("messages",)


def _say(bare: _Bare, identity: bytes, key: str, verb: bytes, body: dict[str, Any]) -> None:
    """``identity`` (a connection's routing id, authenticated as ``key``) says ``verb``."""
    frames = [_Frame(x, key) for x in (identity, P, verb, msgpack.packb(body))]

    class Router:
        sent = False

        def recv_multipart(self, *_: object, **__: object) -> list[_Frame]:
            if self.sent:
                raise zmq.Again
            self.sent = True
            return frames

    bare.srv.router = Router()  # type: ignore[assignment]
    try:
        bare.srv._read_router()
    finally:
        bare.srv.router = None


def test_ready_on_a_reused_routing_id_is_the_credit_the_consumer_has(
    bare: _Bare, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same key comes back on a new connection with the same routing id before the
    first is forgotten, and says READY with all its credit: that was added to what was left,
    cut by what the first connection still held (at the cap: nothing, for ever)."""
    monkeypatch.setattr(consumers, "MAX_CREDIT", 10)
    monkeypatch.setattr(bare.srv.allow, "lookup", lambda key: _Client() if key == "K" else None)
    _say(bare, b"rid", "K", b"READY", {"credit": 10})
    con = bare.srv._consumers[b"rid"]
    assert con.credit == 10
    bare.hand_out(bare.add(10), con)  # (as if handed out: all its credit)
    con.credit = 0
    _say(bare, b"rid", "K", b"READY", {"credit": 10})  # (the new connection)
    assert bare.srv._consumers[b"rid"] is con
    assert con.credit == 10  # (before: 0)
    assert not consumers._may_take(con)  # (it holds the cap: nothing more yet)
    bare.srv._redeliver()  # (the first connection's: offered again)
    assert con.holding == 0
    assert consumers._may_take(con)
    _say(bare, b"rid", "K", b"ACK", {"items": [], "credit": 5})
    assert con.credit == 10  # (never past the cap)


def test_a_late_message_that_does_not_fit_keeps_the_later_ones_behind_it(
    bare: _Bare, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consumers, "WINDOW_BYTES", 2000)
    waiting = bare.add(1, size=1000)
    bare.srv._hold(waiting[0])
    big, small = bare.add(1, size=1500) + bare.add(1, size=10)
    bare.hand_out([big, small], _con())
    bare.srv._redeliver()
    assert list(bare.srv._queues["messages"]) == [waiting[0].object_id]  # (small: not first)
    assert bare.srv._unread["messages"] == big.seq - 1


def test_a_ready_without_credit_leaves_the_credit_as_it_is(
    bare: _Bare, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bare.srv.allow, "lookup", lambda key: _Client() if key == "K" else None)
    _say(bare, b"rid", "K", b"READY", {"credit": 5})
    _say(bare, b"rid", "K", b"READY", {"channels": ["messages"]})  # (channels only)
    assert bare.srv._consumers[b"rid"].credit == 5  # (before: 0, and nothing more, ever)


class _Proxy:
    """A TCP relay between a consumer and the inside that can drop its connections (the
    network dropping them; the inside keeps running)."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("tcp://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return
            far = socket.create_connection(self.upstream)
            self.open += [near, far]
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def drop(self) -> None:
        conns, self.open = self.open, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.listener.close()
        self.drop()


@pytest.mark.integration
def test_what_a_dropped_connection_delivered_counts_before_the_client_says_ready_again(
    server: _Server,
) -> None:
    """ferry.client said READY with its whole credit on the new connection, then read what
    the dropped one had delivered: it held twice its credit (20 of 10)."""
    server.srv.params = dataclasses.replace(server.srv.params, redeliver_after=60)
    proxy = _Proxy(server.endpoint)
    cfg = dataclasses.replace(
        load_client_config(Path(server.dep["consumers"]["client_config"])),
        endpoint=proxy.endpoint,
    )
    consumer = Consumer(cfg, credit=10)
    try:
        server.offer(10)
        assert _wait(lambda: server.srv.delivered == 10)
        time.sleep(0.5)  # (in the client's socket, not read yet)
        proxy.drop()
        assert _wait(lambda: len(proxy.open) == 2)  # (connected again)
        server.offer(10)
        held: set[str] = set()
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            held.update(d.item for d in consumer.receive(timeout=0.2))
        assert consumer.reconnects == 1
        assert len(held) == 10  # (before: 20)
    finally:
        consumer.close()
        proxy.close()

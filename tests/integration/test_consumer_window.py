"""The inside's consumer server holds a bounded window of waiting messages in memory: however
long the inner consumers are away, the backlog waits in the outbox (SQLite) and is read in,
in order, as messages go out. Real ledger and outbox files, real CURVE sockets, the real
``ferry.client.Consumer``; the window made small so a few hundred messages overflow it."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.client import Consumer
from ferry.config import load_inside_config
from ferry.provision import init_deployment
from inside import consumers
from inside.consumers import ConsumerServer, Outbox, OutboxItem
from inside.ledger import Ledger

WINDOW = 40


def _items(n: int, start: int = 0, size: int = 0, channel: str = "messages") -> list[OutboxItem]:
    return [
        OutboxItem(
            os.urandom(16), channel, start + i + 1, "s", "api:x", 0,
            b'{"n":%d,"pad":"%s"}' % (start + i, b"x" * size),
        )
        for i in range(n)
    ]  # fmt: skip


class _Deployment:
    def __init__(self, root: Path) -> None:
        self.dep = init_deployment(root, port=47985)
        self.cfg = load_inside_config(Path(self.dep["inside"]["config"]))
        assert self.cfg.consumers is not None
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.cfg.state_dir)
        self.outbox = Outbox(self.ledger)
        self.server: ConsumerServer | None = None

    def start(self) -> ConsumerServer:
        assert self.cfg.consumers is not None
        self.server = ConsumerServer(self.cfg.consumers, self.outbox, threading.Event())
        self.server.start()
        return self.server

    def consumer(self, credit: int = 16) -> Consumer:
        return Consumer.from_config(self.dep["consumers"]["client_config"], credit=credit)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.outbox.close()
        self.ledger.close()


@pytest.fixture
def deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Deployment]:
    monkeypatch.setattr(consumers, "WINDOW_ITEMS", WINDOW)
    d = _Deployment(tmp_path / "d")
    yield d
    d.close()


def _drain(consumer: Consumer, n: int, timeout: float = 30.0) -> list[int]:
    """Receive and acknowledge until ``n`` messages came (or the time is up): their numbers."""
    got: list[int] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        batch = consumer.receive(timeout=0.2)
        got.extend(int(d.body.split(b",")[0].split(b":")[1]) for d in batch)
        if batch:
            consumer.ack([d.item for d in batch])
    return got


def _wait_all_acked(outbox: Outbox, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while (waiting := outbox.counts()[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return waiting


@pytest.mark.integration
def test_a_backlog_found_at_start_is_read_in_by_windows_in_order(
    deployment: _Deployment,
) -> None:
    deployment.outbox.add_many(_items(300))
    srv = deployment.start()
    assert len(srv._waiting) == WINDOW  # (not all 300)
    assert "messages" in srv._unread
    with deployment.consumer() as consumer:
        got = _drain(consumer, 300)
    assert got == list(range(300))  # every one, once, in order
    assert _wait_all_acked(deployment.outbox) == 0
    assert srv._unread == {}
    assert len(srv._waiting) == 0


@pytest.mark.integration
def test_messages_arriving_while_the_window_is_full_wait_in_the_outbox(
    deployment: _Deployment,
) -> None:
    """No consumer for a while: the window fills, later messages wait on disk only, and
    come out after the earlier ones, also those that arrive while the backlog drains."""
    srv = deployment.start()
    for start in range(0, 200, 10):  # (as the delivery thread queues them)
        batch = _items(10, start)
        deployment.outbox.add_many(batch)
        srv.notify(batch)
    deadline = time.monotonic() + 5
    while "messages" not in srv._unread and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "messages" in srv._unread
    assert len(srv._waiting) <= WINDOW
    with deployment.consumer() as consumer:
        got = _drain(consumer, 50)
        for start in range(200, 260, 10):  # (more arrive while the backlog drains)
            batch = _items(10, start)
            deployment.outbox.add_many(batch)
            srv.notify(batch)
        got += _drain(consumer, 260 - len(got))
    assert got == list(range(260))
    assert _wait_all_acked(deployment.outbox) == 0
    assert srv._unread == {}


@pytest.mark.integration
def test_the_window_is_bounded_in_bytes_too(
    deployment: _Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consumers, "WINDOW_BYTES", 64 * 1024)
    deployment.outbox.add_many(_items(30, size=16 * 1024))  # (480 KiB in all)
    srv = deployment.start()
    held = sum(len(i.body) for i in srv._waiting.values())
    assert 0 < held <= 64 * 1024
    assert len(srv._waiting) == 3  # (16 KiB and a few bytes each: a fourth would cross it)
    with deployment.consumer(credit=4) as consumer:
        got = _drain(consumer, 30)
    assert got == list(range(30))


@pytest.mark.integration
def test_a_late_notice_of_a_message_a_page_read_in_does_not_offer_it_twice(
    deployment: _Deployment,
) -> None:
    """The delivery thread commits, then gives notice. While the channel is paged, a page
    may read a message in, hand it out and see it acknowledged before its notice comes."""
    deployment.outbox.add_many(_items(100))
    srv = deployment.start()
    late = _items(5, 100)
    with deployment.consumer(credit=64) as consumer:
        got = _drain(consumer, 60)
        deployment.outbox.add_many(late)  # (committed ...)
        # (... read in by a page if the channel is still paged, handed out, acknowledged ...)
        got += _drain(consumer, 105 - len(got), timeout=3.0)
        deadline = time.monotonic() + 5
        while (srv._unread or srv._inflight) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)  # (the acknowledgements written)
        srv.notify(late)  # (... then the notice)
        got += _drain(consumer, 105 - len(got), timeout=5.0)  # (what no page read in)
        got += _drain(consumer, 1, timeout=0.5)  # (nothing more: none offered twice)
    assert got == list(range(105))  # once each


@pytest.mark.integration
def test_credit_granted_without_acknowledging_does_not_hold_more_than_max_credit(
    deployment: _Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consumers, "MAX_CREDIT", 50)
    deployment.outbox.add_many(_items(200))
    srv = deployment.start()
    with deployment.consumer(credit=20) as consumer:
        got: list[object] = []
        deadline = time.monotonic() + 10
        while len(got) < 50 and time.monotonic() < deadline:  # (asks for more, acknowledges
            got += consumer.receive(timeout=0.2)  # nothing)
            consumer.ack([], credit=20)
        got += consumer.receive(timeout=1.0)  # (and nothing more comes)
        assert len(got) == 50
        assert len(srv._inflight) == 50


@pytest.mark.integration
def test_a_consumer_of_two_channels_gets_from_both_not_all_of_one_first(
    deployment: _Deployment,
) -> None:
    entry = Path(deployment.dep["consumers"]["allowlist_entry"])
    entry.write_text(entry.read_text().replace("channels: [messages]", "channels: [messages, b]"))
    deployment.outbox.add_many(_items(30, channel="messages") + _items(30, channel="b"))
    deployment.start()
    with deployment.consumer(credit=6) as consumer:
        first: list[str] = []
        deadline = time.monotonic() + 10
        while len(first) < 6 and time.monotonic() < deadline:
            first += [d.channel for d in consumer.receive(timeout=0.2)]
    assert sorted(first) == ["b"] * 3 + ["messages"] * 3


@pytest.mark.integration
def test_a_consumer_at_max_credit_that_acknowledges_gets_its_credit_back(
    deployment: _Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The acknowledgement lowers what it holds before its credit is counted: else credit
    asked for at the cap was cut, and a consumer at MAX_CREDIT got nothing more, ever."""
    monkeypatch.setattr(consumers, "MAX_CREDIT", 50)
    deployment.outbox.add_many(_items(200))
    deployment.start()
    with deployment.consumer(credit=50) as consumer:
        held: list[Any] = []
        deadline = time.monotonic() + 10
        while len(held) < 50 and time.monotonic() < deadline:
            held += consumer.receive(timeout=0.2)  # (all 50 held, none acknowledged yet)
        assert len(held) == 50
        consumer.ack([d.item for d in held])  # (and 50 more asked for)
        assert _drain(consumer, 150, timeout=10) == list(range(50, 200))


@pytest.mark.integration
def test_channels_take_turns_also_one_message_at_a_time(deployment: _Deployment) -> None:
    entry = Path(deployment.dep["consumers"]["allowlist_entry"])
    entry.write_text(entry.read_text().replace("channels: [messages]", "channels: [messages, b]"))
    deployment.outbox.add_many(_items(30, channel="messages") + _items(30, channel="b"))
    deployment.start()
    seen: list[str] = []
    with deployment.consumer(credit=1) as consumer:
        deadline = time.monotonic() + 20
        while len(seen) < 20 and time.monotonic() < deadline:
            batch = consumer.receive(timeout=0.2)
            seen += [d.channel for d in batch]
            if batch:
                consumer.ack([d.item for d in batch])
    assert len(seen) == 20
    assert 8 <= seen.count("b") <= 12

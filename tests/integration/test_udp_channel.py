"""UDP channel over real loopback sockets: integrity, order, one-wayness, limits, accounting."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from structlog.testing import capture_logs

from ferry.channels.base import DatagramReceiver, DatagramSender
from ferry.channels.udp import MAX_UDP_PAYLOAD, UdpReceiver, UdpSender, _proc_drops
from ferry.errors import ChannelError

pytestmark = pytest.mark.integration

RCVBUF = 16 << 20


@pytest.fixture(params=[False, True], ids=["plain", "gro"])
def receiver(request: pytest.FixtureRequest) -> Iterator[UdpReceiver]:
    rx = UdpReceiver("127.0.0.1", 0, rcvbuf=RCVBUF, gro=request.param)
    yield rx
    rx.close()


def _collect(rx: UdpReceiver, n: int, deadline: float = 5.0) -> list[bytes]:
    out: list[bytes] = []
    end = time.monotonic() + deadline
    while len(out) < n and time.monotonic() < end:
        out += rx.recv_batch(0.1)
    return out


def _wait_for(condition: Callable[[], bool], deadline: float = 3.0) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_random_sizes_arrive_intact_and_in_order(receiver: UdpReceiver) -> None:
    rng = random.Random(1)
    sent = [rng.randbytes(rng.randint(0, 4000)) for _ in range(10_000)]
    tx = UdpSender("127.0.0.1", receiver.port)
    got: list[bytes] = []
    # Chunks let the receiver catch up, so a loaded CI machine cannot overflow the kernel buffer.
    for i in range(0, len(sent), 500):
        chunk = sent[i : i + 500]
        if i % 1000:
            tx.send_many(chunk)
        else:
            for d in chunk:
                tx.send(d)
        got += _collect(receiver, len(chunk))
    assert got == sent
    assert receiver.kernel_drops() == 0
    assert (receiver.stats.datagrams, receiver.stats.bytes) == (len(sent), sum(map(len, sent)))
    assert (tx.stats.datagrams, tx.stats.bytes) == (len(sent), sum(map(len, sent)))
    tx.close()


def test_gso_batches_arrive_as_separate_datagrams(receiver: UdpReceiver) -> None:
    # Equal sizes (FEC symbols) with a shorter last one: send_many packs them into GSO sends.
    sent = [i.to_bytes(4, "big") * 350 for i in range(999)] + [b"tail"]
    tx = UdpSender("127.0.0.1", receiver.port)
    for i in range(0, len(sent), 100):
        tx.send_many(sent[i : i + 100])
    assert _collect(receiver, len(sent)) == sent
    assert tx.stats.datagrams == len(sent)
    tx.close()


def test_receiver_never_sends_anything_back() -> None:
    rx = UdpReceiver("127.0.0.1", 0, rcvbuf=RCVBUF)
    with pytest.raises(OSError):  # never connected to anyone
        rx._sock.getpeername()
    # A plain socket standing in for the sender's source address, and a UdpSender from a
    # known bound port: after traffic, neither has anything to read, and no ICMP came back.
    spy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    spy.bind(("127.0.0.1", 0))
    spy.connect(("127.0.0.1", rx.port))
    tx = UdpSender("127.0.0.1", rx.port, source=("127.0.0.1", 0))
    assert tx.local_address[1] != 0
    for i in range(200):
        spy.send(b"spy %d" % i)
        tx.send(b"tx %d" % i)
    assert len(_collect(rx, 400)) == 400
    time.sleep(0.1)
    for sock in (spy, tx._sock):
        with pytest.raises(BlockingIOError):
            sock.recv(65536, socket.MSG_DONTWAIT | socket.MSG_PEEK)
    assert tx.stats.refused == 0
    rx.close()
    spy.close()
    tx.close()


def test_close_stops_the_drain_thread_within_a_second() -> None:
    rx = UdpReceiver("127.0.0.1", 0, rcvbuf=RCVBUF)
    name = f"ferry-udp-drain:{rx.port}"
    assert any(t.name == name for t in threading.enumerate())
    start = time.monotonic()
    rx.close()
    assert time.monotonic() - start < 1.0
    assert not any(t.name == name for t in threading.enumerate())
    start = time.monotonic()
    assert rx.recv_batch(5.0) == []  # does not wait on a closed receiver
    assert time.monotonic() - start < 0.5


def test_recv_batch_waits_then_wakes_on_data() -> None:
    rx = UdpReceiver("127.0.0.1", 0, rcvbuf=RCVBUF)
    start = time.monotonic()
    assert rx.recv_batch(0.2) == []
    assert 0.15 < time.monotonic() - start < 1.0
    tx = UdpSender("127.0.0.1", rx.port)
    threading.Timer(0.1, tx.send, args=(b"late",)).start()
    start = time.monotonic()
    assert rx.recv_batch(5.0) == [b"late"]
    assert time.monotonic() - start < 1.0
    rx.close()
    tx.close()


def test_port_in_use_is_a_channel_error() -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    with pytest.raises(ChannelError, match="already in use"):
        UdpReceiver("127.0.0.1", holder.getsockname()[1], rcvbuf=RCVBUF)
    holder.close()


@pytest.mark.parametrize(
    ("host", "port"),
    [("192.0.2.1", 0), ("127.0.0.1", 70_000), ("127.0.0.1", -1)],
    ids=["address-not-here", "port-too-big", "negative-port"],
)
def test_bad_receiver_address_is_a_channel_error(host: str, port: int) -> None:
    with pytest.raises(ChannelError, match="UDP"):
        UdpReceiver(host, port, rcvbuf=RCVBUF)


def test_bad_sender_address_is_a_channel_error() -> None:
    with pytest.raises(ChannelError, match="port"):
        UdpSender("127.0.0.1", 0)
    with pytest.raises(ChannelError):
        UdpSender("127.0.0.1", 9, source=("192.0.2.1", 0))


def test_oversize_datagrams_are_framing_errors() -> None:
    for gro in (False, True):
        rx = UdpReceiver("127.0.0.1", 0, rcvbuf=RCVBUF, max_datagram=1000, gro=gro)
        tx = UdpSender("127.0.0.1", rx.port)
        for size in (999, 1000, 1001, MAX_UDP_PAYLOAD, 0, 5):
            tx.send(bytes([size % 251]) * size)
        got = _collect(rx, 4)
        assert [len(d) for d in got] == [999, 1000, 0, 5]
        assert got[0] == bytes([999 % 251]) * 999
        assert rx.stats.framing_errors == 2
        rx.close()
        tx.close()


def test_largest_datagram_passes_with_the_default_limit(receiver: UdpReceiver) -> None:
    tx = UdpSender("127.0.0.1", receiver.port)
    big = random.Random(2).randbytes(MAX_UDP_PAYLOAD)
    tx.send(big)
    with pytest.raises(ChannelError):
        tx.send(big + b"x")  # EMSGSIZE: not a transient error
    assert _collect(receiver, 1) == [big]
    assert receiver.stats.framing_errors == 0
    tx.close()


def test_queue_overflow_is_counted_and_never_blocks_the_drain() -> None:
    per = 1000 + 64  # payload plus the per-datagram overhead charged to the queue
    rx = UdpReceiver("127.0.0.1", 0, rcvbuf=RCVBUF, queue_bytes=10 * per)
    tx = UdpSender("127.0.0.1", rx.port)
    sent = [i.to_bytes(2, "big") * 500 for i in range(100)]
    for d in sent:
        tx.send(d)
    assert _wait_for(lambda: rx.stats.overflow_drops == 90)
    assert rx.recv_batch(0.0) == sent[:10]  # the oldest are kept, the newest dropped
    tx.send(b"after")
    assert _collect(rx, 1) == [b"after"]
    assert rx.stats.datagrams == 11
    rx.close()
    tx.close()


def test_kernel_drops_are_read_from_proc() -> None:
    rx = UdpReceiver("127.0.0.1", 0, rcvbuf=1)  # the kernel minimum: a few datagrams
    tx = UdpSender("127.0.0.1", rx.port)
    n = 20_000
    tx.send_many([b"x" * 1000] * n)  # GSO: far faster than the drain thread
    got = 0
    while batch := rx.recv_batch(0.2):
        got += len(batch)
    # Without GRO every datagram is accounted for: delivered or counted by the kernel.
    assert rx.kernel_drops() > 0
    assert got + rx.kernel_drops() == n
    rx.close()
    tx.close()


def test_proc_drops_parser() -> None:
    table = (
        "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
        "   uid  timeout inode ref pointer drops\n"
        "  12: 0100007F:A1B2 00000000:0000 07 00000000:00000000 00:00000000 00000000"
        "     0        0 4242 2 0000000000000000 17\n"
    )
    assert _proc_drops(table, 4242) == 17
    assert _proc_drops(table, 4243) == 0
    assert _proc_drops("", 1) == 0


def test_icmp_refusal_is_survived_counted_and_logged_once() -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    holder.close()  # nobody listens: loopback answers with ICMP port unreachable
    tx = UdpSender("127.0.0.1", port)
    sent = 0
    with capture_logs() as logs:  # (the kernel limits ICMP messages per second for the whole
        while sent < 50 or (tx.stats.refused == 0 and sent < 3000):  # host: other tests'
            tx.send(b"x")  # refusals may have used this second's up; keep sending a while)
            sent += 1
            time.sleep(0.001)
    assert tx.stats.refused > 0
    assert tx.stats.datagrams + tx.stats.drops == sent
    assert [e["event"] for e in logs].count("udp_icmp_port_unreachable") == 1
    tx.close()


def test_wire_size_counts_ip_and_udp_headers() -> None:
    rx4 = UdpReceiver("127.0.0.1", 0, rcvbuf=RCVBUF)
    rx6 = UdpReceiver("::1", 0, rcvbuf=RCVBUF)
    tx4: DatagramSender = UdpSender("127.0.0.1", rx4.port)
    tx6: DatagramSender = UdpSender("::1", rx6.port)
    assert tx4.wire_size(1472) == 1500
    assert tx6.wire_size(1452) == 1500
    tx6.send(b"v6")
    receiver: DatagramReceiver = rx6
    assert _collect(rx6, 1) == [b"v6"]
    assert receiver.stats.datagrams == 1
    for c in (tx4, tx6, rx4, rx6):
        c.close()


def test_rcvbuf_obtained_is_logged() -> None:
    with capture_logs() as logs:
        rx = UdpReceiver("127.0.0.1", 0, rcvbuf=8 << 20)
    opened = [e for e in logs if e["event"] == "udp_receiver_open"]
    assert opened
    assert opened[0]["rcvbuf"] == rx.rcvbuf > 0
    rx.close()

#!/usr/bin/env python3
"""Loopback throughput of the UDP channel: sender pps, and pps the receiver hands to a consumer.

    .venv/bin/python bench/udp_channel.py [--seconds 3] [--size 1472] [--no-gso] [--gro] [--pps N]

The sender runs in a child process (on a real diode it is another machine).
Unpaced it usually offers more than the receiver can take: the gap shows up
as kernel drops. ``--pps`` paces it with the TokenBucket, in batches.
``--micro`` also times the bare drain loop variants (``recv`` vs
``recv_into`` + ``bytes`` slice) on a pre-filled socket.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import time
from multiprocessing.connection import Connection

from ferry.channels.udp import UdpReceiver, UdpSender
from ferry.wire.pacing import TokenBucket


def _sender(
    port: int, size: int, seconds: float, gso: bool, batch: int, pps: float, out: Connection
) -> None:
    tx = UdpSender("127.0.0.1", port, gso=gso)
    datagrams = [bytes([i % 256]) * size for i in range(batch)]
    send_many = tx.send_many
    start = time.perf_counter()
    end = start + seconds
    if pps:  # batch pacing (research notes 6.2): debit the batch, send it, sleep the debt
        wire = tx.wire_size(size) * batch
        # Four batches of credit absorb oversleeping and scheduling delays.
        bucket = TokenBucket(pps * tx.wire_size(size), burst=4 * wire)
        while (now := time.perf_counter()) < end:
            wait = bucket.consume(wire, now)
            if wait:
                time.sleep(wait)
            send_many(datagrams)
    while time.perf_counter() < end:
        for _ in range(16):
            send_many(datagrams)
    elapsed = time.perf_counter() - start
    out.send((tx.stats.datagrams, tx.stats.drops, elapsed))
    tx.close()


def run(seconds: float, size: int, gso: bool, gro: bool, batch: int, pps: float) -> None:
    rx = UdpReceiver("127.0.0.1", 0, rcvbuf=64 << 20, gro=gro)
    parent, child = mp.Pipe()
    proc = mp.Process(target=_sender, args=(rx.port, size, seconds, gso, batch, pps, child))
    proc.start()
    received = 0
    first = last = 0.0
    while True:
        got = rx.recv_batch(0.5)
        now = time.perf_counter()
        if got:
            if not received:
                first = now
            received += len(got)
            last = now
        elif received and not proc.is_alive():
            break
    sent, drops, elapsed = parent.recv()
    proc.join()
    span = max(last - first, 1e-9)
    print(
        f"size={size} gso={gso} gro={rx.gro}: "
        f"sender {sent / elapsed:,.0f} pps ({sent * size * 8 / elapsed / 1e9:.2f} Gbit/s), "
        f"receiver {received / span:,.0f} pps ({received * size * 8 / span / 1e9:.2f} Gbit/s); "
        f"delivered {received:,}/{sent:,}, kernel drops {rx.kernel_drops():,}, "
        f"queue overflow {rx.stats.overflow_drops:,}, send drops {drops:,}"
    )
    rx.close()


def micro(size: int, count: int = 20_000) -> None:
    """Time the drain-loop primitive alone on a socket already holding ``count`` datagrams."""
    for name in ("recv", "recv_into"):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.setsockopt(socket.SOL_SOCKET, 33, 256 << 20)  # SO_RCVBUFFORCE (root)
        rx.bind(("127.0.0.1", 0))
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.connect(rx.getsockname())
        payload = b"x" * size
        for _ in range(count):
            tx.send(payload)
        out: list[bytes] = []
        buf = bytearray(65536)
        view = memoryview(buf)
        start = time.perf_counter()
        if name == "recv":
            recv = rx.recv
            for _ in range(count):
                out.append(recv(65536))
        else:
            recv_into = rx.recv_into
            for _ in range(count):
                n = recv_into(buf)
                out.append(bytes(view[:n]))
        elapsed = time.perf_counter() - start
        print(f"micro {name:9}: {count / elapsed:,.0f} datagrams/s")
        rx.close()
        tx.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--size", type=int, default=1472)
    p.add_argument("--batch", type=int, default=64, help="datagrams per send_many call")
    p.add_argument("--no-gso", action="store_true", help="send_many loops over send()")
    p.add_argument("--gro", action="store_true", help="receiver uses UDP_GRO")
    p.add_argument("--pps", type=float, default=0.0, help="pace the sender (0: unpaced)")
    p.add_argument("--micro", action="store_true", help="also time recv vs recv_into")
    a = p.parse_args()
    if a.micro:
        micro(a.size)
    run(a.seconds, a.size, not a.no_gso, a.gro, a.batch, a.pps)


if __name__ == "__main__":
    main()

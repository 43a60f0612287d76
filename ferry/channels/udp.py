"""UDP transport: one sealed ferry datagram per UDP datagram, strictly one way.

:class:`UdpSender` only sends: its socket is ``connect()``-ed to the far side
so each ``send`` skips the route lookup, and it never reads. :class:`UdpReceiver`
only receives: it binds, never connects and never sends. Nothing flows back.

Receiver engineering (research notes §6.2): a dedicated daemon thread does
nothing but drain the socket into an in-process queue bounded in bytes, so a
slow consumer (disk stall, FEC burst) costs queue space, not kernel drops.
The thread batches: after one blocking receive it takes whatever else the
kernel already holds without blocking, then hands the batch over under one
lock acquisition and wakes the consumer only if it is waiting.

Linux offloads (measured in ``bench/udp_channel.py``):

* ``UdpSender.send_many`` uses UDP GSO (``UDP_SEGMENT``, Linux >= 4.18): one
  ``sendmsg`` carries up to 64 equal-sized datagrams and the kernel (or NIC)
  cuts them apart. The wire sees ordinary datagrams. It falls back to one
  ``send`` per datagram where the kernel or device refuses.
* ``UdpReceiver(gro=True)`` sets ``UDP_GRO`` (Linux >= 5.0): the kernel may
  hand over several same-sized datagrams of one flow in one read, with the
  segment size in a control message; the drain thread splits them again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import structlog

from ferry.channels.base import ReceiverStats
from ferry.errors import ChannelError, UsageError

log = structlog.get_logger("ferry.channels.udp")

IPV4_UDP_OVERHEAD = 28
"""Bytes an IPv4 UDP datagram adds to its payload: 20 (IPv4 header, no options) + 8 (UDP)."""
IPV6_UDP_OVERHEAD = 48
"""Bytes an IPv6 UDP datagram adds: 40 (IPv6 header, no extension headers) + 8 (UDP).

Neither figure counts link-layer framing (38 B per Ethernet frame with preamble
and inter-frame gap) nor IP fragmentation: configure the pacing rate as an IP
rate a few percent below the link rate, and keep datagrams under the path MTU.
"""

MAX_UDP_PAYLOAD = 65507
"""Largest UDP payload over IPv4: 65535 (IP total length) - 20 - 8."""
MAX_GSO_SEGMENTS = 64
"""Datagrams per GSO send: UDP_MAX_SEGMENTS on every kernel since 4.18 (newer ones allow 128)."""
MAX_GRO_BYTES = 256 * 1024
"""Receive buffer in GRO mode. Linux caps a GRO aggregate at gro_max_size (64 KiB unless
BIG TCP raised it); a larger aggregate would be truncated, reported by MSG_TRUNC and counted."""
MAX_DRAIN_BATCH = 256
"""Datagrams the drain thread takes without blocking before handing them over: large enough
to amortise the lock, small enough (<= 16 MiB at 64 KiB) that the consumer sees data promptly."""
MAX_SEND_RETRIES = 5
"""Attempts after ENOBUFS/EAGAIN (the device queue is momentarily full) before the datagram
counts as dropped: with RETRY_SLEEP that is ~0.25 ms, about 20 datagrams' time at 1 Gbit/s."""
RETRY_SLEEP = 50e-6
"""Seconds between send retries."""
DATAGRAM_OVERHEAD = 64
"""Bytes charged per queued datagram on top of its length (CPython object header and list
slot), so a flood of empty datagrams is bounded by queue_bytes too."""
DRAIN_POLL = 0.2
"""SO_RCVTIMEO of the receiver socket, seconds: a backstop for close(); shutdown() wakes the
drain thread at once on Linux."""

# Linux constants Python 3.11 does not export (uapi/linux/udp.h, asm-generic/socket.h).
_UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
_UDP_GRO = getattr(socket, "UDP_GRO", 104)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_TRANSIENT = frozenset({errno.ENOBUFS, errno.EAGAIN})
_GSO_UNSUPPORTED = frozenset({errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP})
_GSO_TOO_BIG = frozenset({errno.EINVAL, errno.EMSGSIZE})


def _resolve(host: str, port: int, *, passive: bool) -> tuple[socket.AddressFamily, str, int]:
    if not 0 <= port <= 65535 or (port == 0 and not passive):
        raise ChannelError(f"invalid UDP port {port!r}")
    try:
        infos = socket.getaddrinfo(
            host or None,
            port,
            type=socket.SOCK_DGRAM,
            proto=socket.IPPROTO_UDP,
            flags=socket.AI_PASSIVE if passive else 0,
        )
    except (socket.gaierror, UnicodeError) as e:
        raise ChannelError(f"cannot resolve UDP address {host!r}: {e}") from e
    family, _, _, _, sockaddr = infos[0]
    return family, str(sockaddr[0]), port


@dataclass
class SenderStats:
    """Counters a :class:`UdpSender` keeps."""

    datagrams: int = 0
    """Datagrams handed to the kernel."""
    bytes: int = 0
    """Payload bytes handed to the kernel."""
    drops: int = 0
    """Datagrams given up after ENOBUFS/EAGAIN retries."""
    refused: int = 0
    """ICMP port-unreachable reports (ECONNREFUSED): something answers, so the link is not
    one-way (a lab setup, or a misconfigured diode)."""


class UdpSender:
    """Send-only UDP socket connected to ``(host, port)``; optionally bound to ``source``."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        source: tuple[str, int] | None = None,
        sndbuf: int | None = None,
        gso: bool = True,
    ) -> None:
        family, addr, port = _resolve(host, port, passive=False)
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if sndbuf is not None:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            if source is not None:
                self._sock.bind(source)
            self._sock.connect((addr, port))
        except (OSError, OverflowError) as e:
            self._sock.close()
            raise ChannelError(f"cannot open UDP sender to {host}:{port}: {e}") from e
        self._overhead = IPV6_UDP_OVERHEAD if family == socket.AF_INET6 else IPV4_UDP_OVERHEAD
        self._send = self._sock.send
        self._gso_limit = MAX_UDP_PAYLOAD if gso else 0  # largest GSO segment still worth trying
        self._warned_refused = False
        self.stats = SenderStats()

    @property
    def local_address(self) -> tuple[str, int]:
        """The (address, port) our datagrams come from."""
        name = self._sock.getsockname()
        return str(name[0]), int(name[1])

    def wire_size(self, datagram_len: int) -> int:
        """Payload plus IP and UDP headers (28 B over IPv4, 48 B over IPv6)."""
        return datagram_len + self._overhead

    def send(self, datagram: bytes) -> None:
        """Send one datagram. Transient buffer exhaustion counts a drop; other failures raise."""
        try:
            self._send(datagram)
        except OSError as e:
            self._recover(partial(self._send, datagram), 1, len(datagram), e)
            return
        self.stats.datagrams += 1
        self.stats.bytes += len(datagram)

    def send_many(self, datagrams: list[bytes]) -> None:
        """Send datagrams in order, batching runs of equal-sized ones with UDP GSO."""
        if not self._gso_limit:
            self._send_loop(datagrams)
            return
        i, n = 0, len(datagrams)
        send = self.send
        while i < n:
            size = len(datagrams[i])
            if not 0 < size <= self._gso_limit:
                send(datagrams[i])
                i += 1
                continue
            # A GSO run: equal-sized datagrams, optionally ending with one shorter one.
            j = i + 1
            limit = min(n, i + MAX_GSO_SEGMENTS, i + MAX_UDP_PAYLOAD // size)
            while j < limit and len(datagrams[j]) == size:
                j += 1
            if j < limit and 0 < len(datagrams[j]) < size:
                j += 1
            if j - i == 1:
                send(datagrams[i])
            else:
                self._send_gso(datagrams[i:j], size)
            i = j

    def _send_loop(self, datagrams: list[bytes]) -> None:
        send = self._send
        failed = failed_bytes = 0
        try:
            for d in datagrams:
                try:
                    send(d)
                except OSError as e:
                    failed += 1
                    failed_bytes += len(d)
                    self._recover(partial(send, d), 1, len(d), e)
        finally:
            self.stats.datagrams += len(datagrams) - failed
            self.stats.bytes += sum(map(len, datagrams)) - failed_bytes

    def _send_gso(self, run: list[bytes], size: int) -> None:
        ancillary = [(socket.SOL_UDP, _UDP_SEGMENT, struct.pack("=H", size))]
        nbytes = sum(map(len, run))
        try:
            self._sock.sendmsg(run, ancillary)
        except OSError as e:
            if e.errno in _GSO_UNSUPPORTED or e.errno in _GSO_TOO_BIG:
                # Kernel/device without UDP GSO (or checksum offload), or a segment over the MTU.
                self._gso_limit = 0 if e.errno in _GSO_UNSUPPORTED else size - 1
                log.info("udp_gso_fallback", errno=e.errno, segment=size, limit=self._gso_limit)
                for d in run:
                    self.send(d)
                return
            self._recover(partial(self._sock.sendmsg, run, ancillary), len(run), nbytes, e)
            return
        self.stats.datagrams += len(run)
        self.stats.bytes += nbytes

    def _recover(
        self, attempt: Callable[[], object], count: int, nbytes: int, error: OSError
    ) -> None:
        """Retry a failed send: ICMP reports at once, full buffers after a short sleep."""
        for _ in range(MAX_SEND_RETRIES):
            if error.errno == errno.ECONNREFUSED:
                # The error reports an earlier datagram's ICMP; this one was not sent.
                self.stats.refused += 1
                if not self._warned_refused:
                    self._warned_refused = True
                    log.warning("udp_icmp_port_unreachable", peer=self._sock.getpeername())
            elif error.errno in _TRANSIENT:
                time.sleep(RETRY_SLEEP)
            else:
                raise ChannelError(f"UDP send failed: {error}") from error
            try:
                attempt()
            except OSError as e:
                error = e
                continue
            self.stats.datagrams += count
            self.stats.bytes += nbytes
            return
        if error.errno in _TRANSIENT or error.errno == errno.ECONNREFUSED:
            self.stats.drops += count
            return
        raise ChannelError(f"UDP send failed: {error}") from error

    def close(self) -> None:
        self._sock.close()


class UdpReceiver:
    """Receive-only UDP socket bound to ``(host, port)`` (0: a free port), drained by a thread.

    ``rcvbuf`` is the kernel receive buffer asked for (tens of MB for 1 Gbit/s);
    datagrams longer than ``max_datagram`` count as framing errors and are
    dropped; ``queue_bytes`` bounds the in-process queue (payload plus
    DATAGRAM_OVERHEAD each; when full the newest are dropped and counted in
    ``stats.overflow_drops``: the drain thread never blocks on the consumer).

    The queue is a plain list the drain thread extends under a Condition and
    :meth:`recv_batch` swaps out whole, so the hand-off costs one lock per batch
    on each side. ``gro=True`` enables UDP_GRO: about 2x the datagram rate when
    the kernel can aggregate (a GSO sender on loopback, NIC GRO), but slower
    per datagram when it cannot, so it is off by default.
    """

    def __init__(
        self,
        host: str,
        port: int,
        rcvbuf: int,
        max_datagram: int = 65535,
        queue_bytes: int = 256 * 1024 * 1024,
        *,
        gro: bool = False,
    ) -> None:
        if not 0 <= max_datagram <= 65535 or queue_bytes < 0:
            raise UsageError(f"bad UdpReceiver limits: {max_datagram=}, {queue_bytes=}")
        family, addr, port = _resolve(host, port, passive=True)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((addr, port))
        except (OSError, OverflowError) as e:
            sock.close()
            raise ChannelError(f"cannot bind UDP receiver to {host}:{port}: {e}") from e
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        """The bound port (useful when constructed with port 0)."""
        self.rcvbuf = _set_rcvbuf(sock, rcvbuf)
        """The receive buffer the kernel reports (it doubles the request for bookkeeping)."""
        timeval = struct.pack("@ll", 0, int(DRAIN_POLL * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self.gro = gro and _try_gro(sock)
        self._inode = os.fstat(sock.fileno()).st_ino
        self._proc = "/proc/net/udp6" if family == socket.AF_INET6 else "/proc/net/udp"
        self._max = max_datagram
        self._limit = queue_bytes
        # GRO reads need room for a whole aggregate; plain reads use recv(max_datagram + 1).
        self._buf = bytearray(max(MAX_GRO_BYTES, max_datagram + 1) if self.gro else 0)
        self._view = memoryview(self._buf)
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[bytes] = []
        self._queued = 0
        self._waiting = False
        self._closing = threading.Event()
        self._error: OSError | None = None
        self._stats = ReceiverStats()
        log.info("udp_receiver_open", host=addr, port=self.port, rcvbuf=self.rcvbuf, gro=self.gro)
        self._thread = threading.Thread(
            target=self._drain, name=f"ferry-udp-drain:{self.port}", daemon=True
        )
        self._thread.start()

    @property
    def stats(self) -> ReceiverStats:
        return self._stats

    def recv_batch(self, timeout: float) -> list[bytes]:
        """Everything the drain thread queued, waiting up to ``timeout`` s if there is nothing."""
        with self._cond:
            if not self._pending and timeout > 0 and self._thread.is_alive():
                self._waiting = True
                self._cond.wait_for(self._ready, timeout)
                self._waiting = False
            batch, self._pending, self._queued = self._pending, [], 0
            error = self._error
        if not batch and error is not None:
            raise ChannelError(f"UDP receive thread failed: {error}")
        self._stats.datagrams += len(batch)
        self._stats.bytes += sum(map(len, batch))
        return batch

    def kernel_drops(self) -> int:
        """Datagrams the kernel dropped on this socket (/proc/net/udp ``drops``); 0 if unknown.

        Exact without GRO (delivered + kernel drops == sent on loopback). With ``gro=True``
        the kernel counts a dropped aggregate of up to 64 datagrams once, so this undercounts.
        """
        try:
            with open(self._proc, encoding="ascii") as f:
                return _proc_drops(f.read(), self._inode)
        except OSError:
            return 0

    def close(self) -> None:
        """Stop the drain thread (immediately on Linux) and close the socket."""
        self._closing.set()
        with contextlib.suppress(OSError):
            # On Linux this wakes a blocked recv even on an unconnected UDP socket (and
            # returns ENOTCONN). It sends nothing.
            self._sock.shutdown(socket.SHUT_RD)
        self._thread.join(timeout=2 * DRAIN_POLL)
        self._sock.close()
        with self._cond:
            self._cond.notify_all()

    def _ready(self) -> bool:
        return bool(self._pending) or self._closing.is_set() or self._error is not None

    def _drain(self) -> None:
        try:
            if self.gro:
                self._drain_gro()
            else:
                self._drain_plain()
        except OSError as e:
            if not self._closing.is_set():
                log.error("udp_receive_failed", port=self.port, error=str(e))
                with self._cond:
                    self._error = e
                    self._cond.notify_all()

    def _drain_plain(self) -> None:
        # The hot loop: locals only. recv(n) measured ~5-10 % faster than recv_into plus a
        # bytes() copy of a memoryview slice (bench/udp_channel.py --micro).
        recv = self._sock.recv
        bufsize = self._max + 1  # one byte more than allowed, so oversize is visible
        limit = self._max
        dontwait = socket.MSG_DONTWAIT
        while not self._closing.is_set():
            try:
                d = recv(bufsize)  # blocks up to DRAIN_POLL
            except BlockingIOError:
                continue
            batch: list[bytes] = []
            try:
                while True:
                    if len(d) > limit:
                        self._framing_error()
                    else:
                        batch.append(d)
                    if len(batch) >= MAX_DRAIN_BATCH:
                        break
                    d = recv(bufsize, dontwait)
            except BlockingIOError:
                pass  # the kernel queue is empty: hand over what we have
            if self._closing.is_set():
                return  # after shutdown() recv returns b"": not datagrams
            self._hand_off(batch)

    def _drain_gro(self) -> None:
        batch: list[bytes] = []
        flags = 0
        while not self._closing.is_set():
            try:
                self._recv_gro(batch, flags)
            except BlockingIOError:
                if batch:
                    self._hand_off(batch)
                    batch = []
                flags = 0  # nothing left: block (up to DRAIN_POLL) for the next one
                continue
            flags = socket.MSG_DONTWAIT
            if len(batch) >= MAX_DRAIN_BATCH:
                self._hand_off(batch)
                batch = []

    def _recv_gro(self, batch: list[bytes], flags: int) -> None:
        n, ancillary, msg_flags, _ = self._sock.recvmsg_into(
            [self._buf], socket.CMSG_SPACE(4), flags
        )
        if self._closing.is_set():
            return  # after shutdown() recvmsg returns 0 bytes: not a datagram
        if msg_flags & socket.MSG_TRUNC:
            self._framing_error()
            return
        segment = n
        for level, kind, data in ancillary:
            if level == socket.SOL_UDP and kind == _UDP_GRO:
                segment = int.from_bytes(data, sys.byteorder)
        view = self._view
        if segment >= n or segment <= 0:
            if n > self._max:
                self._framing_error()
            else:
                batch.append(bytes(view[:n]))
            return
        for start in range(0, n, segment):
            end = min(start + segment, n)  # the last segment may be shorter
            if end - start > self._max:
                self._framing_error()
            else:
                batch.append(bytes(view[start:end]))

    def _framing_error(self) -> None:
        with self._cond:
            self._stats.framing_errors += 1

    def _hand_off(self, batch: list[bytes]) -> None:
        size = sum(map(len, batch)) + DATAGRAM_OVERHEAD * len(batch)
        with self._cond:
            if self._queued + size <= self._limit:
                self._pending.extend(batch)
                self._queued += size
            else:
                for d in batch:
                    cost = len(d) + DATAGRAM_OVERHEAD
                    if self._queued + cost <= self._limit:
                        self._pending.append(d)
                        self._queued += cost
                    else:
                        self._stats.overflow_drops += 1
            if self._waiting:
                self._waiting = False
                self._cond.notify()


def _set_rcvbuf(sock: socket.socket, wanted: int) -> int:
    """Ask for ``wanted`` bytes of receive buffer, past net.core.rmem_max if we may (root)."""
    forced = True
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, wanted)
    except OSError:
        forced = False
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
        except OSError as e:
            log.warning("udp_rcvbuf_refused", wanted=wanted, error=str(e))
    got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if got < wanted:
        # Linux reports twice the request; less than the request itself means it was capped.
        log.warning(
            "udp_rcvbuf_capped", wanted=wanted, got=got, hint="raise sysctl net.core.rmem_max"
        )
    log.debug("udp_rcvbuf", wanted=wanted, got=got, forced=forced)
    return got


def _try_gro(sock: socket.socket) -> bool:
    try:
        sock.setsockopt(socket.SOL_UDP, _UDP_GRO, 1)
    except OSError as e:
        log.info("udp_gro_unavailable", error=str(e))
        return False
    return True


def _proc_drops(table: str, inode: int) -> int:
    """The ``drops`` column of the /proc/net/udp row whose inode is ``inode`` (0 if absent)."""
    for line in table.splitlines()[1:]:
        fields = line.split()
        # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
        if len(fields) >= 13 and fields[9] == str(inode):
            return int(fields[12])
    return 0

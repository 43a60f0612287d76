"""The transport interface every channel implements.

A *datagram* is one sealed ferry packet (bytes). Transports do not look
inside it. The UDP transport sends each datagram as one UDP datagram; the
serial transport frames it with COBS and CRC32C; the memory transport
simulates a lossy link in-process.

Pacing is the sender loop's business (:class:`ferry.wire.pacing.TokenBucket`);
a transport reports with :meth:`DatagramSender.wire_size` how many bytes a
datagram really occupies on the wire, so the bucket counts every byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class ReceiverStats:
    """Counters a receiving transport keeps (read by the agent for heartbeats and logs)."""

    datagrams: int = 0
    """Datagrams handed to the agent."""
    bytes: int = 0
    """Payload bytes handed to the agent."""
    framing_errors: int = 0
    """Frames dropped by the transport (bad CRC, bad COBS, oversize)."""
    overflow_drops: int = 0
    """Datagrams dropped because the agent fell behind and the in-process queue was full."""


class DatagramSender(Protocol):
    """Send-only side of a link. Never reads from the link."""

    def send(self, datagram: bytes) -> None:
        """Send one datagram; raises ChannelError if the transport fails."""

    def wire_size(self, datagram_len: int) -> int:
        """Bytes (or byte-times on serial) one datagram of this length occupies on the wire."""

    def close(self) -> None:
        """Release the transport."""


class DatagramReceiver(Protocol):
    """Receive-only side of a link. Never writes to the link."""

    def recv_batch(self, timeout: float) -> list[bytes]:
        """Return the datagrams received so far (possibly none), waiting at most ``timeout`` s.

        Datagrams are drained from the OS by a dedicated thread so that a slow
        consumer (disk stall) does not make the kernel drop packets.
        """

    @property
    def stats(self) -> ReceiverStats:
        """Live counters."""

    def close(self) -> None:
        """Stop the drain thread and release the transport."""

"""An in-memory, seeded, lossy one-way link for simulations and tests.

:class:`LossyLink` stands between an outside agent and an inside agent in one
process. Every impairment a real diode link shows (or an attacker on the
low side could cause) is available, each with its own probability:

* ``drop``: independent random loss;
* ``burst_every`` / ``burst_len``: the probability per datagram that a burst
  of ``burst_len`` *consecutive* datagrams is lost (receiver stalls, research
  notes §6.2 measured ≈130-140 in a row);
* ``duplicate``: the datagram arrives twice;
* ``reorder``: the datagram is held back and released after 1..``reorder_depth``
  later datagrams have been sent;
* ``corrupt``: one random bit of the datagram is flipped;
* ``replay``: an attacker re-injects a datagram seen on the wire earlier,
  possibly much earlier (drawn uniformly from a reservoir over all history).

Each impairment draws from its own random stream derived from ``seed``, so
the same seed and inputs always give the same output, and changing one
probability does not change the pattern of the others.

:class:`MemorySender` / :class:`MemoryReceiver` adapt a link to the
:mod:`ferry.channels.base` protocols so agents run over it unchanged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ferry.channels.base import ReceiverStats
from ferry.errors import ChannelError, UsageError

MAX_REPLAY_POOL = 1024
"""Datagrams kept as replay candidates. A uniform reservoir sample over the whole
history: big enough that replays reach far into the past, small enough that a
million-datagram simulation does not keep every datagram alive."""


@dataclass
class LinkCounters:
    """What the link did. ``dropped`` counts random drops only; bursts are in ``burst_dropped``.

    Exact accounting: ``delivered == sent - dropped - burst_dropped + duplicated
    + replayed - held`` where ``held`` is :attr:`LossyLink.held` (reordered
    datagrams not yet released).
    """

    sent: int = 0
    dropped: int = 0
    burst_dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    corrupted: int = 0
    replayed: int = 0
    delivered: int = 0
    """Datagrams that reached the receiver side (available to :meth:`LossyLink.deliver`)."""


class LossyLink:
    """A seeded lossy one-way link. See the module docstring for the impairments."""

    def __init__(
        self,
        seed: int,
        *,
        drop: float = 0.0,
        burst_every: float = 0.0,
        burst_len: int = 100,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        reorder_depth: int = 16,
        corrupt: float = 0.0,
        replay: float = 0.0,
    ) -> None:
        for name, p in (
            ("drop", drop),
            ("burst_every", burst_every),
            ("duplicate", duplicate),
            ("reorder", reorder),
            ("corrupt", corrupt),
            ("replay", replay),
        ):
            if not 0.0 <= p <= 1.0:
                raise UsageError(f"LossyLink {name} must be a probability in [0, 1], got {p!r}")
        if burst_len < 1 or reorder_depth < 1:
            raise UsageError("LossyLink burst_len and reorder_depth must be at least 1")
        self._drop = drop
        self._burst_every = burst_every
        self._burst_len = burst_len
        self._duplicate = duplicate
        self._reorder = reorder
        self._reorder_depth = reorder_depth
        self._corrupt = corrupt
        self._replay = replay
        self._rng_drop = _stream(seed, "drop")
        self._rng_burst = _stream(seed, "burst")
        self._rng_dup = _stream(seed, "duplicate")
        self._rng_reorder = _stream(seed, "reorder")
        self._rng_corrupt = _stream(seed, "corrupt")
        self._rng_replay = _stream(seed, "replay")
        self._burst_left = 0
        self._pool: list[bytes] = []
        self._held: list[tuple[int, int, bytes]] = []  # (release after `sent`, tie-break, datagram)
        self._hold_seq = 0
        self._arrived: list[bytes] = []
        self.counters = LinkCounters()

    @property
    def held(self) -> int:
        """Reordered datagrams still held back on the link."""
        return len(self._held)

    def send(self, datagram: bytes) -> None:
        """Put one datagram on the link; what survives is available from :meth:`deliver`."""
        c = self.counters
        c.sent += 1
        if self._replay and self._pool and self._rng_replay.random() < self._replay:
            c.replayed += 1
            self._arrive(self._pool[self._rng_replay.randrange(len(self._pool))])
        self._remember(datagram)
        if not self._lost():
            if self._corrupt and datagram and self._rng_corrupt.random() < self._corrupt:
                c.corrupted += 1
                datagram = _flip_bit(datagram, self._rng_corrupt.randrange(len(datagram) * 8))
            copies = 1
            if self._duplicate and self._rng_dup.random() < self._duplicate:
                c.duplicated += 1
                copies = 2
            for _ in range(copies):
                self._route(datagram)
        self._release(c.sent)

    def deliver(self) -> list[bytes]:
        """Datagrams that arrived since the last call, in arrival order."""
        out, self._arrived = self._arrived, []
        return out

    def flush(self) -> None:
        """Release every held-back datagram now (end of a simulation)."""
        self._release(None)

    def _lost(self) -> bool:
        c = self.counters
        if self._burst_left:
            self._burst_left -= 1
            c.burst_dropped += 1
            return True
        if self._burst_every and self._rng_burst.random() < self._burst_every:
            self._burst_left = self._burst_len - 1
            c.burst_dropped += 1
            return True
        if self._drop and self._rng_drop.random() < self._drop:
            c.dropped += 1
            return True
        return False

    def _route(self, datagram: bytes) -> None:
        if self._reorder and self._rng_reorder.random() < self._reorder:
            self.counters.reordered += 1
            delay = self._rng_reorder.randint(1, self._reorder_depth)
            self._hold_seq += 1
            self._held.append((self.counters.sent + delay, self._hold_seq, datagram))
        else:
            self._arrive(datagram)

    def _release(self, sent: int | None) -> None:
        if not self._held:
            return
        due = [h for h in self._held if sent is None or h[0] <= sent]
        if not due:
            return
        self._held = [h for h in self._held if not (sent is None or h[0] <= sent)]
        for _, _, datagram in sorted(due):
            self._arrive(datagram)

    def _arrive(self, datagram: bytes) -> None:
        self.counters.delivered += 1
        self._arrived.append(datagram)

    def _remember(self, datagram: bytes) -> None:
        if not self._replay:
            return
        # Reservoir sampling (Algorithm R): every datagram ever sent is equally likely to be kept.
        if len(self._pool) < MAX_REPLAY_POOL:
            self._pool.append(datagram)
        else:
            slot = self._rng_replay.randrange(self.counters.sent)
            if slot < MAX_REPLAY_POOL:
                self._pool[slot] = datagram


def _stream(seed: int, impairment: str) -> random.Random:
    """One independent, reproducible stream per impairment (str seeds are hashed with SHA-512)."""
    return random.Random(f"{seed}:{impairment}")  # noqa: S311  simulation, not security


def _flip_bit(datagram: bytes, bit: int) -> bytes:
    b = bytearray(datagram)
    b[bit >> 3] ^= 1 << (bit & 7)
    return bytes(b)


class MemorySender:
    """:class:`~ferry.channels.base.DatagramSender` over a :class:`LossyLink` (no headers)."""

    def __init__(self, link: LossyLink) -> None:
        self._link = link
        self._closed = False

    def send(self, datagram: bytes) -> None:
        if self._closed:
            raise ChannelError("memory sender is closed")
        self._link.send(datagram)

    def wire_size(self, datagram_len: int) -> int:
        return datagram_len

    def close(self) -> None:
        self._closed = True


class MemoryReceiver:
    """:class:`~ferry.channels.base.DatagramReceiver` over a :class:`LossyLink`.

    Simulations drive time themselves, so :meth:`recv_batch` never waits.
    """

    def __init__(self, link: LossyLink) -> None:
        self._link = link
        self._stats = ReceiverStats()
        self._closed = False

    def recv_batch(self, timeout: float) -> list[bytes]:
        if self._closed:
            return []
        batch = self._link.deliver()
        self._stats.datagrams += len(batch)
        self._stats.bytes += sum(map(len, batch))
        return batch

    @property
    def stats(self) -> ReceiverStats:
        return self._stats

    def close(self) -> None:
        self._closed = True

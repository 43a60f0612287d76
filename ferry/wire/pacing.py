"""Sender pacing: a byte token bucket driven by the caller's clock (sans-IO).

A one-way link has no feedback, so the sender must never offer more than the
link (and the receiver) can take: a diode silently drops the excess. The
bucket counts *every* byte that reaches the wire, as reported by the
transport's :meth:`~ferry.channels.base.DatagramSender.wire_size` (headers,
FEC repair and heartbeats included), so the configured rate is the real rate.

Semantics (a "debt" bucket)
---------------------------
The bucket holds up to ``burst`` bytes of credit and refills at ``rate``
bytes per second. :meth:`TokenBucket.consume` debits ``n`` bytes at once,
even if that drives the credit negative, and returns how long from ``now``
the caller must wait until the debt is repaid::

    wait = bucket.consume(transport.wire_size(len(d)), clock())
    sleep(wait)          # wait-then-send: the datagram leaves on schedule
    transport.send(d)

Because the debit is never refused or rounded, pacing is exact over time: no
byte is forgotten and oversleeping is absorbed by the burst credit. Bytes
sent in any window of length ``T`` stay below ``max(burst, largest datagram)
+ rate * T``. A datagram larger than ``burst`` is still allowed; it simply
waits until the bucket would have held it.

Batch pacing (research notes §6.2: groups of 32-128 packets) works the same
way: consume every datagram of the batch with the same ``now``, send the
batch, then sleep the last returned wait before the next batch. The long-run
rate is identical; the batch goes out as one burst of at most ``burst`` bytes
plus one batch.

Time is passed in (any monotonic clock, in seconds); a clock that steps
backwards is treated as not having moved.
"""

from __future__ import annotations

from ferry.errors import UsageError


class TokenBucket:
    """Byte token bucket with debt: ``rate`` bytes/s, at most ``burst`` bytes of credit.

    The bucket starts full at the first :meth:`consume` (or at :meth:`reset`).
    """

    __slots__ = ("_burst", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, burst: int) -> None:
        _check_rate(rate)
        if burst <= 0:
            raise UsageError(f"token bucket burst must be positive bytes, got {burst!r}")
        self._rate = float(rate)
        self._burst = burst
        self._tokens = float(burst)
        self._last: float | None = None

    @property
    def rate(self) -> float:
        """Refill rate in bytes per second."""
        return self._rate

    @property
    def burst(self) -> int:
        """Largest credit, in bytes, the bucket can hold."""
        return self._burst

    def reset(self, now: float) -> None:
        """Forget any debt or credit history: the bucket is full at ``now``."""
        self._tokens = float(self._burst)
        self._last = now

    def set_rate(self, rate: float, now: float) -> None:
        """Change the rate from ``now`` on; credit earned before ``now`` is kept.

        Outstanding debt is repaid at the new rate.
        """
        _check_rate(rate)
        self._refill(now)
        self._rate = float(rate)

    def consume(self, n: int, now: float) -> float:
        """Debit ``n`` bytes sent at ``now``; return seconds to wait before sending (0.0: none)."""
        if n < 0:
            raise UsageError(f"cannot consume a negative byte count ({n})")
        self._refill(now)
        self._tokens -= n
        if self._tokens >= 0.0:
            return 0.0
        return -self._tokens / self._rate

    def credit(self, now: float) -> float:
        """Bytes of credit at ``now`` (negative while in debt). Does not debit."""
        if self._last is None:
            return float(self._burst)
        return min(float(self._burst), self._tokens + max(0.0, now - self._last) * self._rate)

    def _refill(self, now: float) -> None:
        if self._last is None:
            self._last = now
            return
        elapsed = now - self._last
        if elapsed <= 0.0:
            return
        self._tokens = min(float(self._burst), self._tokens + elapsed * self._rate)
        self._last = now


def _check_rate(rate: float) -> None:
    # `not rate > 0` also rejects NaN.
    if not rate > 0.0 or rate == float("inf"):
        raise UsageError(f"token bucket rate must be a positive finite bytes/s, got {rate!r}")

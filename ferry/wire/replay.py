"""Anti-replay sliding window over packet numbers (RFC 4303 section 3.4.3 style)."""

from __future__ import annotations

# 8192 packets is ~11 MB of 1400-byte packets: far more reordering than a diode
# or a serial line produces, small enough to keep as one Python int bitmap.
WINDOW_SIZE = 8192


class ReplayWindow:
    """Remembers which packet numbers of one session were accepted.

    ``check(pn)`` says whether a packet could be new (call before the costly
    authentication); ``accept(pn)`` records it (call only after the packet
    authenticated, so forged packets cannot poison the window).
    """

    __slots__ = ("_bits", "_mask", "_size", "highest")

    def __init__(self, size: int = WINDOW_SIZE) -> None:
        self._size = size
        self._mask = (1 << size) - 1
        self.highest = -1
        self._bits = 0  # bit i set <=> packet (highest - i) seen

    def check(self, pn: int) -> bool:
        if pn > self.highest:
            return True
        offset = self.highest - pn
        if offset >= self._size:
            return False
        return not (self._bits >> offset) & 1

    def accept(self, pn: int) -> None:
        if pn > self.highest:
            shift = pn - self.highest
            # (a jump past the window forgets it all, without building a huge int)
            self._bits = ((self._bits << shift) | 1) & self._mask if shift < self._size else 1
            self.highest = pn
        else:
            self._bits |= 1 << (self.highest - pn)

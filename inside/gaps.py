"""Sequence-gap detection: items the outside sent that never arrived (pure, no IO).

Each item carries its channel's sequence number (1, 2, 3, …). Heartbeats carry, per
channel, the last sequence number the sender has finished sending. A number at or below
such a claim that is still unseen ``grace`` seconds after the claim was first heard was
sent and lost: every packet of it was dropped, or the object was never completed.
:meth:`SequenceGaps.due` reports each missing range once (``link.sequence_gap``). The
grace covers objects still in flight and repeats on their way.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

# Claims remembered per channel while their grace runs (older ones merge; bounds memory).
MAX_MARKS = 1024


@dataclass(frozen=True)
class Gap:
    channel: str
    first: int
    last: int


class SequenceGaps:
    def __init__(
        self,
        grace: float,
        per_channel: dict[str, float] | None = None,
        channels: Collection[str] | None = None,
    ) -> None:
        """``channels``: the only ones tracked (None: any). Heartbeats name channels as the
        sender likes: state for each name they carry would grow with every heartbeat."""
        self.grace = grace
        self.per_channel = per_channel or {}  # channels whose copies come later (repeats)
        self.channels = None if channels is None else frozenset(channels)
        self._floor: dict[str, int] = {}  # every seq <= floor is seen or reported
        self._above: dict[str, set[int]] = {}  # seen seqs above the floor
        self._marks: dict[str, deque[tuple[int, float]]] = {}  # (claimed last_seq, first heard)
        self._lock = threading.Lock()  # delivery threads report, the receive loop asks

    def seen(self, channel: str, seq: int) -> None:
        with self._lock:
            self._seen(channel, seq)

    def seen_up_to(self, channel: str, seq: int) -> None:
        """Every number of ``channel`` up to ``seq`` counts as seen (the ledger forgot them)."""
        if self.channels is not None and channel not in self.channels:
            return
        with self._lock:
            floor = max(self._floor.get(channel, 0), seq)
            above = self._above.get(channel, set())
            above.difference_update([s for s in above if s <= floor])
            self._advance(channel, floor)

    def _seen(self, channel: str, seq: int) -> None:
        if self.channels is not None and channel not in self.channels:
            return
        floor = self._floor.get(channel, 0)
        if seq <= floor:
            return
        self._above.setdefault(channel, set()).add(seq)
        self._advance(channel, floor)

    def _advance(self, channel: str, floor: int) -> None:
        above = self._above.get(channel, set())
        while floor + 1 in above:  # advance over the contiguous run
            floor += 1
            above.discard(floor)
        self._floor[channel] = floor

    def heartbeat(self, last_seq: dict[str, int], now: float) -> None:
        with self._lock:
            self._heartbeat(last_seq, now)

    def _heartbeat(self, last_seq: dict[str, int], now: float) -> None:
        for channel, last in last_seq.items():
            if self.channels is not None and channel not in self.channels:
                continue
            marks = self._marks.setdefault(channel, deque())
            top = marks[-1][0] if marks else self._floor.get(channel, 0)
            if last > top:
                marks.append((last, now))
                if len(marks) > MAX_MARKS:  # keep the newest; the oldest claim absorbs one
                    marks.popleft()

    def due(self, now: float) -> list[Gap]:
        """Missing ranges claimed sent more than ``grace`` seconds ago (each reported once)."""
        with self._lock:
            return self._due(now)

    def _due(self, now: float) -> list[Gap]:
        out: list[Gap] = []
        for channel, marks in self._marks.items():
            limit = 0
            grace = self.per_channel.get(channel, self.grace)
            while marks and now - marks[0][1] >= grace:
                limit = max(limit, marks.popleft()[0])
            floor = self._floor.get(channel, 0)
            if limit <= floor:
                continue
            above = self._above.get(channel, set())
            start = floor + 1
            for s in sorted(s for s in above if s <= limit):
                if s > start:
                    out.append(Gap(channel, start, s - 1))
                start = s + 1
            if start <= limit:
                out.append(Gap(channel, start, limit))
            self._above[channel] = {s for s in above if s > limit}
            self._advance(channel, limit)
        return out

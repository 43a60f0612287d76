"""Link health on the inside, from heartbeats alone (sans-IO).

States: ``UP`` (heartbeats arrive), ``DEGRADED`` (none for ``degraded_after``
seconds, or heartbeats are being lost), ``DOWN`` (none for ``down_after``
seconds; also the initial state). Alarms: link-parameter digest mismatch,
clock skew beyond ``max_clock_skew``, heartbeat sequence gaps, and a sender
restart (new epoch).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ferry.wire.records import Heartbeat


class LinkState(enum.Enum):
    DOWN = "DOWN"
    DEGRADED = "DEGRADED"
    UP = "UP"


@dataclass(frozen=True)
class LinkEvent:
    kind: str
    """``state`` | ``params_mismatch`` | ``clock_skew`` | ``heartbeat_gap`` | ``sender_restart``"""
    message: str
    state: LinkState
    detail: dict[str, object]


class LinkMonitor:
    def __init__(
        self,
        params_digest: bytes,
        *,
        degraded_after: float,
        down_after: float,
        max_clock_skew: float,
    ) -> None:
        self._digest = params_digest
        self._degraded_after = degraded_after
        self._down_after = down_after
        self._max_skew = max_clock_skew
        self.state = LinkState.DOWN
        self.last_heartbeat: Heartbeat | None = None
        self.last_heard = 0.0
        self.heartbeats_missed = 0
        self._mismatch_reported = False
        self._skew_reported = False

    @property
    def params_mismatch(self) -> bool:
        """The last heartbeat carried another link-parameter digest than ours."""
        return self._mismatch_reported

    @property
    def clock_skewed(self) -> bool:
        """The last heartbeat's sender clock was further off than max_clock_skew."""
        return self._skew_reported

    def _set(self, state: LinkState, why: str, out: list[LinkEvent]) -> None:
        if state != self.state:
            old, self.state = self.state, state
            out.append(
                LinkEvent(
                    "state", f"link {old.value} -> {state.value}: {why}", state, {"from": old.value}
                )
            )

    def on_heartbeat(self, hb: Heartbeat, now: float) -> list[LinkEvent]:
        out: list[LinkEvent] = []
        prev = self.last_heartbeat
        if prev is not None and hb.epoch != prev.epoch:
            out.append(
                LinkEvent(
                    "sender_restart",
                    f"sender restarted (epoch {prev.epoch} -> {hb.epoch})",
                    self.state,
                    {"old_epoch": prev.epoch, "new_epoch": hb.epoch},
                )
            )
        elif prev is not None and hb.sequence > prev.sequence + 1:
            missed = hb.sequence - prev.sequence - 1
            self.heartbeats_missed += missed
            out.append(
                LinkEvent(
                    "heartbeat_gap",
                    f"{missed} heartbeat(s) lost",
                    self.state,
                    {"missed": missed, "after": prev.sequence},
                )
            )
        if hb.params_digest != self._digest:
            if not self._mismatch_reported:
                out.append(
                    LinkEvent(
                        "params_mismatch",
                        "link parameters differ between outside and inside configs",
                        self.state,
                        {"sender": hb.params_digest.hex(), "ours": self._digest.hex()},
                    )
                )
                self._mismatch_reported = True
        else:
            self._mismatch_reported = False
        skew = hb.sender_time_us / 1e6 - now
        if abs(skew) > self._max_skew:
            if not self._skew_reported:
                out.append(
                    LinkEvent(
                        "clock_skew",
                        f"sender clock differs by {skew:+.1f} s",
                        self.state,
                        {"skew_seconds": round(skew, 3)},
                    )
                )
                self._skew_reported = True
        else:
            self._skew_reported = False
        self.last_heartbeat = hb
        self.last_heard = now
        self._set(LinkState.UP, "heartbeat received", out)
        return out

    def tick(self, now: float) -> list[LinkEvent]:
        out: list[LinkEvent] = []
        if self.state is LinkState.DOWN:
            return out
        silent = now - self.last_heard
        if silent >= self._down_after:
            self._set(LinkState.DOWN, f"no heartbeat for {silent:.1f} s", out)
        elif silent >= self._degraded_after:
            self._set(LinkState.DEGRADED, f"no heartbeat for {silent:.1f} s", out)
        return out

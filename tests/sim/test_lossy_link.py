"""Simulation: outside Sender ─ seeded LossyLink ─ inside Receiver, in one process, fake clock.

The clock starts at a Unix time (not 0.0) like the agents' ``time.time()``, so time-outs
behave as in production. Every run is reproducible from its seed.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

from ferry.channels.memory import LossyLink
from ferry.config_types import FecCodecName, FecParams, LinkParams
from ferry.crypto.keys import SecretKey
from ferry.errors import EnvelopeRejected, ReplayRejected, WireError
from ferry.wire import records as rec
from ferry.wire.linkstate import LinkMonitor, LinkState
from ferry.wire.receiver import (
    BlockDecoded,
    HeartbeatReceived,
    ObjectCompleted,
    ObjectLost,
    Receiver,
    SessionStarted,
)
from ferry.wire.sender import BytesSource, OutgoingObject, Sender

SIGN = SecretKey("ed25519", bytes(range(32)))
KEM = SecretKey("mlkem768x25519", bytes(range(96)))
OTHER_SIGN = SecretKey("ed25519", bytes(range(1, 33)))
OTHER_KEM = SecretKey("mlkem768x25519", bytes(range(1, 97)))
START = 1_700_000_000.0
RATE = 20_000.0  # simulated datagrams per second
BATCH = 64
TIMEOUT = 60.0

# The loss model of the acceptance run: 5% random loss, a 100-datagram burst about every
# 3,000 datagrams, and a little of every other impairment.
IMPAIRED: dict[str, Any] = {
    "drop": 0.05,
    "burst_every": 1 / 3000,
    "burst_len": 100,
    "duplicate": 0.01,
    "reorder": 0.01,
    "reorder_depth": 16,
    "corrupt": 0.001,
    "replay": 0.001,
}


def link_params(
    codec: FecCodecName, source: int, repair: int, interleave: int, **kw: Any
) -> LinkParams:
    return LinkParams(
        fec=FecParams(codec=codec, source=source, repair=repair, interleave=interleave), **kw
    )


# Adequate repair for that model. A block of k_b source symbols gets ceil(r * k_b / k)
# repair symbols, so a one-symbol object gets only ceil(r / k) copies: with r / k = 1/2
# (say 32 + 16) it has two, and at 5% loss plus bursts about 1 in 100 such objects is
# lost; k = 8, r = 17 gives three and still lost one small object in the first seeds
# tried. With k = 4, r = 13 a one-symbol object has four repair copies (all five lost:
# ~1e-5 at the ~9% effective loss). An interleave of 128 spreads a block's symbols 128
# datagrams apart, so a 100-datagram burst costs each block at most one.
ADEQUATE = link_params("isal", 4, 13, 128)


def make_objects(seed: int, n: int, n_big: int) -> dict[bytes, bytes]:
    """Mostly small objects (a few KB, some empty) and ``n_big`` of 200-500 KB."""
    rng = random.Random(f"objects:{seed}")
    big = set(rng.sample(range(n), n_big))
    objects: dict[bytes, bytes] = {}
    for i in range(n):
        if i in big:
            size = rng.randint(200_000, 500_000)
        elif rng.random() < 0.02:
            size = 0
        else:
            size = min(int(rng.expovariate(1 / 4000)), 100_000)
        objects[rng.randbytes(16)] = rng.randbytes(size)
    return objects


@dataclass
class Outcome:
    objects: dict[bytes, bytes]
    completed: Counter[bytes] = field(default_factory=Counter)
    lost: dict[bytes, ObjectLost] = field(default_factory=dict)
    wrong: list[bytes] = field(default_factory=list)
    """Completed objects whose reassembled bytes differ from the original."""
    after_end: list[object] = field(default_factory=list)
    """Events about an object after it was completed or lost."""
    errors: Counter[str] = field(default_factory=Counter)
    sessions: list[SessionStarted] = field(default_factory=list)
    heartbeats: list[HeartbeatReceived] = field(default_factory=list)
    buffers: dict[bytes, bytearray] = field(default_factory=dict)
    now: float = START

    def handle(self, events: Iterable[object]) -> None:
        for event in events:
            if isinstance(event, BlockDecoded):
                if event.object_id in self.completed or event.object_id in self.lost:
                    self.after_end.append(event)
                    continue
                buf = self.buffers.setdefault(event.object_id, bytearray(event.object_length))
                buf[event.offset : event.offset + len(event.data)] = event.data
            elif isinstance(event, ObjectCompleted):
                if event.object_id in self.completed or event.object_id in self.lost:
                    self.after_end.append(event)
                self.completed[event.object_id] += 1
                data = bytes(self.buffers.pop(event.object_id, b""))
                if data != self.objects[event.object_id]:
                    self.wrong.append(event.object_id)
            elif isinstance(event, ObjectLost):
                if event.object_id in self.completed or event.object_id in self.lost:
                    self.after_end.append(event)
                self.lost[event.object_id] = event
                self.buffers.pop(event.object_id, None)  # partial bytes are thrown away
            elif isinstance(event, SessionStarted):
                self.sessions.append(event)
            elif isinstance(event, HeartbeatReceived):
                self.heartbeats.append(event)


def feed(receiver: Receiver, datagrams: Iterable[bytes], now: float, out: Outcome) -> None:
    for datagram in datagrams:
        try:
            receiver.receive_datagram(datagram, now)
        except WireError as exc:
            out.errors[type(exc).__name__] += 1
            if "erasure decoding failed" in str(exc):
                out.errors["erasure decoding failed"] += 1
        out.handle(receiver.pop_events())


def transfer(
    objects: dict[bytes, bytes],
    params: LinkParams,
    link: LossyLink,
    receiver: Receiver,
    *,
    seed: int,
    start: float = START,
    before: Callable[[Sender], None] | None = None,
    capture: list[bytes] | None = None,
    drop_first: bool = False,
    rate: float = RATE,
) -> Outcome:
    """Send every object through ``link`` into ``receiver``, ticking after each batch."""
    sender = Sender(
        params, SIGN, KEM.public, epoch=1, rng=random.Random(f"rng:{seed}").randbytes, now=start
    )
    for oid, data in objects.items():
        sender.submit(OutgoingObject(oid, len(data), BytesSource(data)))
    if before is not None:
        before(sender)
    out = Outcome(objects)
    now = start
    first = True
    while not sender.idle:
        batch = sender.datagrams(now, BATCH)
        if capture is not None:
            capture.extend(batch)
        if first and drop_first:
            batch = batch[1:]  # the session's first announcement is lost
        first = False
        for datagram in batch:
            link.send(datagram)
        feed(receiver, link.deliver(), now, out)
        receiver.tick(now)
        out.handle(receiver.pop_events())
        now += BATCH / rate
    link.flush()
    feed(receiver, link.deliver(), now, out)
    sent = {e.object_id for e in sender.pop_events()}
    assert sent == set(objects), "the sender hands out every symbol of every object"
    out.now = now
    return out


# ------------------------------------------------------------------- acceptance run
@pytest.mark.parametrize(
    ("seed", "params"),
    [
        pytest.param(1, ADEQUATE, id="isal-seed1"),
        pytest.param(2, ADEQUATE, id="isal-seed2"),
        pytest.param(3, ADEQUATE, id="isal-seed3"),
        pytest.param(4, link_params("zfec", 4, 13, 128), id="zfec-seed4"),
    ],
)
def test_every_object_arrives_intact_exactly_once(seed: int, params: LinkParams) -> None:
    objects = make_objects(seed, 1500, 60)
    assert sum(map(len, objects.values())) > 8_000_000
    assert sum(not v for v in objects.values()) > 0  # some empty objects
    link = LossyLink(seed, **IMPAIRED)
    receiver = Receiver(params, SIGN.public, KEM, object_timeout=TIMEOUT)
    out = transfer(objects, params, link, receiver, seed=seed)
    receiver.tick(out.now + TIMEOUT + 1)  # anything incomplete would be reported now
    out.handle(receiver.pop_events())

    assert out.lost == {}
    assert out.wrong == []
    assert out.after_end == []
    assert set(out.completed) == set(objects)
    assert set(out.completed.values()) == {1}
    assert receiver.active_objects == 0
    assert out.errors["erasure decoding failed"] == 0
    # the link really was hostile, and the machine really repaired
    c = link.counters
    assert c.dropped > 0.04 * c.sent
    assert c.burst_dropped >= 100
    assert min(c.duplicated, c.reordered, c.corrupted, c.replayed) > 0
    assert out.errors["ReplayRejected"] > 0  # duplicates and replays
    assert out.errors["EnvelopeRejected"] > 0  # corruption
    assert receiver.stats.blocks_recovered > 0.1 * receiver.stats.blocks_decoded
    assert [(s.epoch, s.counter) for s in out.sessions] == [(1, 1)]


def test_losing_the_first_announcement_loses_no_object() -> None:
    params = link_params("zfec", 8, 4, 128)
    objects = make_objects(5, 300, 0)
    link = LossyLink(5)  # a perfect link: only the first datagram is lost
    receiver = Receiver(params, SIGN.public, KEM, object_timeout=TIMEOUT)
    out = transfer(objects, params, link, receiver, seed=5, drop_first=True)
    assert out.sessions, "a later copy of the announcement set the session up"
    assert out.lost == {}
    assert set(out.completed) == set(objects)


# ---------------------------------------------------------- beyond the repair budget
def test_beyond_the_repair_budget_objects_are_lost_never_wrong() -> None:
    params = link_params("zfec", 8, 2, 16)
    objects = make_objects(6, 300, 5)
    link = LossyLink(6, drop=0.40, duplicate=0.01, reorder=0.01, corrupt=0.001, replay=0.001)
    receiver = Receiver(params, SIGN.public, KEM, object_timeout=TIMEOUT)

    def announce_reliably(sender: Sender) -> None:
        # keeps this test about the repair budget (the lost-announcement path has its own)
        receiver.receive_datagram(sender.announcement(), START)

    out = transfer(objects, params, link, receiver, seed=6, before=announce_reliably)
    assert len(out.sessions) == 1
    assert out.now - START < TIMEOUT / 2

    # nothing is given up before object_timeout has passed ...
    receiver.tick(out.now + TIMEOUT / 2)
    out.handle(receiver.pop_events())
    assert out.lost == {}
    incomplete = receiver.active_objects
    assert incomplete > 0
    # ... and everything incomplete is reported lost after it
    receiver.tick(out.now + TIMEOUT + 1)
    out.handle(receiver.pop_events())
    assert len(out.lost) == incomplete
    assert receiver.active_objects == 0

    assert out.completed, "small objects still get through"
    assert out.wrong == []
    assert out.after_end == []
    assert set(out.completed.values()) == {1}
    assert not set(out.completed) & set(out.lost)
    assert all(e.reason == "timeout" for e in out.lost.values())
    assert all(e.blocks_done < e.blocks_total for e in out.lost.values())
    assert all(e.length == len(objects[e.object_id]) for e in out.lost.values())
    # objects whose every symbol was lost are never heard of: neither completed nor lost
    unheard = set(objects) - set(out.completed) - set(out.lost)
    assert all(len(objects[oid]) < 20_000 for oid in unheard)


# --------------------------------------------------------------------------- replay
Capture = tuple[dict[bytes, bytes], list[bytes], Receiver, Outcome]


@pytest.fixture(scope="module")
def capture() -> Capture:
    """A lossless transfer over several sessions: every datagram, and its receiver."""
    params = link_params("zfec", 8, 4, 16, rekey_interval=0.5)
    objects = make_objects(7, 60, 3)
    datagrams: list[bytes] = []
    receiver = Receiver(params, SIGN.public, KEM, object_timeout=TIMEOUT)
    out = transfer(objects, params, LossyLink(7), receiver, seed=7, capture=datagrams, rate=400.0)
    assert set(out.completed) == set(objects)
    assert len(out.sessions) >= 3  # the capture spans several rekeys
    return objects, datagrams, receiver, out


def _is_announce(datagram: bytes) -> bool:
    return rec.peek_type(datagram) == rec.TYPE_ANNOUNCE


def _replay(receiver: Receiver, capture: list[bytes]) -> tuple[Counter[str], list[object]]:
    errors: Counter[str] = Counter()
    events: list[object] = []
    for datagram in capture:
        try:
            receiver.receive_datagram(datagram, START + 100)
        except WireError as exc:
            kind = "announce" if _is_announce(datagram) else "sealed"
            errors[f"{kind}:{type(exc).__name__}"] += 1
        events += receiver.pop_events()
    receiver.tick(START + 101)
    events += receiver.pop_events()
    return errors, events


def test_replayed_capture_into_the_same_receiver_changes_nothing(capture: Capture) -> None:
    _, datagrams, receiver, out = capture
    errors, events = _replay(receiver, datagrams)
    assert events == []
    sealed = sum(not _is_announce(d) for d in datagrams)
    # the current session's packets hit its replay window; older sessions are closed
    assert errors["sealed:ReplayRejected"] + errors["sealed:EnvelopeRejected"] == sealed
    assert errors["sealed:ReplayRejected"] > 0
    assert errors["announce:ReplayRejected"] > 0  # the older sessions' announcements
    assert receiver.replay_floor == (1, out.sessions[-1].counter)


def test_replayed_capture_into_a_restarted_receiver_reopens_only_the_last_session(
    capture: Capture,
) -> None:
    """A restarted inside (its floor from the ledger) rejoins the newest session, as it must
    when the outside is still sending in it; every older session stays refused. What the
    replay completes again was all delivered before: the inside's ledger delivers none of
    it twice (tests/integration/test_cli_e2e.py, the replayed capture)."""
    _, datagrams, first, out = capture
    floor = first.replay_floor
    last = out.sessions[-1]
    assert floor == (1, last.counter)
    receiver = Receiver(first.params, SIGN.public, KEM, replay_floor=floor)
    errors, events = _replay(receiver, datagrams)
    started = [e for e in events if isinstance(e, SessionStarted)]
    assert [(e.epoch, e.counter, e.session_id) for e in started] == [
        (1, last.counter, last.session_id)
    ]
    older = sum(
        _is_announce(d) and rec.decode_announce(d)[0].session_id != last.session_id
        for d in datagrams
    )
    assert older > 0
    assert errors["announce:ReplayRejected"] == older
    assert errors["sealed:EnvelopeRejected"] > 0  # packets of the refused sessions
    again = {e.object_id for e in events if isinstance(e, ObjectCompleted)}
    assert again <= set(out.completed)  # nothing the first receiver had not completed
    assert receiver.replay_floor == floor


@pytest.mark.parametrize(
    ("trusted", "kem"),
    [
        pytest.param(SIGN, OTHER_KEM, id="wrong-inside-key"),
        pytest.param(OTHER_SIGN, KEM, id="foreign-signing-key"),
    ],
)
def test_capture_for_other_keys_is_rejected(
    capture: Capture, trusted: SecretKey, kem: SecretKey
) -> None:
    _, datagrams, first, _ = capture
    receiver = Receiver(first.params, trusted.public, kem)
    errors, events = _replay(receiver, datagrams)
    assert events == []
    announces = sum(map(_is_announce, datagrams))
    assert errors["announce:EnvelopeRejected"] == announces
    assert errors["sealed:EnvelopeRejected"] == len(datagrams) - announces
    assert receiver.replay_floor == (0, 0)


def test_forged_announcement_naming_the_trusted_key_is_rejected(capture: Capture) -> None:
    params = capture[2].params
    forger = Sender(
        params, OTHER_SIGN, KEM.public, epoch=9, rng=random.Random(8).randbytes, now=START
    )
    forged = bytearray(forger.announcement())
    forged[4:12] = SIGN.public.key_id  # claims to come from the trusted outside
    receiver = Receiver(params, SIGN.public, KEM)
    with pytest.raises(EnvelopeRejected):
        receiver.receive_datagram(bytes(forged), START)
    assert receiver.pop_events() == []
    assert receiver.replay_floor == (0, 0)


def test_restarted_receiver_accepts_the_next_session(capture: Capture) -> None:
    params = capture[2].params
    floor = capture[2].replay_floor
    receiver = Receiver(params, SIGN.public, KEM, replay_floor=floor)
    restarted = Sender(params, SIGN, KEM.public, epoch=2, rng=random.Random(9).randbytes, now=START)
    receiver.receive_datagram(restarted.announcement(), START)
    [event] = receiver.pop_events()
    assert isinstance(event, SessionStarted)
    assert (event.epoch, event.counter) == (2, 1)
    with pytest.raises(ReplayRejected):
        receiver.receive_datagram(capture[1][0], START)  # the old epoch is over


# ---------------------------------------------------------------------- link monitor
DIGEST = link_params("zfec", 8, 4, 16).digest()


def heartbeat(seq: int, t: float, *, epoch: int = 1, digest: bytes = DIGEST) -> rec.Heartbeat:
    return rec.Heartbeat(
        int(t * 1_000_000), epoch, 1, seq, 0, 0, 0, 0, digest, 1000, {"documents": seq}
    )


def monitor() -> LinkMonitor:
    return LinkMonitor(DIGEST, degraded_after=3.0, down_after=10.0, max_clock_skew=120.0)


def kinds(events: Iterable[object]) -> list[tuple[str, str]]:
    return [(e.kind, e.state.value) for e in events]  # type: ignore[attr-defined]


def test_monitor_up_degraded_down_up() -> None:
    m = monitor()
    assert m.state is LinkState.DOWN
    assert m.tick(START + 100) == []  # DOWN stays DOWN without heartbeats
    assert kinds(m.on_heartbeat(heartbeat(1, START), START)) == [("state", "UP")]
    assert kinds(m.on_heartbeat(heartbeat(2, START + 1), START + 1)) == []
    assert m.tick(START + 3.9) == []
    assert kinds(m.tick(START + 4.0)) == [("state", "DEGRADED")]
    assert m.tick(START + 5) == []  # reported once
    assert kinds(m.tick(START + 11.0)) == [("state", "DOWN")]
    assert m.tick(START + 20) == []
    events = m.on_heartbeat(heartbeat(3, START + 21), START + 21)
    assert kinds(events) == [("state", "UP")]
    assert "DOWN -> UP" in events[0].message
    assert m.state is LinkState.UP
    assert m.last_heard == START + 21


def test_monitor_counts_heartbeat_gaps() -> None:
    m = monitor()
    m.on_heartbeat(heartbeat(1, START), START)
    events = m.on_heartbeat(heartbeat(5, START + 4), START + 4)
    assert kinds(events) == [("heartbeat_gap", "UP")]
    assert events[0].detail == {"missed": 3, "after": 1}
    m.on_heartbeat(heartbeat(6, START + 5), START + 5)
    m.on_heartbeat(heartbeat(8, START + 7), START + 7)
    assert m.heartbeats_missed == 4


def test_monitor_params_mismatch_alarms_once_until_cleared() -> None:
    m = monitor()
    other = bytes(32)
    first = m.on_heartbeat(heartbeat(1, START, digest=other), START)
    assert kinds(first) == [("params_mismatch", "DOWN"), ("state", "UP")]
    assert first[0].detail == {"sender": other.hex(), "ours": DIGEST.hex()}
    assert m.on_heartbeat(heartbeat(2, START + 1, digest=other), START + 1) == []
    assert m.on_heartbeat(heartbeat(3, START + 2), START + 2) == []  # fixed: silent
    again = m.on_heartbeat(heartbeat(4, START + 3, digest=other), START + 3)
    assert kinds(again) == [("params_mismatch", "UP")]


@pytest.mark.parametrize("skew", [-300.0, 121.0, 3600.0])
def test_monitor_clock_skew_alarm(skew: float) -> None:
    m = monitor()
    events = m.on_heartbeat(heartbeat(1, START + skew), START)
    assert ("clock_skew", "DOWN") in kinds(events)
    [alarm] = [e for e in events if e.kind == "clock_skew"]
    assert alarm.detail == {"skew_seconds": skew}
    assert m.on_heartbeat(heartbeat(2, START + 1 + skew), START + 1) == []  # once
    assert m.on_heartbeat(heartbeat(3, START + 2), START + 2) == []


def test_monitor_within_skew_is_silent() -> None:
    m = monitor()
    assert kinds(m.on_heartbeat(heartbeat(1, START + 119.0), START)) == [("state", "UP")]


def test_monitor_sender_restart() -> None:
    m = monitor()
    m.on_heartbeat(heartbeat(40, START), START)
    events = m.on_heartbeat(heartbeat(1, START + 1, epoch=2), START + 1)
    assert kinds(events) == [("sender_restart", "UP")]
    assert events[0].detail == {"old_epoch": 1, "new_epoch": 2}
    assert m.heartbeats_missed == 0


def test_monitor_follows_heartbeats_through_a_lossy_link() -> None:
    """Real heartbeats over a link dropping 30%: every gap is counted, the link stays UP."""
    params = link_params("zfec", 8, 4, 16, heartbeat_interval=0.5)
    sender = Sender(params, SIGN, KEM.public, epoch=1, rng=random.Random(10).randbytes, now=START)
    receiver = Receiver(params, SIGN.public, KEM)
    receiver.receive_datagram(sender.announcement(), START)
    receiver.pop_events()
    link = LossyLink(10, drop=0.3)
    m = LinkMonitor(params.digest(), degraded_after=3.0, down_after=10.0, max_clock_skew=5.0)
    received: list[int] = []
    alarms: list[str] = []
    now = START
    for _ in range(400):  # 100 simulated seconds, one heartbeat every 0.5 s
        for datagram in sender.datagrams(now, 8):
            link.send(datagram)
        for datagram in link.deliver():
            try:
                receiver.receive_datagram(datagram, now)
            except WireError:
                continue
        for event in receiver.pop_events():
            if isinstance(event, HeartbeatReceived):
                received.append(event.heartbeat.sequence)
                alarms += [e.kind for e in m.on_heartbeat(event.heartbeat, now)]
        alarms += [e.kind for e in m.tick(now)]
        now += 0.25
    assert 120 < len(received) < 170  # about 70% of 200
    assert received == sorted(received)
    assert m.heartbeats_missed == received[-1] - received[0] + 1 - len(received) > 0
    assert set(alarms) == {"state", "heartbeat_gap"}
    assert m.state is LinkState.UP
    # silence: the sender stops, the monitor goes DEGRADED, then DOWN
    assert [e.state for e in m.tick(now + 3.0)] == [LinkState.DEGRADED]
    assert [e.state for e in m.tick(now + 10.0)] == [LinkState.DOWN]

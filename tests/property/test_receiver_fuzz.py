"""Fuzz the receiver in CI (h11's invariant): on any input it raises only WireError
(EnvelopeRejected and ReplayRejected are subclasses), decodes nothing, and is not
disturbed: the genuine rest of a transfer still rebuilds the object afterwards.

Inputs are arbitrary bytes, bytes behind a valid header prefix, and genuine
datagrams (announcement, heartbeat, symbols) with bits flipped, bytes overwritten,
inserted, deleted, truncated, extended or spliced. tests/fuzz/fuzz_receiver.py is the
coverage-guided (atheris) version of the same harness.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from ferry.config_types import FecParams, LinkParams
from ferry.crypto.keys import SecretKey
from ferry.errors import WireError
from ferry.wire import records as rec
from ferry.wire.receiver import BlockDecoded, Event, ObjectCompleted, Receiver, SessionStarted
from ferry.wire.sender import BytesSource, OutgoingObject, Sender

SIGN = SecretKey("ed25519", bytes(range(32)))
KEM = SecretKey("x25519", bytes(range(32, 64)))
LINK = LinkParams(fec=FecParams(codec="zfec", source=4, repair=2, interleave=2), kem="x25519")
NOW = 1_700_000_000.0
OBJECT_ID = b"\x42" * 16
SPLIT = 3  # genuine sealed datagrams fed before the fuzz input: not enough to finish


def _record() -> tuple[bytes, bytes, list[bytes]]:
    rng = random.Random(11)
    sender = Sender(LINK, SIGN, KEM.public, epoch=5, rng=rng.randbytes, now=NOW)
    data = rng.randbytes(7000)  # two blocks of 4 + 2 symbols
    sender.submit(OutgoingObject(OBJECT_ID, len(data), BytesSource(data)))
    out = sender.datagrams(NOW, 1000)
    announce = sender.announcement()
    return data, announce, [d for d in out if d != announce]


DATA, ANNOUNCE, SEALED = _record()
GENUINE = [ANNOUNCE, *SEALED]
GENUINE_SET = frozenset(GENUINE)
SESSION_ID = SEALED[0][4:12]

settings_fuzz = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _collect(events: list[Event], buf: bytearray) -> int:
    """Write decoded blocks into ``buf``; return the number of completions."""
    completed = 0
    for ev in events:
        if isinstance(ev, BlockDecoded):
            buf[ev.offset : ev.offset + len(ev.data)] = ev.data
        elif isinstance(ev, ObjectCompleted):
            completed += 1
    return completed


def _receiver_mid_transfer(buf: bytearray) -> Receiver:
    receiver = Receiver(LINK, SIGN.public, KEM, object_timeout=60.0)
    receiver.receive_datagram(ANNOUNCE, NOW)
    for d in SEALED[:SPLIT]:
        receiver.receive_datagram(d, NOW)
    events = receiver.pop_events()
    assert isinstance(events[0], SessionStarted)
    assert _collect(events, buf) == 0
    return receiver


def _check_invariant(inputs: list[bytes]) -> None:
    buf = bytearray(len(DATA))
    receiver = _receiver_mid_transfer(buf)
    blocks_before = receiver.stats.blocks_decoded
    for datagram in inputs:
        try:
            receiver.receive_datagram(datagram, NOW + 0.5)
        except WireError as exc:  # anything else propagates and fails the test
            event(f"{type(exc).__name__}: {str(exc)[:24]}")
        assert receiver.pop_events() == []
    receiver.tick(NOW + 1.0)
    assert receiver.pop_events() == []
    assert receiver.stats.blocks_decoded == blocks_before
    # the garbage did not poison the machine: the genuine rest still rebuilds the object
    completed = 0
    for d in SEALED[SPLIT:]:
        receiver.receive_datagram(d, NOW + 1.0)
        completed += _collect(receiver.pop_events(), buf)
    assert completed == 1
    assert bytes(buf) == DATA


# ----------------------------------------------------------------------- strategies
@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(GENUINE), label="base"))
    for _ in range(draw(st.integers(1, 4), label="mutations")):
        op = draw(
            st.sampled_from(
                ["flip", "set", "insert", "delete", "truncate", "extend", "splice", "swap_header"]
            )
        )
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "splice":
            other = draw(st.sampled_from(GENUINE))
            cut = draw(st.integers(0, len(other)))
            data = data[:pos] + bytearray(other[cut:])
        elif op == "swap_header":  # one packet's header on another's body
            other = draw(st.sampled_from(SEALED))
            data[: rec.SEALED_HEADER_LEN] = other[: rec.SEALED_HEADER_LEN]
    out = bytes(data)
    assume(out not in GENUINE_SET)
    return out


prefixed = st.one_of(
    st.binary(max_size=200).map(lambda b: b"FY\x01\x02" + SESSION_ID + b),
    st.binary(max_size=300).map(lambda b: b"FY\x01\x01" + b),
    st.binary(max_size=300).map(lambda b: ANNOUNCE[: rec.ANNOUNCE_HEAD_LEN] + b),
    st.binary(min_size=17, max_size=100).map(lambda b: SEALED[-1][: rec.SEALED_HEADER_LEN] + b),
)
garbage = st.one_of(st.binary(max_size=2000), prefixed, mutated())


# ---------------------------------------------------------------------------- tests
def test_the_genuine_transfer_completes_without_fuzz() -> None:
    _check_invariant([])


@settings_fuzz
@given(st.binary(max_size=2000))
def test_arbitrary_bytes(datagram: bytes) -> None:
    assume(datagram not in GENUINE_SET)
    _check_invariant([datagram])


@settings_fuzz
@given(st.lists(garbage, min_size=1, max_size=6))
def test_mutated_and_prefixed_datagrams(inputs: list[bytes]) -> None:
    _check_invariant(inputs)


@settings_fuzz
@given(st.lists(mutated(), min_size=1, max_size=3))
def test_mutated_genuine_datagrams(inputs: list[bytes]) -> None:
    _check_invariant(inputs)

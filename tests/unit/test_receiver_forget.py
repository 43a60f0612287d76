"""A completed object the inside could not keep (``Receiver.forget_finished``) is taken again
from a later copy, but not from the rest of the copy it completed from: that copy's last
repair symbols would start an object that never completes, and be recorded lost a second
time. And a lost object says how many of its blocks had been decoded."""

from __future__ import annotations

import random

from ferry.config_types import FecParams, LinkParams
from ferry.crypto.keys import SecretKey
from ferry.wire import records as rec
from ferry.wire.receiver import (
    FORGET_QUIET_MIN,
    BlockDecoded,
    ObjectCompleted,
    ObjectLost,
    Receiver,
)
from ferry.wire.sender import BytesSource, OutgoingObject, Sender

SIGN = SecretKey("ed25519", bytes(range(32)))
KEM = SecretKey("x25519", bytes(range(32, 64)))
# repair = source: the tail of a copy alone decodes whole blocks
LINK = LinkParams(fec=FecParams(codec="zfec", source=4, repair=4, interleave=2), kem="x25519")
NOW = 1_700_000_000.0
OID = b"\x42" * 16


def _copies(data: bytes, seed: int, count: int) -> list[list[bytes]]:
    """The sealed datagrams of ``count`` copies of the object, sent one after the other in
    one session (the first list starts with the announcement)."""
    sender = Sender(LINK, SIGN, KEM.public, epoch=5, rng=random.Random(seed).randbytes, now=NOW)
    out: list[list[bytes]] = []
    for i in range(count):
        sender.submit(OutgoingObject(OID, len(data), BytesSource(data)))
        datagrams = [sender.announcement()] if i == 0 else []
        while not sender.idle:
            datagrams += sender.datagrams(NOW, 1000)
        out.append(datagrams)
    return out


def _symbol_of(receiver: Receiver, datagram: bytes) -> tuple[int, int] | None:
    """(block, symbol) of a sealed symbol datagram, read with the receiver's own session."""
    if rec.peek_type(datagram) != rec.TYPE_SEALED:
        return None
    sid, pn = rec.decode_sealed_header(datagram)[:2]
    session = receiver._sessions[sid]
    header = datagram[: rec.SEALED_HEADER_LEN]
    frame = session.aead.open(pn, header, datagram[rec.SEALED_HEADER_LEN :])
    if frame[0] != rec.FRAME_SYMBOL:
        return None
    _, b, s, _ = rec.decode_symbol(frame)
    return b, s


def _completed_then_rest(receiver: Receiver, copy: list[bytes], now: float) -> list[bytes]:
    """Feed ``copy`` until the object completes; return the datagrams after that point."""
    for i, d in enumerate(copy):
        receiver.receive_datagram(d, now)
        if any(isinstance(e, ObjectCompleted) for e in receiver._events):
            return copy[i + 1 :]
    raise AssertionError("the copy did not complete")


def test_the_rest_of_a_forgotten_copy_is_ignored_and_a_later_copy_is_taken() -> None:
    data = random.Random(1).randbytes(40_000)
    receiver = Receiver(LINK, SIGN.public, KEM)
    first, second = _copies(data, seed=2, count=2)
    rest = _completed_then_rest(receiver, first, NOW)
    receiver.pop_events()
    receiver.forget_finished(OID, NOW)
    assert any(_symbol_of(receiver, d) not in (None, (0, 0)) for d in rest)
    for d in rest:
        receiver.receive_datagram(d, NOW + 0.01)
    assert receiver.active_objects == 0  # (they started nothing)
    receiver.tick(NOW + 0.02)
    # a later copy, at once: its first symbol (block 0, symbol 0) opens it again
    assert _symbol_of(receiver, next(d for d in second if _symbol_of(receiver, d))) == (0, 0)
    got = bytearray(len(data))
    for d in second:
        receiver.receive_datagram(d, NOW + 0.03)
    events = receiver.pop_events()
    for e in events:
        if isinstance(e, BlockDecoded):
            got[e.offset : e.offset + len(e.data)] = e.data
    assert [e for e in events if isinstance(e, ObjectCompleted)] != []
    assert bytes(got) == data
    receiver.tick(NOW + 3600)  # nothing left to time out: no second loss
    assert [e for e in receiver.pop_events() if isinstance(e, ObjectLost)] == []


def test_the_rest_of_a_forgotten_copy_never_times_out_as_a_loss() -> None:
    data = random.Random(8).randbytes(40_000)
    receiver = Receiver(LINK, SIGN.public, KEM, object_timeout=5.0)
    (first,) = _copies(data, seed=9, count=1)
    rest = _completed_then_rest(receiver, first, NOW)
    receiver.pop_events()
    receiver.forget_finished(OID, NOW)
    for d in rest:
        receiver.receive_datagram(d, NOW)
    receiver.tick(NOW + 10)
    assert receiver.pop_events() == []
    assert receiver.active_objects == 0


def test_after_a_quiet_spell_any_symbol_of_a_later_copy_opens_it() -> None:
    """The later copy's first symbol lost: it is still taken once the first copy has gone
    quiet."""
    data = random.Random(4).randbytes(40_000)
    receiver = Receiver(LINK, SIGN.public, KEM)
    first, second = _copies(data, seed=5, count=2)
    _completed_then_rest(receiver, first, NOW)
    receiver.pop_events()
    receiver.forget_finished(OID, NOW)
    later = [d for d in second if _symbol_of(receiver, d) not in (None, (0, 0))]
    at = NOW + FORGET_QUIET_MIN / 2
    receiver.receive_datagram(later[0], at)  # too soon to tell from the first copy: ignored
    assert receiver.active_objects == 0
    receiver.tick(at + FORGET_QUIET_MIN)
    receiver.receive_datagram(later[1], at + FORGET_QUIET_MIN)
    assert receiver.active_objects == 1


def test_an_object_lost_says_how_many_blocks_had_been_decoded() -> None:
    data = random.Random(6).randbytes(40_000)
    receiver = Receiver(LINK, SIGN.public, KEM, object_timeout=5.0)
    (copy,) = _copies(data, seed=7, count=1)
    decoded = 0
    for d in copy:
        receiver.receive_datagram(d, NOW)
        decoded += sum(isinstance(e, BlockDecoded) for e in receiver.pop_events())
        if decoded == 2:
            break
    receiver.tick(NOW + 10)
    (lost,) = [e for e in receiver.pop_events() if isinstance(e, ObjectLost)]
    assert lost.blocks_done == 2
    assert lost.blocks_total > 2

"""A completed object the inside could not keep (``Receiver.forget_finished``) is taken again
from a later copy, spaced or right behind it; the rest of the copy it completed from alone
starts an object that times out. And a lost object says how many of its blocks had been
decoded."""

from __future__ import annotations

import random

from ferry.config_types import FecParams, LinkParams
from ferry.crypto.keys import SecretKey
from ferry.wire import records as rec
from ferry.wire.receiver import (
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


def _data_of(events: list[object], length: int) -> bytes | None:
    """The object's bytes if ``events`` complete it."""
    got = bytearray(length)
    for e in events:
        if isinstance(e, BlockDecoded):
            got[e.offset : e.offset + len(e.data)] = e.data
    return bytes(got) if any(isinstance(e, ObjectCompleted) for e in events) else None


def test_a_later_copy_of_a_forgotten_object_is_taken_after_the_rest_of_the_first() -> None:
    data = random.Random(1).randbytes(40_000)
    receiver = Receiver(LINK, SIGN.public, KEM)
    first, second = _copies(data, seed=2, count=2)
    rest = _completed_then_rest(receiver, first, NOW)
    receiver.pop_events()
    receiver.forget_finished(OID)
    assert any(_symbol_of(receiver, d) is not None for d in rest)  # (its repair symbols)
    for d in rest:
        receiver.receive_datagram(d, NOW + 0.01)
    for d in second:
        receiver.receive_datagram(d, NOW + 5)
    assert _data_of(receiver.pop_events(), len(data)) == data


def test_a_copy_sent_right_behind_a_forgotten_one_is_taken() -> None:
    """Copies queued back to back share the sender's interleaving window: the second one's
    first symbols go out before the first copy has completed."""
    data = random.Random(4).randbytes(40_000)
    sender = Sender(LINK, SIGN, KEM.public, epoch=5, rng=random.Random(5).randbytes, now=NOW)
    for _ in range(2):
        sender.submit(OutgoingObject(OID, len(data), BytesSource(data)))
    both = [sender.announcement()]
    while not sender.idle:
        both += sender.datagrams(NOW, 1000)
    receiver = Receiver(LINK, SIGN.public, KEM)
    rest = _completed_then_rest(receiver, both, NOW)
    receiver.pop_events()
    receiver.forget_finished(OID)
    for d in rest:
        receiver.receive_datagram(d, NOW)
    assert _data_of(receiver.pop_events(), len(data)) == data


def test_the_rest_of_a_forgotten_copy_alone_times_out() -> None:
    """(The inside does not record it lost a second time: test_inside_spool_reserve.)"""
    data = random.Random(8).randbytes(40_000)
    receiver = Receiver(LINK, SIGN.public, KEM, object_timeout=5.0)
    (first,) = _copies(data, seed=9, count=1)
    rest = _completed_then_rest(receiver, first, NOW)
    receiver.pop_events()
    receiver.forget_finished(OID)
    for d in rest:
        receiver.receive_datagram(d, NOW)
    receiver.tick(NOW + 10)
    lost = [e for e in receiver.pop_events() if isinstance(e, ObjectLost)]
    assert [e.object_id for e in lost] == [OID]


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

"""Datagrams anyone on the link can forge, without a key: new announcements (each would cost
a signature check on the receiving thread) and rejections whose text carries numbers of the
forger's choosing (each would be a new entry in the inside's counts, log and status). Both
stay bounded, and the sessions already open go on."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random

import pytest

from ferry.config_types import FecParams, LinkParams
from ferry.crypto import suite
from ferry.crypto.keys import SecretKey
from ferry.errors import EnvelopeRejected
from ferry.wire import receiver as receiver_module
from ferry.wire import records as rec
from ferry.wire.receiver import (
    ANNOUNCE_CHECKS_BURST,
    ANNOUNCE_CHECKS_PER_SECOND,
    ObjectCompleted,
    Receiver,
    SessionStarted,
)
from ferry.wire.sender import BytesSource, OutgoingObject, Sender
from inside.agent import MAX_REJECTION_KINDS, _RateLimitedLog

SIGN = SecretKey("ed25519", bytes(range(32)))
KEM = SecretKey("x25519", bytes(range(32, 64)))
LINK = LinkParams(fec=FecParams(codec="zfec", source=4, repair=2, interleave=2), kem="x25519")
NOW = 1_700_000_000.0


def _forged(genuine: bytes, epoch: int) -> bytes:
    """A new announcement as a forger makes it: the genuine key ids (sent in clear), a newer
    epoch, any signature."""
    head, _, _ = rec.decode_announce(genuine)
    return dataclasses.replace(head, epoch=epoch).signed_part() + os.urandom(rec.SIGNATURE_LEN)


def test_forged_announcements_cost_a_bounded_number_of_checks_and_the_session_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(3)
    sender = Sender(LINK, SIGN, KEM.public, epoch=5, rng=rng.randbytes, now=NOW)
    data = rng.randbytes(7000)
    sender.submit(OutgoingObject(b"\x42" * 16, len(data), BytesSource(data)))
    out = sender.datagrams(NOW, 1000)
    genuine = sender.announcement()
    receiver = Receiver(LINK, SIGN.public, KEM)
    receiver.receive_datagram(genuine, NOW)
    checks: list[bytes] = []
    real = suite.verify

    def counting(key: object, label: bytes, signed: bytes, signature: bytes) -> None:
        checks.append(signed)
        real(key, label, signed, signature)  # type: ignore[arg-type]

    monkeypatch.setattr(receiver_module.suite, "verify", counting)
    refused: dict[str, int] = {}
    for n in range(10_000):  # in one second
        try:
            receiver.receive_datagram(_forged(genuine, 6 + n), NOW + n / 10_000)
        except EnvelopeRejected as exc:
            key = "unchecked" if "not checked" in str(exc) else "bad signature"
            refused[key] = refused.get(key, 0) + 1
    assert len(checks) <= ANNOUNCE_CHECKS_BURST + ANNOUNCE_CHECKS_PER_SECOND
    assert refused == {"bad signature": len(checks), "unchecked": 10_000 - len(checks)}
    assert receiver.stats.announces_unchecked == 10_000 - len(checks)
    completed = []
    for datagram in out:  # the session opened before the flood still delivers
        if datagram != genuine:
            receiver.receive_datagram(datagram, NOW + 1)
        completed += [e for e in receiver.pop_events() if isinstance(e, ObjectCompleted)]
    assert len(completed) == 1
    # a genuine new announcement (a restarted outside) gets through once the flood eases
    later = Sender(LINK, SIGN, KEM.public, epoch=10_000_000, rng=rng.randbytes, now=NOW + 5)
    receiver.receive_datagram(later.announcement(), NOW + 5)
    assert [e for e in receiver.pop_events() if isinstance(e, SessionStarted)]


def test_an_announcement_whose_wrapped_key_has_the_wrong_length_is_refused_unchecked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    genuine = Sender(LINK, SIGN, KEM.public, epoch=5, rng=os.urandom, now=NOW).announcement()
    head, _, _ = rec.decode_announce(genuine)
    short = dataclasses.replace(head, wrapped_key=b"")
    monkeypatch.setattr(receiver_module.suite, "verify", lambda *a: pytest.fail("checked"))
    with pytest.raises(EnvelopeRejected, match="wrong length"):
        Receiver(LINK, SIGN.public, KEM).receive_datagram(
            short.signed_part() + bytes(rec.SIGNATURE_LEN), NOW
        )


def test_rejections_are_counted_by_kind_not_by_the_numbers_a_forger_chooses() -> None:
    log = _RateLimitedLog()
    logged = []
    for n in range(5000):
        reason = f"announce epoch {n}/{n * 7} is not newer than 99/1"
        if log("packet_rejected", reason):
            logged.append(n)
        log("packet_rejected", f"announce signed by unknown key {os.urandom(8).hex()}")
    assert len(log.counts) == 2
    assert sorted(log.counts.values()) == [5000, 5000]
    assert logged == [0, 1, 3, 7, 15, 31, 63, 127, 255, 511, 1023, 2047, 4095]
    for n in range(MAX_REJECTION_KINDS * 2):  # kinds a forger cannot vary: still bounded
        log("packet_rejected", f"unknown record type x{'y' * n}")
    assert len(log.counts) == MAX_REJECTION_KINDS + 1
    assert log.counts[_RateLimitedLog.OTHER] > 0


def test_tiny_symbols_count_what_they_hold_toward_the_memory_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sender (with the key: a compromised outside) choosing 16-byte symbols and sending
    one of each block's two: each pending symbol holds some 300 bytes of Python objects,
    so the bound counts those, not the 16 bytes alone (else 20 times the bound in memory)."""
    bound = 256 * 1024
    monkeypatch.setattr(receiver_module, "MAX_PENDING_BYTES", bound)
    link = LinkParams(
        fec=FecParams(codec="zfec", source=2, repair=0, interleave=1), kem="x25519", packet_size=87
    )
    rng = random.Random(5)
    sender = Sender(link, SIGN, KEM.public, epoch=5, rng=rng.randbytes, now=NOW)
    data = rng.randbytes(16 * 2 * 20_000)  # 20,000 blocks of two 16-byte symbols
    sender.submit(OutgoingObject(b"\x07" * 16, len(data), BytesSource(data)))
    out = sender.datagrams(NOW, 50_000)
    receiver = Receiver(link, SIGN.public, KEM)
    receiver.receive_datagram(out[0], NOW)  # the announcement
    fed = 0
    for datagram in out[1::2]:  # one symbol of each block
        fed += 1
        receiver.receive_datagram(datagram, NOW)
        if any(isinstance(e, receiver_module.ObjectLost) for e in receiver.pop_events()):
            break
    else:
        pytest.fail("never lost: the memory bound did not hold")
    assert fed <= bound // (16 + receiver_module.SYMBOL_COST) + 10  # (a few are not symbols)
    assert receiver._pending_bytes == 0  # (all it held, given back)


def test_a_rekey_is_taken_within_seconds_under_a_flood_of_forged_announcements() -> None:
    """Anyone on the diode's low side, without a key: forged announcements (the key ids are
    in clear in every genuine one; any epoch above the floor; any signature, each one new)
    at 2,000 a second, 2.6 MB/s with the default hybrid KEM. Each passes every cheap check
    and takes a signature check from the receiver's budget. The outside's genuine new
    announcement after a rekey, repeated every announce_interval (1 s, a few ms of timer
    jitter), is taken within a few repeats (with a budget of 20 checks a second: after 83
    s, and everything sent in the new session meanwhile was lost)."""
    rng = random.Random(1)
    sender = Sender(LINK, SIGN, KEM.public, epoch=5, rng=rng.randbytes, now=NOW)
    rx = Receiver(LINK, SIGN.public, KEM)
    rx.receive_datagram(sender.announcement(), NOW)  # the running session
    rx.pop_events()
    t_genuine = NOW + 5 + rng.random()  # (the flood has emptied the budget by then)
    sender._new_session(t_genuine)  # the hourly rekey (as rekey_interval does it)
    genuine = sender.announcement()
    head, _, _ = rec.decode_announce(genuine)
    heads = [
        dataclasses.replace(head, epoch=6 + i, session_id=rng.randbytes(8)).signed_part()
        for i in range(64)
    ]
    rate, horizon = 2000.0, 60.0
    t_forged, first, opened_at, n = NOW, t_genuine, None, 0
    while t_genuine < first + horizon and opened_at is None:
        while t_forged < t_genuine:
            with contextlib.suppress(EnvelopeRejected):  # (a new signature each time)
                rx.receive_datagram(heads[n % 64] + rng.randbytes(rec.SIGNATURE_LEN), t_forged)
            n += 1
            t_forged += rng.expovariate(rate)
        with contextlib.suppress(EnvelopeRejected):
            rx.receive_datagram(genuine, t_genuine)
        if any(isinstance(e, SessionStarted) for e in rx.pop_events()):
            opened_at = t_genuine - first
        t_genuine += 1.0 + rng.random() * 0.005  # the outside's announce timer
    assert opened_at is not None, f"no new session within {horizon:g} s of the flood"
    assert opened_at <= 10, f"the rekey was taken after {opened_at:.1f} s"
    assert rx.stats.announces_unchecked > 0  # (the flood did meet the budget)

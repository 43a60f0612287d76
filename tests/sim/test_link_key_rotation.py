"""Key rotation with overlap on the link: an inside that trusts the outside's new and old
signing keys and holds its new and old KEM keys takes sessions from either, keeps a replay
floor per signing key, and refuses a key once it is no longer listed."""

from __future__ import annotations

import random

import pytest
from test_lossy_link import ADEQUATE, START

from ferry.crypto.keys import SecretKey
from ferry.errors import EnvelopeRejected, ReplayRejected
from ferry.wire.receiver import ObjectCompleted, Receiver, SessionStarted
from ferry.wire.sender import BytesSource, OutgoingObject, Sender

OLD_SIGN = SecretKey("ed25519", bytes(range(32)))
NEW_SIGN = SecretKey("ed25519", bytes(range(2, 34)))
OLD_KEM = SecretKey("mlkem768x25519", bytes(range(96)))
NEW_KEM = SecretKey("mlkem768x25519", bytes(range(3, 99)))


def _sender(sign: SecretKey, kem: SecretKey, epoch: int, seed: int) -> Sender:
    return Sender(
        ADEQUATE, sign, kem.public, epoch=epoch, rng=random.Random(seed).randbytes, now=START
    )


def _send(sender: Sender, receiver: Receiver, payload: bytes) -> list[object]:
    """One object through a perfect link; the receiver's events (errors raise)."""
    oid = random.Random(payload).randbytes(16)
    sender.submit(OutgoingObject(oid, len(payload), BytesSource(payload)))
    events: list[object] = []
    now = START
    while not sender.idle:
        for datagram in sender.datagrams(now, 64):
            receiver.receive_datagram(datagram, now)
            events += receiver.pop_events()
        now += 0.01
    return events


def _completed(events: list[object]) -> int:
    return sum(isinstance(e, ObjectCompleted) for e in events)


def test_during_the_overlap_either_outside_key_and_either_kem_key_is_accepted() -> None:
    receiver = Receiver(ADEQUATE, [NEW_SIGN.public, OLD_SIGN.public], [NEW_KEM, OLD_KEM])
    old = _send(_sender(OLD_SIGN, OLD_KEM, epoch=5, seed=1), receiver, b"signed by the old key")
    [started] = [e for e in old if isinstance(e, SessionStarted)]
    assert started.sender_kid == OLD_SIGN.public.key_id
    assert _completed(old) == 1
    new = _send(_sender(NEW_SIGN, NEW_KEM, epoch=1, seed=2), receiver, b"signed by the new key")
    [started] = [e for e in new if isinstance(e, SessionStarted)]
    assert started.sender_kid == NEW_SIGN.public.key_id
    assert _completed(new) == 1
    # a floor per signing key: the new key's epoch 1 was not refused for being below 5
    assert receiver.floor_of(OLD_SIGN.public.key_id)[0] == 5
    assert receiver.floor_of(NEW_SIGN.public.key_id)[0] == 1
    assert receiver.replay_floor == receiver.floor_of(NEW_SIGN.public.key_id)  # the current
    # mixed: the old signing key sealing to the new KEM key (the outside moved one key first)
    mixed = _send(_sender(OLD_SIGN, NEW_KEM, epoch=6, seed=3), receiver, b"mixed")
    assert _completed(mixed) == 1


def test_an_old_keys_announcement_replayed_is_refused_by_its_own_floor() -> None:
    receiver = Receiver(ADEQUATE, [NEW_SIGN.public, OLD_SIGN.public], [NEW_KEM, OLD_KEM])
    old = _sender(OLD_SIGN, OLD_KEM, epoch=5, seed=1)
    captured = old.announcement()
    receiver.receive_datagram(captured, START)
    _send(_sender(NEW_SIGN, NEW_KEM, epoch=1, seed=2), receiver, b"new")
    restarted = Receiver(
        ADEQUATE,
        [NEW_SIGN.public, OLD_SIGN.public],
        [NEW_KEM, OLD_KEM],
        replay_floor={
            OLD_SIGN.public.key_id: receiver.floor_of(OLD_SIGN.public.key_id),
            NEW_SIGN.public.key_id: receiver.floor_of(NEW_SIGN.public.key_id),
        },
    )
    with pytest.raises(ReplayRejected):
        restarted.receive_datagram(captured, START + 1)


@pytest.mark.parametrize(
    ("senders", "kems", "match"),
    [
        pytest.param([NEW_SIGN], [NEW_KEM, OLD_KEM], "unknown key", id="old-key-retired"),
        pytest.param([NEW_SIGN, OLD_SIGN], [NEW_KEM], "another inside key", id="old-kem-gone"),
    ],
)
def test_after_the_overlap_the_old_key_is_refused(
    senders: list[SecretKey], kems: list[SecretKey], match: str
) -> None:
    receiver = Receiver(ADEQUATE, [k.public for k in senders], kems)
    with pytest.raises(EnvelopeRejected, match=match):
        _send(_sender(OLD_SIGN, OLD_KEM, epoch=7, seed=4), receiver, b"too late")
    assert receiver.stats.announces == 0


@pytest.mark.parametrize(
    ("senders", "kems"),
    [
        pytest.param([], [NEW_KEM], id="no-sender"),
        pytest.param([NEW_SIGN], [], id="no-kem"),
        pytest.param([NEW_SIGN, NEW_SIGN], [NEW_KEM], id="sender-twice"),
        pytest.param([NEW_SIGN], [NEW_KEM, NEW_KEM], id="kem-twice"),
        pytest.param([NEW_SIGN] * 5, [NEW_KEM], id="too-many"),
    ],
)
def test_a_bad_key_list_is_refused(senders: list[SecretKey], kems: list[SecretKey]) -> None:
    with pytest.raises(ValueError, match="key"):
        Receiver(ADEQUATE, [k.public for k in senders], kems)


def test_a_restarted_inside_rejoins_the_session_the_outside_is_still_sending() -> None:
    """The inside restarts (its replay floor comes back from its ledger) while the outside
    goes on in the same session: the next periodic announcement lets it back in, and what
    was sent meanwhile is kept until then. Older sessions stay refused."""
    sender = _sender(NEW_SIGN, NEW_KEM, epoch=7, seed=4)
    first = Receiver(ADEQUATE, [NEW_SIGN.public, OLD_SIGN.public], [NEW_KEM])
    assert _completed(_send(sender, first, b"before the restart")) == 1
    restarted = Receiver(
        ADEQUATE,
        [NEW_SIGN.public, OLD_SIGN.public],
        [NEW_KEM],
        replay_floor={NEW_SIGN.public.key_id: first.replay_floor},
    )
    oid = random.Random(5).randbytes(16)
    payload = b"sent while the inside restarted"
    sender.submit(OutgoingObject(oid, len(payload), BytesSource(payload)))
    events: list[object] = []
    held = 0
    now = START + 0.5
    while now < START + 4:  # past the next announcement (every second)
        for datagram in sender.datagrams(now, 64):
            try:
                restarted.receive_datagram(datagram, now)
            except EnvelopeRejected:
                held += 1  # a packet of a session not (yet) announced: held
            events += restarted.pop_events()
        now += 0.05
    assert held > 0  # the object went out before the announcement came round again
    assert [e.epoch for e in events if isinstance(e, SessionStarted)] == [7]
    assert [e.object_id for e in events if isinstance(e, ObjectCompleted)] == [oid]
    with pytest.raises(ReplayRejected, match="not newer"):  # an older session of this key
        restarted.receive_datagram(_sender(NEW_SIGN, NEW_KEM, epoch=6, seed=6).announcement(), now)

"""Hypothesis properties of the wire: records round-trip, FEC recovers any loss within the
budget, any bit flip is rejected, nonces never repeat, delivery names never escape.

Every test runs derandomized (a fixed seed per test) and without the example database,
so a run is reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import PurePosixPath
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from ferry.config_types import FecParams, LinkParams
from ferry.crypto import suite
from ferry.crypto.keys import SecretKey
from ferry.errors import WireError
from ferry.wire import records as rec
from ferry.wire import sender as sender_module
from ferry.wire.fec import IsalCodec, ZfecCodec
from ferry.wire.receiver import Receiver, SessionStarted
from ferry.wire.sender import BytesSource, OutgoingObject, Sender
from inside.paths import RESERVED, candidate_names, contained, safe_name

SIGN = SecretKey("ed25519", bytes(range(32)))
KEM = SecretKey("x25519", bytes(range(32, 64)))
LINK = LinkParams(fec=FecParams(codec="zfec", source=4, repair=2, interleave=4), kem="x25519")
NOW = 1_700_000_000.0

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def props(max_examples: int = 100) -> Callable[[Callable[..., None]], Callable[..., None]]:
    return settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --------------------------------------------------------------------- round trips
announces = st.builds(
    rec.SessionAnnounce,
    sender_kid=st.binary(min_size=8, max_size=8),
    recipient_kid=st.binary(min_size=8, max_size=8),
    epoch=u64,
    counter=u32,
    session_id=st.binary(min_size=8, max_size=8),
    sender_time_us=u64,
    kem_id=u8,
    aead_id=u8,
    params_digest=st.binary(min_size=32, max_size=32),
    wrapped_key=st.binary(max_size=rec.MAX_WRAPPED),
)


@props()
@given(announces, st.binary(min_size=64, max_size=64))
def test_announce_round_trip(announce: rec.SessionAnnounce, signature: bytes) -> None:
    datagram = announce.signed_part() + signature
    assert rec.peek_type(datagram) == rec.TYPE_ANNOUNCE
    assert rec.decode_announce(datagram) == (announce, announce.signed_part(), signature)


@props()
@given(st.binary(min_size=8, max_size=8), u64, st.binary(min_size=17, max_size=200))
def test_sealed_header_round_trip(session_id: bytes, pn: int, body: bytes) -> None:
    datagram = rec.sealed_header(session_id, pn) + body
    assert rec.peek_type(datagram) == rec.TYPE_SEALED
    assert rec.decode_sealed_header(datagram) == (session_id, pn)


@st.composite
def symbol_frames(draw: st.DrawFn) -> tuple[rec.ObjectParams, int, int, bytes]:
    k = draw(st.integers(1, 255))
    params = rec.ObjectParams(
        object_id=draw(st.binary(min_size=16, max_size=16)),
        length=draw(u64),
        codec=draw(u8),
        k=k,
        r=draw(st.integers(0, 255 - k)),
        symbol_size=draw(st.integers(1, 0xFFFF)),
    )
    return params, draw(u32), draw(u8), draw(st.binary(max_size=300))


@props()
@given(symbol_frames())
def test_symbol_frame_round_trip(frame: tuple[rec.ObjectParams, int, int, bytes]) -> None:
    params, block, symbol, payload = frame
    encoded = rec.symbol_head(params, block, symbol) + payload
    assert rec.decode_symbol(encoded) == frame


channel_names = st.text(max_size=63)
heartbeats = st.builds(
    rec.Heartbeat,
    sender_time_us=u64,
    epoch=u64,
    session_counter=u64,
    sequence=u64,
    packets_sent=u64,
    bytes_sent=u64,
    objects_sent=u64,
    objects_queued=u64,
    params_digest=st.binary(min_size=32, max_size=32),
    interval_ms=u64,
    last_seq=st.dictionaries(channel_names, u64, max_size=20),
)


@props()
@given(heartbeats)
def test_heartbeat_round_trip(heartbeat: rec.Heartbeat) -> None:
    assert rec.decode_heartbeat(heartbeat.encode()) == heartbeat


manifest_text = st.text(max_size=200)  # at most 800 bytes of UTF-8, under MAX_NAME_BYTES
manifests = st.builds(
    rec.Manifest,
    object_id=st.binary(min_size=16, max_size=16),
    kind=st.just("file"),
    channel=manifest_text,
    seq=u64,
    name=manifest_text,
    media_type=manifest_text,
    size=u64,
    sha256=st.binary(min_size=32, max_size=32),
    created_us=u64,
    mtime_us=u64,
    sender=st.binary(min_size=8, max_size=8),
)


@props()
@given(manifests, st.binary(min_size=64, max_size=64), st.binary(max_size=100))
def test_manifest_and_trailer_round_trip(
    manifest: rec.Manifest, signature: bytes, content: bytes
) -> None:
    body = manifest.encode()
    assert rec.decode_manifest(body) == manifest
    stream = content + rec.encode_trailer(body, signature)
    tlen = rec.trailer_length(stream[-8:])
    assert tlen == len(stream) - len(content)
    assert rec.split_trailer(stream[-tlen:]) == (body, signature)


@props()
@given(st.binary(max_size=rec.MAX_MANIFEST), st.binary(min_size=64, max_size=64))
def test_trailer_round_trip_up_to_the_largest_manifest(body: bytes, signature: bytes) -> None:
    trailer = rec.encode_trailer(body, signature)
    assert rec.split_trailer(trailer) == (body, signature)


# ------------------------------------------------------------------------------ FEC
@st.composite
def loss_patterns(draw: st.DrawFn, max_r: int) -> tuple[int, int, int, bytes, list[int]]:
    """k, r, symbol size, block bytes, and the symbols that survive (at least k of k + r)."""
    k = draw(st.integers(1, 32), label="k")
    r = draw(st.integers(0, max_r), label="r")
    size = draw(st.integers(1, 48), label="symbol_size")
    block = draw(st.binary(min_size=k * size, max_size=k * size), label="block")
    survivors = draw(
        st.lists(st.sampled_from(range(k + r)), unique=True, min_size=k, max_size=k + r),
        label="survivors",
    )
    return k, r, size, block, survivors


def _recovers(codec: ZfecCodec | IsalCodec, case: tuple[int, int, int, bytes, list[int]]) -> None:
    k, r, size, block, survivors = case
    symbols = codec.encode(block, k, r, size)
    assert len(symbols) == k + r
    assert codec.decode({i: symbols[i] for i in survivors}, k, r, size) == block


@props(200)
@given(loss_patterns(max_r=12))
def test_zfec_recovers_any_loss_within_the_budget(
    case: tuple[int, int, int, bytes, list[int]],
) -> None:
    _recovers(ZfecCodec(), case)


@props(200)
@given(loss_patterns(max_r=4))
def test_isal_recovers_any_loss_within_the_budget_up_to_4_repair(
    case: tuple[int, int, int, bytes, list[int]],
) -> None:
    _recovers(IsalCodec(), case)


@props(50)
@example((5, 6, 16, bytes(range(80)), [1, 2, 5, 7, 10]))
@given(loss_patterns(max_r=12))
def test_isal_recovers_any_loss_within_the_budget(
    case: tuple[int, int, int, bytes, list[int]],
) -> None:
    _recovers(IsalCodec(), case)


# ------------------------------------------------------------------------ bit flips
def _transfer() -> tuple[bytes, list[bytes]]:
    """A recorded session: its announcement and sealed datagrams (heartbeat and symbols)."""
    rng = random.Random(7)
    sender = Sender(LINK, SIGN, KEM.public, epoch=3, rng=rng.randbytes, now=NOW)
    data = rng.randbytes(5000)
    sender.submit(OutgoingObject(b"\x42" * 16, len(data), BytesSource(data)))
    out = sender.datagrams(NOW, 1000)
    announce = sender.announcement()
    sealed = [d for d in out if d != announce]
    assert sealed
    return announce, sealed


ANNOUNCE, SEALED = _transfer()


def _fresh_receiver() -> Receiver:
    receiver = Receiver(LINK, SIGN.public, KEM)
    receiver.receive_datagram(ANNOUNCE, NOW)
    assert [type(e) for e in receiver.pop_events()] == [SessionStarted]
    return receiver


def _flip(datagram: bytes, bit: int) -> bytes:
    out = bytearray(datagram)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def test_unflipped_datagrams_are_accepted() -> None:
    receiver = _fresh_receiver()
    for d in SEALED:
        receiver.receive_datagram(d, NOW)
    assert receiver.stats.objects_completed == 1


@props(300)
@given(st.integers(0, len(SEALED) - 1), st.data())
def test_any_bit_flip_in_a_sealed_packet_is_rejected(index: int, data: st.DataObject) -> None:
    datagram = SEALED[index]
    bit = data.draw(st.integers(0, len(datagram) * 8 - 1), label="bit")
    receiver = _fresh_receiver()
    with pytest.raises(WireError):
        receiver.receive_datagram(_flip(datagram, bit), NOW)
    assert receiver.pop_events() == []
    assert receiver.stats.symbols == receiver.stats.heartbeats == 0


@props(200)
@given(st.integers(0, len(ANNOUNCE) * 8 - 1))
def test_any_bit_flip_in_an_announcement_is_rejected(bit: int) -> None:
    receiver = Receiver(LINK, SIGN.public, KEM)
    with pytest.raises(WireError):
        receiver.receive_datagram(_flip(ANNOUNCE, bit), NOW)
    assert receiver.pop_events() == []
    assert receiver.replay_floor == (0, 0)
    # the genuine packets stay undecodable: no session was set up
    with pytest.raises(WireError):
        receiver.receive_datagram(SEALED[0], NOW)
    assert receiver.pop_events() == []


# --------------------------------------------------------------------------- nonces
schedules = st.lists(st.tuples(st.floats(0.0, 0.7), st.integers(1, 40)), min_size=1, max_size=60)


@props(100)
@given(
    seed=st.integers(0, 2**32),
    sizes=st.lists(st.integers(0, 20_000), max_size=8),
    schedule=schedules,
    max_packets=st.integers(40, 300),
)
def test_nonces_never_repeat_across_sessions(
    seed: int, sizes: list[int], schedule: list[tuple[float, int]], max_packets: int
) -> None:
    params = LinkParams(
        fec=FecParams(codec="zfec", source=4, repair=2, interleave=3),
        kem="x25519",
        rekey_interval=0.5,
        heartbeat_interval=0.3,
        announce_interval=0.5,
    )
    rng = random.Random(seed)
    keys: list[bytes] = []

    def logged_rng(n: int) -> bytes:
        out = rng.randbytes(n)
        if n == suite.SESSION_KEY_LEN:
            keys.append(out)
        return out

    now = NOW
    seen: set[tuple[bytes, int]] = set()
    last_pn: dict[bytes, int] = {}
    announced: set[bytes] = set()
    finished: set[bytes] = set()
    current: bytes | None = None
    # the per-session packet budget is 2^32; a small one makes rekeys by count reachable
    with mock.patch.object(sender_module, "MAX_PACKETS_PER_SESSION", max_packets):
        sender = Sender(params, SIGN, KEM.public, epoch=1, rng=logged_rng, now=now)
        for i, size in enumerate(sizes):
            data = rng.randbytes(size)
            sender.submit(OutgoingObject(i.to_bytes(16, "big"), size, BytesSource(data)))
        for dt, limit in schedule:
            now += dt
            for datagram in sender.datagrams(now, limit):
                if rec.peek_type(datagram) == rec.TYPE_ANNOUNCE:
                    announce, _, _ = rec.decode_announce(datagram)
                    announced.add(announce.session_id)
                    continue
                sid, pn = rec.decode_sealed_header(datagram)
                assert sid in announced, "a session's packets follow its announcement"
                assert sid not in finished, "an old session never resumes"
                assert (sid, pn) not in seen
                assert pn > last_pn.get(sid, -1)
                assert pn < max_packets
                if current is not None and sid != current:
                    finished.add(current)
                current = sid
                seen.add((sid, pn))
                last_pn[sid] = pn
    assert len(set(keys)) == len(keys) == sender.session_counter
    # a session replaced before its first datagrams() call is never announced nor used
    assert set(last_pn) <= announced
    assert len(announced) <= sender.session_counter
    event(f"sessions: {min(sender.session_counter, 5)}{'+' if sender.session_counter > 5 else ''}")


# ---------------------------------------------------------------- delivery names
path_like = st.lists(
    st.sampled_from(
        [
            "..",
            ".",
            "/",
            "\\",
            "CON",
            "aux",
            "COM1",
            "\x00",
            "\n",
            "\u202e",
            "\u200b",
            "\ufeff",
            " ",
            "e\u0301",
            "\u00e9",
            "\u6587",
            "\U0001f600",
            "x" * 97,
            ".txt",
            ":",
            "*",
        ]
    ),
    max_size=12,
).map("".join)
untrusted_names = st.text(max_size=300) | path_like | st.text(min_size=190, max_size=260)


@props(500)
@given(untrusted_names)
def test_delivery_names_never_escape_their_folder(untrusted: str) -> None:
    name = safe_name(untrusted)
    assert name
    assert name not in {".", ".."}
    assert "/" not in name
    assert "\x00" not in name
    assert len(name.encode()) <= 255
    assert not any(c in name for c in "\u202e\u202d\u200b\ufeff\\")
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)
    assert name.split(".", 1)[0].upper() not in RESERVED
    root = PurePosixPath("/srv/ferry/inbox/documents")
    assert contained(root, name).parent == root
    for candidate, _ in zip(candidate_names(name), range(3), strict=False):
        assert contained(root, candidate).parent == root
        assert len(candidate.encode()) <= 255

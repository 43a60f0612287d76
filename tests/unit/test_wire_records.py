"""Wire records (version 1): table-driven encode/decode, rejections, golden vectors.

The golden vectors in ``tests/vectors/wire-v1.json`` pin the exact bytes of a
sealed heartbeat, sealed symbol packets, a manifest with its signed trailer and
the 84-byte announce head, all from fixed keys (AES-GCM and Ed25519 are
deterministic; the HPKE part of an announce is not, so only its head is stored).
After a deliberate wire change (which also bumps ``records.VERSION``), rewrite
the file with::

    FERRY_REGEN_VECTORS=1 .venv/bin/pytest tests/unit/test_wire_records.py
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ferry.config_types import FecParams, LinkParams
from ferry.crypto import suite
from ferry.crypto.keys import SecretKey
from ferry.errors import EnvelopeRejected, ReplayRejected, WireError
from ferry.wire import records as rec
from ferry.wire.fec import CODEC_ISAL, CODEC_ZFEC, ZfecCodec
from ferry.wire.receiver import (
    BlockDecoded,
    HeartbeatReceived,
    ObjectCompleted,
    Receiver,
    SessionStarted,
)
from ferry.wire.sender import Sender, build_trailer

VECTORS_PATH = Path(__file__).parents[1] / "vectors" / "wire-v1.json"

# ----------------------------------------------------------------- fixed inputs
SIGN = SecretKey("ed25519", bytes(range(32)))
KEM = SecretKey("x25519", bytes(range(32, 64)))
SESSION_ID = bytes.fromhex("5e5510d15e5510d1")
SESSION_KEY = bytes(range(64, 96))
EPOCH = 7
NOW = 1_700_000_000.25  # exactly representable, so sender_time_us is exact
LINK = LinkParams(
    transport="udp",
    packet_size=1472,
    rate_bps=100_000_000,
    fec=FecParams(codec="zfec", source=4, repair=2, interleave=8),
    kem="x25519",
    heartbeat_interval=1.0,
    announce_interval=1.0,
    rekey_interval=3600.0,
)
HEARTBEAT_PN = 2
SYMBOL_PN0 = 10
VECTOR_OBJECT = bytes((i * 37 + 11) & 0xFF for i in range(50))
VECTOR_PARAMS = rec.ObjectParams(
    object_id=bytes(range(0xA0, 0xB0)), length=50, codec=CODEC_ZFEC, k=4, r=2, symbol_size=16
)
VECTOR_HEARTBEAT = rec.Heartbeat(
    sender_time_us=1_700_000_000_250_000,
    epoch=EPOCH,
    session_counter=1,
    sequence=3,
    packets_sent=1000,
    bytes_sent=1_472_000,
    objects_sent=12,
    objects_queued=2,
    params_digest=bytes(range(100, 132)),
    interval_ms=1000,
    last_seq={"documents": 41, "images": 9},
)
VECTOR_CONTENT = b"ferry golden vector\n"
VECTOR_MANIFEST = rec.Manifest(
    object_id=bytes(range(0xC0, 0xD0)),
    kind="file",
    channel="documents",
    seq=42,
    name="Bericht f\u00fcr Q3 (final).pdf",
    media_type="application/pdf",
    size=len(VECTOR_CONTENT),
    sha256=hashlib.sha256(VECTOR_CONTENT).digest(),
    created_us=1_700_000_000_000_000,
    mtime_us=1_699_999_999_000_000,
    sender=SIGN.public.key_id,
)
VECTOR_MESSAGE = rb'{"id":1,"text":"\u901a\u77e5"}'
VECTOR_MESSAGE_MANIFEST = rec.Manifest(
    object_id=bytes(range(0xD0, 0xE0)),
    kind="message",
    channel="messages",
    seq=7,
    name="notice.json",
    media_type="application/json",
    size=len(VECTOR_MESSAGE),
    sha256=hashlib.sha256(VECTOR_MESSAGE).digest(),
    created_us=1_700_000_000_000_001,
    mtime_us=1_700_000_000_000_001,
    sender=SIGN.public.key_id,
    schema="agency-notice",
    subject="api:portal",
)


def scripted_rng(*chunks: bytes) -> Callable[[int], bytes]:
    """An rng handing out fixed byte strings in order (the sender asks for id, then key)."""
    queue = list(chunks)

    def rng(n: int) -> bytes:
        out = queue.pop(0)
        assert len(out) == n
        return out

    return rng


def vector_sender() -> Sender:
    return Sender(
        LINK, SIGN, KEM.public, epoch=EPOCH, rng=scripted_rng(SESSION_ID, SESSION_KEY), now=NOW
    )


def seal(pn: int, frame: bytes, key: bytes = SESSION_KEY, sid: bytes = SESSION_ID) -> bytes:
    header = rec.sealed_header(sid, pn)
    return header + suite.PacketAead(key).seal(pn, header, frame)


def session_receiver(**kwargs: Any) -> Receiver:
    """A receiver that accepted the vector session's announcement."""
    receiver = Receiver(LINK, SIGN.public, KEM, **kwargs)
    receiver.receive_datagram(vector_sender().announcement(), NOW)
    assert [type(e) for e in receiver.pop_events()] == [SessionStarted]
    return receiver


def _hexed(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _hexed(v) for k, v in value.items()}
    return value


def _fields(record: Any) -> dict[str, object]:
    return {f.name: _hexed(getattr(record, f.name)) for f in dataclasses.fields(record)}


# ---------------------------------------------------------------- vector builder
def announce_fields() -> rec.SessionAnnounce:
    return rec.SessionAnnounce(
        sender_kid=SIGN.public.key_id,
        recipient_kid=KEM.public.key_id,
        epoch=EPOCH,
        counter=1,
        session_id=SESSION_ID,
        sender_time_us=1_700_000_000_250_000,
        kem_id=suite.KEM_X25519,
        aead_id=suite.AEAD_AES256GCM,
        params_digest=LINK.digest(),
        wrapped_key=bytes(suite.WRAPPED_LEN[suite.KEM_X25519]),
    )


def build_vectors() -> dict[str, Any]:
    """Every golden vector, recomputed from the fixed inputs above."""
    announce = announce_fields()
    hb_frame = VECTOR_HEARTBEAT.encode()
    block = VECTOR_OBJECT + bytes(4 * 16 - len(VECTOR_OBJECT))
    symbols = ZfecCodec().encode(block, 4, 2, 16)
    frames = [rec.symbol_head(VECTOR_PARAMS, 0, i) + s for i, s in enumerate(symbols)]
    manifest_bytes = VECTOR_MANIFEST.encode()
    trailer = build_trailer(VECTOR_MANIFEST, SIGN)
    return {
        "description": (
            "ferry wire version 1 golden vectors (hex). Regenerate with "
            "FERRY_REGEN_VECTORS=1 pytest tests/unit/test_wire_records.py"
        ),
        "inputs": {
            "ed25519_secret": SIGN.raw.hex(),
            "ed25519_public": SIGN.public.raw.hex(),
            "ed25519_key_id": SIGN.public.key_id.hex(),
            "x25519_secret": KEM.raw.hex(),
            "x25519_public": KEM.public.raw.hex(),
            "x25519_key_id": KEM.public.key_id.hex(),
            "session_id": SESSION_ID.hex(),
            "session_key": SESSION_KEY.hex(),
        },
        "announce_head": {
            "note": "HPKE output is randomized: only the 84-byte head is fixed",
            "fields": {k: v for k, v in _fields(announce).items() if k != "wrapped_key"},
            "wrapped_len": len(announce.wrapped_key),
            "head": announce.head().hex(),
        },
        "heartbeat_packet": {
            "packet_number": HEARTBEAT_PN,
            "heartbeat": _fields(VECTOR_HEARTBEAT),
            "frame": hb_frame.hex(),
            "datagram": seal(HEARTBEAT_PN, hb_frame).hex(),
        },
        "symbol_packets": {
            "object": VECTOR_OBJECT.hex(),
            "params": _fields(VECTOR_PARAMS),
            "block_index": 0,
            "frames": [f.hex() for f in frames],
            "datagrams": [seal(SYMBOL_PN0 + i, f).hex() for i, f in enumerate(frames)],
            "first_packet_number": SYMBOL_PN0,
        },
        "manifest": {
            "fields": _fields(VECTOR_MANIFEST),
            "content": VECTOR_CONTENT.hex(),
            "manifest": manifest_bytes.hex(),
            "signature": trailer[len(manifest_bytes) : len(manifest_bytes) + 64].hex(),
            "trailer": trailer.hex(),
        },
        "message_manifest": {
            "note": "optional keys schema, path and subject appear only when non-empty",
            "fields": _fields(VECTOR_MESSAGE_MANIFEST),
            "content": VECTOR_MESSAGE.hex(),
            "manifest": VECTOR_MESSAGE_MANIFEST.encode().hex(),
        },
    }


def write_vectors() -> None:
    VECTORS_PATH.write_text(json.dumps(build_vectors(), indent=2, ensure_ascii=False) + "\n")


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    if os.environ.get("FERRY_REGEN_VECTORS") == "1":
        write_vectors()
    loaded: dict[str, Any] = json.loads(VECTORS_PATH.read_text())
    return loaded


# ------------------------------------------------------------------ golden vectors
def test_vectors_file_matches_recomputation(vectors: dict[str, Any]) -> None:
    assert build_vectors() == vectors


def test_vector_keys_are_the_fixed_ones(vectors: dict[str, Any]) -> None:
    inputs = vectors["inputs"]
    assert inputs["ed25519_secret"] == bytes(range(32)).hex()
    assert inputs["ed25519_public"] == SIGN.public.raw.hex()
    assert inputs["ed25519_key_id"] == SIGN.public.key_id.hex()
    assert inputs["x25519_key_id"] == KEM.public.key_id.hex()


def test_vector_announce_head(vectors: dict[str, Any]) -> None:
    head = bytes.fromhex(vectors["announce_head"]["head"])
    fields = vectors["announce_head"]["fields"]
    assert len(head) == rec.ANNOUNCE_HEAD_LEN == 84
    assert head[:4] == b"FY\x01\x01"
    assert head[4:12].hex() == fields["sender_kid"]
    assert head[12:20].hex() == fields["recipient_kid"]
    assert int.from_bytes(head[20:28], "big") == fields["epoch"] == EPOCH
    assert int.from_bytes(head[28:32], "big") == fields["counter"] == 1
    assert head[32:40].hex() == fields["session_id"]
    assert int.from_bytes(head[40:48], "big") == fields["sender_time_us"]
    assert head[48] == fields["kem_id"] == suite.KEM_X25519
    assert head[49] == fields["aead_id"] == suite.AEAD_AES256GCM
    assert head[50:82].hex() == fields["params_digest"]
    assert int.from_bytes(head[82:84], "big") == vectors["announce_head"]["wrapped_len"] == 80


def test_full_announce_built_now_has_the_vector_head_and_decodes(
    vectors: dict[str, Any],
) -> None:
    datagram = vector_sender().announcement()
    head = bytes.fromhex(vectors["announce_head"]["head"])
    assert datagram[: rec.ANNOUNCE_HEAD_LEN] == head
    assert len(datagram) == 84 + 80 + 64
    unverified, signed, signature = rec.decode_announce(datagram)
    expected = vectors["announce_head"]["fields"]
    assert {k: v for k, v in _fields(unverified).items() if k != "wrapped_key"} == expected
    assert signed == datagram[:-64]
    suite.verify(SIGN.public, rec.ANNOUNCE_LABEL, signed, signature)
    key = suite.unwrap_session_key(unverified.wrapped_key, KEM, rec.hpke_info(head))
    assert key == bytes.fromhex(vectors["inputs"]["session_key"])


def test_vector_heartbeat_packet_decodes(vectors: dict[str, Any]) -> None:
    v = vectors["heartbeat_packet"]
    datagram = bytes.fromhex(v["datagram"])
    assert rec.peek_type(datagram) == rec.TYPE_SEALED
    assert rec.decode_sealed_header(datagram) == (SESSION_ID, v["packet_number"])
    frame = suite.PacketAead(SESSION_KEY).open(v["packet_number"], datagram[:20], datagram[20:])
    assert frame.hex() == v["frame"]
    # independently of ferry.crypto: nonce = 4 zero bytes || pn, the 20-byte header is the AAD
    nonce = bytes(4) + v["packet_number"].to_bytes(8, "big")
    assert AESGCM(SESSION_KEY).decrypt(nonce, datagram[20:], datagram[:20]) == frame
    assert frame[0] == rec.FRAME_HEARTBEAT
    assert _fields(rec.decode_heartbeat(frame)) == v["heartbeat"]
    receiver = session_receiver()
    receiver.receive_datagram(datagram, NOW + 1)
    [event] = receiver.pop_events()
    assert isinstance(event, HeartbeatReceived)
    assert event.heartbeat == VECTOR_HEARTBEAT
    assert event.received_at == NOW + 1


def test_vector_symbol_packets_decode_and_rebuild_the_object(vectors: dict[str, Any]) -> None:
    v = vectors["symbol_packets"]
    datagrams = [bytes.fromhex(d) for d in v["datagrams"]]
    assert len(datagrams) == 6
    for i, d in enumerate(datagrams):
        assert len(d) == 20 + 35 + 16 + 16
        frame = suite.PacketAead(SESSION_KEY).open(v["first_packet_number"] + i, d[:20], d[20:])
        assert frame.hex() == v["frames"][i]
        params, block, sym, payload = rec.decode_symbol(frame)
        assert _fields(params) == v["params"]
        assert (block, sym, len(payload)) == (0, i, 16)
    receiver = session_receiver()
    for i in (5, 1, 4, 2):  # two source symbols lost: repair needed
        receiver.receive_datagram(datagrams[i], NOW)
    events = receiver.pop_events()
    assert [type(e) for e in events] == [BlockDecoded, ObjectCompleted]
    assert isinstance(events[0], BlockDecoded)
    assert events[0].data.hex() == v["object"]
    assert receiver.stats.blocks_recovered == 1


def test_vector_manifest_and_trailer_decode(vectors: dict[str, Any]) -> None:
    v = vectors["manifest"]
    trailer = bytes.fromhex(v["trailer"])
    assert rec.trailer_length(trailer[-8:]) == len(trailer)
    manifest_bytes, signature = rec.split_trailer(trailer)
    assert manifest_bytes.hex() == v["manifest"]
    assert signature.hex() == v["signature"]
    suite.verify(SIGN.public, rec.MANIFEST_LABEL, manifest_bytes, signature)
    # independently of ferry.crypto: Ed25519 over "ferry/v1/manifest" || 0x00 || manifest
    raw_key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(vectors["inputs"]["ed25519_public"]))
    raw_key.verify(signature, b"ferry/v1/manifest\x00" + manifest_bytes)
    manifest = rec.decode_manifest(manifest_bytes)
    assert _fields(manifest) == v["fields"]
    assert manifest.sha256 == hashlib.sha256(bytes.fromhex(v["content"])).digest()
    with pytest.raises(EnvelopeRejected):  # the label separates manifest and announce signatures
        suite.verify(SIGN.public, rec.ANNOUNCE_LABEL, manifest_bytes, signature)


# -------------------------------------------------------------------- peek_type
@pytest.mark.parametrize(
    ("datagram", "message"),
    [
        (b"", "too short"),
        (b"FY\x01", "too short"),
        (b"FY\x01\x02" + bytes(rec.MAX_DATAGRAM - 3), "too long"),
        (b"XY\x01\x02" + bytes(40), "bad magic"),
        (b"fy\x01\x02" + bytes(40), "bad magic"),
        (b"FY\x00\x02" + bytes(40), "version"),
        (b"FY\x02\x02" + bytes(40), "version"),
        (b"FY\xff\x01" + bytes(40), "version"),
    ],
)
def test_peek_type_rejects(datagram: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        rec.peek_type(datagram)


@pytest.mark.parametrize("kind", [0x00, 0x03, 0x10, 0x11, 0xFF])
def test_receiver_rejects_unknown_record_types(kind: int) -> None:
    datagram = b"FY\x01" + bytes([kind]) + bytes(60)
    assert rec.peek_type(datagram) == kind
    receiver = Receiver(LINK, SIGN.public, KEM)
    with pytest.raises(WireError, match="unknown record type"):
        receiver.receive_datagram(datagram, NOW)


def test_peek_type_accepts_the_largest_datagram() -> None:
    assert rec.peek_type(b"FY\x01\x02" + bytes(rec.MAX_DATAGRAM - 4)) == rec.TYPE_SEALED


# ------------------------------------------------------------------ sealed header
@pytest.mark.parametrize(
    ("session_id", "pn"),
    [(bytes(8), 0), (SESSION_ID, 1), (b"\xff" * 8, 2**64 - 1), (bytes(range(8)), 2**32)],
)
def test_sealed_header_layout_and_round_trip(session_id: bytes, pn: int) -> None:
    header = rec.sealed_header(session_id, pn)
    assert header == b"FY\x01\x02" + session_id + pn.to_bytes(8, "big")
    assert len(header) == rec.SEALED_HEADER_LEN == 20
    assert rec.decode_sealed_header(header + bytes(17)) == (session_id, pn)


@pytest.mark.parametrize("length", [0, 4, 19, 20, 36])
def test_sealed_header_rejects_truncated(length: int) -> None:
    datagram = (rec.sealed_header(SESSION_ID, 5) + bytes(40))[:length]
    with pytest.raises(WireError, match="too short"):
        rec.decode_sealed_header(datagram)


# --------------------------------------------------------------------- announce
def _announce_datagram(wrapped_len: int, *, extra: bytes = b"") -> bytes:
    announce = rec.SessionAnnounce(**{**vars(announce_fields()), "wrapped_key": bytes(wrapped_len)})
    return announce.signed_part() + bytes(range(64)) + extra


@pytest.mark.parametrize("wrapped_len", [0, 1, 80, 1168, rec.MAX_WRAPPED])
def test_announce_round_trip(wrapped_len: int) -> None:
    wrapped = (bytes(range(256)) * 8)[:wrapped_len]
    announce = rec.SessionAnnounce(**{**vars(announce_fields()), "wrapped_key": wrapped})
    datagram = announce.signed_part() + bytes(range(64))
    assert len(datagram) == 84 + wrapped_len + 64
    decoded, signed, signature = rec.decode_announce(datagram)
    assert decoded == announce
    assert signed == announce.head() + wrapped
    assert signature == bytes(range(64))


def test_announce_rejects_every_truncation() -> None:
    datagram = _announce_datagram(80)
    for cut in range(len(datagram)):
        with pytest.raises(WireError):
            rec.decode_announce(datagram[:cut])


@pytest.mark.parametrize(
    ("datagram", "message"),
    [
        (_announce_datagram(80, extra=b"\x00"), "length mismatch"),
        (_announce_datagram(rec.MAX_WRAPPED + 1), "too long"),
        (_announce_datagram(0xFFFF), "too long"),
        # the length field claims more wrapped key than the datagram holds
        (_announce_datagram(80)[:82] + (81).to_bytes(2, "big") + bytes(144), "length mismatch"),
    ],
)
def test_announce_rejects_bad_lengths(datagram: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        rec.decode_announce(datagram)


@pytest.mark.parametrize("bad_prefix", [b"XY\x01", b"FY\x09"])
def test_decoders_check_their_own_magic_and_version(bad_prefix: bytes) -> None:
    announce = bad_prefix + _announce_datagram(80)[3:]
    sealed = bad_prefix + seal(1, b"\x11")[3:]
    for decode, datagram in ((rec.decode_announce, announce), (rec.decode_sealed_header, sealed)):
        try:
            decode(datagram)
        except WireError:
            continue
        raise AssertionError(f"{decode.__name__} accepted a datagram starting {bad_prefix!r}")


# ---------------------------------------------------------------- symbol frames
@pytest.mark.parametrize(
    ("params", "block", "symbol"),
    [
        (VECTOR_PARAMS, 0, 0),
        (rec.ObjectParams(bytes(16), 0, CODEC_ISAL, 1, 0, 1), 0, 0),
        (rec.ObjectParams(b"\xff" * 16, 2**64 - 1, 0xFF, 200, 55, 0xFFFF), 2**32 - 1, 254),
        (rec.ObjectParams(bytes(range(16)), 10**12, CODEC_ZFEC, 64, 16, 1321), 7, 79),
    ],
)
def test_symbol_frame_round_trip(params: rec.ObjectParams, block: int, symbol: int) -> None:
    payload = bytes(range(params.symbol_size % 251))
    frame = rec.symbol_head(params, block, symbol) + payload
    assert frame[0] == rec.FRAME_SYMBOL
    assert len(frame) == rec.SYMBOL_HEAD_LEN + len(payload)
    assert rec.decode_symbol(frame) == (params, block, symbol, payload)


def _symbol_frame(**changes: int) -> bytes:
    fields = {"length": 50, "codec": CODEC_ZFEC, "k": 4, "r": 2, "symbol_size": 16, **changes}
    params = rec.ObjectParams(object_id=bytes(16), **fields)
    return rec.symbol_head(params, 0, 0) + bytes(16)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"", "too short"),
        (_symbol_frame()[:34], "too short"),
        (_symbol_frame(k=0), "k or symbol size 0"),
        (_symbol_frame(symbol_size=0), "k or symbol size 0"),
        (_symbol_frame(k=200, r=56), "k \\+ r > 255"),
        (_symbol_frame(k=255, r=255), "k \\+ r > 255"),
    ],
)
def test_symbol_frame_rejects(frame: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        rec.decode_symbol(frame)


def test_symbol_frame_accepts_255_symbols_per_block() -> None:
    params, *_ = rec.decode_symbol(_symbol_frame(k=200, r=55))
    assert (params.k, params.r) == (200, 55)


# -------------------------------------------------------------------- heartbeat
HEARTBEATS = [
    VECTOR_HEARTBEAT,
    rec.Heartbeat(0, 0, 0, 0, 0, 0, 0, 0, bytes(32), 0, {}),
    rec.Heartbeat(*([2**64 - 1] * 8), b"\xff" * 32, 2**64 - 1, {"c" * 63: 2**64 - 1}),
    rec.Heartbeat(1, 2, 3, 4, 5, 6, 7, 8, bytes(range(32)), 250, {f"ch{i}": i for i in range(256)}),
    rec.Heartbeat(1, 1, 1, 1, 1, 1, 1, 1, bytes(32), 1000, {"\u00e9\u6587\u4ef6": 1, "": 0}),
]


@pytest.mark.parametrize("heartbeat", HEARTBEATS)
def test_heartbeat_round_trip(heartbeat: rec.Heartbeat) -> None:
    frame = heartbeat.encode()
    assert frame[0] == rec.FRAME_HEARTBEAT
    assert rec.decode_heartbeat(frame) == heartbeat


def test_heartbeat_encoding_is_canonical() -> None:
    a = rec.Heartbeat(1, 1, 1, 1, 1, 1, 1, 1, bytes(32), 1, {"b": 2, "a": 1})
    b = rec.Heartbeat(1, 1, 1, 1, 1, 1, 1, 1, bytes(32), 1, {"a": 1, "b": 2})
    assert a.encode() == b.encode()


def test_heartbeat_rejects_every_truncation() -> None:
    frame = VECTOR_HEARTBEAT.encode()
    for cut in range(1, len(frame)):
        with pytest.raises(WireError):
            rec.decode_heartbeat(frame[:cut])


def _hb_body(**changes: object) -> dict[str, object]:
    body = msgpack.unpackb(VECTOR_HEARTBEAT.encode()[1:], raw=False)
    assert isinstance(body, dict)
    for key, value in changes.items():
        if value is _DELETE:
            del body[key]
        else:
            body[key] = value
    return body


_DELETE = object()


def _hb_frame(body: object) -> bytes:
    return b"\x11" + msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"\x11", "not valid msgpack"),
        (b"\x11\xc1", "not valid msgpack"),
        (_hb_frame(_hb_body()) + b"\x00", "not valid msgpack"),  # trailing bytes
        (_hb_frame([1, 2, 3]), "not valid msgpack"),  # arrays are refused outright
        (_hb_frame(7), "not a map"),
        (_hb_frame("heartbeat"), "not a map"),
        (_hb_frame({1: 2}), "not valid msgpack"),  # strict map keys
        (_hb_frame(_hb_body(t=_DELETE)), "do not match"),
        (_hb_frame(_hb_body(extra=1)), "do not match"),
        (_hb_frame(_hb_body(t="1700000000")), "heartbeat.t"),
        (_hb_frame(_hb_body(hb=-1)), "heartbeat.hb"),
        (_hb_frame(_hb_body(ps=True)), "heartbeat.ps"),
        (_hb_frame(_hb_body(bs=1.5)), "heartbeat.bs"),
        (_hb_frame(_hb_body(iv=None)), "heartbeat.iv"),
        (_hb_frame(_hb_body(pd=bytes(31))), "heartbeat.pd"),
        (_hb_frame(_hb_body(pd="x" * 32)), "heartbeat.pd"),
        (_hb_frame(_hb_body(pd=bytes(65))), "not valid msgpack"),  # bin > 64 bytes
        (_hb_frame(_hb_body(ls=5)), "heartbeat.ls"),
        (_hb_frame(_hb_body(ls={"c" * 64: 1})), "channel name"),
        (_hb_frame(_hb_body(ls={b"raw": 1})), "channel name"),
        (_hb_frame(_hb_body(ls={"docs": -1})), "heartbeat sequence"),
        (_hb_frame(_hb_body(ls={"docs": "1"})), "heartbeat sequence"),
        (_hb_frame(_hb_body(ls={f"c{i}": i for i in range(300)})), "not valid msgpack"),
        (_hb_frame(_hb_body(ls={"c": {"nested": 1}})), "heartbeat sequence"),
        (b"\x11" + bytes(rec.MAX_HEARTBEAT + 1), "too long"),
    ],
)
def test_heartbeat_rejects(frame: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        rec.decode_heartbeat(frame)


# --------------------------------------------------------------------- manifest
MANIFESTS = [
    VECTOR_MANIFEST,
    VECTOR_MESSAGE_MANIFEST,
    rec.Manifest(bytes(16), "file", "", 0, "", "", 0, bytes(32), 0, 0, bytes(8)),
    rec.Manifest(
        b"\xff" * 16,
        "file",
        "c" * 63,
        2**64 - 1,
        "\u6587" * (rec.MAX_NAME_BYTES // 3),  # 1023 bytes of UTF-8
        "x" * rec.MAX_NAME_BYTES,
        2**64 - 1,
        b"\xff" * 32,
        2**64 - 1,
        2**64 - 1,
        b"\xff" * 8,
    ),
]


@pytest.mark.parametrize("manifest", MANIFESTS)
def test_manifest_round_trip(manifest: rec.Manifest) -> None:
    assert rec.decode_manifest(manifest.encode()) == manifest


def test_manifest_rejects_every_truncation() -> None:
    data = VECTOR_MANIFEST.encode()
    for cut in range(len(data)):
        with pytest.raises(WireError):
            rec.decode_manifest(data[:cut])


def _manifest(**changes: object) -> bytes:
    body = msgpack.unpackb(VECTOR_MANIFEST.encode(), raw=False)
    assert isinstance(body, dict)
    for key, value in changes.items():
        if value is _DELETE:
            del body[key]
        else:
            body[key] = value
    out: bytes = msgpack.packb(body, use_bin_type=True)
    return out


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bytes(rec.MAX_MANIFEST + 1), "too long"),
        (_manifest(name="n" * rec.MAX_MANIFEST), "too long"),
        (b"\x93\x01\x02\x03", "not valid msgpack"),
        (msgpack.packb(42), "not a map"),
        (_manifest(v=_DELETE), "do not match"),
        (_manifest(extra="x"), "do not match"),
        (_manifest(schema=""), "manifest.schema"),
        (_manifest(schema=1), "manifest.schema"),
        (_manifest(path="p" * (rec.MAX_PATH_BYTES + 1)), "manifest.path"),
        (_manifest(subject=b"api:x"), "manifest.subject"),
        (_manifest(v=2), "manifest version"),
        (_manifest(v="1"), "manifest version"),
        (_manifest(id=bytes(15)), "manifest.id"),
        (_manifest(id="0" * 16), "manifest.id"),
        (_manifest(sha256=bytes(33)), "manifest.sha256"),
        (_manifest(sender=bytes(9)), "manifest.sender"),
        (_manifest(kind="directory"), "manifest.kind unknown"),
        (_manifest(kind=1), "manifest.kind"),
        (_manifest(name=b"bytes"), "manifest.name"),
        (_manifest(name="n" * (rec.MAX_NAME_BYTES + 1)), "manifest.name"),
        (_manifest(channel=None), "manifest.channel"),
        (_manifest(media_type=["a"]), "not valid msgpack"),
        (_manifest(seq=-1), "manifest.seq"),
        (_manifest(size=True), "manifest.size"),
        (_manifest(created_us=1.0), "manifest.created_us"),
        (_manifest(mtime_us="0"), "manifest.mtime_us"),
        (_manifest(name="\u00ff").replace(b"\xc3\xbf", b"\xff\xfe"), "not valid msgpack"),
    ],
)
def test_manifest_rejects(data: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        rec.decode_manifest(data)


@pytest.mark.parametrize("version", [True, 1.0])
def test_manifest_rejects_non_integer_version(version: object) -> None:
    with pytest.raises(WireError):
        rec.decode_manifest(_manifest(v=version))


# ---------------------------------------------------------------------- trailer
def test_trailer_layout_and_split() -> None:
    manifest_bytes = VECTOR_MANIFEST.encode()
    signature = bytes(range(64))
    trailer = rec.encode_trailer(manifest_bytes, signature)
    assert trailer == manifest_bytes + signature + len(manifest_bytes).to_bytes(4, "big") + b"FYT1"
    assert rec.trailer_length(trailer[-8:]) == len(trailer)
    assert rec.split_trailer(trailer) == (manifest_bytes, signature)
    stream = VECTOR_CONTENT + trailer  # the trailer follows the content in an object stream
    assert rec.trailer_length(stream[-8:]) == len(trailer)


def test_trailer_of_an_empty_manifest() -> None:
    trailer = rec.encode_trailer(b"", bytes(64))
    assert rec.trailer_length(trailer[-8:]) == 72
    assert rec.split_trailer(trailer) == (b"", bytes(64))


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        (b"", "too short"),
        (b"\x00\x00\x00\x10FYT", "too short"),
        (b"\x00\x00\x00\x10FYT1\x00", "too short"),
        (b"\x00\x00\x00\x10FYT2", "magic"),
        (b"\x00\x00\x00\x10fyt1", "magic"),
        ((rec.MAX_MANIFEST + 1).to_bytes(4, "big") + b"FYT1", "too long"),
        (b"\xff\xff\xff\xffFYT1", "too long"),
    ],
)
def test_trailer_length_rejects(tail: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        rec.trailer_length(tail)


def test_trailer_length_accepts_the_largest_manifest() -> None:
    tail = rec.MAX_MANIFEST.to_bytes(4, "big") + b"FYT1"
    assert rec.trailer_length(tail) == rec.MAX_MANIFEST + 64 + 8


@pytest.mark.parametrize("mutate", ["prefix", "cut", "short", "empty"])
def test_split_trailer_rejects_length_mismatch(mutate: str) -> None:
    trailer = build_trailer(VECTOR_MANIFEST, SIGN)
    data = {
        "prefix": b"x" + trailer,
        "cut": trailer[1:],
        "short": trailer[-8:],
        "empty": b"",
    }[mutate]
    with pytest.raises(WireError):
        rec.split_trailer(data)


# --------------------------------------- authenticated but malformed frames (receiver)
@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"\x12" + bytes(40), "unknown frame type"),
        (b"\x00", "unknown frame type"),
        (b"\x10" + bytes(10), "symbol frame too short"),
        (b"\x11\xc1", "heartbeat"),
        (_symbol_frame(codec=9), "unknown FEC codec"),
        (_symbol_frame()[:-1], "payload size mismatch"),
        (_symbol_frame() + b"\x00", "payload size mismatch"),
        (_symbol_frame(length=2**40), "exceeds the configured maximum"),
    ],
)
def test_receiver_rejects_authenticated_malformed_frames(frame: bytes, message: str) -> None:
    receiver = session_receiver(max_object_size=2**30)
    with pytest.raises(WireError, match=message) as caught:
        receiver.receive_datagram(seal(1, frame), NOW)
    assert caught.type is WireError  # authentic, so not an envelope failure
    assert receiver.pop_events() == []


def test_receiver_rejects_symbol_indices_outside_the_object() -> None:
    receiver = session_receiver()
    head = VECTOR_PARAMS
    cases = [
        (rec.symbol_head(head, 1, 0) + bytes(16), "block index beyond"),  # 50 bytes: one block
        (rec.symbol_head(head, 0, 6) + bytes(16), "symbol index beyond"),  # k_b + r_b = 6
        (
            rec.symbol_head(rec.ObjectParams(head.object_id, 51, CODEC_ZFEC, 4, 2, 16), 0, 0)
            + bytes(16),
            "parameters differ",
        ),
    ]
    for pn, (frame, message) in enumerate(cases, start=1):
        with pytest.raises(WireError, match=message):
            receiver.receive_datagram(seal(pn, frame), NOW)
    assert not [e for e in receiver.pop_events() if isinstance(e, BlockDecoded)]


def test_receiver_rejects_a_repeated_packet_number() -> None:
    receiver = session_receiver()
    datagram = seal(3, VECTOR_HEARTBEAT.encode())
    receiver.receive_datagram(datagram, NOW)
    assert len(receiver.pop_events()) == 1
    with pytest.raises(ReplayRejected):
        receiver.receive_datagram(datagram, NOW)
    assert receiver.pop_events() == []


def test_receiver_rejects_a_packet_sealed_under_another_key() -> None:
    receiver = session_receiver()
    with pytest.raises(EnvelopeRejected):
        receiver.receive_datagram(seal(3, VECTOR_HEARTBEAT.encode(), key=bytes(32)), NOW)
    # the forged packet did not advance the window: the genuine one still opens
    receiver.receive_datagram(seal(3, VECTOR_HEARTBEAT.encode()), NOW)
    assert len(receiver.pop_events()) == 1


if __name__ == "__main__":
    write_vectors()

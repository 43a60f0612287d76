"""Message bundles (docs/PROTOCOL.md, "Message bundles"): layout, rejections, the inside's
member checks, the FEC a bundle gets, and the test vector printed in the protocol document.

A bundle is the content of one signed object of kind ``bundle``: count (u16), then per
member manifest_len (u16) content_len (u32) manifest content. Members carry no signature of
their own; the bundle's trailer covers them all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import struct
from pathlib import Path

import msgpack
import pytest

from ferry.config_types import FecParams, LinkParams
from ferry.crypto.keys import SecretKey
from ferry.errors import WireError
from ferry.wire import records as rec
from ferry.wire.fec import block_count
from ferry.wire.receiver import BlockDecoded, ObjectCompleted, Receiver
from ferry.wire.sender import BytesSource, OutgoingObject, Sender, build_trailer, symbol_size_for
from inside.agent import MEMORY_OBJECT_MAX
from inside.deliver import open_bundle, verify_stream
from outside.agent import BUNDLE_MAX, BUNDLE_MAX_MEMBERS, BUNDLE_ONE_BLOCK, bundle_fec

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"

# The fixed keys of the golden vectors (tests/unit/test_wire_records.py).
SIGN = SecretKey("ed25519", bytes(range(32)))
OTHER_SIGN = SecretKey("ed25519", bytes(range(1, 33)))
KEM = SecretKey("x25519", bytes(range(32, 64)))

# ------------------------------------------------------------- the documented test vector
VECTOR_CONTENT_1 = '{"id":1,"text":"通知"}'.encode()
VECTOR_CONTENT_2 = b'{"id":2,"text":"ok"}'


def _vector_member(oid: bytes, seq: int, name: str, content: bytes, t: int) -> rec.Manifest:
    return rec.Manifest(
        object_id=oid,
        kind="message",
        channel="messages",
        seq=seq,
        name=name,
        media_type="application/json",
        size=len(content),
        sha256=hashlib.sha256(content).digest(),
        created_us=t,
        mtime_us=t,
        sender=SIGN.public.key_id,
        schema="agency-notice",
        subject="api:portal",
    )


VECTOR_MEMBER_1 = _vector_member(
    bytes(range(0xD0, 0xE0)), 7, "notice-7.json", VECTOR_CONTENT_1, 1_700_000_000_000_001
)
VECTOR_MEMBER_2 = _vector_member(
    bytes(range(0xE0, 0xF0)), 8, "notice-8.json", VECTOR_CONTENT_2, 1_700_000_000_000_002
)


def vector_bundle_content() -> bytes:
    return rec.encode_bundle(
        [
            rec.encode_member(VECTOR_MEMBER_1, VECTOR_CONTENT_1),
            rec.encode_member(VECTOR_MEMBER_2, VECTOR_CONTENT_2),
        ]
    )


def vector_bundle_manifest(content: bytes) -> rec.Manifest:
    return rec.Manifest(
        object_id=bytes(range(0xF0, 0x100)),
        kind="bundle",
        channel="messages",
        seq=0,
        name="bundle-1",
        media_type=rec.BUNDLE_MEDIA_TYPE,
        size=len(content),
        sha256=hashlib.sha256(content).digest(),
        created_us=1_700_000_000_000_003,
        mtime_us=1_700_000_000_000_003,
        sender=SIGN.public.key_id,
        subject="component:sender",
    )


# ------------------------------------------------------------------------------ helpers
def message(
    content: bytes = b'{"a":1}', *, seq: int = 1, channel: str = "messages", **change: object
) -> tuple[rec.Manifest, bytes]:
    """A message manifest for ``content`` (fresh object id), with fields overridden."""
    manifest = rec.Manifest(
        object_id=os.urandom(16),
        kind="message",
        channel=channel,
        seq=seq,
        name=f"m-{seq}.json",
        media_type="application/json",
        size=len(content),
        sha256=hashlib.sha256(content).digest(),
        created_us=1_700_000_000_000_000 + seq,
        mtime_us=1_700_000_000_000_000 + seq,
        sender=SIGN.public.key_id,
        schema="agency-notice",
        subject="api:portal",
    )
    return dataclasses.replace(manifest, **change), content  # type: ignore[arg-type]


def raw_member(manifest_bytes: bytes, content: bytes) -> bytes:
    """A member record with arbitrary manifest bytes (encode_member only takes a Manifest)."""
    return rec.BUNDLE_MEMBER.pack(len(manifest_bytes), len(content)) + manifest_bytes + content


def bundle_manifest(content: bytes, channel: str = "messages") -> rec.Manifest:
    return rec.Manifest(
        object_id=os.urandom(16),
        kind="bundle",
        channel=channel,
        seq=0,
        name="bundle-1",
        media_type=rec.BUNDLE_MEDIA_TYPE,
        size=len(content),
        sha256=hashlib.sha256(content).digest(),
        created_us=1,
        mtime_us=1,
        sender=SIGN.public.key_id,
        subject="component:sender",
    )


def three_messages() -> list[tuple[rec.Manifest, bytes]]:
    return [message(b'{"n":%d}' % i, seq=i) for i in range(1, 4)]


# --------------------------------------------------------------------------- round trip
def test_round_trip_keeps_order_manifests_and_contents() -> None:
    members = [
        message(b"{}", seq=1),
        message('{"text":"通知"}'.encode(), seq=2),
        message(b"", seq=3),  # an empty member is a valid layout (the inside's schema refuses it)
        message(b"x" * 70_000, seq=4),  # over 64 KiB: content_len is a u32
    ]
    data = rec.encode_bundle([rec.encode_member(m, c) for m, c in members])
    assert data[:2] == struct.pack(">H", 4)
    assert rec.decode_bundle(data) == members


def test_member_record_layout() -> None:
    manifest, content = message(b'{"k":"v"}')
    record = rec.encode_member(manifest, content)
    body = manifest.encode()
    assert record == struct.pack(">HI", len(body), len(content)) + body + content
    assert rec.BUNDLE_COUNT.size == 2
    assert rec.BUNDLE_MEMBER.size == 6
    assert rec.encode_bundle([record]) == b"\x00\x01" + record


def test_bundle_kind_is_a_known_manifest_kind() -> None:
    content = rec.encode_bundle([rec.encode_member(*message())])
    manifest = bundle_manifest(content)
    assert "bundle" in rec.KINDS
    assert rec.decode_manifest(manifest.encode()) == manifest


def test_encode_bundle_bounds_the_member_count() -> None:
    record = rec.encode_member(*message())
    with pytest.raises(WireError, match="1 to 4096 members"):
        rec.encode_bundle([])
    with pytest.raises(WireError, match="1 to 4096 members"):
        rec.encode_bundle([record] * (rec.MAX_BUNDLE_MEMBERS + 1))
    full = rec.encode_bundle([record] * rec.MAX_BUNDLE_MEMBERS)
    assert len(rec.decode_bundle(full)) == rec.MAX_BUNDLE_MEMBERS


def test_encode_member_refuses_a_manifest_over_the_limit() -> None:
    manifest, content = message(report="r" * (rec.MAX_MANIFEST + 1))
    with pytest.raises(WireError, match="manifest too long"):
        rec.encode_member(manifest, content)


# ------------------------------------------------------------------- decode rejections
def _valid() -> bytes:
    return rec.encode_bundle([rec.encode_member(m, c) for m, c in three_messages()])


def _kind_member(kind: str) -> bytes:
    manifest, content = message(kind=kind)
    return rec.encode_bundle([rec.encode_member(manifest, content)])


def _size_mismatch() -> bytes:
    manifest, content = message(b'{"a":1}')
    bigger = dataclasses.replace(manifest, size=len(content) + 1)
    return rec.encode_bundle([rec.encode_member(bigger, content)])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"", "bundle too short", id="empty"),
        pytest.param(b"\x00", "bundle too short", id="one-byte"),
        pytest.param(b"\x00\x00", "member count 0 out of range", id="count-0"),
        pytest.param(
            struct.pack(">H", rec.MAX_BUNDLE_MEMBERS + 1) + _valid()[2:],
            "member count 4097 out of range",
            id="count-over-max",
        ),
        pytest.param(b"\x00\x01\x00\x10\x00", "bundle member 0 truncated", id="short-header"),
        pytest.param(
            b"\x00\x02" + rec.encode_member(*message()),
            "bundle member 1 truncated",
            id="missing-member",
        ),
        pytest.param(
            b"\x00\x01" + rec.encode_member(*message())[:-1],
            "bundle member 0 longer than the bundle",
            id="content-cut",
        ),
        pytest.param(
            b"\x00\x01" + struct.pack(">HI", 100, 0xFFFFFFFF) + bytes(100),
            "bundle member 0 longer than the bundle",
            id="huge-content-len",
        ),
        pytest.param(
            b"\x00\x01" + struct.pack(">HI", rec.MAX_MANIFEST + 1, 0) + bytes(rec.MAX_MANIFEST + 1),
            "bundle member 0 longer than the bundle",
            id="manifest-over-limit",
        ),
        pytest.param(_valid() + b"\x00", "bytes left over", id="left-over"),
        pytest.param(_kind_member("file"), "member 0 is a file, not a message", id="file"),
        pytest.param(_kind_member("bundle"), "member 0 is a bundle, not a message", id="nested"),
        pytest.param(_kind_member("audit"), "not a message", id="audit"),
        pytest.param(_size_mismatch(), "member 0 size differs from its manifest", id="size"),
        pytest.param(
            b"\x00\x01" + raw_member(b"\xc1\xc1\xc1", b"{}"),
            "manifest is not valid msgpack",
            id="garbage-manifest",
        ),
        pytest.param(
            b"\x00\x01" + raw_member(b"", b"{}"), "manifest is not valid msgpack", id="no-manifest"
        ),
        pytest.param(
            b"\x00\x01" + raw_member(msgpack.packb([1, 2]), b"{}"),
            "manifest is not valid msgpack",  # arrays are refused by the bounded unpacker
            id="array-manifest",
        ),
        pytest.param(
            b"\x00\x01" + raw_member(msgpack.packb({"v": 1}), b"{}"),
            "manifest fields do not match version 1",
            id="incomplete-manifest",
        ),
    ],
)
def test_decode_bundle_rejects(data: bytes, reason: str) -> None:
    with pytest.raises(WireError, match=re.escape(reason)):
        rec.decode_bundle(data)


def test_a_bad_member_after_good_ones_refuses_the_whole_bundle() -> None:
    good = [rec.encode_member(m, c) for m, c in three_messages()]
    bad_manifest, bad_content = message(kind="file")
    data = rec.encode_bundle([*good, rec.encode_member(bad_manifest, bad_content)])
    with pytest.raises(WireError, match="bundle member 3 is a file"):
        rec.decode_bundle(data)


def test_decode_bundle_raises_only_wire_error_on_every_truncation_and_bit_flip() -> None:
    data = _valid()
    for cut in range(len(data)):
        with pytest.raises(WireError):
            rec.decode_bundle(data[:cut])
    for i in range(0, len(data), 7):  # a flipped bit is refused or decodes to some layout
        flipped = bytearray(data)
        flipped[i] ^= 0x40
        with contextlib.suppress(WireError):  # any other exception fails the test
            rec.decode_bundle(bytes(flipped))


# --------------------------------------------------------------- the inside's checks
def test_open_bundle_returns_the_members_of_a_good_bundle() -> None:
    members = three_messages()
    content = rec.encode_bundle([rec.encode_member(m, c) for m, c in members])
    assert open_bundle(bundle_manifest(content), content, SIGN.public) == members


def _open(members: list[tuple[rec.Manifest, bytes]], manifest: rec.Manifest | None = None) -> None:
    content = rec.encode_bundle([rec.encode_member(m, c) for m, c in members])
    open_bundle(manifest or bundle_manifest(content), content, SIGN.public)


def test_open_bundle_refuses_a_member_of_another_sender_key() -> None:
    members = three_messages()
    members[1] = message(sender=OTHER_SIGN.public.key_id)
    with pytest.raises(WireError, match="another sender key"):
        _open(members)


def test_open_bundle_refuses_a_member_of_another_channel() -> None:
    members = three_messages()
    members[2] = message(channel="documents")
    with pytest.raises(WireError, match="another channel than its bundle"):
        _open(members)


def test_open_bundle_refuses_a_bundle_of_another_channel_than_its_members() -> None:
    members = three_messages()
    content = rec.encode_bundle([rec.encode_member(m, c) for m, c in members])
    with pytest.raises(WireError, match="another channel than its bundle"):
        open_bundle(bundle_manifest(content, channel="other"), content, SIGN.public)


def test_open_bundle_refuses_an_object_id_twice() -> None:
    members = three_messages()
    members[2] = (dataclasses.replace(members[2][0], object_id=members[0][0].object_id), b'{"n":3}')
    with pytest.raises(WireError, match="appears twice"):
        _open(members)


def test_open_bundle_refuses_a_member_with_the_bundle_id() -> None:
    members = three_messages()
    content = rec.encode_bundle([rec.encode_member(m, c) for m, c in members])
    manifest = dataclasses.replace(bundle_manifest(content), object_id=members[1][0].object_id)
    with pytest.raises(WireError, match="appears twice"):
        open_bundle(manifest, content, SIGN.public)


def test_open_bundle_refuses_a_wrong_member_sha256() -> None:
    members = three_messages()
    m, c = members[1]
    members[1] = (m, c.replace(b"2", b"9"))  # same length, other bytes: the hash differs
    with pytest.raises(WireError, match="SHA-256 differs"):
        _open(members)


def test_open_bundle_raises_for_a_bad_layout_too() -> None:
    with pytest.raises(WireError, match="left over"):
        open_bundle(bundle_manifest(b""), _valid() + b"!", SIGN.public)


def test_a_signed_bundle_verifies_and_opens_and_a_changed_member_breaks_the_signature() -> None:
    members = three_messages()
    content = rec.encode_bundle([rec.encode_member(m, c) for m, c in members])
    manifest = bundle_manifest(content)
    stream = content + build_trailer(manifest, SIGN)
    got, body = verify_stream(stream, manifest.object_id, SIGN.public)
    assert (got, body) == (manifest, content)
    assert open_bundle(got, body, SIGN.public) == members
    # a member changed on the way (even with a matching member hash) breaks the bundle hash
    tampered_content = b'{"n":7}'
    tampered = dataclasses.replace(members[0][0], sha256=hashlib.sha256(tampered_content).digest())
    forged = rec.encode_bundle(
        [rec.encode_member(tampered, tampered_content)]
        + [rec.encode_member(m, c) for m, c in members[1:]]
    )
    assert len(forged) == len(content)
    with pytest.raises(WireError, match="SHA-256 differs from the signed manifest"):
        verify_stream(forged + stream[len(content) :], manifest.object_id, SIGN.public)
    with pytest.raises(WireError):  # signed by another key
        verify_stream(
            content + build_trailer(manifest, OTHER_SIGN), manifest.object_id, SIGN.public
        )


# --------------------------------------------------------------------------------- FEC
def test_bundle_fec_is_one_block_with_half_repair_up_to_the_limit() -> None:
    assert bundle_fec(0) == (1, 2)
    assert bundle_fec(1) == (1, 2)
    assert bundle_fec(2) == (2, 2)
    assert bundle_fec(3) == (3, 2)
    assert bundle_fec(4) == (4, 2)
    assert bundle_fec(5) == (5, 3)
    assert bundle_fec(37) == (37, 19)
    for symbols in range(1, BUNDLE_ONE_BLOCK + 1):
        fec = bundle_fec(symbols)
        assert fec is not None
        k, r = fec
        assert k == symbols
        assert r == max(2, -(-symbols // 2))
        assert k + r <= 255
    assert bundle_fec(BUNDLE_ONE_BLOCK) == (160, 80)
    assert bundle_fec(BUNDLE_ONE_BLOCK + 1) is None
    assert bundle_fec(10_000) is None


def _link(codec: str, packet_size: int) -> LinkParams:
    return LinkParams(
        packet_size=packet_size,
        fec=FecParams(codec=codec),  # type: ignore[arg-type]
        kem="x25519",
    )


def _largest_bundle_stream() -> bytes:
    """A bundle of exactly BUNDLE_MAX content bytes, with its signed trailer."""
    manifest, _ = message(size=BUNDLE_MAX)  # the size field as wide as the final one
    overhead = rec.BUNDLE_COUNT.size + len(rec.encode_member(manifest, b""))
    content = b"x" * (BUNDLE_MAX - overhead)
    member = dataclasses.replace(
        manifest, size=len(content), sha256=hashlib.sha256(content).digest()
    )
    data = rec.encode_bundle([rec.encode_member(member, content)])
    assert len(data) == BUNDLE_MAX
    return data + build_trailer(bundle_manifest(data), SIGN)


@pytest.mark.parametrize("codec", ["isal", "zfec"])
@pytest.mark.parametrize("packet_size", [1280, 1472, 9000, 65_000])
def test_a_full_bundle_is_one_fec_block_held_in_memory_inside(codec: str, packet_size: int) -> None:
    stream = _largest_bundle_stream()
    size = symbol_size_for(_link(codec, packet_size))
    symbols = -(-len(stream) // size)
    assert symbols <= BUNDLE_ONE_BLOCK
    fec = bundle_fec(symbols)
    assert fec is not None
    assert block_count(len(stream), fec[0], size) == 1
    assert len(stream) <= MEMORY_OBJECT_MAX
    assert BUNDLE_MAX_MEMBERS <= rec.MAX_BUNDLE_MEMBERS


def test_a_full_bundle_on_the_default_link_is_38_plus_19_symbols() -> None:
    """The figure docs/PROTOCOL.md gives (packet_size 1472, ISA-L: S = 1321)."""
    size = symbol_size_for(_link("isal", 1472))
    assert size == 1321
    assert bundle_fec(-(-len(_largest_bundle_stream()) // size)) == (38, 19)


def test_the_largest_one_block_bundle_stays_in_memory_on_a_standard_link() -> None:
    """Any bundle that gets the one-block FEC on a 1472-byte link is held in memory inside."""
    for codec in ("isal", "zfec"):
        assert BUNDLE_ONE_BLOCK * symbol_size_for(_link(codec, 1472)) <= MEMORY_OBJECT_MAX


def test_a_bundle_crosses_the_sender_and_receiver_as_one_block_with_losses() -> None:
    """Sender and receiver machines: the bundle's FEC survives losing ~1/3 of its symbols
    and is decoded as one block at offset 0 (what the inside keeps in memory)."""
    link = _link("zfec", 1472)
    members = three_messages()
    content = rec.encode_bundle([rec.encode_member(m, c) for m, c in members])
    manifest = bundle_manifest(content)
    stream = content + build_trailer(manifest, SIGN)
    fec = bundle_fec(-(-len(stream) // symbol_size_for(link)))
    assert fec == (1, 2)
    sender = Sender(link, SIGN, KEM.public, epoch=1, rng=os.urandom, now=1000.0)
    sender.submit(
        OutgoingObject(
            manifest.object_id, len(stream), BytesSource(stream), "messages", 3, 0, fec=fec
        )
    )
    datagrams = sender.datagrams(1000.0, 100)
    receiver = Receiver(link, SIGN.public, KEM)
    receiver.receive_datagram(datagrams[0], 1000.0)  # the announcement
    receiver.receive_datagram(datagrams[1], 1000.0)  # the first heartbeat
    symbols = datagrams[2:]
    assert len(symbols) == 3
    receiver.pop_events()
    receiver.receive_datagram(symbols[2], 1000.0)  # two of three symbols lost
    events = receiver.pop_events()
    decoded = [e for e in events if isinstance(e, BlockDecoded)]
    assert [type(e) for e in events if isinstance(e, BlockDecoded | ObjectCompleted)] == [
        BlockDecoded,
        ObjectCompleted,
    ]
    assert decoded[0].offset == 0
    assert decoded[0].data == stream
    got, body = verify_stream(decoded[0].data, manifest.object_id, SIGN.public)
    assert open_bundle(got, body, SIGN.public) == members


def test_a_big_message_gets_the_links_fec() -> None:
    size = symbol_size_for(_link("isal", 1472))
    assert bundle_fec(-(-400_000 // size)) is None
    assert bundle_fec(-(-BUNDLE_ONE_BLOCK * size // size)) is not None


# ------------------------------------------------------------------ the documented vector
def _doc_vectors() -> dict[str, bytes]:
    """The hex blocks of the "Message bundles" section of docs/PROTOCOL.md, by label."""
    text = PROTOCOL.read_text()
    heading = re.search(r"^## [0-9a-z.]* ?Message bundles$", text, re.MULTILINE)
    assert heading is not None, "docs/PROTOCOL.md has no section 'Message bundles'"
    end = text.find("\n## ", heading.end())
    section = text[heading.start() : end if end >= 0 else len(text)]
    out: dict[str, bytes] = {}
    for label, length, body in re.findall(
        r"```\n# ([^\n]+?) \((\d+) bytes\)\n([0-9a-f\n]+)```", section
    ):
        data = bytes.fromhex(body.replace("\n", ""))
        assert len(data) == int(length), label
        out[label] = data
    return out


def test_protocol_doc_vector_is_what_encode_bundle_produces() -> None:
    vectors = _doc_vectors()
    assert set(vectors) == {
        "member 1 record",
        "member 2 record",
        "bundle content",
        "bundle signature",
    }
    record_1 = rec.encode_member(VECTOR_MEMBER_1, VECTOR_CONTENT_1)
    record_2 = rec.encode_member(VECTOR_MEMBER_2, VECTOR_CONTENT_2)
    assert vectors["member 1 record"] == record_1
    assert vectors["member 2 record"] == record_2
    content = vector_bundle_content()
    assert vectors["bundle content"] == content == b"\x00\x02" + record_1 + record_2
    manifest = vector_bundle_manifest(content)
    trailer = build_trailer(manifest, SIGN)  # Ed25519 is deterministic
    body = manifest.encode()
    assert vectors["bundle signature"] == trailer[len(body) : len(body) + rec.SIGNATURE_LEN]


def test_protocol_doc_vector_decodes_verifies_and_opens() -> None:
    content = _doc_vectors()["bundle content"]
    manifest = vector_bundle_manifest(content)
    text = PROTOCOL.read_text()
    assert f"`{hashlib.sha256(content).hexdigest()}`" in text  # the documented sha256
    assert f"`{SIGN.public.key_id.hex()}`" in text  # the documented sender key id
    stream = content + build_trailer(manifest, SIGN)
    got, body = verify_stream(stream, manifest.object_id, SIGN.public)
    assert open_bundle(got, body, SIGN.public) == [
        (VECTOR_MEMBER_1, VECTOR_CONTENT_1),
        (VECTOR_MEMBER_2, VECTOR_CONTENT_2),
    ]

"""Byte layouts of every wire record (version 1). docs/PROTOCOL.md mirrors this file.

All integers are big-endian. Records read from the link are parsed by the
``decode_*`` functions, which bound every length before using it and raise
only :class:`ferry.errors.WireError`. Names of values that have not been
authenticated yet carry ``unverified``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from ferry.errors import WireError

MAGIC = b"FY"
VERSION = 1
TYPE_ANNOUNCE = 0x01
TYPE_SEALED = 0x02

FRAME_SYMBOL = 0x10
FRAME_HEARTBEAT = 0x11

# The largest datagram ferry handles: the largest UDP payload over IPv4.
MAX_DATAGRAM = 65_507
# A manifest is a small msgpack map; 16 KiB leaves room for long UTF-8 names.
MAX_MANIFEST = 16_384
# Heartbeats carry counters and per-channel sequence numbers; 8 KiB is ample.
MAX_HEARTBEAT = 8_192
# Channel names are at most 63 bytes (config schema); strings in records are bounded too.
MAX_NAME_BYTES = 1_024
MAX_CHANNELS_IN_HEARTBEAT = 256

# ---------------------------------------------------------------- packet header
# magic(2) version(1) type(1) session_id(8) packet_number(8)
SEALED_HEADER = struct.Struct(">2sBB8sQ")
SEALED_HEADER_LEN = SEALED_HEADER.size  # 20
MIN_SEALED_LEN = SEALED_HEADER_LEN + 1 + 16


def sealed_header(session_id: bytes, packet_number: int) -> bytes:
    return SEALED_HEADER.pack(MAGIC, VERSION, TYPE_SEALED, session_id, packet_number)


def peek_type(datagram: bytes) -> int:
    """Check magic and version and return the record type of a datagram."""
    if len(datagram) < 4:
        raise WireError("datagram too short")
    if len(datagram) > MAX_DATAGRAM:
        raise WireError("datagram too long")
    if datagram[:2] != MAGIC:
        raise WireError("bad magic")
    if datagram[2] != VERSION:
        raise WireError(f"unsupported wire version {datagram[2]}")
    return datagram[3]


def decode_sealed_header(datagram: bytes) -> tuple[bytes, int]:
    """Return ``(session_id, packet_number)`` of a sealed packet (not yet authenticated)."""
    if len(datagram) < MIN_SEALED_LEN:
        raise WireError("sealed packet too short")
    if peek_type(datagram) != TYPE_SEALED:
        raise WireError("not a sealed packet")
    _, _, _, session_id, pn = SEALED_HEADER.unpack_from(datagram)
    return session_id, pn


# ------------------------------------------------------------ session announce
# magic(2) version(1) type(1) sender_kid(8) recipient_kid(8) epoch(u64) counter(u32)
# session_id(8) sender_time_us(u64) kem(u8) aead(u8) params_digest(32) wrapped_len(u16)
ANNOUNCE_HEAD = struct.Struct(">2sBB8s8sQI8sQBB32sH")
ANNOUNCE_HEAD_LEN = ANNOUNCE_HEAD.size  # 84
SIGNATURE_LEN = 64
# The largest HPKE blob of a known KEM is 1168 bytes (ML-KEM-768+X25519).
MAX_WRAPPED = 2_048
ANNOUNCE_LABEL = b"ferry/v1/announce"
SESSION_KEY_INFO = b"ferry/v1/session-key"


@dataclass(frozen=True)
class SessionAnnounce:
    sender_kid: bytes
    recipient_kid: bytes
    epoch: int
    counter: int
    session_id: bytes
    sender_time_us: int
    kem_id: int
    aead_id: int
    params_digest: bytes
    wrapped_key: bytes

    def head(self) -> bytes:
        """The 84-byte header; also the HPKE ``info`` suffix."""
        return ANNOUNCE_HEAD.pack(
            MAGIC,
            VERSION,
            TYPE_ANNOUNCE,
            self.sender_kid,
            self.recipient_kid,
            self.epoch,
            self.counter,
            self.session_id,
            self.sender_time_us,
            self.kem_id,
            self.aead_id,
            self.params_digest,
            len(self.wrapped_key),
        )

    def signed_part(self) -> bytes:
        return self.head() + self.wrapped_key


def hpke_info(head: bytes) -> bytes:
    """The HPKE ``info`` binding a wrapped session key to its announcement header."""
    return SESSION_KEY_INFO + b"\x00" + head


def decode_announce(datagram: bytes) -> tuple[SessionAnnounce, bytes, bytes]:
    """Parse an announce; return ``(unverified announce, signed part, signature)``."""
    if len(datagram) < ANNOUNCE_HEAD_LEN + SIGNATURE_LEN:
        raise WireError("announce too short")
    if peek_type(datagram) != TYPE_ANNOUNCE:
        raise WireError("not an announce")
    fields = ANNOUNCE_HEAD.unpack_from(datagram)
    wrapped_len = fields[12]
    if wrapped_len > MAX_WRAPPED:
        raise WireError("announce wrapped key too long")
    if len(datagram) != ANNOUNCE_HEAD_LEN + wrapped_len + SIGNATURE_LEN:
        raise WireError("announce length mismatch")
    end = ANNOUNCE_HEAD_LEN + wrapped_len
    unverified = SessionAnnounce(
        sender_kid=fields[3],
        recipient_kid=fields[4],
        epoch=fields[5],
        counter=fields[6],
        session_id=fields[7],
        sender_time_us=fields[8],
        kem_id=fields[9],
        aead_id=fields[10],
        params_digest=fields[11],
        wrapped_key=datagram[ANNOUNCE_HEAD_LEN:end],
    )
    return unverified, datagram[:end], datagram[end:]


# ---------------------------------------------------------------- symbol frame
# type(1) object_id(16) object_length(u64) codec(u8) k(u8) r(u8) symbol_size(u16)
# block_index(u32) symbol_index(u8)
SYMBOL_HEAD = struct.Struct(">B16sQBBBHIB")
SYMBOL_HEAD_LEN = SYMBOL_HEAD.size  # 35


@dataclass(frozen=True, slots=True)
class ObjectParams:
    """What every symbol of an object repeats, so any one symbol sets up reassembly."""

    object_id: bytes
    length: int
    codec: int
    k: int
    r: int
    symbol_size: int


def symbol_head(p: ObjectParams, block_index: int, symbol_index: int) -> bytes:
    return SYMBOL_HEAD.pack(
        FRAME_SYMBOL,
        p.object_id,
        p.length,
        p.codec,
        p.k,
        p.r,
        p.symbol_size,
        block_index,
        symbol_index,
    )


def decode_symbol(frame: bytes) -> tuple[ObjectParams, int, int, bytes]:
    """Parse a symbol frame: ``(params, block_index, symbol_index, payload)``."""
    if len(frame) < SYMBOL_HEAD_LEN:
        raise WireError("symbol frame too short")
    _, oid, length, codec, k, r, size, block, sym = SYMBOL_HEAD.unpack_from(frame)
    if k == 0 or size == 0:
        raise WireError("symbol frame with k or symbol size 0")
    if k + r > 255:
        raise WireError("symbol frame with k + r > 255")
    return ObjectParams(oid, length, codec, k, r, size), block, sym, frame[SYMBOL_HEAD_LEN:]


# ------------------------------------------------------------ heartbeat frame
@dataclass(frozen=True)
class Heartbeat:
    """Sender status, sent every ``heartbeat_interval`` inside the sealed session."""

    sender_time_us: int
    epoch: int
    session_counter: int
    sequence: int
    """Heartbeat number within the epoch (gaps mean lost heartbeats)."""
    packets_sent: int
    bytes_sent: int
    objects_sent: int
    objects_queued: int
    params_digest: bytes
    interval_ms: int
    last_seq: dict[str, int]
    """Last per-channel sequence number sent, per channel."""

    def encode(self) -> bytes:
        body = {
            "t": self.sender_time_us,
            "ep": self.epoch,
            "sc": self.session_counter,
            "hb": self.sequence,
            "ps": self.packets_sent,
            "bs": self.bytes_sent,
            "os": self.objects_sent,
            "oq": self.objects_queued,
            "pd": self.params_digest,
            "iv": self.interval_ms,
            "ls": dict(sorted(self.last_seq.items())),
        }
        return bytes([FRAME_HEARTBEAT]) + msgpack.packb(body, use_bin_type=True)


_HB_INTS = ("t", "ep", "sc", "hb", "ps", "bs", "os", "oq", "iv")


def _unpack_map(data: bytes, max_len: int, what: str) -> dict[str, Any]:
    if len(data) > max_len:
        raise WireError(f"{what} too long")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_NAME_BYTES * 4,
            max_bin_len=64,
            max_array_len=0,
            max_map_len=MAX_CHANNELS_IN_HEARTBEAT + 16,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many unrelated types on garbage
        raise WireError(f"{what} is not valid msgpack") from exc
    if not isinstance(obj, dict):
        raise WireError(f"{what} is not a map")
    return obj


def _uint(value: object, what: str, bits: int = 64) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        raise WireError(f"{what} must be an unsigned {bits}-bit integer")
    return value


def decode_heartbeat(frame: bytes) -> Heartbeat:
    body = _unpack_map(frame[1:], MAX_HEARTBEAT, "heartbeat")
    if set(body) != {*_HB_INTS, "pd", "ls"}:
        raise WireError("heartbeat fields do not match version 1")
    ints = {k: _uint(body[k], f"heartbeat.{k}") for k in _HB_INTS}
    digest = body["pd"]
    if not isinstance(digest, bytes) or len(digest) != 32:
        raise WireError("heartbeat.pd must be 32 bytes")
    last_seq = body["ls"]
    if not isinstance(last_seq, dict):
        raise WireError("heartbeat.ls must be a map")
    seqs: dict[str, int] = {}
    for name, seq in last_seq.items():
        if not isinstance(name, str) or len(name) > 63:
            raise WireError("heartbeat channel name invalid")
        seqs[name] = _uint(seq, "heartbeat sequence")
    return Heartbeat(
        sender_time_us=ints["t"],
        epoch=ints["ep"],
        session_counter=ints["sc"],
        sequence=ints["hb"],
        packets_sent=ints["ps"],
        bytes_sent=ints["bs"],
        objects_sent=ints["os"],
        objects_queued=ints["oq"],
        params_digest=digest,
        interval_ms=ints["iv"],
        last_seq=seqs,
    )


# -------------------------------------------------------------------- manifest
MANIFEST_LABEL = b"ferry/v1/manifest"
TRAILER_MAGIC = b"FYT1"
# manifest || signature(64) || manifest_len(u32) || "FYT1"
TRAILER_TAIL = struct.Struct(">I4s")
MANIFEST_VERSION = 1
_MANIFEST_KEYS = {
    "v",
    "id",
    "kind",
    "channel",
    "seq",
    "name",
    "media_type",
    "size",
    "sha256",
    "created_us",
    "mtime_us",
    "sender",
}
_MANIFEST_OPTIONAL = {"schema", "path", "subject", "report"}
KINDS = ("file", "message", "audit", "bundle")
AUDIT_CHANNEL = "_audit"
"""The channel of audit-mirror pieces (kind ``audit``); config channel names cannot start with _."""
MAX_PATH_BYTES = 1024
# The content verdict summary a file carries (JSON): type, verdict, feature switches, actions.
MAX_REPORT_BYTES = 8 * 1024


@dataclass(frozen=True)
class Manifest:
    """What the outside vouches for, signed with its Ed25519 key."""

    object_id: bytes
    kind: str
    channel: str
    seq: int
    name: str
    media_type: str
    size: int
    sha256: bytes
    created_us: int
    """When the outside took the item in (UTC µs)."""
    mtime_us: int
    """The file's modification time at intake (UTC µs)."""
    sender: bytes
    """Key id of the signing key."""
    schema: str = ""
    """Message schema name (``kind == "message"``); empty for files."""
    path: str = ""
    """Relative folder the file came from (``a/b``) when its channel takes subfolders."""
    subject: str = ""
    """Who submitted the item: ``folder:<channel>`` or ``api:<client name>``."""
    report: str = ""
    """The outside content verdict (compact JSON) the inside re-check reads; empty if none."""

    def encode(self) -> bytes:
        body = {
            "channel": self.channel,
            "created_us": self.created_us,
            "id": self.object_id,
            "kind": self.kind,
            "media_type": self.media_type,
            "mtime_us": self.mtime_us,
            "name": self.name,
            "sender": self.sender,
            "seq": self.seq,
            "sha256": self.sha256,
            "size": self.size,
            "v": MANIFEST_VERSION,
        }
        for key in ("schema", "path", "subject", "report"):
            if getattr(self, key):
                body[key] = getattr(self, key)
        out: bytes = msgpack.packb(dict(sorted(body.items())), use_bin_type=True)
        return out


def decode_manifest(data: bytes) -> Manifest:
    body = _unpack_map(data, MAX_MANIFEST, "manifest")
    if not _MANIFEST_KEYS <= set(body) <= _MANIFEST_KEYS | _MANIFEST_OPTIONAL:
        raise WireError("manifest fields do not match version 1")
    version = body["v"]
    if type(version) is not int or version != MANIFEST_VERSION:
        raise WireError("unsupported manifest version")
    for key, size in (("id", 16), ("sha256", 32), ("sender", 8)):
        if not isinstance(body[key], bytes) or len(body[key]) != size:
            raise WireError(f"manifest.{key} must be {size} bytes")
    for key in ("kind", "channel", "name", "media_type"):
        if not isinstance(body[key], str) or len(body[key].encode()) > MAX_NAME_BYTES:
            raise WireError(f"manifest.{key} must be a string of at most {MAX_NAME_BYTES} bytes")
    if body["kind"] not in KINDS:
        raise WireError("manifest.kind unknown")
    for key, limit in (
        ("schema", MAX_NAME_BYTES),
        ("path", MAX_PATH_BYTES),
        ("subject", 256),
        ("report", MAX_REPORT_BYTES),
    ):
        value = body.get(key, "")
        if not isinstance(value, str) or (not value and key in body) or len(value.encode()) > limit:
            raise WireError(f"manifest.{key} must be a non-empty string of at most {limit} bytes")
    return Manifest(
        object_id=body["id"],
        kind=body["kind"],
        channel=body["channel"],
        seq=_uint(body["seq"], "manifest.seq"),
        name=body["name"],
        media_type=body["media_type"],
        size=_uint(body["size"], "manifest.size"),
        sha256=body["sha256"],
        created_us=_uint(body["created_us"], "manifest.created_us"),
        mtime_us=_uint(body["mtime_us"], "manifest.mtime_us"),
        sender=body["sender"],
        schema=body.get("schema", ""),
        path=body.get("path", ""),
        subject=body.get("subject", ""),
        report=body.get("report", ""),
    )


def encode_trailer(manifest_bytes: bytes, signature: bytes) -> bytes:
    """The object trailer: appended after the content in the object stream."""
    return manifest_bytes + signature + TRAILER_TAIL.pack(len(manifest_bytes), TRAILER_MAGIC)


def trailer_length(tail: bytes) -> int:
    """From the last 8 bytes of an object stream, the total trailer length."""
    if len(tail) != TRAILER_TAIL.size:
        raise WireError("object too short for a trailer")
    mlen, magic = TRAILER_TAIL.unpack(tail)
    if magic != TRAILER_MAGIC:
        raise WireError("object trailer magic missing")
    if mlen > MAX_MANIFEST:
        raise WireError("object manifest too long")
    return int(mlen) + SIGNATURE_LEN + TRAILER_TAIL.size


def split_trailer(trailer: bytes) -> tuple[bytes, bytes]:
    """Return ``(manifest bytes, signature)`` of a trailer (not yet verified)."""
    if len(trailer) != trailer_length(trailer[-TRAILER_TAIL.size :]):
        raise WireError("object trailer length mismatch")
    mlen = len(trailer) - SIGNATURE_LEN - TRAILER_TAIL.size
    return trailer[:mlen], trailer[mlen : mlen + SIGNATURE_LEN]


# ---------------------------------------------------------------- message bundles
BUNDLE_MEDIA_TYPE = "application/x-ferry-bundle"
# The content of a ``bundle`` object: count(u16), then per member
# manifest_len(u16) content_len(u32) manifest content. One signature (the bundle's
# trailer) covers every member: members carry no trailer of their own.
BUNDLE_COUNT = struct.Struct(">H")
BUNDLE_MEMBER = struct.Struct(">HI")
MAX_BUNDLE_MEMBERS = 4_096


def encode_member(manifest: Manifest, content: bytes) -> bytes:
    """One member record of a bundle (what the outside spools for each message)."""
    body = manifest.encode()
    if len(body) > MAX_MANIFEST:
        raise WireError("manifest too long for a bundle member")
    return BUNDLE_MEMBER.pack(len(body), len(content)) + body + content


def encode_bundle(members: list[bytes]) -> bytes:
    """The content of a bundle object from member records (:func:`encode_member`)."""
    if not 1 <= len(members) <= MAX_BUNDLE_MEMBERS:
        raise WireError(f"a bundle holds 1 to {MAX_BUNDLE_MEMBERS} members")
    return BUNDLE_COUNT.pack(len(members)) + b"".join(members)


def decode_bundle(data: bytes) -> list[tuple[Manifest, bytes]]:
    """Split an authenticated bundle's content into (manifest, content) of each member.

    Checks the layout exactly (no byte left over) and that every member is a
    message whose manifest size matches its content; the caller checks what
    needs the trusted key and channel (sender, channel, hash).
    """
    if len(data) < BUNDLE_COUNT.size:
        raise WireError("bundle too short")
    (count,) = BUNDLE_COUNT.unpack_from(data)
    if not 1 <= count <= MAX_BUNDLE_MEMBERS:
        raise WireError(f"bundle member count {count} out of range")
    view = memoryview(data)
    offset = BUNDLE_COUNT.size
    out: list[tuple[Manifest, bytes]] = []
    for i in range(count):
        if len(data) - offset < BUNDLE_MEMBER.size:
            raise WireError(f"bundle member {i} truncated")
        mlen, clen = BUNDLE_MEMBER.unpack_from(data, offset)
        offset += BUNDLE_MEMBER.size
        if mlen > MAX_MANIFEST or len(data) - offset < mlen + clen:
            raise WireError(f"bundle member {i} longer than the bundle")
        manifest = decode_manifest(bytes(view[offset : offset + mlen]))
        offset += mlen
        if manifest.kind != "message":
            raise WireError(f"bundle member {i} is a {manifest.kind}, not a message")
        if manifest.size != clen:
            raise WireError(f"bundle member {i} size differs from its manifest")
        out.append((manifest, bytes(view[offset : offset + clen])))
        offset += clen
    if offset != len(data):
        raise WireError("bytes left over after the last bundle member")
    return out

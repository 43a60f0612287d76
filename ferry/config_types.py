"""Frozen configuration values passed explicitly to constructors.

Loaded and validated from YAML by :mod:`ferry.config` against the JSON
Schemas in ``schemas/``. Nothing here reads files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ferry.content.base import Policy

Transport = Literal["udp", "serial"]
KemAlg = Literal["mlkem768x25519", "x25519"]
FecCodecName = Literal["isal", "zfec"]

# The largest message a config may allow (channel or API max_message_size): a message is
# held in memory on both sides and crosses as one bundle.
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
# Room the inside keeps free on its state disk for its ledger, audit log and messages: an
# incoming object that would leave less is not spooled (inside.spool_reserve).
DEFAULT_SPOOL_RESERVE = 256 * 1024 * 1024


@dataclass(frozen=True)
class FecParams:
    """Erasure coding: each block has ``source`` source symbols and ``repair`` repair symbols."""

    codec: FecCodecName = "isal"
    source: int = 32
    """k: 32 keeps ISA-L decoding cheap (pyeclib inverts k x k per decode: 77 us at 32,
    481 us at 64), measured as the difference between keeping up at 5% loss or not."""
    repair: int = 12
    interleave: int = 32
    """Number of blocks whose symbols are interleaved on the wire (burst tolerance)."""


@dataclass(frozen=True)
class LinkParams:
    """What both sides must agree on. Its digest travels in every heartbeat."""

    transport: Transport = "udp"
    packet_size: int = 1472
    """Largest datagram ferry sends (bytes); 1472 = 1500-byte MTU minus IPv4 and UDP headers."""
    rate_bps: int = 800_000_000
    """Pacing rate in bits per second, counting every byte on the wire."""
    fec: FecParams = field(default_factory=FecParams)
    kem: KemAlg = "mlkem768x25519"
    heartbeat_interval: float = 1.0
    announce_interval: float = 1.0
    rekey_interval: float = 3600.0

    def digest(self) -> bytes:
        """SHA-256 over the canonical JSON of the parameters both sides must share.

        ``rate_bps`` and the interleave depth are sender-side choices and are
        not part of it.
        """
        shared = {
            "transport": self.transport,
            "packet_size": self.packet_size,
            "fec": {"codec": self.fec.codec, "source": self.fec.source, "repair": self.fec.repair},
            "kem": self.kem,
            "heartbeat_interval": self.heartbeat_interval,
        }
        blob = json.dumps(shared, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(b"ferry-link-params\n" + blob).digest()


@dataclass(frozen=True)
class UdpEndpoint:
    host: str = "127.0.0.1"
    port: int = 47_000
    rcvbuf: int = 64 * 1024 * 1024
    """Receiver SO_RCVBUF in bytes (forced when running as root)."""


@dataclass(frozen=True)
class SerialEndpoint:
    device: str = "/dev/ttyUSB0"
    baud: int = 115_200


ChannelKind = Literal["files", "messages"]


@dataclass(frozen=True)
class Repeat:
    """Each item of the channel is sent ``count`` times, spread evenly over ``spread`` seconds.

    For links where the inside may be down or lose a burst: the inside keeps the
    first good copy and ignores the others.
    """

    count: int = 1
    spread: float = 0.0


@dataclass(frozen=True)
class OutsideChannel:
    name: str
    drop: Path | None
    """Folder clerks drop files into (``files`` channels)."""
    sent: Path | None
    """Folder the originals are moved to once safely spooled (``after_send: move``)."""
    quarantine: Path | None = None
    """Folder rejected files go to, with ``<name>.reason.json`` and ``<name>.reason.txt``."""
    kind: ChannelKind = "files"
    after_send: Literal["move", "delete"] = "move"
    max_size: int = 4 * 1024**3
    """Largest file (or upload) taken, in bytes."""
    settle_seconds: float = 1.0
    """A file must keep the same size and mtime this long before it is taken
    (files closed after writing or renamed into place are taken sooner)."""
    rescan_seconds: float | None = None
    """How often the drop folder is scanned in full (None: every 30 s, or every 2 s on a
    network share, where inotify does not see files other machines write)."""
    subfolders: bool = False
    """Take files from subfolders of the drop folder too (the relative path travels along)."""
    max_items_per_minute: int = 0
    """Rate limit on items taken (0: none); files beyond it wait in the drop folder."""
    allowed_types: tuple[str, ...] = ("*",)
    """File name extensions taken (``*``: any); the content pipeline checks the real type."""
    schemas: tuple[str, ...] = ()
    """Message schemas accepted (``messages`` channels): names under schemas/messages/."""
    max_message_size: int = 1024 * 1024
    repeat: Repeat = field(default_factory=Repeat)
    priority: int = 1
    """0 sends before 1: messages pre-empt bulk files (default 0 for messages channels)."""
    content: Policy | None = None
    """The content policy of a files channel (``content:``; docs/CONTENT.md); None: the
    channel's files are not run through the content pipeline."""


@dataclass(frozen=True)
class ApiClient:
    """One integrator allowed on the outer API (a file in the allow-list folder)."""

    name: str
    public_key: str
    """``ferry-pk:x25519:...`` CURVE public key of the client."""
    channels: tuple[str, ...]
    rate: float = 1000.0
    """Submissions per second (token bucket; burst of one second's worth)."""
    expires_us: int | None = None


@dataclass(frozen=True)
class PreviousServerKey:
    """An earlier CURVE server key, still served during a key rotation on endpoints of its
    own: the ones its clients know it by (docs/OPERATIONS.md, "Rotating the CURVE server keys")."""

    key: Path
    endpoint: str | None = None
    publish: str | None = None
    """(Inner consumers only) the PUB endpoint for this key."""


@dataclass(frozen=True)
class ApiParams:
    """The outer API: a ZeroMQ ROUTER with CURVE, allow-listed clients."""

    endpoint: str = "tcp://127.0.0.1:47100"
    server_key: Path | None = None
    clients: Path | None = None
    """Folder of ``<name>.yaml`` client files (reloaded on change)."""
    max_message_size: int = 1024 * 1024
    chunk_size: int = 256 * 1024
    """Chunk size of uploads (files larger than a message)."""
    upload_window: int = 8
    """Chunks a client may have in flight (credit-based flow control)."""
    busy_items: int = 100_000
    """Queued items beyond which submissions get BUSY (backpressure)."""
    busy_bytes: int = 16 * 1024**3
    """Queued bytes beyond which submissions get BUSY."""
    max_connections: int = 1000
    """TCP connections the API holds at once (each one a descriptor and some memory)."""
    max_connections_per_address: int = 100
    """Of them, from one peer address."""
    previous_server_keys: tuple[PreviousServerKey, ...] = ()


@dataclass(frozen=True)
class InsideChannel:
    name: str
    deliver: Path | None
    kind: ChannelKind = "files"
    subfolders: bool = False
    """Recreate the sender's subfolder structure (always inside ``deliver``)."""
    schemas: tuple[str, ...] = ()
    """Message schemas accepted inside (checked again before delivery)."""
    consumers: bool = True
    """Deliver messages to inner ZeroMQ consumers (``messages`` channels)."""
    recheck: bool = True
    """Files channels: every file must carry the outside's content report and pass the inside
    re-check; a file without one is refused (a bulk channel of opaque data sets False)."""


@dataclass(frozen=True)
class ConsumerParams:
    """Inner ZeroMQ delivery of messages: a CURVE ROUTER for acknowledged consumers
    (at least once) and an optional PUB for best-effort fan-out."""

    endpoint: str | None = None
    publish: str | None = None
    server_key: Path | None = None
    clients: Path | None = None
    """Folder of ``<name>.yaml`` consumer files (same format as API clients)."""
    redeliver_after: float = 5.0
    """Seconds before an unacknowledged message is offered again."""
    max_connections: int = 1000
    """TCP connections each consumer socket (ROUTER, PUB) holds at once."""
    max_connections_per_address: int = 100
    """Of them, from one peer address."""
    previous_server_keys: tuple[PreviousServerKey, ...] = ()


@dataclass(frozen=True)
class AuditParams:
    """Where an agent keeps its audit log (docs/AUDIT.md) and the key that signs its checkpoints."""

    dir: Path
    key: Path
    """Secret Ed25519 audit key (role ``audit``); its ``.pub`` sits next to it."""
    origin: str | None = None
    """Name of the log in its checkpoints (default: the name an existing log has, else
    ``ferry/<side>/<first 16 hex digits of the key id>``)."""
    checkpoint_every: int = 1000
    checkpoint_interval: float = 60.0
    mirror: bool = True
    """Outside: send the log across the diode so the inside keeps a verified mirror."""
    siem: str | None = None
    """Also export every record to this syslog destination (``tcp://host:port``, ``udp://``)."""
    mirror_dir: Path | None = None
    """Inside: where the mirror of the outside's log is kept (None: no mirror)."""
    peer_public_key: str | None = None
    """Inside: the outside's audit public key (string or path) the mirror is checked with."""
    previous_keys: tuple[Path, ...] = ()
    """During an audit key rotation: earlier secret audit keys. Each also signs every
    checkpoint (the handover verifiers follow), and the log resumes from one they signed."""
    previous_peer_public_keys: tuple[str, ...] = ()
    """Inside: earlier outside audit public keys the mirror's checkpoints may be signed by
    (keep each while the mirror holds checkpoints it signed)."""


@dataclass(frozen=True)
class OutsideConfig:
    source: Path
    """The YAML file this was loaded from."""
    state_dir: Path
    signing_key: Path
    inside_public_key: str
    """Public key string (or a path to a file holding one) of the inside's KEM key."""
    link: LinkParams
    udp: UdpEndpoint
    serial: SerialEndpoint
    channels: tuple[OutsideChannel, ...]
    api: ApiParams | None = None
    audit: AuditParams | None = None
    poll_interval: float = 0.5
    retention_days: float = 30.0  # sent items are forgotten after this (Spool.prune)
    spool_reserve: int | None = None
    """Bytes a clerk's file must leave free on the state file system to be taken (None:
    DEFAULT_SPOOL_RESERVE, but at most a tenth of that file system)."""


@dataclass(frozen=True)
class InsideConfig:
    source: Path
    state_dir: Path
    kem_key: Path
    outside_public_key: str
    """Public key string (or path) of the outside signing key this inside trusts."""
    link: LinkParams
    udp: UdpEndpoint
    serial: SerialEndpoint
    channels: tuple[InsideChannel, ...]
    consumers: ConsumerParams = field(default_factory=ConsumerParams)
    audit: AuditParams | None = None
    degraded_after: float = 3.0
    """Seconds without a heartbeat before the link is DEGRADED."""
    down_after: float = 10.0
    """Seconds without a heartbeat before the link is DOWN."""
    max_clock_skew: float = 120.0
    object_timeout: float = 60.0
    """Seconds without news of an incomplete object before it is reported lost."""
    max_object_size: int = 64 * 1024**3
    spool_reserve: int | None = None
    """Bytes an incoming object must leave free on the state file system to be spooled (None:
    DEFAULT_SPOOL_RESERVE, but at most a tenth of that file system)."""
    retention_days: float = 30.0  # finished items are forgotten after this (Ledger.prune)
    previous_kem_keys: tuple[Path, ...] = ()
    """Key rotation: earlier KEM secret keys, still accepted until the outside seals to the new."""
    previous_outside_public_keys: tuple[str, ...] = ()
    """Key rotation: earlier outside signing keys (strings or paths), still trusted."""

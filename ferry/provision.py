"""Create a ready-to-run pair of agent folders (`ferry init`) and key pairs (`ferry keygen`).

``init_deployment(root)`` lays out::

    root/outside/  outside.yaml  keys/ (0700)  state/ (0700)  drop/<channel>/  sent/<channel>/
    root/inside/   inside.yaml   keys/ (0700)  state/ (0700)  deliver/<channel>/

Each side gets its own secret key and a copy of the other side's public key.
The configs use paths relative to their own folder, so a side's folder can be
moved to its machine as a whole. Nothing existing is ever overwritten: key
and config files are created with ``O_EXCL``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import socket
from pathlib import Path
from typing import Any

from ferry.config_types import (
    DEFAULT_SPOOL_RESERVE,
    ApiParams,
    AuditParams,
    ConsumerParams,
    FecParams,
    InsideConfig,
    LinkParams,
    OutsideChannel,
    OutsideConfig,
    SerialEndpoint,
    UdpEndpoint,
)
from ferry.content.base import Limits
from ferry.content.policy import SUPPORTED_TYPES
from ferry.crypto.keys import (
    KEM_ALGS,
    Alg,
    SecretKey,
    write_public_key,
    write_secret_key,
)
from ferry.errors import UsageError
from ferry.systemd import service_unit, unit_name

__all__ = ["KEY_ROLES", "init_deployment", "keygen"]

# role given to keygen -> (role written into the key file, algorithm)
KEY_ROLES: dict[str, tuple[str, Alg]] = {
    "outside-signing": ("outside-signing", "ed25519"),
    "inside-kem": ("inside-kem", "mlkem768x25519"),
    "inside-kem-x25519": ("inside-kem", "x25519"),
    "audit": ("audit", "ed25519"),
    "security-admin": ("security-admin", "ed25519"),  # releases quarantined items
    "api-server": ("api-server", "x25519"),
    "api-client": ("api-client", "x25519"),
    "consumer-server": ("consumer-server", "x25519"),
    "consumer": ("consumer", "x25519"),
}
_CHANNEL_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # as in the config schemas
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PRIVATE_DIR = 0o700
_PUBLIC_FILE = 0o644
_DEFAULT_SERIAL = SerialEndpoint().device


def _defaults(cls: type[Any]) -> dict[str, Any]:
    """Field defaults of a config dataclass (the one place defaults are written down)."""
    return {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }


def _abs(path: Path) -> Path:
    """Absolute and lexically normalised, the way ferry.config resolves config paths."""
    return Path(os.path.abspath(path))


def _q(text: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(text)


def _si(value: int, units: tuple[tuple[str, int], ...]) -> str:
    for suffix, factor in units:
        if value % factor == 0:
            return f"{value // factor}{suffix}"
    return str(value)


def _rate(bps: int) -> str:
    return _q(_si(bps, (("G", 10**9), ("M", 10**6), ("k", 10**3))))


def _size(n: int) -> str:
    return _q(_si(n, (("T", 2**40), ("G", 2**30), ("M", 2**20), ("k", 2**10))))


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out to outgoing connections (and to a bind to port 0)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # (Linux's default)


def _free_port(kind: socket.SocketKind, host: str) -> int:
    """A port nobody is bound to right now, outside the ephemeral range where one can be:
    a port from that range (what a bind to port 0 gives) may be taken by any outgoing
    connection before the agent binds it (a start failing with "address in use")."""
    low, high = _ephemeral_range()
    rng = random.SystemRandom()
    candidates = [rng.randrange(10_000, low) for _ in range(64)] if low > 10_000 else []
    if high < 65_000:
        candidates += [rng.randrange(high + 1, 65_536) for _ in range(64)]
    for port in [*candidates, 0]:
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            found: int = sock.getsockname()[1]
            return found
    raise OSError("no free port")  # (port 0 failing: the machine is out of ports)


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port nobody is bound to right now (see :func:`_free_port`)."""
    return _free_port(socket.SOCK_DGRAM, host)


def _mkdir(path: Path, mode: int | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if mode is not None:
        path.chmod(mode)  # also tightens a folder that existed before


def _create_text(path: Path, text: str) -> None:
    """Create ``path`` with ``text``; never overwrites."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, _PUBLIC_FILE)
    except FileExistsError as exc:
        raise UsageError(f"{path}: already exists; refusing to overwrite") from exc
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


# --- config templates --------------------------------------------------------------------


def _link_yaml(transport: str, kem: str, rate_bps: int, endpoint: str) -> str:
    link, fec = LinkParams(), FecParams()
    return f"""\
# Link parameters. transport, packet_size, kem, fec (codec, source, repair) and
# heartbeat_interval must be identical on both sides: their digest is in every heartbeat.
link:
  # udp (network data diode) or serial (one-way serial line).
  transport: {transport}
  # Largest datagram in bytes (1280..65000); 1472 fills a 1500-byte Ethernet MTU.
  packet_size: {link.packet_size}
  # Pacing rate in bits/s counting every byte sent; k/M/G are powers of 1000 (min 1200).
  # Keep it below what the diode and the inside host can absorb.
  rate: {_rate(rate_bps)}
  # Session key exchange: mlkem768x25519 (post-quantum hybrid) or x25519 (classic).
  kem: {kem}
  # Seconds between heartbeats (0.05..60); the inside watches them to judge the link.
  heartbeat_interval: {link.heartbeat_interval}
  # Seconds between repeats of the session announcement (0.05..3600).
  announce_interval: {link.announce_interval}
  # Seconds before a fresh session key is announced (10..604800).
  rekey_interval: {link.rekey_interval}
  # Forward error correction: nothing is ever re-sent, lost packets are rebuilt.
  fec:
    # isal (ISA-L Reed-Solomon) or zfec.
    codec: {fec.codec}
    # Source packets per block (1..128).
    source: {fec.source}
    # Repair packets per block (0..128): up to this many losses per block are recovered.
    repair: {fec.repair}
    # Blocks interleaved on the wire (1..256): longer loss bursts become survivable.
    interleave: {fec.interleave}
{endpoint}"""


def _udp_yaml(side: str, port: int) -> str:
    what = "Where the outside sends to" if side == "outside" else "Where the inside listens"
    rcvbuf = (
        ""
        if side == "outside"
        else "    # Receive buffer in bytes (k/M/G are powers of 1024); raise net.core.rmem_max.\n"
        f"    rcvbuf: {_size(UdpEndpoint().rcvbuf)}\n"
    )
    return f"""\
  udp:
    # {what}: IP address (the diode's far side) and port.
    host: "127.0.0.1"
    port: {port}
{rcvbuf}"""


def _serial_yaml(device: str) -> str:
    return f"""\
  serial:
    # Serial device of this side of the one-way line.
    device: {_q(device)}
    # Line speed in bits/s; must match the other side.
    baud: {SerialEndpoint().baud}
"""


_HEADER = """\
# ferry {role} agent configuration (written by `ferry init`).
# Relative paths are relative to the folder holding this file.
# The schema of this file is ferry/schemas/{role}-config.schema.json; unknown keys are errors.

# Format version of this file; must be 1.
version: 1
# Which agent this file configures: outside (sends) or inside (receives).
role: {role}
# Private folder for the agent's {state} (created 0700).
state_dir: "state"

keys:
"""


MESSAGE_SCHEMAS = ("citizen-application", "agency-notice")
API_CLIENT = "portal"
CONSUMER = "inner-app"


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (see :func:`_free_port`)."""
    return _free_port(socket.SOCK_STREAM, host)


def _messages_outside_yaml(name: str, api_port: int) -> str:
    api = ApiParams()
    return f"""  - # A messages channel: integrators submit JSON through the API (no folders).
    name: {name}
    kind: messages
    # Schemas accepted (files under schemas/messages/); each message names one.
    schemas: [{", ".join(MESSAGE_SCHEMAS)}]
    # Largest message in bytes; k/M/G/T are powers of 1024.
    max_message_size: {_size(api.max_message_size)}
    # Send every message twice, 30 s apart, in case the inside is down or loses a burst.
    repeat: {{count: 2, spread: 30}}

# The outer API (ZeroMQ ROUTER with CURVE): only allow-listed client keys get in.
api:
  # Where integrators connect (keep it on the portal-facing interface).
  endpoint: "tcp://127.0.0.1:{api_port}"
  # The server's CURVE secret key (x25519, mode 0600); give integrators its .pub.
  server_key: "keys/api-server.key"
  # Allow-list: one <name>.yaml per client (public key, channels, rate); reloaded on change.
  clients: "api-clients"
  # Queued items (or bytes) beyond which submissions get BUSY and folders pause.
  busy_items: {api.busy_items}
  busy_bytes: {_size(api.busy_bytes)}
  # Replacing the server key: the old key stays on its endpoint for a while, the new one
  # gets a new endpoint (docs/OPERATIONS.md, "Rotating the CURVE server keys"):
  # previous_server_keys: [{{key: <the old key file>, endpoint: <its old endpoint>}}]
"""


def _content_yaml() -> str:
    """The ``content:`` policy of a files channel: every supported type (docs/CONTENT.md)."""
    limits = Limits()
    return f"""\
    # Content checks (docs/CONTENT.md): each file is identified by its content, cleaned,
    # scanned and validated in an isolated worker; refused files go to the quarantine folder.
    content:
      # Types accepted; docm/xlsm/pptm arrive macro-free as docx/xlsx/pptx, gif/bmp/tiff as png.
      types: [{", ".join(SUPPORTED_TYPES)}]
      # Active content switches: allow, sanitize (remove; the default) or disallow (refuse).
      features: {{macros: sanitize, javascript: sanitize, embedded_files: sanitize}}
      # Limits per file (sizes: k/M/G are powers of 1024; seconds of wall-clock time).
      limits:
        max_bytes: {_size(limits.max_bytes)}
        archive_depth: {limits.archive_depth}
        archive_entries: {limits.archive_entries}
        archive_expanded: {_size(limits.archive_expanded)}
        seconds: {limits.seconds}
"""


def _bulk_yaml() -> str:
    return """\
    # A bulk channel: opaque data (e.g. encrypted archives) the content pipeline cannot
    # inspect. Files cross as they are (signed and hashed, never sanitized): an explicit
    # decision of the operator; give such a channel a content: policy to check it.
"""


def _outside_yaml(
    link: str, channels: tuple[str, ...], messages: str = "", bulk: tuple[str, ...] = ()
) -> str:
    ch = OutsideChannel(name="x", drop=Path(), sent=Path())
    text = _HEADER.format(role="outside", state="spool and session state")
    text += """\
  # Secret Ed25519 key session announcements are signed with (mode 0600).
  signing_key: "keys/outside-signing.key"
  # The inside's KEM public key: a 'ferry-pk:...' string or a file holding one.
  inside_public_key: "keys/inside-kem.pub"

"""
    text += link
    text += "\n# Channels: files dropped into a channel's drop folder arrive in the inside's\n"
    text += "# deliver folder of the channel with the same name.\nchannels:\n"
    for name in channels:
        text += f"""\
  - # Channel name: lowercase letters, digits, '_' and '-'; the same on both sides.
    name: {name}
    # Folder clerks drop files into.
    drop: {_q(f"drop/{name}")}
    # Folder originals are moved to once safely spooled (with after_send: move).
    sent: {_q(f"sent/{name}")}
    # Folder refused files go to, each with <name>.reason.txt for the clerk.
    quarantine: {_q(f"quarantine/{name}")}
    # What happens to an original once spooled: move (into sent) or delete.
    after_send: {ch.after_send}
    # Largest file accepted; k/M/G/T are powers of 1024.
    max_size: {_size(ch.max_size)}
    # Seconds a file must keep the same size and mtime before it is taken
    # (files closed after writing or renamed into place are taken at once).
    settle_seconds: {ch.settle_seconds}
    # A drop folder on a network share (SMB, NFS) is rescanned every 2 s, a local one every
    # 30 s (inotify sees only this host's writes there); set how often here:
    # rescan_seconds: 2
    # Take files from subfolders too (the relative path travels along).
    subfolders: false
{_bulk_yaml() if name in bulk else _content_yaml()}"""
    text += messages
    text += _audit_yaml("outside")
    text += f"""
# Outside agent tuning.
outside:
  # Seconds the intake waits for folder events per turn.
  poll_interval: {_defaults(OutsideConfig)["poll_interval"]}
  # Days a sent item (and its submission id) stays in the spool database, then is
  # forgotten: a client reusing a forgotten submission id gets a new item.
  retention_days: {_defaults(OutsideConfig)["retention_days"]:g}
  # Room a clerk's file must leave free on the state disk (the API's messages and the
  # spool need it): one that would leave less waits in its drop folder until there is
  # room; one that never could is quarantined. Unset: {_reserve()}, but at most a tenth
  # of that disk.
  # spool_reserve: {_q(_reserve())}
"""
    return text


def _reserve() -> str:
    return _si(DEFAULT_SPOOL_RESERVE, (("G", 2**30), ("M", 2**20)))


def _audit_yaml(side: str) -> str:
    text = f"""
# The tamper-evident audit log (docs/AUDIT.md): every security-relevant event, one
# JSON line, hashed into a Merkle tree whose head is signed with the audit key.
# If it cannot be written, intake and transfers stop until it can.
audit:
  # Folder of the log (created 0700); keep it for at least 6 months (GB/T 22239).
  dir: "audit"
  # Secret Ed25519 key that signs checkpoints; auditors verify with its .pub.
  # To replace it: key names the new one, previous_keys: ["keys/audit.key"] the old one
  # (docs/OPERATIONS.md, "Rotating the audit keys").
  key: "keys/audit.key"
  # Records between signed checkpoints (a checkpoint is also made every
  # checkpoint_interval seconds while records arrive).
  checkpoint_every: {AuditParams.checkpoint_every}
  checkpoint_interval: {AuditParams.checkpoint_interval}
"""
    if side == "outside":
        text += """\
  # Send the log across the diode too, so the inside keeps a verified mirror of it.
  mirror: true
"""
    else:
        text += """\
  # Byte-identical mirror of the outside's log, checked against its signed checkpoints.
  mirror_dir: "audit-outside-mirror"
  # The outside's audit public key (checks the mirror's checkpoints).
  peer_public_key: "keys/outside-audit.pub"
"""
    return text


def _messages_inside_yaml(name: str, consumer_port: int) -> str:
    return f"""\
  - # Messages: checked again (schema, canonical form), then delivered.
    name: {name}
    kind: messages
    schemas: [{", ".join(MESSAGE_SCHEMAS)}]
    # Each message also lands here as <schema>-<seq>.json, exactly once.
    deliver: {_q(f"deliver/{name}")}
    # And goes to the inner ZeroMQ consumers below (at least once, with item ids).
    consumers: true

# Inner ZeroMQ delivery (CURVE): allow-listed consumers acknowledge what they process.
consumers:
  endpoint: "tcp://127.0.0.1:{consumer_port}"
  server_key: "keys/consumer-server.key"
  clients: "consumer-clients"
  # Seconds before an unacknowledged message is offered again.
  redeliver_after: {ConsumerParams().redeliver_after}
  # Replacing the server key (docs/OPERATIONS.md, "Rotating the CURVE server keys"):
  # previous_server_keys: [{{key: <the old key file>, endpoint: <its old endpoint>}}]
"""


def _inside_yaml(
    link: str, channels: tuple[str, ...], messages: str = "", bulk: tuple[str, ...] = ()
) -> str:
    text = _HEADER.format(role="inside", state="session state and partial objects")
    text += """\
  # Secret KEM key sessions are opened with (mode 0600).
  kem_key: "keys/inside-kem.key"
  # The outside's signing public key: a 'ferry-pk:...' string or a file holding one.
  outside_public_key: "keys/outside-signing.pub"

"""
    text += link
    text += "\n# Channels: what arrives on a channel is delivered into its folder.\nchannels:\n"
    for name in channels:
        text += f"""\
  - # Channel name; the same on both sides.
    name: {name}
    # Folder verified files are delivered into.
    deliver: {_q(f"deliver/{name}")}
"""
        if name in bulk:
            text += """\
    # A bulk channel: opaque data, no content report from the outside, no re-check here.
    recheck: false
"""
    text += messages
    text += _audit_yaml("inside")
    tune = _defaults(InsideConfig)
    text += f"""
# Inside agent tuning.
inside:
  # Seconds without a heartbeat before the link is reported DEGRADED.
  degraded_after: {tune["degraded_after"]}
  # Seconds without a heartbeat before the link is reported DOWN (> degraded_after).
  down_after: {tune["down_after"]}
  # Largest tolerated difference between the two clocks, in seconds.
  max_clock_skew: {tune["max_clock_skew"]}
  # Seconds without news of an incomplete object before it is reported lost.
  object_timeout: {tune["object_timeout"]}
  # Largest object accepted; k/M/G/T are powers of 1024.
  max_object_size: {_size(tune["max_object_size"])}
  # Room an incoming object must leave free on the state disk (its ledger, audit log and
  # messages need it): one that would leave less is not spooled (recorded lost, not
  # refused: a repeat is taken once there is room). Unset: {_reserve()}, but at most a
  # tenth of that disk.
  # spool_reserve: {_q(_reserve())}
  # Days the ledger remembers a finished item, then forgets it; at least 8, so that it
  # outlasts any repeat schedule (a repeat of a forgotten item would be delivered again).
  retention_days: {tune["retention_days"]:g}
"""
    return text


# --- entry points ------------------------------------------------------------------------


def _check_args(
    transport: str, port: int | None, kem: str, rate_bps: int, channels: tuple[str, ...]
) -> Alg:
    """Refuse bad arguments (UsageError); returns ``kem`` as an algorithm name."""
    if transport not in {"udp", "serial"}:
        raise UsageError(f"transport must be udp or serial, not {transport!r}")
    if port is not None and not 1 <= port <= 65535:
        raise UsageError(f"port must be 1..65535, not {port}")
    kem_alg = next((alg for alg in KEM_ALGS if alg == kem), None)
    if kem_alg is None:
        raise UsageError(f"kem must be one of {', '.join(KEM_ALGS)}, not {kem!r}")
    if not 1200 <= rate_bps <= 10**12:
        raise UsageError(f"rate must be 1200..10^12 bits/s, not {rate_bps}")
    if not channels:
        raise UsageError("at least one channel is needed")
    for name in channels:
        if not _CHANNEL_NAME.fullmatch(name):
            raise UsageError(
                f"bad channel name {name!r}: use 1-63 lowercase letters, digits, '_' or '-'"
            )
    if len(set(channels)) != len(channels):
        raise UsageError("channel names must be unique")
    return kem_alg


def init_deployment(
    root: Path,
    *,
    transport: str = "udp",
    port: int | None = None,
    serial_devices: tuple[str, str] | None = None,
    kem: str = "mlkem768x25519",
    rate_bps: int = 800_000_000,
    channels: tuple[str, ...] = ("documents",),
    bulk: tuple[str, ...] = (),
    messages: str | None = "messages",
) -> dict[str, Any]:
    """Create ``root/outside`` and ``root/inside`` with keys, folders and commented configs.

    ``serial_devices`` is ``(outside device, inside device)``; both default to
    /dev/ttyUSB0. Refuses (UsageError) if either side already holds a config.
    Every channel gets the content policy (docs/CONTENT.md) except those in ``bulk``: files
    channels for opaque data that cross unsanitized (also created, after ``channels``).
    Returns every path created (absolute strings), for ``ferry init --json``.
    """
    channels = tuple(channels) + tuple(b for b in bulk if b not in channels)
    kem_alg = _check_args(transport, port, kem, rate_bps, channels)
    root = _abs(Path(root))
    out, ins = root / "outside", root / "inside"
    for side in (out, ins):
        existing = sorted(p.name for p in side.glob("*.y*ml")) if side.is_dir() else []
        if existing:
            raise UsageError(
                f"{side} already holds a config ({', '.join(existing)}); not touching it"
            )
    o = {
        "config": out / "outside.yaml",
        "signing_key": out / "keys/outside-signing.key",
        "signing_public_key": out / "keys/outside-signing.pub",
        "inside_public_key": out / "keys/inside-kem.pub",
        "state_dir": out / "state",
        "audit_dir": out / "audit",
        "audit_key": out / "keys/audit.key",
        "audit_public_key": out / "keys/audit.pub",
    }
    i = {
        "config": ins / "inside.yaml",
        "kem_key": ins / "keys/inside-kem.key",
        "kem_public_key": ins / "keys/inside-kem.pub",
        "outside_public_key": ins / "keys/outside-signing.pub",
        "state_dir": ins / "state",
        "audit_dir": ins / "audit",
        "audit_key": ins / "keys/audit.key",
        "audit_public_key": ins / "keys/audit.pub",
        "audit_mirror_dir": ins / "audit-outside-mirror",
        "outside_audit_public_key": ins / "keys/outside-audit.pub",
    }
    files = [o["signing_key"], o["signing_public_key"], o["inside_public_key"]]
    files += [i["kem_key"], i["kem_public_key"], i["outside_public_key"]]
    files += [o["audit_key"], o["audit_public_key"], i["audit_key"], i["audit_public_key"]]
    files += [i["outside_audit_public_key"]]
    taken = [str(p) for p in files if p.exists() or p.is_symlink()]
    if taken:
        raise UsageError(f"refusing to overwrite existing files: {', '.join(taken)}")

    for side in (out, ins):
        _mkdir(side)
        _mkdir(side / "keys", _PRIVATE_DIR)
        _mkdir(side / "state", _PRIVATE_DIR)
    signing = SecretKey.generate("ed25519")
    kem_key = SecretKey.generate(kem_alg)
    write_secret_key(o["signing_key"], signing, "outside-signing")
    write_public_key(o["signing_public_key"], signing.public)
    write_public_key(i["outside_public_key"], signing.public)
    write_secret_key(i["kem_key"], kem_key, "inside-kem")
    write_public_key(i["kem_public_key"], kem_key.public)
    write_public_key(o["inside_public_key"], kem_key.public)
    for side_keys in (o, i):  # each side signs its own audit checkpoints
        audit_key = SecretKey.generate("ed25519")
        write_secret_key(side_keys["audit_key"], audit_key, "audit")
        write_public_key(side_keys["audit_public_key"], audit_key.public)
        if side_keys is o:
            write_public_key(i["outside_audit_public_key"], audit_key.public)

    chans: dict[str, dict[str, str]] = {}
    if messages is not None and messages in channels:
        raise UsageError(f"channel {messages!r} is both a files and the messages channel")
    if messages is not None and not _CHANNEL_NAME.fullmatch(messages):
        raise UsageError(f"bad channel name {messages!r}")
    for name in channels:
        folders = {"drop": out / "drop" / name, "sent": out / "sent" / name}
        folders["deliver"] = ins / "deliver" / name
        for folder in folders.values():
            _mkdir(folder)
        chans[name] = {k: str(v) for k, v in folders.items()}

    link_info: dict[str, Any] = {"transport": transport}
    if transport == "udp":
        port = port if port is not None else free_udp_port()
        link_out = _link_yaml(transport, kem, rate_bps, _udp_yaml("outside", port))
        link_in = _link_yaml(transport, kem, rate_bps, _udp_yaml("inside", port))
        link_info["udp"] = {"host": "127.0.0.1", "port": port}
    else:
        dev_out, dev_in = serial_devices or (_DEFAULT_SERIAL, _DEFAULT_SERIAL)
        link_out = _link_yaml(transport, kem, rate_bps, _serial_yaml(dev_out))
        link_in = _link_yaml(transport, kem, rate_bps, _serial_yaml(dev_in))
        link_info["serial"] = {"outside_device": dev_out, "inside_device": dev_in}
    extra_out = extra_in = ""
    api_info: dict[str, str] = {}
    consumer_info: dict[str, str] = {}
    if messages is not None:
        api_port, consumer_port = free_tcp_port(), free_tcp_port()
        api_info, consumer_info = _provision_zmq(
            root, out, ins, messages, api_port=api_port, consumer_port=consumer_port
        )
        extra_out = _messages_outside_yaml(messages, api_port)
        extra_in = _messages_inside_yaml(messages, consumer_port)
        deliver = ins / "deliver" / messages
        _mkdir(deliver)
        chans[messages] = {"kind": "messages", "deliver": str(deliver)}
    for name in channels:
        chans[name]["quarantine"] = str(out / "quarantine" / name)
        _mkdir(out / "quarantine" / name, _PRIVATE_DIR)
    _create_text(o["config"], _outside_yaml(link_out, channels, extra_out, bulk))
    _create_text(i["config"], _inside_yaml(link_in, channels, extra_in, bulk))
    _record_keys(o, i, api_info, consumer_info)
    _mkdir(i["audit_mirror_dir"], _PRIVATE_DIR)
    devices = link_info.get("serial", {})
    for role, folder, paths in (("outside", out, o), ("inside", ins, i)):
        paths["service"] = folder / unit_name(role)
        unit = service_unit(
            role, folder, paths["config"], serial_device=devices.get(f"{role}_device")
        )
        _create_text(paths["service"], unit)
    result: dict[str, Any] = {
        "root": str(root),
        "outside": {k: str(v) for k, v in o.items()},
        "inside": {k: str(v) for k, v in i.items()},
        "channels": chans,
        "link": link_info,
    }
    if api_info:
        result["api"] = api_info
        result["consumers"] = consumer_info
    result["security_admin"] = _provision_security_admin(root, out, ins)
    return result


def _provision_security_admin(root: Path, out: Path, ins: Path) -> dict[str, str]:
    """The key that releases quarantined items: the secret goes to ``root/admin`` (hand it to
    the security administrator, then remove it from this machine); each side keeps only the
    public key, which ``ferry outside|inside quarantine release`` checks the given key
    against."""
    admin = root / "admin"
    _mkdir(admin, _PRIVATE_DIR)
    key = SecretKey.generate("ed25519")
    secret, public = admin / "security-admin.key", out / "keys" / "security-admin.pub"
    write_secret_key(secret, key, "security-admin")
    write_public_key(admin / "security-admin.pub", key.public)
    write_public_key(public, key.public)
    inside_public = ins / "keys" / "security-admin.pub"
    write_public_key(inside_public, key.public)
    return {
        "secret_key": str(secret),
        "public_key": str(public),
        "inside_public_key": str(inside_public),
        "key_id": key.public.key_id.hex(),
    }


def _record_keys(
    o: dict[str, Path], i: dict[str, Path], api: dict[str, str], consumers: dict[str, str]
) -> None:
    """Start each side's audit log with the keys ``init`` made (key.generated/imported)."""
    from ferry.audit.agent import open_audit_log  # noqa: PLC0415  # (import cycle)
    from ferry.audit.record import AuditObject, Subject  # noqa: PLC0415
    from ferry.config import load_inside_config, load_outside_config  # noqa: PLC0415
    from ferry.crypto.keys import load_public_key  # noqa: PLC0415

    who = Subject.user(os.environ.get("SUDO_USER") or os.environ.get("USER") or "root")
    sides = (
        (
            load_outside_config(o["config"]).audit,
            "outside",
            [
                ("key.generated", "outside-signing", o["signing_public_key"]),
                ("key.generated", "audit", o["audit_public_key"]),
                ("key.imported", "inside-kem", o["inside_public_key"]),
            ]
            + ([("key.generated", "api-server", Path(api["server_public_key"]))] if api else []),
        ),
        (
            load_inside_config(i["config"]).audit,
            "inside",
            [
                ("key.generated", "inside-kem", i["kem_public_key"]),
                ("key.generated", "audit", i["audit_public_key"]),
                ("key.imported", "outside-signing", i["outside_public_key"]),
                ("key.imported", "outside-audit", i["outside_audit_public_key"]),
            ]
            + (
                [("key.generated", "consumer-server", Path(consumers["server_public_key"]))]
                if consumers
                else []
            ),
        ),
    )
    for params, side, keys in sides:
        assert params is not None  # init always writes the audit section
        with open_audit_log(params, side) as log:
            for event, role, path in keys:
                pub = load_public_key(str(path), path.parent)
                where = None if str(path).startswith("ferry-pk:") else str(path)
                log.append(
                    event,
                    subject=who,
                    obj=AuditObject(kind="key", key_id=pub.key_id.hex(), path=where),
                    detail={"role": role, "alg": pub.alg, "by": "ferry init"},
                    durable=True,
                )


def _allow_entry(name: str, key: SecretKey, channels: tuple[str, ...], rate: int) -> str:
    return (
        f"# Allow-list entry written by `ferry init`. Delete this file to revoke the key\n"
        f"# (takes effect within a second, also for connected clients).\n"
        f"version: 1\nname: {name}\npublic_key: {key.public.to_string()}\n"
        f"channels: [{', '.join(channels)}]\n# Submissions per second.\nrate: {rate}\n"
    )


def _client_yaml(role: str, name: str, endpoint: str, server_pub: Path, key: Path) -> str:
    """The key files are named relative to the config (the same folder), so the three files
    can be copied together to the client's host."""
    return (
        f"# ferry {role} configuration (written by `ferry init`). Copy it with the two key\n"
        "# files it names (paths relative to this file) to the client's host, and set\n"
        "# endpoint to the agent's address as seen from there.\n"
        f"version: 1\nrole: {role}\nname: {name}\nendpoint: {_q(endpoint)}\n"
        f"server_public_key: {_q(server_pub.name)}\nclient_key: {_q(key.name)}\n"
    )


def _provision_zmq(
    root: Path, out: Path, ins: Path, channel: str, *, api_port: int, consumer_port: int
) -> tuple[dict[str, str], dict[str, str]]:
    """Server keys, one API client and one inner consumer, with their configs."""
    clients = root / "clients"
    _mkdir(clients, _PRIVATE_DIR)
    infos = []
    for side, server_role, allow_dir, who, role, port in (
        (out, "api-server", "api-clients", API_CLIENT, "api-client", api_port),
        (ins, "consumer-server", "consumer-clients", CONSUMER, "consumer", consumer_port),
    ):
        server = SecretKey.generate("x25519")
        write_secret_key(side / "keys" / f"{server_role}.key", server, server_role)
        write_public_key(side / "keys" / f"{server_role}.pub", server.public)
        _mkdir(side / allow_dir)
        client = SecretKey.generate("x25519")
        client_key = clients / f"{who}.key"
        write_secret_key(client_key, client, role)
        write_public_key(clients / f"{who}.pub", client.public)
        entry = side / allow_dir / f"{who}.yaml"
        _create_text(entry, _allow_entry(who, client, (channel,), 5000))
        endpoint = f"tcp://127.0.0.1:{port}"
        server_pub = clients / f"{server_role}.pub"
        write_public_key(server_pub, server.public)
        config = clients / f"{who}.yaml"
        _create_text(config, _client_yaml(role, who, endpoint, server_pub, client_key))
        infos.append(
            {
                "endpoint": endpoint,
                "server_key": str(side / "keys" / f"{server_role}.key"),
                "server_public_key": server.public.to_string(),
                "allowlist": str(side / allow_dir),
                "client": who,
                "client_config": str(config),
                "client_key": str(client_key),
                "allowlist_entry": str(entry),
            }
        )
    return infos[0], infos[1]


def keygen(role: str, out_dir: Path, name: str | None = None) -> dict[str, str]:
    """Create ``<name or role>.key`` (0600, O_EXCL) and ``.pub`` in ``out_dir``.

    Roles: outside-signing and audit (Ed25519), inside-kem (ML-KEM-768+X25519),
    inside-kem-x25519 (classic X25519). The returned ``role`` is the one written
    into the key file (``inside-kem`` for both KEM variants).
    """
    if role not in KEY_ROLES:
        raise UsageError(f"unknown key role {role!r}; known: {', '.join(KEY_ROLES)}")
    stem = name if name is not None else role
    if not _KEY_NAME.fullmatch(stem):
        raise UsageError(f"bad key name {stem!r}: use letters, digits, '.', '_' or '-'")
    file_role, alg = KEY_ROLES[role]
    out_dir = _abs(Path(out_dir))
    if not out_dir.exists():
        _mkdir(out_dir, _PRIVATE_DIR)
    secret_path, public_path = out_dir / f"{stem}.key", out_dir / f"{stem}.pub"
    for path in (secret_path, public_path):
        if path.exists() or path.is_symlink():
            raise UsageError(f"{path}: already exists; refusing to overwrite a key file")
    key = SecretKey.generate(alg)
    write_secret_key(secret_path, key, file_role)
    try:
        write_public_key(public_path, key.public)
    except BaseException:
        secret_path.unlink()  # do not leave half a key pair behind
        raise
    return {
        "role": file_role,
        "alg": alg,
        "key_id": key.public.key_id.hex(),
        "secret_key": str(secret_path),
        "public_key": str(public_path),
        "public_key_string": key.public.to_string(),
    }

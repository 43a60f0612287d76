"""Find the audit logs an agent config names, for the auditor's commands (``-c CONFIG``).

This reads only the ``role`` and ``audit`` keys of an agent config, with
``yaml.safe_load``; it does not load or validate the rest of the config (the
agent's loader does that), so an auditor can point it at a copied config on a
review host. Paths are relative to the config file's folder:

* ``audit.dir`` -- this side's log (default ``audit``);
* ``audit.origin`` -- the name of this side's log (in its checkpoints), if the config
  names one: reconcile reports a log with another name (ORIGIN_MISMATCH);
* ``audit.key`` -- this side's secret audit key (default ``keys/audit.key``);
  its public half is the same path with ``.pub`` (``keys/audit.key`` ->
  ``keys/audit.pub``), and that is all an auditor needs;
* inside only: ``audit.mirror_dir`` -- the byte-identical mirror of the
  outside's log (default ``<audit.dir>-outside-mirror``, used when it exists),
  and ``audit.peer_public_key`` -- the outside's audit public key, inline
  (``ferry-pk:ed25519:...``) or a file (default ``keys/outside-audit.pub``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ferry.crypto.keys import PUBLIC_PREFIX, PublicKey, load_public_key
from ferry.errors import ConfigError, UsageError

# An agent config is a few KiB; refuse to parse anything absurd.
MAX_CONFIG_BYTES = 1024 * 1024
DEFAULT_DIR = "audit"
DEFAULT_KEY = "keys/audit.key"
DEFAULT_PEER_PUBLIC_KEY = "keys/outside-audit.pub"
MIRROR_SUFFIX = "-outside-mirror"


@dataclass(frozen=True)
class LogLocation:
    """One audit log: which side wrote it, where it is, and the key that verifies it."""

    side: str  # "outside" or "inside" (the side that wrote the log)
    directory: Path
    key: str | None = None  # public key: inline "ferry-pk:..." or a file path; None if unknown
    mirror: bool = False  # the inside's copy of the outside's log
    origin: str | None = None  # the log's expected name (its origin), if known

    def public_key(self) -> PublicKey | None:
        """The verifying key, or None when none is known (raises KeyFileError if unreadable)."""
        return load_public_key(self.key) if self.key else None

    def describe(self) -> str:
        what = "outside log (mirror held inside)" if self.mirror else f"{self.side} log"
        return f"{what} {self.directory}"


@dataclass(frozen=True)
class Locations:
    """The logs an auditor can reach from one agent config (or from explicit paths)."""

    outside: LogLocation | None
    inside: LogLocation | None
    config: Path | None = None
    role: str | None = None

    def logs(self) -> list[LogLocation]:
        return [loc for loc in (self.outside, self.inside) if loc is not None]


def _public_of(secret: Path) -> Path:
    return secret.with_suffix(".pub")


def _key(value: str, base: Path) -> str:
    """An inline key as is; a key file resolved against ``base``. A file the config names
    that is not there is an error when the log is checked (KeyFileError), not a log read
    unverified: a key deleted or a path mistyped must not turn verification off."""
    if value.startswith(PUBLIC_PREFIX + ":"):
        return value
    path = Path(value)
    return str(path if path.is_absolute() else base / path)


def read_config(config: Path) -> dict[str, Any]:
    """The top-level mapping of an agent config (raises ConfigError)."""
    try:
        with config.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{config}: cannot read: {exc.strerror}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{config}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{config}: not a YAML mapping")
    return doc


def _text(section: dict[str, Any], key: str, default: str, config: Path) -> str:
    value = section.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{config}: audit.{key} must be a non-empty string")
    return value


def locate(config: Path) -> Locations:
    """The audit logs named by the agent config ``config`` (raises ConfigError)."""
    config = Path(config)
    doc = read_config(config)
    role = doc.get("role")
    if role not in ("outside", "inside"):
        raise ConfigError(f"{config}: role must be outside or inside (an agent config)")
    section = doc.get("audit") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{config}: audit must be a mapping")
    base = config.resolve().parent
    own_dir = base / _text(section, "dir", DEFAULT_DIR, config)
    secret = Path(_text(section, "key", DEFAULT_KEY, config))
    own_key = _key(str(_public_of(secret)), base)
    origin = section.get("origin")
    if origin is not None and (not isinstance(origin, str) or not origin):
        raise ConfigError(f"{config}: audit.origin must be a non-empty string")
    own = LogLocation(role, own_dir, own_key, origin=origin)
    if role == "outside":
        return Locations(outside=own, inside=None, config=config, role=role)
    mirror_dir = (
        base / _text(section, "mirror_dir", "", config)
        if "mirror_dir" in section
        else own_dir.with_name(own_dir.name + MIRROR_SUFFIX)
    )
    peer = _text(section, "peer_public_key", DEFAULT_PEER_PUBLIC_KEY, config)
    mirror = (
        LogLocation("outside", mirror_dir, _key(peer, base), mirror=True)
        if "mirror_dir" in section or mirror_dir.is_dir()
        else None
    )
    return Locations(outside=mirror, inside=own, config=config, role=role)


def resolve(
    config: str | None,
    outside: str | None,
    inside: str | None,
    outside_key: str | None,
    inside_key: str | None,
    *,
    outside_origin: str | None = None,
    inside_origin: str | None = None,
) -> Locations:
    """Locations from ``-c CONFIG`` and/or explicit ``--outside/--inside`` (+ keys).

    Explicit paths, keys and origins override what the config names. Raises
    :class:`ferry.errors.UsageError` when no log is given at all.
    """
    found = locate(Path(config)) if config else Locations(None, None)
    out = found.outside
    ins = found.inside
    if outside is not None:
        out = LogLocation("outside", Path(outside), out.key if out else None,
                          origin=out.origin if out else None)  # fmt: skip
    if inside is not None:
        ins = LogLocation("inside", Path(inside), ins.key if ins else None,
                          origin=ins.origin if ins else None)  # fmt: skip
    if outside_key is not None:
        if out is None:
            raise UsageError("--outside-key without an outside log")
        out = LogLocation(out.side, out.directory, outside_key, out.mirror, out.origin)
    if inside_key is not None:
        if ins is None:
            raise UsageError("--inside-key without an inside log")
        ins = LogLocation(ins.side, ins.directory, inside_key, ins.mirror, ins.origin)
    if outside_origin is not None:
        if out is None:
            raise UsageError("--outside-origin without an outside log")
        out = LogLocation(out.side, out.directory, out.key, out.mirror, outside_origin)
    if inside_origin is not None:
        if ins is None:
            raise UsageError("--inside-origin without an inside log")
        ins = LogLocation(ins.side, ins.directory, ins.key, ins.mirror, inside_origin)
    if out is None and ins is None:
        raise UsageError("no audit log: give -c CONFIG, or --outside DIR and/or --inside DIR")
    return Locations(out, ins, found.config, found.role)

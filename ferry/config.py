"""Load an agent's YAML config: parse with line numbers, validate, build frozen dataclasses.

Three steps, each failing with :class:`~ferry.errors.ConfigError` as
``FILE:LINE: message naming the key``:

1. Read at most :data:`MAX_CONFIG_BYTES` of UTF-8 and parse it with a
   ``yaml.SafeLoader`` that refuses anchors/aliases and deep nesting. The node
   tree is walked by hand so that every key's line is known and duplicate keys
   are refused (plain YAML keeps the last one silently).
2. Validate against the packaged JSON Schema (``ferry/schemas/*.json``, Draft
   2020-12, ``additionalProperties: false`` everywhere).
3. Convert to :mod:`ferry.config_types` values: relative paths are resolved
   against the config file's folder, size and rate suffixes are parsed, and the
   checks a schema cannot express are made (unique channel names, folders that
   must not overlap, ``down_after > degraded_after``, inline public keys).
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, ValidationError, validators
from yaml.composer import ComposerError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ferry.config_types import (
    MAX_MESSAGE_SIZE,
    ApiClient,
    ApiParams,
    AuditParams,
    ConsumerParams,
    FecParams,
    InsideChannel,
    InsideConfig,
    LinkParams,
    OutsideChannel,
    OutsideConfig,
    PreviousServerKey,
    Repeat,
    SerialEndpoint,
    UdpEndpoint,
)
from ferry.content.base import Policy
from ferry.content.policy import policy_from_config
from ferry.crypto.keys import PUBLIC_PREFIX, Alg, PublicKey
from ferry.errors import ConfigError, KeyFileError

__all__ = [
    "MAX_CONFIG_BYTES",
    "ClientConfig",
    "load_allowlist_entry",
    "load_client_config",
    "load_config",
    "load_inside_config",
    "load_outside_config",
]

# A config is a few kB; anything near a megabyte is a mistake (or an attempt to exhaust memory).
MAX_CONFIG_BYTES = 1024 * 1024
# The deepest real config is 4 levels (link.fec.source); leave room, stop recursion bombs early.
MAX_DEPTH = 16
# Report at most this many schema errors at once; the first few are the useful ones.
MAX_REPORTED_ERRORS = 10
# zfec encodes at most 256 shares; ferry keeps one value free (GF(2^8) has 255 non-zero points).
MAX_ZFEC_SYMBOLS = 255

OUTSIDE_SCHEMA = "outside-config.schema.json"
INSIDE_SCHEMA = "inside-config.schema.json"
ALLOWLIST_SCHEMA = "allowlist-entry.schema.json"
CLIENT_SCHEMA = "client-config.schema.json"

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]+)?)([kKMGT]?)")
_RATE_UNITS = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9}
_SIZE_UNITS = {"": 1, "k": 2**10, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_TYPE_NAMES = {"integer": "an integer", "number": "a number", "string": "a string"}
_TYPE_NAMES |= {"object": "a mapping", "array": "a list", "boolean": "true or false"}

KeyPath = tuple[str | int, ...]


def dotted(path: KeyPath) -> str:
    """``('channels', 0, 'name')`` -> ``channels[0].name``; ``()`` -> ``top level``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "top level"


def _where(path: KeyPath) -> str:
    return f"in {dotted(path)}" if path else "at top level"


def _show(value: Any) -> str:
    """A value as the operator wrote it in YAML, briefly."""
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, dict | list):
        return "a mapping" if isinstance(value, dict) else "a list"
    if value is None or isinstance(value, bool):
        return {True: "true", False: "false", None: "nothing (null)"}[value]
    return str(value)


# --- step 1: YAML with line numbers ------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """A SafeLoader that refuses anchors, aliases and deep nesting while composing."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        self.check_event()  # parses the next event into current_event without consuming it
        event: yaml.Event = self.current_event
        mark = event.start_mark if isinstance(event.start_mark, yaml.Mark) else None
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise ComposerError(None, None, "anchors and aliases (&x, *x) are not allowed", mark)
        if self._depth >= MAX_DEPTH:
            raise ComposerError(None, None, f"nesting deeper than {MAX_DEPTH} levels", mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


@dataclass
class _Doc:
    """A parsed config: plain data plus the line of every key and value."""

    file: str
    base: Path
    data: dict[str, Any] = field(default_factory=dict)
    key_lines: dict[KeyPath, int] = field(default_factory=dict)
    value_lines: dict[KeyPath, int] = field(default_factory=dict)

    def line(self, path: KeyPath) -> int:
        """Line of the key at ``path`` (or of its value, or of the nearest parent)."""
        while path:
            found = self.key_lines.get(path) or self.value_lines.get(path)
            if found:
                return found
            path = path[:-1]
        return 1

    def error(self, path: KeyPath, message: str, line: int | None = None) -> ConfigError:
        return ConfigError(f"{self.file}:{line or self.line(path)}: {message}")

    def path(self, value: str) -> Path:
        """``value`` made absolute against the config's folder (lexically normalised)."""
        return Path(os.path.normpath(self.base / value))


def _read_text(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except IsADirectoryError as exc:
        raise ConfigError(f"{path}:1: is a folder, not a config file") from exc
    except OSError as exc:
        raise ConfigError(f"{path}:1: cannot read config: {exc.strerror}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}:1: config is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from exc


def _parse(path: Path, text: str) -> _Doc:
    doc = _Doc(file=str(path), base=Path(os.path.abspath(path)).parent)
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # checks every character is printable: may raise ReaderError
        root = loader.get_single_node()
        if root is None:
            raise doc.error((), "config is empty; expected a mapping of keys (version, role, ...)")
        if not isinstance(root, MappingNode):
            kind = "a list" if isinstance(root, SequenceNode) else f"the value {root.value!r}"
            line = root.start_mark.line + 1
            raise doc.error((), f"top level must be a mapping of keys, not {kind}", line)
        doc.data = _build(doc, loader, root, ())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigError(f"{path}:{line}: YAML error: {problem}") from exc
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        char = exc.character  # a str or, depending on the input type, its code point
        code = char if isinstance(char, int) else ord(char)
        raise ConfigError(
            f"{path}:{line}: YAML error: character #x{code:04x} is not allowed"
        ) from exc
    except yaml.YAMLError as exc:  # pragma: no cover - every PyYAML error is one of the above
        raise ConfigError(f"{path}:1: YAML error: {exc}") from exc
    finally:
        if loader is not None:
            loader.dispose()
    return doc


def _build(doc: _Doc, loader: _Loader, node: Node, path: KeyPath) -> Any:
    line = node.start_mark.line + 1
    doc.value_lines[path] = line
    if isinstance(node, MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                raise doc.error(path, f"merge keys (<<) are not allowed {_where(path)}", key_line)
            if not isinstance(key_node, ScalarNode) or key_node.tag != _STR_TAG:
                shown = repr(key_node.value) if isinstance(key_node, ScalarNode) else "a list/map"
                raise doc.error(path, f"key {shown} {_where(path)} is not a string", key_line)
            key: str = key_node.value
            if key in out:
                first = doc.key_lines[(*path, key)]
                raise doc.error(
                    path, f"duplicate key {key!r} {_where(path)} (first at line {first})", key_line
                )
            doc.key_lines[(*path, key)] = key_line
            out[key] = _build(doc, loader, value_node, (*path, key))
        return out
    if isinstance(node, SequenceNode):
        return [_build(doc, loader, item, (*path, i)) for i, item in enumerate(node.value)]
    try:
        value = loader.construct_object(node, deep=True)
    except (ValueError, OverflowError) as exc:  # e.g. an integer of 5000 digits
        raise doc.error(path, f"{dotted(path)}: cannot read this value (too long?)", line) from exc
    if isinstance(value, float) and not math.isfinite(value):
        raise doc.error(path, f"{dotted(path)}: expected a finite number, got {value}")
    return value


# --- step 2: schema validation -----------------------------------------------------------


def load_schema(name: str) -> dict[str, Any]:
    """The packaged JSON Schema ``name`` (found through importlib.resources)."""
    text = resources.files("ferry").joinpath("schemas").joinpath(name).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


# JSON Schema counts 4.0 as an integer; ferry wants 4 (the link digest hashes the JSON form).
_Validator = validators.extend(  # type: ignore[no-untyped-call]  # untyped in types-jsonschema
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool)
    ),
)


@functools.cache
def _validator(name: str) -> Draft202012Validator:
    validator: Draft202012Validator = _Validator(load_schema(name))
    return validator


def _validate(doc: _Doc, schema_name: str) -> None:
    validator = _validator(schema_name)
    found: dict[str, int] = {}
    for error in validator.iter_errors(doc.data):
        for line, message in _describe(doc, error):
            found.setdefault(f"{doc.file}:{line}: {message}", line)
    if found:
        ordered = sorted(found, key=lambda m: found[m])
        raise ConfigError("\n".join(ordered[:MAX_REPORTED_ERRORS]))


def _describe(doc: _Doc, error: ValidationError) -> list[tuple[int, str]]:
    """One or more (line, message) for a schema error, in words an operator can act on."""
    path: KeyPath = tuple(error.absolute_path)
    kind = error.validator
    schema: Any = error.schema if isinstance(error.schema, dict) else {}
    value: Any = error.instance  # jsonschema types it as "Any | Unset"; it is set on every error
    wanted: Any = error.validator_value
    name = dotted(path)
    if kind == "additionalProperties":
        valid = ", ".join(schema.get("properties", {}))
        unknown = [key for key in value if key not in schema.get("properties", {})]
        where = f"{_where(path)} (valid: {valid})"
        return [(doc.line((*path, k)), f"unknown key {k!r} {where}") for k in unknown]
    if kind == "required":
        missing = ", ".join(repr(k) for k in wanted if k not in value)
        return [(doc.line(path), f"missing required key {missing} {_where(path)}")]
    if kind == "type":
        expected = " or ".join(_TYPE_NAMES.get(t, t) for t in _as_list(wanted))
        return [(doc.line(path), f"{name}: expected {expected}, got {_show(value)}")]
    if kind in {"enum", "const"}:
        choices = ", ".join(_show(c) for c in _as_list(wanted))
        return [(doc.line(path), f"{name}: expected {choices}, got {_show(value)}")]
    if kind in {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}:
        return [(doc.line(path), f"{name}: expected {_range(schema)}, got {_show(value)}")]
    if kind in {"minItems", "maxItems"}:
        expected = "at least" if kind == "minItems" else "at most"
        entries = "entry" if wanted == 1 else "entries"
        return [(doc.line(path), f"{name}: expected {expected} {wanted} {entries}")]
    if kind == "minLength":
        return [(doc.line(path), f"{name}: must not be empty")]
    description = schema.get("description")
    if description:  # pattern, oneOf, maxLength on a described type
        return [(doc.line(path), f"{name}: expected {description}, got {_show(value)}")]
    return [(doc.line(path), f"{name}: {error.message}")]


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _range(schema: dict[str, Any]) -> str:
    kind = "an integer" if schema.get("type") == "integer" else "a number"
    if "minimum" in schema and "maximum" in schema:
        return f"{kind} from {schema['minimum']} to {schema['maximum']}"
    bounds = [f"> {schema['exclusiveMinimum']}"] if "exclusiveMinimum" in schema else []
    bounds += [f">= {schema['minimum']}"] if "minimum" in schema else []
    bounds += [f"<= {schema['maximum']}"] if "maximum" in schema else []
    return f"{kind} {' and '.join(bounds)}"


# --- step 3: conversion to frozen dataclasses --------------------------------------------


def _quantity(doc: _Doc, path: KeyPath, value: int | str, units: dict[str, int]) -> int:
    """An integer from ``123``, ``'800M'`` or ``'1.5G'`` (the unit table says which powers)."""
    if isinstance(value, int):
        return value
    match = _QUANTITY.fullmatch(value)
    if match is None or match[2] not in units:
        raise doc.error(path, f"{dotted(path)}: cannot read {value!r} as a number with a suffix")
    amount = Decimal(match[1]) * units[match[2]]
    if amount != amount.to_integral_value():
        raise doc.error(path, f"{dotted(path)}: {value!r} is not a whole number")
    return int(amount)


def _size(doc: _Doc, path: KeyPath, value: int | str, low: int = 1) -> int:
    size = _quantity(doc, path, value, _SIZE_UNITS)
    if size < low:
        raise doc.error(path, f"{dotted(path)}: expected at least {low} bytes, got {value!r}")
    return size


def _link(doc: _Doc) -> tuple[LinkParams, UdpEndpoint, SerialEndpoint]:
    raw: dict[str, Any] = doc.data.get("link", {})
    fec = FecParams(**raw.get("fec", {}))
    if fec.codec == "zfec" and fec.source + fec.repair > MAX_ZFEC_SYMBOLS:
        raise doc.error(
            ("link", "fec", "repair"),
            f"link.fec: source + repair must be <= {MAX_ZFEC_SYMBOLS} with zfec, "
            f"got {fec.source} + {fec.repair}",
        )
    kw: dict[str, Any] = {k: v for k, v in raw.items() if k not in {"fec", "udp", "serial", "rate"}}
    for key in ("heartbeat_interval", "announce_interval", "rekey_interval"):
        if key in kw:
            kw[key] = float(kw[key])
    if "rate" in raw:
        rate = _quantity(doc, ("link", "rate"), raw["rate"], _RATE_UNITS)
        if not 1200 <= rate <= 10**12:
            raise doc.error(
                ("link", "rate"), f"link.rate: expected 1200 to 1T bits/s, got {raw['rate']!r}"
            )
        kw["rate_bps"] = rate
    udp_kw = dict(raw.get("udp", {}))
    if "rcvbuf" in udp_kw:
        udp_kw["rcvbuf"] = _size(doc, ("link", "udp", "rcvbuf"), udp_kw["rcvbuf"], low=4096)
    return LinkParams(fec=fec, **kw), UdpEndpoint(**udp_kw), SerialEndpoint(**raw.get("serial", {}))


def _public_key(doc: _Doc, path: KeyPath, value: str, algs: tuple[Alg, ...]) -> str:
    """An inline ``ferry-pk:`` string (checked now) or an absolute path to a key file."""
    if not value.startswith(PUBLIC_PREFIX + ":"):
        return str(doc.path(value))
    try:
        key = PublicKey.from_string(value)
    except KeyFileError as exc:
        raise doc.error(path, f"{dotted(path)}: {exc}") from exc
    if key.alg not in algs:
        raise doc.error(path, f"{dotted(path)}: a {key.alg} key, expected {' or '.join(algs)}")
    return key.to_string()


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _check_names(doc: _Doc) -> None:
    """Channel names are unique."""
    first_seen: dict[str, int] = {}
    for i, channel in enumerate(doc.data["channels"]):
        name = channel["name"]
        if name in first_seen:
            j = first_seen[name]
            raise doc.error(
                ("channels", i, "name"),
                f"channels[{i}].name: duplicate channel name {name!r} "
                f"(also channels[{j}], line {doc.line(('channels', j, 'name'))})",
            )
        first_seen[name] = i


def _check_folders(doc: _Doc, folder_key: str, folders: list[tuple[int, Path]]) -> None:
    """Channel folders (drop or deliver) are neither equal nor nested."""
    for n, (i, folder) in enumerate(folders):
        for j, other in folders[:n]:
            if _within(folder, other) or _within(other, folder):
                raise doc.error(
                    ("channels", i, folder_key),
                    f"channels[{i}].{folder_key}: {folder} overlaps channels[{j}] "
                    f"({other}); each channel needs its own folder",
                )


def _check_state_dir(doc: _Doc, state_dir: Path, folders: list[Path]) -> None:
    for folder in (f for f in folders if _within(state_dir, f) or _within(f, state_dir)):
        raise doc.error(("state_dir",), f"state_dir: {state_dir} overlaps channel folder {folder}")


def _repeat(raw: dict[str, Any]) -> Repeat:
    if "repeat" not in raw:
        return Repeat()
    return Repeat(int(raw["repeat"]["count"]), float(raw["repeat"].get("spread", 0.0)))


def _content(doc: _Doc, path: KeyPath, raw: dict[str, Any]) -> Policy:
    """A files channel's ``content:`` policy (XSD paths resolved against the config)."""
    raw = dict(raw)
    if "xml_schemas" in raw:
        raw["xml_schemas"] = [str(doc.path(p)) for p in raw["xml_schemas"]]
    try:
        return policy_from_config(raw, dotted(path))
    except ConfigError as exc:
        raise doc.error(path, str(exc)) from None


def _outside_channel(doc: _Doc, i: int, raw: dict[str, Any]) -> OutsideChannel:
    where: KeyPath = ("channels", i)
    kind = raw.get("kind", "files")
    kw: dict[str, Any] = {"kind": kind, "repeat": _repeat(raw)}
    for key in ("after_send", "subfolders", "max_items_per_minute", "priority"):
        if key in raw:
            kw[key] = raw[key]
    for key in ("settle_seconds", "rescan_seconds"):
        if key in raw:
            kw[key] = float(raw[key])
    for key in ("max_size", "max_message_size"):
        if key in raw:
            kw[key] = _size(doc, (*where, key), raw[key])
    _check_message_limit(doc, (*where, "max_message_size"), f"channels[{i}]", kw)
    if "allowed_types" in raw:
        kw["allowed_types"] = tuple(raw["allowed_types"])
    if "schemas" in raw:
        kw["schemas"] = tuple(raw["schemas"])
    if "content" in raw:
        if kind == "messages":
            raise doc.error((*where, "content"), f"channels[{i}].content: only for files channels")
        kw["content"] = _content(doc, (*where, "content"), raw["content"])
    if kind == "messages":
        folder_keys = ("drop", "sent", "quarantine", "subfolders", "after_send")
        for key in (*folder_keys, "settle_seconds", "rescan_seconds"):
            if key in raw:
                raise doc.error(
                    (*where, key),
                    f"channels[{i}].{key}: a messages channel has no folders; "
                    "messages come through the API",
                )
        if not kw.get("schemas"):
            raise doc.error(
                where, f"channels[{i}]: a messages channel needs 'schemas' (at least one)"
            )
        kw.setdefault("priority", 0)
        return OutsideChannel(name=raw["name"], drop=None, sent=None, **kw)
    if "drop" not in raw:
        raise doc.error(where, f"missing required key 'drop' in channels[{i}] (a files channel)")
    if "schemas" in raw:
        raise doc.error((*where, "schemas"), f"channels[{i}].schemas: only for messages channels")
    drop = doc.path(raw["drop"])
    sent = doc.path(raw["sent"]) if "sent" in raw else drop.parent / "sent" / raw["name"]
    quarantine = (
        doc.path(raw["quarantine"])
        if "quarantine" in raw
        else drop.parent / "quarantine" / raw["name"]
    )
    return OutsideChannel(name=raw["name"], drop=drop, sent=sent, quarantine=quarantine, **kw)


def _api(doc: _Doc) -> ApiParams | None:
    raw = doc.data.get("api")
    if raw is None:
        return None
    kw: dict[str, Any] = {
        "endpoint": raw["endpoint"],
        "server_key": doc.path(raw["server_key"]),
        "clients": doc.path(raw["clients"]),
    }
    for key in ("upload_window", "busy_items", "max_connections", "max_connections_per_address"):
        if key in raw:
            kw[key] = raw[key]
    for key in ("max_message_size", "chunk_size", "busy_bytes"):
        if key in raw:
            kw[key] = _size(doc, ("api", key), raw[key])
    _check_message_limit(doc, ("api", "max_message_size"), "api", kw)
    kw["previous_server_keys"] = _previous_server_keys(
        doc, "api", kw["server_key"], {"endpoint": kw["endpoint"]}
    )
    return ApiParams(**kw)


def _previous_server_keys(
    doc: _Doc, section: str, current: Path, endpoints: dict[str, str | None]
) -> tuple[PreviousServerKey, ...]:
    """``<section>.previous_server_keys``: each an earlier key file (not the current one, not
    twice) on endpoints of its own, of a kind the section serves (``endpoints``: kind ->
    the current endpoint, None if the section has none of that kind)."""
    out: list[PreviousServerKey] = []
    keys = {current}
    taken = {e for e in endpoints.values() if e is not None}
    for i, raw in enumerate(doc.data[section].get("previous_server_keys", ())):
        where: KeyPath = (section, "previous_server_keys", i)
        key = doc.path(raw["key"])
        if key in keys:
            what = "the current server_key" if key == current else "an earlier entry"
            raise doc.error((*where, "key"), f"{dotted(where)}.key: the same file as {what}")
        keys.add(key)
        for kind, current_endpoint in endpoints.items():
            endpoint = raw.get(kind)
            if endpoint is None:
                continue
            if current_endpoint is None:
                raise doc.error(
                    (*where, kind), f"{dotted(where)}.{kind}: {section} has no {kind} of its own"
                )
            if endpoint in taken:
                raise doc.error(
                    (*where, kind),
                    f"{dotted(where)}.{kind}: {endpoint} is already in use; an earlier key "
                    "keeps the endpoint its clients know, the current key gets a new one",
                )
            taken.add(endpoint)
        if not any(raw.get(kind) for kind in endpoints):
            raise doc.error(where, f"{dotted(where)}: needs {' or '.join(map(repr, endpoints))}")
        out.append(PreviousServerKey(key, raw.get("endpoint"), raw.get("publish")))
    return tuple(out)


def _check_message_limit(doc: _Doc, path: KeyPath, where: str, kw: dict[str, Any]) -> None:
    if kw.get("max_message_size", 0) > MAX_MESSAGE_SIZE:
        raise doc.error(
            path,
            f"{where}.max_message_size: at most {MAX_MESSAGE_SIZE // 2**20} MiB "
            "(a message is held in memory and crosses in one bundle)",
        )


def _audit(doc: _Doc, side: str) -> AuditParams | None:
    raw = doc.data.get("audit")
    if raw is None:
        return None
    kw: dict[str, Any] = {"dir": doc.path(raw["dir"]), "key": doc.path(raw["key"])}
    for key in ("origin", "checkpoint_every", "mirror", "siem"):
        if key in raw:
            kw[key] = raw[key]
    if "checkpoint_interval" in raw:
        kw["checkpoint_interval"] = float(raw["checkpoint_interval"])
    if side == "inside":
        kw["mirror_dir"] = doc.path(raw["mirror_dir"]) if "mirror_dir" in raw else None
        if "peer_public_key" in raw:
            kw["peer_public_key"] = _public_key(
                doc, ("audit", "peer_public_key"), raw["peer_public_key"], ("ed25519",)
            )
        if (kw["mirror_dir"] is None) != (kw.get("peer_public_key") is None):
            raise doc.error(
                ("audit",), "audit: mirror_dir and peer_public_key go together (both or neither)"
            )
        earlier = raw.get("previous_peer_public_keys", ())
        if earlier and "peer_public_key" not in raw:
            raise doc.error(
                ("audit", "previous_peer_public_keys"),
                "audit.previous_peer_public_keys: needs audit.peer_public_key (the current key)",
            )
        seen = {kw.get("peer_public_key")}
        peers: list[str] = []
        for i, value in enumerate(earlier):
            where: KeyPath = ("audit", "previous_peer_public_keys", i)
            peer = _public_key(doc, where, value, ("ed25519",))
            if peer in seen:
                raise doc.error(where, f"{dotted(where)}: the same key as an earlier one")
            seen.add(peer)
            peers.append(peer)
        kw["previous_peer_public_keys"] = tuple(peers)
    previous: list[Path] = []
    for i, value in enumerate(raw.get("previous_keys", ())):
        where = ("audit", "previous_keys", i)
        path = doc.path(value)
        if path == kw["key"] or path in previous:
            what = "audit.key" if path == kw["key"] else "an earlier entry"
            raise doc.error(where, f"{dotted(where)}: the same file as {what}")
        previous.append(path)
    kw["previous_keys"] = tuple(previous)
    return AuditParams(**kw)


def _outside(doc: _Doc) -> OutsideConfig:
    link, udp, serial = _link(doc)
    channels = [_outside_channel(doc, i, raw) for i, raw in enumerate(doc.data["channels"])]
    folder_channels = [(i, c) for i, c in enumerate(channels) if c.drop is not None]
    _check_names(doc)
    _check_folders(doc, "drop", [(i, c.drop) for i, c in folder_channels if c.drop])
    drops = [c.drop for _, c in folder_channels if c.drop is not None]
    others: list[Path] = []
    for i, channel in folder_channels:
        for key, folder in (("sent", channel.sent), ("quarantine", channel.quarantine)):
            if folder is None:
                continue
            others.append(folder)
            for drop in drops:
                if _within(folder, drop) or _within(drop, folder):
                    raise doc.error(
                        ("channels", i, key),
                        f"channels[{i}].{key}: {folder} overlaps drop folder {drop} "
                        "(its files would be taken again)",
                    )
    state_dir = doc.path(doc.data["state_dir"])
    _check_state_dir(doc, state_dir, drops + others)
    keys = doc.data["keys"]
    tuning: dict[str, Any] = {
        k: float(v) for k, v in doc.data.get("outside", {}).items() if k != "spool_reserve"
    }
    if "spool_reserve" in doc.data.get("outside", {}):
        where: KeyPath = ("outside", "spool_reserve")
        tuning["spool_reserve"] = _size(doc, where, doc.data["outside"]["spool_reserve"])
    api = _api(doc)
    if api is None and any(c.kind == "messages" for c in channels):
        raise doc.error(("channels",), "a messages channel needs the 'api' section")
    return OutsideConfig(
        source=Path(os.path.abspath(doc.file)),
        state_dir=state_dir,
        signing_key=doc.path(keys["signing_key"]),
        inside_public_key=_public_key(
            doc, ("keys", "inside_public_key"), keys["inside_public_key"], (link.kem,)
        ),
        link=link,
        udp=udp,
        serial=serial,
        channels=tuple(channels),
        api=api,
        audit=_audit(doc, "outside"),
        **tuning,
    )


def _inside_channel(doc: _Doc, i: int, raw: dict[str, Any]) -> InsideChannel:
    where: KeyPath = ("channels", i)
    kind = raw.get("kind", "files")
    deliver = doc.path(raw["deliver"]) if "deliver" in raw else None
    kw: dict[str, Any] = {"kind": kind}
    for key in ("subfolders", "consumers", "recheck"):
        if key in raw:
            kw[key] = raw[key]
    if "schemas" in raw:
        kw["schemas"] = tuple(raw["schemas"])
    if kind == "files":
        if deliver is None:
            raise doc.error(
                where, f"missing required key 'deliver' in channels[{i}] (a files channel)"
            )
        for key in ("schemas", "consumers"):
            if key in raw:
                raise doc.error((*where, key), f"channels[{i}].{key}: only for messages channels")
    else:
        if not kw.get("schemas"):
            raise doc.error(
                where, f"channels[{i}]: a messages channel needs 'schemas' (at least one)"
            )
        for key in ("subfolders", "recheck"):
            if key in raw:
                raise doc.error((*where, key), f"channels[{i}].{key}: files only")
        if deliver is None and not kw.get("consumers", True):
            raise doc.error(
                where, f"channels[{i}]: messages need a 'deliver' folder or consumers (or both)"
            )
    return InsideChannel(name=raw["name"], deliver=deliver, **kw)


def _consumers(doc: _Doc, channels: tuple[InsideChannel, ...]) -> ConsumerParams:
    raw = doc.data.get("consumers")
    wanted = any(c.kind == "messages" and c.consumers for c in channels)
    if raw is None:
        if wanted:
            raise doc.error(
                ("channels",),
                "a messages channel with consumers needs the 'consumers' section "
                "(or set consumers: false on the channel)",
            )
        return ConsumerParams()
    if "endpoint" not in raw and "publish" not in raw:
        raise doc.error(("consumers",), "consumers: needs 'endpoint', 'publish' or both")
    kw: dict[str, Any] = {
        "endpoint": raw.get("endpoint"),
        "publish": raw.get("publish"),
        "server_key": doc.path(raw["server_key"]),
        "clients": doc.path(raw["clients"]),
    }
    if "redeliver_after" in raw:
        kw["redeliver_after"] = float(raw["redeliver_after"])
    for key in ("max_connections", "max_connections_per_address"):
        if key in raw:
            kw[key] = raw[key]
    kw["previous_server_keys"] = _previous_server_keys(
        doc,
        "consumers",
        kw["server_key"],
        {"endpoint": kw["endpoint"], "publish": kw["publish"]},
    )
    return ConsumerParams(**kw)


def _inside(doc: _Doc) -> InsideConfig:
    link, udp, serial = _link(doc)
    channels = tuple(_inside_channel(doc, i, raw) for i, raw in enumerate(doc.data["channels"]))
    _check_names(doc)
    delivers = [(i, c.deliver) for i, c in enumerate(channels) if c.deliver is not None]
    _check_folders(doc, "deliver", delivers)
    state_dir = doc.path(doc.data["state_dir"])
    _check_state_dir(doc, state_dir, [d for _, d in delivers])
    keys = doc.data["keys"]
    sizes = ("max_object_size", "spool_reserve")
    tuning: dict[str, Any] = {
        k: float(v) for k, v in doc.data.get("inside", {}).items() if k not in sizes
    }
    for key in sizes:
        if key in doc.data.get("inside", {}):
            path: KeyPath = ("inside", key)
            tuning[key] = _size(doc, path, doc.data["inside"][key])
    config = InsideConfig(
        source=Path(os.path.abspath(doc.file)),
        state_dir=state_dir,
        kem_key=doc.path(keys["kem_key"]),
        outside_public_key=_public_key(
            doc, ("keys", "outside_public_key"), keys["outside_public_key"], ("ed25519",)
        ),
        previous_kem_keys=tuple(doc.path(p) for p in keys.get("previous_kem_keys", ())),
        previous_outside_public_keys=tuple(
            _public_key(doc, ("keys", "previous_outside_public_keys", i), v, ("ed25519",))
            for i, v in enumerate(keys.get("previous_outside_public_keys", ()))
        ),
        link=link,
        udp=udp,
        serial=serial,
        channels=channels,
        consumers=_consumers(doc, channels),
        audit=_audit(doc, "inside"),
        **tuning,
    )
    if config.down_after <= config.degraded_after:
        where = ("inside", "down_after") if "down_after" in tuning else ("inside", "degraded_after")
        raise doc.error(
            where,
            f"inside.down_after ({config.down_after}) must be greater than "
            f"inside.degraded_after ({config.degraded_after})",
        )
    return config


# --- entry points ------------------------------------------------------------------------


def _load(path: Path) -> _Doc:
    return _parse(Path(path), _read_text(Path(path)))


def load_outside_config(path: Path) -> OutsideConfig:
    """Load and validate the outside agent's config at ``path``."""
    doc = _load(path)
    _validate(doc, OUTSIDE_SCHEMA)
    return _outside(doc)


def load_inside_config(path: Path) -> InsideConfig:
    """Load and validate the inside agent's config at ``path``."""
    doc = _load(path)
    _validate(doc, INSIDE_SCHEMA)
    return _inside(doc)


def load_config(path: Path) -> OutsideConfig | InsideConfig:
    """Load either agent's config, choosing by its ``role`` key."""
    doc = _load(path)
    role = doc.data.get("role")
    if role == "outside":
        _validate(doc, OUTSIDE_SCHEMA)
        return _outside(doc)
    if role == "inside":
        _validate(doc, INSIDE_SCHEMA)
        return _inside(doc)
    if "role" not in doc.data:
        raise doc.error((), "missing required key 'role' at top level (outside or inside)")
    raise doc.error(("role",), f"role: expected 'outside' or 'inside', got {_show(role)}")


@dataclass(frozen=True)
class ClientConfig:
    """What ``ferry send`` (an API client) or an inner consumer needs to connect."""

    source: Path
    role: str
    name: str
    endpoint: str
    server_public_key: str
    client_key: Path
    timeout: float = 30.0


def load_client_config(path: Path) -> ClientConfig:
    """Load an API client's or consumer's config (``ferry init`` writes one of each)."""
    doc = _load(path)
    _validate(doc, CLIENT_SCHEMA)
    d = doc.data
    return ClientConfig(
        source=Path(os.path.abspath(doc.file)),
        role=d["role"],
        name=d["name"],
        endpoint=d["endpoint"],
        server_public_key=_public_key(
            doc, ("server_public_key",), d["server_public_key"], ("x25519",)
        ),
        client_key=doc.path(d["client_key"]),
        timeout=float(d.get("timeout", 30.0)),
    )


def load_allowlist_entry(path: Path) -> ApiClient:
    """Load one allow-list file (``<name>.yaml``): a client key and what it may use."""
    doc = _load(path)
    if isinstance(doc.data, dict) and isinstance(doc.data.get("expires"), datetime.date):
        # (written unquoted, YAML reads a date-time; without an offset, YAML means UTC)
        when = doc.data["expires"]
        if not isinstance(when, datetime.datetime):
            when = datetime.datetime.combine(when, datetime.time())
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        doc.data["expires"] = when.isoformat()
    _validate(doc, ALLOWLIST_SCHEMA)
    d = doc.data
    if Path(doc.file).stem != d["name"]:
        raise doc.error(("name",), f"name: {d['name']!r} differs from the file name")
    expires = None
    if "expires" in d:
        try:
            when = datetime.datetime.fromisoformat(d["expires"])
        except ValueError as exc:
            raise doc.error(("expires",), f"expires: not a valid date-time ({exc})") from exc
        expires = int(when.timestamp() * 1e6)  # (an offset is required: no local time)
    _public_key(doc, ("public_key",), d["public_key"], ("x25519",))
    if d.get("revoked", False):
        expires = 0
    kw: dict[str, Any] = {"rate": float(d["rate"])} if "rate" in d else {}
    return ApiClient(
        name=d["name"],
        public_key=d["public_key"],
        channels=tuple(d["channels"]),
        expires_us=expires,
        **kw,
    )

"""JSON files: strict I-JSON parsing, optional schema validation, canonical output.

Parsing is :func:`ferry.jsondoc.parse_strict` (no duplicate keys, no NaN/Infinity, bounded
depth, string and number sizes) with the channel's limits. A UTF-8 byte order mark and
UTF-16 with a byte order mark are accepted and converted; any other non-UTF-8 text is
MALFORMED. When the policy names message schemas, the document must satisfy one of them
(SCHEMA_INVALID otherwise, with the JSON path of the first problem).

Every string value is scanned, and so are strings that decode as base64 (attachments): the
canonical form escapes backslashes, so a signature would not be seen in the bytes alone.

Output: the RFC 8785 canonical form (sorted keys, no insignificant whitespace, one spelling
per number). A file already canonical is delivered byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from ferry import jsondoc
from ferry.content.base import Action, Context, FormatResult, Reject
from outside.content.formats.text import decode_text

_REASONS = {
    "TOO_LARGE": "LIMIT_EXCEEDED",
    "TOO_DEEP": "LIMIT_EXCEEDED",
    "STRING_TOO_LONG": "LIMIT_EXCEEDED",
    "NUMBER_TOO_LONG": "LIMIT_EXCEEDED",
    "TOO_MANY_MEMBERS": "LIMIT_EXCEEDED",
    "SCHEMA_INVALID": "SCHEMA_INVALID",
    "UNKNOWN_SCHEMA": "SCHEMA_INVALID",
    "NOT_AN_OBJECT": "SCHEMA_INVALID",
}
# Strings that may be base64 attachments: long enough to matter, only base64 characters.
BASE64_MIN = 64
_BASE64 = re.compile(r"[A-Za-z0-9+/_=\-\s]+")
# Scanned text is sent to YARA in pieces of at most this many bytes.
SCAN_CHUNK = 8 * 1024 * 1024


@lru_cache(maxsize=1)
def _registry() -> jsondoc.SchemaRegistry:
    return jsondoc.SchemaRegistry.load()


def limits_for(ctx: Context) -> jsondoc.JsonLimits:
    size = ctx.policy.limits.structured_bytes
    return jsondoc.JsonLimits(
        max_bytes=size,
        max_depth=min(ctx.policy.limits.json_depth, jsondoc.MAX_DEPTH_LIMIT),
        max_string_bytes=size,
        max_members=1_000_000,
        max_nodes=5_000_000,
    )


def _rejected(exc: jsondoc.MessageRejected) -> Reject:
    code = _REASONS.get(exc.reason_code, "MALFORMED")
    text = str(exc)
    prefix = f"{exc.reason_code}: "
    return Reject(code, text[len(prefix) :] if text.startswith(prefix) else text)


def _strings(value: Any) -> Iterator[str]:
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def decoded_base64(text: str) -> bytes | None:
    """The bytes of a string that is base64 (standard or URL-safe), else None."""
    if len(text) < BASE64_MIN or not _BASE64.fullmatch(text):
        return None
    compact = "".join(text.split())
    try:
        if "-" in compact or "_" in compact:
            return base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def scan_strings(strings: Iterator[str], ctx: Context, where: str) -> None:
    """Scan the text of ``strings`` (joined in bounded pieces) and any base64 among them."""
    piece: list[bytes] = []
    size = 0
    for s in strings:
        raw = s.encode("utf-8", "surrogatepass")
        piece.append(raw)
        size += len(raw) + 1
        blob = decoded_base64(s)
        if blob is not None:
            ctx.scan(blob, f"{where} (base64 value)")
        if size >= SCAN_CHUNK:
            ctx.scan(b"\n".join(piece), where)
            piece, size = [], 0
    if piece:
        ctx.scan(b"\n".join(piece), where)


def _has_big_integers(value: Any) -> bool:
    stack = [value]
    while stack:
        node = stack.pop()
        if type(node) is int and not -jsondoc.MAX_SAFE_INTEGER <= node <= jsondoc.MAX_SAFE_INTEGER:
            return True
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def sanitize(src: Path, dst: Path, ctx: Context) -> FormatResult:
    limits = limits_for(ctx)
    if src.stat().st_size > limits.max_bytes:
        raise Reject("LIMIT_EXCEEDED", f"JSON file larger than {limits.max_bytes} bytes")
    data = src.read_bytes()
    actions: list[Action] = []
    if data.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")):
        decoded = decode_text(data, allow_gb18030=False)
        data = decoded.text.encode("utf-8")
        if decoded.encoding != "utf-8":
            actions.append(Action("converted", f"{decoded.encoding.upper()} to UTF-8"))
        actions.append(Action("removed", "byte order mark"))
    try:
        value = jsondoc.parse_strict(data, limits)
    except jsondoc.MessageRejected as exc:
        raise _rejected(exc) from None
    schema = _validate(value, ctx)
    scan_strings(_strings(value), ctx, "JSON strings")
    try:
        canon = jsondoc.canonical(value)
    except (ValueError, TypeError) as exc:  # e.g. an integer beyond what a double holds
        raise Reject("MALFORMED", f"no canonical form: {exc}") from None
    info: dict[str, Any] = {"schema": schema, "bytes_canonical": len(canon)}
    if _has_big_integers(value):
        # RFC 8785 writes numbers as doubles: an integer beyond 2**53 would change. Keep the
        # (strictly parsed) text instead of losing digits.
        info["canonical"] = False
        if not actions:
            return FormatResult("json", cleaned=False, info=info)
        dst.write_bytes(data)
        return FormatResult("json", cleaned=True, actions=actions, info=info)
    if canon == data and not actions:
        return FormatResult("json", cleaned=False, info=info)
    if canon != data:
        actions.append(Action("normalised", "canonical JSON (RFC 8785)"))
    dst.write_bytes(canon)
    return FormatResult("json", cleaned=True, actions=actions, info=info)


def _validate(value: Any, ctx: Context) -> str | None:
    names = ctx.policy.schemas
    if not names:
        return None
    if type(value) is not dict:
        raise Reject("SCHEMA_INVALID", "$: expected a JSON object")
    registry = _registry()
    first: jsondoc.MessageRejected | None = None
    for name in names:
        try:
            registry.validate(name, value)
        except jsondoc.MessageRejected as exc:
            first = first or exc
            continue
        return name
    assert first is not None
    raise _rejected(first)

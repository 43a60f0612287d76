"""Strict JSON for untrusted messages: parse, canonical bytes (RFC 8785) and schema checks.

- :func:`parse_strict` accepts only I-JSON (RFC 7493) within :class:`JsonLimits`: size, BOM and
  UTF-8 are checked first, nesting depth is counted on the bytes (no recursion), then the stdlib
  C scanner parses with hooks that refuse duplicate keys, NaN/Infinity and over-long numbers.
  When ``orjson`` is installed it parses first; its result is used only where cheap byte counts
  prove that the stdlib parser would return the same value, otherwise the stdlib parser decides.
  Every refusal comes from the stdlib parser, so reason codes do not depend on the engine.
- :func:`canonical` writes the JSON Canonicalization Scheme (RFC 8785) bytes of a value.
- :class:`SchemaRegistry` loads Draft 2020-12 message schemas (``schemas/messages``) and compiles
  each into one Python function (jsonschema is about 30 times slower). Only the keywords in
  ``_KEYWORDS`` are supported, every subschema declares one ``type``, objects are closed and
  arrays have ``items``; anything else is refused at load, so nothing is silently ignored.
  ``format`` is always asserted, patterns follow ECMA-262 (``$`` is the end, ``\\d`` is ASCII).
  Generated code adds shortcuts (a format's common case as one groupless regex, a run of one
  ASCII class as ``str`` calls, an object's members counted instead of compared as sets) that
  only accept what the plain test accepts; the tests check that both compilations agree.
  jsonschema stays the reference: it checks each schema against the meta-schema, and the tests
  cross-check the compiled validators against it.

On any input bytes the only exception these functions raise is :class:`MessageRejected`.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from pathlib import Path
from typing import Any, NamedTuple

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from ferry.errors import ConfigError, PolicyRejection, UsageError

__all__ = [
    "FORMATS",
    "REASONS",
    "JsonLimits",
    "MessageRejected",
    "SchemaRegistry",
    "canonical",
    "json_path",
    "parse_strict",
]

REASONS = (
    "TOO_LARGE", "INVALID_UTF8", "BOM", "MALFORMED_JSON", "DUPLICATE_KEY", "NON_FINITE_NUMBER",
    "TOO_DEEP", "STRING_TOO_LONG", "NUMBER_TOO_LONG", "TOO_MANY_MEMBERS", "NOT_AN_OBJECT",
    "UNKNOWN_SCHEMA", "SCHEMA_INVALID",
)  # fmt: skip

# The stdlib scanner and canonical() recurse once per nesting level; stay far below Python's
# recursion limit (1000) whatever limits a caller configures.
MAX_DEPTH_LIMIT = 256
# Python refuses int() of more than 4300 digits (CVE-2020-10735); stay below it.
MAX_NUMBER_CHARS_LIMIT = 4000
_FLOAT_MAX = int(sys.float_info.max)
# RFC 8785 numbers are IEEE doubles: integers beyond 2**53 are written as the nearest double.
MAX_SAFE_INTEGER = 2**53
# Error messages quote at most this many characters of an offending value or key.
MAX_SHOWN_CHARS = 60

_BOM = b"\xef\xbb\xbf"
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_NOT_ASTRAL_LEADS = bytes(range(0xF0)) + bytes(range(0xF5, 256))  # F0-F4 start U+10000 and up
_NOT_MARKS = bytes(sorted(set(range(256)) - set(b"[{:\\\xf0\xf1\xf2\xf3\xf4")))
_SURROGATE = re.compile("[\ud800-\udfff]")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PACKAGED = Path(__file__).resolve().parent / "schemas" / "messages"
_SCHEMA_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")


def _optional_orjson() -> Any:
    try:
        return importlib.import_module("orjson")
    except ImportError:  # pragma: no cover - the stdlib path is complete on its own
        return None


_ORJSON: Any = _optional_orjson()


@dataclass(frozen=True)
class JsonLimits:
    """Bounds for one untrusted document; every count is checked before it can cost much."""

    max_bytes: int = 1024 * 1024
    max_depth: int = 32  # nesting of objects/arrays
    max_string_bytes: int = 64 * 1024  # any string value or key, UTF-8 bytes
    max_number_chars: int = 40
    max_members: int = 10_000  # members of one object / items of one array
    max_nodes: int = 200_000  # total values

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_depth", "max_string_bytes", "max_members", "max_nodes"):
            if getattr(self, name) < 1:
                raise UsageError(f"JsonLimits.{name} must be at least 1")
        if self.max_depth > MAX_DEPTH_LIMIT:
            raise UsageError(f"JsonLimits.max_depth must be at most {MAX_DEPTH_LIMIT}")
        if not 1 <= self.max_number_chars <= MAX_NUMBER_CHARS_LIMIT:
            raise UsageError(f"JsonLimits.max_number_chars must be 1..{MAX_NUMBER_CHARS_LIMIT}")


class MessageRejected(PolicyRejection):
    """A message was refused. ``reason_code`` is one of :data:`REASONS`; ``json_path`` points at
    the offending value (``$.applicant.id_number``, ``$.attachments[2].sha256``; ``$`` for the
    whole document). The message starts with the path and says what was expected."""

    def __init__(self, reason_code: str, message: str, json_path: str = "$") -> None:
        if reason_code not in REASONS:
            raise ValueError(f"unknown reason code {reason_code!r}")
        super().__init__(reason_code, f"{json_path}: {message}")
        self.json_path = json_path
        self.message = message  # (what was wrong, without the code and the path)


# ----------------------------------------------------------------------------- paths, display
def json_path(parts: Iterable[str | int]) -> str:
    """``('attachments', 2, 'sha256')`` -> ``$.attachments[2].sha256``; odd keys as ``["k"]``."""
    out = ["$"]
    for part in parts:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif _IDENTIFIER.match(part):
            out.append(f".{part}")
        else:
            out.append(f"[{_show(part)}]")
    return "".join(out)


def _show(value: Any) -> str:
    """A short, printable JSON rendering of an untrusted value for messages and logs."""
    if isinstance(value, str) and len(value) > MAX_SHOWN_CHARS:
        text = json.dumps(value[:MAX_SHOWN_CHARS], ensure_ascii=False)[:-1] + '…"'
    elif isinstance(value, str | int | float | bool) or value is None:
        text = json.dumps(value, ensure_ascii=False)[: MAX_SHOWN_CHARS + 2]
    else:
        text = _describe(value)
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


def _describe(value: Any) -> str:
    words = {dict: "an object", list: "an array", str: "a string", bool: "true or false"}
    if type(value) in words:
        return words[type(value)]
    if value is None:
        return "null"
    if type(value) is int:
        return "an integer"
    return "a number" if type(value) is float else type(value).__name__


# ----------------------------------------------------------------------------- reference parser
class _Problem(Exception):
    """Raised by a decoder hook; the reason's path is found by :func:`_locate`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@lru_cache(maxsize=16)
def _strict_decoder(limits: JsonLimits) -> json.JSONDecoder:
    max_members, max_chars = limits.max_members, limits.max_number_chars

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            raise _Problem("DUPLICATE_KEY")
        if len(pairs) > max_members:
            raise _Problem("TOO_MANY_MEMBERS")
        return obj

    def number(text: str) -> float:
        if len(text) > max_chars:
            raise _Problem("NUMBER_TOO_LONG")
        value = float(text)
        if math.isinf(value):
            raise _Problem("NON_FINITE_NUMBER")
        return value

    def integer(text: str) -> int:
        if len(text) > max_chars:
            raise _Problem("NUMBER_TOO_LONG")
        value = int(text)
        if len(text) > 308 and abs(value) > _FLOAT_MAX:  # (as 1e309: no double holds it)
            raise _Problem("NON_FINITE_NUMBER")
        return value

    def constant(text: str) -> Any:
        raise _Problem("NON_FINITE_NUMBER")

    return json.JSONDecoder(
        object_pairs_hook=pairs_hook, parse_float=number, parse_int=integer, parse_constant=constant
    )


def _structural(data: bytes) -> bytes:
    """The bytes outside string literals (exact for well-formed JSON, linear time)."""
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    return b"".join(data.split(b'"')[::2])


def _too_deep(data: bytes, max_depth: int) -> bool:
    """Whether brackets nest deeper than ``max_depth``, counted on the bytes, never recursively."""
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return False
    brackets = _structural(data).translate(None, _NOT_BRACKETS)
    if b"[" * (max_depth + 1) in brackets or b"{" * (max_depth + 1) in brackets:
        return True
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0) > max_depth


def _parse_reference(data: bytes, limits: JsonLimits) -> Any:
    """The stdlib parser with strict hooks: the one that decides every rejection."""
    if len(data) > limits.max_bytes:
        raise MessageRejected("TOO_LARGE", f"{len(data)} bytes, at most {limits.max_bytes}")
    if data.startswith(_BOM):
        raise MessageRejected("BOM", "starts with a UTF-8 byte order mark")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MessageRejected("INVALID_UTF8", f"invalid UTF-8 at byte {exc.start}") from None
    if _too_deep(data, limits.max_depth):
        raise MessageRejected("TOO_DEEP", f"nested deeper than {limits.max_depth} levels")
    try:
        value = _strict_decoder(limits).decode(text)
    except _Problem as problem:
        raise _locate(text, problem.reason, limits) from None
    except json.JSONDecodeError as exc:
        raise MessageRejected(
            "MALFORMED_JSON", f"line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    rejected = _post_checks(value, data, limits)
    if rejected is not None:
        raise rejected
    return value


class _Pairs(list[tuple[str, Any]]):
    """An object as its member list, duplicates kept (for :func:`_locate`)."""


class _Number(str):
    """A number's source text (for :func:`_locate`)."""


def _locate(text: str, reason: str, limits: JsonLimits) -> MessageRejected:
    """Parse again, keeping duplicates and number texts, to name the path of ``reason``."""
    lenient = json.JSONDecoder(
        object_pairs_hook=_Pairs, parse_float=_Number, parse_int=_Number, parse_constant=_Number
    )
    messages = {
        "DUPLICATE_KEY": "duplicate key",
        "TOO_MANY_MEMBERS": f"more than {limits.max_members} members",
        "NUMBER_TOO_LONG": f"number longer than {limits.max_number_chars} characters",
        "NON_FINITE_NUMBER": "NaN, Infinity or a number out of the double range",
    }
    try:
        tree = lenient.decode(text)
    except ValueError:  # malformed after the problem: the problem stands, its path is unknown
        return MessageRejected(reason, messages[reason])
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(tree, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, _Number):
            long = len(node) > limits.max_number_chars
            integer = node.lstrip("-").isdigit()
            if (reason == "NUMBER_TOO_LONG" and long) or (
                reason == "NON_FINITE_NUMBER"
                and not long
                and (abs(int(node)) > _FLOAT_MAX if integer else not math.isfinite(float(node)))
            ):
                return MessageRejected(
                    reason, f"{messages[reason]}: {_show(str(node))}", json_path(path)
                )
        elif isinstance(node, _Pairs):
            if reason == "TOO_MANY_MEMBERS" and len(node) > limits.max_members:
                return MessageRejected(reason, messages[reason], json_path(path))
            seen: set[str] = set()
            for key, _ in node:
                if reason == "DUPLICATE_KEY" and key in seen:
                    return MessageRejected(reason, messages[reason], json_path((*path, key)))
                seen.add(key)
            stack.extend(((v, (*path, k)) for k, v in reversed(node)))
        elif isinstance(node, list):
            stack.extend(((v, (*path, i)) for i, v in reversed(list(enumerate(node)))))
    return MessageRejected(reason, messages[reason])  # pragma: no cover - the hook saw it


def _post_checks(
    value: Any, data: bytes, limits: JsonLimits, surrogates: bool = True
) -> MessageRejected | None:
    """Lone surrogates (if ``surrogates`` may occur), string lengths, member and node counts;
    walks the value only when byte counts say a limit could be exceeded."""
    surrogates = surrogates and b"\\" in data and (b"\\ud" in data or b"\\uD" in data)
    size = len(data)  # no string, member count or node count can exceed the document's size
    if not surrogates and size <= limits.max_string_bytes + 2:
        commas = data.count(b",") if size > min(limits.max_members, limits.max_nodes) else 0
        openers = data.count(b"[") + data.count(b"{") if commas else 0
        if commas < limits.max_members and commas + openers < limits.max_nodes:
            return None
    nodes = 0
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        nodes += 1
        if nodes > limits.max_nodes:
            return MessageRejected("TOO_MANY_MEMBERS", f"more than {limits.max_nodes} values")
        if type(node) is str:
            problem = _string_problem(node, path, surrogates, limits.max_string_bytes)
            if problem is not None:
                return problem
        elif type(node) is dict or type(node) is list:
            if len(node) > limits.max_members:
                message = f"more than {limits.max_members} members"
                return MessageRejected("TOO_MANY_MEMBERS", message, json_path(path))
            if isinstance(node, list):
                stack.extend((v, (*path, i)) for i, v in reversed(list(enumerate(node))))
                continue
            for key in node:
                problem = _string_problem(key, (*path, key), surrogates, limits.max_string_bytes)
                if problem is not None:
                    return problem
            stack.extend((v, (*path, k)) for k, v in reversed(node.items()))
    return None


def _string_problem(
    text: str, path: tuple[str | int, ...], surrogates: bool, max_bytes: int
) -> MessageRejected | None:
    if surrogates and _SURROGATE.search(text):
        return MessageRejected("INVALID_UTF8", "lone surrogate escape", json_path(path))
    if len(text) * 4 > max_bytes and len(text.encode("utf-8")) > max_bytes:
        return MessageRejected("STRING_TOO_LONG", f"over {max_bytes} bytes", json_path(path))
    return None


# ----------------------------------------------------------------------------- fast parser
def _parse_fast(
    data: bytes, limits: JsonLimits, bmp_keys: bool = False
) -> tuple[Any, bytes | None] | None:
    """orjson's value, when it provably equals the reference's, and its sorted compact bytes
    (None if a character beyond U+FFFF may sort differently in RFC 8785, which ``bmp_keys``: the
    caller knows keys have none, skips); None: ask the reference.

    orjson refuses invalid UTF-8, lone surrogates, NaN/Infinity and nesting over 1024 like the
    reference. What it accepts and the reference would not: duplicate keys (it keeps the last
    one: caught by counting ``:`` in the input and in its own output, which differ only if a
    member was dropped or ``\\u003a`` was used), and integers beyond 64 bits (made floats: callers
    look for floats). Rejections always go back to the reference, so they read the same.
    """
    if (
        _ORJSON is None
        or len(data) > limits.max_bytes
        or data.startswith(_BOM)
        or limits.max_number_chars < 21  # orjson ints have <= 20 characters; shorter limits: ask
    ):
        return None
    marks = data.translate(None, _NOT_MARKS)  # [ { : \ and the lead bytes of astral characters
    escapes = marks.count(b"\\")
    if escapes and b"u003" in data:
        return None
    colons, openers = marks.count(b":"), marks.count(b"[") + marks.count(b"{")
    if openers > limits.max_depth and _too_deep(data, limits.max_depth):
        return None
    try:
        value = _ORJSON.loads(data)
        canon: bytes = _ORJSON.dumps(value, option=_ORJSON.OPT_SORT_KEYS)
    except (ValueError, TypeError):  # TypeError: orjson writes at most 254 levels
        return None
    if colons != canon.count(b":"):
        return None
    size = len(data)  # when _post_checks would return None at once, skip the call
    big = size > limits.max_string_bytes + 2 or size > min(limits.max_members, limits.max_nodes)
    if big and _post_checks(value, data, limits, False) is not None:
        return None
    if bmp_keys:
        return value, canon
    astral = len(marks) > colons + openers + escapes or (escapes and _has_astral(canon))
    return value, None if astral else canon


def _has_special_numbers(value: Any) -> bool:
    """Whether a float or an integer beyond 2**53 occurs (they need the reference parser/writer)."""
    stack = [value]
    while stack:
        node = stack.pop()
        kind = type(node)
        if kind is dict:
            stack.extend(node.values())
        elif kind is list:
            stack.extend(node)
        elif kind is float or (kind is int and not -MAX_SAFE_INTEGER <= node <= MAX_SAFE_INTEGER):
            return True
    return False


def _has_astral(text: bytes) -> bool:
    """Whether UTF-8 ``text`` has a character beyond U+FFFF (keys with one sort differently)."""
    return not text.isascii() and bool(text.translate(None, _NOT_ASTRAL_LEADS))


def parse_strict(data: bytes, limits: JsonLimits = JsonLimits()) -> Any:
    """Parse untrusted JSON bytes within ``limits``; raise :class:`MessageRejected` otherwise."""
    fast = _parse_fast(data, limits, bmp_keys=True)  # the bytes are not used
    if fast is not None and not _has_special_numbers(fast[0]):
        return fast[0]
    return _parse_reference(data, limits)


# ----------------------------------------------------------------------------- canonical form
_PLAIN_ENCODER = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False, check_circular=False
)
_encode_string: Callable[[str], str] = json.encoder.encode_basestring


def _es6_number(value: float) -> str:
    """ECMAScript Number.prototype.toString of a double (RFC 8785 section 3.2.2.3)."""
    if not math.isfinite(value):
        raise ValueError(f"{value!r} is not a JSON number")
    if value == 0:
        return "0"
    if value < 0:
        return "-" + _es6_number(-value)
    mantissa, _, exp = float.__repr__(value).partition("e")  # shortest round-tripping digits
    whole, _, frac = mantissa.partition(".")
    if whole == "0":
        point = int(exp or 0) - (len(frac) - len(frac.lstrip("0")))
    else:
        point = len(whole) + int(exp or 0)
    digits = (whole + frac).strip("0")
    count = len(digits)
    if count <= point <= 21:
        return digits + "0" * (point - count)
    if 0 < point <= 21:
        return f"{digits[:point]}.{digits[point:]}"
    if -6 < point <= 0:
        return "0." + "0" * -point + digits
    tail = "." + digits[1:] if count > 1 else ""
    return f"{digits[0]}{tail}e{'+' if point > 0 else '-'}{abs(point - 1)}"


def _utf16_order(key: str) -> bytes:
    return key.encode("utf-16-be", "surrogatepass")


def _write(value: Any, out: Callable[[str], object], depth: int) -> None:
    if value is None:
        out("null")
    elif value is True or value is False:
        out("true" if value else "false")
    elif isinstance(value, str):
        out(_encode_string(value))
    elif isinstance(value, int):
        if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            out(int.__repr__(value))
        else:
            try:
                out(_es6_number(float(value)))
            except OverflowError:
                raise ValueError("integer beyond the double range") from None
    elif isinstance(value, float):
        out(_es6_number(value))
    elif depth >= MAX_DEPTH_LIMIT:
        raise ValueError(f"nested deeper than {MAX_DEPTH_LIMIT} levels")
    elif isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise ValueError("object keys must be strings")
        out("{")
        for i, key in enumerate(sorted(value, key=_utf16_order)):
            out(("," if i else "") + _encode_string(key) + ":")
            _write(value[key], out, depth + 1)
        out("}")
    elif isinstance(value, list):
        out("[")
        for i, item in enumerate(value):
            if i:
                out(",")
            _write(item, out, depth + 1)
        out("]")
    else:
        raise ValueError(f"not a JSON value: {type(value).__name__}")


def canonical(value: Any) -> bytes:
    """RFC 8785 (JCS) bytes: keys sorted by UTF-16 code units, no whitespace, UTF-8, numbers as
    ECMAScript writes doubles (integers beyond 2**53 too). Raises ValueError on anything that is
    not a JSON value: only dict (str keys), list, str, int, float, bool and None are; NaN,
    infinities and lone surrogates are not."""
    parts: list[str] = []
    _write(value, parts.append, 0)
    try:
        return "".join(parts).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("a string holds a lone surrogate") from None


def _canonical_parsed(value: Any, special: bool) -> bytes:
    """Canonical bytes of a parsed value; ``special``: floats or integers beyond 2**53 occur.
    Without them, and without astral characters, sorted compact JSON already is RFC 8785."""
    if not special:
        try:
            if _ORJSON is not None:
                plain = bytes(_ORJSON.dumps(value, option=_ORJSON.OPT_SORT_KEYS))
            else:
                plain = _PLAIN_ENCODER.encode(value).encode("utf-8")
        except TypeError:  # orjson writes at most 254 levels: the reference writer decides
            return canonical(value)
        if not _has_astral(plain):
            return plain
    return canonical(value)


# ----------------------------------------------------------------------------- formats
_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_YMD = r"([0-9]{4})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
_DATE = re.compile(_YMD + r"\Z")
_DATE_TIME = re.compile(
    _YMD + r"[Tt]([01][0-9]|2[0-3]):([0-5][0-9]):([0-5][0-9]|60)(?:\.[0-9]+)?"
    r"(?:[Zz]|([+-])([01][0-9]|2[0-3]):([0-5][0-9]))\Z"
)
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\Z")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL = re.compile(rf"({_ATOM}(?:\.{_ATOM})*)@({_LABEL}(?:\.{_LABEL})*\.[A-Za-z]{{2,63}})\Z")
_RESIDENT_ID = re.compile(
    r"[1-8][0-9]{5}((?:19|20)[0-9]{2})(0[1-9]|1[0-2])(0[1-9]|[12][0-9]|3[01])[0-9]{3}[0-9X]\Z"
)
# The ISO 7064 MOD 11-2 weights of the first 17 digits are 2**17 .. 2**1 modulo 11; as 13 is 2
# modulo 11, int(digits, 13) * 2 is the weighted sum modulo 11 (one C call, no Python loop).
_RESIDENT_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_RESIDENT_ID_BASE = 13


def _valid_date(year: int, month: int, day: int) -> bool:
    if not 1 <= month <= 12 or day < 1:
        return False
    leap = month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    return day <= _DAYS[month - 1] + leap


def is_date(text: str) -> bool:
    """RFC 3339 full-date, a real calendar day: ``2025-03-14``."""
    m = _DATE.match(text)
    return m is not None and (m[3] <= "28" or _valid_date(int(m[1]), int(m[2]), int(m[3])))


def is_date_time(text: str) -> bool:
    """RFC 3339 date-time with a time zone (``Z`` or ``±hh:mm``); second 60 only at 23:59 UTC."""
    m = _DATE_TIME.match(text)
    if m is None or (m[3] > "28" and not _valid_date(int(m[1]), int(m[2]), int(m[3]))):
        return False
    if m[6] == "60":
        offset = (int(m[8]) * 60 + int(m[9])) * (-1 if m[7] == "-" else 1) if m[7] else 0
        return (int(m[4]) * 60 + int(m[5]) - offset) % 1440 == 23 * 60 + 59
    return True


def is_uuid(text: str) -> bool:
    """RFC 9562 textual UUID: 8-4-4-4-12 hexadecimal digits."""
    return _UUID.match(text) is not None


def is_email(text: str) -> bool:
    """An Internet mailbox ``local@domain.tld`` (RFC 5321 dot-atom, ASCII, lengths bounded)."""
    m = _EMAIL.match(text)
    return m is not None and len(m[1]) <= 64 and len(text) <= 254


def is_cn_resident_id(text: str) -> bool:
    """An 18-character resident identity number (GB 11643-1999): region, birth date, sequence and
    the ISO 7064 MOD 11-2 check character (``X`` for 10, upper case)."""
    m = _RESIDENT_ID.match(text)
    if m is None or (m[3] > "28" and not _valid_date(int(m[1]), int(m[2]), int(m[3]))):
        return False
    # the pattern made text[:17] ASCII digits, which int() reads in any base above 9
    return text[17] == "10X98765432"[int(text[:17], _RESIDENT_ID_BASE) * 2 % 11]


FORMATS: Mapping[str, tuple[Callable[[str], bool], str]] = {
    "date-time": (is_date_time, "a date and time with time zone (RFC 3339)"),
    "date": (is_date, "a calendar date YYYY-MM-DD"),
    "uuid": (is_uuid, "a UUID (8-4-4-4-12 hex digits)"),
    "email": (is_email, "an e-mail address"),
    "cn-resident-id": (is_cn_resident_id, "an 18-character resident ID number (GB 11643)"),
}
"""Asserted formats: name -> (checker, what it means in plain words)."""

# Shortcuts for compiled validators: a match proves the checker would say True (groupless, no
# Python frame; e.g. days 01-28 and no leap second need no calendar). No match: ask the checker.
_DATE_PLAIN = r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])"
_FORMAT_SHORTCUTS: Mapping[str, Callable[[str], object]] = {
    "date-time": re.compile(
        _DATE_PLAIN + r"[Tt](?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?"
        r"(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])\Z"
    ).match,
    "date": re.compile(_DATE_PLAIN + r"\Z").match,
    "uuid": _UUID.match,
    # local part (everything before the first '@') at most 64 characters, all at most 254
    "email": re.compile(
        rf"(?=[^@]{{1,64}}@)(?=[\s\S]{{1,254}}\Z){_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*"
        r"\.[A-Za-z]{2,63}\Z"
    ).match,
}


# ----------------------------------------------------------------------------- schema compiler
class _Invalid(Exception):
    """Raised by a compiled validator: the path parts and a plain-words message."""

    def __init__(self, path: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


class _SchemaProblem(Exception):
    """A schema uses something the compiler does not support."""


_MISSING = object()


def _expected(what: str, value: Any) -> str:
    return f"expected {what}, got {_show(value)}"


def _wrong_type(what: str, value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return f"expected {what}, got {_show(value)}"
    scalar = isinstance(value, str | int | float)
    return f"expected {what}, got {_describe(value)}" + (f" {_show(value)}" if scalar else "")


def _count(low: int, high: int | None, unit: str, actual: int) -> str:
    bound = f"at least {low}" if actual < low else f"at most {high}"
    return f"expected {bound} {unit}, got {actual}"


def _extra(value: dict[str, Any], allowed: frozenset[str], path: tuple[str | int, ...]) -> _Invalid:
    key = next(k for k in value if k not in allowed)
    names = ", ".join(sorted(allowed)[:12]) + (", …" if len(allowed) > 12 else "")
    return _Invalid((*path, key), f"unexpected member (allowed: {names or 'none'})")


def _missing(
    value: dict[str, Any], required: tuple[str, ...], path: tuple[str | int, ...]
) -> _Invalid:
    key = next(k for k in required if k not in value)
    return _Invalid((*path, key), "required member is missing")


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but true is not 1; objects by members, arrays by items."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_json_equal, a, b))
    return bool(a == b)


_RUNTIME: dict[str, Any] = {
    "__builtins__": {},
    **{f.__name__: f for f in (type, len, enumerate, any, int, float, str, dict, list, bool)},
    **{f.__name__: f for f in (_expected, _wrong_type, _count, _extra, _missing, _json_equal)},
    "_Invalid": _Invalid,
    "_MISSING": _MISSING,
    "KeyError": KeyError,
}
_ANNOTATIONS = frozenset(
    {"$schema", "$id", "$comment", "$defs", "title", "description", "examples", "default"}
    | {"deprecated", "readOnly", "writeOnly"}
)
_KEYWORDS = {  # by type: what the compiler enforces; any other keyword is refused at load
    "object": {"properties", "required", "additionalProperties", "minProperties", "maxProperties"},
    "array": {"items", "minItems", "maxItems"},
    "string": {"minLength", "maxLength", "pattern", "format"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "boolean": set(),
    "null": set(),
}
_TYPE_TEST = {"object": "dict", "array": "list", "string": "str", "boolean": "bool"}
_TYPE_WORDS = {"object": "an object", "array": "an array", "string": "a string", "null": "null"}
_TYPE_WORDS |= {"boolean": "true or false", "integer": "an integer", "number": "a number"}
_BOUNDS = (
    ("minimum", "<", "at least"),
    ("maximum", ">", "at most"),
    ("exclusiveMinimum", "<=", "more than"),
    ("exclusiveMaximum", ">=", "less than"),
)
# A pattern that only refuses control characters, ^[^\u0000-\u001f\u007f]+$: C0 characters or
# ranges of them, and DEL, written raw or as \uXXXX / \xXX escapes.
_C0 = r"(?:\\u00[01][0-9a-fA-F]|\\x[01][0-9a-fA-F]|[\x00-\x1f])"
_DEL = r"(?:\\u007[fF]|\\x7[fF]|\x7f)"
_CONTROLS_ONLY = re.compile(rf"\^\[\^(?:{_C0}(?:-{_C0})?|{_DEL})+\][+*]\$\Z")
# The same with a few printable ASCII characters refused too, ^[^/\\\u0000-\u001f]+$: raw, or
# \\ and \/; no ranges of them (every part names ASCII characters only).
_PRINTABLE = r"(?:\\\\|\\/|[\x20-\x2c\x2e-\x5a\x5f-\x7e])"
_CONTROLS_AND = re.compile(
    rf"\^\[\^(?:{_C0}(?:-{_C0})?|{_DEL}|{_PRINTABLE})+\](?P<quantifier>[+*])\$\Z"
)
# A run of one ASCII character class, ^[0-9a-f]{64}$: no escapes, brackets or negation inside.
_ASCII_CLASS_RUN = re.compile(
    r"\^\[([\x20-\x5a\x5f-\x7e][\x20-\x5a\x5e-\x7e]*)\]"
    r"(?:(?P<plus>\+)|(?P<star>\*)|\{(?P<low>[0-9]{1,4})(?:(?P<comma>,)(?P<high>[0-9]{0,4}))?\})\$\Z"
)


def _ascii_class_run(pattern: str) -> tuple[bytes, int, int | None] | None:
    """For ``^[class]{low,high}$`` with an ASCII class (``+``, ``*``, ``{n}``, ``{n,}`` too): the
    bytes the class matches and the bounds on the length; None for any other pattern."""
    m = _ASCII_CLASS_RUN.match(pattern)
    if m is None:
        return None
    one = re.compile(f"[{m[1]}]", re.ASCII)
    allowed = bytes(c for c in range(128) if one.fullmatch(chr(c)))
    if m["plus"] or m["star"]:
        return allowed, int(bool(m["plus"])), None
    low = int(m["low"])
    high = None if m["comma"] and not m["high"] else int(m["high"] or low)
    return allowed, low, high


def _refused_printables(pattern: str) -> str | None:
    """For ``^[^...]+$`` refusing control characters and at most 3 printable ASCII ones (and
    nothing else): those printable characters; None for any other pattern."""
    m = _CONTROLS_AND.match(pattern)
    if m is None:
        return None
    accepts = re.compile(pattern[1:-2], re.ASCII).fullmatch  # the class alone
    refused = "".join(chr(c) for c in range(0x20, 0x7F) if accepts(chr(c)) is None)
    return refused if len(refused) <= 3 else None


def _differs_from_ecma(pattern: str) -> str | None:
    """What in ``pattern`` Python would match differently from ECMA-262 (which JSON Schema
    patterns follow, and integrators test with): ``.`` outside a class (Python takes ``\\r``
    and U+2028), ``\\s``/``\\S`` (ECMA's include U+00A0, U+2028, U+FEFF...) and a class
    opening with ``]``; None if nothing. Refused rather than translated: a schema says
    ``[^\\n]`` or ``[ \\t]`` instead."""
    in_class = False
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if pattern[i + 1 : i + 2] in {"s", "S"}:
                return f"\\{pattern[i + 1]}"
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
            if pattern[i + 1 : i + 2] == "]" or pattern[i + 1 : i + 3] == "^]":
                return "[]"  # (ECMA: an empty class; Python: a class holding ']')
        elif c == "]" and in_class:
            in_class = False
        elif c == "." and not in_class:
            return "."
        i += 1
    return None


def _ecma_pattern(pattern: str) -> re.Pattern[str]:
    """Compile an ECMA-262 style pattern: ``\\d``/``\\w`` are ASCII and a final ``$`` is the end
    of the string (Python's ``$`` would also match before a trailing newline)."""
    body = pattern[:-1]
    if pattern.endswith("$") and (len(body) - len(body.rstrip("\\"))) % 2 == 0:
        pattern = body + r"\Z"
    return re.compile(pattern, re.ASCII)


class _At(NamedTuple):
    """Where the compiler is: the variable holding the value, its path expressions, indent."""

    v: str
    path: tuple[str, ...]
    depth: int
    where: str

    def into(self, v: str, part: str, where: str, indent: int = 0) -> _At:
        return _At(v, (*self.path, part), self.depth + indent, where)

    @property
    def tuple(self) -> str:
        return f"({''.join(p + ', ' for p in self.path)})"


class _Compiler:
    """Emits the source of one function that checks a value against a schema, inline.

    Message schemas are closed contracts, so beyond the keyword subset the compiler requires
    that every subschema declares one ``type``, objects have ``additionalProperties: false``
    and arrays have ``items``: every value of a valid message is then type-checked, which is
    what lets :meth:`SchemaRegistry.check` learn from the validator whether floats occur.

    ``shortcuts`` (the default) adds cheaper tests that only ever accept what the plain test
    accepts, which then decides, and fetches an object's members before checking their names;
    the tests compare it with the plain code, which must give the same answers.
    """

    def __init__(self, root: Mapping[str, Any], shortcuts: bool = True) -> None:
        self.root = root
        self.shortcuts = shortcuts
        self.lines: list[str] = []
        self.consts: dict[str, Any] = {}
        self.expanding: list[str] = []
        self.names: set[str] = set()  # every member name an object may have
        self.variables = 0

    def fresh(self, prefix: str) -> str:
        """A new variable name (``v0`` is the value itself)."""
        self.variables += 1
        return f"{prefix}{self.variables}"

    def const(self, value: Any) -> str:
        name = f"_k{len(self.consts)}"
        self.consts[name] = value
        return name

    def emit(self, depth: int, line: str) -> None:
        self.lines.append("    " * depth + line)

    def check(self, at: _At, test: str, message: str) -> None:
        """``if test: raise _Invalid(path, message)`` (both are Python expressions)."""
        self.emit(at.depth, f"if {test}:")
        self.emit(at.depth + 1, f"raise _Invalid({at.tuple}, {message})")

    def resolve(self, ref: Any, where: str) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise _SchemaProblem(f"{where}: only local references (#/$defs/...) are supported")
        target: Any = self.root
        for token in ref[1:].split("/")[1:]:
            key = token.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or key not in target:
                raise _SchemaProblem(f"{where}: unresolvable reference {ref}")
            target = target[key]
        return target

    def node(self, schema: Any, at: _At) -> None:
        if isinstance(schema, dict) and "$ref" in schema:
            ref = schema["$ref"]
            if set(schema) - _ANNOTATIONS - {"$ref"} or ref in self.expanding:
                raise _SchemaProblem(f"{at.where}: $ref with siblings or recursion")
            self.expanding.append(ref)
            self.node(self.resolve(ref, at.where), at._replace(where=ref))
            self.expanding.pop()
            return
        kind = schema.get("type") if isinstance(schema, dict) else None
        if not isinstance(kind, str) or kind not in _KEYWORDS:
            raise _SchemaProblem(f"{at.where}: every schema needs one type of {sorted(_KEYWORDS)}")
        unsupported = sorted(
            set(schema) - _ANNOTATIONS - _KEYWORDS[kind] - {"type", "enum", "const"}
        )
        if unsupported:
            raise _SchemaProblem(f"{at.where}: unsupported keyword(s) {', '.join(unsupported)}")
        v, words = at.v, self.const(_TYPE_WORDS[kind])
        if kind in ("integer", "number"):  # 1.0 is an integer too; floats need the exact path
            integral = f" and {v}.is_integer()" if kind == "integer" else ""
            self.emit(at.depth, f"if type({v}) is not int:")
            self.emit(at.depth + 1, f"if type({v}) is float{integral}:")
            self.emit(at.depth + 2, "special = True")
            self.emit(at.depth + 1, "else:")
            self.emit(at.depth + 2, f"raise _Invalid({at.tuple}, _wrong_type({words}, {v}))")
        else:
            test = f"{v} is not None" if kind == "null" else f"type({v}) is not {_TYPE_TEST[kind]}"
            self.check(at, test, f"_wrong_type({words}, {v})")
        if "enum" in schema:
            options = schema["enum"]
            shown = ", ".join(_show(o) for o in options[:12]) + (", …" if len(options) > 12 else "")
            if kind == "string" and all(type(o) is str for o in options):
                test = f"{v} not in {self.const(frozenset(options))}"
            else:
                test = f"not any(_json_equal({v}, o) for o in {self.const(tuple(options))})"
            self.check(at, test, f"_expected({self.const(f'one of {shown}')}, {v})")
        if "const" in schema:
            const = schema["const"]
            shown = self.const(_show(const))
            test = f"not _json_equal({v}, {self.const(const)})"
            # the type is checked above: true, false and null are singletons; strings equal
            if not self.shortcuts:
                pass
            elif kind in ("boolean", "null") and (const is None or type(const) is bool):
                test = f"{v} is not {self.const(const)}"
            elif kind == "string" and type(const) is str:
                test = f"{v} != {self.const(const)}"
            self.check(at, test, f"_expected({shown}, {v})")
        if kind in ("object", "array", "string", "number", "integer"):
            getattr(self, "number" if kind == "integer" else kind)(schema, at)

    def sizes(self, schema: Mapping[str, Any], at: _At, names: tuple[str, str], unit: str) -> None:
        low, high = int(schema.get(names[0], 0)), schema.get(names[1])
        if low or high is not None:
            test = f"not {low} <= len({at.v})" + ("" if high is None else f" <= {int(high)}")
            if not low and high is not None and self.shortcuts:  # lengths are never negative
                test = f"len({at.v}) > {int(high)}"
            self.check(at, test, f"_count({low}, {high}, '{unit}', len({at.v}))")

    def string(self, schema: Mapping[str, Any], at: _At) -> None:
        self.sizes(schema, at, ("minLength", "maxLength"), "characters")
        if "pattern" in schema:
            pattern, v = schema["pattern"], at.v
            if (what := _differs_from_ecma(pattern)) is not None:
                raise _SchemaProblem(
                    f"{at.where}: pattern {pattern!r}: {what!r} matches differently in ECMA-262 "
                    "and here; spell out the characters meant (e.g. [^\\n], [ \\t])"
                )
            search = self.const(_ecma_pattern(pattern).search)
            what = schema.get("description") or f"a string matching {pattern}"
            test = f"{search}({v}) is None"
            run, refused = _ascii_class_run(pattern), _refused_printables(pattern)
            # Shortcuts that only ever accept what the pattern accepts; otherwise it decides.
            if not self.shortcuts:
                pass
            elif _CONTROLS_ONLY.match(pattern):  # printable text has no control character
                test = f"not ({v}.isprintable() and {v}) and {test}"
            elif refused is not None:  # idem, and none of the refused printable characters
                absent = "".join(f" and {c!r} not in {v}" for c in refused)
                test = f"not ({v}.isprintable() and {v}{absent}) and {test}"
            elif run is not None:  # ASCII, the length and no byte outside the class
                allowed, low, high = run
                size = f"{low} <= len({v})" + ("" if high is None else f" <= {high}")
                size = f"len({v}) == {low}" if low == high else size
                sure = f"{v}.isascii() and {size} and not {v}.encode().translate(None, "
                test = f"not ({sure}{self.const(allowed)})) and {test}"
            self.check(at, test, f"_expected({self.const(what)}, {v})")
        if "format" in schema:
            if schema["format"] not in FORMATS:
                raise _SchemaProblem(f"{at.where}: format {schema['format']!r} is not supported")
            checker, what = FORMATS[schema["format"]]
            test = f"not {self.const(checker)}({at.v})"
            if schema["format"] in _FORMAT_SHORTCUTS and self.shortcuts:  # a match proves it
                shortcut = self.const(_FORMAT_SHORTCUTS[schema["format"]])
                test = f"{shortcut}({at.v}) is None and {test}"
            self.check(at, test, f"_expected({self.const(what)}, {at.v})")

    def number(self, schema: Mapping[str, Any], at: _At) -> None:
        for keyword, op, word in _BOUNDS:
            if keyword in schema:
                bound = schema[keyword]
                what = self.const(f"a number {word} {bound}")
                self.check(at, f"{at.v} {op} {self.const(bound)}", f"_expected({what}, {at.v})")
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        if low is None or high is None or low < -MAX_SAFE_INTEGER or high > MAX_SAFE_INTEGER:
            limit = self.const(MAX_SAFE_INTEGER)
            self.emit(at.depth, f"if type({at.v}) is int and not -{limit} <= {at.v} <= {limit}:")
            self.emit(at.depth + 1, "special = True")

    def object(self, schema: Mapping[str, Any], at: _At) -> None:
        props: Mapping[str, Any] = schema.get("properties", {})
        required: list[str] = schema.get("required", [])
        if schema.get("additionalProperties") is not False:
            raise _SchemaProblem(f"{at.where}: objects need additionalProperties: false")
        self.sizes(schema, at, ("minProperties", "maxProperties"), "members")
        self.names.update(props)
        items = {name: self.fresh("v") for name in props}
        allowed = self.const(frozenset(props))
        wanted = (self.const(tuple(required)), self.const(frozenset(required)))
        odd = len(set(required)) < len(required) or not set(required) <= set(props)
        if odd or not self.shortcuts:
            self.members(at, 0, allowed, wanted)  # check the members as sets, then fetch
            for name, item in items.items():
                fetch = f"[{name!r}]" if name in required else f".get({name!r}, _MISSING)"
                self.emit(at.depth, f"{item} = {at.v}{fetch}")
        else:
            # Fetch every member first; the usual valid object costs no set operation: a
            # missing member (KeyError) or a count that is not that of the members found sends
            # to the set checks, which raise what they always raised.
            if required:
                self.emit(at.depth, "try:")
                for name in required:
                    self.emit(at.depth + 1, f"{items[name]} = {at.v}[{name!r}]")
                self.emit(at.depth, "except KeyError:")
                self.members(at, 1, allowed, wanted)
            found = str(len(required))
            for name, item in items.items():
                if name not in required:
                    self.emit(at.depth, f"{item} = {at.v}.get({name!r}, _MISSING)")
                    found += f" + ({item} is not _MISSING)"
            self.emit(at.depth, f"if len({at.v}) != {found}:")
            self.members(at, 1, allowed, wanted)
        for name, sub in props.items():
            item, where = items[name], f"{at.where}/properties/{name}"
            if name in required:
                self.node(sub, at.into(item, repr(name), where))
            else:
                self.emit(at.depth, f"if {item} is not _MISSING:")
                self.node(sub, at.into(item, repr(name), where, 1))

    def members(self, at: _At, indent: int, allowed: str, required: tuple[str, str]) -> None:
        """Raise if the object at ``at`` has a member not in ``allowed`` (checked first) or
        misses one that is required (constants: the names in order, and as a set)."""
        depth = at.depth + indent
        self.emit(depth, f"if not {allowed}.issuperset({at.v}):")
        self.emit(depth + 1, f"raise _extra({at.v}, {allowed}, {at.tuple})")
        if self.consts[required[0]]:
            self.emit(depth, f"if not {at.v}.keys() >= {required[1]}:")
            self.emit(depth + 1, f"raise _missing({at.v}, {required[0]}, {at.tuple})")

    def array(self, schema: Mapping[str, Any], at: _At) -> None:
        self.sizes(schema, at, ("minItems", "maxItems"), "items")
        if "items" not in schema:
            raise _SchemaProblem(f"{at.where}: arrays need items")
        index, item = self.fresh("i"), self.fresh("v")
        self.emit(at.depth, f"for {index}, {item} in enumerate({at.v}):")
        self.node(schema["items"], at.into(item, index, f"{at.where}/items", 1))


@dataclass(frozen=True)
class _Compiled:
    schema: Mapping[str, Any]
    validate: Callable[[Any], bool]  # True: a float or an integer beyond 2**53 was seen
    source: str
    # No member name has a character beyond U+FFFF: the keys of a valid message sort the same
    # by code point (orjson) and by UTF-16 code unit (RFC 8785).
    bmp_names: bool = False


def _compile(schema: Mapping[str, Any], name: str, shortcuts: bool = True) -> _Compiled:
    compiler = _Compiler(schema, shortcuts)
    compiler.node(schema, _At("v0", (), 1, "#"))
    body = "\n".join(compiler.lines)
    source = f"def validate(v0):\n    special = False\n{body}\n    return special\n"
    namespace = dict(_RUNTIME, **compiler.consts)
    # The source is generated here from the schema: schema strings enter it only as repr()
    # literals or as named constants, never as code.
    exec(compile(source, f"<schema {name}>", "exec"), namespace)  # noqa: S102
    bmp = not any(_has_astral(key.encode("utf-8", "surrogatepass")) for key in compiler.names)
    return _Compiled(schema, namespace["validate"], source, bmp and shortcuts)


def _run(compiled: _Compiled, value: Any) -> bool:
    try:
        return compiled.validate(value)
    except _Invalid as exc:
        raise _schema_invalid(exc) from None


def _schema_invalid(exc: _Invalid) -> MessageRejected:
    return MessageRejected("SCHEMA_INVALID", exc.message, json_path(exc.path))


def _load_schema(path: Path) -> _Compiled:
    name = path.name.removesuffix(".schema.json")
    if not _SCHEMA_NAME.match(name):
        raise ConfigError(f"{path}: schema names are lower-case letters, digits and '-'")
    try:
        doc = parse_strict(path.read_bytes())
    except (OSError, MessageRejected) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if type(doc) is not dict:
        raise ConfigError(f"{path}: a schema is a JSON object")
    if not re.fullmatch(rf"urn:ferry:schema:message:{name}:[1-9][0-9]*", str(doc.get("$id"))):
        raise ConfigError(f"{path}: $id must be urn:ferry:schema:message:{name}:<version>")
    if doc.get("$schema") != "https://json-schema.org/draft/2020-12/schema":
        raise ConfigError(f"{path}: $schema must be Draft 2020-12")
    try:
        Draft202012Validator.check_schema(doc)
    except SchemaError as exc:
        raise ConfigError(f"{path}: not a schema at {exc.json_path}: {exc.message}") from None
    try:
        compiled = _compile(doc, name)
    except _SchemaProblem as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for i, example in enumerate(doc.get("examples", [])):
        try:
            _run(compiled, example)
            canonical(example)
        except (MessageRejected, ValueError) as exc:
            raise ConfigError(f"{path}: examples[{i}] is not valid: {exc}") from None
    return compiled


class SchemaRegistry:
    """Compiled message schemas by name: ``citizen-application`` is the file
    ``citizen-application.schema.json``, ``$id`` ``urn:ferry:schema:message:citizen-application:N``.
    """

    def __init__(self, compiled: Mapping[str, _Compiled]) -> None:
        self._compiled = dict(compiled)
        self.ids: tuple[str, ...] = tuple(sorted(compiled))

    @classmethod
    def load(cls, folder: Path | None = None) -> SchemaRegistry:
        """Load every ``*.schema.json`` of ``folder`` (default: the packaged message schemas).

        Raises ConfigError naming the file if a schema is malformed, not Draft 2020-12, uses a
        keyword or format the compiler does not support, or has an example that fails it.
        """
        folder = _PACKAGED if folder is None else folder
        files = sorted(folder.glob("*.schema.json"))
        if not files:
            raise ConfigError(f"{folder}: no *.schema.json message schemas")
        return cls({p.name.removesuffix(".schema.json"): _load_schema(p) for p in files})

    def _get(self, schema: str) -> _Compiled:
        try:
            return self._compiled[schema]
        except KeyError:
            raise MessageRejected(
                "UNKNOWN_SCHEMA",
                f"no message schema {_show(schema)} (known: {', '.join(self.ids)})",
            ) from None

    def schema(self, name: str) -> Mapping[str, Any]:
        """The schema document itself (e.g. to publish it to integrators)."""
        return self._get(name).schema

    def validate(self, schema: str, value: Any) -> None:
        """Raise MessageRejected (SCHEMA_INVALID with the path, or UNKNOWN_SCHEMA) unless valid."""
        _run(self._get(schema), value)

    def check(
        self, schema: str, data: bytes, limits: JsonLimits = JsonLimits()
    ) -> tuple[Any, bytes]:
        """Parse strictly, require a top-level object, validate: return (value, canonical bytes)."""
        compiled = self._get(schema)
        # Valid messages only have the schema's member names: if none is astral, the sorted
        # bytes of orjson are RFC 8785 whatever the strings hold (canon is used only if valid).
        fast = _parse_fast(data, limits, compiled.bmp_names)
        if fast is not None:
            value, canon = fast
            try:
                if type(value) is not dict:
                    raise _not_an_object(value)
                special = compiled.validate(value)  # _run, inline
            except (_Invalid, MessageRejected) as exc:
                # a number orjson made a float may be one the reference refuses: let it decide
                if not _has_special_numbers(value):
                    raise (_schema_invalid(exc) if isinstance(exc, _Invalid) else exc) from None
                special = True
            if not special:  # the validator saw every number: no float, no integer over 2**53
                return value, canonical(value) if canon is None else canon
        value = _parse_reference(data, limits)
        return value, _canonical_parsed(value, _validate_message(compiled, value))


def _validate_message(compiled: _Compiled, value: Any) -> bool:
    if type(value) is not dict:
        raise _not_an_object(value)
    return _run(compiled, value)


def _not_an_object(value: Any) -> MessageRejected:
    return MessageRejected("NOT_AN_OBJECT", f"expected an object, got {_describe(value)}")

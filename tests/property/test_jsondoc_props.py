"""Properties of ferry.jsondoc: only MessageRejected escapes, both parse engines agree,
canonical bytes are stable, and compiled validators agree with jsonschema."""

from __future__ import annotations

import copy
import json
import math
import re
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker

from ferry import jsondoc
from ferry.jsondoc import JsonLimits, MessageRejected, SchemaRegistry, canonical, parse_strict

REGISTRY = SchemaRegistry.load()
LIMITS = JsonLimits()
SMALL = JsonLimits(max_string_bytes=40, max_members=6, max_nodes=40, max_depth=5)
SAFE = 2**53

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**25), 10**25)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=25,
)
TOKENS = [b'"', b"\\", b"\\u", b"\\ud800", b"\\udc00", b"\\u003a", b"[", b"]", b"{", b"}", b",",
          b":", b"NaN", b"-Infinity", b"1e999", b"0." + b"1" * 45, b"\xef\xbb\xbf", b"\xff",
          b"\xed\xa0\x80", "😀".encode(), b"\x00", b" ", b'"a":1,"a":2']  # fmt: skip


@st.composite
def jsonish(draw: st.DrawFn) -> bytes:
    """Valid JSON text with a few random byte edits: mostly near-miss documents."""
    value = draw(json_values)
    text = json.dumps(
        value, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1]))
    )
    data = bytearray(text.encode())
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["insert", "delete", "replace"]))
        token = draw(st.sampled_from(TOKENS) | st.binary(min_size=1, max_size=3))
        if edit == "insert":
            data[at:at] = token
        elif edit == "delete":
            del data[at : at + len(token)]
        else:
            data[at : at + len(token)] = token
    return bytes(data)


def typed(value: Any) -> Any:
    """A comparable form that keeps JSON types apart (1, 1.0 and true differ; -0.0 and 0.0 too)."""
    if isinstance(value, dict):
        return ("object", [(k, typed(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("array", [typed(v) for v in value])
    if isinstance(value, float):
        return ("float", repr(value))
    return (type(value).__name__, value)


def rejection(call: Any, *args: Any) -> MessageRejected | None:
    """The MessageRejected that ``call(*args)`` raises, or None; anything else propagates."""
    try:
        call(*args)
    except MessageRejected as exc:
        return exc
    return None


def outcome(parse: Any, data: bytes, limits: JsonLimits) -> Any:
    try:
        return ("ok", typed(parse(data, limits)))
    except MessageRejected as exc:
        return ("rejected", exc.reason_code, exc.json_path)


# ----------------------------------------------------------------------------- fuzz
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=200) | jsonish())
def test_only_message_rejected_escapes(data: bytes) -> None:
    for limits in (LIMITS, SMALL):
        outcome(parse_strict, data, limits)
    for schema in REGISTRY.ids:
        exc = rejection(REGISTRY.check, schema, data)
        assert exc is None or exc.reason_code in jsondoc.REASONS


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(jsonish(), st.sampled_from([LIMITS, SMALL]))
def test_fast_and_reference_parsers_agree(data: bytes, limits: JsonLimits) -> None:
    reference = outcome(jsondoc._parse_reference, data, limits)
    assert outcome(parse_strict, data, limits) == reference
    fast = jsondoc._parse_fast(data, limits)
    # Without floats or big integers (which callers send to the reference) the fast path only
    # ever accepts what the reference accepts, with the same value and RFC 8785 bytes.
    if fast is not None and not jsondoc._has_special_numbers(fast[0]):
        assert reference == ("ok", typed(fast[0]))
        assert fast[1] is None or fast[1] == canonical(fast[0])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(json_values, st.booleans(), st.sampled_from([None, 0, 2]))
def test_parse_returns_what_was_written(value: Any, ascii_only: bool, indent: int | None) -> None:
    assume(not jsondoc._has_special_numbers(value) or "e+" not in json.dumps(value))
    data = json.dumps(value, ensure_ascii=ascii_only, indent=indent).encode()
    assert typed(parse_strict(data)) == typed(value)


# ----------------------------------------------------------------------------- canonical
def shuffled(value: Any, seed: int) -> Any:
    if isinstance(value, dict):
        items = list(value.items())
        items = items[seed % (len(items) or 1) :] + items[: seed % (len(items) or 1)]
        return {k: shuffled(v, seed + 1) for k, v in reversed(items)}
    if isinstance(value, list):
        return [shuffled(v, seed + 1) for v in value]
    return value


def numbers_equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(numbers_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(numbers_equal, a, b))
    if isinstance(a, bool) or isinstance(b, bool) or a is None or isinstance(a, str):
        return a == b and type(a) is type(b)
    return float(a) == float(b)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(json_values, st.integers(0, 10), st.booleans())
def test_canonical_is_stable_and_round_trips(value: Any, seed: int, ascii_only: bool) -> None:
    canon = canonical(value)
    assert canonical(parse_strict(canon)) == canon  # idempotent
    assert numbers_equal(json.loads(canon), json.loads(json.dumps(value)))
    other = json.dumps(shuffled(value, seed), ensure_ascii=ascii_only, indent=seed % 3 or None)
    assert canonical(parse_strict(other.encode())) == canon
    assert re.search(rb"[\[{,:] |\n", canon) is None or b'"' in canon  # no formatting whitespace


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(json_values)
def test_plain_canonical_equals_the_reference_writer(value: Any) -> None:
    assume(not jsondoc._has_special_numbers(value))
    assert jsondoc._canonical_parsed(value, False) == canonical(value)


ES6 = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]*[1-9])?(e[+-][1-9][0-9]*)?\Z")


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_es6_numbers_round_trip_in_shortest_form(x: float) -> None:
    text = jsondoc._es6_number(x)
    assert ES6.match(text), text
    assert float(text) == x
    digits = re.sub(r"e.*|[-.]", "", text).strip("0")
    assert len(digits) == len(re.sub(r"e.*|[-.]", "", repr(abs(x))).strip("0")) or x == 0
    if "e" in text:
        assert abs(x) >= 1e21 or abs(x) < 1e-6
    if abs(x) < 1e21 and x == math.floor(x):
        assert "." not in text
        assert "e" not in text


# ----------------------------------------------------------------------------- schemas
def reference(schema: dict[str, Any]) -> Draft202012Validator:
    checker = FormatChecker(formats=())
    for name, (check, _) in jsondoc.FORMATS.items():
        checker.checks(name)(lambda v, check=check: not isinstance(v, str) or check(v))
    return Draft202012Validator(schema, format_checker=checker)


REFERENCES = {name: reference(dict(REGISTRY.schema(name))) for name in REGISTRY.ids}
INTERESTING = st.sampled_from(
    [
        "", "x", "张伟", "a\u0000b", "110105", "1101051", "100022\n", "13812345678", "010-65001234",
        "11010519491231002X", "110105194912310021", "3f6c1a52-8d2e-4b7a-9c41-2f5e8b0d7a13",
        "2025-03-14T09:26:53+08:00", "2025-03-14", "2025-02-30", "zhang@example.cn", "web",
        "residence_permit", "公开", "机密", "特急", "application/pdf", "11110105MB0123456X",
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "a/b.pdf", "x" * 201,
        "朝政办发\u30142025\u301512号", "field_1", 0, 1, -1, 52428800, 52428801, 1.0, 1.5, True,
        False, None, [], {}, [{}], {"code": "11110105MB0123456X", "name": "某单位"},
    ]
)  # fmt: skip
values = INTERESTING | json_values


def locations(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += locations(value, (*path, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found += locations(value, (*path, i))
    return found


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, Any]:
    name = draw(st.sampled_from(REGISTRY.ids))
    doc = copy.deepcopy(draw(st.sampled_from(REGISTRY.schema(name)["examples"])))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(locations(doc)))
        if not path:
            continue
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "grow"]))
        if action == "replace":
            parent[path[-1]] = copy.deepcopy(draw(values))
        elif action == "delete":
            parent.pop(path[-1])
        elif action == "add" and isinstance(parent, dict):
            key = draw(st.sampled_from(["email", "postal_code", "copy_to", "reply_by", "extra"]))
            parent[key] = copy.deepcopy(draw(values))
        elif action == "grow" and isinstance(parent[path[-1]], list):
            parent[path[-1]].extend([copy.deepcopy(x) for x in parent[path[-1]][:1]] * 25)
    return name, doc


def value_at(doc: Any, path: str) -> Any:
    """The value at a ``$.a[1].b`` path, or None where there is none."""
    for name, index in re.findall(r"\.(\w+)|\[(\d+)\]", path):
        if name:
            doc = doc.get(name) if isinstance(doc, dict) else None
        else:
            doc = doc[int(index)] if isinstance(doc, list) and int(index) < len(doc) else None
    return doc


def within(our_path: str, error_path: str) -> bool:
    return our_path == error_path or (
        our_path.startswith(error_path) and our_path[len(error_path)] in ".["
    )


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_compiled_validators_agree_with_jsonschema(case: tuple[str, Any]) -> None:
    name, doc = case
    errors = list(REFERENCES[name].iter_errors(doc))
    exc = rejection(REGISTRY.validate, name, doc)
    if exc is None:
        assert errors == []
        value, canon = REGISTRY.check(name, json.dumps(doc).encode())
        assert canon == canonical(doc)
        assert numbers_equal(value, doc)
        return
    assert exc.reason_code == "SCHEMA_INVALID"
    at = value_at(doc, exc.json_path)
    # the one known difference: ECMA's '$' refuses a trailing newline, Python's (jsonschema) not
    newline = isinstance(at, str) and at.endswith("\n")
    assert newline or any(within(exc.json_path, e.json_path) for e in errors), (exc, errors)
    again = rejection(REGISTRY.check, name, json.dumps(doc, ensure_ascii=False).encode())
    assert again is not None
    assert (again.reason_code, again.json_path) == ("SCHEMA_INVALID", exc.json_path)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.sampled_from(REGISTRY.ids), json_values)
def test_validate_only_raises_message_rejected(name: str, value: Any) -> None:
    exc = rejection(REGISTRY.validate, name, value)
    assert exc is None or exc.reason_code == "SCHEMA_INVALID"


NUMBER_EDITS = [b"482113.0", b"4.82113e5", b"1" * 45, b"1e400", b"NaN", b"-0", b"9007199254740993",
                b"18446744073709551617", b'"482113"', b"true"]  # fmt: skip


@st.composite
def message_bytes(draw: st.DrawFn) -> tuple[str, bytes]:
    """A real example as bytes, with numbers swapped, members duplicated or bytes edited."""
    name = draw(st.sampled_from(REGISTRY.ids))
    doc = draw(st.sampled_from(REGISTRY.schema(name)["examples"]))
    text = json.dumps(doc, ensure_ascii=draw(st.booleans())).encode()
    for _ in range(draw(st.integers(0, 2))):
        edit = draw(st.sampled_from(["number", "duplicate", "bytes"]))
        if edit == "number" and b"482113" in text:
            text = text.replace(b"482113", draw(st.sampled_from(NUMBER_EDITS)), 1)
        elif edit == "duplicate":
            text = text.replace(b'{"', b'{"channel": "web", "', 1)
        else:
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(st.sampled_from(TOKENS)) + text[at + 1 :]
    return name, text


def check_outcome(name: str, data: bytes) -> Any:
    try:
        value, canon = REGISTRY.check(name, data)
    except MessageRejected as exc:
        return ("rejected", exc.reason_code, exc.json_path)
    return ("ok", typed(value), canon)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(message_bytes())
def test_check_is_the_same_with_and_without_orjson(case: tuple[str, bytes]) -> None:
    name, data = case
    with_orjson = check_outcome(name, data)
    saved, jsondoc._ORJSON = jsondoc._ORJSON, None
    try:
        assert check_outcome(name, data) == with_orjson
    finally:
        jsondoc._ORJSON = saved


# ----------------------------------------------------------------------------- fast paths
# The same schemas compiled without shortcuts: the plain code every shortcut must agree with.
PLAIN = SchemaRegistry(
    {n: jsondoc._compile(REGISTRY.schema(n), n, shortcuts=False) for n in REGISTRY.ids}
)


def validated(compiled: Any, value: Any) -> Any:
    try:
        return ("ok", compiled.validate(value))
    except jsondoc._Invalid as exc:
        return ("invalid", exc.path, exc.message)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(mutated() | st.tuples(st.sampled_from(REGISTRY.ids), values))
def test_shortcut_validators_agree_with_plain_ones(case: tuple[str, Any]) -> None:
    name, doc = case
    assert validated(REGISTRY._compiled[name], doc) == validated(PLAIN._compiled[name], doc)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(message_bytes())
def test_check_agrees_with_the_plain_registry(case: tuple[str, bytes]) -> None:
    """Shortcut validators, and orjson's key order trusted for BMP member names."""
    name, data = case
    expected = check_outcome(name, data)
    try:
        value, canon = PLAIN.check(name, data)
        plain: Any = ("ok", typed(value), canon)
    except MessageRejected as exc:
        plain = ("rejected", exc.reason_code, exc.json_path)
    assert plain == expected


DATE_TIME_ISH = st.from_regex(
    r"\A[0-9]{4}-[0-1][0-9]-[0-3][0-9][Tt ][0-2][0-9]:[0-6][0-9]:[0-6][0-9](\.[0-9]{1,3})?"
    r"([Zz]|[+-][0-2][0-9]:[0-6][0-9])?\n?\Z"
)
EMAIL_ISH = st.from_regex(  # near the bounds: local part 64, label 63, all 254
    r"\A[a-z]{1,3}(\.?[a-z]{0,66})?@([a-z0-9][a-z0-9-]{40,63}\.){0,4}[a-z]{1,64}\n?\Z"
) | st.from_regex(r"\A[a-z.@]{1,70}@[a-z0-9.-]{1,200}\.(cn|c|com)\n?\Z")
FORMAT_TEXT = {
    "date-time": DATE_TIME_ISH | st.text(max_size=40),
    "date": st.from_regex(r"\A[0-9]{4}-[0-1][0-9]-[0-3][0-9]\n?\Z") | st.text(max_size=12),
    "uuid": st.from_regex(r"\A[0-9a-fA-F-]{36}\n?\Z") | st.uuids().map(str),
    "email": EMAIL_ISH | st.emails() | st.text(max_size=30),
}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(jsondoc._FORMAT_SHORTCUTS)), st.data())
def test_format_shortcuts_prove_the_checker(fmt: str, data: st.DataObject) -> None:
    text = data.draw(FORMAT_TEXT[fmt])
    if jsondoc._FORMAT_SHORTCUTS[fmt](text) is not None:
        assert jsondoc.FORMATS[fmt][0](text), text


PATTERNS = [
    "^[0-9a-f]{64}$", "^[0-9]{6}$", "^[a-c_]+$", "^[A-C]*$", "^[a-c]{2,}$", "^[a-c-]{2,5}$",
    "^[^\\u0000-\\u001f\\u007f]+$", "^[^/\\\\\\u0000-\\u001f\\u007f]+$", "^[^\\x00-\\x1f<>]*$",
    "^[^\\\\u0000]+$",
]  # fmt: skip


def _string_schema(pattern: str, shortcuts: bool) -> Any:
    schema = {"type": "object", "additionalProperties": False,
              "properties": {"s": {"type": "string", "pattern": pattern}}}  # fmt: skip
    return jsondoc._compile(schema, "p", shortcuts)


PATTERN_CODE = {p: (_string_schema(p, True), _string_schema(p, False)) for p in PATTERNS}
PATTERN_TEXT = st.text(
    alphabet="0123456789abcdefABC_-/\\<>u \x00\x1f\x7f\u00e9\u4e00\n", max_size=70
)


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(PATTERNS), PATTERN_TEXT | st.text(max_size=8))
def test_pattern_shortcuts_agree_with_the_regex(pattern: str, text: str) -> None:
    fast, plain = PATTERN_CODE[pattern]
    for doc in ({"s": text}, {"s": text * 64}):
        assert validated(fast, doc) == validated(plain, doc)
    assert "isprintable" in fast.source or "translate" in fast.source  # a shortcut is tested

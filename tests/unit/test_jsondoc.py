"""ferry.jsondoc: strict parsing, RFC 8785 canonical bytes, formats and the message schemas."""

from __future__ import annotations

import copy
import json
import random
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker

from ferry import jsondoc
from ferry.config_types import MAX_MESSAGE_SIZE
from ferry.errors import ConfigError, PolicyRejection, UsageError
from ferry.jsondoc import (
    REASONS,
    JsonLimits,
    MessageRejected,
    SchemaRegistry,
    canonical,
    json_path,
    parse_strict,
)
from inside.agent import INSIDE_MESSAGE_LIMITS

ROOT = Path(__file__).resolve().parents[2]
PACKAGED = ROOT / "ferry" / "schemas" / "messages"
MIRROR = ROOT / "schemas" / "messages"
APP = "citizen-application"
NOTICE = "agency-notice"


@pytest.fixture(scope="module")
def registry() -> SchemaRegistry:
    return SchemaRegistry.load()


def example(registry: SchemaRegistry, schema: str = APP, index: int = 0) -> dict[str, Any]:
    return copy.deepcopy(registry.schema(schema)["examples"][index])


def reference(schema: dict[str, Any]) -> Draft202012Validator:
    """jsonschema with ferry's format checkers: without a FormatChecker it asserts no format."""
    checker = FormatChecker(formats=())
    for name, (check, _) in jsondoc.FORMATS.items():
        checker.checks(name)(lambda v, check=check: not isinstance(v, str) or check(v))
    return Draft202012Validator(schema, format_checker=checker)


def rejected(data: bytes, limits: JsonLimits | None = None) -> MessageRejected:
    with pytest.raises(MessageRejected) as info:
        parse_strict(data, limits or JsonLimits())
    return info.value


# ----------------------------------------------------------------------------- parse_strict
@pytest.mark.parametrize(
    ("data", "value"),
    [
        (
            b'{"a": [1, -0, 2.5, true, false, null, "x"]}',
            {"a": [1, 0, 2.5, True, False, None, "x"]},
        ),
        (b" \t\r\n[] \n", []),
        (b'"\\u00e9\\ud83d\\ude00\\/"', "é😀/"),
        (b"123456789012345678901234567890", 123456789012345678901234567890),
        (b"1E2", 100.0),
        (b"1e-400", 0.0),
        ('{"名字":"张伟"}'.encode(), {"名字": "张伟"}),
        (b'{"a":"x\\u003ay","b\\u003a":1}', {"a": "x:y", "b:": 1}),
        (b'"a\x7fb"', "a\x7fb"),
    ],
)
def test_parse_accepts_and_returns_exact_values(data: bytes, value: Any) -> None:
    got = parse_strict(data)
    assert got == value
    assert json.dumps(got) == json.dumps(value)  # same types: 1 stays int, 2.5 stays float


@pytest.mark.parametrize(
    ("data", "limits", "reason", "path"),
    [
        (b"[" + b"1," * 600 + b"1]", JsonLimits(max_bytes=1000), "TOO_LARGE", "$"),
        (b"\xef\xbb\xbf{}", JsonLimits(), "BOM", "$"),
        (b'"\xff"', JsonLimits(), "INVALID_UTF8", "$"),
        (b'"\xc0\xaf"', JsonLimits(), "INVALID_UTF8", "$"),  # overlong '/'
        (b'"\xed\xa0\x80"', JsonLimits(), "INVALID_UTF8", "$"),  # UTF-8 encoded surrogate
        (b'"\\ud800"', JsonLimits(), "INVALID_UTF8", "$"),
        (b'{"a":["x","\\udc00"]}', JsonLimits(), "INVALID_UTF8", "$.a[1]"),
        (b'{"k\\ud83d":1}', JsonLimits(), "INVALID_UTF8", '$["k\\ud83d"]'),
        (b"", JsonLimits(), "MALFORMED_JSON", "$"),
        (b'{"a":1,}', JsonLimits(), "MALFORMED_JSON", "$"),
        (b"[1 2]", JsonLimits(), "MALFORMED_JSON", "$"),
        (b"{a:1}", JsonLimits(), "MALFORMED_JSON", "$"),
        (b"'a'", JsonLimits(), "MALFORMED_JSON", "$"),
        (b"01", JsonLimits(), "MALFORMED_JSON", "$"),
        (b'"a\nb"', JsonLimits(), "MALFORMED_JSON", "$"),  # raw control character
        (b"\x0c1", JsonLimits(), "MALFORMED_JSON", "$"),  # form feed is not JSON whitespace
        (b'{"a":1,"a":2}', JsonLimits(), "DUPLICATE_KEY", "$.a"),
        (b'{"x":[{"k":1},{"k":1,"j":0,"k":2}]}', JsonLimits(), "DUPLICATE_KEY", "$.x[1].k"),
        (b'{"a\\u003a":1,"a:":2}', JsonLimits(), "DUPLICATE_KEY", '$["a:"]'),
        (b"NaN", JsonLimits(), "NON_FINITE_NUMBER", "$"),
        (b'{"v":[Infinity]}', JsonLimits(), "NON_FINITE_NUMBER", "$.v[0]"),
        (b'{"v":-Infinity}', JsonLimits(), "NON_FINITE_NUMBER", "$.v"),
        (b'{"v":1e400}', JsonLimits(), "NON_FINITE_NUMBER", "$.v"),
        # an integer no double holds (as 1e309): canonical form could not write it
        (
            b'{"v":1' + b"0" * 309 + b"}",
            JsonLimits(max_number_chars=400),
            "NON_FINITE_NUMBER",
            "$.v",
        ),
        (
            b'{"v":-2' + b"0" * 308 + b"}",
            JsonLimits(max_number_chars=400),
            "NON_FINITE_NUMBER",
            "$.v",
        ),
        (b"[" * 33 + b"]" * 33, JsonLimits(), "TOO_DEEP", "$"),
        (b'{"a":' * 33 + b"1" + b"}" * 33, JsonLimits(), "TOO_DEEP", "$"),
        (b'{"a":"12345678901"}', JsonLimits(max_string_bytes=10), "STRING_TOO_LONG", "$.a"),
        ('["张伟张伟"]'.encode(), JsonLimits(max_string_bytes=10), "STRING_TOO_LONG", "$[0]"),
        (
            b'{"x":{"12345678901":1}}',
            JsonLimits(max_string_bytes=10),
            "STRING_TOO_LONG",
            '$.x["12345678901"]',
        ),
        (b'{"n":' + b"1" * 41 + b"}", JsonLimits(), "NUMBER_TOO_LONG", "$.n"),
        (b"[0." + b"1" * 40 + b"]", JsonLimits(), "NUMBER_TOO_LONG", "$[0]"),
        (b"9" * 5000, JsonLimits(max_number_chars=4000), "NUMBER_TOO_LONG", "$"),
        (b'{"n":123456}', JsonLimits(max_number_chars=5), "NUMBER_TOO_LONG", "$.n"),
        (b'{"a":[1,2,3,4]}', JsonLimits(max_members=3), "TOO_MANY_MEMBERS", "$.a"),
        (b'{"a":{"w":1,"x":1,"y":1,"z":1}}', JsonLimits(max_members=3), "TOO_MANY_MEMBERS", "$.a"),
        (b"[[1,2],[3,4],[5,6]]", JsonLimits(max_nodes=8), "TOO_MANY_MEMBERS", "$"),
    ],
)
def test_parse_rejects(data: bytes, limits: JsonLimits, reason: str, path: str) -> None:
    exc = rejected(data, limits)
    assert exc.reason_code == reason
    assert exc.json_path == path
    assert str(exc).startswith(f"{reason}: {path}: ")


def test_the_largest_integers_a_double_holds_are_taken() -> None:
    limits = JsonLimits(max_number_chars=400)
    assert parse_strict(b"1" + b"0" * 308, limits) == 10**308
    assert jsondoc.canonical({"n": 10**308}) == b'{"n":1e+308}'


def test_parse_limits_allow_exactly_the_bound() -> None:
    assert parse_strict(b"[" * 32 + b"]" * 32)  # depth 32 is the default maximum
    assert parse_strict(b'"1234567890"', JsonLimits(max_string_bytes=10)) == "1234567890"
    assert parse_strict(b"[1,2,3]", JsonLimits(max_members=3)) == [1, 2, 3]
    assert parse_strict(b"1" * 40) == int("1" * 40)
    assert parse_strict(b"[" + b" " * 990 + b"]", JsonLimits(max_bytes=992)) == []


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    data = json.dumps(["[" * 100 + "{" * 100, '\\"[[[[', {"k[[[": "]]]"}]).encode()
    assert parse_strict(data)[2] == {"k[[[": "]]]"}


def test_malformed_json_says_where() -> None:
    exc = rejected(b'{"a": 1}\n  x')
    assert exc.reason_code == "MALFORMED_JSON"
    assert "line 2 column 3" in str(exc)


def test_deep_nesting_is_rejected_quickly_without_recursion() -> None:
    for data in (b"[" * 100_000, b'{"a":' * 100_000, b"[" * 100_000 + b"]" * 100_000):
        start = time.perf_counter()
        assert rejected(data).reason_code == "TOO_DEEP"
        assert time.perf_counter() - start < 0.5


def test_many_brackets_but_shallow_is_fine() -> None:
    data = b"[" + b",".join([b"[[]]"] * 5000) + b"]"
    assert len(parse_strict(data)) == 5000


def test_reference_parser_alone_gives_the_same_answers() -> None:
    """Without orjson the stdlib path decides everything; spot-check it directly."""
    limits = JsonLimits()
    assert jsondoc._parse_reference(b'{"a":[1,2.5,"x"]}', limits) == {"a": [1, 2.5, "x"]}
    with pytest.raises(MessageRejected, match="DUPLICATE_KEY"):
        jsondoc._parse_reference(b'{"a":1,"a":2}', limits)
    assert jsondoc._parse_fast(b'{"a":1,"a":2}', limits) is None  # fast path defers


def test_fast_path_defers_when_unsure() -> None:
    limits = JsonLimits()
    if jsondoc._ORJSON is None:
        pytest.skip("orjson not installed")
    assert jsondoc._parse_fast(b'{"a":1}', limits) == ({"a": 1}, b'{"a":1}')
    assert jsondoc._parse_fast(b'{"a\\u003a":1}', limits) is None  # escaped colon: ask
    assert jsondoc._parse_fast(b'{"a":NaN}', limits) is None
    assert jsondoc._parse_fast(b'{"a":1}', JsonLimits(max_number_chars=20)) is None


def test_message_rejected_is_a_policy_rejection() -> None:
    exc = MessageRejected("SCHEMA_INVALID", "expected x", "$.a")
    assert isinstance(exc, PolicyRejection)
    assert exc.exit_code == 9
    assert (exc.reason_code, exc.json_path) == ("SCHEMA_INVALID", "$.a")
    assert str(exc) == "SCHEMA_INVALID: $.a: expected x"
    with pytest.raises(ValueError, match="unknown reason"):
        MessageRejected("NOPE", "x")
    assert len(set(REASONS)) == 13


@pytest.mark.parametrize(
    "kwargs",
    [{"max_depth": 0}, {"max_depth": 257}, {"max_number_chars": 4001}, {"max_bytes": 0}],
)
def test_limits_are_validated(kwargs: dict[str, int]) -> None:
    with pytest.raises(UsageError):
        JsonLimits(**kwargs)


def test_json_path() -> None:
    assert json_path(()) == "$"
    assert json_path(("attachments", 2, "sha256")) == "$.attachments[2].sha256"
    assert json_path(("a b", "é")) == '$["a b"]["é"]'
    long = json_path(("x" * 500 + " ",))
    assert len(long) < 80
    assert long.endswith('…"]')
    assert json_path(("\u202e\n",)) == '$["\\u202e\\n"]'  # no bidi or control characters


# ----------------------------------------------------------------------------- canonical
def test_rfc8785_main_example() -> None:
    data = (
        b'{\n  "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],\n'
        b'  "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",\n'
        b'  "literals": [null, true, false]\n}'
    )
    expected = (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    ).encode()
    assert canonical(parse_strict(data)) == expected


def test_rfc8785_sorts_keys_by_utf16_code_units() -> None:
    data = (
        b'{"\\u20ac":"Euro Sign","\\r":"Carriage Return","\\ufb33":"Hebrew Letter Dalet With '
        b'Dagesh","1":"One","\\ud83d\\ude00":"Emoji: Grinning Face","\\u0080":"Control",'
        b'"\\u00f6":"Latin Small Letter O With Diaeresis"}'
    )
    names = json.loads(canonical(parse_strict(data)), object_pairs_hook=list)
    assert [value for _, value in names] == [
        "Carriage Return",
        "One",
        "Control",
        "Latin Small Letter O With Diaeresis",
        "Euro Sign",
        "Emoji: Grinning Face",  # U+1F600 is D83D DE00 in UTF-16: before U+FB33
        "Hebrew Letter Dalet With Dagesh",
    ]


@pytest.mark.parametrize(
    ("bits", "text"),
    [
        ("0000000000000000", "0"),
        ("8000000000000000", "0"),
        ("0000000000000001", "5e-324"),
        ("8000000000000001", "-5e-324"),
        ("7fefffffffffffff", "1.7976931348623157e+308"),
        ("ffefffffffffffff", "-1.7976931348623157e+308"),
        ("4340000000000000", "9007199254740992"),
        ("c340000000000000", "-9007199254740992"),
        ("4430000000000000", "295147905179352830000"),
        ("44b52d02c7e14af5", "9.999999999999997e+22"),
        ("44b52d02c7e14af6", "1e+23"),
        ("44b52d02c7e14af7", "1.0000000000000001e+23"),
        ("444b1ae4d6e2ef4e", "999999999999999700000"),
        ("444b1ae4d6e2ef4f", "999999999999999900000"),
        ("444b1ae4d6e2ef50", "1e+21"),
        ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
        ("3eb0c6f7a0b5ed8d", "0.000001"),
        ("41b3de4355555553", "333333333.3333332"),
        ("41b3de4355555554", "333333333.33333325"),
        ("41b3de4355555555", "333333333.3333333"),
        ("41b3de4355555556", "333333333.3333334"),
        ("41b3de4355555557", "333333333.33333343"),
        ("becbf647612f3696", "-0.0000033333333333333333"),
        ("43143ff3c1cb0959", "1424953923781206.2"),
    ],
)
def test_rfc8785_number_serialisation(bits: str, text: str) -> None:
    value = struct.unpack(">d", bytes.fromhex(bits))[0]
    assert canonical(value) == text.encode()
    assert canonical([value]) == f"[{text}]".encode()


def test_canonical_makes_equal_messages_equal_bytes() -> None:
    variants = [
        b'{"b":[1,"\\u00e9"],"a":{"y":true,"x":null}}',
        '{\n  "a": {"x": null, "y": true},\n  "b": [1.0, "é"]\n}'.encode(),
        b'{"a":{"x":null,"y":true},"b":[1e0,"\\u00E9"]}',
        b'{"b":[10E-1,"\\u00e9"],"a":{"y":true,"x":null}}',
    ]
    outputs = {canonical(parse_strict(v)) for v in variants}
    assert outputs == {'{"a":{"x":null,"y":true},"b":[1,"é"]}'.encode()}


def test_canonical_integers_are_doubles() -> None:
    assert canonical(2**53) == b"9007199254740992"
    assert canonical(2**53 + 1) == b"9007199254740992"  # nearest double, as RFC 8785 says
    assert canonical(-(10**21)) == b"-1e+21"
    assert canonical(True) == b"true"  # bool is not written as 1


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        float("inf"),
        {1: "x"},
        {"a": {None: 1}},
        (1, 2),
        {1, 2},
        b"x",
        "\ud800",
        {"k": object()},
        10**400,
    ],
)
def test_canonical_refuses_non_json(value: Any) -> None:
    with pytest.raises(ValueError):
        canonical(value)


def test_canonical_refuses_too_deep() -> None:
    value: Any = 1
    for _ in range(300):
        value = [value]
    with pytest.raises(ValueError, match="nested deeper"):
        canonical(value)


# ----------------------------------------------------------------------------- formats
@pytest.mark.parametrize(
    ("fmt", "text", "ok"),
    [
        ("date-time", "2025-03-14T09:26:53+08:00", True),
        ("date-time", "2025-03-14T09:26:53.120Z", True),
        ("date-time", "2025-03-14t09:26:53z", True),  # RFC 3339 allows lower case
        ("date-time", "2024-02-29T00:00:00Z", True),
        ("date-time", "1998-12-31T23:59:60Z", True),  # a leap second
        ("date-time", "1998-12-31T15:59:60.5-08:00", True),  # same second, other zone
        ("date-time", "1998-12-31T22:59:60Z", False),
        ("date-time", "2025-03-14T09:26:53", False),  # no time zone
        ("date-time", "2025-03-14 09:26:53Z", False),
        ("date-time", "2023-02-29T00:00:00Z", False),
        ("date-time", "1900-02-29T00:00:00Z", False),
        ("date-time", "2025-04-31T00:00:00Z", False),
        ("date-time", "2025-03-14T24:00:00Z", False),
        ("date-time", "2025-03-14T09:60:00Z", False),
        ("date-time", "2025-03-14T09:26:53+24:00", False),
        ("date-time", "2025-03-14T09:26:53+0800", False),
        ("date-time", "2025-03-14T09:26:53Z\n", False),
        ("date-time", "\uff12\uff10\uff12\uff15-03-14T09:26:53Z", False),  # full-width digits
        ("date", "2000-02-29", True),
        ("date", "2100-02-29", False),
        ("date", "2025-13-01", False),
        ("date", "2025-1-01", False),
        ("uuid", "3f6c1a52-8d2e-4b7a-9c41-2f5e8b0d7a13", True),
        ("uuid", "3F6C1A52-8D2E-4B7A-9C41-2F5E8B0D7A13", True),
        ("uuid", "3f6c1a528d2e4b7a9c412f5e8b0d7a13", False),
        ("uuid", "{3f6c1a52-8d2e-4b7a-9c41-2f5e8b0d7a13}", False),
        ("uuid", "3f6c1a52-8d2e-4b7a-9c41-2f5e8b0d7a1g", False),
        ("email", "zhang.wei@example.cn", True),
        ("email", "a+tag@mail.gov.cn", True),
        ("email", "zhang..wei@example.cn", False),
        ("email", "zhang@example", False),
        ("email", "张伟@example.cn", False),
        ("email", "a@-example.cn", False),
        ("email", "x" * 65 + "@example.cn", False),
        ("cn-resident-id", "11010519491231002X", True),  # the GB 11643 sample
        ("cn-resident-id", "440304198506123156", True),
        ("cn-resident-id", "110105194912310021", False),  # wrong check character
        ("cn-resident-id", "11010519491231002x", False),  # lower-case x
        ("cn-resident-id", "11010519490231002X", False),  # 31 February
        ("cn-resident-id", "110105199001001237", False),  # day 00 (check character right)
        ("cn-resident-id", "110105199001011232", True),
        ("cn-resident-id", "01010519491231002X", False),  # no region starts with 0
        ("cn-resident-id", "1101051949123100", False),
        ("cn-resident-id", "11010518491231002X", False),  # born in 1849
    ],
)
def test_formats(fmt: str, text: str, ok: bool) -> None:
    checker, what = jsondoc.FORMATS[fmt]
    assert checker(text) is ok
    assert what


# ----------------------------------------------------------------------------- schemas
def test_schema_copies_are_identical() -> None:
    packaged = sorted(p.name for p in PACKAGED.glob("*.json"))
    assert packaged == sorted(p.name for p in MIRROR.glob("*.json"))
    assert {APP, NOTICE} <= {name.removesuffix(".schema.json") for name in packaged}
    for name in packaged:
        assert (PACKAGED / name).read_bytes() == (MIRROR / name).read_bytes(), name


def _object_schemas(node: Any, where: str = "#") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        if node.get("type") == "object":
            found.append((where, node))
        for key, value in node.items():
            if key != "examples":
                found += _object_schemas(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _object_schemas(value, f"{where}/{i}")
    return found


def test_registry_loads_the_packaged_schemas(registry: SchemaRegistry) -> None:
    assert registry.ids == (NOTICE, APP)
    for name in registry.ids:
        schema = registry.schema(name)
        assert schema["$id"] == f"urn:ferry:schema:message:{name}:1"
        Draft202012Validator.check_schema(schema)
        objects = _object_schemas(schema)
        assert len(objects) >= 4
        for where, node in objects:
            assert node.get("additionalProperties") is False, f"{name} {where}"


def test_every_example_is_valid_and_canonicalises(registry: SchemaRegistry) -> None:
    for name in registry.ids:
        schema = registry.schema(name)
        validator = reference(schema)
        assert len(schema["examples"]) >= 1
        for item in schema["examples"]:
            registry.validate(name, item)
            assert list(validator.iter_errors(item)) == []
            pretty = json.dumps(item, ensure_ascii=True, indent=3).encode()
            value, canon = registry.check(name, pretty)
            assert value == item
            assert canon == canonical(item)
            assert json.loads(canon) == item


def test_check_gives_the_same_bytes_for_equal_messages(registry: SchemaRegistry) -> None:
    item = example(registry)
    shuffled = dict(reversed(list(item.items())))
    encodings = [
        json.dumps(item, ensure_ascii=False).encode(),
        json.dumps(shuffled, ensure_ascii=True, indent=2).encode(),
        json.dumps(item, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode(),
        json.dumps(item, ensure_ascii=False).replace('"size": 482113', '"size": 482113.0').encode(),
    ]
    results = [registry.check(APP, data) for data in encodings]
    assert len({canon for _, canon in results}) == 1
    assert results[0][1] == canonical(item)
    assert b" " not in results[0][1].replace(b" ", b"")  # no insignificant whitespace
    assert results[3][0]["attachments"][0]["size"] == 482113  # 482113.0 is an integer


def test_check_with_astral_characters_sorts_keys_as_utf16(registry: SchemaRegistry) -> None:
    item = example(registry)
    item["content"]["description"] = "申请人姓名含生僻字𠮷 😀"
    value, canon = registry.check(APP, json.dumps(item, ensure_ascii=False).encode())
    assert canon == canonical(value)
    assert "𠮷".encode() in canon


def test_check_rejects_non_objects_and_unknown_schemas(registry: SchemaRegistry) -> None:
    for data in (b"[1]", b'"x"', b"12", b"null"):
        with pytest.raises(MessageRejected) as info:
            registry.check(APP, data)
        assert info.value.reason_code == "NOT_AN_OBJECT"
    for call in (lambda: registry.check("nope", b"{}"), lambda: registry.validate("nope", {})):
        with pytest.raises(MessageRejected) as info:
            call()
        assert info.value.reason_code == "UNKNOWN_SCHEMA"
        assert APP in str(info.value)


def test_check_reports_parse_problems_before_schema_problems(registry: SchemaRegistry) -> None:
    item = example(registry)
    text = json.dumps(item, ensure_ascii=False)
    cases = {
        "DUPLICATE_KEY": text.replace('"title"', '"channel": "web", "title"'),
        "NUMBER_TOO_LONG": text.replace("482113", "4" * 45),
        "NON_FINITE_NUMBER": text.replace("482113", "NaN"),
    }
    for reason, bad in cases.items():
        with pytest.raises(MessageRejected) as info:
            registry.check(APP, bad.encode())
        assert info.value.reason_code == reason


def _set(path: tuple[Any, ...], value: Any) -> Any:
    def mutate(doc: Any) -> None:
        for part in path[:-1]:
            doc = doc[part]
        doc[path[-1]] = value

    return mutate


def _drop(path: tuple[Any, ...]) -> Any:
    def mutate(doc: Any) -> None:
        for part in path[:-1]:
            doc = doc[part]
        del doc[path[-1]]

    return mutate


@pytest.mark.parametrize(
    ("schema", "mutate", "path", "words"),
    [
        (APP, _set(("applicant", "id_number"), "110105194912310021"), "$.applicant.id_number",
         "resident ID number"),
        (APP, _set(("attachments", 2, "sha256"), "ABC"), "$.attachments[2].sha256",
         "64 lower-case hexadecimal"),
        (APP, _drop(("applicant", "name")), "$.applicant.name", "required member is missing"),
        (APP, _set(("applicant", "nickname"), "x"), "$.applicant.nickname", "unexpected member"),
        (APP, _set(("submitted_at",), "2025-03-14 09:00"), "$.submitted_at", "RFC 3339"),
        (APP, _set(("attachments", 0, "size"), "12"), "$.attachments[0].size",
         'expected an integer, got a string "12"'),
        (APP, _set(("attachments", 0, "size"), True), "$.attachments[0].size",
         "expected an integer, got true"),
        (APP, _set(("attachments", 0, "size"), 0), "$.attachments[0].size", "at least 1"),
        (APP, _set(("attachments", 0, "size"), 2.5), "$.attachments[0].size", "an integer"),
        (APP, _set(("attachments", 0, "media_type"), "text/html"), "$.attachments[0].media_type",
         "one of"),
        (APP, _set(("attachments",), [{}] * 21), "$.attachments", "at most 20 items, got 21"),
        (APP, _set(("channel",), "fax"), "$.channel", 'got "fax"'),
        (APP, _set(("consent", "privacy_notice_accepted"), False),
         "$.consent.privacy_notice_accepted", "expected true, got false"),
        (APP, _set(("applicant", "phone"), "12812345678"), "$.applicant.phone", "mobile number"),
        (APP, _set(("applicant", "email"), "not-an-email"), "$.applicant.email", "e-mail"),
        (APP, _set(("applicant", "address", "detail"), "a\u0000b"), "$.applicant.address.detail",
         "no control characters"),
        (APP, _set(("applicant", "name"), "张"), "$.applicant.name", "at least 2 characters"),
        (APP, _set(("region_code",), "110105\n"), "$.region_code", "6 digits"),
        (APP, _set(("content", "form", 1, "field"), "Bad-Field"), "$.content.form[1].field",
         "field code"),
        (APP, _set(("application_id",), "3f6c1a52"), "$.application_id", "UUID"),
        (APP, _set(("applicant",), []), "$.applicant", "expected an object, got an array"),
        (NOTICE, _set(("security_marking",), "机密"), "$.security_marking", '"公开", "内部"'),
        (NOTICE, _set(("recipients",), []), "$.recipients", "at least 1 items"),
        (NOTICE, _set(("recipients", 1, "code"), "123"), "$.recipients[1].code",
         "unified social credit code"),
        (NOTICE, _set(("document_number",), "朝政办发[2025]12号"), "$.document_number",
         "document number"),
        (NOTICE, _set(("effective_date",), "2025-02-30"), "$.effective_date", "calendar date"),
        (NOTICE, _set(("contact", "phone"), "010-1234"), "$.contact.phone", "landline"),
        (NOTICE, _set(("urgency",), "urgent"), "$.urgency", "one of"),
    ],
)  # fmt: skip
def test_schema_rejections_name_path_and_expectation(
    registry: SchemaRegistry, schema: str, mutate: Any, path: str, words: str
) -> None:
    item = example(registry, schema)
    mutate(item)
    with pytest.raises(MessageRejected) as info:
        registry.validate(schema, item)
    assert info.value.reason_code == "SCHEMA_INVALID"
    assert info.value.json_path == path
    assert words in str(info.value)
    assert list(reference(registry.schema(schema)).iter_errors(item)) or (
        path == "$.region_code"  # jsonschema's Python '$' accepts a trailing newline
    )
    with pytest.raises(MessageRejected) as again:
        registry.check(schema, json.dumps(item, ensure_ascii=False).encode())
    assert (again.value.reason_code, again.value.json_path) == ("SCHEMA_INVALID", path)


def test_error_messages_quote_values_safely(registry: SchemaRegistry) -> None:
    item = example(registry)
    item["channel"] = "\u202e" + "x" * 1000
    with pytest.raises(MessageRejected) as info:
        registry.validate(APP, item)
    message = str(info.value)
    assert len(message) < 400
    assert "\u202e" not in message
    assert "\\u202e" in message


# ----------------------------------------------------------------------------- registry errors
def _write_schema(folder: Path, name: str, **changes: Any) -> Path:
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:ferry:schema:message:{name}:1",
        "type": "object",
        "additionalProperties": False,
        "properties": {"a": {"type": "string"}},
        "examples": [{"a": "x"}],
    }
    schema.update(changes)
    path = folder / f"{name}.schema.json"
    path.write_text(json.dumps(schema), encoding="utf-8")
    return path


def test_registry_loads_a_custom_folder(tmp_path: Path) -> None:
    _write_schema(tmp_path, "ping")
    registry = SchemaRegistry.load(tmp_path)
    assert registry.ids == ("ping",)
    assert registry.check("ping", b'{"a":"y"}') == ({"a": "y"}, b'{"a":"y"}')


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"properties": {"a": {"type": "string", "uniqueItems": True}}}, "uniqueItems"),
        ({"properties": {"a": {"type": "string", "format": "ipv4"}}}, "format 'ipv4'"),
        ({"properties": {"a": {"type": "string", "anyOf": [{"type": "string"}]}}}, "anyOf"),
        ({"properties": {"a": {"$ref": "https://example.com/x"}}}, "only local references"),
        ({"properties": {"a": {"$ref": "#/$defs/a"}}, "$defs": {"a": {"$ref": "#/$defs/a"}}},
         "recursion"),
        ({"examples": [{"a": 1}]}, "examples[0]"),
        ({"$id": "urn:ferry:schema:message:other:1"}, "$id"),
        ({"type": "objekt"}, "objekt"),
        ({"properties": {"a": {"enum": ["x"]}}}, "needs one type"),
        ({"properties": {"a": {"type": ["string", "null"]}}}, "needs one type"),
        ({"additionalProperties": True}, "additionalProperties: false"),
        ({"properties": {"a": {"type": "object"}}}, "additionalProperties: false"),
        ({"properties": {"a": {"type": "array"}}}, "arrays need items"),
        ({"properties": {"a": {"type": "string", "pattern": "("}}}, "not a schema at $.properties"),
        ({"properties": {"a": {"type": "string", "pattern": "^a.c$"}}}, "'.' matches differently"),
        ({"properties": {"a": {"type": "string", "pattern": "^\\s+$"}}}, "ECMA-262"),
        ({"properties": {"a": {"type": "string", "pattern": "[^\\S]"}}}, "ECMA-262"),
        ({"properties": {"a": {"type": "string", "pattern": "^[]a]$"}}}, "'[]'"),
    ],
)  # fmt: skip
def test_registry_refuses_what_it_cannot_enforce(
    tmp_path: Path, changes: dict[str, Any], words: str
) -> None:
    path = _write_schema(tmp_path, "bad", **changes)
    with pytest.raises(ConfigError) as info:
        SchemaRegistry.load(tmp_path)
    assert str(path) in str(info.value)
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("pattern", "example"),
    [(r"^a\.c$", "a.c"), (r"^[.]+$", ".."), (r"^[a.]$", "."), (r"^\\s$", "\\s"),
     (r"^[^\n]*$", "x y"), (r"^[ \t]+$", " ")],
)  # fmt: skip
def test_patterns_that_mean_the_same_in_ecma_are_taken(
    tmp_path: Path, pattern: str, example: str
) -> None:
    _write_schema(
        tmp_path,
        "ok",
        properties={"a": {"type": "string", "pattern": pattern}},
        examples=[{"a": example}],
    )
    assert SchemaRegistry.load(tmp_path)


def test_registry_refuses_an_empty_folder_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no"):
        SchemaRegistry.load(tmp_path)
    (tmp_path / "x.schema.json").write_bytes(b'{"a":1,"a":2}')
    with pytest.raises(ConfigError, match="DUPLICATE_KEY"):
        SchemaRegistry.load(tmp_path)


def test_number_fields_take_the_exact_path(tmp_path: Path) -> None:
    """Floats and big integers are parsed by the stdlib and written by the RFC 8785 writer."""
    _write_schema(
        tmp_path,
        "measure",
        properties={"v": {"type": "array", "items": {"type": "number"}}, "n": {"type": "integer"}},
        examples=[],
    )
    registry = SchemaRegistry.load(tmp_path)
    value, canon = registry.check("measure", b'{"v":[1.50,1e30,-0.0],"n":18446744073709551617}')
    assert value == {"v": [1.5, 1e30, -0.0], "n": 18446744073709551617}
    assert canon == b'{"n":18446744073709552000,"v":[1.5,1e+30,0]}'
    with pytest.raises(MessageRejected, match="NUMBER_TOO_LONG"):
        registry.check("measure", b'{"n":' + b"7" * 50 + b"}")
    with pytest.raises(MessageRejected, match=r"SCHEMA_INVALID: \$\.v\[0\]: expected a number"):
        registry.check("measure", b'{"v":["1"]}')


def test_compiler_keywords_agree_with_jsonschema(tmp_path: Path) -> None:
    properties = {
        "level": {"type": "integer", "enum": [1, 2, 3]},
        "kind": {"type": "string", "const": "x"},
        "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "count": {"type": "integer", "minimum": -5, "maximum": 5},
        "none": {"type": "null"},
        "flag": {"type": "boolean"},
        "tags": {"type": "array", "minItems": 1, "maxItems": 2, "items": {"type": "string"}},
    }
    _write_schema(
        tmp_path, "kw", properties=properties, minProperties=1, maxProperties=4, examples=[]
    )
    registry = SchemaRegistry.load(tmp_path)
    validator = reference(dict(registry.schema("kw")))
    docs = [
        {"level": 2.0}, {"level": True}, {"level": 4}, {"kind": "y"}, {"kind": "x"},
        {"ratio": 1}, {"ratio": 0.0}, {"ratio": 0.999}, {"count": -6}, {"count": 5},
        {"count": "5"}, {"none": 0}, {"none": None}, {"flag": 1}, {"flag": False}, {},
        {"tags": []}, {"tags": ["a", "b", "c"]}, {"tags": ["a", 1]}, {"tags": ["a"]},
        {"level": 1, "kind": "x", "ratio": 0.5, "none": None, "flag": True}, {"other": 1},
    ]  # fmt: skip
    for doc in docs:
        errors = list(validator.iter_errors(doc))
        try:
            registry.validate("kw", doc)
            path = None
        except MessageRejected as exc:
            path = exc.json_path
        if path is None:
            assert errors == [], doc
        else:
            assert any(path.startswith(e.json_path) for e in errors), (doc, path)


# ----------------------------------------------------------------------------- fast paths
def test_the_deepest_allowed_nesting_parses_although_orjson_stops_at_254() -> None:
    limits = JsonLimits(max_depth=256)
    for depth in (254, 255, 256):
        value = parse_strict(b"[" * depth + b"]" * depth, limits)
        assert canonical(value) == b"[" * depth + b"]" * depth
    assert rejected(b"[" * 257 + b"]" * 257, limits).reason_code == "TOO_DEEP"


def test_resident_id_check_character_by_base_13() -> None:
    """int(digits, 13) * 2 % 11 is the GB 11643 weighted sum (13 is 2 modulo 11)."""
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    rng = random.Random(11643)
    for _ in range(2000):
        body = (
            f"{rng.randint(1, 8)}{rng.randint(0, 99999):05d}{rng.choice(['19', '20'])}"
            f"{rng.randint(0, 99):02d}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
            f"{rng.randint(0, 999):03d}"
        )
        expected = "10X98765432"[sum(int(c) * w for c, w in zip(body, weights, strict=True)) % 11]
        for check in "0123456789Xx":
            assert jsondoc.is_cn_resident_id(body + check) is (check == expected), body + check


_LONG_DOMAIN = "b" * 63 + "." + "c" * 63 + "." + "d" * 63 + "."


@pytest.mark.parametrize(
    ("fmt", "text", "shortcut"),
    [
        ("date-time", "2025-03-14T09:26:53.120+08:00", True),
        ("date-time", "2025-03-14t09:26:53z", True),
        ("date-time", "2025-03-28T23:59:59-00:00", True),
        ("date-time", "2024-02-29T00:00:00Z", False),  # days 29-31: the calendar decides
        ("date-time", "2025-04-31T00:00:00Z", False),
        ("date-time", "1998-12-31T23:59:60Z", False),  # second 60: idem
        ("date-time", "1998-12-31T22:59:60Z", False),
        ("date-time", "2025-03-14T09:26:53Z\n", False),
        ("date-time", "2025-03-14T09:26:53", False),
        ("date", "2025-03-28", True),
        ("date", "2000-02-29", False),
        ("date", "2100-02-29", False),
        ("date", "2025-03-01\n", False),
        ("uuid", "3f6c1a52-8d2e-4b7a-9c41-2f5e8b0d7a13", True),
        ("uuid", "3F6C1A52-8D2E-4B7A-9C41-2F5E8B0D7A13", True),
        ("uuid", "3f6c1a52-8d2e-4b7a-9c41-2f5e8b0d7a13\n", False),
        ("email", "zhang.wei@example.cn", True),
        ("email", "x" * 64 + "@example.cn", True),
        ("email", "x" * 65 + "@example.cn", False),
        ("email", "a@" + _LONG_DOMAIN + "e" * 57 + ".cn", True),  # 254 characters
        ("email", "a@" + _LONG_DOMAIN + "e" * 58 + ".cn", False),  # 255
        ("email", "a.b@c.d@example.cn", False),
        ("email", "zhang@example.cn\n", False),
    ],
)
def test_format_shortcuts_only_accept_what_the_checker_accepts(
    fmt: str, text: str, shortcut: bool
) -> None:
    checker, _ = jsondoc.FORMATS[fmt]
    assert (jsondoc._FORMAT_SHORTCUTS[fmt](text) is not None) is shortcut
    if shortcut:
        assert checker(text)


@pytest.mark.parametrize(
    ("pattern", "run"),
    [
        ("^[0-9a-f]{64}$", (b"0123456789abcdef", 64, 64)),
        ("^[0-9]{6}$", (b"0123456789", 6, 6)),
        ("^[a-c_]+$", (b"_abc", 1, None)),
        ("^[A-C]*$", (b"ABC", 0, None)),
        ("^[a-c]{2,}$", (b"abc", 2, None)),
        ("^[a-c-]{2,5}$", (b"-abc", 2, 5)),
        ("^[ -!]{0}$", (b" !", 0, 0)),
        ("^[^a-c]{2}$", None),  # negated
        ("^[\\d]{2}$", None),  # escapes
        ("^[a-c]{2}", None),  # no end
        ("[a-c]{2}$", None),  # no start
        ("^[a-c]{2}\\$", None),
        ("^[一-龥]{2}$", None),  # not ASCII
        ("^[1-8][0-9]{5}$", None),  # two classes
        ("^[[a]{2}$", None),
    ],
)
def test_ascii_class_runs(pattern: str, run: tuple[bytes, int, int | None] | None) -> None:
    assert jsondoc._ascii_class_run(pattern) == run


@pytest.mark.parametrize(
    ("pattern", "refused"),
    [
        ("^[^\\u0000-\\u001f\\u007f]+$", ""),
        ("^[^/\\\\\\u0000-\\u001f\\u007f]+$", "/\\"),
        ("^[^\\x00-\\x1f<>]*$", "<>"),
        ("^[^\\\\u0000]+$", "0\\u"),  # an escaped backslash, then u0000 as letters
        ('^[^\\u0000-\\u001f\\u007f0-9<>&"\\\\]+$', None),  # a range of printable characters
        ("^[^abcd]+$", None),  # more than 3
        ("^[^\\u00e9]+$", None),  # refuses a character beyond ASCII
        ("^[^\\s]+$", None),
        ("^[^a]{2}$", None),
    ],
)
def test_refused_printables(pattern: str, refused: str | None) -> None:
    assert jsondoc._refused_printables(pattern) == refused


def test_shortcuts_are_in_the_packaged_validators(registry: SchemaRegistry) -> None:
    """The benchmark's message uses them; a change that loses one shows here first."""
    source = registry._compiled[APP].source
    assert "encode().translate(None," in source  # sha256
    assert "'/' not in" in source  # attachment names
    assert "except KeyError:" in source
    assert ".issuperset(" in source
    assert registry._compiled[APP].bmp_names
    assert registry._compiled[NOTICE].bmp_names
    plain = jsondoc._compile(registry.schema(APP), APP, shortcuts=False)
    assert "KeyError" not in plain.source
    assert "translate" not in plain.source
    assert not plain.bmp_names


def test_shortcut_and_plain_validators_agree_on_these(registry: SchemaRegistry) -> None:
    docs: list[Any] = []
    for name in registry.ids:
        for item in registry.schema(name)["examples"]:
            docs.append((name, copy.deepcopy(item)))
            for key in list(item):
                for change in ("drop", "extra", "both", "null"):
                    doc = copy.deepcopy(item)
                    if change in ("drop", "both"):
                        del doc[key]
                    if change in ("extra", "both"):
                        doc["zz_" + key] = 1
                    if change == "null":
                        doc[key] = None
                    docs.append((name, doc))
            applicant = copy.deepcopy(item)
            if "applicant" in applicant:
                applicant["applicant"].pop("email", None)
                applicant["applicant"]["nickname"] = "x"
                docs.append((name, applicant))
                more = copy.deepcopy(applicant)
                more["applicant"].pop("name")
                docs.append((name, more))
    plain = {n: jsondoc._compile(registry.schema(n), n, shortcuts=False) for n in registry.ids}
    for name, doc in docs:
        outcomes: list[Any] = []
        for compiled in (registry._compiled[name], plain[name]):
            try:
                outcomes.append(("ok", compiled.validate(doc)))
            except jsondoc._Invalid as exc:
                outcomes.append(("invalid", exc.path, exc.message))
        assert outcomes[0] == outcomes[1], doc


def test_check_with_astral_member_names_sorts_them_as_utf16(tmp_path: Path) -> None:
    """Member names beyond U+FFFF turn off the shortcut that trusts orjson's key order."""
    properties = {"\U0001f600": {"type": "string"}, "\ufb01": {"type": "string"}}
    _write_schema(tmp_path, "astral", properties=properties, examples=[])
    registry = SchemaRegistry.load(tmp_path)
    assert not registry._compiled["astral"].bmp_names
    value, canon = registry.check("astral", '{"\ufb01":"a","\U0001f600":"b"}'.encode())
    assert canon == '{"\U0001f600":"b","\ufb01":"a"}'.encode()  # U+D83D sorts before U+FB01
    assert canon == canonical(value)


def test_the_inside_takes_every_message_an_outside_may_accept(registry: SchemaRegistry) -> None:
    """An outside config may allow messages up to 16 MiB (channel and API max_message_size);
    the inside's re-check must not refuse as too large what the outside acknowledged."""
    assert INSIDE_MESSAGE_LIMITS.max_bytes >= MAX_MESSAGE_SIZE
    doc = example(registry)
    doc["content"]["form"] = [
        {"field": f"f{i}", "label": "x", "value": "\u0001" * 2000} for i in range(100)
    ]
    data = json.dumps(doc, ensure_ascii=False).encode()
    _, canonical = registry.check(APP, data, JsonLimits(max_bytes=2 * 1024 * 1024))
    assert len(canonical) > 1024 * 1024  # (over the default limit)
    assert registry.check(APP, canonical, INSIDE_MESSAGE_LIMITS)[1] == canonical
    with pytest.raises(MessageRejected):  # (what the inside did before)
        registry.check(APP, canonical, JsonLimits())

"""Text and CSV: encodings, control characters, formula injection."""

from __future__ import annotations

from pathlib import Path

import pytest
from content_helpers import delivered, policy, run

from outside.content.formats.csvfile import is_formula, neutralise

PROSE = "预算执行情况 Budget report\r\nline two\n"


@pytest.mark.parametrize(
    ("data", "encoding"),
    [
        (PROSE.encode("gb18030"), "gb18030"),
        (b"\xff\xfe" + PROSE.encode("utf-16-le"), "utf-16-le"),
        (b"\xfe\xff" + PROSE.encode("utf-16-be"), "utf-16-be"),
        (b"\xef\xbb\xbf" + PROSE.encode(), "utf-8"),
    ],
)
def test_text_normalised_to_utf8(tmp_path: Path, data: bytes, encoding: str) -> None:
    out = run(tmp_path, data, "a.txt")
    assert out.kind == "deliver_cleaned"
    assert delivered(out, data) == PROSE.encode("utf-8")
    assert out.report["info"]["encoding"] == encoding


def test_utf8_text_delivered_as_is(tmp_path: Path) -> None:
    data = PROSE.encode()
    out = run(tmp_path, data, "a.txt")
    assert out.kind == "deliver_as_is"
    assert out.report["sha256_in"] == out.report["sha256_out"]


def test_control_characters(tmp_path: Path) -> None:
    data = b"ok\x1b[31m red\x07\x08 \xc2\x9b text\tand\x0cpage\n"
    out = run(tmp_path, data, "a.txt")
    assert delivered(out, data) == b"ok[31m red  text\tand\x0cpage\n"
    assert out.actions[0].target == "control characters"
    assert out.actions[0].count == 4
    allow = run(tmp_path, data, "b.txt", policy(features={"control_chars": "allow"}))
    assert allow.kind == "deliver_as_is"
    refuse = run(tmp_path, data, "c.txt", policy(features={"control_chars": "disallow"}))
    assert refuse.reason == "ACTIVE_CONTENT_DISALLOWED"


@pytest.mark.parametrize(
    "data",
    [b"\x00" * 10 + b"text", b"\x00\x00\xfe\xff" + bytes(8), b"\xff\xfe\x00\xd8"],
)
def test_not_text(tmp_path: Path, data: bytes) -> None:
    assert run(tmp_path, data, "a.txt").kind == "reject"


@pytest.mark.parametrize(
    ("value", "formula"),
    [
        ("=1+1", True),
        ("+cmd", True),
        ("-2+3+cmd|' /C calc'!A0", True),
        ("@SUM(A1)", True),
        ("\tx", True),
        ("\rx", True),
        (" =1+1", True),
        ("\uff1dcmd", True),
        ("-12.5", False),
        ("+3", False),
        ("-1,234.50", False),
        ("1e-5", False),
        ("-7%", False),
        ("-", False),
        ("--", False),
        ("", False),
        ("plain", False),
        ("-.5", False),
        ("- 12", True),
    ],
)
def test_is_formula(value: str, formula: bool) -> None:
    assert is_formula(value) is formula


def test_neutralise_keeps_other_bytes() -> None:
    text = 'a,"=x,y",-12.5\r\n=1+1,"say ""hi""",@b\n"\tq",,+3\n'
    out, cells = neutralise(text, ",")
    assert out == 'a,"\'=x,y",-12.5\r\n\'=1+1,"say ""hi""",\'@b\n"\'\tq",,+3\n'
    assert len(cells) == 4


def test_csv_numbers_byte_identical(tmp_path: Path) -> None:
    data = b'n,v\n1,-12.5\n2,+3\n3,"-1,234.50"\n4,1e5\n'
    out = run(tmp_path, data, "a.csv")
    assert out.kind == "deliver_as_is"


def test_csv_semicolon_and_tsv(tmp_path: Path) -> None:
    out = run(tmp_path, b"a;b\n1;=2+3\n", "a.csv")
    assert delivered(out, b"") == b"a;b\n1;'=2+3\n"
    out = run(tmp_path, b"a\tb\n1\t@x\n", "a.tsv")
    assert delivered(out, b"") == b"a\tb\n1\t'@x\n"


def test_csv_switches(tmp_path: Path) -> None:
    data = b"a,b\n=1,2\n"
    assert run(tmp_path, data, "a.csv", policy(features={"csv_formulas": "allow"})).kind == (
        "deliver_as_is"
    )
    out = run(tmp_path, data, "b.csv", policy(features={"csv_formulas": "disallow"}))
    assert out.reason == "ACTIVE_CONTENT_DISALLOWED"


def test_gb18030_csv_gets_utf8_bom(tmp_path: Path) -> None:
    data = "名称,金额\n张三,-12.5\n".encode("gb18030")
    out = run(tmp_path, data, "a.csv")
    assert delivered(out, data) == "\ufeff名称,金额\n张三,-12.5\n".encode()


def test_utf8_bom_csv_as_is(tmp_path: Path) -> None:
    data = "\ufeff名称,金额\n张三,-12.5\n".encode()
    assert run(tmp_path, data, "a.csv").kind == "deliver_as_is"


def test_unterminated_quote(tmp_path: Path) -> None:
    assert run(tmp_path, b'a,"b\n', "a.csv").reason == "MALFORMED"

"""The inside re-check dispatcher and its text/CSV/JSON/XML/ZIP checkers; fail-closed rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from inside.recheck import RecheckResult, recheck, recheck_bytes
from tests.corpus.build_docs import simple_pdf, stream_obj, zip_bytes


def test_result_shape(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes("第一行\nsecond line\n".encode())
    result = recheck(path, "txt", None)
    assert isinstance(result, RecheckResult)
    assert result.ok
    assert "text.utf8" in result.checks


def test_unknown_type_and_missing_file_fail_closed(tmp_path: Path) -> None:
    assert not recheck_bytes(b"MZ", "exe").ok
    assert not recheck(tmp_path / "missing", "txt", None).ok


def test_checker_exception_is_a_problem() -> None:
    result = recheck_bytes(b"%PDF-1.7\n1 0 obj\n<< /A <zz> >>\nendobj\n", "pdf")
    assert not result.ok


def test_scan_hit_is_a_problem() -> None:
    def scan(data: bytes, where: str) -> None:
        if b"EVIL" in data:
            raise RuntimeError(f"signature in {where or 'file'}")

    assert not recheck_bytes(zip_bytes([("a.txt", b"EVIL")]), "zip", scan=scan).ok
    assert recheck_bytes(zip_bytes([("a.txt", b"good")]), "zip", scan=scan).ok


@pytest.mark.parametrize(
    ("data", "ok"),
    [
        (b"plain\ttext\r\n", True),
        (b"\xef\xbb\xbfbom ok", True),
        (b"bad \xff utf8", False),
        (b"nul\x00", False),
        ("c1 \u0085".encode(), False),
        (b"esc \x1b[31m", False),
    ],
)
def test_text(data: bytes, ok: bool) -> None:
    assert recheck_bytes(data, "txt").ok is ok


@pytest.mark.parametrize(
    ("data", "ok"),
    [
        (b"a,b\n1,-12.5\n", True),
        (b"a;b\n'=1+2;x\n", True),
        (b'a,b\n=HYPERLINK("http://x"),1\n', False),
        (b"a,b\n@SUM(A1),1\n", False),
        (b"a\tb\n+cmd|' /C calc'!A0\tx\n", False),
        (b"x,y\n-1e5,+3\n", True),
    ],
)
def test_csv(data: bytes, ok: bool) -> None:
    assert recheck_bytes(data, "csv").ok is ok


@pytest.mark.parametrize(
    ("data", "ok"),
    [
        (b'{"a": [1, 2, {"b": null}]}', True),
        (b'{"a": 1, "a": 2}', False),
        (b'{"a": NaN}', False),
        (b"[" * 100 + b"]" * 100, False),
        (b'{"a": 1', False),
    ],
)
def test_json(data: bytes, ok: bool) -> None:
    assert recheck_bytes(data, "json").ok is ok


@pytest.mark.parametrize(
    ("data", "ok"),
    [
        (b"<a><b>x</b></a>", True),
        (b'<!DOCTYPE a [<!ENTITY e "x">]><a>&e;</a>', False),
        (b"<a>", False),
    ],
)
def test_xml(data: bytes, ok: bool) -> None:
    assert recheck_bytes(data, "xml").ok is ok


def test_zip_members_rechecked_by_type() -> None:
    good = zip_bytes([("notes.txt", b"hello"), ("d.pdf", simple_pdf([["x"]], info=False))])
    result = recheck_bytes(good, "zip")
    assert result.ok, result.problems
    assert not recheck_bytes(zip_bytes([("run.exe", b"MZ")]), "zip").ok
    assert not recheck_bytes(zip_bytes([("../x.txt", b"a")]), "zip").ok
    assert not recheck_bytes(zip_bytes([("a.json", b'{"a":1,"a":1}')]), "zip").ok
    nested = zip_bytes(
        [("a.zip", zip_bytes([("b.zip", zip_bytes([("c.zip", zip_bytes([("d.txt", b"x")]))]))]))]
    )
    assert any("deeper" in p for p in recheck_bytes(nested, "zip").problems)


@pytest.mark.parametrize("kind", ["pdf", "png", "jpeg", "docx", "ofd", "zip"])
def test_garbage_fails_every_checker(kind: str) -> None:
    assert not recheck_bytes(b"\x00garbage" * 10, kind).ok


def test_a_pdf_stream_that_does_not_decode_is_a_problem_not_left_unscanned() -> None:
    """(The outside refuses a corrupt FlateDecode stream: one inside is a disagreement.)"""
    scanned: list[str] = []

    def scan(data: bytes, where: str) -> None:
        scanned.append(where)

    good = simple_pdf([["hello"]])
    assert recheck_bytes(good, "pdf", scan=scan).ok
    assert "stream (decoded)" in scanned
    corrupt = stream_obj(b"this is not zlib data", b"/Filter /FlateDecode ")
    result = recheck_bytes(simple_pdf([["hello"]], extra_objects=[corrupt]), "pdf", scan=scan)
    assert not result.ok
    assert any("does not decode" in p for p in result.problems), result.problems

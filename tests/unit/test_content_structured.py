"""JSON and XML files: strict parsing, schemas, DTD refusal, canonical output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from content_helpers import delivered, policy, run

from tests.corpus.gen_basic import EICAR, SCHEMA


def test_json_canonical(tmp_path: Path) -> None:
    data = b'{\n  "b": 1.0,\n  "a": ["x", 1e2]\n}'
    out = run(tmp_path, data, "a.json")
    assert delivered(out, data) == b'{"a":["x",100],"b":1}'
    canonical = b'{"a":1}'
    assert run(tmp_path, canonical, "b.json").kind == "deliver_as_is"


def test_json_big_integer_kept(tmp_path: Path) -> None:
    data = b'{"id": 12345678901234567890}'
    out = run(tmp_path, data, "a.json")
    assert out.kind == "deliver_as_is"
    assert out.report["info"]["canonical"] is False


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b'{"a":1,"a":2}', "MALFORMED"),
        (b'{"a":NaN}', "MALFORMED"),
        (b'{"a":Infinity}', "MALFORMED"),
        (b"[" * 40 + b"]" * 40, "LIMIT_EXCEEDED"),
        (b'{"a":', "MALFORMED"),
        (b"\xff\xfe{\x00}", "MALFORMED"),  # UTF-16 cut in the middle of a character
        ('{"a":"中"}'.encode("gb18030"), "MALFORMED"),
    ],
)
def test_json_refused(tmp_path: Path, data: bytes, code: str) -> None:
    assert run(tmp_path, data, "a.json").reason == code


def test_json_utf8_bom_accepted(tmp_path: Path) -> None:
    out = run(tmp_path, b'\xef\xbb\xbf{"a":1}', "a.json")
    assert delivered(out, b"") == b'{"a":1}'


def test_json_schema(tmp_path: Path) -> None:
    example = json.loads(SCHEMA.read_text("utf-8"))["examples"][0]
    pol = policy(schemas=["citizen-application"])
    ok = run(tmp_path, json.dumps(example).encode(), "a.json", pol)
    assert ok.kind != "reject"
    assert ok.report["info"]["schema"] == "citizen-application"
    bad = dict(example, extra=1)
    out = run(tmp_path, json.dumps(bad).encode(), "b.json", pol)
    assert out.reason == "SCHEMA_INVALID"
    assert "extra" in out.message
    assert run(tmp_path, b"[1]", "c.json", pol).reason == "SCHEMA_INVALID"


def test_json_eicar_in_string(tmp_path: Path) -> None:
    data = json.dumps({"note": "x " + EICAR.decode() + " y"}).encode()
    assert run(tmp_path, data, "a.json").reason == "MALWARE_SIGNATURE"


XML = b'<?xml version="1.0" encoding="UTF-8"?>\n<r b="2" a="1"><x>t</x><y/></r>\n'


def test_xml_canonical(tmp_path: Path) -> None:
    out = run(tmp_path, XML, "a.xml")
    assert delivered(out, XML) == b'<r a="1" b="2"><x>t</x><y></y></r>'
    assert run(tmp_path, b'<r a="1"></r>', "b.xml").kind == "deliver_as_is"


def test_xml_gbk_declared(tmp_path: Path) -> None:
    data = '<?xml version="1.0" encoding="GBK"?><r>中文</r>'.encode("gbk")
    assert delivered(run(tmp_path, data, "a.xml"), data) == "<r>中文</r>".encode()


def test_xml_utf16(tmp_path: Path) -> None:
    data = '<?xml version="1.0" encoding="UTF-16"?><r>中</r>'.encode("utf-16")
    assert delivered(run(tmp_path, data, "a.xml"), data) == "<r>中</r>".encode()


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b'<!DOCTYPE r SYSTEM "http://x.example/r.dtd"><r/>', "XML_DTD_FORBIDDEN"),
        (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY e "x">]><r>&e;</r>', "XML_DTD_FORBIDDEN"),
        (
            '<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><r>&x;</r>'.encode("utf-16"),
            "XML_DTD_FORBIDDEN",
        ),
        (b"<r>&undefined;</r>", "MALFORMED"),
        (b"<r><unclosed></r>", "MALFORMED"),
        (b"<r><!-- never closed </r>", "MALFORMED"),
        (b"<a/><b/>", "MALFORMED"),
    ],
)
def test_xml_refused(tmp_path: Path, data: bytes, code: str) -> None:
    assert run(tmp_path, data, "a.xml").reason == code


def test_xml_dtd_text_in_comment_or_cdata_is_fine(tmp_path: Path) -> None:
    data = b"<r><!-- <!DOCTYPE x> --><![CDATA[<!ENTITY y>]]></r>"
    assert run(tmp_path, data, "a.xml").kind != "reject"


def test_xml_external_links(tmp_path: Path) -> None:
    data = (
        b'<?xml-stylesheet href="http://x.example/s.xsl"?><!--c-->'
        b'<r xmlns:xi="http://www.w3.org/2001/XInclude">a<xi:include href="/etc/passwd"/>b'
        b"</r><!--end-->"
    )
    out = run(tmp_path, data, "a.xml")
    body = delivered(out, data)
    assert b"stylesheet" not in body
    assert b"xi:include" not in body
    assert b"<!--c-->" in body
    assert b"ab</r>" in body
    assert b"<!--end-->" in body
    refused = run(tmp_path, data, "b.xml", policy(features={"external_links": "disallow"}))
    assert refused.reason == "ACTIVE_CONTENT_DISALLOWED"


def test_xml_schema(tmp_path: Path) -> None:
    xsd = tmp_path / "r.xsd"
    xsd.write_text(
        '<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">'
        '<xs:element name="r" type="xs:integer"/></xs:schema>'
    )
    pol = policy(xml_schemas=[str(xsd)])
    assert run(tmp_path, b"<r>12</r>", "a.xml", pol).kind != "reject"
    assert run(tmp_path, b"<r>twelve</r>", "b.xml", pol).reason == "SCHEMA_INVALID"

"""OOXML sanitizer (allow-list rebuild) and the inside part/relationship re-check."""

# ruff: noqa: E501  (fixtures are literal PDF/XML byte strings; wrapping them hurts reading)

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import pytest
from msoffcrypto.format.ooxml import OOXMLFile
from PIL import Image

from ferry.content.base import Limits, Reject
from inside.recheck import recheck_bytes
from outside.content.formats.ooxml import sanitize
from tests.content_ctx import ctx, run
from tests.corpus.build_docs import docx, pptx, xlsx, zip_bytes

PARAS = ["关于召开年度工作会议的通知", "Meeting on 12 May in room 301.", "Contact: office 3"]
VBA_CT = "application/vnd.ms-office.vbaProject"
VBA_REL = "http://schemas.microsoft.com/office/2006/relationships/vbaProject"
# Not a full VBA project: a CFB header and the source a macro would carry. The sanitizer
# removes the part by relationship and content type, whatever its bytes.
VBA_BIN = (
    b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
    + b"\x00" * 504
    + b'Attribute VB_Name = "ThisDocument"\nSub AutoOpen()\nShell "calc.exe"\nEnd Sub\n'
)
DDE_FIELD = (
    '<w:p><w:r><w:fldChar w:fldCharType="begin"/></w:r><w:r><w:instrText xml:space="preserve"> DDE'
    '</w:instrText></w:r><w:r><w:instrText xml:space="preserve">AUTO c:\\\\windows\\\\system32\\\\cmd.exe "/k calc"'
    '</w:instrText></w:r><w:r><w:fldChar w:fldCharType="separate"/></w:r><w:r><w:t>shown result</w:t></w:r>'
    '<w:r><w:fldChar w:fldCharType="end"/></w:r></w:p>'
)


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def texts(data: bytes) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        out = []
        for name in sorted(zf.namelist()):
            if name.endswith(".xml") and not name.startswith(("docProps", "[")):
                out += re.findall(
                    r"<(?:w:|a:)?t(?: [^>]*)?>([^<]*)</(?:w:|a:)?t>", zf.read(name).decode()
                )
        return out


def hostile() -> dict[str, tuple[str, bytes]]:
    image_rel = [("rIdImg", "image", "media/image1.png")]
    return {
        "docm_macro": (
            "docm",
            docx(
                PARAS,
                kind="docm",
                doc_rels=[("rIdV", VBA_REL, "vbaProject.bin")],
                extra_parts=[("word/vbaProject.bin", VBA_BIN)],
                defaults={"bin": VBA_CT},
            ),
        ),
        "template_injection": (
            "docx",
            docx(
                PARAS,
                settings_rels=[("rIdT", "attachedTemplate", "http://127.0.0.1/t.dotm", "External")],
                settings_extra='<w:attachedTemplate r:id="rIdT"/>',
            ),
        ),
        "ddeauto": ("docx", docx(PARAS, body_extra=DDE_FIELD)),
        "dde_fldsimple": (
            "docx",
            docx(
                PARAS,
                body_extra='<w:p><w:fldSimple w:instr=" DDEAUTO cmd /c calc"><w:r><w:t>x</w:t></w:r></w:fldSimple></w:p>',
            ),
        ),
        "includepicture": (
            "docx",
            docx(
                PARAS,
                body_extra='<w:p><w:fldSimple w:instr="INCLUDEPICTURE &quot;http://198.51.100.7/p.png&quot; \\d"/></w:p>',
            ),
        ),
        "external_image_and_link": (
            "docx",
            docx(
                PARAS,
                body_extra='<w:p><w:hyperlink r:id="rIdH"><w:r><w:t>portal</w:t></w:r></w:hyperlink></w:p>'
                '<w:p><w:r><w:drawing><a:blip r:link="rIdL"/></w:drawing></w:r></w:p>',
                doc_rels=[
                    ("rIdH", "hyperlink", "http://198.51.100.7/", "External"),
                    ("rIdL", "image", "\\\\198.51.100.7\\share\\beacon.png", "External"),
                ],
            ),
        ),
        "ole_embedding": (
            "docx",
            docx(
                PARAS,
                body_extra='<w:p><w:r><w:object><v:shape><v:imagedata r:id="rIdImg"/></v:shape><o:OLEObject ProgID="Package" r:id="rIdO"/></w:object></w:r></w:p>',
                doc_rels=[("rIdO", "oleObject", "embeddings/oleObject1.bin"), *image_rel],
                extra_parts=[
                    (
                        "word/embeddings/oleObject1.bin",
                        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1\x01Ole10Native evil.bat",
                    ),
                    ("word/media/image1.png", png()),
                ],
                defaults={"bin": "application/vnd.openxmlformats-officedocument.oleObject"},
            ),
        ),
        "activex": (
            "docx",
            docx(
                PARAS,
                body_extra='<w:p><w:r><w:control r:id="rIdX" w:name="CommandButton1"/></w:r></w:p>',
                doc_rels=[("rIdX", "control", "activeX/activeX1.xml")],
                extra_parts=[
                    (
                        "word/activeX/activeX1.xml",
                        b'<?xml version="1.0"?><ax:ocx xmlns:ax="http://schemas.microsoft.com/office/2006/activeX" ax:classid="{D7053240-CE69-11CD-A777-00DD01143C57}"/>',
                    )
                ],
                overrides={"word/activeX/activeX1.xml": "application/vnd.ms-office.activeX+xml"},
            ),
        ),
        "smuggled_part": (
            "docx",
            docx(PARAS, extra_parts=[("word/payload.exe", b"MZ\x90\x00" * 10)]),
        ),
        "xlsx_external_link": (
            "xlsx",
            xlsx(
                [["Budget", 100.0]],
                formulas={"C1": "[1]Sheet1!A1"},
                wb_rels=[("rIdE", "externalLink", "externalLinks/externalLink1.xml")],
                extra_parts=[
                    (
                        "xl/externalLinks/externalLink1.xml",
                        b'<?xml version="1.0"?><externalLink xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships"><externalBook r:id="rId1"/></externalLink>',
                    ),
                    (
                        "xl/externalLinks/_rels/externalLink1.xml.rels",
                        b'<?xml version="1.0"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/externalLinkPath" Target="file:///\\\\198.51.100.7\\s\\book.xlsx" TargetMode="External"/></Relationships>',
                    ),
                ],
                overrides={
                    "xl/externalLinks/externalLink1.xml": "application/vnd.openxmlformats-officedocument.spreadsheetml.externalLink+xml"
                },
            ),
        ),
        "xlsx_dde_formula": ("xlsx", xlsx([["a", 1.0]], formulas={"C1": "cmd|' /C calc'!A0"})),
        "xlsm_macro": (
            "xlsm",
            xlsx(
                [["a", 1.0]],
                kind="xlsm",
                wb_rels=[("rIdV", VBA_REL, "vbaProject.bin")],
                extra_parts=[("xl/vbaProject.bin", VBA_BIN)],
                overrides={"xl/vbaProject.bin": VBA_CT},
            ),
        ),
        "pptx_program_click": (
            "pptx",
            pptx(
                ["Slide one"],
                shape_extra='<a:hlinkClick xmlns:a="http://schemas.openxmlformats.org/drawingml/2006/main" r:id="rIdP" action="ppaction://program"/>',
                slide_rels=[
                    ("rIdP", "hyperlink", "file:///c:/windows/system32/calc.exe", "External")
                ],
            ),
        ),
        "pptm_macro": (
            "pptm",
            pptx(
                ["Slide"],
                kind="pptm",
                pres_rels=[("rIdV", VBA_REL, "vbaProject.bin")],
                extra_parts=[("ppt/vbaProject.bin", VBA_BIN)],
                overrides={"ppt/vbaProject.bin": VBA_CT},
            ),
        ),
    }


@pytest.mark.parametrize("name", sorted(hostile()))
def test_hostile_cleaned_recheck(name: str, tmp_path: Path) -> None:
    kind, data = hostile()[name]
    before = recheck_bytes(data, kind)
    assert not before.ok, "the re-check must see the hostile input"
    result, out = run(sanitize, data, tmp_path, "x." + kind)
    assert result.cleaned
    assert result.type_name == {"docm": "docx", "xlsm": "xlsx", "pptm": "pptx"}.get(kind, kind)
    after = recheck_bytes(out, result.type_name)
    assert after.ok, after.problems
    for t in texts(data):
        if t not in ("shown result",):
            assert t in texts(out)
    lowered = out.lower()
    assert b"vbaproject" not in lowered
    assert b"macroenabled" not in lowered
    with zipfile.ZipFile(io.BytesIO(out)) as zf:
        blob = b"".join(zf.read(n) for n in zf.namelist())
    for bad in (b"calc", b"198.51.100.7", b"127.0.0.1", b"MZ\x90", b"Ole10Native", b"activeX1"):
        assert bad not in blob, bad


@pytest.mark.parametrize("kind", ["docx", "xlsx", "pptx"])
def test_benign_preserved(kind: str, tmp_path: Path) -> None:
    if kind == "docx":
        data = docx(
            PARAS,
            doc_rels=[("rIdImg", "image", "media/image1.png")],
            extra_parts=[("word/media/image1.png", png())],
            body_extra='<w:p><w:r><w:drawing><a:blip r:embed="rIdImg"/></w:drawing></w:r></w:p>',
        )
    elif kind == "xlsx":
        data = xlsx([["名称", "金额"], ["办公用品", 1250.5]], formulas={"C2": "SUM(B2:B2)"})
    else:
        data = pptx(["第一页", "Second slide"])
    result, out = run(sanitize, data, tmp_path, "x." + kind)
    assert result.type_name == kind
    assert texts(out) == texts(data)
    assert recheck_bytes(out, kind).ok
    with zipfile.ZipFile(io.BytesIO(out)) as zf:
        names = zf.namelist()
        if kind == "docx":
            assert zf.read("word/media/image1.png") == png()
            assert b'r:embed="rIdImg"' in zf.read("word/document.xml")
        if kind == "xlsx":
            assert b"SUM(B2:B2)" in zf.read("xl/worksheets/sheet1.xml")
    assert not any(n.startswith("docProps/") for n in names)


def test_metadata_allowed_keeps_docprops(tmp_path: Path) -> None:
    _, out = run(sanitize, docx(PARAS), tmp_path, "x.docx", ctx({"metadata": "allow"}))
    with zipfile.ZipFile(io.BytesIO(out)) as zf:
        assert b"Wang Fang" in zf.read("docProps/core.xml")
    assert recheck_bytes(out, "docx", {"features": {"metadata": "allow"}}).ok


def test_hyperlinks_allowed(tmp_path: Path) -> None:
    _, data = hostile()["external_image_and_link"]
    policy = {"hyperlinks": "allow"}
    _, out = run(sanitize, data, tmp_path, "x.docx", ctx(policy))
    with zipfile.ZipFile(io.BytesIO(out)) as zf:
        rels = zf.read("word/_rels/document.xml.rels")
    assert b"http://198.51.100.7/" in rels
    assert b"beacon" not in rels
    assert recheck_bytes(out, "docx", {"features": policy}).ok


def test_macros_disallowed(tmp_path: Path) -> None:
    _, data = hostile()["docm_macro"]
    with pytest.raises(Reject) as err:
        run(sanitize, data, tmp_path, "x.docm", ctx({"macros": "disallow"}))
    assert err.value.code == "ACTIVE_CONTENT_DISALLOWED"


def test_encrypted_docx(tmp_path: Path) -> None:
    plain = tmp_path / "plain.docx"
    plain.write_bytes(docx(PARAS))
    enc = io.BytesIO()
    with plain.open("rb") as fh:
        OOXMLFile(fh).encrypt("secret", enc)
    with pytest.raises(Reject) as err:
        run(sanitize, enc.getvalue(), tmp_path, "x.docx")
    assert err.value.code == "ENCRYPTED"
    assert not recheck_bytes(enc.getvalue(), "docx").ok


def test_dtd_forbidden(tmp_path: Path) -> None:
    data = docx(PARAS)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        members = [(n, zf.read(n)) for n in zf.namelist()]
    members = [
        (
            n,
            b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]>' + d.split(b"?>", 1)[1]
            if n == "word/styles.xml"
            else d,
        )
        for n, d in members
    ]
    with pytest.raises(Reject) as err:
        run(sanitize, zip_bytes(members), tmp_path, "x.docx")
    assert err.value.code == "XML_DTD_FORBIDDEN"


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("../evil.xml", "ARCHIVE_TRAVERSAL"),
        ("/abs.xml", "ARCHIVE_TRAVERSAL"),
        ("word\\x.xml", "ARCHIVE_TRAVERSAL"),
        ("WORD/DOCUMENT.XML", "MALFORMED"),
    ],
)
def test_zip_level(name: str, code: str, tmp_path: Path) -> None:
    with zipfile.ZipFile(io.BytesIO(docx(PARAS))) as zf:
        members = [(n, zf.read(n)) for n in zf.namelist()]
    with pytest.raises(Reject) as err:
        run(sanitize, zip_bytes([*members, (name, b"<x/>")]), tmp_path, "x.docx")
    assert err.value.code == code


def test_zip_bomb_and_entry_limit(tmp_path: Path) -> None:
    data = docx(PARAS, extra_parts=[("word/media/zeros.png", b"\x00" * (8 * 1024 * 1024))])
    with pytest.raises(Reject) as err:
        run(
            sanitize, data, tmp_path, "x.docx", ctx(limits=Limits(archive_expanded=4 * 1024 * 1024))
        )
    assert err.value.code == "ARCHIVE_BOMB"
    with pytest.raises(Reject) as err:
        run(sanitize, data, tmp_path, "x.docx")
    assert err.value.code == "ARCHIVE_BOMB"  # ratio above 100
    with pytest.raises(Reject) as err:
        run(sanitize, docx(PARAS), tmp_path, "x.docx", ctx(limits=Limits(archive_entries=3)))
    assert err.value.code == "ARCHIVE_BOMB"


def test_not_ooxml(tmp_path: Path) -> None:
    for data, code in (
        (b"PK\x03\x04garbage", "MALFORMED"),
        (zip_bytes([("a.txt", b"x")]), "MALFORMED"),
    ):
        with pytest.raises(Reject) as err:
            run(sanitize, data, tmp_path, "x.docx")
        assert err.value.code == code


def test_recheck_flags_orphans_and_dangling() -> None:
    data = docx(PARAS, extra_parts=[("word/payload.bin", b"x")])
    assert any(
        "not reached" in p
        for p in recheck_bytes(data, "docx", {"features": {"metadata": "allow"}}).problems
    )

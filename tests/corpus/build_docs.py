"""Fixture builders for the document corpus: raw PDF bytes, OOXML packages, OFD packages.

Everything is built from the stdlib (plus Pillow for pixels) at run time; nothing is
downloaded. Used by ``tests/corpus/gen_docs.py`` and the unit tests of the format modules.
"""

# ruff: noqa: E501  (fixtures are literal PDF/XML byte strings; wrapping them hurts reading)

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Iterable, Sequence

# --------------------------------------------------------------------------- PDF


def pdf_text_stream(lines: Sequence[str], *, x: int = 72, y: int = 720) -> bytes:
    """A page content stream drawing ``lines`` (ASCII) with /F1."""
    ops = [b"BT /F1 12 Tf 14 TL", f"{x} {y} Td".encode()]
    for line in lines:
        esc = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        ops.append(f"({esc}) Tj T*".encode("latin-1"))
    ops.append(b"ET")
    return b"\n".join(ops)


def stream_obj(body: bytes, extra: bytes = b"", *, compress: bool = False) -> bytes:
    if compress:
        body = zlib.compress(body)
        extra = b"/Filter /FlateDecode " + extra
    return b"<< " + extra + b"/Length %d >>\nstream\n" % len(body) + body + b"\nendstream"


def raw_pdf(
    objects: Sequence[bytes],
    *,
    root: int = 1,
    info: int | None = None,
    trailer_extra: bytes = b"",
    header: bytes = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
) -> bytes:
    """Assemble objects (numbered 1..n, generation 0) with a classic xref table."""
    out = bytearray(header)
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    trailer = b"/Size %d /Root %d 0 R " % (len(objects) + 1, root)
    if info:
        trailer += b"/Info %d 0 R " % info
    out += b"trailer\n<< " + trailer + trailer_extra + b">>\nstartxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def incremental_update(base: bytes, updates: dict[int, bytes], size: int, root: int = 1) -> bytes:
    """Append an incremental update replacing objects ``updates`` (number → body)."""
    prev = int(base.rsplit(b"startxref", 1)[1].split()[0])
    out = bytearray(base)
    offs = {}
    for num, body in sorted(updates.items()):
        offs[num] = len(out)
        out += b"%d 0 obj\n" % num + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n"
    for num, off in sorted(offs.items()):
        out += b"%d 1\n%010d 00000 n \n" % (num, off)
    out += b"trailer\n<< /Size %d /Root %d 0 R /Prev %d >>\nstartxref\n%d\n%%%%EOF\n" % (
        size,
        root,
        prev,
        xref,
    )
    return bytes(out)


def simple_pdf(
    pages: Sequence[Sequence[str]],
    *,
    catalog_extra: bytes = b"",
    page_extra: bytes = b"",
    extra_objects: Sequence[bytes] = (),
    info: bool = True,
    compress: bool = True,
) -> bytes:
    """A PDF with one text page per entry of ``pages``.

    Objects: 1 catalog, 2 pages, 3 font, 4 info, then per page (page, content), then
    ``extra_objects`` numbered from ``first_extra(len(pages))``.
    """
    n = len(pages)
    kids = b" ".join(b"%d 0 R" % (5 + 2 * i) for i in range(n))
    objs: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R " + catalog_extra + b">>",
        b"<< /Type /Pages /Kids ["
        + kids
        + b"] /Count %d " % n
        + b"/MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Title (Quarterly report) /Author (Zhang Wei) /Producer (ferry tests) >>",
    ]
    for i, lines in enumerate(pages):
        objs.append(
            b"<< /Type /Page /Parent 2 0 R /Contents %d 0 R " % (6 + 2 * i) + page_extra + b">>"
        )
        objs.append(stream_obj(pdf_text_stream(lines), compress=compress))
    objs.extend(extra_objects)
    return raw_pdf(objs, info=4 if info else None)


def first_extra(npages: int) -> int:
    return 5 + 2 * npages


# --------------------------------------------------------------------------- ZIP helpers


def zip_bytes(
    members: Iterable[tuple[str, bytes]], *, compression: int = zipfile.ZIP_DEFLATED
) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), data, compression)
    return buf.getvalue()


# --------------------------------------------------------------------------- PNG helpers


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


# --------------------------------------------------------------------------- OOXML

_CT = "application/vnd.openxmlformats-officedocument."
_R = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_PKG_R = "http://schemas.openxmlformats.org/package/2006/relationships"
W_NS = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
MAIN_CT = {
    "docx": _CT + "wordprocessingml.document.main+xml",
    "docm": "application/vnd.ms-word.document.macroEnabled.main+xml",
    "xlsx": _CT + "spreadsheetml.sheet.main+xml",
    "xlsm": "application/vnd.ms-excel.sheet.macroEnabled.main+xml",
    "pptx": _CT + "presentationml.presentation.main+xml",
    "pptm": "application/vnd.ms-powerpoint.presentation.macroEnabled.main+xml",
}


def rels_xml(rels: Sequence[tuple[str, str, str] | tuple[str, str, str, str]]) -> bytes:
    """(Id, type short name or full URI, Target[, TargetMode])."""
    out = [
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>',
        f'<Relationships xmlns="{_PKG_R}">',
    ]
    for rel in rels:
        rid, kind, target = rel[0], rel[1], rel[2]
        uri = kind if "/" in kind else f"{_R}/{kind}"
        mode = f' TargetMode="{rel[3]}"' if len(rel) > 3 else ""
        out.append(f'<Relationship Id="{rid}" Type="{uri}" Target="{target}"{mode}/>')
    out.append("</Relationships>")
    return "".join(out).encode()


def content_types(overrides: dict[str, str], defaults: dict[str, str] | None = None) -> bytes:
    d = {
        "rels": "application/vnd.openxmlformats-package.relationships+xml",
        "xml": "application/xml",
        "png": "image/png",
        "jpeg": "image/jpeg",
    }
    d.update(defaults or {})
    out = [
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>',
        '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">',
    ]
    out += [f'<Default Extension="{k}" ContentType="{v}"/>' for k, v in d.items()]
    out += [f'<Override PartName="/{k}" ContentType="{v}"/>' for k, v in overrides.items()]
    out.append("</Types>")
    return "".join(out).encode()


CORE_XML = (
    b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    b'<cp:coreProperties xmlns:cp="http://schemas.openxmlformats.org/package/2006/metadata/core-properties" '
    b'xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:creator>Wang Fang</dc:creator>'
    b"<dc:title>Internal memo</dc:title><cp:lastModifiedBy>Li Na</cp:lastModifiedBy></cp:coreProperties>"
)


def word_paragraphs(paragraphs: Sequence[str], extra: str = "") -> bytes:
    body = "".join(
        f'<w:p><w:r><w:t xml:space="preserve">{_esc(p)}</w:t></w:r></w:p>' for p in paragraphs
    )
    return (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        f'<w:document xmlns:w="{W_NS}" xmlns:r="{_R}" '
        'xmlns:a="http://schemas.openxmlformats.org/drawingml/2006/main" '
        'xmlns:o="urn:schemas-microsoft-com:office:office" xmlns:v="urn:schemas-microsoft-com:vml" '
        'xmlns:mc="http://schemas.openxmlformats.org/markup-compatibility/2006" '
        'xmlns:w14="http://schemas.microsoft.com/office/word/2010/wordml" mc:Ignorable="w14">'
        f"<w:body>{body}{extra}<w:sectPr/></w:body></w:document>"
    ).encode()


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def docx(
    paragraphs: Sequence[str],
    *,
    kind: str = "docx",
    body_extra: str = "",
    doc_rels: Sequence[tuple[str, ...]] = (),
    extra_parts: Sequence[tuple[str, bytes]] = (),
    overrides: dict[str, str] | None = None,
    defaults: dict[str, str] | None = None,
    settings_rels: Sequence[tuple[str, ...]] = (),
    settings_extra: str = "",
) -> bytes:
    ov = {
        "word/document.xml": MAIN_CT[kind],
        "word/styles.xml": _CT + "wordprocessingml.styles+xml",
        "word/settings.xml": _CT + "wordprocessingml.settings+xml",
        "docProps/core.xml": "application/vnd.openxmlformats-package.core-properties+xml",
        "docProps/app.xml": _CT + "extended-properties+xml",
    }
    ov.update(overrides or {})
    styles = f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><w:styles xmlns:w="{W_NS}"/>'.encode()
    settings = (
        f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><w:settings xmlns:w="{W_NS}" '
        f'xmlns:r="{_R}">{settings_extra}<w:defaultTabStop w:val="720"/></w:settings>'
    ).encode()
    app = (
        b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><Properties xmlns="http://schemas.'
        b'openxmlformats.org/officeDocument/2006/extended-properties"><Application>Microsoft Office '
        b"Word</Application><Company>Ministry</Company></Properties>"
    )
    members: list[tuple[str, bytes]] = [
        ("[Content_Types].xml", content_types(ov, defaults)),
        (
            "_rels/.rels",
            rels_xml(
                [
                    ("rId1", "officeDocument", "word/document.xml"),
                    (
                        "rId2",
                        "http://schemas.openxmlformats.org/package/2006/relationships/metadata/core-properties",
                        "docProps/core.xml",
                    ),
                    ("rId3", "extended-properties", "docProps/app.xml"),
                ]
            ),
        ),
        ("word/document.xml", word_paragraphs(paragraphs, body_extra)),
        (
            "word/_rels/document.xml.rels",
            rels_xml(
                [
                    ("rIdS1", "styles", "styles.xml"),
                    ("rIdS2", "settings", "settings.xml"),
                    *doc_rels,  # type: ignore[list-item]
                ]
            ),
        ),
        ("word/styles.xml", styles),
        ("word/settings.xml", settings),
        ("docProps/core.xml", CORE_XML),
        ("docProps/app.xml", app),
    ]
    if settings_rels:
        members.append(("word/_rels/settings.xml.rels", rels_xml(settings_rels)))  # type: ignore[arg-type]
    members.extend(extra_parts)
    return zip_bytes(members)


def xlsx(
    rows: Sequence[Sequence[str | float]],
    *,
    kind: str = "xlsx",
    formulas: dict[str, str] | None = None,
    wb_rels: Sequence[tuple[str, ...]] = (),
    extra_parts: Sequence[tuple[str, bytes]] = (),
    overrides: dict[str, str] | None = None,
    wb_extra: str = "",
) -> bytes:
    """One sheet; strings inline. ``formulas`` maps a cell ref (e.g. "C1") to a formula."""
    ns = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    cells = []
    for r, row in enumerate(rows, start=1):
        cs = []
        for c, value in enumerate(row):
            ref = f"{chr(65 + c)}{r}"
            if isinstance(value, str):
                cs.append(f'<c r="{ref}" t="inlineStr"><is><t>{_esc(value)}</t></is></c>')
            else:
                cs.append(f'<c r="{ref}"><v>{value}</v></c>')
        for ref, f in (formulas or {}).items():
            if ref[1:] == str(r):
                cs.append(f'<c r="{ref}"><f>{_esc(f)}</f><v>0</v></c>')
        cells.append(f'<row r="{r}">{"".join(cs)}</row>')
    sheet = (
        f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><worksheet xmlns="{ns}" '
        f'xmlns:r="{_R}"><sheetData>{"".join(cells)}</sheetData></worksheet>'
    ).encode()
    wb = (
        f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><workbook xmlns="{ns}" '
        f'xmlns:r="{_R}"><sheets><sheet name="Sheet1" sheetId="1" r:id="rIdW1"/></sheets>{wb_extra}</workbook>'
    ).encode()
    ov = {
        "xl/workbook.xml": MAIN_CT[kind],
        "xl/worksheets/sheet1.xml": _CT + "spreadsheetml.worksheet+xml",
        "docProps/core.xml": "application/vnd.openxmlformats-package.core-properties+xml",
    }
    ov.update(overrides or {})
    members: list[tuple[str, bytes]] = [
        ("[Content_Types].xml", content_types(ov)),
        (
            "_rels/.rels",
            rels_xml(
                [
                    ("rId1", "officeDocument", "xl/workbook.xml"),
                    (
                        "rId2",
                        "http://schemas.openxmlformats.org/package/2006/relationships/metadata/core-properties",
                        "docProps/core.xml",
                    ),
                ]
            ),
        ),
        ("xl/workbook.xml", wb),
        (
            "xl/_rels/workbook.xml.rels",
            rels_xml([("rIdW1", "worksheet", "worksheets/sheet1.xml"), *wb_rels]),
        ),  # type: ignore[list-item]
        ("xl/worksheets/sheet1.xml", sheet),
        ("docProps/core.xml", CORE_XML),
    ]
    members.extend(extra_parts)
    return zip_bytes(members)


def pptx(
    texts: Sequence[str],
    *,
    kind: str = "pptx",
    shape_extra: str = "",
    slide_rels: Sequence[tuple[str, ...]] = (),
    extra_parts: Sequence[tuple[str, bytes]] = (),
    pres_rels: Sequence[tuple[str, ...]] = (),
    overrides: dict[str, str] | None = None,
) -> bytes:
    """One slide per text (a text box each); no layouts (enough for parsers, not PowerPoint)."""
    p = "http://schemas.openxmlformats.org/presentationml/2006/main"
    a = "http://schemas.openxmlformats.org/drawingml/2006/main"
    ov = {"ppt/presentation.xml": MAIN_CT[kind]}
    members: list[tuple[str, bytes]] = []
    ids = []
    prels: list[tuple[str, ...]] = []
    for i, text in enumerate(texts, start=1):
        slide = (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><p:sld xmlns:p="{p}" xmlns:a="{a}" '
            f'xmlns:r="{_R}"><p:cSld><p:spTree><p:sp><p:nvSpPr><p:cNvPr id="2" name="T">{shape_extra}'
            f"</p:cNvPr><p:cNvSpPr/><p:nvPr/></p:nvSpPr><p:spPr/><p:txBody><a:bodyPr/><a:p><a:r><a:t>{_esc(text)}</a:t>"
            "</a:r></a:p></p:txBody></p:sp></p:spTree></p:cSld></p:sld>"
        ).encode()
        members.append((f"ppt/slides/slide{i}.xml", slide))
        if slide_rels:
            members.append((f"ppt/slides/_rels/slide{i}.xml.rels", rels_xml(slide_rels)))  # type: ignore[arg-type]
        ov[f"ppt/slides/slide{i}.xml"] = _CT + "presentationml.slide+xml"
        ids.append(f'<p:sldId id="{255 + i}" r:id="rIdP{i}"/>')
        prels.append((f"rIdP{i}", "slide", f"slides/slide{i}.xml"))
    ov.update(overrides or {})
    pres = (
        f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><p:presentation xmlns:p="{p}" '
        f'xmlns:r="{_R}"><p:sldIdLst>{"".join(ids)}</p:sldIdLst><p:sldSz cx="9144000" cy="6858000"/>'
        "</p:presentation>"
    ).encode()
    return zip_bytes(
        [
            ("[Content_Types].xml", content_types(ov)),
            ("_rels/.rels", rels_xml([("rId1", "officeDocument", "ppt/presentation.xml")])),
            ("ppt/presentation.xml", pres),
            ("ppt/_rels/presentation.xml.rels", rels_xml([*prels, *pres_rels])),  # type: ignore[list-item]
            *members,
            *extra_parts,
        ]
    )


# --------------------------------------------------------------------------- OFD

OFD_NS = "http://www.ofdspec.org/2016"
_X = '<?xml version="1.0" encoding="UTF-8"?>'


def ofd(
    pages: Sequence[str],
    *,
    image: bytes | None = None,
    actions: bool = False,
    attachment: bytes | None = None,
    multimedia: bool = False,
    custom_tags: bool = False,
    extensions: bool = False,
    external_font: str | None = None,
    external_image: str | None = None,
    signatures: bool = False,
    dtd: bool = False,
    traversal_member: bool = False,
    traversal_locator: bool = False,
    metadata: bool = True,
    extra_members: Sequence[tuple[str, bytes]] = (),
) -> bytes:
    """A small OFD (GB/T 33190) package: one TextObject per page, optional image on page 1,
    and the hostile features asked for."""
    ns = f'xmlns:ofd="{OFD_NS}"'
    info = "<ofd:DocInfo><ofd:DocID>6c1d2a3b4e5f60718293a4b5c6d7e8f9</ofd:DocID>"
    if metadata:
        info += (
            "<ofd:Title>关于会议的通知</ofd:Title><ofd:Author>王芳</ofd:Author>"
            "<ofd:CreationDate>2024-05-01</ofd:CreationDate>"
            '<ofd:CustomDatas><ofd:CustomData Name="dept">办公厅</ofd:CustomData></ofd:CustomDatas>'
        )
    info += "</ofd:DocInfo>"
    sig = "<ofd:Signatures>Doc_0/Signs/Signatures.xml</ofd:Signatures>" if signatures else ""
    doctype = '<!DOCTYPE ofd:OFD [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>' if dtd else ""
    ofd_xml = (
        f'{_X}{doctype}<ofd:OFD {ns} Version="1.0" DocType="OFD"><ofd:DocBody>{info}'
        f"<ofd:DocRoot>Doc_0/Document.xml</ofd:DocRoot>{sig}</ofd:DocBody></ofd:OFD>"
    )
    page_refs = "".join(
        f'<ofd:Page ID="{10 + i}" BaseLoc="Pages/Page_{i}/Content.xml"/>' for i in range(len(pages))
    )
    doc_extra = ""
    if actions:
        doc_extra += (
            '<ofd:Actions><ofd:Action Event="DO"><ofd:URI URI="http://198.51.100.7/beacon"/></ofd:Action>'
            '<ofd:Action Event="DO"><ofd:Sound ResourceID="99"/></ofd:Action></ofd:Actions>'
        )
    if attachment is not None:
        doc_extra += "<ofd:Attachments>Attachs/Attachments.xml</ofd:Attachments>"
    if custom_tags:
        doc_extra += "<ofd:CustomTags>Tags/CustomTag.xml</ofd:CustomTags>"
    if extensions:
        doc_extra += "<ofd:Extensions>Extensions.xml</ofd:Extensions>"
    document = (
        f"{_X}<ofd:Document {ns}><ofd:CommonData><ofd:MaxUnitID>99</ofd:MaxUnitID><ofd:PageArea>"
        "<ofd:PhysicalBox>0 0 210 297</ofd:PhysicalBox></ofd:PageArea><ofd:PublicRes>PublicRes.xml</ofd:PublicRes>"
        "<ofd:DocumentRes>DocumentRes.xml</ofd:DocumentRes></ofd:CommonData>"
        f"<ofd:Pages>{page_refs}</ofd:Pages>{doc_extra}</ofd:Document>"
    )
    font_file = f"<ofd:FontFile>{external_font}</ofd:FontFile>" if external_font else ""
    public = (
        f'{_X}<ofd:Res {ns} BaseLoc="Res"><ofd:Fonts><ofd:Font ID="2" FontName="宋体" FamilyName="宋体">'
        f"{font_file}</ofd:Font></ofd:Fonts></ofd:Res>"
    )
    media = ""
    if image is not None:
        media += '<ofd:MultiMedia ID="5" Type="Image" Format="PNG"><ofd:MediaFile>image_5.png</ofd:MediaFile></ofd:MultiMedia>'
    if external_image:
        media += f'<ofd:MultiMedia ID="6" Type="Image"><ofd:MediaFile>{external_image}</ofd:MediaFile></ofd:MultiMedia>'
    if multimedia:
        media += '<ofd:MultiMedia ID="7" Type="Video" Format="MP4"><ofd:MediaFile>movie_7.mp4</ofd:MediaFile></ofd:MultiMedia>'
    if traversal_locator:
        media += '<ofd:MultiMedia ID="8" Type="Image"><ofd:MediaFile>../../../etc/passwd</ofd:MediaFile></ofd:MultiMedia>'
    docres = f'{_X}<ofd:Res {ns} BaseLoc="Res"><ofd:MultiMedias>{media}</ofd:MultiMedias></ofd:Res>'
    members: list[tuple[str, bytes]] = [
        ("OFD.xml", ofd_xml.encode()),
        ("Doc_0/Document.xml", document.encode()),
        ("Doc_0/PublicRes.xml", public.encode()),
        ("Doc_0/DocumentRes.xml", docres.encode()),
    ]
    for i, text in enumerate(pages):
        objs = (
            f'<ofd:TextObject ID="{100 + i}" Boundary="20 20 170 10" Font="2" Size="5">'
            f'<ofd:FillColor Value="0 0 0"/><ofd:TextCode X="0" Y="5">{_esc(text)}</ofd:TextCode>'
        )
        if actions:
            objs += (
                '<ofd:Actions><ofd:Action Event="CLICK"><ofd:URI URI="http://198.51.100.7/x"/></ofd:Action>'
                "</ofd:Actions>"
            )
        objs += "</ofd:TextObject>"
        if image is not None and i == 0:
            objs += '<ofd:ImageObject ID="300" ResourceID="5" Boundary="20 40 50 50" CTM="50 0 0 50 0 0"/>'
        page_actions = (
            (
                '<ofd:Actions><ofd:Action Event="PO"><ofd:Goto><ofd:Dest Type="XYZ" PageID="10"/></ofd:Goto>'
                "</ofd:Action></ofd:Actions>"
            )
            if actions
            else ""
        )
        content = (
            f'{_X}<ofd:Page {ns}><ofd:Content><ofd:Layer ID="{200 + i}">{objs}</ofd:Layer></ofd:Content>'
            f"{page_actions}</ofd:Page>"
        )
        members.append((f"Doc_0/Pages/Page_{i}/Content.xml", content.encode()))
    if image is not None:
        members.append(("Doc_0/Res/image_5.png", image))
    if multimedia:
        members.append(("Doc_0/Res/movie_7.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64))
    if attachment is not None:
        members.append(
            (
                "Doc_0/Attachs/Attachments.xml",
                (
                    f'{_X}<ofd:Attachments {ns}><ofd:Attachment ID="1" Name="readme" Format="exe" Visible="true">'
                    "<ofd:FileLoc>readme.exe</ofd:FileLoc></ofd:Attachment></ofd:Attachments>"
                ).encode(),
            )
        )
        members.append(("Doc_0/Attachs/readme.exe", attachment))
    if custom_tags:
        members.append(
            (
                "Doc_0/Tags/CustomTag.xml",
                (
                    f'{_X}<ofd:CustomTags {ns}><ofd:CustomTag TypeID="invoice"><ofd:FileLoc>tag_invoice.xml</ofd:FileLoc>'
                    "</ofd:CustomTag></ofd:CustomTags>"
                ).encode(),
            )
        )
        members.append(
            (
                "Doc_0/Tags/tag_invoice.xml",
                b'<?xml version="1.0"?><Invoice><Amount>100</Amount></Invoice>',
            )
        )
    if extensions:
        members.append(
            (
                "Doc_0/Extensions.xml",
                (
                    f'{_X}<ofd:Extensions {ns}><ofd:Extension AppName="x" RefId="100"><ofd:Property Name="run">'
                    "cmd.exe</ofd:Property></ofd:Extension></ofd:Extensions>"
                ).encode(),
            )
        )
    if signatures:
        members.append(
            (
                "Doc_0/Signs/Signatures.xml",
                (
                    f'{_X}<ofd:Signatures {ns}><ofd:Signature ID="1" BaseLoc="Sign_0/Signature.xml"/></ofd:Signatures>'
                ).encode(),
            )
        )
        members.append(("Doc_0/Signs/Sign_0/Signature.xml", f"{_X}<ofd:Signature {ns}/>".encode()))
        members.append(("Doc_0/Signs/Sign_0/SignedValue.dat", b"\x30\x82\x01\x00" + b"\x00" * 60))
    if traversal_member:
        members.append(("../../escape.txt", b"escaped"))
    members.extend(extra_members)
    return zip_bytes(members)

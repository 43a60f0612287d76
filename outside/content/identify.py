"""Content-based type identification, extension agreement and polyglot detection.

:func:`identify` looks at the bytes only: signatures at offset 0, then structure (OOXML by
its ``[Content_Types].xml`` main part, OFD by ``OFD.xml``, the end of a PNG, JPEG, GIF, BMP,
PDF or ZIP), then text (UTF-8, GB18030, UTF-16 with a byte order mark) and what the text is
(script, HTML, SVG, RTF, or plain). It raises ``Reject`` for a polyglot (a second container
that tools would open: a ZIP end record anywhere, ``%PDF-`` in the first kilobyte after
offset 0, bytes after the end of an image, PDF or ZIP), for encrypted Office files and for
damaged structure. :func:`check_extension` then requires the name's extension to agree.

Types ferry delivers: pdf png jpeg gif bmp tiff docx xlsx pptx docm xlsm pptm ofd zip txt csv
json xml. Types it recognises only to refuse (:data:`REFUSED_TYPES`): ole (legacy Office and
other Compound File Binary), rtf, html, svg, exe (PE, ELF, Mach-O, Java class, ...), script,
archive (gzip, 7z, RAR, tar, ...), ooxml-other (templates, add-ins, binary workbooks), odf,
unknown.
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass

from ferry.content.base import Reject
from outside.content import zipstruct
from outside.content.names import split_extension

SUPPORTED_TYPES = (
    "pdf", "png", "jpeg", "gif", "bmp", "tiff", "docx", "xlsx", "pptx", "docm", "xlsm", "pptm",
    "ofd", "zip", "txt", "csv", "json", "xml",
)  # fmt: skip
REFUSED_TYPES = (
    "ole", "rtf", "html", "svg", "exe", "script", "archive", "ooxml-other", "odf", "unknown",
)  # fmt: skip
TEXT_TYPES = frozenset({"txt", "csv", "json", "xml"})
ZIP_TYPES = frozenset({"zip", "docx", "xlsx", "pptx", "docm", "xlsm", "pptm", "ofd"})

DESCRIPTIONS = {
    "ole": "a legacy Office or other Compound File (OLE) document",
    "rtf": "an RTF document",
    "html": "an HTML page",
    "svg": "an SVG drawing",
    "exe": "a program (executable)",
    "script": "a script",
    "archive": "a compressed archive of a kind other than ZIP",
    "ooxml-other": "an Office template, add-in or binary workbook",
    "odf": "an OpenDocument file",
    "unknown": "a file of unknown type",
}

# How far into a file a PDF reader looks for "%PDF-" (Acrobat: the first 1024 bytes).
PDF_HEADER_WINDOW = 1024
# Bytes of text examined for its kind (script, HTML, SVG, ...).
TEXT_SAMPLE = 64 * 1024
# [Content_Types].xml and OFD.xml are small; a huge one is not a real document.
MAX_MANIFEST_BYTES = 1024 * 1024

_F = frozenset
EXTENSION_TYPES: dict[str, frozenset[str]] = {
    "pdf": _F({"pdf"}),
    "png": _F({"png"}),
    **dict.fromkeys(("jpg", "jpeg", "jpe", "jfif"), _F({"jpeg"})),
    "gif": _F({"gif"}),
    **dict.fromkeys(("bmp", "dib"), _F({"bmp"})),
    **dict.fromkeys(("tif", "tiff"), _F({"tiff"})),
    **dict.fromkeys(("docx", "docm"), _F({"docx", "docm"})),
    **dict.fromkeys(("xlsx", "xlsm"), _F({"xlsx", "xlsm"})),
    **dict.fromkeys(("pptx", "pptm"), _F({"pptx", "pptm"})),
    "ofd": _F({"ofd"}),
    "zip": _F({"zip"}),
    **dict.fromkeys(("txt", "text", "log", "md"), _F({"txt"})),
    **dict.fromkeys(("csv", "tsv"), _F({"csv"})),
    "json": _F({"json"}),
    "xml": _F({"xml"}),
    **dict.fromkeys(
        [
            "doc",
            "dot",
            "xls",
            "xlt",
            "xla",
            "ppt",
            "pot",
            "pps",
            "msg",
            "vsd",
            "pub",
            "mpp",
            "wps",
            "et",
            "dps",
        ],
        _F({"ole"}),
    ),
    "rtf": _F({"rtf"}),
    **dict.fromkeys(["html", "htm", "xhtml", "xht", "shtml", "hta", "mht", "mhtml"], _F({"html"})),
    **dict.fromkeys(("svg", "svgz"), _F({"svg"})),
    **dict.fromkeys(
        [
            "exe",
            "dll",
            "com",
            "scr",
            "sys",
            "drv",
            "cpl",
            "ocx",
            "msi",
            "msp",
            "pif",
            "elf",
            "so",
            "dylib",
            "class",
            "dex",
            "wasm",
        ],
        _F({"exe"}),
    ),
    **dict.fromkeys(
        [
            "js",
            "jse",
            "mjs",
            "vbs",
            "vbe",
            "wsf",
            "wsh",
            "wsc",
            "sct",
            "ps1",
            "psm1",
            "psd1",
            "bat",
            "cmd",
            "sh",
            "bash",
            "zsh",
            "ksh",
            "csh",
            "py",
            "pyw",
            "pl",
            "rb",
            "php",
            "lua",
            "tcl",
            "applescript",
            "scpt",
            "reg",
            "inf",
            "lnk",
            "url",
            "scf",
            "jar",
        ],
        _F({"script"}),
    ),
    **dict.fromkeys(
        [
            "gz",
            "tgz",
            "7z",
            "rar",
            "tar",
            "bz2",
            "tbz2",
            "xz",
            "txz",
            "zst",
            "lz",
            "lzma",
            "cab",
            "iso",
            "arj",
            "z",
        ],
        _F({"archive"}),
    ),
    **dict.fromkeys(
        [
            "dotx",
            "dotm",
            "xltx",
            "xltm",
            "xlsb",
            "xlam",
            "potx",
            "potm",
            "ppsx",
            "ppsm",
            "ppam",
            "sldx",
        ],
        _F({"ooxml-other"}),
    ),
    **dict.fromkeys(["odt", "ods", "odp", "odg", "epub"], _F({"odf"})),
}

_OOXML_MAIN = {
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml": "docx",
    "application/vnd.ms-word.document.macroenabled.main+xml": "docm",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml": "xlsx",
    "application/vnd.ms-excel.sheet.macroenabled.main+xml": "xlsm",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation.main+xml": "pptx",
    "application/vnd.ms-powerpoint.presentation.macroenabled.main+xml": "pptm",
}
_OOXML_OTHER = re.compile(
    rb"(wordprocessingml\.template|spreadsheetml\.template|presentationml\.(slideshow|template)"
    rb"|macroenabledtemplate|slideshow\.macroenabled|template\.macroenabled"
    rb"|sheet\.binary|addin\.macroenabled|presentationml\.slide\+xml\b)",
    re.IGNORECASE,
)

_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "pdf"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),
    (b"MM\x00+", "tiff"),
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "ole"),
    (b"{\\rt", "rtf"),
    (b"MZ", "exe"),
    (b"\x7fELF", "exe"),
    (b"\xfe\xed\xfa\xce", "exe"),
    (b"\xfe\xed\xfa\xcf", "exe"),
    (b"\xce\xfa\xed\xfe", "exe"),
    (b"\xcf\xfa\xed\xfe", "exe"),
    (b"\xca\xfe\xba\xbe", "exe"),
    (b"dex\n", "exe"),
    (b"\x00asm", "exe"),
    (b"L\x00\x00\x00\x01\x14\x02\x00", "script"),  # Windows shortcut (.lnk)
    (b"\x1f\x8b", "archive"),
    (b"7z\xbc\xaf\x27\x1c", "archive"),
    (b"Rar!\x1a\x07", "archive"),
    (b"BZh", "archive"),
    (b"\xfd7zXZ\x00", "archive"),
    (b"\x28\xb5\x2f\xfd", "archive"),
    (b"MSCF", "archive"),
    (b"#!", "script"),
    (b"\xef\xbb\xbf#!", "script"),
)


@dataclass(frozen=True)
class Identity:
    type_name: str  # one of SUPPORTED_TYPES or REFUSED_TYPES
    detail: str  # what was seen, for reports ("PNG image", "UTF-16 text")

    @property
    def supported(self) -> bool:
        return self.type_name in SUPPORTED_TYPES


def describe(type_name: str) -> str:
    return DESCRIPTIONS.get(type_name, f"a {type_name.upper()} file")


def identify(data: bytes, name: str) -> Identity:
    """The type of ``data`` by content; ``name`` only splits text kinds (txt/csv/json/xml).
    Raises Reject for polyglots, encrypted Office files and broken structure."""
    kind = _by_signature(data)
    if kind is None and b"%PDF-" in data[:PDF_HEADER_WINDOW]:
        raise Reject("POLYGLOT", "a PDF header hides behind other data at the start")
    if kind is None and data[:2] == b"BM" and _bmp_size(data) is not None:
        kind = "bmp"
    if kind is None and len(data) > 262 and data[257:262] == b"ustar":
        kind = "archive"
    if kind is not None:
        return _structured(data, kind, name)
    if zipstruct.embedded_eocd(data) is not None:
        raise Reject("POLYGLOT", "a ZIP archive hides behind other data")
    return _text(data, name)


def _by_signature(data: bytes) -> str | None:
    for sig, kind in _SIGNATURES:
        if data.startswith(sig):
            return kind
    return None


# ----------------------------------------------------------------------------- binary kinds
def _structured(data: bytes, kind: str, name: str) -> Identity:
    if kind in ("exe", "archive", "script", "rtf"):
        return Identity(kind, describe(kind))
    if kind == "ole":
        return _ole(data)
    if kind == "zip":
        return _zip(data)
    if kind == "pdf":
        end = data.rfind(b"%%EOF")
        if end < 0:
            raise Reject("MALFORMED", "the PDF has no end marker (%%EOF)")
        tail = data[end + 5 :]
        if tail.strip(b"\r\n\t\f\x00 "):
            raise Reject("POLYGLOT", f"{len(tail)} bytes of other data follow the end of the PDF")
    else:
        end_of = {"png": _png_end, "jpeg": _jpeg_end, "gif": _gif_end, "bmp": _bmp_size}
        if kind in end_of:
            stop = end_of[kind](data)
            if stop is None:
                raise Reject("MALFORMED", f"the {kind.upper()} image is damaged or cut short")
            if stop < len(data):
                raise Reject(
                    "POLYGLOT",
                    f"{len(data) - stop} bytes of other data follow the end of the "
                    f"{kind.upper()} image",
                )
        if b"%PDF-" in data[1:PDF_HEADER_WINDOW]:
            raise Reject("POLYGLOT", f"a PDF header is hidden in the {kind.upper()} image")
    # zip tools look for the end record in the last 64 KiB; an image is checked throughout
    window = len(data) - zipstruct.EOCD_SIZE - zipstruct.MAX_COMMENT if kind == "pdf" else 0
    if zipstruct.embedded_eocd(data[max(0, window) :]) is not None:
        raise Reject("POLYGLOT", f"a ZIP archive is hidden in the {kind.upper()} file")
    return Identity(kind, f"{kind.upper()} {'document' if kind == 'pdf' else 'image'}")


def _png_end(data: bytes) -> int | None:
    pos = 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">L", data, pos)
        ctype = data[pos + 4 : pos + 8]
        pos += 12 + length
        if ctype == b"IEND":
            return pos if pos <= len(data) else None
    return None


def _jpeg_end(data: bytes) -> int | None:
    """Offset after the EOI that ends the image (markers walked, entropy data scanned)."""
    pos, size = 2, len(data)
    while pos + 2 <= size:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            return pos + 2
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if pos + 4 > size:
            return None
        (length,) = struct.unpack_from(">H", data, pos + 2)
        pos += 2 + length
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next real marker
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= size:
                    return None
                nxt = data[pos + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
                    pos += 1 if nxt == 0xFF else 2
                    continue
                break
    return None


def _gif_end(data: bytes) -> int | None:
    if len(data) < 13:
        return None
    flags = data[10]
    pos = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    while pos < len(data):
        block = data[pos]
        if block == 0x3B:
            return pos + 1
        if block == 0x21:
            pos += 2
        elif block == 0x2C:
            if pos + 10 > len(data):
                return None
            local = data[pos + 9]
            pos += 10 + (3 * 2 ** ((local & 7) + 1) if local & 0x80 else 0) + 1
        else:
            return None
        while pos < len(data) and data[pos] != 0:  # data sub-blocks
            pos += data[pos] + 1
        pos += 1
    return None


def _bmp_size(data: bytes) -> int | None:
    if len(data) < 26:
        return None
    size: int = struct.unpack_from("<L", data, 2)[0]
    header: int = struct.unpack_from("<L", data, 14)[0]
    if header not in (12, 40, 52, 56, 64, 108, 124) or not 26 <= size <= len(data):
        return None
    return size


def _ole(data: bytes) -> Identity:
    import olefile  # type: ignore[import-untyped]  # noqa: PLC0415  # only for OLE files

    try:
        ole = olefile.OleFileIO(io.BytesIO(data))
    except Exception:  # noqa: BLE001  # any parse failure of an OLE file is damage
        raise Reject("MALFORMED", "a damaged OLE (Compound File) document") from None
    try:
        streams = {"/".join(s).lower() for s in ole.listdir(streams=True, storages=True)}
    finally:
        ole.close()
    if "encryptedpackage" in streams or "encryptioninfo" in streams:
        raise Reject("ENCRYPTED", "an encrypted (password-protected) Office document")
    return Identity("ole", describe("ole"))


def _zip(data: bytes) -> Identity:
    directory = zipstruct.read_directory(data, max_entries=1 << 16)
    if b"%PDF-" in data[: min(PDF_HEADER_WINDOW, _first_data(directory))]:
        raise Reject("POLYGLOT", "a PDF header is hidden in the ZIP archive's headers")
    names = {e.name: e for e in directory.entries}
    if "[Content_Types].xml" in names:
        kind = _ooxml_kind(data, names["[Content_Types].xml"])
        if kind is not None:
            return Identity(kind, f"Office Open XML ({kind})")
    if "OFD.xml" in names:
        return Identity("ofd", "OFD document (GB/T 33190)")
    mimetype = names.get("mimetype")
    if mimetype is not None and mimetype.method == 0 and mimetype.csize < 128:
        value = data[mimetype.data_start : mimetype.data_start + mimetype.csize]
        if value.startswith((b"application/vnd.oasis.opendocument", b"application/epub")):
            return Identity("odf", describe("odf"))
    return Identity("zip", "ZIP archive")


def _first_data(directory: zipstruct.Directory) -> int:
    if not directory.entries:
        return PDF_HEADER_WINDOW
    return min(e.data_start for e in directory.entries)


def _ooxml_kind(data: bytes, entry: zipstruct.Entry) -> str | None:
    """The Office type named by the main part's content type, None if not Office."""
    if entry.encrypted or entry.usize > MAX_MANIFEST_BYTES:
        raise Reject("MALFORMED", "the Office document's [Content_Types].xml is unreadable")
    text = inflate(data, entry, MAX_MANIFEST_BYTES).lower()
    found = {kind for ctype, kind in _OOXML_MAIN.items() if ctype.encode() in text}
    if len(found) > 1:
        raise Reject("MALFORMED", "the Office document claims to be several kinds at once")
    if found:
        return found.pop()
    if _OOXML_OTHER.search(text):
        return "ooxml-other"
    return None


def inflate(data: bytes, entry: zipstruct.Entry, limit: int) -> bytes:
    """One entry's bytes (stored or deflated), at most ``limit``; Reject on anything else."""
    import zlib  # noqa: PLC0415

    raw = data[entry.data_start : entry.data_start + entry.csize]
    if entry.method == 0:
        out = bytes(raw)
    elif entry.method == 8:
        inflater = zlib.decompressobj(-15)
        try:
            out = inflater.decompress(raw, limit + 1)
        except zlib.error:
            raise Reject("MALFORMED", f"archive entry {entry.name!r} is damaged") from None
    else:
        raise Reject("MALFORMED", f"archive entry {entry.name!r} uses compression {entry.method}")
    if len(out) > limit:
        raise Reject("LIMIT_EXCEEDED", f"archive entry {entry.name!r} is too large")
    return out


# ----------------------------------------------------------------------------- text kinds
_HTML_START = re.compile(
    rb"\s*(<!--.*?-->\s*)*<(!doctype\s+html|html|head|body|script|iframe|frameset|style|meta"
    rb"|title|object|embed|applet|a\s|img\s|form|div|table|p>|br\s*/?>|link\s)",
    re.IGNORECASE | re.DOTALL,
)
_XML_PROLOG = re.compile(
    rb"\s*(<\?xml[^>]*\?>)?\s*((<!--.*?-->|<\?.*?\?>)\s*)*(<!doctype\s+(?P<dt>[\w:.-]+)[^>]*>?)?"
    rb"\s*((<!--.*?-->|<\?.*?\?>)\s*)*(<(?P<root>[\w:.-]+))?",
    re.IGNORECASE | re.DOTALL,
)


def decode_sample(data: bytes) -> tuple[str, str] | None:
    """(encoding, text of the first TEXT_SAMPLE bytes) if ``data`` looks like text."""
    sample = data[:TEXT_SAMPLE]
    if sample.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return None  # UTF-32 is not taken
    for bom, codec in ((b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")):
        if sample.startswith(bom):
            body = sample[2 : 2 + (len(sample) - 2) // 2 * 2]
            try:
                return codec, body.decode(codec, errors="strict")
            except UnicodeDecodeError as exc:
                if exc.start < len(body) - 4:  # not just a surrogate pair cut by the sample
                    return None
                return codec, body[: exc.start].decode(codec)
    if b"\x00" in sample:
        return None
    if sample.startswith(b"\xef\xbb\xbf"):
        sample = sample[3:]
    for codec in ("utf-8", "gb18030"):
        try:
            return codec, sample.decode(codec)
        except UnicodeDecodeError as exc:
            if len(sample) == TEXT_SAMPLE and exc.start >= len(sample) - 4:
                return codec, sample[: exc.start].decode(codec)
    return None


def _text(data: bytes, name: str) -> Identity:
    decoded = decode_sample(data)
    _, ext = split_extension(name)
    claimed = EXTENSION_TYPES.get(ext, frozenset())
    if decoded is None:
        return Identity("unknown", "binary data of unknown type")
    codec, text = decoded
    if text.startswith("#!"):
        return Identity("script", "a script (#! line)")
    head = text[:4096].lstrip("\ufeff").encode("utf-8", "replace")
    prolog = _XML_PROLOG.match(head)
    root = (prolog.group("root") or b"") if prolog else b""
    doctype = (prolog.group("dt") or b"") if prolog else b""
    local = root.rsplit(b":", 1)[-1].lower()
    if local == b"svg" or doctype.lower() == b"svg":
        return Identity("svg", "SVG drawing")
    looks_html = "xml" not in claimed and _HTML_START.match(head) is not None
    if local == b"html" or doctype.lower() == b"html" or looks_html:
        return Identity("html", "HTML page")
    if head.lstrip().startswith(b"{\\rt"):
        return Identity("rtf", "RTF document")
    detail = f"text ({codec})"
    for kind in ("csv", "json", "xml", "script", "txt"):
        if kind in claimed:
            return Identity(kind, detail)
    if claimed & {"html", "svg", "rtf"}:  # the name says markup, the content is plain text
        return Identity("txt", detail)
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped[:1] in ("{", "[") and not ext:
        return Identity("json", detail)
    if stripped.startswith("<") and not ext:
        return Identity("xml", detail)
    return Identity("txt", detail)


# ----------------------------------------------------------------------------- extensions
def check_extension(identity: Identity, name: str) -> None:
    """Raise TYPE_MISMATCH unless the name's extension fits the detected type (a name without
    an extension fits anything; the gateway adds the right one)."""
    _, ext = split_extension(name)
    if not ext:
        return
    claimed = EXTENSION_TYPES.get(ext)
    if claimed is None:
        raise Reject(
            "TYPE_MISMATCH",
            f"the extension .{ext} is not one the gateway knows; the content is {_what(identity)}",
        )
    if identity.type_name not in claimed:
        raise Reject(
            "TYPE_MISMATCH",
            f"the name ends in .{ext} but the content is {_what(identity)}",
        )


def _what(identity: Identity) -> str:
    if identity.supported:
        return identity.detail
    return describe(identity.type_name)

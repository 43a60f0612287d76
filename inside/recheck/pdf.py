"""A byte-level PDF lexer in the spirit of pdfid: no parser, no object model, no repair.

The outside writes PDFs without object streams and with a single revision, so every
dictionary of the delivered file is plain text between ``obj`` and ``endobj``. The lexer walks
the whole file token by token, skipping string literals and stream data (by their direct
``/Length``), decodes ``#xx`` escapes in names and counts the names that mean active content.
Any such name, any object stream, encryption, a second ``%%EOF`` (incremental update), bytes
after the final ``%%EOF`` or an ``obj``/``endobj`` mismatch is a problem.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter

from inside.recheck.findings import Findings

# Name → the feature switch that may legitimately keep it (None: always a problem).
ACTIVE_NAMES: dict[bytes, str | None] = {
    b"/JS": "javascript",
    b"/JavaScript": "javascript",
    b"/AA": "actions",
    b"/OpenAction": "actions",
    b"/Launch": "actions",
    b"/EmbeddedFile": "embedded_files",
    b"/EmbeddedFiles": "embedded_files",
    b"/FileAttachment": "embedded_files",
    b"/GoToE": "embedded_files",
    b"/XFA": "forms",
    b"/AcroForm": "forms",
    b"/SubmitForm": "forms",
    b"/ImportData": "forms",
    b"/RichMedia": "multimedia",
    b"/RichMediaExecute": "multimedia",
    b"/Rendition": "multimedia",
    b"/URI": "hyperlinks",
    b"/GoToR": "external_links",
    b"/ObjStm": None,
    b"/Encrypt": None,
    b"/XRefStm": None,
}

_WS = b"\x00\t\n\x0c\r "
_DELIMS = b"()<>[]{}/%"
_TOKEN = re.compile(
    rb"[\x00\t\n\x0c\r ]+"  # whitespace
    rb"|%[^\r\n]*"  # comment
    rb"|/[^\x00\t\n\x0c\r ()<>\[\]{}/%]*"  # name
    rb"|<<|>>"  # dictionary
    rb"|<[0-9A-Fa-f\x00\t\n\x0c\r ]*>"  # hex string
    rb"|[\[\]{}]"  # array, procedure
    rb"|\("  # literal string (skipped by hand: nesting and escapes)
    rb"|[^\x00\t\n\x0c\r ()<>\[\]{}/%]+"  # regular: number, keyword, R
)
_HEX_ESCAPE = re.compile(rb"#([0-9A-Fa-f]{2})")
_INT = re.compile(rb"\d+")
_EOL_AFTER_STREAM = re.compile(rb"\r\n|\n")
_KEYWORDS = frozenset(
    {b"obj", b"endobj", b"stream", b"endstream", b"trailer", b"xref", b"startxref"}
)
MAX_DECODED = 64 * 1024 * 1024


def decode_name(raw: bytes) -> bytes:
    return _HEX_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), raw)


def _skip_literal(data: bytes, pos: int) -> int:
    """``pos`` is just after ``(``; return the position after the matching ``)``."""
    depth = 1
    n = len(data)
    while pos < n:
        c = data[pos]
        if c == 0x5C:  # backslash: skip the escaped byte
            pos += 2
            continue
        if c == 0x28:
            depth += 1
        elif c == 0x29:
            depth -= 1
            if depth == 0:
                return pos + 1
        pos += 1
    raise ValueError("unterminated string literal")


def lex(data: bytes, found: Findings) -> Counter[bytes]:
    """Count every (decoded) name and keyword; return the counts. Streams are YARA-scanned."""
    counts: Counter[bytes] = Counter()
    pos = 0
    n = len(data)
    recent: list[bytes] = []  # the last few regular tokens/names, for a direct /Length
    while pos < n:
        m = _TOKEN.match(data, pos)
        if m is None:
            raise ValueError(f"unlexable byte at offset {pos}")
        tok = m.group()
        pos = m.end()
        first = tok[0]
        if first in _WS:
            continue
        if first == 0x25:  # comment
            if tok.startswith(b"%%EOF"):
                counts[b"%%EOF"] += 1
                found.check("pdf.eof")
                if data[pos:].strip(_WS):
                    counts[b"%%EOF+data"] += 1
            continue
        if tok == b"(":
            pos = _skip_literal(data, pos)
            continue
        if first == 0x2F:
            name = decode_name(tok) if b"#" in tok else tok
            counts[name] += 1
            recent.append(name)
        elif tok in (b"<<", b">>", b"[", b"]", b"{", b"}") or first == 0x3C:
            recent.append(tok)
        else:
            if tok in _KEYWORDS:
                counts[tok] += 1
            if tok == b"stream":
                pos = _skip_stream(data, pos, recent, found)
                recent.clear()
                continue
            if tok == b"endobj":
                recent.clear()
                continue
            recent.append(tok)
        if len(recent) > 64:
            del recent[:32]
    return counts


def _direct_length(recent: list[bytes]) -> int | None:
    """The value of the last ``/Length N`` in ``recent`` when it is direct (not ``N G R``)."""
    for i in range(len(recent) - 1, -1, -1):
        if recent[i] == b"/Length" and i + 1 < len(recent) and _INT.fullmatch(recent[i + 1]):
            if i + 3 < len(recent) and recent[i + 3] == b"R":
                return None
            return int(recent[i + 1])
    return None


def _skip_stream(data: bytes, pos: int, recent: list[bytes], found: Findings) -> int:
    eol = _EOL_AFTER_STREAM.match(data, pos)
    if eol is None:
        raise ValueError("stream keyword not followed by an end of line")
    start = eol.end()
    length = _direct_length(recent)
    end = -1
    if length is not None:
        tail = data[start + length : start + length + 12].lstrip(_WS)
        if tail.startswith(b"endstream"):
            end = start + length
    if end < 0:
        found.problem("a stream without a usable direct /Length")
        end = data.find(b"endstream", start)
        if end < 0:
            raise ValueError("stream without endstream")
    if found.scan_fn is not None:
        raw = data[start:end]
        found.scan(raw, "stream")
        if b"/FlateDecode" in recent and b"/DecodeParms" not in recent:
            dec = zlib.decompressobj()
            try:  # (the outside refuses both: here they are a disagreement, never unscanned)
                plain = dec.decompress(raw, MAX_DECODED)
            except zlib.error as exc:
                found.problem(f"a FlateDecode stream that does not decode ({exc})")
                plain = b""
            if dec.unconsumed_tail:
                found.problem(f"a stream decodes to more than {MAX_DECODED} bytes")
            found.scan(plain, "stream (decoded)")
    return end


def check(data: bytes, found: Findings) -> None:
    found.check("pdf.header")
    if not re.match(rb"%PDF-[12]\.\d", data[:8]):
        found.problem("no %PDF- header at offset 0")
    counts = lex(data, found)
    found.check("pdf.lexer")
    for name, feature in ACTIVE_NAMES.items():
        hits = counts.get(name, 0)
        if hits and (feature is None or not found.allowed(feature)):
            found.problem(f"{name.decode()} present ({hits})")
    if counts[b"%%EOF"] != 1:
        found.problem(f"{counts[b'%%EOF']} %%EOF markers (an incremental update or truncation)")
    if counts[b"%%EOF+data"]:
        found.problem("data after %%EOF")
    if counts[b"obj"] != counts[b"endobj"]:
        found.problem(f"obj/endobj mismatch ({counts[b'obj']}/{counts[b'endobj']})")
    if counts[b"stream"] != counts[b"endstream"]:
        found.problem("stream/endstream mismatch")
    if not counts[b"xref"] or counts[b"xref"] != 1 or counts[b"trailer"] != 1:
        found.problem("not a single classic xref table and trailer")
    found.check("pdf.structure")

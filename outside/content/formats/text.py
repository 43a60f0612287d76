"""Plain text: encoding detected and normalised to UTF-8, control characters handled.

Accepted encodings: UTF-8 (with or without a byte order mark), UTF-16 with a byte order mark,
and GB18030 (which includes GBK and GB2312) for text that is not valid UTF-8. UTF-16 without a
BOM and UTF-32 are refused (MALFORMED): guessing them is how parsers come to disagree.

Control characters: tab, line feed, carriage return and form feed are text. Every other C0
character, DEL and the C1 range (U+0080-U+009F: terminal escape sequences, for example) is
the ``control_chars`` feature: removed (sanitize, the default), kept (allow) or refused
(disallow). NUL is never text: a file with NUL bytes is refused as MALFORMED.

A UTF-8 file without BOM and without control characters is delivered byte for byte.
Everything else is delivered as UTF-8 (without BOM) with the actions taken.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ferry.content.base import Action, Context, FormatResult, Reject

CONTROL = re.compile("[\x01-\x08\x0b\x0e-\x1f\x7f-\x9f]")
_BOMS = (
    (b"\xef\xbb\xbf", "utf-8"),
    (b"\xff\xfe", "utf-16-le"),
    (b"\xfe\xff", "utf-16-be"),
)


@dataclass(frozen=True)
class Decoded:
    text: str
    encoding: str  # utf-8, utf-16-le, utf-16-be, gb18030
    bom: bool


def decode_text(data: bytes, *, allow_gb18030: bool = True) -> Decoded:
    """Decode untrusted bytes as text, strictly; Reject("MALFORMED") if they are not text."""
    if data.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        raise Reject("MALFORMED", "UTF-32 text is not accepted; save it as UTF-8")
    for bom, codec in _BOMS:
        if data.startswith(bom):
            try:
                text = data[len(bom) :].decode(codec)
            except UnicodeDecodeError as exc:
                raise Reject(
                    "MALFORMED", f"invalid {codec.upper()} at byte {exc.start + len(bom)}"
                ) from None
            return _checked(Decoded(text, codec, True))
    if b"\x00" in data:
        raise Reject("MALFORMED", "binary data (NUL bytes) in a text file; UTF-16 needs a BOM")
    try:
        return _checked(Decoded(data.decode("utf-8"), "utf-8", False))
    except UnicodeDecodeError as exc:
        if not allow_gb18030:
            raise Reject("MALFORMED", f"invalid UTF-8 at byte {exc.start}") from None
    try:
        return _checked(Decoded(data.decode("gb18030"), "gb18030", False))
    except UnicodeDecodeError as exc:
        raise Reject(
            "MALFORMED", f"neither UTF-8 nor GB18030 text (invalid byte at {exc.start})"
        ) from None


def _checked(decoded: Decoded) -> Decoded:
    if "\x00" in decoded.text:
        raise Reject("MALFORMED", "binary data (NUL characters) in a text file")
    return decoded


def control_chars(text: str, ctx: Context, where: str = "") -> tuple[str, list[Action]]:
    """Apply the ``control_chars`` switch; returns the text and the actions taken."""
    found = len(CONTROL.findall(text))
    if found and ctx.feature("control_chars", found, where):
        return CONTROL.sub("", text), [Action("removed", "control characters", where, found)]
    return text, []


def normalise(data: bytes, ctx: Context, where: str = "") -> tuple[str, list[Action], Decoded]:
    """Decode, apply the control-character switch, scan the decoded text if it differs."""
    decoded = decode_text(data)
    actions: list[Action] = []
    if decoded.encoding != "utf-8":
        actions.append(Action("converted", f"{decoded.encoding.upper()} to UTF-8", where))
    if decoded.bom:
        actions.append(Action("removed", "byte order mark", where))
    text, removed = control_chars(decoded.text, ctx, where)
    actions += removed
    if decoded.encoding != "utf-8":
        ctx.scan(text.encode("utf-8"), where or "decoded text")
    return text, actions, decoded


def sanitize(src: Path, dst: Path, ctx: Context) -> FormatResult:
    data = src.read_bytes()
    text, actions, decoded = normalise(data, ctx)
    info = {"encoding": decoded.encoding, "bom": decoded.bom, "characters": len(text)}
    if not actions:
        return FormatResult("txt", cleaned=False, info=info)
    dst.write_bytes(text.encode("utf-8"))
    return FormatResult("txt", cleaned=True, actions=actions, info=info)

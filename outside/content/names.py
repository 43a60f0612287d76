"""File-name policy (pure): what names are refused, and the name the gateway delivers under.

:func:`check_name` NFC-normalises an untrusted name and raises ``Reject("FILENAME_POLICY")``
for names that hide or disguise what a file is, or that Windows would treat specially:

- control characters (C0, DEL, C1), bidirectional and invisible formatting characters
  (U+202E RIGHT-TO-LEFT OVERRIDE makes ``invoice\\u202Efdp.exe`` look like ``invoiceexe.pdf``);
- characters Windows forbids (``<>:"/\\|?*``; ``:`` also opens NTFS alternate data streams);
- reserved device names (CON, PRN, AUX, NUL, COM0-9, LPT0-9, CONIN$, CONOUT$, CLOCK$) with
  or without an extension, trailing dots or spaces (Windows drops them: ``a.exe.`` runs);
- names over 255 bytes of UTF-8, empty names, ``.`` and ``..``;
- a double extension whose last part is executable (``invoice.pdf.exe``, ``photo.jpg .js``).

:func:`delivered_name` is the gateway's choice: the checked base name with unsafe characters
replaced and executable-looking inner extensions neutralised, plus the canonical extension of
the detected (delivered) type.
"""

from __future__ import annotations

import re
import unicodedata

from ferry.content.base import Reject
from ferry.names import EXECUTABLE_EXTENSIONS, RESERVED

# POSIX and Windows both allow 255 bytes per path component.
MAX_NAME_BYTES = 255
# The delivered name stays shorter, leaving room for " (2)" and temp-file decoration.
MAX_DELIVERED_BYTES = 200

BIDI_AND_INVISIBLE = frozenset(
    "\u061c\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
    "\u2060\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069\u206a\u206b\u206c\u206d\u206e\u206f"
    "\ufeff\ufff9\ufffa\ufffb\u180e\u00ad"
)
WINDOWS_FORBIDDEN = frozenset('<>:"/\\|?*')

CANONICAL_EXTENSIONS = {
    "pdf": "pdf",
    "png": "png",
    "jpeg": "jpg",
    "gif": "gif",
    "bmp": "bmp",
    "tiff": "tif",
    "docx": "docx",
    "xlsx": "xlsx",
    "pptx": "pptx",
    "docm": "docx",
    "xlsm": "xlsx",
    "pptm": "pptx",
    "ofd": "ofd",
    "zip": "zip",
    "txt": "txt",
    "csv": "csv",
    "json": "json",
    "xml": "xml",
}

_UNSAFE_OUT = re.compile(r"[\x00-\x1f\x7f-\x9f<>:\"/\\|?*]")


def _bad_char(c: str) -> str | None:
    if c in BIDI_AND_INVISIBLE:
        return f"invisible or bidirectional control character U+{ord(c):04X}"
    category = unicodedata.category(c)
    if category == "Cc":
        return f"control character U+{ord(c):04X}"
    if category == "Cs":
        return "undecodable bytes"
    if category == "Cf":
        return f"formatting character U+{ord(c):04X}"
    if c in WINDOWS_FORBIDDEN:
        return f"character {c!r}, which Windows forbids in names"
    return None


def split_extension(name: str) -> tuple[str, str]:
    """``('report', 'pdf')`` for ``report.PDF``; ``('README', '')`` for no extension."""
    base, dot, ext = name.rpartition(".")
    if not dot or not base.strip(" ."):
        return name, ""
    return base, ext.strip().lower()


def check_name(untrusted: str) -> str:
    """The NFC form of an acceptable name; raises Reject("FILENAME_POLICY") otherwise."""
    name = unicodedata.normalize("NFC", untrusted)
    shown = _shown(name)
    if not name or name in (".", ".."):
        raise Reject("FILENAME_POLICY", "the file has no usable name")
    for c in name:
        why = _bad_char(c)
        if why is not None:
            raise Reject("FILENAME_POLICY", f"the name {shown} contains a {why}")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise Reject("FILENAME_POLICY", f"the name is {size} bytes long (at most 255)")
    if name != name.rstrip(" ."):
        raise Reject("FILENAME_POLICY", f"the name {shown} ends with a dot or a space")
    if name.lstrip() != name:
        raise Reject("FILENAME_POLICY", f"the name {shown} starts with a space")
    device = name.split(".", 1)[0].rstrip(" ").upper()
    if device in RESERVED:
        raise Reject("FILENAME_POLICY", f"{device} is a reserved device name on Windows")
    parts = [p.strip().lower() for p in name.split(".")]
    if len(parts) > 2 and parts[-1] in EXECUTABLE_EXTENSIONS and parts[0]:
        raise Reject(
            "FILENAME_POLICY",
            f"the name {shown} has a double extension hiding a program (.{parts[-1]})",
        )
    return name


def delivered_name(checked: str, type_name: str) -> str:
    """The name the gateway delivers under: safe base + canonical extension of the type."""
    ext = CANONICAL_EXTENSIONS.get(type_name, "bin")
    base, old_ext = split_extension(checked)
    if not old_ext:
        base = checked
    pieces = base.split(".")
    base = pieces[0] + "".join(
        ("_" if p.strip().lower() in EXECUTABLE_EXTENSIONS else ".") + p for p in pieces[1:]
    )
    base = _UNSAFE_OUT.sub("_", base).strip(" .")
    base = "".join("_" if _bad_char(c) else c for c in base)
    if base.startswith("."):
        base = "_" + base[1:]
    if not base or base.split(".", 1)[0].upper() in RESERVED:
        base = f"file_{base}" if base else "file"
    budget = MAX_DELIVERED_BYTES - len(ext) - 1
    encoded = base.encode("utf-8")
    if len(encoded) > budget:
        base = encoded[:budget].decode("utf-8", "ignore").rstrip(" .") or "file"
    return f"{base}.{ext}"


def _shown(name: str, limit: int = 80) -> str:
    """A name quoted for a message: invisible characters spelled out, long names cut."""
    out = "".join(
        f"\\u{ord(c):04x}" if _bad_char(c) and c not in WINDOWS_FORBIDDEN else c
        for c in name[:limit]
    )
    return f"'{out}{'…' if len(name) > limit else ''}'"

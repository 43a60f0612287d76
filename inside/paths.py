"""Safe delivery names (pure): the gateway, not the sender, chooses the name a file lands under.

``safe_name`` turns any untrusted name into one path component that cannot
escape its folder; ``candidate_names`` yields ``report.pdf``, ``report (2).pdf``,
... for collisions; ``contained`` is the final guard on a joined path.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import PurePosixPath

from ferry.names import EXECUTABLE_EXTENSIONS, MAX_COLLISIONS, RESERVED, candidate_names

__all__ = ["MAX_COLLISIONS", "MAX_NAME_BYTES", "candidate_names", "contained", "safe_name"]

# Most Linux filesystems limit a name to 255 bytes; keep room for " (NNNN)".
MAX_NAME_BYTES = 200
_BIDI_AND_INVISIBLE = {
    "\u200b", "\u200c", "\u200d", "\u200e", "\u200f", "\u202a", "\u202b", "\u202c",
    "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069", "\ufeff",
}  # fmt: skip
# Names made only of these characters need no cleaning (none is a control, format,
# invisible or reserved character, and NFC leaves them as they are): the common case.
_PLAIN = re.compile(r"[\w .()+,=@#&~'\-]*", re.ASCII)


def _clean_char(c: str) -> str:
    if c in _BIDI_AND_INVISIBLE:
        return ""
    if unicodedata.category(c) in {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}:
        return "_"
    if c in '/\\:*?"<>|':
        return "_"
    return c


def safe_name(untrusted: str) -> str:
    """One safe path component derived from an untrusted name."""
    # Keep only the last component of anything that looks like a path.
    name = untrusted.replace("\\", "/").rsplit("/", 1)[-1]
    if not _PLAIN.fullmatch(name):
        name = unicodedata.normalize("NFC", "".join(_clean_char(c) for c in name))
    name = name.strip(" .")
    # The outside refuses these; a name that still comes (a compromised outside) is made
    # harmless here: a double extension hiding a program loses its last dot
    # (``readme.txt.bat`` -> ``readme.txt_bat``), a device name (``COM1``, ``CON .txt``,
    # ``CONIN$``) or a leading ``-`` (read as an option by command-line tools) gets a ``_``.
    pieces = name.split(".")
    if len(pieces) > 2 and pieces[0] and pieces[-1].strip().lower() in EXECUTABLE_EXTENSIONS:
        name = ".".join(pieces[:-1]) + "_" + pieces[-1]
    if pieces[0].rstrip(" ").upper() in RESERVED or name.startswith("-"):
        name = "_" + name
    if not name:
        name = "unnamed"
    if len(name.encode()) > MAX_NAME_BYTES:
        p = PurePosixPath(name)
        suffix = p.suffix if len(p.suffix.encode()) <= 16 else ""
        budget = MAX_NAME_BYTES - len(suffix.encode())
        stem_b = p.name[: len(p.name) - len(suffix)].encode()[:budget]
        name = stem_b.decode("utf-8", "ignore").rstrip(" .") + suffix
    return name


def contained(root: PurePosixPath, name: str) -> PurePosixPath:
    """Join ``name`` under ``root``; raise ValueError unless the result is directly inside it."""
    if not name or name in {".", ".."} or "/" in name or "\x00" in name:
        raise ValueError(f"unsafe delivery name {name!r}")
    path = root / name
    if path.parent != root:
        raise ValueError(f"delivery name {name!r} escapes its folder")
    return path

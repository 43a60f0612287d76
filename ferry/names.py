"""Numbered names for collisions: ``report.pdf``, ``report (2).pdf``, ``report (3).pdf``...

Shared by every place that must give a file a name next to others without overwriting
any: the inside's delivery folders, both quarantines, and the outside's ``sent`` folder.
A numbered candidate never exceeds ``max_bytes`` (255, the limit of most Linux file
systems): the stem is shortened, at a character boundary, to make room for " (n)".
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import PurePosixPath

# Most Linux file systems allow 255 bytes per name.
NAME_MAX = 255
# Names tried before giving up (a folder with 10k copies of one name is an incident).
MAX_COLLISIONS = 10_000
# A longer "extension" is not one worth keeping apart from the stem.
MAX_SUFFIX_BYTES = 16

# Device names Windows reserves, with or without an extension (the outside refuses them;
# the inside, which re-checks what it delivers, renames them).
_SUPERSCRIPT_DIGITS = "\u00b9\u00b2\u00b3"
RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "CLOCK$"}
    | {f"{p}{d}" for p in ("COM", "LPT") for d in "0123456789" + _SUPERSCRIPT_DIGITS}
)

# Extensions that run code when opened on a common desktop (Windows, Linux, macOS).
EXECUTABLE_EXTENSIONS = frozenset(
    [
        "exe",
        "com",
        "scr",
        "pif",
        "cpl",
        "dll",
        "ocx",
        "sys",
        "drv",
        "msi",
        "msp",
        "mst",
        "msc",
        "bat",
        "cmd",
        "ps1",
        "ps1xml",
        "ps2",
        "psc1",
        "psm1",
        "psd1",
        "vbs",
        "vbe",
        "js",
        "jse",
        "wsf",
        "wsh",
        "ws",
        "wsc",
        "sct",
        "hta",
        "jar",
        "class",
        "lnk",
        "url",
        "reg",
        "inf",
        "scf",
        "gadget",
        "application",
        "appref-ms",
        "chm",
        "hlp",
        "vhd",
        "vhdx",
        "sh",
        "bash",
        "zsh",
        "csh",
        "ksh",
        "run",
        "bin",
        "elf",
        "so",
        "dylib",
        "app",
        "command",
        "py",
        "pyc",
        "pyw",
        "pl",
        "rb",
        "php",
        "lua",
        "apk",
        "deb",
        "rpm",
        "dmg",
        "pkg",
        "xll",
        "xlam",
        "ppam",
    ]
)


def candidate_names(
    name: str, *, max_bytes: int = NAME_MAX, limit: int = MAX_COLLISIONS, tag: str = ""
) -> Iterator[str]:
    """``name``, then ``stem (2).ext`` ... ``stem (limit).ext``, then ``stem (tag).ext`` if
    a ``tag`` is given, each at most ``max_bytes`` bytes (UTF-8; lone surrogates, as
    os.fsdecode gives them, count as their bytes). The tag (a few hex digits of the item's
    id) is what no one can have taken in advance: someone who may write in the folder and
    plants every numbered name cannot make an item undeliverable."""
    yield name
    suffix = PurePosixPath(name).suffix
    if suffix == name or len(_encode(suffix)) > MAX_SUFFIX_BYTES:
        suffix = ""
    stem = name[: len(name) - len(suffix)]
    for n in [*range(2, limit + 1), *([tag] if tag else [])]:
        tail = f" ({n}){suffix}"
        yield _fit(stem, max_bytes - len(_encode(tail))) + tail


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _fit(stem: str, budget: int) -> str:
    """``stem`` shortened to at most ``budget`` bytes, never inside a character."""
    if len(_encode(stem)) <= budget:
        return stem
    out: list[str] = []
    used = 0
    for c in stem:
        size = len(_encode(c))
        if used + size > budget:
            break
        out.append(c)
        used += size
    return "".join(out)

"""CSV: text rules plus formula injection (CWE-1236) neutralised cell by cell.

A spreadsheet evaluates a cell whose value starts with ``= + - @`` (or tab / carriage return,
or their full-width forms, which some East Asian locales convert) as a formula: ``=cmd|'/C
calc'!A0`` runs a program through DDE, ``=HYPERLINK(...)`` leaks data. The ``csv_formulas``
switch decides: sanitize (default) prefixes such cells with ``'`` so they stay text; allow
keeps them; disallow refuses the file.

Plain numbers (``-12.5``, ``+3``, ``-1,234.50``, ``1e-5``, ``-7%``) and cells made only of
signs (``-``, ``--``) are not formulas and stay byte-identical. Only the neutralised cells
change: the file is not re-serialised, its quoting, delimiter and line ends are kept. Fields
follow RFC 4180 (quotes doubled inside quoted fields); an unterminated quoted field is
refused (MALFORMED) because spreadsheet programs disagree about where it ends.

Encoding as for text; a CSV converted from GB18030 or UTF-16, or that had a byte order mark,
is written as UTF-8 *with* a byte order mark so spreadsheet programs read it as UTF-8.
"""

from __future__ import annotations

import re
from pathlib import Path

from ferry.content.base import Action, Context, FormatResult, Reject
from outside.content.formats.text import normalise

TRIGGERS = frozenset("=+-@\t\r\uff1d\uff0b\uff0d\uff20")
PLAIN_NUMBER = re.compile(
    r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][+-]?\d+)?%?", re.ASCII
)
SIGNS_ONLY = re.compile(r"[-+=@ ]*")
DELIMITERS = (",", ";", "\t", "|")
UTF8_BOM = "\ufeff"
# Lines looked at to guess the delimiter.
SNIFF_LINES = 20


def _delimiter(text: str, ext: str) -> str:
    if ext == "tsv":
        return "\t"
    head = [re.sub(r'"[^"]*"', "", line) for line in text.splitlines()[:SNIFF_LINES]]
    counts = {d: sum(line.count(d) for line in head) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: (counts[d], -DELIMITERS.index(d)))
    return best if counts[best] else ","


def _field_pattern(delim: str) -> re.Pattern[str]:
    d = re.escape(delim)
    return re.compile(rf'"(?P<q>[^"]*(?:""[^"]*)*)"(?:[^{d}\r\n]*)|(?P<u>[^{d}\r\n]*)')


def is_formula(value: str) -> bool:
    """Whether a spreadsheet would evaluate this cell value."""
    stripped = value.lstrip(" ")
    if not stripped or stripped[0] not in TRIGGERS:
        return False
    plain = value.strip(" ")
    if PLAIN_NUMBER.fullmatch(plain) and any(c.isdigit() for c in plain):
        return False
    return not SIGNS_ONLY.fullmatch(value)


def neutralise(text: str, delim: str) -> tuple[str, list[int]]:
    """The text with ``'`` inserted before every formula cell, and the cell offsets."""
    pattern = _field_pattern(delim)
    size, pos = len(text), 0
    inserts: list[int] = []
    while pos <= size:
        m = pattern.match(text, pos)
        if m is None or (pos < size and text[pos] == '"' and m.group("q") is None):
            raise Reject("MALFORMED", "a quoted CSV field is not closed")
        group = "q" if m.group("q") is not None else "u"
        value = m.group(group)
        if is_formula(value.replace('""', '"')):
            inserts.append(m.start(group))
        pos = m.end()
        if pos >= size:
            break
        ch = text[pos]
        if ch == delim:
            pos += 1
        elif ch == "\r":
            pos += 2 if text.startswith("\r\n", pos) else 1
            if pos >= size:
                break
        elif ch == "\n":
            pos += 1
            if pos >= size:
                break
        else:  # pragma: no cover - the pattern stops only at a delimiter or line end
            raise Reject("MALFORMED", f"unexpected character in CSV at offset {pos}")
    if not inserts:
        return text, []
    out, last = [], 0
    for at in inserts:
        out.append(text[last:at])
        out.append("'")
        last = at
    out.append(text[last:])
    return "".join(out), inserts


def sanitize(src: Path, dst: Path, ctx: Context) -> FormatResult:
    data = src.read_bytes()
    text, actions, decoded = normalise(data, ctx)
    name = str(getattr(ctx, "name", "") or src.name)
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    delim = _delimiter(text, ext)
    cleaned, cells = neutralise(text, delim)
    if cells and ctx.feature("csv_formulas", len(cells)):
        text = cleaned
        actions.append(Action("neutralised", "formula cells", count=len(cells)))
    info = {"encoding": decoded.encoding, "delimiter": delim, "formula_cells": len(cells)}
    bom = UTF8_BOM if decoded.bom or decoded.encoding != "utf-8" else ""
    if bom:  # the byte order mark is written again: not an action
        actions = [a for a in actions if a.target != "byte order mark"]
    if not actions:
        return FormatResult("csv", cleaned=False, info=info)
    dst.write_bytes((bom + text).encode("utf-8"))
    return FormatResult("csv", cleaned=True, actions=actions, info=info)

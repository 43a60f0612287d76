"""Text, CSV, JSON and XML re-checks (stdlib + defusedxml; no code shared with the outside).

* text: strict UTF-8 (a BOM is tolerated), no C0 control except TAB/LF/CR, no DEL, no C1.
* CSV: text rules, then every cell (csv module, dialect sniffed between , ; TAB) that starts
  with ``= + - @`` (or TAB/CR) is a formula unless it is a plain number.
* JSON: strict parse — no duplicate keys, no NaN/Infinity, nesting at most 64.
* XML: no DOCTYPE/ENTITY (defusedxml with every forbid flag), well-formed.
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any

from inside.recheck.container import xml
from inside.recheck.findings import Findings

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x80-\x9f]")
_NUMBER = re.compile(r"^[+-]?(\d+([.,]\d*)?|[.,]\d+)([eE][+-]?\d+)?%?$")
MAX_JSON_DEPTH = 64


def _text(data: bytes, found: Findings) -> str | None:
    found.check("text.utf8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        found.problem(f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
        return None
    match = _CONTROL.search(text)
    if match and not found.allowed("control_chars"):
        found.problem(f"control character U+{ord(match.group()):04X} at offset {match.start()}")
    found.check("text.controls")
    return text


def check_text(data: bytes, found: Findings) -> None:
    _text(data, found)


def check_csv(data: bytes, found: Findings) -> None:
    text = _text(data, found)
    if text is None:
        return
    found.check("csv.formulas")
    first = text.split("\n", 1)[0]
    delimiter = max((",", ";", "\t"), key=first.count)
    for row_no, row in enumerate(
        csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), start=1
    ):
        for col, cell in enumerate(row, start=1):
            formula = cell[:1] in ("=", "+", "-", "@", "\t", "\r") and not _NUMBER.match(
                cell.strip()
            )
            if formula and not found.allowed("csv_formulas"):
                found.problem(f"formula-like cell at row {row_no} column {col}")
                return


def _no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _depth(value: Any) -> int:
    depth = 0
    stack = [(value, 1)]
    while stack:
        item, d = stack.pop()
        depth = max(depth, d)
        if isinstance(item, dict):
            stack.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, d + 1) for v in item)
    return depth


def check_json(data: bytes, found: Findings) -> None:
    text = _text(data, found)
    if text is None:
        return
    found.check("json.strict")
    try:
        value = json.loads(text, object_pairs_hook=_no_dupes, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        found.problem(f"JSON refused: {exc}")
        return
    if _depth(value) > MAX_JSON_DEPTH:
        found.problem(f"JSON nested deeper than {MAX_JSON_DEPTH}")


def check_xml(data: bytes, found: Findings) -> None:
    found.check("xml.nodtd")
    xml(data, "document", found)

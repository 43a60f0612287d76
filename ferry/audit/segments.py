"""The files of an audit log directory: segments (``audit-NNNNNN.jsonl``), their lines, and
``checkpoints.log``; names as the audit mirror ships pieces of them."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ferry.audit.files import open_regular
from ferry.audit.record import MAX_RECORD_BYTES

CHECKPOINTS_FILE = "checkpoints.log"
_SEGMENT = re.compile(r"audit-([0-9]{6})\.jsonl")


# A piece of a log as the audit mirror ships it (outside/mirror.py): "<file>@<byte offset>".
PIECE_NAME = re.compile(r"(audit-[0-9]{6}\.jsonl|checkpoints\.log)@(0|[1-9][0-9]{0,14})")


def segment_name(number: int) -> str:
    return f"audit-{number:06d}.jsonl"


def segment_number(name: str) -> int | None:
    """The number of a segment file's name, or None if it is not one."""
    m = _SEGMENT.fullmatch(name)
    return None if m is None else int(m.group(1))


def list_segments(directory: Path, *, any_type: bool = False) -> list[tuple[int, Path]]:
    """The segment files of a log directory, by number: the regular files named like a
    segment (a symbolic link is not followed), or with ``any_type`` every entry so named
    (verify reports, and the writer refuses, those that are not regular files)."""
    with os.scandir(directory) as entries:
        found = [
            (int(m.group(1)), Path(e.path))
            for e in entries
            if (m := _SEGMENT.fullmatch(e.name)) and (any_type or e.is_file(follow_symlinks=False))
        ]
    return sorted(found)


@dataclass(frozen=True, slots=True)
class Line:
    number: int  # 1-based
    offset: int  # byte offset of the line in its file
    data: bytes  # without the newline
    complete: bool  # ended by a newline within MAX_RECORD_BYTES


def iter_lines(path: Path) -> Iterator[Line]:
    """The lines of a segment, each read with a bounded length. Raises :class:`UnsafeFile`
    if the segment is not a regular file (a symbolic link is not followed, a FIFO does not
    block)."""
    with open(open_regular(path), "rb") as f:
        number = offset = 0
        while raw := f.readline(MAX_RECORD_BYTES + 2):
            number += 1
            complete = raw.endswith(b"\n")
            yield Line(number, offset, raw[:-1] if complete else raw, complete)
            offset += len(raw)

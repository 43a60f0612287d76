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


def candidate_names(
    name: str, *, max_bytes: int = NAME_MAX, limit: int = MAX_COLLISIONS
) -> Iterator[str]:
    """``name``, then ``stem (2).ext`` ... ``stem (limit).ext``, each at most ``max_bytes``
    bytes (UTF-8; lone surrogates, as os.fsdecode gives them, count as their bytes)."""
    yield name
    suffix = PurePosixPath(name).suffix
    if suffix == name or len(_encode(suffix)) > MAX_SUFFIX_BYTES:
        suffix = ""
    stem = name[: len(name) - len(suffix)]
    for n in range(2, limit + 1):
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

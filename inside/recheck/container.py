"""ZIP-level checks shared by the OOXML, OFD and ZIP re-checks (stdlib zipfile + defusedxml).

:func:`members` applies the container rules again (names, symlinks, encryption, duplicates,
sizes) and returns the members; :func:`xml` parses with defusedxml (expat), forbidding DTDs
and entities — a different parser from the outside's lxml.
"""

from __future__ import annotations

import io
import posixpath
import re
import stat
import zipfile
from xml.etree.ElementTree import Element

from defusedxml import ElementTree as SafeET  # type: ignore[import-untyped]

from inside.recheck.findings import Findings

MAX_MEMBERS = 10_000
MAX_EXPANDED = 512 * 1024 * 1024
MAX_DEPTH = 3
_BAD_NAME = re.compile(r"(^|/)\.\.(/|$)|^/|^[A-Za-z]:|\\|\x00")


def members(data: bytes, found: Findings, what: str) -> dict[str, bytes] | None:
    """The members of the ZIP in ``data``, or None (with a problem) when unsafe."""
    found.check(f"{what}.zip")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        found.problem(f"{what}: not a ZIP ({exc})")
        return None
    out: dict[str, bytes] = {}
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            found.problem(f"{what}: {len(infos)} members")
            return None
        total = sum(i.file_size for i in infos)
        if total > MAX_EXPANDED:
            found.problem(f"{what}: expands to {total} bytes")
            return None
        names: set[str] = set()
        for info in infos:
            name = info.filename
            if _BAD_NAME.search(name):
                found.problem(f"{what}: unsafe member name {name!r}")
            if stat.S_ISLNK(info.external_attr >> 16):
                found.problem(f"{what}: symlink member {name!r}")
            if info.flag_bits & 0x1:
                found.problem(f"{what}: encrypted member {name!r}")
            if name.casefold() in names:
                found.problem(f"{what}: duplicate member {name!r}")
            names.add(name.casefold())
            if info.is_dir():
                continue
            out[name] = zf.read(info)
            found.scan(out[name], name)
    return out if not found.problems else None


def xml(data: bytes, where: str, found: Findings) -> Element | None:
    """Parse with defusedxml; a DTD, an entity or a syntax error is a problem."""
    try:
        root: Element = SafeET.fromstring(
            data, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
    except Exception as exc:  # noqa: BLE001 - DTDForbidden, EntitiesForbidden, ParseError …
        found.problem(f"{where}: XML refused ({type(exc).__name__}: {exc})")
        return None
    return root


def local(tag: object) -> str:
    """The local name of an ElementTree tag ("{ns}name" → "name")."""
    return str(tag).rsplit("}", 1)[-1]


# Extension → delivered type name, for ZIP members.
MEMBER_TYPES = {
    ".pdf": "pdf",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".docx": "docx",
    ".xlsx": "xlsx",
    ".pptx": "pptx",
    ".ofd": "ofd",
    ".txt": "txt",
    ".csv": "csv",
    ".json": "json",
    ".xml": "xml",
    ".zip": "zip",
}


def check_zip(data: bytes, found: Findings) -> None:
    """A ZIP is a container only: every member is re-checked as the type its name says."""
    # The package imports this module lazily, so importing it back here is not a cycle.
    from inside.recheck import recheck_bytes  # noqa: PLC0415

    parts = members(data, found, "zip")
    if parts is None:
        return
    if found.depth >= MAX_DEPTH:
        found.problem(f"zip nested deeper than {MAX_DEPTH}")
        return
    report = {"features": dict(found.features)}
    for name, body in parts.items():
        ext = posixpath.splitext(name)[1].lower()
        kind = MEMBER_TYPES.get(ext)
        if kind is None:
            found.problem(f"zip member {name!r}: no allowed type for {ext or 'no extension'}")
            continue
        result = recheck_bytes(body, kind, report, scan=found.scan_fn, depth=found.depth + 1)
        found.check(f"zip.member.{kind}")
        found.problems.extend(f"{name}: {p}" for p in result.problems)

"""OOXML re-check: zipfile + defusedxml, a part and relationship allow-list.

Problems: a macro-enabled or forbidden content type (VBA, ActiveX, OLE), a part named like a
VBA project/ActiveX control/OLE embedding/customUI, any external relationship (hyperlinks
only when the channel allows them), a relationship type on the deny list, a dangling or
escaping internal target, a part no relationship reaches (smuggled payload), a DTD, a DDE or
content-fetching field code, a DDE formula, a click action running a program or macro, and
document properties when metadata is sanitised.
"""

from __future__ import annotations

import posixpath
import re
from urllib.parse import unquote

from inside.recheck.container import local, members, xml
from inside.recheck.findings import Findings

MACRO_FREE_MAIN = frozenset(
    {
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation.main+xml",
    }
)
BAD_CONTENT = re.compile(
    r"macroEnabled|vbaProject|vbaData|activeX|oleObject|ms-office\.activeX", re.IGNORECASE
)
BAD_PART = re.compile(
    r"vbaProject|vbaData|/activeX/|/embeddings/|customUI|/ctrlProps/|\.bin$", re.IGNORECASE
)
# Relationship types (last URI segment) never expected in a delivered document.
BAD_RELS = frozenset(
    [
        "vbaProject",
        "vbaProjectSignature",
        "vbaProjectSignatureAgile",
        "vbaProjectSignatureV3",
        "wordVbaData",
        "keyMapCustomizations",
        "attachedToolbars",
        "extensibility",
        "customUI",
        "control",
        "activeXControl",
        "activeXControlBinary",
        "webextension",
        "webextensiontaskpanes",
        "oleObject",
        "package",
        "aFChunk",
        "e1Object",
        "e2Object",
        "attachedTemplate",
        "subDocument",
        "frame",
        "externalLink",
        "externalLinkPath",
        "externalReference",
        "connections",
        "queryTable",
        "slideUpdateInfo",
        "video",
        "audio",
        "media",
        "printerSettings",
    ]
)
METADATA_RELS = frozenset(
    {"core-properties", "extended-properties", "custom-properties", "thumbnail"}
)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^\\\\|^//")
_DDE = re.compile(r"\bDDE(AUTO)?\b", re.IGNORECASE)
_FETCH = re.compile(r"^\s*(INCLUDETEXT|INCLUDEPICTURE|IMPORT|LINK)\b", re.IGNORECASE)
_FORMULA_DDE = re.compile(r"[A-Za-z0-9_.\-]+\s*\|\s*'[^']*'\s*!|\bDDE\s*\(", re.IGNORECASE)
_ACTIVE_CLICK = re.compile(r"^ppaction://(program|macro|ole)", re.IGNORECASE)


def check(data: bytes, found: Findings) -> None:
    parts = members(data, found, "ooxml")
    if parts is None:
        return
    if "[Content_Types].xml" not in parts or "_rels/.rels" not in parts:
        found.problem("not an OPC package")
        return
    found.check("ooxml.content_types")
    types = xml(parts["[Content_Types].xml"], "[Content_Types].xml", found)
    if types is None:
        return
    overrides: dict[str, str] = {}
    for el in types:
        ctype = el.get("ContentType", "")
        if BAD_CONTENT.search(ctype):
            found.problem(f"content type {ctype}")
        if local(el.tag) == "Override":
            overrides[el.get("PartName", "").lstrip("/").casefold()] = ctype
    found.check("ooxml.parts")
    by_key = {n.casefold(): n for n in parts}
    for name in parts:
        if BAD_PART.search("/" + name):
            found.problem(f"part {name}")
    found.check("ooxml.relationships")
    reached = {"[content_types].xml"}
    main = ""
    for name in parts:
        if not name.endswith(".rels"):
            continue
        reached.add(name.casefold())
        folder = posixpath.dirname(posixpath.dirname(name))
        root = xml(parts[name], name, found)
        if root is None:
            continue
        for rel in root:
            kind = rel.get("Type", "").rstrip("/").rsplit("/", 1)[-1]
            target = rel.get("Target", "")
            external = rel.get("TargetMode") == "External" or bool(_SCHEME.match(target))
            if kind in BAD_RELS:
                found.problem(f"{name}: relationship type {kind}")
            if kind in METADATA_RELS and not found.allowed("metadata"):
                found.problem(f"{name}: document properties ({kind}) kept")
            if external:
                if not (kind == "hyperlink" and found.allowed("hyperlinks")) and not found.allowed(
                    "external_links"
                ):
                    found.problem(f"{name}: external relationship {kind} → {target[:80]}")
                continue
            path = unquote(target.split("#", 1)[0])
            full = posixpath.normpath(
                path.lstrip("/") if path.startswith("/") else posixpath.join(folder, path)
            )
            if full.startswith(".."):
                found.problem(f"{name}: target {target!r} escapes the package")
                continue
            if full.casefold() not in by_key:
                found.problem(f"{name}: dangling target {target!r}")
                continue
            reached.add(full.casefold())
            if name == "_rels/.rels" and kind == "officeDocument":
                main = full.casefold()
    for name in parts:
        if name.casefold() not in reached:
            found.problem(f"part {name} is not reached by any relationship")
    if overrides.get(main, "") not in MACRO_FREE_MAIN:
        found.problem(f"main part content type {overrides.get(main, '(none)')!r} is not macro-free")
    found.check("ooxml.xml")
    for name, body in parts.items():
        if not (name.endswith((".xml", ".rels", ".vml"))):
            continue
        root = xml(body, name, found)
        if root is None:
            continue
        _content(root, name, found)


def _content(root: object, name: str, found: Findings) -> None:
    codes: list[str] = []
    for el in root.iter():  # type: ignore[attr-defined]
        tag = local(el.tag)
        if tag == "instrText":
            codes.append(el.text or "")
        elif tag == "fldSimple":
            codes.extend(v for k, v in el.attrib.items() if local(k) == "instr")
        elif tag in ("f", "definedName") and el.text and _FORMULA_DDE.search(el.text):
            found.problem(f"{name}: DDE formula")
        elif tag in ("hlinkClick", "hlinkHover", "hlinkMouseOver") and _ACTIVE_CLICK.match(
            el.get("action", "")
        ):
            found.problem(f"{name}: click action {el.get('action')}")
        elif tag in (
            "attachedTemplate",
            "altChunk",
            "subDoc",
            "OLEObject",
            "oleObj",
            "control",
            "ddeLink",
        ):
            found.problem(f"{name}: element {tag}")
    # A field code may be split over runs ("DD" + "EAUTO"): judge the concatenation too.
    if _DDE.search("".join(codes)) and not found.allowed("dde"):
        found.problem(f"{name}: DDE field code")
    for code in codes:
        if _FETCH.match(code) and not found.allowed("external_links"):
            found.problem(f"{name}: field fetching external content ({code.strip()[:40]})")

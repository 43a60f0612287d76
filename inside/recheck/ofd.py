"""OFD re-check: zipfile + defusedxml, a part allow-list and a feature deny-list.

Problems: a DTD; OFD.xml missing; any Actions/Action, Attachments, CustomTags, Extensions,
CustomDatas, Signatures, Permissions or VPreferences element; audio/video MultiMedia; a
locator (text of a *Loc/MediaFile/FontFile/DocRoot/Res element, or a BaseLoc attribute) that
is remote, absolute on a drive, UNC or climbs above the package; a member nothing refers to.
"""

from __future__ import annotations

import posixpath
import re
from xml.etree.ElementTree import Element

from inside.recheck.container import local, members, xml
from inside.recheck.findings import Findings

FORBIDDEN = {
    "Actions": "actions",
    "Action": "actions",
    "Attachments": "embedded_files",
    "Attachment": "embedded_files",
    "CustomTags": "custom_data",
    "CustomTag": "custom_data",
    "Extensions": "custom_data",
    "Extension": "custom_data",
    "CustomDatas": "custom_data",
    "Annotations": "annotations",
    "Signatures": "",
    "Signature": "",
    "Permissions": "",
    "VPreferences": "",
}
LOCATOR_TAGS = frozenset(
    {
        "DocRoot",
        "PublicRes",
        "DocumentRes",
        "PageRes",
        "MediaFile",
        "FontFile",
        "ICCProfile",
        "FileLoc",
        "SchemaLoc",
        "Attachments",
        "CustomTags",
        "Extensions",
        "Annotations",
        "Signatures",
    }
)
_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^\\\\|^//|\\")


def check(data: bytes, found: Findings) -> None:
    parts = members(data, found, "ofd")
    if parts is None:
        return
    if "OFD.xml" not in parts:
        found.problem("no OFD.xml at the root")
        return
    found.check("ofd.xml")
    referenced: set[str] = {"ofd.xml"}
    for name, body in parts.items():
        if not name.lower().endswith(".xml"):
            continue
        root = xml(body, name, found)
        if root is None:
            continue
        _scan_tree(root, name, found, referenced)
    found.check("ofd.parts")
    for name in parts:
        if (
            posixpath.basename(name).casefold() not in referenced
            and name.casefold() not in referenced
        ):
            found.problem(f"member {name} is not referenced by the document")


def _scan_tree(root: Element, name: str, found: Findings, referenced: set[str]) -> None:
    for el in root.iter():
        tag = local(el.tag)
        feature = FORBIDDEN.get(tag)
        if feature is not None and not (feature and found.allowed(feature)):
            found.problem(f"{name}: element {tag}")
        if tag == "MultiMedia" and el.get("Type") != "Image" and not found.allowed("multimedia"):
            found.problem(f"{name}: multimedia of type {el.get('Type')!r}")
        locs = []
        if tag in LOCATOR_TAGS and el.text:
            locs.append(el.text.strip())
        if el.get("BaseLoc"):
            locs.append(str(el.get("BaseLoc")).strip())
        for loc in locs:
            if _REMOTE.search(loc):
                if not found.allowed("external_links"):
                    found.problem(f"{name}: remote locator {loc[:80]!r}")
                continue
            full = posixpath.normpath(posixpath.join(posixpath.dirname(name), loc.lstrip("/")))
            if loc.startswith("/"):
                full = posixpath.normpath(loc.lstrip("/"))
            if full.startswith(".."):
                found.problem(f"{name}: locator {loc[:80]!r} climbs above the package")
            referenced.add(posixpath.basename(loc).casefold())
            referenced.add(full.casefold())

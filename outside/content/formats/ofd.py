"""OFD (GB/T 33190-2016): an OFD-A style rebuild (after GB/T 42133-2022 / ofdrw-archive).

1. ZIP safety (shared with OOXML): traversal, symlinks, duplicates, bombs, encryption.
2. Every part is YARA-scanned; every XML part parsed with a hardened parser, any DTD or
   entity declaration is ``XML_DTD_FORBIDDEN``; comments and processing instructions dropped.
3. The document graph is followed from ``OFD.xml``: DocBody → DocRoot (Document.xml) →
   CommonData (PublicRes, DocumentRes, TemplatePage) and Pages → page Content.xml (PageRes) →
   resource files (fonts, images). Only parts reached this way are written; everything else in
   the ZIP (smuggled files, attachments' payloads) is dropped.
4. Removed per feature switch: ``Actions`` at document, page, object and outline level
   (``actions``); ``Attachments`` (``embedded_files``); audio/video ``MultiMedia``
   (``multimedia``); ``CustomTags``, ``Extensions`` and ``CustomDatas`` (``custom_data``);
   ``Annotations`` (``annotations``); DocInfo fields other than DocID (``metadata``);
   font/media/ICC locators pointing outside the package (``external_links``).
   Always removed: ``Signatures`` (any change invalidates them; the rebuild is a change),
   ``Permissions``, ``VPreferences``, ``Versions`` and any DocBody/Document child not on the
   allow-list.
5. A locator that escapes the package (``..`` above the root) is ``ARCHIVE_TRAVERSAL``; a
   structural locator (DocRoot, page, resource file) that is remote or missing is
   ``MALFORMED``.
"""

from __future__ import annotations

import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from lxml import etree  # type: ignore[import-untyped]

from ferry.content.base import Action, Context, FormatResult, Reject
from outside.content.formats.ooxml import parse_xml, read_zip, serialise, write_zip

TYPE_NAME = "ofd"
_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^\\\\|^//")
# Children of DocBody / Document that are kept as they are (after the deep clean).
DOCBODY_KEEP = frozenset({"DocInfo", "DocRoot"})
DOCUMENT_KEEP = frozenset({"CommonData", "Pages", "Outlines", "Bookmarks"})
# Children of Document (or DocBody) governed by a switch; the rest are always dropped.
DOCUMENT_FEATURE = {
    "Attachments": "embedded_files",
    "CustomTags": "custom_data",
    "Extensions": "custom_data",
    "Annotations": "annotations",
    "Actions": "actions",
}
# Elements removed wherever they occur in a kept part.
DEEP_FEATURE = {"Actions": "actions", "CustomDatas": "custom_data", "Extensions": "custom_data"}
DOCINFO_KEEP = frozenset({"DocID"})
IMAGE_MAGIC = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"\x97JB2",
)
FONT_MAGIC = (b"\x00\x01\x00\x00", b"OTTO", b"true", b"ttcf")


def _local(el: etree._Element) -> str:
    return str(etree.QName(el).localname) if isinstance(el.tag, str) else ""


@dataclass
class _Removal:
    element: etree._Element
    feature: str | None  # None: always removed
    what: str
    where: str


@dataclass
class _Package:
    parts: dict[str, bytes]
    trees: dict[str, etree._Element] = field(default_factory=dict)
    binaries: set[str] = field(default_factory=set)
    removals: list[_Removal] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    by_key: dict[str, str] = field(default_factory=dict)
    recorded: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.by_key = {n.casefold(): n for n in self.parts}

    def resolve(self, loc: str, base_dir: str, where: str, *, structural: bool) -> str | None:
        """The part a locator names, None for a remote locator in a removable position."""
        loc = unquote(loc.strip())
        if not loc:
            raise Reject("MALFORMED", f"empty locator in {where}")
        if _REMOTE.match(loc) or "\\" in loc:
            if structural:
                raise Reject(
                    "MALFORMED", f"{where}: locator {loc[:80]!r} points outside the package"
                )
            return None
        joined = loc.lstrip("/") if loc.startswith("/") else posixpath.join(base_dir, loc)
        norm = posixpath.normpath(joined)
        if norm == ".." or norm.startswith(("../", "/")):
            raise Reject("ARCHIVE_TRAVERSAL", f"{where}: locator {loc[:80]!r} escapes the package")
        name = self.by_key.get(norm.casefold())
        if name is None and structural:
            raise Reject("MALFORMED", f"{where}: {loc[:80]!r} is not in the package")
        return name or ""

    def tree(self, name: str) -> etree._Element:
        if name not in self.trees:
            self.trees[name] = parse_xml(self.parts[name], name)
        return self.trees[name]

    def remove(self, el: etree._Element, feature: str | None, what: str, where: str) -> None:
        """Record ``el`` for removal (once: an element inside a recorded one is covered)."""
        if any(id(a) in self.recorded for a in (el, *el.iterancestors())):
            return
        self.recorded.add(id(el))
        self.removals.append(_Removal(el, feature, what, where))
        if feature:
            self.counts[feature] += 1


def sanitize(src: Path, dst: Path, ctx: Context) -> FormatResult:
    limits = ctx.policy.limits
    if src.stat().st_size > limits.max_bytes:
        raise Reject("LIMIT_EXCEEDED", f"OFD larger than {limits.max_bytes} bytes")
    parts = read_zip(src, limits, what="OFD package")
    for name, data in parts.items():
        ctx.scan(data, name)
    if "OFD.xml" not in parts:
        raise Reject("MALFORMED", "no OFD.xml at the package root")
    pkg = _Package(parts)
    # Every XML part must pass the DTD rule, even the ones that will be dropped.
    for name in parts:
        if name.lower().endswith(".xml"):
            pkg.tree(name)
    pages = _walk(pkg)
    if pages == 0:
        raise Reject("MALFORMED", "OFD has no pages")
    if pages > limits.max_pages:
        raise Reject("LIMIT_EXCEEDED", f"{pages} pages > {limits.max_pages}")
    decided = {f: ctx.feature(f, n, "document") for f, n in sorted(pkg.counts.items())}
    actions: list[Action] = []
    for removal in pkg.removals:
        if removal.feature is not None and not decided.get(removal.feature, False):
            continue
        parent = removal.element.getparent()
        if parent is not None:
            parent.remove(removal.element)
        actions.append(Action("removed", removal.what, removal.where))
    # Re-walk the cleaned graph to know which parts are still referenced.
    pkg.binaries.clear()
    reached = _reached(pkg)
    members: list[tuple[str, bytes]] = []
    for name in parts:
        if name not in reached:
            if not name.endswith("/"):
                actions.append(Action("removed", "part", name))
            continue
        if name in pkg.trees:
            root = pkg.trees[name]
            for junk in list(root.iter(etree.Comment, etree.ProcessingInstruction)):
                parent = junk.getparent()
                if parent is not None:
                    parent.remove(junk)
            members.append((name, serialise(root)))
        else:
            members.append((name, parts[name]))
    write_zip(dst, members)
    return FormatResult(
        TYPE_NAME, cleaned=True, actions=actions, info={"pages": pages, "parts_out": len(members)}
    )


def _walk(pkg: _Package) -> int:
    """Inventory the document graph; return the page count."""
    root = pkg.tree("OFD.xml")
    if _local(root) != "OFD":
        raise Reject("MALFORMED", "OFD.xml root element is not OFD")
    pages = 0
    bodies = [el for el in root if _local(el) == "DocBody"]
    if not bodies:
        raise Reject("MALFORMED", "OFD.xml has no DocBody")
    for body in bodies:
        doc_root = None
        for child in body:
            local = _local(child)
            if local == "DocRoot":
                doc_root = pkg.resolve(child.text or "", "", "DocRoot", structural=True)
            elif local == "DocInfo":
                for info in child:
                    name = _local(info)
                    if name == "CustomDatas":
                        pkg.remove(info, "custom_data", "DocInfo CustomDatas", "OFD.xml")
                    elif name not in DOCINFO_KEEP:
                        pkg.remove(info, "metadata", f"DocInfo {name}", "OFD.xml")
            elif local == "Signatures":
                pkg.remove(child, None, "Signatures (invalidated by the rebuild)", "OFD.xml")
            elif local not in DOCBODY_KEEP:
                pkg.remove(child, DOCUMENT_FEATURE.get(local), f"DocBody {local}", "OFD.xml")
        if not doc_root:
            raise Reject("MALFORMED", "DocBody without DocRoot")
        pages += _document(pkg, doc_root)
    return pages


def _document(pkg: _Package, name: str) -> int:
    doc = pkg.tree(name)
    base = posixpath.dirname(name)
    pages = 0
    for child in doc:
        local = _local(child)
        if local == "CommonData":
            for item in child:
                sub = _local(item)
                if sub in ("PublicRes", "DocumentRes"):
                    _res(
                        pkg,
                        pkg.resolve(item.text or "", base, f"{name} {sub}", structural=True) or "",
                    )
                elif sub == "TemplatePage":
                    _page(
                        pkg,
                        pkg.resolve(
                            item.get("BaseLoc", ""), base, f"{name} TemplatePage", structural=True
                        )
                        or "",
                    )
        elif local == "Pages":
            for page in child:
                if _local(page) == "Page":
                    pages += 1
                    _page(
                        pkg,
                        pkg.resolve(page.get("BaseLoc", ""), base, f"{name} Page", structural=True)
                        or "",
                    )
        elif local in DOCUMENT_FEATURE:
            pkg.remove(child, DOCUMENT_FEATURE[local], local, name)
        elif local not in DOCUMENT_KEEP:
            pkg.remove(child, None, local, name)
    _deep(pkg, doc, name)
    return pages


def _page(pkg: _Package, name: str) -> None:
    page = pkg.tree(name)
    base = posixpath.dirname(name)
    for el in page.iter("{*}PageRes"):
        _res(pkg, pkg.resolve(el.text or "", base, f"{name} PageRes", structural=True) or "")
    _deep(pkg, page, name)


def _res(pkg: _Package, name: str) -> None:
    res = pkg.tree(name)
    base = posixpath.normpath(
        posixpath.join(posixpath.dirname(name), res.get("BaseLoc", "") or ".")
    )
    if base.startswith(".."):
        raise Reject("ARCHIVE_TRAVERSAL", f"{name}: BaseLoc escapes the package")
    for media in res.iter("{*}MultiMedia"):
        kind = media.get("Type", "")
        if kind != "Image":
            pkg.remove(media, "multimedia", f"MultiMedia {kind or '(no type)'}", name)
            continue
        for loc in media.iter("{*}MediaFile"):
            target = pkg.resolve(loc.text or "", base, f"{name} MediaFile", structural=False)
            if target is None:
                pkg.remove(media, "external_links", "MultiMedia with a remote MediaFile", name)
            elif not target or not pkg.parts[target].startswith(IMAGE_MAGIC):
                pkg.remove(media, None, "MultiMedia image that is missing or not an image", name)
    for loc in res.iter("{*}FontFile"):
        target = pkg.resolve(loc.text or "", base, f"{name} FontFile", structural=False)
        if target is None:
            pkg.remove(loc, "external_links", "FontFile with a remote locator", name)
        elif not target or not pkg.parts[target].startswith(FONT_MAGIC):
            pkg.remove(loc, None, "FontFile that is missing or not a font", name)
    for loc in res.iter("{*}ICCProfile"):
        if pkg.resolve(loc.text or "", base, f"{name} ICCProfile", structural=False) is None:
            pkg.remove(loc, "external_links", "ICCProfile with a remote locator", name)
    _deep(pkg, res, name)


def _deep(pkg: _Package, root: etree._Element, where: str) -> None:
    for el in root.iter():
        feature = DEEP_FEATURE.get(_local(el))
        if feature is not None and el is not root:
            pkg.remove(el, feature, _local(el), where)


def _reached(pkg: _Package) -> set[str]:
    """The parts the cleaned graph references (XML and binary)."""
    reached = {"OFD.xml"}
    for body in pkg.tree("OFD.xml").iter("{*}DocRoot"):
        doc = pkg.resolve(body.text or "", "", "DocRoot", structural=True) or ""
        reached.add(doc)
        base = posixpath.dirname(doc)
        tree = pkg.tree(doc)
        for el in tree.iter("{*}PublicRes", "{*}DocumentRes"):
            reached.add(
                _res_reached(
                    pkg, pkg.resolve(el.text or "", base, doc, structural=True) or "", reached
                )
            )
        for el in tree.iter("{*}Page", "{*}TemplatePage"):
            page = pkg.resolve(el.get("BaseLoc", ""), base, doc, structural=True) or ""
            reached.add(page)
            pbase = posixpath.dirname(page)
            for res in pkg.tree(page).iter("{*}PageRes"):
                reached.add(
                    _res_reached(
                        pkg,
                        pkg.resolve(res.text or "", pbase, page, structural=True) or "",
                        reached,
                    )
                )
        # Parts the policy chose to keep (allow): attachments, tags, annotations, extensions.
        for el in tree:
            if _local(el) in DOCUMENT_FEATURE and (el.text or "").strip():
                index = pkg.resolve(el.text or "", base, doc, structural=True) or ""
                reached.add(index)
                ibase = posixpath.dirname(index)
                for loc in pkg.tree(index).iter("{*}FileLoc", "{*}SchemaLoc"):
                    target = pkg.resolve(loc.text or "", ibase, index, structural=False)
                    if target:
                        reached.add(target)
    return reached


def _res_reached(pkg: _Package, name: str, reached: set[str]) -> str:
    res = pkg.tree(name)
    base = posixpath.normpath(
        posixpath.join(posixpath.dirname(name), res.get("BaseLoc", "") or ".")
    )
    for loc in res.iter("{*}MediaFile", "{*}FontFile", "{*}ICCProfile"):
        target = pkg.resolve(loc.text or "", base, name, structural=False)
        if target:
            reached.add(target)
    return name

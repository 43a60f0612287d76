"""OOXML (docx, xlsx, pptx and their macro-enabled twins): allow-list rebuild.

1. A CFB (OLE2) file is not OOXML: with an ``EncryptedPackage`` stream it is an encrypted
   document (``ENCRYPTED``), otherwise ``MALFORMED``.
2. ZIP safety before anything is parsed (:func:`read_zip`): entry count, traversal, absolute
   names, symlinks, duplicate names (case-insensitive, as OPC part names are), encryption
   flag, declared and streamed expanded size, per-entry ratio and overlapping entries.
3. Every part is YARA-scanned; every XML part is parsed with a hardened lxml parser and any
   DTD is ``XML_DTD_FORBIDDEN``.
4. The relationship graph is walked from ``_rels/.rels``. A relationship is kept only if its
   type is on the allow-list and, for an internal target, the part exists inside the package;
   any ``TargetMode="External"`` (or a target with a URL scheme) is a hyperlink
   (``hyperlinks``) or an external link (``external_links``). Macro, ActiveX, OLE, template,
   sub-document, frame, altChunk, external-link, customUI and media relationships map to their
   feature switch. Parts no kept relationship reaches are dropped.
5. In kept XML parts, attributes referring to a removed relationship are removed (and the
   elements that make no sense without one: altChunk, subDoc, OLEObject, control,
   externalData, attachedTemplate); DDE/DDEAUTO and INCLUDE*/LINK field codes are emptied;
   spreadsheet DDE formulas are removed (the cached value stays); ``ppaction://macro`` and
   ``ppaction://program`` clicks are removed.
6. ``docProps`` (core, app, custom, thumbnail) are removed per ``metadata``.
7. ``[Content_Types].xml`` is rewritten: overrides only for kept parts, macro-enabled main
   types remapped to the macro-free ones (docm → docx, xlsm → xlsx, pptm → pptx; templates
   and shows → the document type), VBA/ActiveX/OLE defaults dropped.

:func:`read_zip` and :func:`parse_xml` are shared with the OFD module.
"""

from __future__ import annotations

import itertools
import posixpath
import re
import stat
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import olefile  # type: ignore[import-untyped]
from lxml import etree  # type: ignore[import-untyped]

from ferry.content.base import Action, Context, FormatResult, Limits, Reject

CFB_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
# A member is read in pieces of this size while its expanded bytes are counted.
READ_CHUNK = 1024 * 1024
# The ratio limit applies to members above this size: small XML parts compress very well.
RATIO_FLOOR = 1024 * 1024
_FORBIDDEN_NAME = re.compile(r"(^|/)\.\.(/|$)|^[A-Za-z]:|\\|\x00")

# ------------------------------------------------------------------------ ZIP safety


def read_zip(src: Path, limits: Limits, *, what: str = "package") -> dict[str, bytes]:
    """All members of the ZIP at ``src`` (name → bytes, in archive order), after the
    container checks; raises :class:`Reject` for anything unsafe."""
    try:
        zf = zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise Reject("MALFORMED", f"{what} is not a readable ZIP: {exc}") from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.archive_entries:
            raise Reject("ARCHIVE_BOMB", f"{len(infos)} entries > {limits.archive_entries}")
        seen: set[str] = set()
        declared = 0
        for info in infos:
            name = info.filename
            if name.startswith("/") or _FORBIDDEN_NAME.search(name):
                raise Reject("ARCHIVE_TRAVERSAL", f"unsafe member name {name!r}")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise Reject("ARCHIVE_TRAVERSAL", f"symbolic link member {name!r}")
            if info.flag_bits & 0x1:
                raise Reject("ENCRYPTED", f"encrypted member {name!r}")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise Reject("MALFORMED", f"member {name!r} uses compression {info.compress_type}")
            key = name.casefold()
            if key in seen:
                raise Reject("MALFORMED", f"duplicate member name {name!r}")
            seen.add(key)
            declared += info.file_size
            if declared > limits.archive_expanded:
                raise Reject(
                    "ARCHIVE_BOMB", f"expands to more than {limits.archive_expanded} bytes"
                )
            if info.file_size > RATIO_FLOOR and info.file_size > limits.archive_ratio * max(
                info.compress_size, 1
            ):
                raise Reject(
                    "ARCHIVE_BOMB",
                    f"member {name!r} compression ratio above {limits.archive_ratio}",
                )
        spans = sorted(
            (i.header_offset, i.header_offset + 30 + i.compress_size, i.filename) for i in infos
        )
        for (_, end, a), (start, _, b) in itertools.pairwise(spans):
            if start < end:
                raise Reject("ARCHIVE_BOMB", f"overlapping members {a!r} and {b!r}")
        out: dict[str, bytes] = {}
        budget = limits.archive_expanded
        for info in infos:
            if info.is_dir():
                continue
            chunks: list[bytes] = []
            size = 0
            try:
                with zf.open(info) as fh:
                    while chunk := fh.read(READ_CHUNK):
                        size += len(chunk)
                        if size > info.file_size or size > budget:
                            raise Reject(
                                "ARCHIVE_BOMB",
                                f"member {info.filename!r} expands beyond its declared size",
                            )
                        chunks.append(chunk)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
                raise Reject(
                    "MALFORMED", f"member {info.filename!r} does not decompress: {exc}"
                ) from exc
            budget -= size
            out[info.filename] = b"".join(chunks)
        return out


def write_zip(dst: Path, members: list[tuple[str, bytes]]) -> None:
    """A fresh ZIP with fixed timestamps and no comments or extra fields."""
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)


# ------------------------------------------------------------------------ XML

_PARSER = etree.XMLParser(
    resolve_entities=False,
    no_network=True,
    load_dtd=False,
    dtd_validation=False,
    huge_tree=False,
    remove_comments=False,
    remove_pis=False,
)
_DTD_BYTES = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


def parse_xml(data: bytes, where: str, parser: object = _PARSER) -> etree._Element:
    """Parse one XML part; a DTD or entity declaration anywhere is ``XML_DTD_FORBIDDEN``."""
    if _DTD_BYTES.search(data):
        raise Reject("XML_DTD_FORBIDDEN", f"DTD in {where}")
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise Reject("MALFORMED", f"{where} is not well-formed XML: {exc}") from exc
    info = root.getroottree().docinfo
    if info.doctype or info.internalDTD is not None:
        raise Reject("XML_DTD_FORBIDDEN", f"DTD in {where}")
    return root


XML_DECLARATION = b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\r\n'


def serialise(root: etree._Element) -> bytes:
    body: bytes = etree.tostring(root, xml_declaration=False, encoding="UTF-8")
    return XML_DECLARATION + body


# ------------------------------------------------------------------------ OOXML vocabulary

PKG_RELS_NS = "http://schemas.openxmlformats.org/package/2006/relationships"
CT_NS = "http://schemas.openxmlformats.org/package/2006/content-types"
R_NAMESPACES = frozenset(
    {
        "http://schemas.openxmlformats.org/officeDocument/2006/relationships",
        "http://purl.oclc.org/ooxml/officeDocument/relationships",
    }
)
_O = "application/vnd.openxmlformats-officedocument."
WORD_MAIN = _O + "wordprocessingml.document.main+xml"
EXCEL_MAIN = _O + "spreadsheetml.sheet.main+xml"
PPT_MAIN = _O + "presentationml.presentation.main+xml"
# Main part content type → (delivered type, macro-enabled, the macro-free content type).
MAIN_TYPES: dict[str, tuple[str, bool, str]] = {
    WORD_MAIN: ("docx", False, WORD_MAIN),
    _O + "wordprocessingml.template.main+xml": ("docx", False, WORD_MAIN),
    "application/vnd.ms-word.document.macroEnabled.main+xml": ("docm", True, WORD_MAIN),
    "application/vnd.ms-word.template.macroEnabledTemplate.main+xml": ("docm", True, WORD_MAIN),
    EXCEL_MAIN: ("xlsx", False, EXCEL_MAIN),
    _O + "spreadsheetml.template.main+xml": ("xlsx", False, EXCEL_MAIN),
    "application/vnd.ms-excel.sheet.macroEnabled.main+xml": ("xlsm", True, EXCEL_MAIN),
    "application/vnd.ms-excel.template.macroEnabled.main+xml": ("xlsm", True, EXCEL_MAIN),
    PPT_MAIN: ("pptx", False, PPT_MAIN),
    _O + "presentationml.slideshow.main+xml": ("pptx", False, PPT_MAIN),
    _O + "presentationml.template.main+xml": ("pptx", False, PPT_MAIN),
    "application/vnd.ms-powerpoint.presentation.macroEnabled.main+xml": ("pptm", True, PPT_MAIN),
    "application/vnd.ms-powerpoint.slideshow.macroEnabled.main+xml": ("pptm", True, PPT_MAIN),
    "application/vnd.ms-powerpoint.template.macroEnabled.main+xml": ("pptm", True, PPT_MAIN),
}
MACRO_FREE = {"docm": "docx", "xlsm": "xlsx", "pptm": "pptx"}

# Relationship type (last path segment of the type URI) → feature switch.
DENY_RELS: dict[str, str] = {
    "vbaProject": "macros",
    "vbaProjectSignature": "macros",
    "vbaProjectSignatureAgile": "macros",
    "vbaProjectSignatureV3": "macros",
    "wordVbaData": "macros",
    "keyMapCustomizations": "macros",
    "attachedToolbars": "macros",
    "extensibility": "macros",  # customUI (ribbon callbacks into macros)
    "customUI": "macros",
    "control": "activex",
    "activeXControl": "activex",
    "activeXControlBinary": "activex",
    "webextension": "activex",
    "webextensiontaskpanes": "activex",
    "oleObject": "ole_objects",
    "package": "ole_objects",
    "aFChunk": "ole_objects",
    "e1Object": "ole_objects",
    "e2Object": "ole_objects",
    "attachedTemplate": "external_links",
    "subDocument": "external_links",
    "frame": "external_links",
    "externalLink": "external_links",
    "externalLinkPath": "external_links",
    "externalReference": "external_links",
    "connections": "external_links",
    "queryTable": "external_links",
    "slideUpdateInfo": "external_links",
    "video": "multimedia",
    "audio": "multimedia",
    "media": "multimedia",
    "core-properties": "metadata",
    "metadata/core-properties": "metadata",
    "extended-properties": "metadata",
    "custom-properties": "metadata",
    "thumbnail": "metadata",
}
ALLOW_RELS = frozenset(
    [
        "officeDocument",
        "styles",
        "stylesWithEffects",
        "settings",
        "webSettings",
        "fontTable",
        "theme",
        "themeOverride",
        "numbering",
        "footnotes",
        "endnotes",
        "header",
        "footer",
        "comments",
        "commentsExtended",
        "commentsIds",
        "commentsExtensible",
        "people",
        "glossaryDocument",
        "image",
        "hdphoto",
        "customXml",
        "customXmlProps",
        "worksheet",
        "chartsheet",
        "sharedStrings",
        "calcChain",
        "table",
        "tableSingleCells",
        "pivotTable",
        "pivotCacheDefinition",
        "pivotCacheRecords",
        "drawing",
        "vmlDrawing",
        "chart",
        "chartUserShapes",
        "chartStyle",
        "chartColorStyle",
        "diagramData",
        "diagramLayout",
        "diagramQuickStyle",
        "diagramColors",
        "diagramDrawing",
        "slide",
        "slideLayout",
        "slideMaster",
        "notesSlide",
        "notesMaster",
        "handoutMaster",
        "presProps",
        "viewProps",
        "tableStyles",
        "tags",
        "commentAuthors",
        "font",
        "hyperlink",
        "revisionHeaders",
        "revisionLog",
        "usernames",
        "timeline",
        "timelineCache",
        "slicer",
        "slicerCache",
        "threadedComment",
        "person",
        "sheetMetadata",
        "classificationlabels",
    ]
)
HYPERLINK = "hyperlink"
# Content types that never survive, whatever relationship points at them.
DENY_CONTENT: dict[str, str] = {
    "application/vnd.ms-office.vbaProject": "macros",
    "application/vnd.ms-office.vbaProjectSignature": "macros",
    "application/vnd.ms-word.vbaData+xml": "macros",
    "application/vnd.ms-office.activeX+xml": "activex",
    "application/vnd.ms-office.activeX": "activex",
    _O + "oleObject": "ole_objects",
    "application/vnd.openxmlformats-officedocument.oleObject": "ole_objects",
}
# Elements removed with the relationship they point at.
DROP_WITH_REL = frozenset(
    {
        "altChunk",
        "subDoc",
        "OLEObject",
        "oleObject",
        "oleObj",
        "control",
        "externalData",
        "attachedTemplate",
    }
)
IMAGE_MAGIC = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"\x01\x00\x00\x00",  # EMF
    b"\xd7\xcd\xc6\x9a",  # placeable WMF
    b"\x01\x00\x09\x00",  # WMF
    b"\x02\x00\x09\x00",
)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^\\\\|^//")
_FIELD_DDE = re.compile(r"\bDDE(AUTO)?\b", re.IGNORECASE)
_FIELD_EXTERNAL = re.compile(r"^\s*(INCLUDETEXT|INCLUDEPICTURE|IMPORT|LINK)\b", re.IGNORECASE)
_FORMULA_DDE = re.compile(r"[A-Za-z0-9_.\-]+\s*\|\s*'[^']*'\s*!|\bDDE\s*\(", re.IGNORECASE)
_ACTION_ACTIVE = re.compile(r"^ppaction://(program|macro|ole)", re.IGNORECASE)


def rel_kind(type_uri: str) -> str:
    """The short name of a relationship type URI (its last segment)."""
    tail = type_uri.rstrip("/").rsplit("/", 1)[-1]
    return "core-properties" if type_uri.endswith("metadata/core-properties") else tail


def rels_name(part: str) -> str:
    """The relationships part of ``part`` ("" is the package)."""
    folder, base = posixpath.split(part)
    return posixpath.join(folder, "_rels", base + ".rels")


@dataclass
class Rel:
    source: str
    rid: str
    kind: str
    target: str
    external: bool
    resolved: str = ""  # the target part name for an internal relationship
    feature: str | None = None  # the switch that governs removal
    drop: str = ""  # a reason it is dropped whatever the policy (dangling, unknown type…)


# ------------------------------------------------------------------------ the sanitizer


def sanitize(src: Path, dst: Path, ctx: Context) -> FormatResult:
    limits = ctx.policy.limits
    with src.open("rb") as fh:
        head = fh.read(8)
    if head == CFB_MAGIC:
        _reject_cfb(src)
    if src.stat().st_size > limits.max_bytes:
        raise Reject("LIMIT_EXCEEDED", f"document larger than {limits.max_bytes} bytes")
    parts = read_zip(src, limits, what="OOXML package")
    for name, data in parts.items():
        ctx.scan(data, name)
    return _Rebuild(parts, ctx).run(dst)


def _reject_cfb(src: Path) -> None:
    try:
        ole = olefile.OleFileIO(str(src))
    except Exception as exc:
        raise Reject("MALFORMED", f"broken OLE2 container: {exc}") from exc
    with ole:
        if ole.exists("EncryptedPackage") or ole.exists("EncryptionInfo"):
            raise Reject("ENCRYPTED", "password-protected Office document (EncryptedPackage)")
    raise Reject("MALFORMED", "an OLE2 (legacy binary Office) file, not OOXML")


class _Rebuild:
    def __init__(self, parts: dict[str, bytes], ctx: Context) -> None:
        self.parts = parts
        self.by_key = {name.casefold(): name for name in parts}
        self.ctx = ctx
        self.actions: list[Action] = []
        self.trees: dict[str, etree._Element] = {}
        self.rels: dict[str, list[Rel]] = {}
        self.counts: Counter[str] = Counter()
        self.decided: dict[str, bool] = {}

    # -- helpers ---------------------------------------------------------------------------

    def tree(self, name: str) -> etree._Element:
        if name not in self.trees:
            self.trees[name] = parse_xml(self.parts[name], name)
        return self.trees[name]

    def content_type(self, name: str) -> str:
        return self.overrides.get("/" + name.casefold(), "") or self.defaults.get(
            posixpath.splitext(name)[1].lstrip(".").casefold(), ""
        )

    def removes(self, feature: str) -> bool:
        return self.decided.get(feature, False)

    # -- phases ----------------------------------------------------------------------------

    def run(self, dst: Path) -> FormatResult:
        if "[Content_Types].xml" not in self.parts or "_rels/.rels" not in self.parts:
            raise Reject(
                "MALFORMED", "not an OPC package ([Content_Types].xml or _rels/.rels missing)"
            )
        self._content_types()
        # Every XML part is parsed (DTD check) even if it is dropped later.
        for name in self.parts:
            if name.endswith((".xml", ".rels", ".vml")) or self.content_type(name).endswith("xml"):
                self.tree(name)
        main = self._walk_rels()
        ct = self.content_type(main)
        if ct not in MAIN_TYPES:
            raise Reject(
                "TYPE_NOT_ALLOWED", f"main part content type {ct or '(none)'} is not docx/xlsx/pptx"
            )
        in_type, macro_type, macro_free_ct = MAIN_TYPES[ct]
        self._inspect_content()
        for feature, count in sorted(self.counts.items()):
            self.decided[feature] = self.ctx.feature(feature, count, "document")
        kept = self._reachable()
        out_type = in_type
        if (macro_type and self.removes("macros")) or (macro_type and not self._has_macros(kept)):
            out_type = MACRO_FREE[in_type]
        if out_type != in_type:
            self.actions.append(Action("converted", f"{in_type} to {out_type}", main))
        members = self._emit(kept, main, macro_free_ct if out_type != in_type else ct)
        write_zip(dst, members)
        dropped = [n for n in self.parts if n not in {m for m, _ in members}]
        for name in dropped:
            if name not in ("[Content_Types].xml",) and not name.endswith(".rels"):
                self.actions.append(Action("removed", "part", name))
        return FormatResult(
            out_type,
            cleaned=True,
            actions=self.actions,
            info={"input_type": in_type, "parts_in": len(self.parts), "parts_out": len(members)},
        )

    def _content_types(self) -> None:
        root = self.tree("[Content_Types].xml")
        self.defaults: dict[str, str] = {}
        self.overrides: dict[str, str] = {}
        for el in root:
            if not isinstance(el.tag, str):
                continue
            local = etree.QName(el).localname
            if local == "Default":
                self.defaults[el.get("Extension", "").casefold()] = el.get("ContentType", "")
            elif local == "Override":
                self.overrides[el.get("PartName", "").casefold()] = el.get("ContentType", "")

    def _walk_rels(self) -> str:
        """Read every relationship reachable from the package; return the main part."""
        main = ""
        queue = [""]
        visited: set[str] = set()
        while queue:
            source = queue.pop()
            if source in visited:
                continue
            visited.add(source)
            rname = rels_name(source) if source else "_rels/.rels"
            rname = self.by_key.get(rname.casefold(), rname)
            if rname not in self.parts:
                continue
            rels = self.rels.setdefault(source, [])
            for el in self.tree(rname):
                if not isinstance(el.tag, str) or etree.QName(el).localname != "Relationship":
                    continue
                rel = self._classify(source, el)
                rels.append(rel)
                if (
                    source == ""
                    and rel.kind == "officeDocument"
                    and not rel.external
                    and not rel.drop
                ):
                    main = rel.resolved
                if rel.resolved and not rel.drop:
                    queue.append(rel.resolved)
        if not main:
            raise Reject("MALFORMED", "no officeDocument relationship to a main part")
        return main

    def _classify(self, source: str, el: etree._Element) -> Rel:
        target = el.get("Target", "")
        kind = rel_kind(el.get("Type", ""))
        external = el.get("TargetMode", "") == "External" or bool(_SCHEME.match(target))
        rel = Rel(source, el.get("Id", ""), kind, target, external)
        if external:
            rel.feature = "hyperlinks" if kind == HYPERLINK else "external_links"
            self.counts[rel.feature] += 1
            return rel
        path = unquote(target.split("#", 1)[0])
        if not path:
            rel.drop = "empty target"
            return rel
        joined = (
            path.lstrip("/")
            if path.startswith("/")
            else posixpath.join(posixpath.dirname(source), path)
        )
        norm = posixpath.normpath(joined)
        if norm.startswith("../") or norm == ".." or norm.startswith("/"):
            raise Reject("ARCHIVE_TRAVERSAL", f"relationship target {target!r} escapes the package")
        resolved = self.by_key.get(norm.casefold())
        if resolved is None:
            rel.drop = "target part missing"
            return rel
        rel.resolved = resolved
        ctype = self.content_type(resolved)
        feature = DENY_RELS.get(kind) or DENY_CONTENT.get(ctype)
        if feature is None and ("macroEnabled" in ctype and "main+xml" not in ctype):
            feature = "macros"
        if feature is not None:
            rel.feature = feature
            self.counts[feature] += 1
        elif kind not in ALLOW_RELS:
            rel.drop = f"relationship type {kind!r} not on the allow-list"
        elif (
            kind in ("image", "hdphoto")
            and not self.parts[resolved].startswith(IMAGE_MAGIC)
            and not (ctype == "image/svg+xml" and self._safe_svg(resolved))
        ):
            rel.drop = "image part whose bytes are not an allowed image"
        return rel

    def _safe_svg(self, name: str) -> bool:
        root = self.tree(name)
        for el in root.iter():
            if not isinstance(el.tag, str):
                return False
            if etree.QName(el).localname in (
                "script",
                "foreignObject",
                "iframe",
                "embed",
                "object",
            ):
                return False
            for key, value in el.attrib.items():
                local = etree.QName(key).localname.lower()
                if local.startswith("on") or (local == "href" and not value.startswith("#")):
                    return False
        return True

    def _inspect_content(self) -> None:
        """Count the in-XML features (DDE fields and formulas, active click actions)."""
        self.fields: dict[str, list[tuple[str, list[etree._Element]]]] = {}
        for name in self.rels.keys() | {r.resolved for rels in self.rels.values() for r in rels}:
            if not name or name not in self.trees:
                continue
            root = self.trees[name]
            fields = _fields(root)
            self.fields[name] = fields
            for feature, _ in fields:
                self.counts[feature] += 1
            for el in root.iter("{*}f", "{*}definedName"):
                if el.text and _FORMULA_DDE.search(el.text):
                    self.counts["dde"] += 1
            for el in root.iter("{*}hlinkClick", "{*}hlinkHover", "{*}hlinkMouseOver"):
                if _ACTION_ACTIVE.match(el.get("action", "")):
                    self.counts["macros"] += 1

    def _keep(self, rel: Rel) -> bool:
        if rel.drop:
            return False
        return rel.feature is None or not self.removes(rel.feature)

    def _reachable(self) -> set[str]:
        kept: set[str] = set()
        queue = [""]
        while queue:
            source = queue.pop()
            for rel in self.rels.get(source, []):
                if rel.resolved and self._keep(rel) and rel.resolved not in kept:
                    kept.add(rel.resolved)
                    queue.append(rel.resolved)
        return kept

    def _has_macros(self, kept: set[str]) -> bool:
        return any(
            DENY_RELS.get(r.kind) == "macros"
            for s in kept | {""}
            for r in self.rels.get(s, [])
            if self._keep(r)
        )

    # -- output ----------------------------------------------------------------------------

    def _emit(self, kept: set[str], main: str, main_ct: str) -> list[tuple[str, bytes]]:
        members: list[tuple[str, bytes]] = [
            ("[Content_Types].xml", self._new_content_types(kept, main, main_ct))
        ]
        for source in ["", *[n for n in self.parts if n in kept]]:
            rels = self.rels.get(source, [])
            removed = {r.rid for r in rels if not self._keep(r)}
            for rel in rels:
                if not self._keep(rel):
                    what = rel.drop or f"{rel.feature}"
                    self.actions.append(
                        Action("removed", f"relationship {rel.kind} ({what})", source or "package")
                    )
            if source:
                members.append((source, self._part_bytes(source, removed)))
            if rels:
                members.append(
                    (rels_name(source) if source else "_rels/.rels", self._rels_bytes(source, rels))
                )
        return members

    def _new_content_types(self, kept: set[str], main: str, main_ct: str) -> bytes:
        root = self.tree("[Content_Types].xml")
        for el in list(root):
            if not isinstance(el.tag, str):
                root.remove(el)
                continue
            local = etree.QName(el).localname
            ctype = el.get("ContentType", "")
            if local == "Override":
                part = el.get("PartName", "").lstrip("/")
                name = self.by_key.get(part.casefold())
                if name is None or name not in kept:
                    root.remove(el)
                elif name == main:
                    el.set("ContentType", main_ct)
            elif (
                local == "Default" and (ctype in DENY_CONTENT or "macroEnabled" in ctype)
            ) or local not in ("Default", "Override"):
                root.remove(el)
        return serialise(root)

    def _rels_bytes(self, source: str, rels: list[Rel]) -> bytes:
        keep = {r.rid for r in rels if self._keep(r)}
        rname = self.by_key.get((rels_name(source) if source else "_rels/.rels").casefold(), "")
        root = self.tree(rname)
        for el in list(root):
            if not isinstance(el.tag, str) or el.get("Id", "") not in keep:
                root.remove(el)
        return serialise(root)

    def _part_bytes(self, name: str, removed: set[str]) -> bytes:
        if name not in self.trees:
            return self.parts[name]
        root = self.trees[name]
        changed = False
        if removed:
            changed |= _drop_references(root, removed)
        for feature, instr in self.fields.get(name, []):
            if self.removes(feature):
                changed = True
                for el in instr:
                    if etree.QName(el).localname == "fldSimple":
                        _unwrap(el)
                    else:
                        el.text = ""
                self.actions.append(Action("removed", f"field code ({feature})", name))
        if self.removes("dde"):
            for el in list(root.iter("{*}f", "{*}definedName")):
                if el.text and _FORMULA_DDE.search(el.text):
                    el.getparent().remove(el)
                    changed = True
                    self.actions.append(Action("removed", "DDE formula", name))
        if self.removes("macros"):
            for el in list(root.iter("{*}hlinkClick", "{*}hlinkHover", "{*}hlinkMouseOver")):
                if _ACTION_ACTIVE.match(el.get("action", "")):
                    el.getparent().remove(el)
                    changed = True
                    self.actions.append(
                        Action("removed", "click action running a program or macro", name)
                    )
        return serialise(root) if changed else self.parts[name]


def _fields(root: etree._Element) -> list[tuple[str, list[etree._Element]]]:
    """Word fields whose code is DDE (``dde``) or fetches content (``external_links``):
    a list of (feature, the instrText/fldSimple elements carrying the code)."""
    found: list[tuple[str, list[etree._Element]]] = []
    stack: list[list[etree._Element]] = []
    for el in root.iter("{*}fldChar", "{*}instrText", "{*}fldSimple"):
        local = etree.QName(el).localname
        if local == "fldSimple":
            feature = _field_feature(_attr_local(el, "instr"))
            if feature:
                found.append((feature, [el]))
        elif local == "instrText":
            if stack:
                stack[-1].append(el)
            else:  # an instruction outside any field: judge it alone
                feature = _field_feature(el.text or "")
                if feature:
                    found.append((feature, [el]))
        else:
            kind = _attr_local(el, "fldCharType")
            if kind == "begin":
                stack.append([])
            elif kind == "end" and stack:
                instr = stack.pop()
                feature = _field_feature("".join(e.text or "" for e in instr))
                if feature:
                    found.append((feature, instr))
    for instr in stack:  # unterminated fields
        feature = _field_feature("".join(e.text or "" for e in instr))
        if feature:
            found.append((feature, instr))
    return found


def _field_feature(code: str) -> str | None:
    if _FIELD_DDE.search(code):
        return "dde"
    if _FIELD_EXTERNAL.match(code):
        return "external_links"
    return None


def _attr_local(el: etree._Element, local: str) -> str:
    for key, value in el.attrib.items():
        if etree.QName(key).localname == local:
            return str(value)
    return ""


def _drop_references(root: etree._Element, removed: set[str]) -> bool:
    """Remove attributes (in a relationships namespace) naming a removed relationship id,
    and the elements that exist only to carry such a reference."""
    changed = False
    for el in list(root.iter()):
        if not isinstance(el.tag, str):
            continue
        for key in list(el.attrib.keys()):
            qn = etree.QName(key)
            if qn.namespace in R_NAMESPACES and el.get(key) in removed:
                if (
                    qn.localname in ("id", "embed", "link", "pict", "href")
                    and etree.QName(el).localname in DROP_WITH_REL
                ):
                    parent = el.getparent()
                    if parent is not None:
                        parent.remove(el)
                        changed = True
                        break
                del el.attrib[key]
                changed = True
    return changed


def _unwrap(el: etree._Element) -> None:
    """Replace ``el`` by its children (a fldSimple keeps its displayed result)."""
    parent = el.getparent()
    if parent is None:
        return
    index = parent.index(el)
    for offset, child in enumerate(list(el)):
        parent.insert(index + offset, child)
    parent.remove(el)

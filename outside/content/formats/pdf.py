"""PDF: structural rebuild with pikepdf/qpdf.

1. Open without recovery; an encrypted file is ``ENCRYPTED``; any file qpdf has to repair,
   or warns about at any point (open, walk, save), is ``MALFORMED`` — a silently repaired file
   is a parser differential waiting to happen (cdr-anchors §4.1).
2. Count pages against ``limits.max_pages`` and inventory the source: every JavaScript,
   action, embedded file, form, annotation and metadata object is counted, and every embedded
   file, script and XFA stream is YARA-scanned (decoded, with a byte budget).
3. Copy only the pages into a new document (the catalog's OpenAction, AA, Names/JavaScript,
   EmbeddedFiles, AcroForm/XFA and Metadata are left behind unless the policy allows them).
4. Walk the new object graph and remove, per feature switch: /JS and JavaScript actions,
   /AA and OpenAction, Launch/SubmitForm/ImportData/GoToR/GoToE/Rendition/Movie/Sound actions,
   URI actions (``hyperlinks``), file-attachment, widget, rich-media and markup annotations,
   page /Metadata and /PieceInfo.
5. Save with object streams disabled (every dictionary is visible to the inside lexer), raw
   stream data copied (no decoding on save), a fresh document ID and no Info unless allowed.

The output is always a rebuilt file (``cleaned=True``): even a clean input loses its
incremental updates, unreferenced objects and trailing bytes.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pikepdf
from pikepdf import Array, Dictionary, Name, Pdf, Stream

from ferry.content.base import Action, Context, FormatResult, Reject

TYPE_NAME = "pdf"

# A decoded stream handed to YARA is capped: a 1 MB FlateDecode stream can expand a thousand
# fold. 64 MiB is well above real attachments and scripts and below the worker memory rlimit.
MAX_DECODED_STREAM = 64 * 1024 * 1024

# Action types (/S) and the feature that governs them. GoTo (an internal jump) and Named
# (NextPage, …) are kept; anything not listed here and not in SAFE_ACTIONS is an "actions".
ACTION_FEATURE = {
    "/JavaScript": "javascript",
    "/URI": "hyperlinks",
    "/Launch": "actions",
    "/SubmitForm": "forms",
    "/ImportData": "forms",
    "/ResetForm": "forms",
    "/GoToR": "external_links",
    "/GoToE": "embedded_files",
    "/Rendition": "multimedia",
    "/Movie": "multimedia",
    "/Sound": "multimedia",
    "/RichMediaExecute": "multimedia",
    "/Hide": "actions",
    "/SetOCGState": "actions",
    "/Trans": "actions",
    "/GoTo3DView": "multimedia",
    "/Thread": "actions",
}
SAFE_ACTIONS = frozenset({"/GoTo", "/Named"})
# Keys holding a single action (or, for /Next, an action or an array of actions).
ACTION_KEYS = ("/A", "/PA", "/Next")

# Annotation subtypes and the feature governing them; links are judged by their action.
ANNOT_FEATURE = {
    "/FileAttachment": "embedded_files",
    "/Widget": "forms",
    "/RichMedia": "multimedia",
    "/Screen": "multimedia",
    "/Movie": "multimedia",
    "/Sound": "multimedia",
    "/3D": "multimedia",
}
# Catalog entries copied into the rebuilt document (after pages, so page references map).
CATALOG_COPY = ("/PageLabels", "/PageLayout", "/Lang", "/Outlines")


def sanitize(src: Path, dst: Path, ctx: Context) -> FormatResult:
    limits = ctx.policy.limits
    if src.stat().st_size > limits.max_bytes:
        raise Reject("LIMIT_EXCEEDED", f"PDF larger than {limits.max_bytes} bytes")
    try:
        pdf = pikepdf.open(src, attempt_recovery=False)
    except pikepdf.PasswordError as exc:
        raise Reject("ENCRYPTED", "PDF is password protected") from exc
    except pikepdf.PdfError as exc:
        raise Reject("MALFORMED", f"PDF does not parse without repair: {exc}") from exc
    with pdf:
        _check_warnings(pdf, "open")
        if pdf.is_encrypted:
            raise Reject("ENCRYPTED", "PDF is encrypted (owner password or permissions)")
        npages = len(pdf.pages)
        if npages > limits.max_pages:
            raise Reject("LIMIT_EXCEEDED", f"{npages} pages > {limits.max_pages}")
        if npages == 0:
            raise Reject("MALFORMED", "PDF has no pages")
        rebuild = _Rebuild(pdf, ctx)
        out = rebuild.run()
        with out:
            out.save(
                dst,
                object_stream_mode=pikepdf.ObjectStreamMode.disable,
                stream_decode_level=pikepdf.StreamDecodeLevel.none,
                compress_streams=True,
                deterministic_id=True,
                linearize=False,
                fix_metadata_version=False,
            )
            _check_warnings(pdf, "rebuild")
            _check_warnings(out, "save")
        return FormatResult(
            TYPE_NAME,
            cleaned=True,
            actions=rebuild.actions,
            info={"pages": npages, "objects_in": len(pdf.objects)},
        )


def _check_warnings(pdf: Pdf, stage: str) -> None:
    warnings = pdf.get_warnings()
    if warnings:
        raise Reject("MALFORMED", f"qpdf warned during {stage}: {warnings[0]}")


def _walk(root: pikepdf.Object) -> Iterator[Dictionary | Stream]:
    """Every dictionary and stream reachable from ``root``, each indirect object once."""
    seen: set[tuple[int, int]] = set()
    stack: list[pikepdf.Object] = [root]
    while stack:
        obj = stack.pop()
        if obj.is_indirect:
            key = obj.objgen
            if key in seen:
                continue
            seen.add(key)
        if isinstance(obj, Dictionary | Stream):
            yield obj
            children: list[object] = [obj.get(k) for k in list(obj.keys())]
        else:
            children = list(obj)
        stack.extend(c for c in children if isinstance(c, Dictionary | Stream | Array))


def _name(obj: pikepdf.Object | None) -> str:
    return str(obj) if isinstance(obj, Name) else ""


def _action_feature(action: pikepdf.Object) -> str | None:
    """The feature an action dictionary belongs to, None for a safe one (GoTo, Named)."""
    if not isinstance(action, Dictionary):
        return None  # a destination array or a malformed entry (dropped by the walk anyway)
    kind = _name(action.get("/S"))
    if "/JS" in action:
        return "javascript"
    if kind in SAFE_ACTIONS:
        return None
    return ACTION_FEATURE.get(kind, "actions")


class _Rebuild:
    def __init__(self, src: Pdf, ctx: Context) -> None:
        self.src = src
        self.ctx = ctx
        self.actions: list[Action] = []
        self.decided: dict[str, bool] = {}

    # -- decisions ---------------------------------------------------------------------

    def remove(self, feature: str, count: int, where: str = "") -> bool:
        """Ask the policy once per feature (the first count decides disallow)."""
        if count <= 0:
            return False
        if feature not in self.decided:
            self.decided[feature] = self.ctx.feature(feature, count, where)
        return self.decided[feature]

    def note(self, target: str, where: str = "", count: int = 1) -> None:
        self.actions.append(Action("removed", target, where, count))

    # -- the rebuild -----------------------------------------------------------------------

    def run(self) -> Pdf:
        self._inventory()
        out = pikepdf.new()
        for page in self.src.pages:
            out.pages.append(page)
        catalog = self.src.Root
        for key in CATALOG_COPY:
            if key in catalog:
                out.Root[key] = out.copy_foreign(catalog[key])
        self._catalog_extras(out)
        self._strip(out)
        present = self._metadata_count()
        if present and not self.remove("metadata", present, "document"):
            if "/Metadata" in catalog:
                out.Root.Metadata = out.copy_foreign(catalog.Metadata)
            if "/Info" in self.src.trailer:
                out.trailer.Info = out.copy_foreign(self.src.trailer.Info)
        elif present:
            self.note("document information and XMP metadata", "catalog", present)
        return out

    def _metadata_count(self) -> int:
        info = self.src.trailer.get("/Info")
        n = 1 if isinstance(info, Dictionary) and len(info.keys()) else 0
        return n + (1 if "/Metadata" in self.src.Root else 0)

    def _inventory(self) -> None:
        """Count (for the policy) and scan every active or embedded object of the source."""
        counts: Counter[str] = Counter()
        for obj in _walk(self.src.trailer):
            kind = _name(obj.get("/Type"))
            if isinstance(obj, Stream) and (kind == "/EmbeddedFile" or "/Params" in obj):
                counts["embedded_files"] += 1
                self.ctx.scan(_decoded(obj), "embedded file")
            js = obj.get("/JS")
            if js is not None:
                counts["javascript"] += 1
                code = (
                    _decoded(js)
                    if isinstance(js, Stream)
                    else bytes(js)
                    if isinstance(js, pikepdf.String)
                    else b""
                )
                self.ctx.scan(code, "JavaScript")
            xfa = obj.get("/XFA")
            if xfa is not None:
                counts["forms"] += 1
                parts = (
                    [xfa]
                    if isinstance(xfa, Stream)
                    else [x for x in xfa if isinstance(x, Stream)]
                    if isinstance(xfa, Array)
                    else []
                )
                for part in parts:
                    self.ctx.scan(_decoded(part), "XFA")
        # Catalog-level features the page copy leaves behind are decided here; the graph
        # walk of the output decides the rest.
        root = self.src.Root
        names = root.get("/Names")
        if isinstance(names, Dictionary):
            if "/JavaScript" in names:
                counts["javascript"] += 1
            if "/EmbeddedFiles" in names:
                counts["embedded_files"] += 1
        for feature in ("javascript", "embedded_files", "forms"):
            if counts[feature]:
                self.remove(feature, counts[feature], "document")

    def _catalog_extras(self, out: Pdf) -> None:
        root = self.src.Root
        open_action = root.get("/OpenAction")
        if open_action is not None:
            # An automatic action: governed by "actions" and by its own kind (JavaScript, …).
            # A plain destination (open at page N) is dropped too: it would need remapping.
            feature = _action_feature(open_action)
            drop_kind = feature is not None and self.remove(feature, 1, "/OpenAction")
            drop_auto = feature is None or self.remove("actions", 1, "/OpenAction")
            if drop_kind or drop_auto:
                self.note("/OpenAction", "catalog")
            else:
                out.Root.OpenAction = out.copy_foreign(open_action)
        if "/AA" in root:
            if self.remove("actions", 1, "catalog /AA"):
                self.note("/AA", "catalog")
            else:
                out.Root.AA = out.copy_foreign(root.AA)
        names = root.get("/Names")
        if isinstance(names, Dictionary):
            kept = Dictionary()
            for key in list(names.keys()):
                feature = {"/JavaScript": "javascript", "/EmbeddedFiles": "embedded_files"}.get(key)
                if key == "/Dests" or (feature and not self.remove(feature, 1, f"/Names {key}")):
                    kept[key] = out.copy_foreign(names[key])
                else:
                    self.note(f"/Names {key}", "catalog")
            if len(kept.keys()):
                out.Root.Names = out.make_indirect(kept)
        if "/Dests" in root:
            out.Root.Dests = out.copy_foreign(root.Dests)
        if "/AcroForm" in root:
            if self.remove("forms", 1, "/AcroForm"):
                self.note("/AcroForm", "catalog")
            else:
                out.Root.AcroForm = out.copy_foreign(root.AcroForm)
        for key in (
            "/URI",
            "/Collection",
            "/OCProperties",
            "/Perms",
            "/Legal",
            "/Threads",
            "/SpiderInfo",
            "/Requirements",
            "/StructTreeRoot",
            "/MarkInfo",
            "/PieceInfo",
            "/ViewerPreferences",
            "/Extensions",
            "/AF",
        ):
            if key in root:
                self.note(key, "catalog")

    def _strip(self, out: Pdf) -> None:
        """Remove active entries from every dictionary reachable in the rebuilt document."""
        counts: Counter[str] = Counter()
        for obj in _walk(out.trailer):
            for key in ACTION_KEYS:
                self._strip_action_key(obj, key, counts)
            if "/JS" in obj and self.remove("javascript", 1, "/JS"):
                del obj["/JS"]
                counts["/JS"] += 1
            if "/AA" in obj and self.remove("actions", 1, "/AA"):
                del obj["/AA"]
                counts["/AA"] += 1
            if (
                "/OpenAction" in obj
                and obj.objgen != out.Root.objgen
                and self.remove("actions", 1, "/OpenAction")
            ):
                del obj["/OpenAction"]
                counts["/OpenAction"] += 1
            for key in ("/Metadata", "/PieceInfo"):
                if key in obj and obj.objgen != out.Root.objgen and self.remove("metadata", 1, key):
                    del obj[key]
                    counts[key] += 1
            if "/XFA" in obj and self.remove("forms", 1, "/XFA"):
                del obj["/XFA"]
                counts["/XFA"] += 1
            if "/EmbeddedFiles" in obj and self.remove("embedded_files", 1, "/EmbeddedFiles"):
                del obj["/EmbeddedFiles"]
                counts["/EmbeddedFiles"] += 1
            if "/EF" in obj and self.remove("embedded_files", 1, "/EF"):
                del obj["/EF"]
                counts["/EF"] += 1
            if _name(obj.get("/Type")) == "/Page":
                self._strip_annots(obj, counts)
        for target, n in sorted(counts.items()):
            self.note(target, "", n)

    def _strip_action_key(self, obj: Dictionary | Stream, key: str, counts: Counter[str]) -> None:
        value = obj.get(key)
        if value is None:
            return
        actions = list(value) if key == "/Next" and isinstance(value, Array) else [value]
        for action in actions:
            feature = _action_feature(action)
            if feature is None:
                continue
            if self.remove(feature, 1, key):
                del obj[key]
                counts[f"{key} {_name(action.get('/S')) or 'action'}"] += 1
                return

    def _strip_annots(self, page: Dictionary | Stream, counts: Counter[str]) -> None:
        annots = page.get("/Annots")
        if annots is None:
            return
        if not isinstance(annots, Array):
            del page["/Annots"]
            counts["/Annots (malformed)"] += 1
            return
        kept = Array()
        for annot in annots:
            if not isinstance(annot, Dictionary):
                counts["annotation (malformed)"] += 1
                continue
            subtype = _name(annot.get("/Subtype"))
            if subtype in ("/Link", "/Popup"):
                feature = None
            else:
                feature = ANNOT_FEATURE.get(subtype, "annotations")
            if feature is not None and self.remove(feature, 1, f"annotation {subtype}"):
                counts[f"annotation {subtype or '(no subtype)'}"] += 1
                continue
            kept.append(annot)
        if len(kept) != len(annots):
            if len(kept):
                page["/Annots"] = kept
            else:
                del page["/Annots"]


def _decoded(stream: Stream) -> bytes:
    """The decoded data of ``stream`` with a byte budget (FlateDecode decoded by hand)."""
    filters = stream.get("/Filter")
    if _name(filters) == "/FlateDecode" and "/DecodeParms" not in stream:
        raw = stream.read_raw_bytes()
        dec = zlib.decompressobj()
        try:
            data = dec.decompress(raw, MAX_DECODED_STREAM)
        except zlib.error as exc:
            raise Reject("MALFORMED", f"corrupt FlateDecode stream: {exc}") from exc
        if dec.unconsumed_tail:
            raise Reject(
                "LIMIT_EXCEEDED", f"a stream decodes to more than {MAX_DECODED_STREAM} bytes"
            )
        return data
    if filters is None:
        return stream.read_raw_bytes()
    try:
        data = stream.read_bytes()
    except pikepdf.PdfError as exc:
        raise Reject("MALFORMED", f"stream does not decode: {exc}") from exc
    if len(data) > MAX_DECODED_STREAM:
        raise Reject("LIMIT_EXCEEDED", f"a stream decodes to more than {MAX_DECODED_STREAM} bytes")
    return data

"""XML files: no DTD, strict parsing, optional XSD validation, canonical output.

1. Before any parser runs, the bytes are searched for markup declarations (``<!DOCTYPE``,
   ``<!ENTITY``, ``<!ELEMENT``…) outside comments, CDATA sections and processing
   instructions: any DTD is refused as XML_DTD_FORBIDDEN, so entity expansion (billion laughs)
   and external entities (XXE) never reach a parser. UTF-16 is decoded first; every
   ASCII-compatible encoding (UTF-8, GB18030/GBK, ISO-8859-x) can be searched as bytes.
2. lxml parses with entity resolution, DTD loading and network access off, and libxml2's
   default limits (depth 256, no huge text nodes). Undefined entities and any syntax error are
   MALFORMED; the checked size limit is ``structured_bytes``.
3. ``external_links``: XInclude elements and ``xml-stylesheet`` processing instructions are
   removed (sanitize) or refused (disallow).
4. With ``xml_schemas`` in the policy the document must satisfy one of those XSDs.
5. Output: Canonical XML 1.0 with comments (UTF-8, attributes ordered, no declaration).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from lxml import etree  # type: ignore[import-untyped]

from ferry.content.base import Action, Context, FormatResult, Reject
from outside.content.formats.jsonfile import scan_strings

XINCLUDE = "{http://www.w3.org/2001/XInclude}"
_MARKUP = re.compile(rb"<[!?]")


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        strip_cdata=False,
        remove_blank_text=False,
    )


def _as_bytes_searchable(data: bytes) -> bytes:
    """Bytes in which ASCII markup can be found: UTF-16 decoded (BOM or a leading '<')."""
    for prefix, codec in (
        (b"\xff\xfe", "utf-16-le"),
        (b"\xfe\xff", "utf-16-be"),
        (b"<\x00", "utf-16-le"),
        (b"\x00<", "utf-16-be"),
    ):
        if data.startswith(prefix):
            try:
                return data.decode(codec).encode("utf-8")
            except UnicodeDecodeError:
                raise Reject("MALFORMED", f"invalid {codec.upper()} XML") from None
    if data.startswith((b"\x00\x00\xfe\xff", b"\xff\xfe\x00\x00")):
        raise Reject("MALFORMED", "UTF-32 XML is not accepted")
    return data


def forbid_dtd(data: bytes) -> None:
    """Reject("XML_DTD_FORBIDDEN") if the document declares a DTD or anything in one."""
    text = _as_bytes_searchable(data)
    pos = 0
    while True:
        m = _MARKUP.search(text, pos)
        if m is None:
            return
        at = m.start()
        for opener, closer in ((b"<!--", b"-->"), (b"<![CDATA[", b"]]>"), (b"<?", b"?>")):
            if text.startswith(opener, at):
                end = text.find(closer, at + len(opener))
                if end < 0:
                    raise Reject("MALFORMED", "an XML comment, CDATA or instruction is not closed")
                pos = end + len(closer)
                break
        else:
            word = text[at + 2 : at + 12].split(maxsplit=1)[0] if text[at + 2 : at + 3] else b""
            shown = word.decode("ascii", "replace")[:10]
            raise Reject(
                "XML_DTD_FORBIDDEN",
                f"the XML declares a DTD (<!{shown}); DTDs and entities are not accepted",
            )


@lru_cache(maxsize=16)
def _schema(path: str) -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(path, _parser()))


def _texts(root: Any) -> Iterator[str]:
    for node in root.iter():
        if node.text:
            yield node.text
        if node.tail:
            yield node.tail
        if isinstance(node.tag, str):
            yield from node.attrib.values()


def _external(tree: Any, ctx: Context) -> tuple[Any, list[Action]]:
    """Apply ``external_links`` to XIncludes and stylesheets; returns the (new) tree."""
    root = tree.getroot()
    if root.tag.startswith(XINCLUDE):
        raise Reject("ACTIVE_CONTENT_DISALLOWED", "the XML document is only an XInclude")
    includes = [e for e in root.iter() if isinstance(e.tag, str) and e.tag.startswith(XINCLUDE)]
    before = list(root.itersiblings(preceding=True))[::-1]
    after = list(root.itersiblings())
    top = [n for n in before + after if _is_stylesheet(n)]
    inner = [pi for pi in root.iter(etree.ProcessingInstruction) if _is_stylesheet(pi)]
    found = len(includes) + len(top) + len(inner)
    if not found or not ctx.feature("external_links", found, "XML"):
        return tree, []
    for node in includes + inner:
        if node.getparent() is not None:  # an XInclude inside a removed XInclude is gone
            _drop(node)
    if top:  # prolog and epilog nodes have no parent: rebuild around a copy of the root
        fresh = copy.deepcopy(root)
        for node in before:
            if not _is_stylesheet(node):
                fresh.addprevious(copy.deepcopy(node))
        for node in reversed(after):
            if not _is_stylesheet(node):
                fresh.addnext(copy.deepcopy(node))
        tree = etree.ElementTree(fresh)
    actions: list[Action] = []
    if includes:
        actions.append(Action("removed", "XInclude", count=len(includes)))
    if top or inner:
        actions.append(Action("removed", "xml-stylesheet", count=len(top) + len(inner)))
    return tree, actions


def _is_stylesheet(node: Any) -> bool:
    return isinstance(node, etree._ProcessingInstruction) and node.target == "xml-stylesheet"


def _drop(node: Any) -> None:
    """Remove an element or instruction, keeping the text that follows it."""
    parent = node.getparent()
    if node.tail:
        prev = node.getprevious()
        if prev is not None:
            prev.tail = (prev.tail or "") + node.tail
        else:
            parent.text = (parent.text or "") + node.tail
    parent.remove(node)


def sanitize(src: Path, dst: Path, ctx: Context) -> FormatResult:
    limit = ctx.policy.limits.structured_bytes
    if src.stat().st_size > limit:
        raise Reject("LIMIT_EXCEEDED", f"XML file larger than {limit} bytes")
    data = src.read_bytes()
    forbid_dtd(data)
    try:
        tree = etree.ElementTree(etree.fromstring(data, _parser()))
    except etree.XMLSyntaxError as exc:
        raise Reject("MALFORMED", f"the XML does not parse: {exc}") from None
    if tree.docinfo.internalDTD is not None or tree.docinfo.doctype:
        raise Reject("XML_DTD_FORBIDDEN", "the XML declares a DTD")
    tree, actions = _external(tree, ctx)
    _validate(tree, ctx)
    scan_strings(_texts(tree.getroot()), ctx, "XML text")
    canon: bytes = etree.tostring(tree, method="c14n", with_comments=True)
    ctx.scan(canon, "canonical XML")
    info = {"root": str(tree.getroot().tag), "encoding": tree.docinfo.encoding}
    if canon == data and not actions:
        return FormatResult("xml", cleaned=False, info=info)
    if canon != data:
        actions.append(Action("normalised", "canonical XML (C14N 1.0)"))
    dst.write_bytes(canon)
    return FormatResult("xml", cleaned=True, actions=actions, info=info)


def _validate(tree: Any, ctx: Context) -> None:
    if not ctx.policy.xml_schemas:
        return
    first = ""
    for path in ctx.policy.xml_schemas:
        schema = _schema(path)
        if schema.validate(tree):
            return
        error = schema.error_log.last_error
        first = first or (f"line {error.line}: {error.message}" if error else "invalid")
    raise Reject("SCHEMA_INVALID", f"the XML does not match its schema: {first}")

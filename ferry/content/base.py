"""The content-security vocabulary shared by the outside pipeline and the inside re-check.

The outside pipeline (``outside/content/``) turns an untrusted file into a :class:`Verdict`:
``deliver_as_is``, ``deliver_cleaned`` (with the :class:`Action` list) or ``reject`` with one
of :data:`REASONS`. Each format module implements :class:`Sanitizer`. The inside re-check
(``inside/recheck/``) verifies what arrives with different code and reads the same report.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

REASONS = (
    "TYPE_NOT_ALLOWED",
    "TYPE_MISMATCH",
    "POLYGLOT",
    "MALFORMED",
    "ENCRYPTED",
    "LIMIT_EXCEEDED",
    "ARCHIVE_BOMB",
    "ARCHIVE_TRAVERSAL",
    "ARCHIVE_DEPTH",
    "MALWARE_SIGNATURE",
    "FILENAME_POLICY",
    "XML_DTD_FORBIDDEN",
    "SCHEMA_INVALID",
    "ACTIVE_CONTENT_DISALLOWED",
    "FILTER_ERROR",
)
"""Every reason code a content rejection may carry (issue 4)."""

VerdictKind = Literal["deliver_as_is", "deliver_cleaned", "reject"]
FeatureMode = Literal["allow", "sanitize", "disallow"]
FEATURE_MODES: tuple[FeatureMode, ...] = ("allow", "sanitize", "disallow")

# The per-format feature switches a policy may set (default: sanitize).
FEATURES: Mapping[str, str] = {
    "javascript": "PDF JavaScript, OOXML/OFD scripts",
    "actions": "automatic and launch actions (PDF OpenAction/AA/Launch, OFD actions)",
    "embedded_files": "attachments and embedded files (PDF, OFD)",
    "forms": "PDF AcroForm and XFA forms",
    "annotations": "PDF annotations (links, file attachments, widgets)",
    "macros": "VBA macros (vbaProject)",
    "activex": "ActiveX controls",
    "ole_objects": "OLE embeddings",
    "external_links": "external relationships, templates, linked images, URIs, external locators",
    "hyperlinks": "hyperlinks in documents",
    "dde": "DDE/DDEAUTO fields",
    "metadata": "document and image metadata (Info, XMP, EXIF, docProps)",
    "multimedia": "OFD multimedia",
    "custom_data": "OFD custom data and extensions",
    "csv_formulas": "CSV cells that a spreadsheet would evaluate",
    "control_chars": "C0/C1 control characters in text",
}


class Reject(Exception):
    """A format module refuses the file: ``code`` is one of :data:`REASONS`."""

    def __init__(self, code: str, message: str, **detail: Any) -> None:
        if code not in REASONS:
            raise ValueError(f"unknown reason code {code!r}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.detail = detail


@dataclass(frozen=True)
class Action:
    """One thing the sanitizer did, e.g. ``Action("removed", "/OpenAction", count=1)``."""

    what: str  # removed | replaced | converted | normalised | neutralised | renamed
    target: str  # the feature or object, e.g. "/JavaScript", "word/vbaProject.bin", "EXIF"
    where: str = ""  # member or part path inside a container, page number, cell
    count: int = 1

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"what": self.what, "target": self.target, "count": self.count}
        if self.where:
            out["where"] = self.where
        return out


@dataclass(frozen=True)
class Limits:
    """Per-channel content limits (defaults from docs/CONTENT.md)."""

    max_bytes: int = 100 * 1024 * 1024
    max_pages: int = 10_000
    max_pixels: int = 40_000_000
    max_side: int = 10_000
    archive_depth: int = 2
    archive_entries: int = 1_000
    archive_ratio: int = 100
    archive_expanded: int = 100 * 1024 * 1024
    json_depth: int = 32
    seconds: float = 60.0  # wall time per file
    cpu_seconds: int = 60
    memory_mb: int = 450  # address-space rlimit of a worker process
    structured_bytes: int = 16 * 1024 * 1024  # largest JSON or XML file parsed into memory


@dataclass(frozen=True)
class Policy:
    """A channel's content policy: allowed type names, feature switches, limits."""

    allowed_types: frozenset[str]
    features: Mapping[str, FeatureMode] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    schemas: tuple[str, ...] = ()  # JSON Schema ids allowed for JSON files (empty: any JSON)
    xml_schemas: tuple[str, ...] = ()  # XSD files an XML file must satisfy (one of; empty: any)

    def feature(self, name: str) -> FeatureMode:
        if name not in FEATURES:
            raise KeyError(f"unknown content feature {name!r}")
        return self.features.get(name, "sanitize")


@dataclass
class FormatResult:
    """What a sanitizer produced. ``cleaned`` False means ``dst`` was not written and the
    input is delivered byte for byte."""

    type_name: str  # canonical type of the output, e.g. "png" for a GIF converted to PNG
    cleaned: bool
    actions: list[Action] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # pages, pixels, members, encoding…


class Context(Protocol):
    """What the pipeline gives a sanitizer."""

    policy: Policy
    depth: int  # 0 for the dropped file, 1 for a member of an archive, …
    where: str  # the member path inside the outer container ("" at depth 0)

    def scan(self, data: bytes, where: str) -> None:
        """Scan one decoded object (YARA). Raises Reject("MALWARE_SIGNATURE")."""

    def member(self, name: str, data: bytes) -> tuple[bytes, dict[str, Any]]:
        """Run a container member through the whole pipeline (one level deeper); returns the
        delivered bytes and the member's report. Raises Reject for the whole container."""

    def feature(self, name: str, present: int, where: str = "") -> bool:
        """Apply the policy switch to ``present`` occurrences of feature ``name``: returns
        True when they must be removed (sanitize), False when kept (allow), raises
        Reject("ACTIVE_CONTENT_DISALLOWED") for disallow. Does nothing for 0 occurrences."""


class Sanitizer(Protocol):
    """A format module: ``sanitize(src, dst, ctx)`` reads ``src``, writes a clean ``dst`` or
    leaves it unwritten (as-is), or raises :class:`Reject`. It never touches the network."""

    def __call__(self, src: Path, dst: Path, ctx: Context) -> FormatResult: ...


@dataclass(frozen=True)
class Verdict:
    """The pipeline's decision about one file (or message)."""

    kind: VerdictKind
    type_name: str | None  # detected (and delivered) type, None if unidentified
    name: str  # the name the gateway delivers under (chosen by the gateway)
    reason: str | None = None  # a REASONS code when kind == "reject"
    message: str = ""
    actions: tuple[Action, ...] = ()
    report: Mapping[str, Any] = field(default_factory=dict)  # the per-object JSON report
    output: Path | None = None  # the cleaned file when kind == "deliver_cleaned"

    def __post_init__(self) -> None:
        if (self.kind == "reject") != (self.reason is not None):
            raise ValueError("a reject verdict needs a reason, and only a reject")
        if self.reason is not None and self.reason not in REASONS:
            raise ValueError(f"unknown reason code {self.reason!r}")

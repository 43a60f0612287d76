"""The inside re-check: independent verification of what crossed the diode.

The outside sanitizers use pikepdf/qpdf, Pillow and lxml. This package re-reads the delivered
bytes with different code: a byte-level PDF lexer (pdfid-style), a PNG chunk walker and a JPEG
marker walker (stdlib only), zipfile + defusedxml (expat) allow-list checks for OOXML and OFD,
and strict stdlib checks for text, CSV, JSON, XML and ZIP. It never repairs anything: any
finding, and any exception inside a checker, is a problem (fail closed), and the agent
quarantines the item and raises a high-severity event.

``report`` is the outside's per-object report. Only ``report["features"]`` is read: a mapping
of feature switch → mode (``allow``/``sanitize``/``disallow``) as applied by the outside, so a
channel that allows e.g. hyperlinks is not flagged for them. Missing means ``sanitize``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inside.recheck.findings import Findings

Scan = Callable[[bytes, str], None]

# A delivered object is read whole; anything larger than this is not something the outside
# would produce under the default limits (100 MiB per file).
MAX_RECHECK_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class RecheckResult:
    """``ok`` is True only when every check ran and none found a problem."""

    ok: bool
    checks: tuple[str, ...]
    problems: tuple[str, ...]


# type name → "module:function" under inside.recheck; one module per family.
CHECKERS: Mapping[str, str] = {
    "pdf": "pdf:check",
    "png": "raster:check_png",
    "jpeg": "raster:check_jpeg",
    "jpg": "raster:check_jpeg",
    # GIF, BMP and TIFF are delivered converted to PNG.
    "gif": "raster:check_png",
    "bmp": "raster:check_png",
    "tiff": "raster:check_png",
    "docx": "office:check",
    "xlsx": "office:check",
    "pptx": "office:check",
    # Macro-enabled inputs are delivered remapped to the macro-free type.
    "docm": "office:check",
    "xlsm": "office:check",
    "pptm": "office:check",
    "ofd": "ofd:check",
    "txt": "text:check_text",
    "text": "text:check_text",
    "csv": "text:check_csv",
    "json": "text:check_json",
    "xml": "text:check_xml",
    "zip": "container:check_zip",
}


def _checker(type_name: str) -> Callable[[bytes, Findings], None] | None:
    target = CHECKERS.get(type_name.lower())
    if target is None:
        return None
    module, func = target.split(":")
    fn: Callable[[bytes, Findings], None] = getattr(
        importlib.import_module(f"inside.recheck.{module}"), func
    )
    return fn


def recheck_bytes(
    data: bytes,
    type_name: str,
    report: Mapping[str, Any] | None = None,
    *,
    scan: Scan | None = None,
    depth: int = 0,
) -> RecheckResult:
    """Re-check ``data`` as ``type_name``; see :func:`recheck`."""
    features = report.get("features") if report else None
    found = Findings(features if isinstance(features, Mapping) else {}, scan, depth)
    try:
        checker = _checker(type_name)
        if checker is None:
            found.problem(f"no independent check for type {type_name!r}")
        else:
            if scan is not None:
                found.check("yara")
                scan(data, "")
            checker(data, found)
    except Exception as exc:  # noqa: BLE001 - fail closed: any checker failure is a finding
        found.problem(f"{type_name} check failed: {type(exc).__name__}: {exc}")
    return RecheckResult(not found.problems, tuple(found.checks), tuple(found.problems))


def recheck(
    path: Path,
    type_name: str,
    report: Mapping[str, Any] | None,
    *,
    scan: Scan | None = None,
    size: int | None = None,
) -> RecheckResult:
    """Independently verify the delivered file at ``path`` of (delivered) type ``type_name``
    (``size``: only its first ``size`` bytes, the content of a spooled object).

    ``scan(data, where)`` is YARA (raising on a match); it is applied to the file and to every
    decoded object the checker sees (ZIP members, OOXML/OFD parts, PDF streams).
    """
    try:
        if size is None:
            size = path.stat().st_size
        if size > MAX_RECHECK_BYTES:
            return RecheckResult(False, (), (f"file larger than {MAX_RECHECK_BYTES} bytes",))
        with open(path, "rb") as f:
            data = f.read(size)
        if len(data) != size:
            return RecheckResult(False, (), ("the file is shorter than its content",))
    except OSError as exc:
        return RecheckResult(False, (), (f"cannot read delivered file: {exc}",))
    return recheck_bytes(data, type_name, report, scan=scan)


__all__ = ["RecheckResult", "recheck", "recheck_bytes"]

"""The per-format sanitizers: type name -> ``"module:function"``, imported on first use.

A type whose module is missing or fails to import cannot be checked: the file is rejected
with FILTER_ERROR (fail closed), never delivered unchecked.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from ferry.content.base import Reject, Sanitizer

SANITIZERS: Mapping[str, str] = {
    "txt": "outside.content.formats.text:sanitize",
    "csv": "outside.content.formats.csvfile:sanitize",
    "json": "outside.content.formats.jsonfile:sanitize",
    "xml": "outside.content.formats.xmlfile:sanitize",
    "zip": "outside.content.formats.ziparchive:sanitize",
    "pdf": "outside.content.formats.pdf:sanitize",
    **dict.fromkeys(
        ("png", "jpeg", "gif", "bmp", "tiff"), "outside.content.formats.image:sanitize"
    ),
    **dict.fromkeys(
        ("docx", "xlsx", "pptx", "docm", "xlsm", "pptm"), "outside.content.formats.ooxml:sanitize"
    ),
    "ofd": "outside.content.formats.ofd:sanitize",
}

_loaded: dict[str, Sanitizer] = {}


def load(type_name: str, overrides: Mapping[str, str] | None = None) -> Sanitizer:
    """The sanitizer of ``type_name``; Reject("FILTER_ERROR") if there is none."""
    spec = (overrides or {}).get(type_name) or SANITIZERS.get(type_name)
    if spec is None:
        raise Reject("FILTER_ERROR", f"no filter for {type_name} files")
    if spec in _loaded:
        return _loaded[spec]
    module_name, _, function = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        sanitizer: Sanitizer = getattr(module, function)
    except (ImportError, AttributeError) as exc:
        raise Reject(
            "FILTER_ERROR", f"the {type_name} filter is not available ({type(exc).__name__})"
        ) from None
    _loaded[spec] = sanitizer
    return sanitizer

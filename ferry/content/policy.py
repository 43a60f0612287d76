"""A channel's content policy from configuration (the ``content:`` key of a files channel).

::

    content:
      types: [pdf, docx, xlsx, png, jpeg, txt, csv]   # required; anything else is refused
      features: {macros: disallow, metadata: allow}    # default for every feature: sanitize
      limits: {max_bytes: 20M, max_pages: 500, archive_depth: 1, seconds: 30}
      schemas: [citizen-application]                  # JSON files must match one (optional)
      xml_schemas: [schemas/invoice.xsd]               # XML files must match one (optional)

:func:`policy_from_config` turns that mapping into a :class:`~ferry.content.base.Policy`;
:func:`policy_to_json` is its inverse (the worker processes receive policies this way).
Sizes take k/M/G suffixes (powers of 1024). Errors are :class:`~ferry.errors.ConfigError`
naming the key.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from ferry.content.base import FEATURE_MODES, FEATURES, Limits, Policy
from ferry.errors import ConfigError

# Every type the content pipeline can deliver (docm/xlsm/pptm are delivered macro-free as
# docx/xlsx/pptx; gif/bmp/tiff as png).
SUPPORTED_TYPES: tuple[str, ...] = (
    "pdf", "png", "jpeg", "gif", "bmp", "tiff", "docx", "xlsx", "pptx", "docm", "xlsm", "pptm",
    "ofd", "zip", "txt", "csv", "json", "xml",
)  # fmt: skip
TYPE_ALIASES = {"jpg": "jpeg", "tif": "tiff", "text": "txt"}

_SIZE = re.compile(r"([0-9]{1,20}(?:\.[0-9]{1,20})?)([kKMGT]?)")
_SIZE_UNITS = {"": 1, "k": 1024, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE_LIMITS = frozenset({"max_bytes", "archive_expanded", "structured_bytes"})
_FLOAT_LIMITS = frozenset({"seconds"})
# Bounds that keep a worker meaningful: (lowest, highest).
_BOUNDS: dict[str, tuple[float, float]] = {
    "max_bytes": (1, 64 * 1024**3),
    "max_pages": (1, 1_000_000),
    "max_pixels": (1, 1_000_000_000),
    "max_side": (1, 1_000_000),
    "archive_depth": (0, 8),
    "archive_entries": (1, 100_000),
    "archive_ratio": (1, 100_000),
    "archive_expanded": (1, 64 * 1024**3),
    "json_depth": (1, 256),
    "seconds": (0.1, 3600),
    "cpu_seconds": (1, 3600),
    "memory_mb": (128, 65_536),
    "structured_bytes": (1, 1024**3),
}


def _size(where: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.fullmatch(str(value))
    if match is None:
        raise ConfigError(f"{where}: cannot read {value!r} as a size (e.g. 100M)")
    return int(float(match[1]) * _SIZE_UNITS[match[2]])


def _limits(raw: Mapping[str, Any], where: str) -> Limits:
    known = {f.name for f in dataclasses.fields(Limits)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        at = f"{where}.{key}"
        if key not in known:
            raise ConfigError(f"{at}: unknown limit (valid: {', '.join(sorted(known))})")
        if key in _SIZE_LIMITS:
            number: float = _size(at, value)
        elif key in _FLOAT_LIMITS and isinstance(value, int | float) and value is not True:
            number = float(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            raise ConfigError(f"{at}: expected a number, got {value!r}")
        low, high = _BOUNDS[key]
        if not low <= number <= high:
            raise ConfigError(f"{at}: expected {low:g}..{high:g}, got {value!r}")
        values[key] = number
    return Limits(**values)


def policy_from_config(raw: Mapping[str, Any], where: str = "content") -> Policy:
    """A Policy from a ``content:`` mapping (already schema-checked, but checked again here so
    the function stands on its own)."""
    unknown = set(raw) - {"types", "features", "limits", "schemas", "xml_schemas"}
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
            "(valid: types, features, limits, schemas, xml_schemas)"
        )
    if "types" not in raw or not isinstance(raw["types"], list | tuple):
        raise ConfigError(f"{where}.types: a list of accepted types is required")
    types: set[str] = set()
    for t in raw["types"]:
        name = TYPE_ALIASES.get(str(t), str(t))
        if name not in SUPPORTED_TYPES:
            raise ConfigError(
                f"{where}.types: {t!r} is not a type ferry can check "
                f"(supported: {', '.join(SUPPORTED_TYPES)})"
            )
        types.add(name)
    features: dict[str, Any] = {}
    for key, mode in dict(raw.get("features") or {}).items():
        if key not in FEATURES:
            raise ConfigError(
                f"{where}.features.{key}: unknown feature (valid: {', '.join(FEATURES)})"
            )
        if mode not in FEATURE_MODES:
            raise ConfigError(
                f"{where}.features.{key}: expected allow, sanitize or disallow, got {mode!r}"
            )
        features[key] = mode
    return Policy(
        allowed_types=frozenset(types),
        features=features,
        limits=_limits(dict(raw.get("limits") or {}), f"{where}.limits"),
        schemas=tuple(str(s) for s in raw.get("schemas") or ()),
        xml_schemas=tuple(str(s) for s in raw.get("xml_schemas") or ()),
    )


def policy_to_json(policy: Policy) -> dict[str, Any]:
    """The JSON form read back by :func:`policy_from_config` (exact round trip)."""
    return {
        "types": sorted(policy.allowed_types),
        "features": dict(sorted(policy.features.items())),
        "limits": dataclasses.asdict(policy.limits),
        "schemas": list(policy.schemas),
        "xml_schemas": list(policy.xml_schemas),
    }


def default_policy(types: tuple[str, ...] = SUPPORTED_TYPES) -> Policy:
    """Every supported type, every feature sanitized, default limits."""
    return Policy(allowed_types=frozenset(types))

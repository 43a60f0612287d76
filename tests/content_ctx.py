"""A small in-process :class:`ferry.content.base.Context` for testing format modules directly.

``scan`` runs an optional YARA rule set (or records what it was given); ``feature`` applies the
policy switch exactly as the contract in ``ferry/content/base.py`` describes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yara  # type: ignore[import-not-found]

from ferry.content.base import FEATURES, Limits, Policy, Reject

# EICAR written in hex so this file is not itself a signature hit.
EICAR_RULE = """
rule eicar_test {
  strings:
    $e = { 58 35 4F 21 50 25 40 41 50 5B 34 5C 50 5A 58 35
           34 28 50 5E 29 37 43 43 29 37 7D 24 45 49 43 41 52 }
  condition: $e
}
"""


@dataclass
class TestContext:
    policy: Policy = field(default_factory=lambda: Policy(allowed_types=frozenset()))
    depth: int = 0
    where: str = ""
    yara: bool = False
    scanned: list[str] = field(default_factory=list)
    decisions: list[tuple[str, int, str]] = field(default_factory=list)
    _rules: Any = None

    __test__ = False  # not a pytest class

    def scan(self, data: bytes, where: str) -> None:
        self.scanned.append(where)
        if not self.yara:
            return
        if self._rules is None:
            self._rules = yara.compile(source=EICAR_RULE)
        if self._rules.match(data=data):
            raise Reject("MALWARE_SIGNATURE", f"signature match in {where or 'file'}")

    def member(self, name: str, data: bytes) -> tuple[bytes, dict[str, Any]]:
        raise NotImplementedError("format modules under test do not recurse")

    def feature(self, name: str, present: int, where: str = "") -> bool:
        mode = self.policy.feature(name)
        if present <= 0:
            return False
        self.decisions.append((name, present, where))
        if mode == "disallow":
            raise Reject("ACTIVE_CONTENT_DISALLOWED", f"{name} present ({present}) {where}".strip())
        return mode == "sanitize"


def ctx(
    features: dict[str, str] | None = None,
    *,
    limits: Limits | None = None,
    yara: bool = False,
    types: Iterable[str] = (),
) -> TestContext:
    feats: dict[str, Any] = dict(features or {})
    for k in feats:
        assert k in FEATURES, k
    policy = Policy(allowed_types=frozenset(types), features=feats, limits=limits or Limits())
    return TestContext(policy=policy, yara=yara)


def run(
    sanitize: Any,
    data: bytes,
    tmp_path: Any,
    name: str = "in.bin",
    context: TestContext | None = None,
) -> tuple[Any, bytes]:
    """Write ``data``, run ``sanitize``; return (FormatResult, delivered bytes)."""
    src = tmp_path / name
    dst = tmp_path / ("out-" + name)
    src.write_bytes(data)
    result = sanitize(src, dst, context or ctx())
    return result, (dst.read_bytes() if result.cleaned else data)

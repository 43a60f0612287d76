"""What a checker accumulates: the checks it ran, the problems it found."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass
class Findings:
    features: Mapping[str, object]
    scan_fn: Callable[[bytes, str], None] | None = None
    depth: int = 0
    checks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def check(self, name: str) -> None:
        if name not in self.checks:
            self.checks.append(name)

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def allowed(self, feature: str) -> bool:
        """True when the outside's policy kept ``feature`` (mode ``allow``)."""
        return self.features.get(feature) == "allow"

    def scan(self, data: bytes, where: str) -> None:
        if self.scan_fn is not None:
            self.scan_fn(data, where)

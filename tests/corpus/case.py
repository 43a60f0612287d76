"""One corpus case: a file, what the gateway must do with it, and an independent check.

Generator modules (``tests/corpus/gen_*.py``) expose ``cases(seed: int) -> list[Case]``.
Names and payload positions are randomised from the seed so results cannot be keyed on
hashes. ``expect`` is ``"deliver"`` (benign: delivered, as-is or cleaned, content preserved),
``"clean"`` (hostile: delivered only cleaned, and ``check`` confirms the output is clean) or
``"reject:<CODE>"`` (hostile: rejected with that reason code). ``check(original, delivered)``
raises AssertionError when the delivered bytes are wrong (content lost, or hostile bits left).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Case:
    name: str  # the file name as a clerk would drop it
    data: bytes
    expect: str  # "deliver" | "clean" | "reject:<CODE>"
    check: Callable[[bytes, bytes], None] | None = None
    klass: str = ""  # the attack or control class, e.g. "pdf.openaction", "csv.benign"
    # A ``content:`` policy mapping for this case (ferry.content.policy.policy_from_config);
    # None: the documents channel written by ``ferry init`` (every supported type).
    policy: Mapping[str, Any] | None = None

    @property
    def hostile(self) -> bool:
        return self.expect != "deliver"

    @property
    def reason(self) -> str | None:
        return self.expect.split(":", 1)[1] if self.expect.startswith("reject:") else None

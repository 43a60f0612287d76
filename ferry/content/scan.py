"""YARA signatures for every decoded object (yara-python).

Rules are the ``*.yar`` / ``*.yara`` files of one folder (default: the packaged
``ferry/content/rules/``), compiled once per process; each file is its own namespace. The
rules digest (SHA-256 over the sorted file names and contents) goes into every report so an
auditor can tell which signatures a verdict was made with.

:func:`eicar` builds the EICAR test string from hex at run time, so no ferry file holds it.
:meth:`Scanner.self_test` must see it matched, else :class:`~ferry.errors.SelfTestError`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yara

from ferry.errors import ConfigError, SelfTestError

PACKAGED_RULES = Path(__file__).resolve().parent / "rules"
# YARA's own limit per scan, in seconds; the worker's wall clock bounds the whole file anyway.
SCAN_TIMEOUT = 60
# At most this many rule files (a rules folder is curated, not a dump).
MAX_RULE_FILES = 1000

_EICAR_HEX = (
    "58354f2150254041505b345c505a58353428505e2937434329377d2445494341522d5354414e4441"
    "52442d414e544956495255532d544553542d46494c452124482b482a"
)


def eicar() -> bytes:
    """The 68-byte EICAR anti-virus test string."""
    return bytes.fromhex(_EICAR_HEX)


@dataclass(frozen=True)
class Match:
    rule: str
    namespace: str

    def to_json(self) -> dict[str, str]:
        return {"rule": self.rule, "namespace": self.namespace}


class Scanner:
    """Compiled rules of one folder."""

    def __init__(self, rules_dir: Path | None = None) -> None:
        folder = PACKAGED_RULES if rules_dir is None else Path(rules_dir)
        files = (
            sorted(p for p in folder.iterdir() if p.suffix in (".yar", ".yara") and p.is_file())
            if folder.is_dir()
            else []
        )
        if not files:
            raise ConfigError(f"{folder}: no YARA rule files (*.yar, *.yara)")
        if len(files) > MAX_RULE_FILES:
            raise ConfigError(f"{folder}: more than {MAX_RULE_FILES} rule files")
        digest = hashlib.sha256()
        sources: dict[str, str] = {}
        for path in files:
            text = path.read_bytes()
            digest.update(path.name.encode() + b"\0" + hashlib.sha256(text).digest())
            namespace = path.stem
            if namespace in sources:
                raise ConfigError(f"{path}: two rule files named {namespace!r}")
            sources[namespace] = text.decode("utf-8")
        try:
            self._rules = yara.compile(sources=sources)
        except yara.Error as exc:
            raise ConfigError(f"{folder}: YARA rules do not compile: {exc}") from None
        self.folder = folder
        self.digest = "sha256:" + digest.hexdigest()
        self.files = tuple(p.name for p in files)

    def scan(self, data: bytes) -> list[Match]:
        """Every rule matching ``data``; a YARA error is raised (the caller fails closed)."""
        found = self._rules.match(data=data, timeout=SCAN_TIMEOUT)
        return [Match(m.rule, m.namespace) for m in found]

    def scan_file(self, path: Path) -> list[Match]:
        found = self._rules.match(filepath=str(path), timeout=SCAN_TIMEOUT)
        return [Match(m.rule, m.namespace) for m in found]

    def self_test(self) -> None:
        """Refuse to run unless the EICAR string is detected (raw, and not in clean bytes)."""
        try:
            hit = self.scan(eicar() + b"\r\n")
            clean = self.scan(b"ferry scanner self-test: nothing to find here\n")
        except yara.Error as exc:
            raise SelfTestError(f"YARA scanner self-test failed: {exc}") from None
        if not hit:
            raise SelfTestError(
                f"YARA scanner self-test failed: the rules in {self.folder} do not detect EICAR"
            )
        if clean:
            raise SelfTestError("YARA scanner self-test failed: rules match harmless text")

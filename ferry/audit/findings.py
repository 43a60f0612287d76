"""What :func:`ferry.audit.verify.verify` finds: :class:`Problem` and :class:`VerifyReport`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One finding: a stable code, a message, and where it is."""

    code: str
    message: str
    file: str | None = None
    line: int | None = None
    idx: int | None = None
    offset: int | None = None

    def location(self) -> str:
        parts = [self.file or ""]
        if self.line is not None:
            parts.append(f"line {self.line}")
        extra = []
        if self.idx is not None:
            extra.append(f"record {self.idx}")
        if self.offset is not None:
            extra.append(f"byte {self.offset}")
        text = " ".join(p for p in parts if p)
        if extra:
            text += f" ({', '.join(extra)})" if text else ", ".join(extra)
        return text

    def to_json(self) -> dict[str, object]:
        return {
            "code": self.code,
            "message": self.message,
            "file": self.file,
            "line": self.line,
            "idx": self.idx,
            "offset": self.offset,
        }


@dataclass
class VerifyReport:
    """The outcome of :func:`verify`."""

    path: str
    authenticated: bool = False  # signatures checked against a key given by the caller
    key_id: str | None = None
    # Every key checkpoints were checked with: {"key_id", "trusted": "given", "named by the
    # log" or "handed over at record N"} (an earlier audit key named by a later start).
    keys: list[dict[str, str]] = field(default_factory=list)
    origin: str | None = None
    segments: int = 0
    first_idx: int = 0  # 0 unless a single segment was verified
    records: int = 0  # records read and found valid
    tree_size: int = 0
    root: str = ""
    checkpoints: int = 0  # notes in checkpoints.log
    checkpoints_verified: int = 0  # signed by the key and matching the records
    last_checkpoint: int | None = None  # size of the last verified checkpoint
    # The largest checkpoint size in checkpoints.log when verify first read it: the records
    # before it were handed to ``on_record`` as covered (a live writer's checkpoints stored
    # later count in last_checkpoint, but their records were read as not covered yet)
    covered_when_read: int = 0
    # The root (hex) of the records' tree at each size the caller asked for (``want_roots``)
    # that the records verified reach: reconcile compares them with the checkpoints the
    # inside witnessed of the outside's log.
    roots_at: dict[int, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    # Records a run signed when it started, written by an earlier run that stopped without
    # signing them (a crash), or by someone who could write the stopped log's disk: each
    # {"from", "to" (exclusive), "at" (the audit.started that adopted them)}; at most
    # MAX_HANDOVERS of them, ``adopted_records`` counts them all.
    adopted: list[dict[str, int]] = field(default_factory=list)
    adopted_records: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """No problem found (the log may still be unauthenticated: see :attr:`verified`)."""
        return not self.problems

    @property
    def signed(self) -> bool:
        """A checkpoint signed by a trusted key covers the records (or there are none). A log
        without one could have been written by anyone: the hash chain alone proves nothing."""
        return self.tree_size <= self.first_idx or self.checkpoints_verified > 0

    @property
    def verified(self) -> bool:
        """No problem found, and checkpoints signed by the key the caller gave cover the
        records."""
        return self.ok and self.authenticated and self.signed

    @property
    def first(self) -> Problem | None:
        """The first bad position found, or None."""
        return self.problems[0] if self.problems else None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "verified": self.verified,
            "ok": self.ok,
            "authenticated": self.authenticated,
            "key_id": self.key_id,
            "keys": self.keys,
            "origin": self.origin,
            "segments": self.segments,
            "first_idx": self.first_idx,
            "records": self.records,
            "tree_size": self.tree_size,
            "root": self.root,
            "checkpoints": self.checkpoints,
            "checkpoints_verified": self.checkpoints_verified,
            "last_checkpoint": self.last_checkpoint,
            "first_problem": self.first.to_json() if self.first else None,
            "problems": [p.to_json() for p in self.problems],
            "warnings": [w.to_json() for w in self.warnings],
            "adopted": self.adopted,
            "adopted_records": self.adopted_records,
            "seconds": round(self.seconds, 3),
        }

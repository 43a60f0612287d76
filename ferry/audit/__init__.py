"""The tamper-evident audit log (RFC 6962 Merkle tree, signed C2SP checkpoints).

* :mod:`ferry.audit.record` -- records: build, encode, validate (pure);
* :mod:`ferry.audit.merkle` -- the tree, proofs and checkpoint notes (pure);
* :mod:`ferry.audit.log` -- :class:`AuditLog`, the writer (one thread, group commit);
* :mod:`ferry.audit.verify` -- :func:`verify` for auditors;
* :mod:`ferry.audit.files` -- the log's files opened safely, checkpoints.log read in passes;
* :mod:`ferry.audit.cli` -- ``ferry audit verify``.

docs/AUDIT.md describes the format and the checks.
"""

from __future__ import annotations

from ferry.audit.findings import Problem, VerifyReport
from ferry.audit.log import AuditLog, AuditSettings, FileOps
from ferry.audit.record import (
    AuditError,
    AuditObject,
    AuditRecordInvalid,
    AuditTimeout,
    AuditUnavailable,
    Result,
    Subject,
)
from ferry.audit.verify import verify

__all__ = [
    "AuditError",
    "AuditLog",
    "AuditObject",
    "AuditRecordInvalid",
    "AuditSettings",
    "AuditTimeout",
    "AuditUnavailable",
    "FileOps",
    "Problem",
    "Result",
    "Subject",
    "VerifyReport",
    "verify",
]

"""``ferry audit verify PATH [--key PUBKEY_OR_FILE] [--json]``.

Exit codes: 0 the log verified (no problem, and every checkpoint signed by the
key given with ``--key``); 1 a problem was found, or no ``--key`` was given (an
unauthenticated log is never reported as verified); 2 usage (no such path, an
unreadable or malformed key).

``ferry.cli`` registers the parser with :func:`add_parser`; tests call
:func:`run` with the arguments that follow ``ferry audit``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ferry.audit.verify import Problem, VerifyReport, verify
from ferry.crypto.keys import load_public_key
from ferry.errors import FerryError

EXIT_VERIFIED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``audit verify`` on the ``ferry`` sub-command parser."""
    audit = subparsers.add_parser("audit", help="verify the tamper-evident audit log")
    sub = audit.add_subparsers(dest="audit_command", required=True)
    v = sub.add_parser(
        "verify",
        help="check every record, the Merkle tree and every signed checkpoint",
        description="Verify an audit log: records, hash chain, Merkle tree, checkpoint "
        "signatures. Exit 0 verified, 1 a problem was found (or no --key), 2 usage.",
    )
    v.add_argument("path", help="an audit log directory, or one audit-NNNNNN.jsonl segment")
    v.add_argument(
        "--key",
        metavar="PUBKEY_OR_FILE",
        help="the audit public key (ferry-pk:ed25519:...) or a file holding it",
    )
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        key = load_public_key(args.key) if args.key else None
        report = verify(args.path, key)
    except FerryError as exc:
        print(f"ferry audit verify: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"ferry audit verify: error: {args.path}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(render(report))
    return EXIT_VERIFIED if report.verified else EXIT_FAILED


def _line(p: Problem) -> str:
    where = p.location()
    return f"{p.code} at {where}: {p.message}" if where else f"{p.code}: {p.message}"


def render(report: VerifyReport) -> str:
    """The human-readable report."""
    span = (
        f"records {report.first_idx}..{report.tree_size - 1}"
        if report.tree_size > report.first_idx
        else "no records"
    )
    out: list[str] = []
    if report.verified:
        out.append(f"VERIFIED  {report.path}")
    elif report.ok:
        out.append(f"NOT AUTHENTICATED  {report.path}: no problem found, but without --key")
        out.append("  nothing shows the checkpoints were signed by the real audit key")
    else:
        out.append(f"FAILED  {report.path}")
        first = report.problems[0]
        out.append(f"  first problem: {_line(first)}")
        for p in report.problems[1:]:
            out.append(f"  also: {_line(p)}")
    out.append(
        f"  {span} in {report.segments} segment(s); {report.records} records checked; "
        f"tree root {report.root}"
    )
    last = (
        f", the last covering {report.last_checkpoint} records"
        if report.last_checkpoint is not None
        else ""
    )
    out.append(
        f"  {report.checkpoints_verified} of {report.checkpoints} checkpoints verified{last}"
        + (f"; audit key {report.key_id}" if report.key_id else "")
        + (f"; log {report.origin}" if report.origin else "")
    )
    out.extend(f"  warning: {_line(w)}" for w in report.warnings)
    out.append(f"  ({report.seconds:.2f} s)")
    return "\n".join(out)


def run(argv: Sequence[str]) -> int:
    """Run ``ferry audit ARGV...`` (e.g. ``["verify", "DIR", "--key", "k.pub"]``)."""
    parser = argparse.ArgumentParser(prog="ferry")
    add_parser(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(["audit", *argv])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    rc: int = args.func(args)
    return rc

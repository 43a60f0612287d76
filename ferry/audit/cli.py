"""``ferry audit verify | replay | reconcile | report | export`` (docs/AUDIT.md §5, §9-§12).

Each command finds the logs from ``-c CONFIG`` (an agent config: the outside's
names its own log; the inside's names its own log and its mirror of the
outside's) or from explicit ``--outside DIR`` / ``--inside DIR`` with
``--outside-key`` / ``--inside-key``. Explicit paths override the config.

Exit codes:

* verify: 0 every log verified; 1 a problem was found, or no key (an
  unauthenticated log is never reported as verified); 2 usage.
* replay: 0; 2 usage.
* reconcile: 0 every accepted item is accounted for; 10 an item is missing past
  the grace period; 11 nothing missing but a discrepancy; 12 a log failed
  verification (nothing reconciled); 2 usage.
* report: 0 written; 12 a log failed verification; 2 usage.
* export: 0 drained (``--once``) or stopped; 1 the SIEM stayed unreachable until
  ``--timeout`` or the cursor does not fit the log; 2 usage.

``ferry.cli`` registers the parser with :func:`add_parser`; tests call
:func:`run` with the arguments that follow ``ferry audit``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ferry.audit import report as report_mod
from ferry.audit.findings import Problem, VerifyReport
from ferry.audit.locate import Locations, LogLocation, resolve
from ferry.audit.reconcile import DEFAULT_GRACE, Reconciliation, reconcile_logs, stream_json
from ferry.audit.reconcile import render_text as render_reconcile
from ferry.audit.siem import CursorMismatch, Destination, Exporter, ExportOptions
from ferry.audit.timeline import ReplayFilter, parse_when, replay, ts_us
from ferry.audit.timeline import render_text as render_replay
from ferry.audit.verify import verify
from ferry.crypto.keys import load_public_key
from ferry.errors import FerryError, UsageError

EXIT_OK = 0
EXIT_VERIFIED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_MISSING = 10
EXIT_DISCREPANCY = 11
EXIT_UNVERIFIED = 12
MAX_GRACE = 30 * 86400.0  # (--grace: at most the longest retention, in seconds)


def _log_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("which logs")
    g.add_argument("-c", "--config", help="an agent config (outside.yaml or inside.yaml)")
    g.add_argument("--outside", metavar="DIR", help="the outside log, or the inside's mirror of it")
    g.add_argument("--inside", metavar="DIR", help="the inside log")
    g.add_argument("--outside-key", metavar="PUBKEY_OR_FILE", help="the outside audit public key")
    g.add_argument("--inside-key", metavar="PUBKEY_OR_FILE", help="the inside audit public key")
    g.add_argument(
        "--outside-origin", metavar="ORIGIN", help="the outside log's name (its checkpoints')"
    )
    g.add_argument(
        "--inside-origin", metavar="ORIGIN", help="the inside log's name (its checkpoints')"
    )


def _accounting_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help=f"an item open longer than this is missing (default {DEFAULT_GRACE:g})",
    )
    p.add_argument("--now", metavar="UTC", help="account as at this time (default: now)")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="do not verify the logs first (they are verified when their key is known)",
    )
    p.add_argument(
        "--include-unsigned",
        action="store_true",
        help="count the records after each log's last signed checkpoint too (a running "
        "agent's last minute or so; whoever can write its disk could have changed them)",
    )


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``audit verify|replay|reconcile|report|export`` on the ``ferry`` parser."""
    audit = subparsers.add_parser(
        "audit", help="verify, replay, reconcile, report on and export the audit logs"
    )
    sub = audit.add_subparsers(dest="audit_command", required=True)

    v = sub.add_parser(
        "verify",
        help="check every record, the Merkle tree and every signed checkpoint",
        description="Verify an audit log: records, hash chain, Merkle tree, checkpoint "
        "signatures. Exit 0 verified, 1 a problem was found (or no --key), 2 usage.",
    )
    v.add_argument(
        "path", nargs="?", help="an audit log directory, or one audit-NNNNNN.jsonl segment"
    )
    v.add_argument(
        "--key",
        metavar="PUBKEY_OR_FILE",
        help="the audit public key (ferry-pk:ed25519:...) or a file holding it",
    )
    v.add_argument(
        "-c", "--config", help="verify every log this agent config names, each with its key"
    )
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=cmd_verify)

    r = sub.add_parser(
        "replay",
        help="the timeline of items across both sides",
        description="Print each item's records from both logs in time order: intake, "
        "verdict, sends, receipt, re-check, delivery or rejection.",
    )
    _log_args(r)
    r.add_argument("--item", action="append", default=[], help="an item id or id prefix")
    r.add_argument("--channel", action="append", default=[], help="a channel name")
    r.add_argument("--subject", action="append", default=[], help="a subject id, name or KIND:ID")
    r.add_argument("--since", metavar="UTC", help="items with a record at or after this time")
    r.add_argument("--until", metavar="UTC", help="items with a record before this time")
    r.add_argument(
        "--system", action="store_true", help="also list records about no item (agent, link)"
    )
    r.add_argument("--json", action="store_true", help="print JSON")
    r.set_defaults(func=cmd_replay)

    c = sub.add_parser(
        "reconcile",
        help="account for every item accepted outside",
        description="Every item accepted outside is delivered, rejected (with reason), in "
        "flight, or missing. Exit 0 all accounted for, 10 missing, 11 discrepancy, 12 a log "
        "failed verification, 2 usage.",
    )
    _log_args(c)
    _accounting_args(c)
    c.add_argument("--json", action="store_true", help="print JSON (every item's state)")
    c.add_argument("--limit", type=int, default=200, help="entries per list in the text output")
    c.set_defaults(func=cmd_reconcile)

    p = sub.add_parser(
        "report",
        help="text, JSON, CSV and self-contained HTML reports",
        description="Summary figures, volume over time, verdicts, every item, and a check "
        "that delivered files still match their logged sha256.",
    )
    _log_args(p)
    _accounting_args(p)
    p.add_argument(
        "--format",
        choices=["text", "json", "csv", "html", "all"],
        default="text",
        help="what to write (all: every format into the -o directory)",
    )
    p.add_argument(
        "-o", "--output", help="output file (a directory for --format all); default stdout"
    )
    p.add_argument(
        "--no-check-files",
        action="store_true",
        help="do not hash the delivered files still on disk",
    )
    p.add_argument(
        "--table-rows",
        type=int,
        default=report_mod.DEFAULT_TABLE_ROWS,
        help="item rows in the HTML table (the CSV has all)",
    )
    p.add_argument("--title", default="ferry audit report")
    p.set_defaults(func=cmd_report)

    e = sub.add_parser(
        "export",
        help="send the audit log to a SIEM as RFC 5424 syslog",
        description="Follow the log and send every record, in order, as RFC 5424 syslog "
        "(TCP with octet counting, or UDP). Runs until interrupted; --once drains and exits.",
    )
    e.add_argument("-c", "--config", help="an agent config: export its own log")
    e.add_argument("--log", metavar="DIR", help="the log directory to export")
    e.add_argument("--syslog", required=True, metavar="URL", help="tcp://HOST:PORT or udp://...")
    e.add_argument(
        "--state-dir", help="where the cursor is kept (default: <log dir>-export next to it)"
    )
    e.add_argument("--once", action="store_true", help="export what is there, then exit")
    e.add_argument(
        "--timeout", type=float, default=60.0, help="with --once: give up after this many seconds"
    )
    e.add_argument("--facility", type=int, default=13, help="syslog facility (default 13)")
    e.add_argument("--hostname", help="HOSTNAME field (default: this host's name)")
    e.add_argument("--origin", help="origin in the structured data (default: the log's)")
    e.set_defaults(func=cmd_export)


def _fail(command: str, exc: Exception) -> int:
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"ferry audit {command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
    else:
        print(f"ferry audit {command}: error: {exc}", file=sys.stderr)
    return EXIT_USAGE


def _guard(command: str, fn: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    def run_it(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (FerryError, OSError) as exc:
            return _fail(command, exc)

    return run_it


# --- verify ---------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    if args.path is None and not args.config:
        return _fail("verify", UsageError("give a log PATH, or -c CONFIG"))
    try:
        if args.path is not None:
            key = load_public_key(args.key) if args.key else None
            reports = [verify(args.path, key)]
        else:
            locs = resolve(args.config, None, None, None, None)
            reports = [verify(loc.directory, loc.public_key()) for loc in locs.logs()]
    except FerryError as exc:
        return _fail("verify", exc)
    except OSError as exc:
        print(f"ferry audit verify: error: {args.path}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        doc: Any = (
            reports[0].to_json()
            if args.path is not None
            else {
                "verified": all(r.verified for r in reports),
                "logs": [r.to_json() for r in reports],
            }
        )
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join(render(r) for r in reports))
    return EXIT_VERIFIED if all(r.verified for r in reports) else EXIT_FAILED


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
    elif report.ok and report.authenticated:
        out.append(f"NOT SIGNED  {report.path}: no checkpoint signed by the key covers a record")
        out.append(
            "  anyone could have written these records; a log that stopped before its first "
            "checkpoint gets one when it reopens"
        )
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
    out.extend(
        f"  earlier audit key {k['key_id']}: {k['trusted']} (a key rotation)"
        for k in report.keys[1:]
        if k["trusted"].startswith("handed over")
    )
    out.extend(f"  warning: {_line(w)}" for w in report.warnings)
    out.append(f"  ({report.seconds:.2f} s)")
    return "\n".join(out)


# --- replay, reconcile, report --------------------------------------------------------------


def _locations(args: argparse.Namespace) -> Locations:
    return resolve(
        args.config,
        args.outside,
        args.inside,
        args.outside_key,
        args.inside_key,
        outside_origin=getattr(args, "outside_origin", None),
        inside_origin=getattr(args, "inside_origin", None),
    )


def _replay(args: argparse.Namespace) -> int:
    locs = _locations(args)
    filters = ReplayFilter(
        items=tuple(args.item),
        channels=tuple(args.channel),
        subjects=tuple(args.subject),
        since=parse_when(args.since) if args.since else None,
        until=parse_when(args.until) if args.until else None,
    )
    logs = [(loc.side, loc.directory) for loc in locs.logs()]
    result = replay(logs, filters, keep_records=args.json, system=args.system)
    out = sys.stdout
    if args.json:
        out.write(json.dumps(result.to_json(), indent=1))  # dumps: the C encoder
        out.write("\n")
    else:
        for line in render_replay(result):
            out.write(line + "\n")
    return EXIT_OK


def _now(args: argparse.Namespace) -> int:
    return ts_us(parse_when(args.now)) if args.now else time.time_ns() // 1000


def _both(locs: Locations, command: str) -> tuple[LogLocation, LogLocation]:
    if locs.outside is None or locs.inside is None:
        raise UsageError(
            f"{command} needs both logs: on the inside host give -c inside.yaml (it names "
            "the outside's mirror), or give --outside DIR and --inside DIR"
        )
    return locs.outside, locs.inside


def _reconciled(args: argparse.Namespace, command: str) -> tuple[Reconciliation | None, int | None]:
    """Verify the logs and account for what was verified; the exit code to return at once
    if a log failed verification."""
    if not 0 <= args.grace <= MAX_GRACE:  # (also NaN)
        raise UsageError(f"--grace must be from 0 to {MAX_GRACE:.0f} seconds")
    now = _now(args)
    locs = _locations(args)
    _both(locs, command)
    checks, result = reconcile_logs(
        locs,
        now_us=now,
        grace=args.grace,
        enabled=not args.no_verify,
        unsigned=args.include_unsigned,
    )
    bad = [c for c in checks if c.failed]
    for c in bad:
        print(
            f"ferry audit {command}: {c.location.describe()} failed verification: {c.note}\n"
            "  nothing was reconciled; run ferry audit verify for the details",
            file=sys.stderr,
        )
    if bad or result is None:
        return None, EXIT_UNVERIFIED
    return result, None


def _reconcile(args: argparse.Namespace) -> int:
    result, code = _reconciled(args, "reconcile")
    if result is None:
        return code or EXIT_UNVERIFIED
    if args.json:  # (written as it is made, never whole in memory)
        stream_json(result.json_fields(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for line in render_reconcile(result, limit=args.limit):
            sys.stdout.write(line + "\n")
    if result.missing:
        return EXIT_MISSING
    return EXIT_DISCREPANCY if result.discrepancies else EXIT_OK


def _report(args: argparse.Namespace) -> int:
    if args.format == "all" and not args.output:
        raise UsageError("--format all writes several files: give -o DIRECTORY")
    result, code = _reconciled(args, "report")
    if result is None:
        return code or EXIT_UNVERIFIED
    rep = report_mod.build(
        result,
        check_files=not args.no_check_files,
        title=args.title,
        table_rows=max(0, args.table_rows),
    )
    if args.format == "all":
        for path in report_mod.write_all(rep, Path(args.output)):
            print(path)
        return EXIT_OK
    writer = report_mod.WRITERS[args.format]
    if args.output:
        with Path(args.output).open("w", encoding="utf-8", newline="") as f:
            writer(rep, f)
    else:
        writer(rep, sys.stdout)
    return EXIT_OK


# --- export ---------------------------------------------------------------------------------


def _origin_of(directory: Path) -> str | None:
    """The origin named by the log's first audit.started record."""
    seg = directory / "audit-000001.jsonl"
    with contextlib.suppress(OSError, ValueError), seg.open("rb") as f:
        for _ in range(8):
            rec = json.loads(f.readline(64 * 1024) or b"null")
            if isinstance(rec, dict) and rec.get("event") == "audit.started":
                origin = (rec.get("detail") or {}).get("origin")
                return origin if isinstance(origin, str) else None
    return None


def _export(args: argparse.Namespace) -> int:
    if bool(args.config) == bool(args.log):
        raise UsageError("give either -c CONFIG or --log DIR")
    if args.log:
        log_dir = Path(args.log)
    else:
        locs = resolve(args.config, None, None, None, None)
        own = locs.inside if locs.role == "inside" else locs.outside
        assert own is not None
        log_dir = own.directory
    if not log_dir.is_dir():
        raise UsageError(f"{log_dir}: no such audit log directory")
    state = Path(args.state_dir) if args.state_dir else log_dir.with_name(log_dir.name + "-export")
    exporter = Exporter(
        log_dir,
        Destination.parse(args.syslog),
        state,
        origin=args.origin or _origin_of(log_dir),
        options=ExportOptions(hostname=args.hostname, facility=args.facility),
    )
    stop = threading.Event()
    restore = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            restore.append((sig, signal.signal(sig, lambda *_: stop.set())))
    try:
        done = exporter.run(stop, once=args.once, timeout=args.timeout if args.once else None)
    except CursorMismatch as exc:
        print(f"ferry audit export: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        for sig, handler in restore:
            signal.signal(sig, handler)
    print(
        f"exported {exporter.exported} record(s) to {exporter.dest}; next record "
        f"{exporter.committed.idx}; cursor {exporter.cursor.path}",
        file=sys.stderr,
    )
    if not done:
        print(
            f"ferry audit export: not everything was exported: {exporter.last_error}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


cmd_replay = _guard("replay", _replay)
cmd_reconcile = _guard("reconcile", _reconcile)
cmd_report = _guard("report", _report)
cmd_export = _guard("export", _export)


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

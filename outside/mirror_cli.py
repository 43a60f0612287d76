"""``ferry outside mirror status | resend -c outside.yaml``: the audit log's crossing.

``status`` shows, per file of the outside's audit log, its size and how far it has been
shipped to the inside's mirror, and a resend request still waiting. ``resend [--from
FILE@OFFSET]`` asks the agent (running, or at its next start) to ship the log again from that
place: what to do when the inside reports a ``link.sequence_gap`` on channel ``_audit`` (both
copies of a piece were lost) and its mirror stopped growing. The inside's mirror directory
shows where: the file and size at which its copy ends.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ferry.audit.segments import CHECKPOINTS_FILE, list_segments, segment_name
from ferry.errors import UsageError
from outside.mirror import STATE_FILE, pending_resend, request_resend


def _load(config: Path) -> tuple[Path, Path]:
    """The outside's state folder and audit folder; UsageError if it ships no mirror."""
    from ferry.config import load_outside_config  # noqa: PLC0415

    cfg = load_outside_config(config)
    if cfg.audit is None or not cfg.audit.mirror:
        raise UsageError(f"{config}: audit.mirror is off: this outside ships no audit log")
    return cfg.state_dir, cfg.audit.dir


def status(state_dir: Path, audit_dir: Path) -> dict[str, Any]:
    """Per file: its size and the bytes shipped; and a waiting resend request."""
    try:
        shipped = json.loads((state_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        shipped = {}
    if not isinstance(shipped, dict):
        shipped = {}
    files = [segment_name(n) for n, _ in list_segments(audit_dir)] + [CHECKPOINTS_FILE]
    rows = []
    for name in files:
        try:
            size = (audit_dir / name).stat().st_size
        except FileNotFoundError:
            continue
        done = shipped.get(name, 0)
        done = done if type(done) is int else 0
        rows.append({"file": name, "size": size, "shipped": done, "behind": max(0, size - done)})
    return {"files": rows, "resend_pending": pending_resend(state_dir)}


def _cmd_status(args: argparse.Namespace) -> int:
    state_dir, audit_dir = _load(Path(args.config))
    out = status(state_dir, audit_dir)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'file':24} {'size':>12} {'shipped':>12} {'behind':>10}")
    for row in out["files"]:
        print(f"{row['file']:24} {row['size']:12d} {row['shipped']:12d} {row['behind']:10d}")
    waiting = out["resend_pending"]
    if waiting:
        print(f"resend requested from {waiting.get('from')} at {waiting.get('requested_at')}")
    return 0


def _cmd_resend(args: argparse.Namespace) -> int:
    state_dir, _ = _load(Path(args.config))
    doc = request_resend(state_dir, args.start)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(
            f"resend requested from {doc['from']}: the outside agent ships the audit log "
            "again from there at its next step (within a second while it runs, else at start)"
        )
    return 0


def add_parser(sub: Any) -> None:
    """Register ``mirror`` under ``ferry outside``."""
    mp = sub.add_parser("mirror", help="the audit log's copy across the diode: status, resend")
    msub = mp.add_subparsers(dest="mirror_action", required=True)
    st = msub.add_parser("status", help="how far each audit file has been shipped")
    st.add_argument("-c", "--config", required=True, help="the outside agent's config")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_status)
    rs = msub.add_parser("resend", help="ship the audit log again from a place (FILE@OFFSET)")
    rs.add_argument("-c", "--config", required=True, help="the outside agent's config")
    rs.add_argument(
        "--from",
        dest="start",
        metavar="FILE@OFFSET",
        help="where to start, e.g. audit-000003.jsonl@40960 (default: the whole log)",
    )
    rs.add_argument("--json", action="store_true")
    rs.set_defaults(func=_cmd_resend)

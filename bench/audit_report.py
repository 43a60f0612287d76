"""The auditor's tools on a day of 100,000 items: reconcile and report generation time.

    .venv/bin/python bench/audit_report.py                    # 100,000 items
    .venv/bin/python bench/audit_report.py --items 20000      # quicker
    .venv/bin/python bench/audit_report.py --keep /tmp/logs   # keep (and re-use) the logs

Builds an outside and an inside log with the real AuditLog writer (schema
validation, Merkle tree, signed checkpoints every 1000 records, fsync group
commit), the records of docs/AUDIT.md §7 spread over 24 hours:

* outside, per item: intake.accepted, verdict, transfer.sent, transfer.repeated;
* inside: transfer.received, recheck, delivery.delivered -- or delivery.rejected
  (1 %); 1 % rejected by the outside verdict; 0.5 % never arrive (missing);
  the last 0.5 % are still in flight.

Then times, each in this process: ``verify`` of both logs, reconcile (read and
account) without and with verification (verified, the records are counted in the
verification's pass, as ``ferry audit reconcile`` does), writing ``reconcile --json``,
``report.build``, and each report writer (text, JSON, CSV, HTML), as
``ferry audit report --format all`` does.
Prints a table and writes bench/results/audit_report-<time>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from ferry.audit import AuditLog, AuditObject, AuditSettings, Result, Subject, verify
from ferry.audit import report as rep
from ferry.audit.locate import Locations, LogLocation
from ferry.audit.reconcile import reconcile, reconcile_logs, stream_json
from ferry.crypto.keys import SecretKey

OUT_KEY = SecretKey("ed25519", bytes(range(32)))
IN_KEY = SecretKey("ed25519", bytes(range(100, 132)))
T0 = int(datetime(2026, 11, 20, tzinfo=UTC).timestamp()) * 1_000_000
DAY = 86_400 * 1_000_000
CLIENT = Subject.api_client("z85:Z1Pcy8d7p3xWq0rT5uV2wY4aB6cE9fH1jK3lM5nO", "portal")
DROP = Subject.clerk_folder("/srv/ferry/drop/permits", "files/permits")
CHANNELS = ("files/permits", "files/tax", "messages/notices")


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> int:
        return self.t


def fate(i: int, n: int) -> str:
    if i >= n - n // 200:
        return "in_flight"
    r = i % 200
    if r in (1, 2):
        return "verdict_rejected"
    if r in (3, 4):
        return "inside_rejected"
    if r == 5:
        return "missing"
    return "delivered"


def build(root: Path, n: int) -> tuple[Path, Path, int, float]:
    """Write both logs; return their paths, "now" and the seconds it took."""
    t_start = time.perf_counter()
    step = DAY // n
    logs = {}
    clocks = {}
    for side, key in (("outside", OUT_KEY), ("inside", IN_KEY)):
        clocks[side] = Clock()
        settings = AuditSettings(origin=f"{side}.bench/audit", side=side, host="bench")
        logs[side] = AuditLog(root / side, key, settings, clock=clocks[side])
    out, ins = logs["outside"], logs["inside"]
    pending: list[tuple[int, int, str, AuditObject, Result]] = []  # inside events, time-ordered
    for i in range(n):
        t = T0 + i * step
        item = f"{i:032x}"
        channel = CHANNELS[i % len(CHANNELS)]
        seq = i // len(CHANNELS)
        sha = hashlib.sha256(item.encode()).hexdigest()
        obj = AuditObject(
            kind="file",
            item=item,
            channel=channel,
            name=f"application-{i:08d}.pdf",
            size=40_000 + i % 100_000,
            sha256=sha,
            media_type="application/pdf",
            seq=seq,
        )
        short = AuditObject(kind="file", item=item, channel=channel, seq=seq, sha256=sha)
        what = fate(i, n)
        # inside events due before this item's acceptance, in time order
        while pending and pending[0][0] <= t:
            _, idx, event, pobj, result = pending.pop(0)
            clocks["inside"].t = _
            _inside(ins, event, pobj, result, idx)
        clocks["outside"].t = t
        out.append("intake.accepted", subject=CLIENT if i % 2 else DROP, obj=obj, corr=item)
        clocks["outside"].t = t + 20_000
        rejected = what == "verdict_rejected"
        out.append(
            "verdict",
            subject=Subject.component("content"),
            result="rejected" if rejected else "success",
            reason="MACRO: VBA macros in the document" if rejected else None,
            obj=short,
            detail={"verdict": "reject" if rejected else "deliver_as_is", "actions": []},
            corr=item,
        )
        if rejected:
            continue
        clocks["outside"].t = t + 40_000
        out.append(
            "transfer.sent",
            subject=Subject.component("sender"),
            obj=short,
            detail={"send": 1, "of": 2},
            corr=item,
        )
        if what in ("missing", "in_flight"):
            continue
        pending.append((t + 60_000, i, "transfer.received", short, "success"))
        pending.append((t + 70_000, i, "recheck", short, "success"))
        if what == "inside_rejected":
            pending.append((t + 80_000, i, "delivery.rejected", short, "rejected"))
        else:
            deliv = AuditObject(
                kind="file",
                item=item,
                channel=channel,
                seq=seq,
                sha256=sha,
                size=obj.size,
                path=f"/srv/ferry/in/{channel}/application-{i:08d}.pdf",
            )
            pending.append((t + 80_000, i, "delivery.delivered", deliv, "success"))
        pending.sort(key=lambda p: p[0])
        # the planned repeat, after the receipt (records interleave as they do live)
        out.append(
            "transfer.repeated",
            subject=Subject.component("sender"),
            obj=short,
            detail={"send": 2, "of": 2},
            corr=item,
        )
    for t, idx, event, pobj, result in pending:
        clocks["inside"].t = t
        _inside(ins, event, pobj, result, idx)
    now = T0 + DAY + 60 * 1_000_000
    for side in ("outside", "inside"):
        clocks[side].t = T0 + DAY
        logs[side].close()
    return root / "outside", root / "inside", now, time.perf_counter() - t_start


def _inside(log: AuditLog, event: str, obj: AuditObject, result: Result, i: int) -> None:
    subject = {
        "transfer.received": Subject("peer", "a1b2c3d4"),
        "recheck": Subject.component("recheck"),
    }.get(event, Subject.component("delivery"))
    details: dict[str, dict[str, Any]] = {
        "transfer.received": {"sends_seen": 1},
        "recheck": {"checks": ["type", "pdf"], "disagreement": False},
        "delivery.delivered": {"consumers": 0},
        "delivery.rejected": {"kept": f"/srv/ferry/rejected/{i}"},
    }
    detail = details[event]
    reason = "TYPE: not a PDF" if result == "rejected" else None
    log.append(
        event,
        subject=subject,
        result=result,
        reason=reason,
        obj=obj,
        detail=detail,
        corr=obj.item,
    )


def timed(label: str, rows: list[tuple[str, float]], fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    value = fn()
    rows.append((label, time.perf_counter() - t0))
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--keep", type=Path, help="build the logs here (re-used if present)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    root = args.keep or Path(tempfile.mkdtemp(prefix="ferry-bench-audit-report-"))
    built = None
    if (root / "outside").is_dir() and (root / "inside").is_dir():
        outside, inside = root / "outside", root / "inside"
        now = T0 + DAY + 60 * 1_000_000
        print(f"re-using the logs in {root}")
    else:
        print(f"writing logs for {args.items} items into {root} ...", flush=True)
        outside, inside, now, built = build(root, args.items)
    sizes = {
        side: sum(p.stat().st_size for p in d.glob("audit-*.jsonl"))
        for side, d in (("outside", outside), ("inside", inside))
    }
    locs = Locations(
        LogLocation("outside", outside, OUT_KEY.public.to_string()),
        LogLocation("inside", inside, IN_KEY.public.to_string()),
    )
    rows: list[tuple[str, float]] = []
    try:
        timed("verify outside log", rows, lambda: verify(outside, OUT_KEY.public))
        timed("verify inside log", rows, lambda: verify(inside, IN_KEY.public))
        timed("reconcile (read + account)", rows, lambda: reconcile(outside, inside, now_us=now))

        def verified_reconcile() -> Any:  # (as ferry audit reconcile does)
            return reconcile_logs(locs, now_us=now)[1]

        result = timed("reconcile, logs verified first", rows, verified_reconcile)

        def reconcile_json() -> None:
            with (root / "reconcile.json").open("w", encoding="utf-8") as f:
                stream_json(result.json_fields(), f, indent=1)

        timed("reconcile: write --json", rows, reconcile_json)
        report = timed("report: build", rows, lambda: rep.build(result, now_us=now))
        out_dir = root / "report"
        out_dir.mkdir(exist_ok=True)
        for fmt, writer in rep.WRITERS.items():
            path = out_dir / f"audit-report.{rep.SUFFIXES[fmt]}"

            def write(path: Path = path, writer: Any = writer) -> None:
                with path.open("w", encoding="utf-8", newline="") as f:
                    writer(report, f)

            timed(f"report: write {fmt}", rows, write)
        files = {p.suffix[1:]: p.stat().st_size for p in out_dir.iterdir()}
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    total_report = sum(s for label, s in rows if label.startswith(("reconcile, logs", "report")))
    total_fast = sum(s for label, s in rows if label.startswith(("reconcile (", "report")))
    counts = result.counts()
    records = {c.location.side: c.report.tree_size if c.report else None for c in result.checks}
    print()
    print(
        f"{args.items} items; records: outside {records['outside']}, inside {records['inside']};"
        f" log bytes: outside {sizes['outside'] / 1e6:.0f} MB,"
        f" inside {sizes['inside'] / 1e6:.0f} MB"
    )
    print(f"states: {counts}")
    if built is not None:
        print(f"(writing the logs took {built:.1f} s)")
    print()
    print(f"{'step':<34}{'seconds':>10}")
    for label, seconds in rows:
        print(f"{label:<34}{seconds:>10.2f}")
    print(f"{'report --format all, verified':<34}{total_report:>10.2f}")
    print(f"{'report --format all, --no-verify':<34}{total_fast:>10.2f}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"peak RSS {rss:.0f} MiB; report files: "
        + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(files.items()))
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    doc = {
        "bench": "audit_report",
        "items": args.items,
        "records": records,
        "log_bytes": sizes,
        "states": counts,
        "write_logs_seconds": built,
        "steps": {label: round(s, 3) for label, s in rows},
        "report_all_verified_seconds": round(total_report, 3),
        "report_all_no_verify_seconds": round(total_fast, 3),
        "peak_rss_mib": round(rss),
        "report_bytes": files,
    }
    path = args.out / f"audit_report-{stamp}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

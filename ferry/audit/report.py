"""The auditor's report: text, JSON, CSV and one self-contained HTML file.

:func:`build` turns a :class:`~ferry.audit.reconcile.Reconciliation` into a
:class:`Report`: summary figures, items accepted per time bucket by final state,
verdicts, rejection reasons, and a check that each delivered file still on disk
has the sha256 its ``delivery.delivered`` record names (match, mismatch, gone).
Writers: :func:`write_text`, :func:`write_json`, :func:`write_csv` (every item)
and :func:`write_html` (inline CSS and SVG drawn here, no script, no external
URL, a Content-Security-Policy that forbids loading anything; every string from a
log is escaped: records are untrusted input).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import html
import os
import stat
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ferry import __version__
from ferry.audit.reconcile import STATES, ItemState, Reconciliation, reason_code, stream_json
from ferry.audit.record import format_ts
from ferry.audit.timeline import safe, ts_us

# Bucket widths tried in turn for the volume chart (seconds); the first giving at
# most MAX_BUCKETS bars is used.
BUCKET_WIDTHS = (60, 300, 900, 3600, 3 * 3600, 6 * 3600, 86400, 7 * 86400, 30 * 86400)
MAX_BUCKETS = 48
DEFAULT_TABLE_ROWS = 2000  # item rows in the HTML table (all of them are in the CSV)
MAX_PROBLEM_ROWS = 1000  # rows of each problem list in the text and HTML reports
TOP_REASONS = 12
HASH_CHUNK = 1 << 20
FILE_STATES = ("match", "mismatch", "gone", "unreadable", "not_regular", "not_checked")
STATE_LABELS = {
    "delivered": "delivered",
    "rejected": "rejected",
    "in_flight": "in flight",
    "missing": "missing",
}
STATE_COLOURS = {
    "delivered": "#2e7d32",
    "rejected": "#ef6c00",
    "in_flight": "#1565c0",
    "missing": "#c62828",
}


# --- delivered files ------------------------------------------------------------------------


def check_file(path: str, sha256: str, size: int | None) -> str:
    """Does the delivered file at ``path`` still hold ``sha256``? One of FILE_STATES.

    Opens without following a final symlink and without blocking (a FIFO put
    in its place must not hang the report), and hashes regular files only.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return "gone"
    except OSError as exc:
        return "not_regular" if exc.errno == errno.ELOOP else "unreadable"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "not_regular"
        if size is not None and st.st_size != size:
            return "mismatch"
        digest = hashlib.sha256()
        while chunk := os.read(fd, HASH_CHUNK):
            digest.update(chunk)
    except OSError:
        return "unreadable"
    finally:
        os.close(fd)
    return "match" if digest.hexdigest() == sha256.lower() else "mismatch"


# --- the report -----------------------------------------------------------------------------


@dataclass
class Report:
    """Everything the writers show."""

    rec: Reconciliation
    generated: str
    title: str
    bucket_seconds: int
    buckets: list[tuple[str, dict[str, int]]]  # (bucket start, count per state)
    verdicts: Counter[str]
    reasons: Counter[str]  # rejection reason codes
    refused: Counter[str]  # intake.rejected reason codes
    files: dict[str, str] = field(default_factory=dict)  # item -> file state
    file_counts: Counter[str] = field(default_factory=Counter)
    sends: int = 0
    bytes_delivered: int = 0
    seconds: float = 0.0
    table_rows: int = DEFAULT_TABLE_ROWS

    @property
    def period(self) -> tuple[str | None, str | None]:
        acc = self.rec.accepted
        return (acc[0].accepted_ts, acc[-1].accepted_ts) if acc else (None, None)

    def summary(self) -> dict[str, Any]:
        counts = self.rec.counts()
        first, last = self.period
        return {
            "accepted": len(self.rec.accepted),
            **counts,
            "rejected_by_verdict": sum(
                1 for s in self.rec.by_state("rejected") if s.rejected_by == "verdict"
            ),
            "refused_at_intake": sum(self.refused.values()),
            "discrepancies": len(self.rec.discrepancies),
            "unexplained": sum(1 for s in self.rec.unexplained if s.state == "unexplained"),
            "sequence_gaps": len(self.rec.gaps),
            "sends": self.sends,
            "bytes_delivered": self.bytes_delivered,
            "files": {k: self.file_counts.get(k, 0) for k in FILE_STATES},
            "first_accepted": first,
            "last_accepted": last,
        }


def _bucket_width(first_us: int, last_us: int) -> int:
    span = max(0, last_us - first_us) // 1_000_000
    for width in BUCKET_WIDTHS:
        if span // width + 1 <= MAX_BUCKETS:
            return width
    return BUCKET_WIDTHS[-1]


def _buckets(rec: Reconciliation) -> tuple[int, list[tuple[str, dict[str, int]]]]:
    if not rec.accepted:
        return BUCKET_WIDTHS[0], []
    first = ts_us(rec.accepted[0].accepted_ts or "")
    last = ts_us(rec.accepted[-1].accepted_ts or "")
    width = _bucket_width(first, last)
    step = width * 1_000_000
    start = first - first % step
    n = (last - start) // step + 1
    counts = [dict.fromkeys(STATES, 0) for _ in range(n)]
    for st in rec.accepted:
        counts[(ts_us(st.accepted_ts or "") - start) // step][st.state] += 1
    return width, [(format_ts(start + i * step), c) for i, c in enumerate(counts)]


def build(
    rec: Reconciliation,
    *,
    check_files: bool = True,
    title: str = "ferry audit report",
    table_rows: int = DEFAULT_TABLE_ROWS,
    now_us: int | None = None,
) -> Report:
    """Compute the report of a reconciliation (and check delivered files if asked)."""
    t0 = time.perf_counter()
    width, buckets = _buckets(rec)
    report = Report(
        rec=rec,
        generated=format_ts(now_us if now_us is not None else time.time_ns() // 1000),
        title=title,
        bucket_seconds=width,
        buckets=buckets,
        verdicts=Counter(s.verdict or "(no verdict yet)" for s in rec.accepted),
        reasons=Counter(reason_code(s.reason) for s in rec.by_state("rejected")),
        refused=Counter(rec.accountant.intake_rejected),
        table_rows=table_rows,
    )
    for st in rec.accepted:
        report.sends += st.sends
        if st.state != "delivered":
            continue
        report.bytes_delivered += st.delivered_size or st.size or 0
        if check_files and st.delivered_path and st.delivered_sha256:
            state = check_file(st.delivered_path, st.delivered_sha256, st.delivered_size)
        else:
            state = "not_checked"
        report.files[st.item] = state
        report.file_counts[state] += 1
    report.seconds = time.perf_counter() - t0
    return report


def _file_problems(report: Report) -> list[tuple[ItemState, str]]:
    bad = {k: v for k, v in report.files.items() if v in ("mismatch", "not_regular", "unreadable")}
    return [(s, bad[s.item]) for s in report.rec.accepted if s.item in bad]


# --- text and JSON --------------------------------------------------------------------------


def text_lines(report: Report) -> Iterator[str]:
    rec = report.rec
    s = report.summary()
    yield f"{report.title}"
    yield (
        f"generated {report.generated} by ferry {__version__}; now {rec.now}, grace {rec.grace:g} s"
    )
    for check in rec.checks:
        yield f"  {safe(check.location.describe())}: {safe(check.note)}"
    yield f"period (accepted): {s['first_accepted'] or '-'} .. {s['last_accepted'] or '-'}"
    yield ""
    yield f"  accepted outside      {s['accepted']:>10}"
    for state in STATES:
        yield f"  {STATE_LABELS[state]:<22}{s[state]:>10}"
    yield f"  refused at intake     {s['refused_at_intake']:>10}"
    yield f"  discrepancies         {s['discrepancies']:>10}"
    yield f"  sequence gaps         {s['sequence_gaps']:>10}"
    yield f"  transmissions         {s['sends']:>10}"
    yield f"  bytes delivered       {s['bytes_delivered']:>10}"
    files = s["files"]
    yield (
        "  delivered files: "
        + ", ".join(f"{k.replace('_', ' ')} {files[k]}" for k in FILE_STATES if files[k])
        if any(files.values())
        else "  delivered files: none"
    )
    yield ""
    yield "verdicts:"
    for name, n in report.verdicts.most_common():
        yield f"  {safe(name):<30}{n:>10}"
    if report.reasons:
        yield "rejection reasons:"
        for name, n in report.reasons.most_common(TOP_REASONS):
            yield f"  {safe(name):<30}{n:>10}"
    if report.refused:
        yield "refused at intake:"
        for name, n in report.refused.most_common(TOP_REASONS):
            yield f"  {safe(name):<30}{n:>10}"
    yield ""
    width = _width_label(report.bucket_seconds)
    yield f"accepted per {width} (delivered/rejected/in flight/missing):"
    for start, c in report.buckets:
        row = "/".join(str(c[k]) for k in STATES)
        yield f"  {start}  {sum(c.values()):>8}  {row}"
    missing = list(rec.by_state("missing"))
    if missing:
        yield ""
        yield f"MISSING ({len(missing)})"
        for st in missing[:MAX_PROBLEM_ROWS]:
            yield f"  {safe(st.item)}  {safe(st.channel or '-')}  accepted {st.accepted_ts}"
            for ev in st.evidence:
                yield f"      {safe(ev)}"
    if rec.discrepancies:
        yield ""
        yield f"DISCREPANCIES ({len(rec.discrepancies)})"
        for d in rec.discrepancies[:MAX_PROBLEM_ROWS]:
            yield f"  {d.code}  {safe(d.item or '-')}  {safe(d.message)}"
    bad = _file_problems(report)
    if bad:
        yield ""
        yield f"DELIVERED FILES THAT NO LONGER MATCH ({len(bad)})"
        for st, state in bad[:MAX_PROBLEM_ROWS]:
            yield f"  {safe(st.item)}  {state}  {safe(st.delivered_path or '-')}"


def _width_label(seconds: int) -> str:
    if seconds % 86400 == 0:
        return f"{seconds // 86400} day(s)"
    if seconds % 3600 == 0:
        return f"{seconds // 3600} hour(s)"
    return f"{seconds // 60} minute(s)"


def write_text(report: Report, out: IO[str]) -> None:
    for line in text_lines(report):
        out.write(line + "\n")


def json_fields(report: Report) -> Iterator[tuple[str, Any]]:
    """The members of the JSON report, in order; the item lists as iterators (one dict
    made at a time, for :func:`write_json` to write as they come)."""
    rec = report.rec
    yield "title", report.title
    yield "generated", report.generated
    yield "ferry_version", __version__
    yield "now", rec.now
    yield "grace", rec.grace
    yield "logs", [c.to_json() for c in rec.checks]
    yield "read", [s.to_json() for s in rec.stats]
    yield "summary", report.summary()
    yield "bucket_seconds", report.bucket_seconds
    yield "buckets", [{"start": start, **c} for start, c in report.buckets]
    yield "verdicts", dict(report.verdicts.most_common())
    yield "rejection_reasons", dict(report.reasons.most_common())
    yield "refused_at_intake", dict(report.refused.most_common())
    yield "discrepancies", (d.to_json() for d in rec.discrepancies)
    yield "sequence_gaps", (g.to_json() for g in rec.gaps)
    yield "unexplained", (s.to_json() for s in rec.unexplained)
    yield "items", (_item_json(report, st) for st in rec.accepted)


def _item_json(report: Report, st: ItemState) -> dict[str, Any]:
    row = st.to_json()
    row["file_check"] = report.files.get(st.item)
    return row


def to_json(report: Report) -> dict[str, Any]:
    """The whole report as one document in memory (:func:`write_json` streams it)."""
    return {
        key: list(value) if isinstance(value, Iterator) else value
        for key, value in json_fields(report)
    }


def write_json(report: Report, out: IO[str]) -> None:
    """Compact JSON (one line; 100,000 items make about 70 MB), written as it is made."""
    stream_json(json_fields(report), out)
    out.write("\n")


# --- CSV ------------------------------------------------------------------------------------

CSV_COLUMNS = (
    "item",
    "state",
    "reason",
    "channel",
    "seq",
    "kind",
    "name",
    "size",
    "sha256",
    "media_type",
    "subject",
    "accepted_ts",
    "verdict",
    "sends",
    "received_ts",
    "recheck",
    "delivered_ts",
    "delivered_path",
    "file_check",
    "rejected_ts",
    "rejected_by",
    "evidence",
)
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> object:
    """A CSV cell; text that a spreadsheet would run as a formula gets a leading quote."""
    if isinstance(value, str) and value.startswith(_FORMULA):
        return "'" + value
    return "" if value is None else value


def write_csv(report: Report, out: IO[str]) -> None:
    """One row per item (accepted items, then inside items the outside never accepted)."""
    w = csv.writer(out, lineterminator="\r\n")
    w.writerow(CSV_COLUMNS)
    for st in [*report.rec.accepted, *report.rec.unexplained]:
        row = st.to_json()
        row["file_check"] = report.files.get(st.item)
        row["evidence"] = "; ".join(st.evidence)
        w.writerow([_cell(row.get(c)) for c in CSV_COLUMNS])


# --- HTML -----------------------------------------------------------------------------------


def esc(value: object) -> str:
    """HTML-escape anything shown in the page (quotes too: also used in attributes)."""
    return html.escape(value if isinstance(value, str) else str(value), quote=True)


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1b1b1b;
background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ccc}
.meta{color:#555;font-size:12px}.cards{display:flex;flex-wrap:wrap;gap:10px;margin:16px 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px;min-width:110px}
.card b{display:block;font-size:22px}.card span{color:#555;font-size:12px}
.bad b{color:#c62828}.ok{color:#2e7d32}.fail{color:#c62828;font-weight:bold}
table{border-collapse:collapse;background:#fff;font-size:12px;width:100%}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#eee;position:sticky;top:0}td.n{text-align:right}
td.mono,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;word-break:break-all}
td.id{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:nowrap}
.s-delivered{color:#2e7d32}.s-rejected{color:#ef6c00}.s-in_flight{color:#1565c0}
.s-missing{color:#c62828;font-weight:bold}.charts{display:flex;flex-wrap:wrap;gap:16px}
.chart{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
.note{color:#555;font-style:italic}
"""


def _legend(x: int, y: int) -> list[str]:
    out = []
    for i, state in enumerate(STATES):
        cx = x + i * 110
        out.append(f'<rect x="{cx}" y="{y}" width="12" height="12" fill="{STATE_COLOURS[state]}"/>')
        out.append(f'<text x="{cx + 16}" y="{y + 11}" font-size="12">{STATE_LABELS[state]}</text>')
    return out


def _nice(peak: int) -> int:
    """The smallest of 2, 4, 6, 8, 10, 20, 40, ... at or above ``peak`` (even: halves are whole)."""
    scale = 1
    while True:
        for m in (2, 4, 6, 8, 10):
            if m * scale >= peak:
                return m * scale
        scale *= 10


def volume_svg(report: Report, width: int = 960, height: int = 280) -> str:
    """Stacked bars: items accepted per bucket, coloured by final state."""
    buckets = report.buckets
    left, right, top, bottom = 56, 12, 28, 48
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max((sum(c.values()) for _, c in buckets), default=0)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="items accepted over time">',
        f'<text x="{left}" y="16" font-size="13" font-weight="bold">Items accepted per '
        f"{esc(_width_label(report.bucket_seconds))}, by final state</text>",
    ]
    parts.extend(_legend(width - 450, 6))
    top_value = _nice(peak)
    scale = plot_h / top_value
    for tick in (0, top_value // 2, top_value):
        y = top + plot_h - tick * scale
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#ddd"/>'
        )
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{tick}</text>'
        )
    n = max(1, len(buckets))
    slot = plot_w / n
    bar = max(1.0, slot * 0.8)
    label_every = max(1, n // 8)
    for i, (start, counts) in enumerate(buckets):
        x = left + i * slot + (slot - bar) / 2
        y = top + plot_h
        tip = ", ".join(f"{STATE_LABELS[k]} {counts[k]}" for k in STATES)
        for state in STATES:
            h = counts[state] * scale
            if h <= 0:
                continue
            y -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{STATE_COLOURS[state]}"><title>{esc(start)}: {esc(tip)}</title></rect>'
            )
        if i % label_every == 0:
            parts.append(
                f'<text x="{left + i * slot + slot / 2:.1f}" y="{top + plot_h + 16}" '
                f'font-size="10" text-anchor="middle">{esc(start[5:16].replace("T", " "))}</text>'
            )
    if not buckets:
        parts.append(f'<text x="{left + 10}" y="{top + 30}" font-size="13">no items</text>')
    parts.append(
        f'<text x="{left}" y="{height - 6}" font-size="11" fill="#555">UTC; bucket start '
        "(month-day hour:minute)</text></svg>"
    )
    return "".join(parts)


def bars_svg(
    title: str, rows: list[tuple[str, int, str]], width: int = 460, bar_h: int = 20
) -> str:
    """Horizontal bars of (label, count, colour)."""
    label_w, right, top = 170, 60, 28
    height = top + max(1, len(rows)) * (bar_h + 6) + 8
    peak = max((n for _, n, _ in rows), default=0)
    plot_w = width - label_w - right
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">',
        f'<text x="4" y="16" font-size="13" font-weight="bold">{esc(title)}</text>',
    ]
    for i, (label, n, colour) in enumerate(rows):
        y = top + i * (bar_h + 6)
        w = plot_w * n / peak if peak else 0.0
        short = label if len(label) <= 26 else label[:25] + "\u2026"
        parts.append(
            f'<text x="{label_w - 6}" y="{y + bar_h - 6}" font-size="12" text-anchor="end">'
            f"{esc(short)}<title>{esc(label)}</title></text>"
        )
        parts.append(
            f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}">'
            f"<title>{esc(label)}: {n}</title></rect>"
        )
        parts.append(
            f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h - 6}" font-size="12">{n}</text>'
        )
    if not rows:
        parts.append(f'<text x="4" y="{top + 14}" font-size="12">none</text>')
    parts.append("</svg>")
    return "".join(parts)


_VERDICT_COLOURS = {
    "deliver_as_is": "#2e7d32",
    "deliver_cleaned": "#66bb6a",
    "reject": "#ef6c00",
    "rejected": "#ef6c00",
}


def _card(label: str, value: object, bad: bool = False) -> str:
    cls = "card bad" if bad else "card"
    return f'<div class="{cls}"><b>{esc(value)}</b><span>{esc(label)}</span></div>'


def _item_row(st: ItemState, file_state: str | None) -> str:
    cells = [
        f'<td class="id">{esc(st.item)}</td>',
        f'<td class="s-{esc(st.state)}">{esc(STATE_LABELS.get(st.state, st.state))}</td>',
        f"<td>{esc(st.channel or '')}</td>",
        f'<td class="n">{esc("" if st.seq is None else st.seq)}</td>',
        f"<td>{esc(st.name or '')}</td>",
        f'<td class="n">{esc("" if st.size is None else st.size)}</td>',
        f"<td>{esc(st.accepted_ts or '')}</td>",
        f"<td>{esc(st.verdict or '')}</td>",
        f'<td class="n">{st.sends}</td>',
        f"<td>{esc(st.delivered_ts or st.rejected_ts or '')}</td>",
        f"<td>{esc(st.reason or '; '.join(st.evidence))}</td>",
        f"<td>{esc(file_state or '')}</td>",
    ]
    return "<tr>" + "".join(cells) + "</tr>"


_ITEM_HEAD = (
    "<tr><th>item</th><th>state</th><th>channel</th><th>seq</th><th>name</th><th>size</th>"
    "<th>accepted (UTC)</th><th>verdict</th><th>sends</th><th>ended (UTC)</th>"
    "<th>reason / evidence</th><th>file</th></tr>"
)


def html_chunks(report: Report) -> Iterator[str]:
    """The HTML page, in pieces (joined or written by the caller)."""
    rec = report.rec
    s = report.summary()
    yield (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(report.title)}</title><style>{_CSS}</style></head><body>"
    )
    yield f"<h1>{esc(report.title)}</h1>"
    first, last = report.period
    yield (
        f'<p class="meta">Generated {esc(report.generated)} by ferry {esc(__version__)}. '
        f"Accounting at {esc(rec.now)} with a grace period of {esc(f'{rec.grace:g}')} s. "
        f"Items accepted {esc(first or '-')} to {esc(last or '-')} (UTC).</p>"
    )
    yield (
        "<h2>Logs</h2><table><tr><th>log</th><th>verification</th><th>records</th>"
        "<th>root</th></tr>"
    )
    for check in rec.checks:
        rep = check.report
        cls = "ok" if rep is not None and rep.verified else "fail"
        size = rep.tree_size if rep is not None else ""
        root = rep.root if rep is not None else ""
        yield (
            f'<tr><td class="mono">{esc(check.location.describe())}</td>'
            f'<td class="{cls}">{esc(check.note)}</td><td class="n">{esc(size)}</td>'
            f'<td class="mono">{esc(root)}</td></tr>'
        )
    yield "</table>"
    cards = [
        _card("accepted outside", s["accepted"]),
        _card("delivered", s["delivered"]),
        _card("rejected", s["rejected"]),
        _card("in flight", s["in_flight"]),
        _card("missing", s["missing"], bad=s["missing"] > 0),
        _card("discrepancies", s["discrepancies"], bad=s["discrepancies"] > 0),
        _card("refused at intake", s["refused_at_intake"]),
        _card("files changed", s["files"]["mismatch"], bad=s["files"]["mismatch"] > 0),
        _card("files gone", s["files"]["gone"]),
        _card("transmissions", s["sends"]),
    ]
    yield '<h2>Summary</h2><div class="cards">' + "".join(cards) + "</div>"
    yield '<h2>Charts</h2><div class="charts"><div class="chart">'
    yield volume_svg(report)
    yield '</div><div class="chart">'
    yield bars_svg(
        "Final state",
        [(STATE_LABELS[k], s[k], STATE_COLOURS[k]) for k in STATES],
    )
    yield '</div><div class="chart">'
    yield bars_svg(
        "Content verdicts",
        [(k, n, _VERDICT_COLOURS.get(k, "#78909c")) for k, n in report.verdicts.most_common(8)],
    )
    yield '</div><div class="chart">'
    yield bars_svg(
        "Rejection reasons",
        [(k, n, "#ef6c00") for k, n in report.reasons.most_common(TOP_REASONS)],
    )
    if report.refused:
        yield '</div><div class="chart">'
        yield bars_svg(
            "Refused at intake",
            [(k, n, "#8d6e63") for k, n in report.refused.most_common(TOP_REASONS)],
        )
    yield "</div></div>"
    yield from _html_problems(report)
    shown = rec.accepted[: report.table_rows]
    yield f"<h2>Items ({len(rec.accepted)})</h2>"
    if len(rec.accepted) > len(shown):
        yield (
            f'<p class="note">The first {len(shown)} items by acceptance time are shown; '
            "the CSV report lists every item.</p>"
        )
    yield "<table>" + _ITEM_HEAD
    for st in shown:
        yield _item_row(st, report.files.get(st.item))
    yield "</table></body></html>\n"


def _html_problems(report: Report) -> Iterator[str]:
    rec = report.rec
    missing = list(rec.by_state("missing"))
    if missing:
        yield f'<h2 class="fail">Missing items ({len(missing)})</h2><table>{_ITEM_HEAD}'
        for st in missing[:MAX_PROBLEM_ROWS]:
            yield _item_row(st, None)
        yield "</table>"
        if len(missing) > MAX_PROBLEM_ROWS:
            yield f'<p class="note">{len(missing) - MAX_PROBLEM_ROWS} more in the CSV.</p>'
    if rec.discrepancies:
        yield f'<h2 class="fail">Discrepancies ({len(rec.discrepancies)})</h2>'
        yield "<table><tr><th>code</th><th>item</th><th>what</th></tr>"
        for d in rec.discrepancies[:MAX_PROBLEM_ROWS]:
            yield (
                f'<tr><td>{esc(d.code)}</td><td class="id">{esc(d.item or "")}</td>'
                f"<td>{esc(d.message)}</td></tr>"
            )
        yield "</table>"
    bad = _file_problems(report)
    if bad:
        yield f'<h2 class="fail">Delivered files that no longer match ({len(bad)})</h2>'
        yield "<table><tr><th>item</th><th>check</th><th>path</th><th>logged sha256</th></tr>"
        for st, state in bad[:MAX_PROBLEM_ROWS]:
            yield (
                f'<tr><td class="id">{esc(st.item)}</td><td class="fail">{esc(state)}</td>'
                f'<td class="mono">{esc(st.delivered_path or "")}</td>'
                f'<td class="mono">{esc(st.delivered_sha256 or "")}</td></tr>'
            )
        yield "</table>"
    if rec.gaps:
        yield f"<h2>Sequence gaps reported by the inside ({len(rec.gaps)})</h2>"
        yield (
            "<table><tr><th>time</th><th>channel</th><th>seq</th><th>accepted items in it</th></tr>"
        )
        for g in rec.gaps[:MAX_PROBLEM_ROWS]:
            yield (
                f"<tr><td>{esc(g.ts)}</td><td>{esc(g.channel or '')}</td>"
                f"<td>{g.first}..{g.last}</td>"
                f'<td class="mono">{esc(", ".join(g.items[:20]))}</td></tr>'
            )
        yield "</table>"


def write_html(report: Report, out: IO[str]) -> None:
    for chunk in html_chunks(report):
        out.write(chunk)


WRITERS = {"text": write_text, "json": write_json, "csv": write_csv, "html": write_html}
SUFFIXES = {"text": "txt", "json": "json", "csv": "csv", "html": "html"}


def write_all(report: Report, directory: Path, stem: str = "audit-report") -> list[Path]:
    """Write every format into ``directory`` (created 0700 if absent); return the paths."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths = []
    for fmt, writer in WRITERS.items():
        path = directory / f"{stem}.{SUFFIXES[fmt]}"
        with path.open("w", encoding="utf-8", newline="") as f:
            writer(report, f)
        paths.append(path)
    return paths

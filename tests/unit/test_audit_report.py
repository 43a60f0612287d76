"""ferry.audit.report and ``ferry audit report``: formats, escaping, delivered-file checks."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

import pytest
from audit_scenario import HOSTILE_NAME, T0, S, Standard, configs, standard

from ferry.audit import cli as audit_cli
from ferry.audit import report as rep
from ferry.audit.reconcile import reconcile
from ferry.audit.record import format_ts


@pytest.fixture(scope="module")
def scn(tmp_path_factory: pytest.TempPathFactory) -> Standard:
    return standard(tmp_path_factory.mktemp("scenario"))


@pytest.fixture(scope="module")
def report(scn: Standard) -> rep.Report:
    result = reconcile(scn.outside, scn.inside, now_us=scn.now)
    return rep.build(result, now_us=scn.now)


def render(report: rep.Report, fmt: str) -> str:
    out = io.StringIO(newline="")
    rep.WRITERS[fmt](report, out)
    return out.getvalue()


def test_delivered_files_are_checked_against_their_logged_hash(
    scn: Standard, report: rep.Report
) -> None:
    files = {name: report.files.get(item) for name, item in scn.items.items()}
    assert files["delivered"] == "match"
    assert files["hostile"] == "match"
    assert files["cleaned"] == "mismatch"  # changed after delivery
    assert files["gone"] == "gone"
    assert files["all_lost"] is None  # never delivered
    assert report.file_counts == {"match": 2, "mismatch": 1, "gone": 1}


def test_check_file_never_follows_symlinks_or_blocks_on_a_fifo(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.write_bytes(b"abc")
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert rep.check_file(str(real), digest, 3) == "match"
    assert rep.check_file(str(real), digest.upper(), None) == "match"
    assert rep.check_file(str(real), digest, 4) == "mismatch"  # size differs: no hashing
    (tmp_path / "link").symlink_to(real)
    assert rep.check_file(str(tmp_path / "link"), digest, 3) == "not_regular"
    os.mkfifo(tmp_path / "fifo")
    assert rep.check_file(str(tmp_path / "fifo"), digest, 3) == "not_regular"
    assert rep.check_file(str(tmp_path), digest, None) == "not_regular"  # a directory
    assert rep.check_file(str(tmp_path / "none"), digest, 3) == "gone"


def test_summary(report: rep.Report) -> None:
    s = report.summary()
    assert (s["accepted"], s["delivered"], s["rejected"], s["in_flight"], s["missing"]) == (
        10,
        4,
        2,
        1,
        3,
    )
    assert (s["refused_at_intake"], s["discrepancies"], s["unexplained"]) == (2, 1, 1)
    assert s["rejected_by_verdict"] == 1
    assert s["sends"] == 18  # nine items sent twice
    assert s["first_accepted"] == format_ts(T0)
    assert report.verdicts == {"deliver_as_is": 9, "reject": 1}
    assert report.reasons == {"MACRO": 1, "TYPE": 1}
    assert report.refused == {"SIZE": 1, "TYPE": 1}


def test_buckets_cover_the_period_by_state(report: rep.Report) -> None:
    assert report.bucket_seconds == 300  # 58 minutes in at most 48 bars
    starts = [b for b, _ in report.buckets]
    assert starts[0] == format_ts(T0)
    assert len(starts) == 12
    assert sum(sum(c.values()) for _, c in report.buckets) == 10
    assert report.buckets[-1][1]["in_flight"] == 1


@pytest.mark.parametrize(
    ("span", "width"), [(0, 60), (47 * 60, 60), (48 * 60, 300), (40 * 86400, 86400)]
)
def test_bucket_width(span: int, width: int) -> None:
    assert rep._bucket_width(0, span * 1_000_000) == width


def test_html_is_self_contained_and_escapes_everything(report: rep.Report) -> None:
    page = render(report, "html")
    assert page.startswith("<!DOCTYPE html>")
    assert "default-src 'none'" in page  # CSP: nothing may be loaded, no script may run
    lowered = page.lower()
    for bad in ("<script", "<link", "<iframe", "<img", "src=", "href=", "url(", "@import"):
        assert bad not in lowered, bad
    # the only URL is the SVG namespace name, which is never fetched
    assert set(re.findall(r"https?://[^\"' <]+", page)) == {"http://www.w3.org/2000/svg"}
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "\x1b" in HOSTILE_NAME  # shown escaped by html.escape, harmless in a page
    assert page.count("<svg") == 5
    assert "Missing items (3)" in page
    assert "UNEXPLAINED_ARRIVAL" in page
    assert "Delivered files that no longer match (1)" in page


def test_html_table_is_capped(scn: Standard) -> None:
    result = reconcile(scn.outside, scn.inside, now_us=scn.now)
    page = render(rep.build(result, table_rows=3, now_us=scn.now), "html")
    assert "The first 3 items by acceptance time are shown" in page


def test_csv_has_every_item_and_defuses_formulas(report: rep.Report, scn: Standard) -> None:
    rows = list(csv.DictReader(io.StringIO(render(report, "csv"))))
    assert len(rows) == 11  # 10 accepted + the unexplained arrival
    by_item = {r["item"]: r for r in rows}
    assert by_item[scn.items["cleaned"]]["file_check"] == "mismatch"
    assert by_item[scn.items["unexplained"]]["state"] == "unexplained"
    assert by_item[scn.items["all_lost"]]["evidence"].startswith("sent 2 time(s)")
    hostile = by_item[scn.items["hostile"]]
    assert hostile["name"] == HOSTILE_NAME  # names starting with text are kept as is
    assert rep._cell("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert rep._cell("-2+3") == "'-2+3"
    assert rep._cell(-2) == -2


def test_json_and_text(report: rep.Report) -> None:
    doc = json.loads(render(report, "json"))
    assert doc["summary"]["missing"] == 3
    assert len(doc["items"]) == 10
    assert {i["file_check"] for i in doc["items"]} == {"match", "mismatch", "gone", None}
    assert doc["buckets"][0]["start"] == format_ts(T0)
    text = render(report, "text")
    assert "MISSING (3)" in text
    assert "DELIVERED FILES THAT NO LONGER MATCH (1)" in text
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f]", text)


def test_empty_logs_still_make_a_report(tmp_path: Path) -> None:
    from audit_scenario import Builder  # noqa: PLC0415

    outside, inside = Builder(tmp_path).write()
    r = rep.build(reconcile(outside, inside, now_us=T0 + S))
    assert r.buckets == []
    assert "no items" in render(r, "html")
    assert "accepted outside               0" in render(r, "text")


def test_cli_writes_every_format(
    tmp_path: Path, scn: Standard, capsys: pytest.CaptureFixture[str]
) -> None:
    _, in_cfg = configs(tmp_path, scn)
    out = tmp_path / "report"
    argv = ["report", "-c", str(in_cfg), "--now", format_ts(scn.now), "--format", "all"]
    assert audit_cli.run([*argv, "-o", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "audit-report.csv",
        "audit-report.html",
        "audit-report.json",
        "audit-report.txt",
    ]
    doc = json.loads((out / "audit-report.json").read_text())
    assert [log["verified"] for log in doc["logs"]] == [True, True]
    capsys.readouterr()
    assert audit_cli.run(["report", "-c", str(in_cfg), "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("item,state,reason,")
    assert audit_cli.run(["report", "-c", str(in_cfg), "--format", "all"]) == 2  # no -o
    html_path = tmp_path / "r.html"
    assert (
        audit_cli.run(
            [
                "report",
                "-c",
                str(in_cfg),
                "--format",
                "html",
                "-o",
                str(html_path),
                "--no-check-files",
            ]
        )
        == 0
    )
    assert "files changed" in html_path.read_text()


def test_cli_refuses_a_tampered_log(
    tmp_path: Path, scn: Standard, capsys: pytest.CaptureFixture[str]
) -> None:
    _, in_cfg = configs(tmp_path, scn)
    seg = tmp_path / "inside" / "audit" / "audit-000001.jsonl"
    lines = seg.read_bytes().splitlines(keepends=True)
    del lines[5]  # a deleted record
    seg.write_bytes(b"".join(lines))
    assert audit_cli.run(["report", "-c", str(in_cfg)]) == 12
    assert "failed verification" in capsys.readouterr().err

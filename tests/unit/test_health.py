"""``ferry health``'s judgement (pure) and its readers (real files, real file systems)."""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ferry.health import (
    Limits,
    Space,
    State,
    assess,
    measure,
    pid_alive,
    worst,
)
from ferry.status import MAX_STATUS_BYTES, Observed, observe_status, read_status

NOW = 1_800_000_000.0
GIB = 1024**3
DEFAULT = Limits()


def status(role: str = "inside", **changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "role": role,
        "pid": 4242,
        "written_at": NOW - 0.3,
        "started_at": NOW - 3600,
        "audit_problem": None,
    }
    if role == "inside":
        base |= {
            "link_state": "UP",
            "last_heartbeat_age": 0.4,
            "link_params_mismatch": False,
            "link_clock_skew": False,
            "delivered": 12,
        }
    else:
        base |= {"backlog_items": 3, "backlog_bytes": 4096, "intake_paused": False}
    base |= changes
    return base


def roomy(*uses: str) -> Space:
    return Space(uses or ("state",), "/srv/ferry/state", 50 * GIB, 100 * GIB, 900, 1000)


def judge(
    data: dict[str, Any] | None = None,
    *,
    role: str = "inside",
    spaces: tuple[Space, ...] | None = None,
    alive: bool = True,
    limits: Limits = DEFAULT,
    error: str | None = None,
):
    seen = Observed("/srv/ferry/state/status.json", data, NOW - 0.3, error)
    return assess(
        role,
        seen,
        (roomy(),) if spaces is None else spaces,
        limits,
        now=NOW,
        alive=lambda pid: alive and pid == 4242,
    )


def by_name(report) -> dict[str, Any]:
    return {c.name: c for c in report.checks}


def test_a_running_agent_with_its_link_up_is_ok() -> None:
    report = judge(status())
    assert report.state is State.OK
    assert report.exit_code == 0
    assert [c.name for c in report.checks] == ["agent", "audit", "link", "disk state"]
    assert "up 60 min" in by_name(report)["agent"].message
    assert report.summary() == "FERRY INSIDE OK: running, link and disks fine"


def test_outside_reports_its_backlog_and_warns_while_intake_is_paused() -> None:
    ok = judge(status("outside", busy_items=100_000), role="outside")
    assert ok.state is State.OK
    assert by_name(ok)["backlog"].message == (
        "3 items waiting, 4.0 KiB queued in all, BUSY at 100000"
    )
    paused = judge(status("outside", intake_paused=True, backlog_items=100_001), role="outside")
    assert paused.state is State.WARNING
    assert paused.exit_code == 1
    assert "folder intake paused, the API answers BUSY" in paused.summary()
    assert "link" not in by_name(paused)


@pytest.mark.parametrize(
    ("link", "state", "words"),
    [
        ("UP", State.OK, "UP (last heartbeat 0.4 s ago)"),
        ("DEGRADED", State.WARNING, "DEGRADED: heartbeats late"),
        ("DOWN", State.CRITICAL, "DOWN: nothing heard from the outside"),
        ("SIDEWAYS", State.UNKNOWN, "'SIDEWAYS' is not one ferry writes"),
        (None, State.UNKNOWN, "None is not one ferry writes"),
    ],
)
def test_the_inside_link_state_decides(link: str | None, state: State, words: str) -> None:
    report = judge(status(link_state=link))
    assert report.state is state
    assert words in by_name(report)["link"].message


def test_a_link_that_never_came_up_says_so() -> None:
    report = judge(status(link_state="DOWN", last_heartbeat_age=None))
    assert "(no heartbeat yet)" in report.summary()


def test_mismatched_link_parameters_and_a_skewed_clock_are_warnings() -> None:
    report = judge(status(link_params_mismatch=True, link_clock_skew=True))
    assert report.state is State.WARNING
    assert by_name(report)["link params"].state is State.WARNING
    assert by_name(report)["clock"].state is State.WARNING


def test_an_audit_log_that_cannot_be_written_is_critical() -> None:
    why = "audit log unavailable since 2026-11-22T09:00:00Z: ENOSPC (No space left on device)"
    report = judge(status(audit_problem=why))
    assert report.state is State.CRITICAL
    assert report.summary().endswith(f"transfers stopped (fail closed): {why}")
    older = judge({k: v for k, v in status().items() if k != "audit_problem"})
    assert by_name(older)["audit"].state is State.UNKNOWN


def test_an_inside_mirror_that_contradicts_the_outside_log_is_critical() -> None:
    ok = judge(status(audit_mirror_problem=None))
    assert ok.state is State.OK
    assert by_name(ok)["audit mirror"].message == ("the outside's log and the copy held here agree")
    why = "piece audit-000001.jsonl@0 differs from the bytes already mirrored"
    report = judge(status(audit_mirror_problem=why))
    assert report.state is State.CRITICAL
    message = by_name(report)["audit mirror"].message
    assert message.startswith("the outside's audit log contradicts the copy held here")
    assert message.endswith(why)
    assert "audit mirror" not in by_name(judge(status()))  # no mirror: no such check


def test_a_missing_status_file_means_not_running() -> None:
    report = judge(None, error="missing")
    assert report.state is State.CRITICAL
    assert "no status file (/srv/ferry/state/status.json)" in report.summary()
    # with no agent, only the file systems are judged
    assert [c.name for c in report.checks] == ["agent", "disk state"]


def test_a_gone_process_and_a_stale_status_are_critical() -> None:
    gone = judge(status(), alive=False)
    assert gone.state is State.CRITICAL
    assert "process 4242 is gone" in gone.summary()
    stale = judge(status(written_at=NOW - 30))
    assert stale.state is State.CRITICAL
    assert "status last written 30.0 s ago" in stale.summary()
    assert judge(status(written_at=NOW - 30), limits=Limits(max_age=60)).state is State.OK


def test_the_file_time_stands_in_for_an_agent_that_does_not_write_the_time() -> None:
    data = {k: v for k, v in status().items() if k != "written_at"}
    assert judge(data).state is State.OK  # mtime NOW - 0.3
    seen = Observed("s.json", data, NOW - 100)
    late = assess("inside", seen, (), Limits(), now=NOW, alive=lambda _: True)
    assert late.state is State.CRITICAL


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (status(role="outside"), "is not the inside agent's (role 'outside')"),
        (status(pid="4242"), "lacks pid or written_at"),
        (status(pid=True), "lacks pid or written_at"),
        ({"role": "inside"}, "lacks pid or written_at"),
    ],
)
def test_a_status_file_that_is_not_this_agents_is_unknown(data: dict[str, Any], words: str) -> None:
    report = judge(data)
    assert report.state is State.UNKNOWN
    assert report.exit_code == 3
    assert words in report.summary()


def test_odd_values_in_the_status_are_not_taken_as_numbers() -> None:
    report = judge(status(written_at=math.nan, last_heartbeat_age="soon"))
    assert report.state is State.OK  # the file time stands in; the age is not shown
    assert by_name(report)["link"].message == "UP (no heartbeat yet)"


@pytest.mark.parametrize(
    ("free", "inodes", "state"),
    [
        (50 * GIB, 900, State.OK),
        (9 * GIB, 900, State.WARNING),
        (4 * GIB, 900, State.CRITICAL),
        (50 * GIB, 90, State.WARNING),  # inodes run out first with many small files
        (50 * GIB, 10, State.CRITICAL),
    ],
)
def test_free_space_and_inodes_below_the_limits(free: int, inodes: int, state: State) -> None:
    space = Space(("state", "deliver/messages"), "/srv/ferry/state", free, 100 * GIB, inodes, 1000)
    report = judge(status(), spaces=(space,))
    assert report.state is state
    check = by_name(report)["disk state"]
    assert check.message.startswith("/srv/ferry/state (state, deliver/messages): ")


def test_a_file_system_without_an_inode_count_is_judged_by_space_alone() -> None:
    space = Space(("state",), "/srv", 50 * GIB, 100 * GIB, 0, 0)
    report = judge(status(), spaces=(space,))
    assert report.state is State.OK
    assert "inodes" not in by_name(report)["disk state"].message


def test_the_limits_are_the_operators() -> None:
    space = Space(("state",), "/srv", 30 * GIB, 100 * GIB, 900, 1000)
    assert judge(status(), spaces=(space,)).state is State.OK
    tight = Limits(warn_free=40, crit_free=20)
    assert judge(status(), spaces=(space,), limits=tight).state is State.WARNING


def test_a_folder_that_cannot_be_examined_is_critical() -> None:
    space = Space(("deliver/documents",), "/srv/ferry/deliver/documents", error="No such file")
    report = judge(status(), spaces=(roomy(), space))
    assert report.state is State.CRITICAL
    assert "deliver/documents): No such file" in report.summary()


def test_the_worst_state_wins_and_critical_outranks_unknown() -> None:
    assert worst([]) is State.OK
    assert worst([State.OK, State.WARNING]) is State.WARNING
    assert worst([State.WARNING, State.UNKNOWN]) is State.UNKNOWN
    assert worst([State.UNKNOWN, State.CRITICAL, State.OK]) is State.CRITICAL


def test_the_summary_names_every_check_at_the_worst_state() -> None:
    full = Space(("audit",), "/audit", 1, 100 * GIB, 900, 1000)
    report = judge(status(link_state="DOWN"), spaces=(roomy(), full))
    assert report.state is State.CRITICAL
    assert "DOWN" in report.summary()
    assert "/audit (audit): 1 B free" in report.summary()


def test_json_carries_the_checks_and_the_status() -> None:
    report = judge(status(link_state="DEGRADED"))
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["state"] == "WARNING"
    assert doc["exit_code"] == 1
    assert {"name": "link", "state": "WARNING"}.items() <= doc["checks"][2].items()
    assert doc["file_systems"][0]["free_bytes"] == 50 * GIB
    assert doc["status"]["delivered"] == 12


SAMPLE = re.compile(r'^([a-z_]+)\{((?:[a-z_]+="(?:[^"\\]|\\.)*",?)*)\} (-?[0-9.e+]+)$')


def test_prometheus_exposition_is_well_formed_and_escapes_labels() -> None:
    odd = Space(('st"ate',), '/srv/a"b\\c\nd', 50 * GIB, 100 * GIB, 900, 1000)
    data = status(link_state="DOWN", weird=math.inf, flag=True, name="x", **{"bad-key": 1})
    text = judge(data, spaces=(odd,)).prometheus()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ ", line), line
            continue
        m = SAMPLE.match(line)
        assert m, line
        samples[(m.group(1), m.group(2))] = float(m.group(3))
    assert samples[("ferry_health", 'role="inside"')] == 2
    assert samples[("ferry_health_check", 'role="inside",check="link"')] == 2
    assert samples[("ferry_status_delivered", 'role="inside"')] == 12
    names = {name for name, _ in samples}
    assert not {"ferry_status_weird", "ferry_status_flag", "ferry_status_name"} & names
    assert not any("bad" in n for n in names)
    assert 'path="/srv/a\\"b\\\\c\\nd"' in text


def test_read_status_takes_a_real_file(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    path.write_text(json.dumps(status()))
    seen = observe_status(path)
    assert seen.error is None
    assert seen.data == status()
    assert seen.mtime == pytest.approx(path.stat().st_mtime)
    assert read_status(path) == status()  # what the demo reads


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b" " * (MAX_STATUS_BYTES + 1), "larger than 1 MiB"),
    ],
)
def test_read_status_refuses_what_is_not_a_status_file(
    tmp_path: Path, content: bytes, words: str
) -> None:
    path = tmp_path / "status.json"
    path.write_bytes(content)
    seen = observe_status(path)
    assert seen.data is None
    assert seen.error is not None
    assert words in seen.error
    assert judge(None, error=seen.error).state is State.UNKNOWN


def test_read_status_does_not_follow_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.json"
    real.write_text(json.dumps(status()))
    (tmp_path / "status.json").symlink_to(real)
    seen = observe_status(tmp_path / "status.json")
    assert seen.data is None
    assert seen.error is not None
    assert seen.error.startswith("unreadable")
    assert observe_status(tmp_path / "absent.json").error == "missing"
    assert read_status(tmp_path / "absent.json") is None


def test_measure_names_each_file_system_once(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    spaces = measure(
        [
            ("state", tmp_path / "a"),
            ("audit", tmp_path / "b"),
            ("shm", Path("/dev/shm")),
            ("deliver/x", tmp_path / "missing"),
        ]
    )
    assert [s.uses for s in spaces] == [("state", "audit"), ("shm",), ("deliver/x",)]
    here = os.statvfs(tmp_path)
    assert spaces[0].total_bytes == here.f_blocks * here.f_frsize
    assert 0 < spaces[0].free_bytes <= spaces[0].total_bytes
    assert spaces[2].error is not None
    assert spaces[2].path.endswith("missing")


def test_pid_alive_sees_real_processes() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(0)
    assert not pid_alive(-1)
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    assert not pid_alive(child)


def test_a_folder_that_does_not_answer_is_reported_without_holding_up_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(The real thing, a share whose server stopped, is in test_share_drop.py.)"""
    hung = tmp_path / "share"
    hung.mkdir()
    release = threading.Event()
    real = os.statvfs

    def statvfs(path: Any) -> os.statvfs_result:
        if Path(path) == hung:
            release.wait(10)
        return real(path)

    monkeypatch.setattr(os, "statvfs", statvfs)
    started = time.monotonic()
    try:
        spaces = measure([("state", tmp_path), ("drop/documents", hung)], timeout=0.3)
    finally:
        release.set()
    assert time.monotonic() - started < 2
    ok, stuck = spaces
    assert ok.uses == ("state",)
    assert ok.error is None
    assert stuck.uses == ("drop/documents",)
    assert stuck.error == "not answering after 0.3 s"
    check = by_name(judge(status("outside"), role="outside", spaces=spaces))
    assert check["disk drop/documents"].state is State.CRITICAL


@pytest.mark.parametrize(
    ("stalled", "state", "words"),
    [
        ({}, State.OK, "taking files"),
        ({"documents": 12.5}, State.OK, "waiting on a folder: documents (12.5 s)"),
        ({"documents": 75.0, "archive": 6.0}, State.CRITICAL, "channel documents (75.0 s)"),
        ({"documents": float("nan")}, State.OK, "taking files"),
        ({"documents": True}, State.OK, "taking files"),
        (["documents"], State.UNKNOWN, "not a map"),
    ],
)
def test_a_channel_whose_intake_does_not_move_is_critical(
    stalled: Any, state: State, words: str
) -> None:
    report = judge(status("outside", intake_stalled=stalled), role="outside")
    check = by_name(report)["intake"]
    assert check.state is state
    assert words in check.message
    if state is State.CRITICAL:
        assert "archive" not in check.message  # below the limit: not named
        assert report.state is State.CRITICAL


@pytest.mark.parametrize(
    ("held", "state", "words"),
    [
        ({}, State.OK, "delivering"),
        ({"documents": 8.0}, State.OK, "waiting on a folder: documents (8.0 s)"),
        ({"documents": 61.0, "archive": 6.0}, State.CRITICAL, "channel documents (61.0 s)"),
        ({"documents": "61"}, State.OK, "delivering"),
    ],
)
def test_an_inside_channel_whose_file_delivery_does_not_move_is_critical(
    held: Any, state: State, words: str
) -> None:
    report = judge(status("inside", link_state="UP", delivery_held=held), role="inside")
    check = by_name(report)["delivery"]
    assert check.state is state, check
    assert words in check.message, check.message
    if state is State.CRITICAL:
        assert "archive" not in check.message
        assert "tried again" in check.message
        assert report.state is State.CRITICAL


def test_an_older_insides_list_of_held_channels_is_not_judged() -> None:
    report = judge(status("inside", link_state="UP", delivery_held=["documents"]), role="inside")
    assert "delivery" not in by_name(report)


def test_the_stall_limit_is_the_operators() -> None:
    data = status("outside", intake_stalled={"documents": 75.0})
    relaxed = by_name(judge(data, role="outside", limits=Limits(max_stall=300)))
    assert relaxed["intake"].state is State.OK


def test_an_older_outside_without_the_field_has_no_intake_check() -> None:
    assert "intake" not in by_name(judge(status("outside"), role="outside"))

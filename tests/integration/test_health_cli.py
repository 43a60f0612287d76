"""``ferry health`` against real agents: a link that comes up and goes down, a stopped and a
frozen process, a full audit disk (a real tmpfs, CI runs as root), and its output formats."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import application, edit_yaml, fast, ferry, fill_disk, init

from ferry.client import ApiUnavailable, Client

pytestmark = pytest.mark.integration


def health(config: str, *extra: str) -> tuple[int, str]:
    out = ferry("health", "-c", config, *extra, check=False)
    return out.returncode, out.stdout


def checks(config: str, *extra: str) -> tuple[int, dict[str, dict[str, Any]]]:
    rc, out = health(config, "--json", *extra)
    doc = json.loads(out)
    assert doc["exit_code"] == rc
    return rc, {c["name"]: c for c in doc["checks"]}


def until(config: str, code: int, *extra: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    rc, out = health(config, *extra)
    while rc != code and time.monotonic() < deadline:
        time.sleep(0.2)
        rc, out = health(config, *extra)
    assert rc == code, out
    return out


def until_check(
    config: str, name: str, state: str, *extra: str, timeout: float = 30.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    _, found = checks(config, *extra)
    while found.get(name, {}).get("state") != state and time.monotonic() < deadline:
        time.sleep(0.2)
        _, found = checks(config, *extra)
    assert found[name]["state"] == state, found
    return found


def deploy(tmp_path: Path) -> dict[str, Any]:
    dep = init(tmp_path / "d")

    def ins(data: dict[str, Any]) -> None:
        data["inside"]["degraded_after"] = 1.5
        data["inside"]["down_after"] = 3.0

    edit_yaml(dep["outside"]["config"], fast)
    edit_yaml(dep["inside"]["config"], ins)
    return dep


@pytest.mark.slow  # (5-20 s: run with `python3 tasks.py test --slow`)
def test_health_follows_the_agents_and_the_link(tmp_path: Path, agents) -> None:
    dep = deploy(tmp_path)
    o, i = dep["outside"]["config"], dep["inside"]["config"]
    rc, out = health(i)
    assert rc == 2
    assert out.startswith("FERRY INSIDE CRITICAL: not running: no status file")
    inside = agents("inside", i)
    inside.wait_event("inside_started")
    out = until(i, 2)
    assert "DOWN: nothing heard from the outside (no heartbeat yet)" in out.splitlines()[0]
    outside = agents("outside", o)
    outside.wait_event("api_listening")
    out = until(i, 0)
    assert out.startswith("FERRY INSIDE OK: running, link and disks fine")
    rc, found = checks(o)
    assert rc == 0
    assert found["agent"]["message"].startswith(f"running (process {outside.proc.pid}, up ")
    assert found["backlog"]["state"] == "OK"
    assert found["audit"]["message"] == "audit log writable"

    prom = tmp_path / "textfile" / "ferry_inside.prom"
    prom.parent.mkdir()
    rc, printed = health(i, "--format", "prometheus", "-o", str(prom))
    assert rc == 0
    assert printed == ""
    text = prom.read_text()
    assert 'ferry_health{role="inside"} 0\n' in text
    assert 'ferry_health_check{role="inside",check="link"} 0\n' in text
    assert [p.name for p in prom.parent.iterdir()] == ["ferry_inside.prom"]  # no temp left
    rc, printed = health(i, "--format", "prometheus", "-o", str(tmp_path / "no" / "x.prom"))
    assert rc == 3
    assert printed.startswith("FERRY UNKNOWN: cannot write ")

    assert outside.stop() == 0
    rc, found = checks(o)
    assert rc == 2
    assert f"process {outside.proc.pid} is gone" in found["agent"]["message"]
    assert "backlog" not in found  # nothing is judged from a dead agent's last words
    out = until(i, 1)  # no heartbeat: DEGRADED after 1.5 s ...
    assert "DEGRADED: heartbeats late (last heartbeat" in out
    out = until(i, 2)  # ... DOWN after 3 s
    assert "DOWN: nothing heard from the outside (last heartbeat" in out


@pytest.mark.slow  # (5-10 s: run with `python3 tasks.py test --slow`)
def test_a_frozen_agent_is_reported_stuck(tmp_path: Path, agents) -> None:
    dep = deploy(tmp_path)
    inside = agents("inside", dep["inside"]["config"])
    inside.wait_event("inside_started")
    i = dep["inside"]["config"]
    until(i, 2)  # running, link DOWN (no outside)
    os.kill(inside.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(1.5)
        rc, found = checks(i)
        assert rc == 2
        rc, out = health(i, "--max-age", "1")
        assert rc == 2
        assert "stuck or stopped: status last written" in out
        assert "limit 1 s" in out
        assert f"(process {inside.proc.pid};" in out
    finally:
        os.kill(inside.proc.pid, signal.SIGCONT)
    until(i, 2)
    rc, found = checks(i)
    assert found["agent"]["state"] == "OK"
    assert found["link"]["state"] == "CRITICAL"


@pytest.mark.slow  # (5-10 s: run with `python3 tasks.py test --slow`)
def test_a_full_audit_disk_is_critical_until_space_is_freed(
    tmp_path: Path, agents, small_audit_disk
) -> None:
    dep = deploy(tmp_path)
    o = dep["outside"]
    audit_dir = small_audit_disk(o["audit_dir"])
    agents("inside", dep["inside"]["config"]).wait_event("inside_started")
    outside = agents("outside", o["config"])
    outside.wait_event("api_listening")
    until(o["config"], 0)
    filler = fill_disk(audit_dir)  # (the log's own files are untouched)
    with Client.from_config(dep["api"]["client_config"]) as client:
        for n in range(200):  # the last page of the log's file still takes a few records
            try:
                client.submit(
                    "messages",
                    application(n),
                    schema="citizen-application",
                    submission_id=f"h-{n}",
                    timeout=3,
                )
            except ApiUnavailable:
                break
        else:
            pytest.fail("submissions were still acknowledged with the audit disk full")
    found = until_check(o["config"], "audit", "CRITICAL")
    assert found["audit"]["message"].startswith("transfers stopped (fail closed): audit log")
    assert "ENOSPC" in found["audit"]["message"]
    disk = found["disk audit"]
    assert disk["state"] == "CRITICAL"
    assert "(audit): 0 B free (0.0 %)" in disk["message"]
    assert found["agent"]["state"] == "OK"  # the status is still written during the outage
    filler.unlink()
    out = until(o["config"], 0)
    assert out.startswith("FERRY OUTSIDE OK")


def test_a_config_that_cannot_be_read_is_unknown(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("role: inside\nstate_dir: [\n")
    rc, out = health(str(bad))
    assert rc == 3
    assert out.startswith("FERRY UNKNOWN: ")
    assert "broken.yaml" in out
    dep = deploy(tmp_path)
    rc = ferry(
        "health",
        "-c",
        dep["inside"]["config"],
        "--warning-free",
        "3",
        "--critical-free",
        "5",
        check=False,
    ).returncode
    assert rc == 3

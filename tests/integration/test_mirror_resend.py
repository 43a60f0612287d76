"""`ferry outside mirror status | resend`: with a real outside agent, a resend request made
from the command line is taken by the running agent, recorded as `audit.resend`, and the log
is shipped again from that place; a bad place is refused by the command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import Agent, ferry, init
from test_audit_agents import records, wait_for

from ferry.config import load_outside_config
from ferry.errors import UsageError
from outside.mirror import RESEND_FILE

pytestmark = pytest.mark.integration


def _mirror(dep: dict[str, Any], *args: str, check: bool = True) -> Any:
    return ferry("outside", "mirror", *args, "-c", dep["outside"]["config"], check=check)


def test_resend_from_the_command_line_reaches_the_running_agent(tmp_path: Path) -> None:
    dep = init(tmp_path / "d")
    state = load_outside_config(Path(dep["outside"]["config"])).state_dir
    bad = _mirror(dep, "resend", "--from", "../audit-000001.jsonl@0", check=False)
    assert bad.returncode == UsageError.exit_code
    assert "FILE@OFFSET" in bad.stderr
    agent = Agent("outside", dep["outside"]["config"], tmp_path / "outside.log")
    try:

        def shipped() -> dict[str, Any]:
            out = json.loads(_mirror(dep, "status", "--json").stdout)
            return {r["file"]: r for r in out["files"]}

        wait_for(
            lambda: (f := shipped().get("audit-000001.jsonl")) and f["shipped"] > 0,
            what="the first pieces of the audit log shipped",
        )
        done = json.loads(_mirror(dep, "resend", "--json").stdout)
        assert done["from"] == "audit-000001.jsonl@0"
        wait_for(lambda: not (state / RESEND_FILE).exists(), what="the agent to take it")
        wait_for(
            lambda: any(r["event"] == "audit.resend" for r in records(dep["outside"]["audit_dir"])),
            what="the audit.resend record",
        )
        assert json.loads(_mirror(dep, "status", "--json").stdout)["resend_pending"] is None
    finally:
        assert agent.stop() == 0
    [rec] = [r for r in records(dep["outside"]["audit_dir"]) if r["event"] == "audit.resend"]
    assert rec["result"] == "success"
    assert rec["object"]["name"] == "audit-000001.jsonl@0"
    text = _mirror(dep, "status").stdout
    assert "audit-000001.jsonl" in text
    assert "checkpoints.log" in text

"""`ferry outside mirror status | resend`: with a real outside agent, a resend request made
from the command line is taken by the running agent, recorded as `audit.resend`, and the log
is shipped again from that place; a bad place is refused by the command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_helpers import Agent, ferry, init
from test_audit_agents import records, wait_for

from ferry.config import load_outside_config
from ferry.errors import UsageError
from outside.mirror import RESEND_FILE

pytestmark = pytest.mark.integration


def _mirror(dep: dict[str, Any], *args: str, check: bool = True) -> Any:
    return ferry("outside", "mirror", *args, "-c", dep["outside"]["config"], check=check)


@pytest.mark.slow  # (5-20 s: run with `python3 tasks.py test --slow`)
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


@pytest.mark.slow  # (5-20 s: run with `python3 tasks.py test --slow`)
def test_inside_mirror_status_says_where_to_resend_from(tmp_path: Path) -> None:
    dep = init(tmp_path / "d")
    inside = dep["inside"]["config"]

    def status() -> Any:
        return json.loads(ferry("inside", "mirror", "status", "-c", inside, "--json").stdout)

    assert status()["resend_from"] == "audit-000001.jsonl@0"  # nothing mirrored yet
    mirror = Path(status()["mirror_dir"])
    mirror.mkdir(parents=True, exist_ok=True)
    (mirror / "audit-000001.jsonl").write_bytes(b"x" * 299 + b"\n")
    (mirror / "checkpoints.log").write_bytes(b"z" * 10)
    assert status()["resend_from"] == "audit-000001.jsonl@300"  # where the copy ends
    # a second segment whose opening record does not name the first one's size: the first
    # is not known to be whole, so the resend starts where it ends
    # (tests/unit/test_audit_mirror.py follows real segments past a gap)
    (mirror / "audit-000002.jsonl").write_bytes(b'{"not": "an opening record"}\n')
    out = status()
    assert out["resend_from"] == "audit-000001.jsonl@300"
    assert [(f["file"], f["size"]) for f in out["files"]] == [
        ("audit-000001.jsonl", 300), ("audit-000002.jsonl", 29), ("checkpoints.log", 10),
    ]  # fmt: skip
    text = ferry("inside", "mirror", "status", "-c", inside).stdout
    assert "ferry outside mirror resend -c outside.yaml --from audit-000001.jsonl@300" in text
    # an inside without a mirror says so
    doc = yaml.safe_load(Path(inside).read_text())
    doc["audit"].pop("mirror_dir", None)
    doc["audit"].pop("peer_public_key", None)
    Path(inside).write_text(yaml.safe_dump(doc))
    refused = ferry("inside", "mirror", "status", "-c", inside, check=False)
    assert refused.returncode == UsageError.exit_code
    assert "keeps no mirror" in refused.stderr

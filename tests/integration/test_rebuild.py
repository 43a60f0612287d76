"""docs/OPERATIONS.md, "Backups, and rebuilding an agent", followed step by step with real
agents.

The outside's disk is lost; it is rebuilt from its backed-up keys and config with an empty
state and audit folder. Items flow again at once. The inside's copy of the outside's audit
log now contradicts the new log, as it would after tampering: `ferry health` says so
(CRITICAL). The documented steps set that copy aside (it still verifies on its own: the
record of everything the lost outside did) and have the outside ship its new log from the
start; the inside's health is OK again.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import drop_file, edit_yaml, fast_bulk, ferry, init, opaque, wait_files
from test_audit_agents import wait_for
from test_health_cli import until, until_check

pytestmark = pytest.mark.integration


@pytest.mark.slow  # (10-40 s: run with `python3 tasks.py test --slow`)
def test_an_outside_rebuilt_after_losing_its_disk(tmp_path: Path, agents: Any) -> None:
    dep = init(tmp_path / "d")
    edit_yaml(dep["outside"]["config"], fast_bulk)
    edit_yaml(dep["inside"]["config"], opaque)
    docs = dep["channels"]["documents"]
    inside_cfg, outside_cfg = dep["inside"]["config"], dep["outside"]["config"]
    mirror = Path(dep["inside"]["audit_mirror_dir"])
    inside = agents("inside", inside_cfg)
    outside = agents("outside", outside_cfg)
    before = {f"before-{i}.txt": os.urandom(300) for i in range(3)}
    for name, data in before.items():
        drop_file(docs["drop"], name, data)
    wait_files(docs["deliver"], set(before))
    until_check(inside_cfg, "audit mirror", "OK")
    keys = ["--outside-key", dep["inside"]["outside_audit_public_key"]]
    keys += ["--inside-key", dep["inside"]["audit_public_key"]]
    inside_log = ("--inside", dep["inside"]["audit_dir"])

    def reconcile(outside_log: Path) -> tuple[int, str]:
        out = ferry("audit", "reconcile", "--outside", str(outside_log), *inside_log, *keys,
                    "--grace", "0", "--include-unsigned", check=False)  # fmt: skip
        return out.returncode, out.stdout + out.stderr

    def wait_mirrored(items: int) -> None:
        """Until the mirror holds the acceptance records (pieces ship every second)."""
        text = f"items accepted outside: {items} "
        wait_for(lambda: text in reconcile(mirror)[1], what=f"{items} items in the mirror")

    wait_mirrored(3)

    # the disk is lost: keys and config come back from the backup, nothing else
    assert outside.stop() == 0
    for folder in (dep["outside"]["state_dir"], dep["outside"]["audit_dir"]):
        shutil.rmtree(folder)
        os.mkdir(folder)
    agents("outside", outside_cfg)
    after = {f"after-{i}.txt": os.urandom(300) for i in range(3)}
    for name, data in after.items():
        drop_file(docs["drop"], name, data)
    wait_files(docs["deliver"], set(after))  # transfers do not wait for the auditors

    found = until_check(inside_cfg, "audit mirror", "CRITICAL")
    assert "contradicts the copy held here" in found["audit mirror"]["message"]
    until(inside_cfg, 2)  # the whole check is CRITICAL

    # the documented steps: the copy set aside, the outside's new log shipped from the start
    assert inside.stop() == 0
    kept = mirror.with_name(mirror.name + ".before-rebuild")
    mirror.rename(kept)
    agents("inside", inside_cfg).wait_event("link_state", state="UP")  # else the resend is lost
    out = ferry("outside", "mirror", "resend", "-c", outside_cfg, "--from", "audit-000001.jsonl@0")
    assert "resend requested" in out.stdout
    wait_mirrored(3)  # the new outside's three, its log shipped again from the start
    until(inside_cfg, 0, timeout=60)  # every check OK, the audit mirror's too
    until_check(inside_cfg, "audit mirror", "OK")

    key = dep["inside"]["outside_audit_public_key"]
    old = ferry("audit", "verify", str(kept), "--key", key, check=False)
    assert old.returncode == 0, old.stdout + old.stderr  # the lost outside's record, intact
    new = ferry("audit", "verify", str(mirror), "--key", key, check=False)
    assert new.returncode == 0, new.stdout + new.stderr
    assert sorted(os.listdir(docs["deliver"])) == sorted({**before, **after})  # each once
    # the copy set aside accounts for what the lost outside accepted, the new one for the rest
    for copy in (kept, mirror):
        code, text = reconcile(copy)
        assert "items accepted outside: 3   delivered 3 " in text  # each outside's, delivered
        if copy == kept:  # and it says it is an old log: the new log's items are not its own
            assert code == 11, text
            assert text.count("OUTSIDE_LOG_SUPERSEDED") == 1, text
            assert "DISCREPANCIES (1)" in text, text
        else:
            assert code == 0, text


@pytest.mark.slow  # (5-20 s: run with `python3 tasks.py test --slow`)
def test_an_inside_rebuilt_after_losing_its_disk(tmp_path: Path, agents: Any) -> None:
    """The inside's disk is lost: keys and config restored, empty folders. The link comes
    back at the outside's next announcement, items flow, and the outside's log shipped again
    from the start makes the new mirror whole (docs/OPERATIONS.md, the inside's disk)."""
    dep = init(tmp_path / "d")
    edit_yaml(dep["outside"]["config"], fast_bulk)
    edit_yaml(dep["inside"]["config"], opaque)
    docs = dep["channels"]["documents"]
    inside_cfg, outside_cfg = dep["inside"]["config"], dep["outside"]["config"]
    inside = agents("inside", inside_cfg)
    agents("outside", outside_cfg)
    before = {f"before-{i}.txt": os.urandom(300) for i in range(3)}
    for name, data in before.items():
        drop_file(docs["drop"], name, data)
    wait_files(docs["deliver"], set(before))

    assert inside.stop() == 0
    lost = [
        dep["inside"]["state_dir"],
        dep["inside"]["audit_dir"],
        dep["inside"]["audit_mirror_dir"],
        docs["deliver"],
    ]
    for folder in lost:
        shutil.rmtree(folder)
        os.mkdir(folder)
    # (what is sent before the new inside listens is lost: one way, nothing tells the outside)
    agents("inside", inside_cfg).wait_event("link_state", state="UP")
    after = {f"after-{i}.txt": os.urandom(300) for i in range(3)}
    for name, data in after.items():
        drop_file(docs["drop"], name, data)
    assert wait_files(docs["deliver"], set(after)) == after

    out = ferry("outside", "mirror", "resend", "-c", outside_cfg, "--from", "audit-000001.jsonl@0")
    assert "resend requested" in out.stdout

    def whole() -> Any:  # the new mirror holds the outside's whole log again
        rec = ferry("audit", "reconcile", "-c", inside_cfg, "--grace", "0", "--json",
                    "--include-unsigned", check=False)  # fmt: skip
        # (the running agents' last minute is not signed yet: counted all the same here)
        report = json.loads(rec.stdout) if rec.stdout.startswith("{") else {}
        return (rec, report) if report.get("accepted") == 6 else None

    rec, report = wait_for(whole, what="the outside's 6 items in the new mirror")
    # what was delivered before the loss has lost its delivery records with the inside's log:
    # reconcile says missing (exit 10), and that it was sent and a later item arrived
    assert rec.returncode == 10
    assert sorted(m["name"] for m in report["missing"]) == sorted(before)
    assert all("never received inside" in " ".join(m["evidence"]) for m in report["missing"])
    assert report["counts"]["delivered"] == 3
    until(inside_cfg, 0)

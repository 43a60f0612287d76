"""Rotating both agents' audit keys, with real agents over UDP loopback (docs/OPERATIONS.md,
"Rotating the audit keys").

1. Both sides get a new audit key; each lists its old one under ``audit.previous_keys`` (its
   checkpoints are signed by both keys: the handover), and the inside takes the outside's new
   public key with the old one under ``audit.previous_peer_public_keys``.
2. The overlap ends: ``previous_keys`` go.

Throughout, files cross, the inside keeps witnessing the outside's checkpoints, each log keeps
its name, and each log (and the mirror) verifies with the current key alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cli_helpers import drop_file, edit_yaml, ferry, wait_files
from test_audit_agents import deploy, records, wait_for

from ferry.audit.verify import verify
from ferry.crypto.keys import load_public_key

pytestmark = pytest.mark.integration


def _witnessed(inside_audit: str) -> int:
    sizes = [r["detail"]["size"] for r in records(inside_audit) if r["event"] == "audit.witnessed"]
    return max(sizes, default=0)


def _phase(agents, dep: dict[str, Any], name: str) -> None:
    """Run both agents until a file has crossed and a later outside checkpoint is witnessed."""
    o, i = dep["outside"], dep["inside"]
    before = _witnessed(i["audit_dir"])
    inside = agents("inside", i["config"])
    inside.wait_event("inside_started")
    outside = agents("outside", o["config"])
    outside.wait_event("api_listening")
    drop_file(dep["channels"]["documents"]["drop"], name, f"{name}\n".encode())
    wait_files(dep["channels"]["documents"]["deliver"], {name})
    wait_for(
        lambda: _witnessed(i["audit_dir"]) > before, what=f"a new witnessed checkpoint ({name})"
    )
    assert outside.stop() == 0
    assert inside.stop() == 0


def _audit_events(directory: str, roles: tuple[str, ...]) -> list[tuple[str, str, str, Any]]:
    return [
        (r["event"], r["detail"]["role"], r["object"]["key_id"], r["detail"].get("current"))
        for r in records(directory)
        if r["event"] in {"key.activated", "key.retired"} and r["detail"]["role"] in roles
    ]


@pytest.mark.slow  # (10-40 s: run with `python3 tasks.py test --slow`)
def test_both_audit_keys_rotate_and_every_log_verifies_with_the_new_keys(
    tmp_path: Path, agents
) -> None:
    dep = deploy(tmp_path)
    o, i = dep["outside"], dep["inside"]
    _phase(agents, dep, "before.txt")
    old_out, old_in = (load_public_key(s["audit_public_key"]) for s in (o, i))
    for side in (o, i):
        keys = Path(side["config"]).parent / "keys"
        ferry("keygen", "--role", "audit", "--name", "audit-2", "--out", str(keys))

    # a new key alone is refused: the log's last checkpoint is not signed by it
    edit_yaml(o["config"], lambda d: d["audit"].update(key="keys/audit-2.key"))
    refused = agents("outside", o["config"])
    assert refused.proc.wait(timeout=60) != 0
    assert "audit.previous_keys" in refused.log.read_text()

    # the overlap
    outside_dir = Path(o["config"]).parent
    new_out_pub = str(outside_dir / "keys/audit-2.pub")
    edit_yaml(o["config"], lambda d: d["audit"].update(previous_keys=["keys/audit.key"]))

    def inside_overlap(d: dict[str, Any]) -> None:
        d["audit"].update(key="keys/audit-2.key", previous_keys=["keys/audit.key"])
        d["audit"]["previous_peer_public_keys"] = [d["audit"]["peer_public_key"]]
        d["audit"]["peer_public_key"] = new_out_pub  # (carried inside on removable media)

    edit_yaml(i["config"], inside_overlap)
    _phase(agents, dep, "overlap.txt")

    # the overlap is over on both sides; the inside keeps the outside's old public key, as
    # its mirror holds checkpoints only that key signed
    for side in (o, i):
        edit_yaml(side["config"], lambda d: d["audit"].pop("previous_keys"))
    _phase(agents, dep, "after.txt")

    assert not [r for r in records(i["audit_dir"]) if r["event"] == "audit.witness_inconsistent"]
    new_out, new_in = (
        load_public_key(str(Path(s["config"]).parent / "keys/audit-2.pub")) for s in (o, i)
    )
    for side, old_key, new_key, directory in (
        ("outside", old_out, new_out, o["audit_dir"]),
        ("inside", old_in, new_in, i["audit_dir"]),
        ("mirror", old_out, new_out, i["audit_mirror_dir"]),
    ):
        report = verify(directory, new_key)
        assert report.verified, (side, [p.to_json() for p in report.problems])
        assert [k["key_id"] for k in report.keys] == [
            new_key.key_id.hex(), old_key.key_id.hex()
        ], side  # fmt: skip
        assert report.keys[1]["trusted"].startswith("handed over at record"), side
        stale = verify(directory, old_key)  # the old key alone: the last run is not its
        assert {p.code for p in stale.problems} == {"CHECKPOINT_UNSIGNED"}, side
    for side in (o, i):  # each log kept its name (by default made from its first key)
        own = {"audit.started", "audit.checkpoint"}
        names = {r["detail"]["origin"] for r in records(side["audit_dir"]) if r["event"] in own}
        assert len(names) == 1, names
    # the auditor's command, with the keys the inside config names (current ones only)
    out = ferry("audit", "verify", "-c", i["config"], check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("earlier audit key") == 2, out.stdout  # its own log and the mirror
    assert _audit_events(o["audit_dir"], ("audit",)) == [
        ("key.activated", "audit", old_out.key_id.hex(), True),
        ("key.activated", "audit", new_out.key_id.hex(), True),
        ("key.retired", "audit", old_out.key_id.hex(), None),
    ]
    assert [e[:2] + e[3:] for e in _audit_events(i["audit_dir"], ("outside-audit",))] == [
        ("key.activated", "outside-audit", True),
        ("key.activated", "outside-audit", True),
    ]  # the old outside key stays listed (earlier) and is not retired

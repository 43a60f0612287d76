"""The people a deployment serves can read what ferry gives them, under the systemd unit's
umask (0077): a clerk reads the reason a file was refused, and where an original went; an
inner user reads the delivered document and message. The operator sets the folders up as
docs/OPERATIONS.md ("Who may read what") says: the folder group-owned by the people's group,
with the setgid bit. Both agents as subprocesses over UDP loopback; the people are real
processes of another user (nobody, with or without the group)."""

from __future__ import annotations

import grp
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import Agent, application, edit_yaml, fast, ferry, init

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (other users, groups)"),
]

GROUP = grp.getgrnam("users").gr_gid
NOBODY = 65534


def _reads(path: Path, *, in_group: bool) -> bool:
    """Can a user who is not the agent's (in the people's group, or not) read ``path``?"""
    result = subprocess.run(
        ["cat", str(path)], user=NOBODY, group=NOBODY, extra_groups=[GROUP] if in_group else [],
        capture_output=True, check=False,
    )  # fmt: skip
    return result.returncode == 0 and result.stdout == path.read_bytes()


def _wait(what: str, find: object, timeout: float = 60.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find()  # type: ignore[operator]
        if found:
            return list(found)
        time.sleep(0.1)
    raise AssertionError(f"no {what} after {timeout} s")


@pytest.fixture
def root() -> Iterator[Path]:
    """A deployment folder others may pass through (pytest's tmp_path is root's only)."""
    base = Path(tempfile.mkdtemp(dir="/var/tmp"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base)


def test_clerks_and_inner_users_read_what_ferry_gives_them(root: Path) -> None:
    dep = init(root / "d")

    def configure(data: dict[str, object]) -> None:
        fast(data)
        for ch in data["channels"]:  # type: ignore[attr-defined]
            if ch["name"] == "documents":
                ch["subfolders"] = True

    edit_yaml(dep["outside"]["config"], configure)
    edit_yaml(dep["inside"]["config"], configure)
    docs = dep["channels"]["documents"]
    folders = [Path(docs[k]) for k in ("drop", "sent", "quarantine", "deliver")]
    folders.append(Path(dep["channels"]["messages"]["deliver"]))
    for folder in folders:  # as the operator sets them up
        os.chown(folder, 0, GROUP)
        os.chmod(folder, 0o2770 if folder == Path(docs["drop"]) else 0o2750)
        for above in folder.parents:  # (others may pass through, not list)
            if above == root:
                break
            os.chmod(above, os.stat(above).st_mode | 0o011)
    logs = root / "logs"
    logs.mkdir()
    agents = [
        Agent(side, dep[side]["config"], logs / f"{side}.log", umask=0o077)
        for side in ("inside", "outside")
    ]
    try:
        agents[1].wait_event("drop_folder_watched", channel="documents")
        drop = Path(docs["drop"])
        (drop / "2026").mkdir()
        (drop / "2026" / "report.txt").write_text("application received\n")
        (drop / "tool.exe").write_bytes(b"MZ" + os.urandom(3000))
        message = root / "application.json"
        message.write_bytes(application(7))
        sent = ferry(
            "send", "-c", dep["api"]["client_config"], "--channel", "messages",
            "--schema", "citizen-application", str(message), "--json",
        )  # fmt: skip
        assert json.loads(sent.stdout)["status"] == "ACCEPTED"

        deliver = Path(docs["deliver"])
        (delivered,) = _wait("delivered file", lambda: list(deliver.glob("2026/report.txt")))
        messages = Path(dep["channels"]["messages"]["deliver"])
        (msg,) = _wait("delivered message", lambda: list(messages.glob("*.json")))
        quarantine = Path(docs["quarantine"])
        (reason,) = _wait("reason", lambda: list(quarantine.glob("tool.exe.reason.txt")))
        (moved,) = _wait("original in sent", lambda: list(Path(docs["sent"]).glob("2026/*")))
    finally:
        for agent in agents:
            agent.stop()

    # inner users in the group read the delivered document and message; others do not
    for path in (delivered, msg):
        assert _reads(path, in_group=True), oct(os.stat(path).st_mode)
        assert not _reads(path, in_group=False)
    assert os.stat(delivered.parent).st_gid == GROUP  # (the subfolder ferry made)
    # a clerk reads why a file was refused (both reason files), and finds the original
    assert _reads(reason, in_group=True), oct(os.stat(reason).st_mode)
    assert _reads(reason.with_name("tool.exe.reason.json"), in_group=True)
    assert not _reads(reason, in_group=False)
    assert _reads(moved, in_group=True)  # (the clerk's own file, in a subfolder ferry made)
    assert "application received" in delivered.read_text()

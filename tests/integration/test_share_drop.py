"""A drop folder on a network share: real agents, a real FUSE mount (bindfs) as the share.

Clerks' machines write to the file server, not through the gateway's mount, so inotify on
the mount hears nothing of their files: the outside finds them by rescanning the share.
The originals are archived to a sent folder on the gateway's own disk, another file system.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import (
    Share,
    application,
    drop_file,
    edit_yaml,
    fast_bulk,
    ferry,
    init,
    opaque,
    wait_files,
)
from test_audit_agents import wait_for
from test_health_cli import until_check

from outside.watch import is_network_filesystem

pytestmark = pytest.mark.integration


def deploy_on_share(tmp_path: Path, share: Share, *extra: str) -> dict[str, Any]:
    """A pair whose documents channel drops on ``share``, rescanned every 0.5 s, with its
    ``sent`` folder on the gateway's disk (another file system)."""
    dep = init(tmp_path / "d", *extra)

    def on_share(data: dict[str, Any]) -> None:
        fast_bulk(data)
        (ch,) = [c for c in data["channels"] if c["name"] == "documents"]
        ch["drop"] = str(share.mount)
        ch["sent"] = dep["channels"]["documents"]["sent"]
        ch["rescan_seconds"] = 0.5

    edit_yaml(dep["outside"]["config"], on_share)
    edit_yaml(dep["inside"]["config"], opaque)
    return dep


def message_crosses(dep: dict[str, Any], tmp_path: Path, n: int) -> None:
    """An integrator's message, sent with `ferry send`, is accepted and delivered inside."""
    message = tmp_path / "application.json"
    message.write_bytes(application(n))
    sent = ferry(
        "send", "-c", dep["api"]["client_config"], "--channel", "messages",
        "--schema", "citizen-application", str(message), "--json",
    )  # fmt: skip
    assert json.loads(sent.stdout)["status"] == "ACCEPTED"
    messages = Path(dep["channels"]["messages"]["deliver"])
    wait_for(lambda: list(messages.glob("*.json")), what="the message inside")


def test_files_clerks_save_on_a_share_cross_and_are_archived_off_it(
    tmp_path: Path, agents: Any, network_share: Share
) -> None:
    dep = deploy_on_share(tmp_path, network_share)
    docs = dep["channels"]["documents"]
    agents("inside", dep["inside"]["config"])
    outside = agents("outside", dep["outside"]["config"])
    watched = outside.wait_event("drop_folder_watched", channel="documents")
    assert is_network_filesystem(watched["filesystem"]), watched
    assert watched["rescan_seconds"] == 0.5

    files = {f"申请材料-{i}.pdf": os.urandom(1000 + 7919 * i) for i in range(5)}
    mtime = time.time() - 3600
    for name, data in files.items():  # as a clerk's machine saves to the file server
        drop_file(network_share.server, name, data)
        os.utime(network_share.server / name, (mtime, mtime))
    assert wait_files(docs["deliver"], set(files), timeout=30) == files

    deadline = time.monotonic() + 10
    while os.listdir(network_share.server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert os.listdir(network_share.server) == []  # each original left the share...
    sent = Path(docs["sent"])
    assert {p.name: p.read_bytes() for p in sent.iterdir()} == files  # ...for the sent folder
    assert all(abs(p.stat().st_mtime - mtime) < 1 for p in sent.iterdir())  # dated as saved
    time.sleep(1.5)  # three more rescans: nothing is taken twice
    assert sorted(os.listdir(docs["deliver"])) == sorted(files)
    events = [e["event"] for e in outside.events()]
    assert "cannot_move_original" not in events
    assert events.count("taken") == len(files), [e for e in events if "take" in e]


@pytest.mark.slow  # (10-40 s: run with `python3 tasks.py test --slow`)
def test_a_share_that_stops_answering_holds_up_only_its_own_channel(
    tmp_path: Path, agents: Any, network_share: Share
) -> None:
    """The file server goes away (its FUSE daemon stopped: calls on the mount wait). The
    documents channel, whose drop folder is on the share, waits with it; the archive
    channel's folder on the gateway's disk goes on, and so do integrators' messages and the
    shipping of the outside's audit log. `ferry health` answers, and names the channel
    that is held up; when the server is back, its files cross."""
    dep = deploy_on_share(tmp_path, network_share, "--bulk", "archive")
    docs, archive = dep["channels"]["documents"], dep["channels"]["archive"]
    outside_cfg = dep["outside"]["config"]
    agents("inside", dep["inside"]["config"])
    outside = agents("outside", outside_cfg)
    outside.wait_event("drop_folder_watched", channel="documents")
    outside.wait_event("drop_folder_watched", channel="archive")
    daemon = network_share.daemon()
    os.kill(daemon, signal.SIGSTOP)
    try:
        time.sleep(1.5)  # a rescan or two: the documents channel's thread now waits
        (network_share.server / "during.txt").write_bytes(b"saved while the server hung")
        drop_file(Path(archive["drop"]), "local.bin", b"dropped on the gateway's own disk")
        assert wait_files(archive["deliver"], {"local.bin"}, timeout=30) == {
            "local.bin": b"dropped on the gateway's own disk"
        }
        message_crosses(dep, tmp_path, 11)

        def mirrored() -> bool:  # its acceptance record is in the inside's copy of the log
            rec = ferry("audit", "reconcile", "-c", dep["inside"]["config"], "--include-unsigned",
                        check=False)  # fmt: skip
            return "items accepted outside: 2 " in rec.stdout

        wait_for(mirrored, what="the acceptance records in the mirror")
        assert not Path(docs["deliver"], "during.txt").exists()  # (the share still hangs)

        started = time.monotonic()
        found = until_check(outside_cfg, "intake", "CRITICAL", "--max-stall", "2")
        assert time.monotonic() - started < 30  # each look at the share gave up in time
        assert "documents" in found["intake"]["message"]
        assert "archive" not in found["intake"]["message"]
        (share_space,) = [c for n, c in found.items() if n == "disk drop/documents"]
        assert share_space["state"] == "CRITICAL"
        assert "not answering" in share_space["message"]
    finally:
        os.kill(daemon, signal.SIGCONT)
    got = wait_files(docs["deliver"], {"during.txt"}, timeout=30)
    assert got == {"during.txt": b"saved while the server hung"}
    until_check(outside_cfg, "intake", "OK", "--max-stall", "2")


@pytest.mark.slow  # (10-40 s: run with `python3 tasks.py test --slow`)
def test_a_delivery_folder_share_that_stops_answering_holds_up_only_its_channels_files(
    tmp_path: Path, agents: Any, network_share: Share
) -> None:
    """Inside, the documents channel delivers onto a share; its server goes away. Its files
    wait; the archive channel's files (a folder on the gateway's disk) and messages are
    still delivered (threads of their own, also when a small file, which arrives whole in
    memory as messages do, is stuck before them). status.json and `ferry health` name what
    waits. The inside stops and starts again while the share still hangs: the file it
    holds is kept, the start does not wait for the share, and when the server is back the
    file is delivered, once."""
    dep = init(tmp_path / "d", "--bulk", "archive")
    edit_yaml(dep["outside"]["config"], fast_bulk)
    for side in ("outside", "inside"):
        edit_yaml(dep[side]["config"], opaque)

    def deliver_on_share(data: dict[str, Any]) -> None:
        (ch,) = [c for c in data["channels"] if c["name"] == "documents"]
        ch["deliver"] = str(network_share.mount)

    edit_yaml(dep["inside"]["config"], deliver_on_share)
    inside_cfg = dep["inside"]["config"]
    status = Path(dep["inside"]["state_dir"]) / "status.json"
    archive = dep["channels"]["archive"]
    inside = agents("inside", inside_cfg)
    agents("outside", dep["outside"]["config"])
    inside.wait_event("inside_started")
    daemon = network_share.daemon()
    os.kill(daemon, signal.SIGSTOP)
    try:
        drop_file(Path(dep["channels"]["documents"]["drop"]), "report.bin", b"for the share")
        time.sleep(2.0)  # it crosses; its delivery now waits on the share
        drop_file(Path(archive["drop"]), "local-1.bin", b"to the gateway's own disk")
        assert wait_files(archive["deliver"], {"local-1.bin"}, timeout=30)
        message_crosses(dep, tmp_path, 12)

        def held() -> bool:
            now = json.loads(status.read_text())
            return list(now["delivery_held"]) == ["documents"] and now["files_waiting"] == {
                "documents": 1
            }

        wait_for(held, what="status.json naming the channel held up")
        found = until_check(inside_cfg, "disk deliver/documents", "CRITICAL")
        assert "not answering" in found["disk deliver/documents"]["message"]
        found = until_check(inside_cfg, "delivery", "CRITICAL", "--max-stall", "5")
        assert "channel documents" in found["delivery"]["message"]
        assert "archive" not in found["delivery"]["message"]
        assert not (network_share.server / "report.bin").exists()

        started = time.monotonic()
        assert inside.stop() == 0  # a restart while the share hangs
        assert time.monotonic() - started < 20
        assert inside.wait_event("delivery_thread_left_waiting")["channel"] == "documents"
        inside = agents("inside", inside_cfg)
        inside.wait_event("inside_started", timeout=15)  # without waiting for the share
        assert inside.wait_event("delivery_folder_not_answering")["channel"] == "documents"
        assert inside.wait_event("kept_objects_to_deliver")["count"] == 1
        messages = Path(dep["channels"]["messages"]["deliver"])
        before = len(list(messages.glob("*.json")))
        message_crosses(dep, tmp_path, 13)
        wait_for(lambda: len(list(messages.glob("*.json"))) > before, what="a second message")
        drop_file(Path(archive["drop"]), "local-2.bin", b"after the restart")
        assert wait_files(archive["deliver"], {"local-2.bin"}, timeout=30)
        assert not (network_share.server / "report.bin").exists()
    finally:
        os.kill(daemon, signal.SIGCONT)
    assert wait_files(network_share.server, {"report.bin"}, timeout=30) == {
        "report.bin": b"for the share"
    }
    wait_for(lambda: json.loads(status.read_text())["files_waiting"] == {}, what="no file waits")
    time.sleep(1.0)
    assert sorted(os.listdir(network_share.server)) == ["report.bin"]  # once

"""The agents' audit logs, end to end: what they record, the mirror, and failing closed.

Both agents run as real processes over UDP loopback. The audit disk failures are real: the
outside's audit folder is a small tmpfs mounted for the test (CI runs as root), remounted
read-only and filled up while the agents run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import application, drop_file, edit_yaml, fast, ferry, fill_disk, init, wait_files

from ferry.audit.record import decode, per_item
from ferry.audit.segments import iter_lines, list_segments
from ferry.audit.verify import verify
from ferry.channels.emulator import LossyUdpForwarder
from ferry.client import ApiUnavailable, Client
from ferry.crypto.keys import load_public_key

pytestmark = pytest.mark.integration


def raw_records(directory: str | Path) -> list[dict[str, Any]]:
    return [
        decode(line.data)
        for _, seg in list_segments(Path(directory))
        for line in iter_lines(seg)
        if line.complete
    ]


def records(directory: str | Path) -> list[dict[str, Any]]:
    """One record per item: batch records (messages) expanded, as replay reads them."""
    return [one for r in raw_records(directory) for one in per_item(r)]


def events(directory: str | Path) -> Counter[str]:
    return Counter(r["event"] for r in records(directory))


def wait_for(check, timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def deploy(tmp_path: Path, *, grace: float | None = None) -> dict[str, Any]:
    dep = init(tmp_path / "d")

    def out(data: dict[str, Any]) -> None:
        fast(data)
        data["audit"]["checkpoint_interval"] = 0.5
        for ch in data["channels"]:
            if ch.get("kind") == "messages":
                ch["repeat"] = {"count": 1, "spread": 0}

    def ins(data: dict[str, Any]) -> None:
        data["audit"]["checkpoint_interval"] = 0.5
        if grace is not None:
            data["inside"]["object_timeout"] = grace

    edit_yaml(dep["outside"]["config"], out)
    edit_yaml(dep["inside"]["config"], ins)
    return dep


def verified(directory: str, public: str) -> None:
    report = verify(directory, load_public_key(public))
    assert report.verified, [p.to_json() for p in report.problems]


def test_an_item_leaves_a_trail_on_both_sides_and_the_mirror_verifies(
    tmp_path: Path, agents
) -> None:
    dep = deploy(tmp_path)
    o, i = dep["outside"], dep["inside"]
    inside = agents("inside", i["config"])
    inside.wait_event("inside_started")
    outside = agents("outside", o["config"])
    outside.wait_event("api_listening")
    with Client.from_config(dep["api"]["client_config"]) as client:
        ack = client.submit("messages", application(1), schema="citizen-application")
    drop_file(dep["channels"]["documents"]["drop"], "report.txt", b"quarterly figures\n")
    wait_files(dep["channels"]["documents"]["deliver"], {"report.txt"})
    wait_for(
        lambda: list(Path(dep["channels"]["messages"]["deliver"]).glob("*.json")), what="message"
    )
    # the outside's checkpoints reach the inside and are witnessed there
    wait_for(lambda: events(i["audit_dir"])["audit.witnessed"] >= 1, what="a witnessed checkpoint")
    assert inside.stop() == 0
    assert outside.stop() == 0

    out_recs, in_recs = records(o["audit_dir"]), records(i["audit_dir"])
    accepted = {r["object"]["item"]: r for r in out_recs if r["event"] == "intake.accepted"}
    assert ack.item in accepted
    assert accepted[ack.item]["subject"] == {"id": "portal", "kind": "api_client"}
    assert accepted[ack.item]["detail"]["submission"]
    file_item = next(k for k, r in accepted.items() if r["object"].get("name") == "report.txt")
    assert accepted[file_item]["subject"]["kind"] == "clerk_folder"
    verdict = [r for r in out_recs if r["event"] == "verdict" and r.get("corr") == file_item]
    assert len(verdict) == 1
    assert verdict[0]["detail"]["detected_type"] == "txt"
    for item, inside_trail in (
        (ack.item, ["transfer.received", "delivery.delivered"]),
        (file_item, ["transfer.received", "recheck", "delivery.delivered"]),
    ):
        sent = [r for r in out_recs if r["event"] == "transfer.sent" and r["corr"] == item]
        assert len(sent) == 1
        trail = [r["event"] for r in in_recs if r.get("corr") == item]
        assert trail == inside_trail
        delivered = next(
            r for r in in_recs if r["event"] == "delivery.delivered" and r["corr"] == item
        )
        assert delivered["object"]["sha256"] == accepted[item]["object"]["sha256"]
        assert Path(delivered["object"]["path"]).is_file()
    for side in (o, i):
        counts = events(side["audit_dir"])
        assert counts["agent.started"] == 1
        assert counts["agent.stopped"] == 1
        assert counts["config.loaded"] == 1
        assert counts["key.generated"] >= 2
        verified(side["audit_dir"], side["audit_public_key"])
    # the mirror is byte-identical to the outside's log as far as it goes, and verifies
    mirror = Path(i["audit_mirror_dir"])
    for _, seg in list_segments(mirror):
        mine = seg.read_bytes()
        assert (Path(o["audit_dir"]) / seg.name).read_bytes()[: len(mine)] == mine
    verified(i["audit_mirror_dir"], i["outside_audit_public_key"])
    witnessed = [r for r in in_recs if r["event"] == "audit.witnessed"]
    assert witnessed
    assert all(r["detail"]["origin"].startswith("ferry/outside/") for r in witnessed)


def test_kill_and_config_change_are_recorded_at_the_next_start(tmp_path: Path, agents) -> None:
    dep = deploy(tmp_path)
    o = dep["outside"]
    first = agents("outside", o["config"])
    first.wait_event("api_listening")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    with open(o["config"], "a", encoding="utf-8") as f:
        f.write("\n# changed by the operator\n")
    second = agents("outside", o["config"])
    second.wait_event("api_listening")
    assert second.stop() == 0
    recs = records(o["audit_dir"])
    abnormal = [r for r in recs if r["event"] == "agent.abnormal_termination"]
    assert len(abnormal) == 1
    assert abnormal[0]["detail"]["pid"] == first.proc.pid
    changed = [r for r in recs if r["event"] == "config.changed"]
    assert len(changed) == 1
    assert changed[0]["detail"]["previous_sha256"] != changed[0]["object"]["sha256"]
    verified(o["audit_dir"], o["audit_public_key"])


def remount(folder: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(folder)], check=True)


def test_agent_refuses_to_start_on_a_read_only_audit_disk(
    tmp_path: Path, agents, small_audit_disk
) -> None:
    """A mounted file system cannot turn read-only under open files; at start it can."""
    dep = deploy(tmp_path)
    o, i = dep["outside"], dep["inside"]
    audit_dir = small_audit_disk(o["audit_dir"])
    remount(audit_dir, "ro")
    agents("inside", i["config"]).wait_event("inside_started")
    refused = agents("outside", o["config"])
    assert refused.proc.wait(timeout=30) != 0
    assert "audit" in refused.log.read_text()
    drop = Path(dep["channels"]["documents"]["drop"])
    drop_file(drop, "waiting.txt", b"dropped while the gateway could not audit\n")
    time.sleep(1)
    assert (drop / "waiting.txt").exists()
    remount(audit_dir, "rw")
    outside = agents("outside", o["config"])
    outside.wait_event("api_listening")
    wait_files(dep["channels"]["documents"]["deliver"], {"waiting.txt"})
    assert outside.stop() == 0
    verified(str(audit_dir), o["audit_public_key"])


def test_full_audit_disk_halts_the_api_and_recovers_when_space_is_freed(
    tmp_path: Path, agents, small_audit_disk
) -> None:
    dep = deploy(tmp_path)
    o, i = dep["outside"], dep["inside"]
    audit_dir = small_audit_disk(o["audit_dir"])
    agents("inside", i["config"]).wait_event("inside_started")
    outside = agents("outside", o["config"])
    outside.wait_event("api_listening")
    filler = fill_disk(audit_dir)  # (the log's own files are untouched)
    deliver = Path(dep["channels"]["messages"]["deliver"])
    acked = []
    with Client.from_config(dep["api"]["client_config"]) as client:
        for n in range(200):  # the last page of a file still takes a few records
            try:
                acked.append(
                    client.submit(
                        "messages",
                        application(n),
                        schema="citizen-application",
                        submission_id=f"full-{n}",
                        timeout=3,
                    )
                )
            except ApiUnavailable:
                held = n
                break
        else:
            pytest.fail("submissions were still acknowledged with the audit disk full")
        time.sleep(1.5)
        count = len(list(deliver.glob("*.json")))
        time.sleep(1.5)
        assert len(list(deliver.glob("*.json"))) == count  # transfers have stopped
        assert count <= len(acked)
        filler.unlink()
        ack = client.submit(
            "messages",
            application(held),
            schema="citizen-application",
            submission_id=f"full-{held}",
            timeout=20,
        )
        wait_for(lambda: len(list(deliver.glob("*.json"))) == len(acked) + 1, what="every message")
    assert outside.stop() == 0
    outage = [r for r in records(audit_dir) if r["event"] == "audit.outage"]
    assert len(outage) == 1
    assert "ENOSPC" in outage[0]["detail"]["error"]
    assert ack.item in {r.get("object", {}).get("item") for r in records(audit_dir)}
    verified(str(audit_dir), o["audit_public_key"])


@pytest.mark.slow  # (5-10 s: run with `python3 tasks.py test --slow`)
def test_suppressed_item_becomes_a_sequence_gap(tmp_path: Path, agents) -> None:
    """Every packet of one message is dropped; a heartbeat later shows it was sent, and the
    inside records the gap once the grace has passed."""
    dep = deploy(tmp_path, grace=1.0)
    o, i = dep["outside"], dep["inside"]
    port = dep["link"]["udp"]["port"]
    hop = LossyUdpForwarder(("127.0.0.1", port), 0.0)
    cfg = Path(o["config"])
    cfg.write_text(cfg.read_text().replace(f"port: {port}", f"port: {hop.port}"))
    try:
        agents("inside", i["config"]).wait_event("inside_started")
        outside = agents("outside", o["config"])
        outside.wait_event("api_listening")
        deliver = Path(dep["channels"]["messages"]["deliver"])
        with Client.from_config(dep["api"]["client_config"]) as client:
            client.submit("messages", application(1), schema="citizen-application")
            wait_for(lambda: len(list(deliver.glob("*.json"))) == 1, what="message 1")
            hop.loss = 1.0
            lost = client.submit("messages", application(2), schema="citizen-application")
            time.sleep(1.0)  # its every packet goes into the void
            hop.loss = 0.0
            client.submit("messages", application(3), schema="citizen-application")
            wait_for(lambda: len(list(deliver.glob("*.json"))) == 2, what="message 3")
        gap = wait_for(
            lambda: [
                r
                for r in records(i["audit_dir"])
                if r["event"] == "link.sequence_gap" and r["object"]["channel"] == "messages"
            ],
            timeout=20,
            what="link.sequence_gap",
        )
    finally:
        hop.close()
    assert gap[0]["object"]["channel"] == "messages"
    assert (gap[0]["detail"]["first"], gap[0]["detail"]["last"]) == (lost.seq, lost.seq)
    assert lost.item not in {r.get("corr") for r in records(i["audit_dir"])}
    # the auditor's view: reconcile both logs; the suppressed item is missing, with the gap
    out = ferry(
        "audit", "reconcile", "--outside", o["audit_dir"], "--inside", i["audit_dir"],
        "--outside-key", o["audit_public_key"], "--inside-key", i["audit_public_key"],
        "--grace", "0", "--json", check=False,
    )  # fmt: skip
    assert out.returncode == 10, out.stderr
    result = json.loads(out.stdout)
    missing = [x for x in result["items"] if x["state"] == "missing"]
    assert [x["item"] for x in missing] == [lost.item]


def test_agent_exports_its_log_to_a_siem_over_tcp(tmp_path: Path, agents) -> None:
    import socket  # noqa: PLC0415
    import threading  # noqa: PLC0415

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = bytearray()

    def serve() -> None:
        server.settimeout(30)
        conn, _ = server.accept()
        conn.settimeout(30)
        with conn:
            while chunk := conn.recv(65536):
                received.extend(chunk)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    dep = deploy(tmp_path)
    o, i = dep["outside"], dep["inside"]
    edit_yaml(o["config"], lambda d: d["audit"].__setitem__("siem", f"tcp://127.0.0.1:{port}"))
    agents("inside", i["config"]).wait_event("inside_started")
    outside = agents("outside", o["config"])
    outside.wait_event("api_listening")
    with Client.from_config(dep["api"]["client_config"]) as client:
        ack = client.submit("messages", application(1), schema="citizen-application")
    wait_for(lambda: ack.item.encode() in received, what="the item's records at the SIEM")
    assert outside.stop() == 0
    thread.join(timeout=10)
    server.close()
    # RFC 6587 octet counting: "<length> <RFC 5424 message>", in log order
    frames, pos = [], 0
    while pos < len(received):
        space = received.index(b" ", pos)
        length = int(received[pos:space])
        frames.append(bytes(received[space + 1 : space + 1 + length]))
        pos = space + 1 + length
    assert all(f.startswith(b"<") and b">1 " in f[:8] for f in frames)
    idx = [json.loads(f[f.index(b'{"v":1,') :])["idx"] for f in frames]
    assert idx == list(range(len(idx)))  # every record, in order, from the first
    # everything up to the stop went out; the shutdown records go with the next start
    rest = {r["event"] for r in records(o["audit_dir"])[len(idx) :]}
    assert rest <= {"agent.stopped", "audit.checkpoint", "audit.stopped"}


def test_quarantine_and_its_release_are_recorded(tmp_path: Path, agents) -> None:
    dep = deploy(tmp_path)
    o, i = dep["outside"], dep["inside"]
    agents("inside", i["config"]).wait_event("inside_started")
    outside = agents("outside", o["config"])
    outside.wait_event("api_listening")
    exe = b"MZ" + b"\x90" * 58 + b"\x80\x00\x00\x00" + b"\x00" * 64 + b"PE\x00\x00" + b"\x00" * 64
    drop_file(dep["channels"]["documents"]["drop"], "invoice.pdf.exe", exe)
    listed = wait_for(
        lambda: json.loads(ferry("quarantine", "list", "-c", o["config"], "--json").stdout),
        what="the quarantined file",
    )
    stored = listed[0]["stored_name"]
    out = ferry(
        "quarantine", "release", "-c", o["config"], stored,
        "--key", dep["security_admin"]["secret_key"], "--json",
    )  # fmt: skip
    assert json.loads(out.stdout)["status"] == "released"
    released = wait_for(
        lambda: [r for r in records(o["audit_dir"]) if r["event"] == "quarantine.released"],
        what="quarantine.released",
    )
    # a forged line (not signed by the admin key) is recorded as a failure, not trusted
    releases = Path(dep["channels"]["documents"]["quarantine"]) / "releases.jsonl"
    with open(releases, "a", encoding="utf-8") as f:
        f.write(json.dumps({"stored_name": "x", "admin_key_id": "00", "signature": "AA=="}) + "\n")
    forged = wait_for(
        lambda: [
            r
            for r in records(o["audit_dir"])
            if r["event"] == "quarantine.released" and r["result"] == "failure"
        ],
        what="the forged release",
    )
    assert outside.stop() == 0
    recs = records(o["audit_dir"])
    assert released[0]["result"] == "success"
    assert released[0]["subject"]["id"].endswith(dep["security_admin"]["key_id"])
    assert released[0]["detail"]["stored_name"] == stored
    assert "BAD_SIGNATURE" in forged[0]["reason"]
    # released without an override, the executable is checked again and refused again
    verdicts = [r for r in recs if r["event"] == "verdict"]
    assert len(verdicts) == 2
    assert all(v["result"] == "rejected" for v in verdicts)
    assert sum(r["event"] == "quarantine.added" for r in recs) == 2
    assert sum(r["event"] == "quarantine.released" for r in recs) == 2

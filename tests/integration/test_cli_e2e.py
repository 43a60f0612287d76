"""End to end through the CLI: real agents as subprocesses, real UDP and a real pty pair."""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import drop_file, edit_yaml, fast_bulk, ferry, init, opaque, wait_files
from test_audit_agents import wait_for

from ferry.audit.record import decode
from ferry.audit.segments import iter_lines, list_segments
from ferry.channels.emulator import PtyCable

pytestmark = pytest.mark.integration


def _payloads(n: int, seed: int, max_size: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"doc-{i}.bin": rng.randbytes(rng.randint(0, max_size)) for i in range(n)}


def test_udp_loopback_end_to_end(tmp_path: Path, agents) -> None:
    dep = init(tmp_path / "d")
    edit_yaml(dep["outside"]["config"], fast_bulk)
    edit_yaml(dep["inside"]["config"], opaque)
    inside = agents("inside", dep["inside"]["config"])
    outside = agents("outside", dep["outside"]["config"])
    files = _payloads(12, 1, 300_000)
    files["申请书 (最终版).txt"] = "居住证申请".encode()
    for name, data in files.items():
        drop_file(dep["channels"]["documents"]["drop"], name, data)
    got = wait_files(dep["channels"]["documents"]["deliver"], set(files))
    assert got == files
    # originals moved to sent/, nothing left in the drop folder
    assert sorted(os.listdir(dep["channels"]["documents"]["sent"])) == sorted(files)
    assert os.listdir(dep["channels"]["documents"]["drop"]) == []
    inside.wait_event("link_state", state="UP")
    assert inside.stop() == 0
    assert outside.stop() == 0
    # no temp or partial files ever left in the delivery folder
    assert sorted(os.listdir(dep["channels"]["documents"]["deliver"])) == sorted(files)


def test_serial_pty_end_to_end(tmp_path: Path, agents) -> None:
    cable = PtyCable()
    try:
        dep = init(
            tmp_path / "d",
            "--transport", "serial",
            "--serial-devices", cable.outside_path, cable.inside_path,
        )  # fmt: skip

        def faster(data: dict) -> None:
            fast_bulk(data)
            data["link"]["serial"]["baud"] = 921600
            data["link"]["heartbeat_interval"] = 0.5

        edit_yaml(dep["outside"]["config"], faster)
        edit_yaml(dep["inside"]["config"], opaque)
        edit_yaml(dep["inside"]["config"], lambda d: d["link"].update(heartbeat_interval=0.5)
                  or d["link"]["serial"].update(baud=921600))  # fmt: skip
        inside = agents("inside", dep["inside"]["config"])
        time.sleep(0.5)
        outside = agents("outside", dep["outside"]["config"])
        files = _payloads(5, 2, 40_000)
        for name, data in files.items():
            drop_file(dep["channels"]["documents"]["drop"], name, data)
        got = wait_files(dep["channels"]["documents"]["deliver"], set(files), timeout=90)
        assert got == files
        inside.wait_event("link_state", state="UP")
        assert inside.stop() == 0
        assert outside.stop() == 0
        assert cable.bytes_copied > sum(map(len, files.values()))
        assert cable.bytes_returned == 0, "the inside wrote to the serial line"
    finally:
        cable.close()


def _rejections(agent) -> list[str]:
    return [str(e.get("reason")) for e in agent.events() if e.get("event") == "packet_rejected"]


def _wait_rejection(agent, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in r for r in _rejections(agent)):
            return
        time.sleep(0.1)
    raise AssertionError(f"no rejection containing {text!r}: {_rejections(agent)}")


def test_wrong_inside_key_is_rejected_and_logged(tmp_path: Path, agents) -> None:
    a = init(tmp_path / "a")
    b = init(tmp_path / "b")
    # b's inside listens where a's outside sends, and trusts a's signing key,
    # but holds a different KEM key than the one a's outside seals to.
    edit_yaml(a["outside"]["config"], fast_bulk)
    port = b["link"]["udp"]["port"]
    edit_yaml(a["outside"]["config"], lambda d: d["link"]["udp"].update(port=port))
    edit_yaml(
        b["inside"]["config"],
        lambda d: d["keys"].update(outside_public_key=a["outside"]["signing_public_key"]),
    )
    inside = agents("inside", b["inside"]["config"])
    agents("outside", a["outside"]["config"])
    drop_file(a["channels"]["documents"]["drop"], "secret.txt", b"for the right inside only")
    _wait_rejection(inside, "announce sealed to another inside key")
    time.sleep(2)
    assert os.listdir(b["channels"]["documents"]["deliver"]) == []


def test_foreign_signing_key_is_rejected_and_logged(tmp_path: Path, agents) -> None:
    dep = init(tmp_path / "d")
    keys = tmp_path / "other"
    keys.mkdir()
    other = ferry("keygen", "--role", "outside-signing", "--out", str(keys), "--json").stdout
    foreign = json.loads(other)["public_key_string"]
    edit_yaml(dep["outside"]["config"], fast_bulk)
    edit_yaml(dep["inside"]["config"], lambda d: d["keys"].update(outside_public_key=foreign))
    inside = agents("inside", dep["inside"]["config"])
    agents("outside", dep["outside"]["config"])
    drop_file(dep["channels"]["documents"]["drop"], "x.txt", b"from an untrusted outside")
    _wait_rejection(inside, "announce signed by unknown key")
    time.sleep(2)
    assert os.listdir(dep["channels"]["documents"]["deliver"]) == []


def test_an_inside_restarted_alone_rejoins_the_running_session(tmp_path: Path, agents) -> None:
    """The outside keeps sending in its session (the next rekey is an hour away): a
    restarted inside joins it again at the next announcement, a second later, instead of
    refusing it as a replay and hearing nothing until the rekey."""
    dep = init(tmp_path / "d")
    edit_yaml(dep["outside"]["config"], fast_bulk)
    edit_yaml(dep["inside"]["config"], opaque)
    docs = dep["channels"]["documents"]
    inside = agents("inside", dep["inside"]["config"])
    agents("outside", dep["outside"]["config"])
    first = _payloads(2, 4, 20_000)
    for name, data in first.items():
        drop_file(docs["drop"], name, data)
    assert wait_files(docs["deliver"], set(first)) == first
    assert inside.stop() == 0
    again = agents("inside", dep["inside"]["config"])
    up = again.wait_event("link_state", state="UP", timeout=15)
    assert up["event"] == "link_state"
    later = {f"later-{name}": data for name, data in _payloads(2, 5, 20_000).items()}
    for name, data in later.items():
        drop_file(docs["drop"], name, data)
    assert wait_files(docs["deliver"], set(later), timeout=30) == later
    assert not [r for r in _rejections(again) if "is not newer than" in r]


class _Tap:
    """A UDP hop that records every datagram it forwards (a capture on the diode)."""

    def __init__(self, target_port: int) -> None:
        self.rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # The tap is a Python thread: give it room so it is not itself a lossy hop.
        self.rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024 * 1024)
        self.rx.bind(("127.0.0.1", 0))
        self.rx.settimeout(0.2)
        self.port = self.rx.getsockname()[1]
        self.tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.target = ("127.0.0.1", target_port)
        self.captured: list[bytes] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                d = self.rx.recv(65535)
            except TimeoutError:
                continue
            self.captured.append(d)
            self.tx.sendto(d, self.target)

    def replay(self, datagrams: list[bytes]) -> None:
        for d in datagrams:
            self.tx.sendto(d, self.target)
            time.sleep(0.0001)

    def close(self) -> None:
        self._stop.set()
        self._t.join()
        self.rx.close()
        self.tx.close()


def test_replayed_capture_is_rejected_and_logged(tmp_path: Path, agents) -> None:
    dep = init(tmp_path / "d")
    tap = _Tap(dep["link"]["udp"]["port"])
    try:
        edit_yaml(dep["outside"]["config"], fast_bulk)
        edit_yaml(dep["inside"]["config"], opaque)
        edit_yaml(dep["outside"]["config"], lambda d: d["link"]["udp"].update(port=tap.port))
        # This test is about replay, not loss: pace gently through the Python tap.
        edit_yaml(dep["outside"]["config"], lambda d: d["link"].update(rate="50M"))
        inside = agents("inside", dep["inside"]["config"])
        outside = agents("outside", dep["outside"]["config"])
        files = _payloads(4, 3, 100_000)
        for name, data in files.items():
            drop_file(dep["channels"]["documents"]["drop"], name, data)
        deliver = dep["channels"]["documents"]["deliver"]
        assert wait_files(deliver, set(files)) == files
        assert outside.stop() == 0
        captured = list(tap.captured)
        # the outside starts again (a new epoch): the capture's session is an old one now
        agents("outside", dep["outside"]["config"])

        def epochs() -> set[object]:  # the inside took the new session: its floor moved on
            return {e["epoch"] for e in inside.events() if e.get("event") == "session_started"}

        wait_for(lambda: len(epochs()) >= 2, what="the outside's new epoch inside")
        assert inside.stop() == 0
        # A later inside run (same state) sees the whole capture replayed.
        inside2 = agents("inside", dep["inside"]["config"])
        inside2.wait_event("inside_started")
        tap.replay(captured)
        _wait_rejection(inside2, "is not newer than")
        time.sleep(1.5)
        assert sorted(os.listdir(deliver)) == sorted(files), "a replay delivered something again"
        assert inside2.stop() == 0
        # and the replay is in the inside's audit log (the first, second, fourth... one)
        replays = [
            r
            for _, seg in list_segments(Path(dep["inside"]["audit_dir"]))
            for r in (decode(line.data) for line in iter_lines(seg))
            if r["event"] == "transfer.replay_rejected"
        ]
        assert replays
        assert replays[0]["result"] == "rejected"
        assert replays[0]["detail"]["count"] == 1
    finally:
        tap.close()

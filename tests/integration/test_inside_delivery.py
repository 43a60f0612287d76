"""Inside delivery end to end: subfolders, collisions, and the reject path of a failed batch.

Real agents over real UDP on loopback. The failure is a real one: the
delivery folder becomes a read-only mount (a bind mount remounted read-only in
the inside agent's private mount namespace, ``unshare -m``; tests run as root,
so permissions alone would not stop a write) or is replaced by a plain file.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import Agent, drop_file, edit_yaml, fast, init, opaque
from test_health_cli import checks, until_check

from ferry.client import Client

pytestmark = pytest.mark.integration

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas" / "messages"

StartAgent = Callable[[str, str], Agent]


def _application(n: int) -> bytes:
    doc = json.loads((SCHEMAS / "citizen-application.schema.json").read_text())["examples"][0]
    doc = copy.deepcopy(doc)
    doc["application_id"] = str(uuid.UUID(int=n + 1))
    return json.dumps(doc, ensure_ascii=False).encode()


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` by relative path (symlinks are not followed)."""
    out = {}
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            p = Path(dirpath) / f
            out[p.relative_to(folder).as_posix()] = p.read_bytes()
    return out


def _wait(predicate: Callable[[], bool], what: str, *agents: Agent, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for a in agents:
            assert a.proc.poll() is None, a.log.read_text()[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _ledger(dep: dict[str, Any], sql: str, *args: object) -> list[tuple[Any, ...]]:
    db = Path(dep["inside"]["state_dir"]) / "inside.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


# ------------------------------------------------------------------- subfolders


def _with_flat_channel(data: dict[str, Any]) -> None:
    """Add channel ``flat``: subfolders on the outside only (the inside flattens)."""
    docs = next(ch for ch in data["channels"] if ch["name"] == "documents")
    if data["role"] == "outside":
        docs["subfolders"] = True
        docs.pop("content", None)  # about delivery paths, not content checks
        flat = {k: v.replace("documents", "flat") if isinstance(v, str) else v
                for k, v in docs.items()}  # fmt: skip
        fast(data)
    else:
        docs["subfolders"] = True
        docs["recheck"] = False  # (no content report comes from the outside above)
        flat = {
            "name": "flat",
            "deliver": docs["deliver"].replace("documents", "flat"),
            "recheck": False,
        }
    data["channels"].append(flat)


def test_subfolders_are_recreated_inside_and_collisions_never_overwrite(
    tmp_path: Path, agents: StartAgent
) -> None:
    dep = init(tmp_path / "d")
    edit_yaml(dep["outside"]["config"], _with_flat_channel)
    edit_yaml(dep["inside"]["config"], _with_flat_channel)
    drop = Path(dep["channels"]["documents"]["drop"])
    deliver = Path(dep["channels"]["documents"]["deliver"])
    flat_drop = Path(str(drop).replace("documents", "flat"))
    flat_deliver = Path(str(deliver).replace("documents", "flat"))
    elsewhere = tmp_path / "elsewhere"  # outside every delivery folder
    elsewhere.mkdir()
    # The inner side already holds a file at a/b/c.txt, and someone planted a symlink.
    (deliver / "a" / "b").mkdir(parents=True)
    (deliver / "a" / "b" / "c.txt").write_bytes(b"the inner user's own file")
    os.symlink(elsewhere, deliver / "planted")

    inside = agents("inside", dep["inside"]["config"])
    inside.wait_event("inside_started")
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("outside_started")

    dropped = {
        "a/b/c.txt": b"first c",
        "a/b/d/e.txt": b"deep e",
        "top.txt": b"top",
        "a/top.txt": b"another top, another folder",
        "up\\..\\..\\esc/evil.txt": b"backslashes are not separators",
        "planted/x.txt": b"would follow the planted symlink",
    }
    for rel, data in dropped.items():
        (drop / rel).parent.mkdir(parents=True, exist_ok=True)
        drop_file((drop / rel).parent, Path(rel).name, data)
    (flat_drop / "x" / "y").mkdir(parents=True)
    drop_file(flat_drop / "x" / "y", "z.txt", b"flattened")
    drop_file(flat_drop, "z.txt", b"same name at the top")

    _wait(lambda: len(_tree(deliver)) >= 6, "first files", inside, outside)
    _wait(lambda: len(_tree(flat_deliver)) >= 2, "flat files", inside, outside)
    inside.wait_event("object_rejected")
    # The same name again, later, with other content: a third name, never an overwrite.
    drop_file(drop / "a" / "b", "c.txt", b"second c")
    _wait(lambda: len(_tree(deliver)) >= 7, "second c.txt", inside, outside)
    time.sleep(0.5)

    assert _tree(deliver) == {
        "a/b/c.txt": b"the inner user's own file",
        "a/b/c (2).txt": b"first c",
        "a/b/c (3).txt": b"second c",
        "a/b/d/e.txt": b"deep e",
        "top.txt": b"top",
        "a/top.txt": b"another top, another folder",
        "esc/evil.txt": b"backslashes are not separators",  # one safe component
    }
    assert os.path.islink(deliver / "planted")
    assert list(elsewhere.iterdir()) == []  # never through the symlink
    assert not (tmp_path / "d" / "inside" / "esc").exists()
    assert _tree(flat_deliver) in (
        {"z.txt": b"flattened", "z (2).txt": b"same name at the top"},
        {"z.txt": b"same name at the top", "z (2).txt": b"flattened"},
    )
    # The refused one is kept and recorded; the agent carries on.
    rejected = [e for e in inside.events() if e.get("event") == "object_rejected"]
    assert len(rejected) == 1
    assert "planted" in rejected[0]["reason"]
    kept = Path(rejected[0]["kept"])
    assert kept.parent == Path(dep["inside"]["state_dir"]) / "rejected"
    assert kept.read_bytes().startswith(b"would follow the planted symlink")
    assert _ledger(
        dep, "SELECT state FROM objects WHERE object_id=?", bytes.fromhex(rejected[0]["object_id"])
    ) == [("rejected",)]
    assert inside.proc.poll() is None


# ------------------------------------------------------------- failed delivery


class Breakage:
    """Makes a set of folders unwritable for the inside agent, then repairs them."""

    def __init__(self, how: str, folders: list[Path]) -> None:
        self.how = how
        self.folders = folders
        self.pid = 0

    def command(self) -> list[str]:
        """Prefix of the inside agent's command line."""
        return ["unshare", "-m", "--propagation", "private"] if self.how == "readonly" else []

    def _ns(self, *cmd: str) -> None:
        subprocess.run(["nsenter", "-t", str(self.pid), "-m", *cmd], check=True)

    def on(self) -> None:
        for f in self.folders:
            if self.how == "readonly":
                self._ns("mount", "--bind", str(f), str(f))
                self._ns("mount", "-o", "remount,bind,ro", str(f))
            else:
                os.rename(f, f.with_name(f.name + ".away"))
                f.write_bytes(b"not a folder")

    def off(self) -> None:
        for f in self.folders:
            if self.how == "readonly":
                self._ns("umount", str(f))
            else:
                f.unlink()
                os.rename(f.with_name(f.name + ".away"), f)


class NsAgent(Agent):
    """An agent started behind a command prefix (e.g. in its own mount namespace)."""

    def __init__(self, prefix: list[str], side: str, config: str, log: Path) -> None:
        self.log = log
        self._fh = open(log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "ferry.cli", "--log-json", side, "run", "-c", config],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
        )


def _can_unshare() -> bool:
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "x", "/mnt"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


@pytest.fixture
def started() -> Iterator[list[Agent]]:
    agents: list[Agent] = []
    yield agents
    for a in agents:
        a.stop()


def _broken_pair(tmp_path: Path, started: list[Agent], how: str) -> tuple[Any, ...]:
    """A pair whose inside's messages and documents folders ``Breakage(how)`` can break."""

    def out(data: dict[str, Any]) -> None:
        fast(data)
        for ch in data["channels"]:
            ch.pop("content", None)  # about the delivery path, not content checks
            if ch["name"] == "messages":
                ch["repeat"] = {"count": 1, "spread": 0}

    dep = init(tmp_path / "d")
    edit_yaml(dep["outside"]["config"], out)
    edit_yaml(dep["inside"]["config"], opaque)
    messages = Path(dep["channels"]["messages"]["deliver"])
    documents = Path(dep["channels"]["documents"]["deliver"])
    breakage = Breakage(how, [messages, documents])
    inside = NsAgent(breakage.command(), "inside", dep["inside"]["config"], tmp_path / "in.log")
    started.append(inside)
    inside.wait_event("inside_started")
    breakage.pid = inside.proc.pid
    outside = NsAgent([], "outside", dep["outside"]["config"], tmp_path / "out.log")
    started.append(outside)
    outside.wait_event("api_listening")
    return dep, messages, documents, breakage, inside, outside


def test_failed_delivery_is_kept_in_rejected_and_later_items_are_delivered(
    tmp_path: Path, started: list[Agent]
) -> None:
    """The delivery folders are replaced by plain files: a mistake no retry mends. Messages
    and the file are refused, kept in rejected/ and recorded; later ones are delivered."""
    dep, messages, documents, breakage, inside, outside = _broken_pair(tmp_path, started, "file")
    rejected_dir = Path(dep["inside"]["state_dir"]) / "rejected"
    breakage.on()
    with Client.from_config(dep["api"]["client_config"]) as client:
        lost = [
            client.submit("messages", _application(n), schema="citizen-application")
            for n in range(5)
        ]
        drop_file(dep["channels"]["documents"]["drop"], "scan.bin", b"scan content " * 1000)

        def all_rejected() -> bool:
            events = [e for e in inside.events() if e.get("event") == "object_rejected"]
            return len(events) >= 6

        _wait(all_rejected, "6 rejections", inside, outside)
        time.sleep(0.5)
        events = inside.events()
        assert any(e.get("event") == "message_delivery_failed" for e in events)
        for ack in lost:  # the whole batch: kept, recorded, not queued for consumers
            kept = rejected_dir / f"{ack.item}.obj"
            assert json.loads(kept.read_bytes())["application_id"] == str(uuid.UUID(int=ack.seq))
            [(state, reason)] = _ledger(
                dep, "SELECT state, reason FROM objects WHERE object_id=?", bytes.fromhex(ack.item)
            )
            assert state == "rejected"
            assert "delivery failed" in reason
        assert _ledger(dep, "SELECT count(*) FROM outbox") == [(0,)]
        file_rejects = [
            e
            for e in events
            if e.get("event") == "object_rejected" and e["object_id"] not in {a.item for a in lost}
        ]
        assert len(file_rejects) == 1
        assert Path(file_rejects[0]["kept"]).read_bytes().startswith(b"scan content " * 1000)
        assert inside.proc.poll() is None  # it keeps running

        breakage.off()
        later = [
            client.submit("messages", _application(n), schema="citizen-application")
            for n in range(5, 10)
        ]
        drop_file(dep["channels"]["documents"]["drop"], "scan2.bin", b"second scan")
    _wait(
        lambda: len(list(messages.glob("*.json"))) >= 5 and (documents / "scan2.bin").exists(),
        "later deliveries",
        inside,
        outside,
    )
    time.sleep(0.5)
    delivered = {p.name: json.loads(p.read_bytes()) for p in messages.glob("*.json")}
    assert sorted(delivered) == [f"citizen-application-{a.seq:08d}.json" for a in later]
    assert {d["application_id"] for d in delivered.values()} == {
        str(uuid.UUID(int=n + 1)) for n in range(5, 10)
    }
    assert sorted(os.listdir(documents)) == ["scan2.bin"]
    assert _ledger(dep, "SELECT count(*) FROM outbox") == [(5,)]
    counts = dict(_ledger(dep, "SELECT state, count(*) FROM objects GROUP BY state"))
    assert counts == {"rejected": 6, "delivered": 6}
    status = json.loads((Path(dep["inside"]["state_dir"]) / "status.json").read_text())
    assert status["rejected"] == 6
    assert status["delivered"] == 6


@pytest.mark.slow  # (10-40 s: run with `python3 tasks.py test --slow`)
def test_read_only_delivery_folders_hold_messages_and_files_until_they_are_writable(
    tmp_path: Path, started: list[Agent]
) -> None:
    """The delivery folders turn read-only (EROFS), as a file system remounted after an
    error does: nothing is refused; messages and the file wait (health names the
    channels) and are all delivered, once, when the folders are writable again."""
    if not _can_unshare():
        pytest.skip("needs unshare/nsenter and CAP_SYS_ADMIN")
    dep, messages, documents, breakage, inside, outside = _broken_pair(
        tmp_path, started, "readonly"
    )
    state = Path(dep["inside"]["state_dir"])
    breakage.on()
    with Client.from_config(dep["api"]["client_config"]) as client:
        first = [
            client.submit("messages", _application(n), schema="citizen-application")
            for n in range(5)
        ]
        drop_file(dep["channels"]["documents"]["drop"], "scan.bin", b"scan content " * 1000)
        inside.wait_event("messages_waiting_for_folder")
        inside.wait_event("delivery_waiting_for_folder")

        def both_named() -> bool:
            _, found = checks(dep["inside"]["config"], "--max-stall", "6")
            said = found["delivery"]
            return said["state"] == "CRITICAL" and all(
                f"{ch} (" in said["message"] for ch in ("documents", "messages")
            )

        _wait(both_named, "health naming both channels", inside, outside)
        assert list((state / "rejected").iterdir()) == []
        assert _ledger(dep, "SELECT count(*) FROM outbox") == [(0,)]
        later = [  # queued behind the batch that waits
            client.submit("messages", _application(n), schema="citizen-application")
            for n in range(5, 10)
        ]
        time.sleep(1.0)
        breakage.off()
    _wait(
        lambda: len(list(messages.glob("*.json"))) >= 10 and (documents / "scan.bin").exists(),
        "every delivery",
        inside,
        outside,
    )
    time.sleep(0.5)
    delivered = {p.name: json.loads(p.read_bytes()) for p in messages.glob("*.json")}
    assert sorted(delivered) == [f"citizen-application-{a.seq:08d}.json" for a in first + later]
    assert sorted(os.listdir(documents)) == ["scan.bin"]
    assert (documents / "scan.bin").read_bytes() == b"scan content " * 1000
    assert _ledger(dep, "SELECT count(*) FROM outbox") == [(10,)]
    counts = dict(_ledger(dep, "SELECT state, count(*) FROM objects GROUP BY state"))
    assert counts == {"delivered": 11}
    assert list((state / "rejected").iterdir()) == []
    until_check(dep["inside"]["config"], "delivery", "OK", "--max-stall", "6")

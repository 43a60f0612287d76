"""Objects that are not what the outside signed, end to end: a real InsideAgent (``run()``, its
real UDP receiver on loopback, ledger, audit log, message lanes) on a ``ferry init``
deployment, fed datagrams made by the real sans-IO Sender.

The datagrams are what a compromised outside host, or anyone holding the link's session
key, sends: objects whose manifest signature does not verify. Neither keeps a genuine
object out, nor takes the room the inside needs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import edit_yaml, init, opaque

from ferry.config import load_inside_config
from ferry.crypto.keys import SecretKey, load_public_key, load_secret_key
from ferry.jsondoc import SchemaRegistry
from ferry.state import free_bytes
from ferry.wire import records as rec
from ferry.wire.sender import BytesSource, OutgoingObject, Sender, build_trailer
from inside.agent import InsideAgent
from outside.api import message_manifest

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "messages"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _application(seq: int) -> bytes:
    doc = json.loads((SCHEMA / "citizen-application.schema.json").read_text())["examples"][0]
    doc["application_id"] = str(uuid.UUID(int=seq))
    _, canonical = SchemaRegistry.load().check("citizen-application", json.dumps(doc).encode())
    return canonical


class Link:
    """The outside's sans-IO Sender with the deployment's keys, over real UDP."""

    def __init__(self, dep: dict[str, Any], port: int) -> None:
        cfg = load_inside_config(Path(dep["inside"]["config"]))
        self.key = load_secret_key(Path(dep["outside"]["signing_key"]), ("ed25519",))
        kem_pub = load_public_key(dep["outside"]["inside_public_key"], Path("/"))
        self.sender = Sender(
            cfg.link, self.key, kem_pub, epoch=int(time.time() * 1e6), rng=os.urandom,
            now=time.time(),
        )  # fmt: skip
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(("127.0.0.1", port))

    def stream(self, manifest: rec.Manifest, content: bytes, *, forged: bool) -> bytes:
        key = SecretKey("ed25519", os.urandom(32)) if forged else self.key
        return content + build_trailer(manifest, key)

    def send(self, oid: bytes, stream: bytes, *, k: int | None = None) -> None:
        fec = None if k is None else (k, 2)
        self.sender.submit(OutgoingObject(oid, len(stream), BytesSource(stream), fec=fec))
        self.flush()

    def flush(self) -> None:
        while True:
            out = self.sender.datagrams(time.time(), 256)
            for d in out:
                self.sock.send(d)
            if self.sender.idle and not out:
                return
            time.sleep(0.002)  # (paced: loopback drops nothing at this rate)

    def close(self) -> None:
        self.sock.close()


@contextmanager
def running_inside(
    dep: dict[str, Any], prepare: Callable[[InsideAgent], None] | None = None
) -> Iterator[InsideAgent]:
    """A real InsideAgent running on a thread (``prepare`` sees it before it starts)."""
    cfg = load_inside_config(Path(dep["inside"]["config"]))
    stop = threading.Event()
    agent = InsideAgent(cfg, stop)
    if prepare is not None:
        prepare(agent)
    t = threading.Thread(target=agent.run, daemon=True)
    switch = sys.getswitchinterval()
    t.start()
    time.sleep(1.0)
    try:
        yield agent
    finally:
        stop.set()
        t.join(30)
        sys.setswitchinterval(switch)


def _deployment(tmp_path: Path) -> tuple[dict[str, Any], int]:
    dep = init(tmp_path / "d")
    port = _free_port()

    def inside(data: dict[str, Any]) -> None:
        data["link"]["udp"]["port"] = port
        data.pop("consumers", None)
        for ch in data["channels"]:
            if ch.get("kind") == "messages":
                ch["consumers"] = False

    edit_yaml(dep["inside"]["config"], inside)
    return dep, port


def _state(dep: dict[str, Any], oid: bytes) -> str | None:
    db = sqlite3.connect(f"file:{dep['inside']['state_dir']}/inside.db?mode=ro", uri=True)
    try:
        row = db.execute("SELECT state FROM objects WHERE object_id=?", (oid,)).fetchone()
    finally:
        db.close()
    return None if row is None else str(row[0])


def _wait(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_a_forged_copy_does_not_keep_the_genuine_item_out(
    tmp_path: Path,
) -> None:
    """A copy whose manifest signature does not verify says nothing of the object id it came
    under (never authenticated): it is recorded lost (NOT_AUTHENTIC), not refused, and the
    genuine, validly signed item with that id, arriving later, is delivered (the id was
    recorded rejected in the ledger and kept in the receiver's finished set, and the
    genuine item dropped as a repeat)."""
    dep, port = _deployment(tmp_path)
    folder = Path(dep["channels"]["messages"]["deliver"])
    with running_inside(dep) as agent:
        link = Link(dep, port)
        try:
            canonical = _application(1)
            m = message_manifest(
                "messages", 1, "citizen-application", canonical,
                sender=link.key.public.key_id, client="portal",
            )  # fmt: skip
            link.send(m.object_id, link.stream(m, canonical, forged=True))
            assert _wait(lambda: agent.lost == 1, 10)  # (that copy: NOT_AUTHENTIC)
            assert _state(dep, m.object_id) is None  # (not refused)
            link.send(m.object_id, link.stream(m, canonical, forged=False))  # the genuine one
            delivered = _wait(lambda: _state(dep, m.object_id) == "delivered", 10)
        finally:
            link.close()
    assert delivered, (
        f"genuine signed item {m.object_id.hex()} never delivered: state "
        f"{_state(dep, m.object_id)!r}, folder {sorted(p.name for p in folder.iterdir())}"
    )
    lost = [
        json.loads(line)
        for seg in sorted(Path(dep["inside"]["audit_dir"]).glob("audit-*.jsonl"))
        for line in seg.read_text().splitlines()
        if '"transfer.lost"' in line
    ]
    assert [r["object"]["item"] for r in lost] == [m.object_id.hex()]
    assert lost[0]["reason"].startswith("NOT_AUTHENTIC: ")


@pytest.fixture
def state_disk(tmp_path: Path) -> Iterator[Any]:
    """Put the inside's state and audit folders on one small tmpfs (as on one state disk)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    mounted: list[Path] = []

    def mount(dep: dict[str, Any], size: str) -> Path:
        disk = tmp_path / "disk"
        disk.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(disk)], check=True)  # fmt: skip
        mounted.append(disk)
        for what in ("state_dir", "audit_dir"):
            src = Path(dep["inside"][what])
            shutil.copytree(src, disk / src.name)
            shutil.rmtree(src)
            src.symlink_to(disk / src.name)
        return disk

    yield mount
    for m in mounted:
        subprocess.run(["umount", "-l", str(m)], check=False)


RESERVE = 8 * MiB


@contextmanager
def small_state_disk(dep: dict[str, Any], state_disk: Any) -> Iterator[tuple[Path, list[int]]]:
    """The inside's state on a 40 MiB tmpfs with an 8 MiB spool_reserve; yields the disk and
    [the least room free seen on it], sampled until the block ends."""
    edit_yaml(
        dep["inside"]["config"],
        lambda d: d.setdefault("inside", {}).__setitem__("spool_reserve", "8M"),
    )
    disk = state_disk(dep, "40m")
    low = [free_bytes(disk) or 0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            low[0] = min(low[0], free_bytes(disk) or 0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield disk, low
    finally:
        done.set()
        sampler.join()


def refused_message(link: Link, seq: int) -> tuple[bytes, bytes]:
    """(object id, stream) of a signed message of 250 KiB that the inside's re-check refuses
    (not JSON), so it keeps a copy."""
    body = os.urandom(250 * 1024)
    m = rec.Manifest(
        object_id=os.urandom(16), kind="message", channel="messages", seq=seq,
        name=f"x-{seq}.json", media_type="application/json", size=len(body),
        sha256=hashlib.sha256(body).digest(), created_us=1, mtime_us=1,
        sender=link.key.public.key_id, schema="citizen-application",
    )  # fmt: skip
    return m.object_id, link.stream(m, body, forged=False)


def test_refused_objects_kept_never_take_the_state_disks_reserve(
    tmp_path: Path, state_disk: Any
) -> None:
    """Refused objects kept in state/rejected/ took up to 4 GiB whatever the room left on the
    state disk: they never take inside.spool_reserve (the room the ledger, the audit log and
    deliveries need). Here the state disk has 40 MiB, the reserve is 8 MiB, and 180
    messages of 250 KiB come, signed, that the inside's re-check refuses (not JSON); the
    reserve holds, and a genuine message sent afterwards is delivered (the disk went down
    to nothing, the audit log could not write, and delivery stopped for good)."""
    dep, port = _deployment(tmp_path)
    folder = Path(dep["channels"]["messages"]["deliver"])
    with small_state_disk(dep, state_disk) as (_, low), running_inside(dep) as agent:
        link = Link(dep, port)
        try:
            for seq in range(180):
                link.send(*refused_message(link, seq), k=200)
            time.sleep(3)
            canonical = _application(7)
            good = message_manifest(
                "messages", 1000, "citizen-application", canonical,
                sender=link.key.public.key_id, client="portal",
            )  # fmt: skip
            link.send(good.object_id, link.stream(good, canonical, forged=False))
            delivered = _wait(lambda: _state(dep, good.object_id) == "delivered", 15)
            problem = agent.audit.log.problem
        finally:
            link.close()
    kept = sum(p.stat().st_size for p in (Path(dep["inside"]["state_dir"]) / "rejected").iterdir())
    facts = (
        f"state disk down to {low[0]} bytes free (reserve {RESERVE}); refused objects "
        f"kept: {kept} bytes; audit log problem: {problem!r}; genuine message delivered: "
        f"{delivered}; folder: {sorted(p.name for p in folder.iterdir())}"
    )
    # (the reserve is there for the ledger, the audit log and deliveries: they use some)
    assert low[0] >= RESERVE // 2, facts
    assert 0 < kept <= 40 * MiB - RESERVE, facts  # (some were kept, then no more)
    assert problem is None, facts
    assert delivered, facts


def _file(key: Any, seq: int, size: int) -> tuple[rec.Manifest, bytes]:
    body = os.urandom(size)
    m = rec.Manifest(
        object_id=os.urandom(16), kind="file", channel="documents", seq=seq,
        name=f"genuine-{seq}.bin", media_type="application/octet-stream", size=len(body),
        sha256=hashlib.sha256(body).digest(), created_us=1, mtime_us=1,
        sender=key.public.key_id,
    )  # fmt: skip
    return m, body + build_trailer(m, key)


def test_a_forged_copy_in_memory_leaves_the_genuine_copy_waiting_in_the_spool(
    tmp_path: Path,
) -> None:
    """A genuine, signed file waits in the spool for its delivery (kept from before a
    restart: the receiver does not know it as finished), its lane busy with another file
    (held here by the one-file-at-a-time verification lock, as a big file being hashed and
    re-checked holds it). A forged single-block copy under the same id, claiming to be a
    message, fails a message lane's check (NOT_AUTHENTIC): the genuine copy in the spool is
    left alone and delivered (it was removed as if it were the copy that failed, the lane
    then refused the item for the missing file, and later genuine repeats were dropped)."""
    dep, port = _deployment(tmp_path)
    edit_yaml(dep["inside"]["config"], opaque)  # (random bytes, no re-check)
    key = load_secret_key(Path(dep["outside"]["signing_key"]), ("ed25519",))
    spool = Path(dep["inside"]["state_dir"]) / "incoming"
    spool.mkdir(parents=True, exist_ok=True)
    g, gstream = _file(key, 1, 64 * 1024)
    (spool / f"{g.object_id.hex()}.obj").write_bytes(gstream)  # (kept from before a restart)

    def busy(agent: InsideAgent) -> None:  # another file being verified and re-checked
        agent._checking.acquire()

    with running_inside(dep, busy) as agent:
        link = Link(dep, port)
        try:
            forged = dataclasses.replace(g, kind="message", channel="messages")
            link.send(g.object_id, link.stream(forged, b"x" * 1000, forged=True))
            assert _wait(lambda: agent.lost == 1, 10)  # (that copy: NOT_AUTHENTIC)
            genuine_copy_still_there = (spool / f"{g.object_id.hex()}.obj").exists()
            agent._checking.release()
            _wait(lambda: _state(dep, g.object_id) is not None, 10)
            link.send(g.object_id, gstream)  # a later genuine copy (the channel's repeat)
            delivered = _wait(lambda: _state(dep, g.object_id) == "delivered", 10)
            state = _state(dep, g.object_id)
        finally:
            link.close()
    folder = Path(dep["channels"]["documents"]["deliver"])
    assert delivered, (
        f"genuine item never delivered: its spool copy still there after the forged copy: "
        f"{genuine_copy_still_there}; ledger state {state!r}; folder "
        f"{sorted(p.name for p in folder.iterdir())}"
    )


def test_a_refused_copy_kept_never_takes_the_room_promised_to_an_object_still_arriving(
    tmp_path: Path, state_disk: Any
) -> None:
    """The spool admits an object only if the reserve stays free once every object being
    spooled has arrived. Refused copies kept while a big object arrives count its bytes still
    to come too: the big object then fits, and the reserve holds (they took its room, and it
    wrote on into the reserve and a full disk: ENOSPC)."""
    dep, port = _deployment(tmp_path)
    problem = None
    with small_state_disk(dep, state_disk) as (disk, low), running_inside(dep) as agent:
        link = Link(dep, port)
        try:
            big, bstream = _file(link.key, 1, 22 * MiB)  # (admitted: 22 MiB + reserve fit)
            sender = link.sender
            sender.submit(OutgoingObject(big.object_id, len(bstream), BytesSource(bstream),
                                         priority=3))  # fmt: skip
            for _ in range(4):  # its first blocks: it is admitted and being spooled
                for d in sender.datagrams(time.time(), 256):
                    link.sock.send(d)
                time.sleep(0.01)
            time.sleep(0.5)
            oids = set()
            for seq in range(110):  # signed messages the inside refuses (not JSON), kept
                oid, stream = refused_message(link, seq)
                sender.submit(OutgoingObject(oid, len(stream), BytesSource(stream), fec=(200, 2)))
                oids.add(oid)
            while oids:  # the messages (priority 2) go before the rest of the big object
                for d in sender.datagrams(time.time(), 64):
                    link.sock.send(d)
                oids -= {e.object_id for e in sender.pop_events()}
                time.sleep(0.002)
            _wait(lambda: agent.rejected >= 110, 30)
            time.sleep(1)
            before = free_bytes(disk)
            link.flush()  # the rest of the big object
            time.sleep(3)
            problem = agent.audit.log.problem
        finally:
            link.close()
    kept = sum(p.stat().st_size for p in (Path(dep["inside"]["state_dir"]) / "rejected").iterdir())
    facts = (
        f"state disk down to {low[0]} bytes free (reserve {RESERVE}); free before the rest "
        f"of the big object: {before}; refused copies kept {kept}; audit log problem "
        f"{problem!r}; lost {agent.lost}"
    )
    assert low[0] >= RESERVE // 2, facts
    assert problem is None, facts


def test_a_genuine_copy_spooled_under_the_id_of_a_forged_one_outlives_its_batch(
    tmp_path: Path,
) -> None:
    """A forged copy read from the spool fails a message lane's check (NOT_AUTHENTIC): it is
    removed and the receiver told to take a later copy. The genuine copy, spooled under the
    same name while the batch is still being delivered (a slow messages folder), is not
    removed when the batch ends, and is delivered (the batch's cleanup removed the name
    again, and the item was then refused for good for the missing file)."""
    dep, port = _deployment(tmp_path)
    edit_yaml(dep["inside"]["config"], opaque)
    spool = Path(dep["inside"]["state_dir"]) / "incoming"
    gates = [threading.Event(), threading.Event()]
    calls: list[int] = []

    def slow_folder(agent: InsideAgent) -> None:  # a messages folder slow to answer (a share)
        orig = agent._deliver_messages_audited

        def slow(*a: Any, **kw: Any) -> Any:
            i = len(calls)
            calls.append(i)
            if i < len(gates):
                gates[i].wait(30)
            return orig(*a, **kw)

        agent._deliver_messages_audited = slow  # type: ignore[method-assign]

    with running_inside(dep, slow_folder) as agent:
        link = Link(dep, port)
        try:

            def msg(seq: int) -> tuple[bytes, bytes]:
                c = _application(seq)
                m = message_manifest(
                    "messages", seq, "citizen-application", c,
                    sender=link.key.public.key_id, client="portal",
                )  # fmt: skip
                return m.object_id, link.stream(m, c, forged=False)

            link.send(*msg(1))  # batch 1: held in its delivery
            assert _wait(lambda: len(calls) == 1, 10)
            g, gstream = _file(link.key, 1, 300 * 1024)  # the genuine file
            copy = spool / f"{g.object_id.hex()}.obj"
            body = os.urandom(300 * 1024)  # a forged copy under its id, claiming a message
            forged = rec.Manifest(
                object_id=g.object_id, kind="message", channel="messages", seq=5,
                name="f.json", media_type="application/json", size=len(body),
                sha256=hashlib.sha256(body).digest(), created_us=1, mtime_us=1,
                sender=link.key.public.key_id, schema="citizen-application",
            )  # fmt: skip
            link.send(g.object_id, link.stream(forged, body, forged=True))  # spooled (> 256 KiB)
            assert _wait(copy.exists, 10)
            time.sleep(0.5)
            link.send(*msg(2))
            time.sleep(0.5)
            gates[0].set()  # batch 2: [forged copy, message 2]
            assert _wait(lambda: agent.lost == 1 and len(calls) == 2, 10)  # NOT_AUTHENTIC
            agent._checking.acquire()  # the documents lane busy with another file meanwhile
            time.sleep(1.5)  # (the receiver forgets the id at its next tick)
            link.send(g.object_id, gstream)  # the genuine file, spooled under the same id
            assert _wait(copy.exists, 10)
            time.sleep(0.5)
            gates[1].set()  # batch 2 ends: its cleanup unlinks <id>.obj again
            time.sleep(0.5)
            still = copy.exists()
            agent._checking.release()
            _wait(lambda: _state(dep, g.object_id) is not None, 10)
            state = _state(dep, g.object_id)
        finally:
            for gate in gates:
                gate.set()
            link.close()
    assert state == "delivered", (
        f"genuine copy still spooled after the batch: {still}; state {state!r}"
    )

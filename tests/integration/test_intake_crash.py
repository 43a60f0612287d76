"""kill -9 of the outside agent during intake: nothing lost, nothing doubled, nothing partial.

Real agents (subprocesses) over real UDP on loopback, real watchdog on the drop
folder, real SQLite spool and ledger, real ZeroMQ with CURVE. The outside is
killed with SIGKILL several times while it is taking files (timed by the
originals appearing in ``sent/``) or while an API client is pipelining
submissions, then restarted; every item must arrive inside exactly once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from cli_helpers import Agent, drop_file, edit_yaml, fast, init, opaque

from ferry.client import Consumer
from ferry.config import load_client_config
from ferry.crypto.keys import load_public_key, load_secret_key
from ferry.zmqsec import curve_client

pytestmark = pytest.mark.integration

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas" / "messages"
MiB = 1024 * 1024

StartAgent = Callable[[str, str], Agent]


def _application(n: int) -> bytes:
    doc = json.loads((SCHEMAS / "citizen-application.schema.json").read_text())["examples"][0]
    doc = copy.deepcopy(doc)
    doc["application_id"] = str(uuid.UUID(int=n + 1))
    return json.dumps(doc, ensure_ascii=False).encode()


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def _kill(agent: Agent) -> None:
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(timeout=10)
    assert agent.proc.returncode == -signal.SIGKILL


def _db_rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


class PartialWatch(threading.Thread):
    """Looks at the delivery folder while files arrive: anything visible must be complete."""

    def __init__(self, folder: Path, expected: dict[str, bytes]) -> None:
        super().__init__(daemon=True)
        self.folder = folder
        self.sizes = {name: len(data) for name, data in expected.items()}
        self.bad: list[str] = []
        self.looks = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for entry in os.scandir(self.folder):
                size = self.sizes.get(entry.name)
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if size is None or st.st_size != size:
                    self.bad.append(f"{entry.name}: {st.st_size} bytes, expected {size}")
            self.looks += 1
            self.stop.wait(0.01)


def _make_files(count: int, big: dict[int, int]) -> dict[str, bytes]:
    """``count`` files of mixed sizes (9 B .. 192 KiB), a few big ones (``index: MiB``).

    Each starts with its own name, so no two have the same content."""
    rnd = random.Random(1234)
    out: dict[str, bytes] = {}
    for i in range(count):
        size = big[i] * MiB + 17 if i in big else rnd.choice([0, 1, 100, 4096, 70_000, 192 * 1024])
        name = f"doc-{i:03d}.bin"
        out[name] = name.encode() + rnd.randbytes(size)
    return out


def _wait_count(folder: Path, n: int, agent: Agent, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        have = len(_files_under(folder))
        if have >= n:
            return have
        assert agent.proc.poll() is None, agent.log.read_text()[-3000:]
        time.sleep(0.005)
    raise AssertionError(f"only {len(_files_under(folder))} of {n} in {folder}")


def test_kill_9_during_folder_intake_delivers_every_file_exactly_once(
    tmp_path: Path, agents: StartAgent
) -> None:
    dep = init(tmp_path / "d")

    def out(data: dict[str, Any]) -> None:
        fast(data)
        data["link"]["rate"] = "80M"  # ~10 MB/s: items are still spooled when the kill comes
        for ch in data["channels"]:
            ch.pop("content", None)  # random bytes: this is about intake, not content checks

    edit_yaml(dep["outside"]["config"], out)
    edit_yaml(dep["inside"]["config"], opaque)
    docs = dep["channels"]["documents"]
    drop, sent, deliver = Path(docs["drop"]), Path(docs["sent"]), Path(docs["deliver"])
    state = Path(dep["outside"]["state_dir"])
    files = _make_files(200, big={7: 3, 60: 6, 133: 4, 181: 8})
    names = sorted(files)
    first, second = names[:160], names[160:]

    inside = agents("inside", dep["inside"]["config"])
    inside.wait_event("inside_started")
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("outside_started")
    watch = PartialWatch(deliver, files)
    watch.start()

    def clerk() -> None:  # drops files steadily (the intake takes several at a time, so a
        for name in first:  # kill comes in the middle only while more keep coming)
            drop_file(drop, name, files[name])
            time.sleep(0.04)

    dropping = threading.Thread(target=clerk)
    dropping.start()
    kills: list[tuple[int, int]] = []  # (originals in sent/, files still in the drop folder)
    for kill_at, late_drops in ((20, second), (80, []), (130, [])):
        have = _wait_count(sent, kill_at, outside, timeout=60)
        _kill(outside)
        kills.append((have, len(_files_under(drop))))
        for name in late_drops:  # dropped while the agent is down: taken at start-up
            drop_file(drop, name, files[name])
        outside = agents("outside", dep["outside"]["config"])
        outside.wait_event("outside_started")
    dropping.join()

    deadline = time.monotonic() + 90
    while len(_files_under(deliver)) < len(files) and time.monotonic() < deadline:
        for agent in (inside, outside):
            assert agent.proc.poll() is None, agent.log.read_text()[-3000:]
        time.sleep(0.1)
    time.sleep(1.0)  # anything resent after a kill has arrived too
    watch.stop.set()
    watch.join()
    assert outside.stop() == 0

    # Every kill really came in the middle of the intake.
    print("kills (in sent/, left in drop/):", kills)
    assert all(have < len(files) and left > 0 for have, left in kills), kills
    assert watch.looks > 100
    assert watch.bad == []  # never a partial or unexpected file in the delivery folder

    delivered = {p.name: p.read_bytes() for p in _files_under(deliver)}
    assert sorted(delivered) == names  # exactly once: no "doc (2).bin", none missing
    for name in names:
        assert hashlib.sha256(delivered[name]).digest() == hashlib.sha256(files[name]).digest()
    # the originals: each in sent/ exactly once, unchanged; none left in the drop folder
    assert _files_under(drop) == []
    originals = {p.relative_to(sent).as_posix(): p.read_bytes() for p in _files_under(sent)}
    assert originals == files
    assert list((state / "intake").glob("*.part")) == []

    # The spool took each file once; the inside delivered each object once. Every original
    # is in sent/, so no item still names its source (a file moved back is a new drop).
    rows = _db_rows(
        state / "outside.db",
        "SELECT count(*), count(source_key), count(DISTINCT sha256), count(DISTINCT seq),"
        " sum(state='sent') FROM items WHERE channel='documents'",
    )
    assert rows == [(200, 0, 200, 200, 200)]
    ledger = _db_rows(
        Path(dep["inside"]["state_dir"]) / "inside.db",
        "SELECT state, count(*) FROM objects WHERE channel='documents' GROUP BY state",
    )
    assert ledger == [("delivered", 200)]


# ----------------------------------------------------------------------------- API


class RawClient:
    """A pipelining API client with our own submission ids (DEALER, CURVE)."""

    def __init__(self, config: str) -> None:
        cfg = load_client_config(Path(config))
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = curve_client(
            self.ctx,
            zmq.DEALER,
            load_secret_key(cfg.client_key),
            load_public_key(cfg.server_public_key, cfg.source.parent),
            hwm=100_000,
        )
        self.sock.connect(cfg.endpoint)

    def send(self, sid: str, n: int) -> None:
        body = {"id": sid, "channel": "messages", "schema": "citizen-application"}
        self.sock.send_multipart([b"FERRY/1", b"SUBMIT", msgpack.packb(body), _application(n)])

    def replies(self, timeout_ms: int) -> list[tuple[bytes, dict[str, Any]]]:
        out = []
        while self.sock.poll(timeout_ms):
            frames = self.sock.recv_multipart()
            out.append((frames[1], msgpack.unpackb(frames[2])))
            timeout_ms = 0
        return out

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def test_kill_9_while_api_client_pipelines_then_resubmission_makes_no_duplicates(
    tmp_path: Path, agents: StartAgent
) -> None:
    dep = init(tmp_path / "d")

    def out(data: dict[str, Any]) -> None:
        fast(data)
        data["api"]["busy_items"] = 1_000_000
        for ch in data["channels"]:
            if ch["name"] == "messages":  # the second copy arrives while we check
                ch["repeat"] = {"count": 2, "spread": 2}

    edit_yaml(dep["outside"]["config"], out)
    entry = Path(dep["api"]["allowlist_entry"])
    entry.write_text(entry.read_text().replace("rate: 5000", "rate: 1000000"))
    n_total, kill_after = 4000, 300
    sids = {f"crash-{n}": n for n in range(n_total)}

    inside = agents("inside", dep["inside"]["config"])
    inside.wait_event("inside_started")
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("api_listening")
    client = RawClient(dep["api"]["client_config"])
    before: dict[str, dict[str, Any]] = {}
    sent: list[str] = []
    try:
        # The kill comes while the client is still sending, as soon as kill_after answers
        # are in (the outside keeps up with a client that sends everything first).
        deadline = time.monotonic() + 30
        for sid, n in sids.items():
            client.send(sid, n)
            sent.append(sid)
            if len(sent) % 20 == 0 or len(sent) == n_total:
                for verb, body in client.replies(0):
                    assert verb == b"ACCEPTED", (verb, body)
                    before[body["id"]] = body
            if len(before) >= kill_after:
                break
        while len(before) < kill_after and time.monotonic() < deadline:
            for verb, body in client.replies(100):
                assert verb == b"ACCEPTED", (verb, body)
                before[body["id"]] = body
        # a burst just before the kill: the outside cannot have answered all of it (without
        # it, a fast outside sometimes answered everything sent before the kill landed)
        taken = set(sent)
        for sid in [sid for sid in sids if sid not in taken][:500]:
            client.send(sid, sids[sid])
            sent.append(sid)
        _kill(outside)
        for verb, body in client.replies(300):  # what was already on its way to us
            assert verb == b"ACCEPTED", (verb, body)
            before[body["id"]] = body
    finally:
        client.close()
    unanswered = [sid for sid in sids if sid not in before]
    assert len(before) >= kill_after
    assert [sid for sid in sent if sid not in before]  # the kill came mid-pipeline

    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("api_listening")
    client = RawClient(dep["api"]["client_config"])
    after: dict[str, dict[str, Any]] = {}
    try:
        for sid in list(before) + unanswered:  # everything again, same ids, same content
            client.send(sid, sids[sid])
        deadline = time.monotonic() + 60
        while len(after) < n_total and time.monotonic() < deadline:
            for verb, body in client.replies(200):
                assert verb == b"ACCEPTED", (verb, body)
                after[body["id"]] = body
    finally:
        client.close()
    assert after.keys() == sids.keys()
    for sid, first in before.items():  # acknowledged before the kill: durable, same answer
        again = after[sid]
        assert (again["item"], again["seq"], again["duplicate"]) == (
            first["item"],
            first["seq"],
            True,
        )
    items = {body["item"] for body in after.values()}
    assert len(items) == n_total
    assert sorted(body["seq"] for body in after.values()) == list(range(1, n_total + 1))

    folder = Path(dep["channels"]["messages"]["deliver"])
    deadline = time.monotonic() + 60
    while len(list(folder.glob("*.json"))) < n_total and time.monotonic() < deadline:
        for agent in (inside, outside):
            assert agent.proc.poll() is None, agent.log.read_text()[-3000:]
        time.sleep(0.1)
    time.sleep(3.0)  # the second copies (2 s later) and anything resent after the kill
    files = sorted(folder.glob("*.json"))
    ids = [json.loads(p.read_bytes())["application_id"] for p in files]
    assert len(files) == n_total
    assert sorted(ids) == sorted(str(uuid.UUID(int=n + 1)) for n in range(n_total))

    with Consumer.from_config(dep["consumers"]["client_config"], credit=2000) as consumer:
        got: set[str] = set()
        deadline = time.monotonic() + 60
        while got != items and time.monotonic() < deadline:
            batch = consumer.receive(timeout=0.5)
            got.update(d.item for d in batch)
            if batch:
                consumer.ack([d.item for d in batch])
    assert got == items

    outside_db = Path(dep["outside"]["state_dir"]) / "outside.db"
    assert _db_rows(
        outside_db, "SELECT count(*), count(DISTINCT sha256) FROM items WHERE channel='messages'"
    ) == [(n_total, n_total)]
    assert _db_rows(outside_db, "SELECT count(*) FROM submissions") == [(n_total,)]
    ledger = _db_rows(
        Path(dep["inside"]["state_dir"]) / "inside.db",
        "SELECT state, count(*) FROM objects WHERE channel='messages' GROUP BY state",
    )
    assert ledger == [("delivered", n_total)]


def test_spool_files_left_by_a_crash_before_their_commit_are_removed_at_start(
    tmp_path: Path, agents: StartAgent
) -> None:
    """A kill between the rename into spool/ and the commit of its row leaves an object file
    no row refers to (the file is taken again after the restart, under a new object id).
    The kill -9 test above left one in 4 of 7 runs; here that state is made
    directly: such files must not pile up in the spool forever."""
    dep = init(tmp_path / "d")
    edit_yaml(dep["outside"]["config"], fast)
    spool = Path(dep["outside"]["state_dir"]) / "spool"
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("outside_started")
    assert outside.stop() == 0
    orphan = spool / f"{os.urandom(16).hex()}.obj"
    orphan.write_bytes(b"content and trailer of an item whose row was never committed")
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("outside_started")
    time.sleep(1.0)
    assert outside.stop() == 0
    assert list(spool.iterdir()) == []

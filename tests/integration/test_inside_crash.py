"""kill -9 of the inside agent while files and messages are being delivered: nothing
partial is ever visible, nothing is delivered twice, and every item is delivered once the
inside runs again (standards T09, for the inner agent).

Real agents (subprocesses) over real UDP on loopback, real watchdog, real SQLite, real
ZeroMQ with CURVE. Every item is sent twice, 12 s apart (the channels' repeat schedule):
the inside is killed and restarted at random moments in the first seconds, so copies that
arrive while it is down are lost on the one-way link, and the second copies come after the
kills. Files of mixed sizes go on a bulk channel (the small ones whole in memory, the
large ones through the inside's spool); messages go to the messages channel's folder and
its consumers.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import Agent, drop_file, edit_yaml, fast_bulk, ferry, init
from test_intake_crash import PartialWatch, RawClient, _application, _db_rows, _kill

from ferry.client import Consumer

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
FILES = 60
MESSAGES = 150


def _files() -> dict[str, bytes]:
    rnd = random.Random(7)
    out: dict[str, bytes] = {}
    for i in range(FILES):
        size = 3 * MiB if i % 20 == 7 else rnd.choice([0, 100, 4096, 70_000, 192 * 1024])
        name = f"doc-{i:03d}.bin"
        out[name] = name.encode() + rnd.randbytes(size)
    return out


def _configure(data: dict[str, Any]) -> None:
    fast_bulk(data)
    data["link"]["rate"] = "40M"  # about 5 MB/s: the first copies take seconds to cross
    for ch in data["channels"]:
        if ch["name"] in ("archive", "messages") and data["role"] == "outside":
            ch["repeat"] = {"count": 2, "spread": 12}


def _message_ids(folder: Path) -> list[str]:
    return [json.loads(p.read_bytes())["application_id"] for p in folder.iterdir()]


def test_kill_9_of_the_inside_during_delivery_loses_nothing_and_doubles_nothing(
    tmp_path: Path,
) -> None:
    dep = init(tmp_path / "d", "--bulk", "archive")
    edit_yaml(dep["outside"]["config"], _configure)
    edit_yaml(dep["inside"]["config"], _configure)
    files = _files()
    deliver = Path(dep["channels"]["archive"]["deliver"])
    messages = Path(dep["channels"]["messages"]["deliver"])
    want_ids = sorted(json.loads(_application(n))["application_id"] for n in range(MESSAGES))
    logs = tmp_path / "logs"
    logs.mkdir()
    started: list[Agent] = []

    def start(side: str) -> Agent:
        agent = Agent(side, dep[side]["config"], logs / f"{side}-{len(started)}.log")
        started.append(agent)
        return agent

    inside = start("inside")
    inside.wait_event("inside_started")
    outside = start("outside")
    outside.wait_event("api_listening")
    watch = PartialWatch(deliver, files)
    watch.start()
    client = RawClient(dep["api"]["client_config"])
    seed = random.randrange(1 << 30)
    print("kill timing seed:", seed)
    rnd = random.Random(seed)
    kills: list[tuple[int, int]] = []  # (files, messages) delivered when it was killed
    try:
        for name, data in files.items():
            drop_file(dep["channels"]["archive"]["drop"], name, data)
        wave = MESSAGES // 3
        for k in range(3):  # killed while it delivers, at random moments
            for n in range(k * wave, (k + 1) * wave):
                client.send(f"crash-{n}", n)
            time.sleep(rnd.uniform(0.0, 0.8))
            # The last kill comes once something is delivered at least: with three short
            # draws (seed 512734553) every kill hit an inside that had delivered nothing.
            until = time.monotonic() + 10
            while k == 2 and time.monotonic() < until:
                if any(deliver.iterdir()) or any(messages.iterdir()):
                    break
                time.sleep(0.02)
            kills.append((len(list(deliver.iterdir())), len(list(messages.iterdir()))))
            _kill(inside)
            inside = start("inside")
            inside.wait_event("inside_started")
        answers = client.replies(10_000)
        while len(answers) < MESSAGES and (more := client.replies(5_000)):
            answers += more
        assert [a[0] for a in answers] == [b"ACCEPTED"] * MESSAGES

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            have = {p.name for p in deliver.iterdir()}
            if have >= files.keys() and len(list(messages.iterdir())) >= MESSAGES:
                break
            assert inside.proc.poll() is None, inside.log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)  # anything delivered late (a second copy) would show now
    finally:
        watch.stop.set()
        watch.join()
        client.close()
        for agent in started:
            agent.stop()

    print("kills (files, messages delivered):", kills)
    assert len(kills) == 3
    assert all(f + m < FILES + MESSAGES for f, m in kills), kills  # each during delivery
    assert any(f + m > 0 for f, m in kills), kills
    assert watch.bad == []  # never a partial or a doubled file in the delivery folder
    delivered = {p.name: p.read_bytes() for p in deliver.iterdir()}
    assert sorted(delivered) == sorted(files)  # exactly once: no "doc (2).bin", none missing
    for name, data in files.items():
        assert hashlib.sha256(delivered[name]).digest() == hashlib.sha256(data).digest()
    assert sorted(_message_ids(messages)) == want_ids  # each message once, none missing

    state = Path(dep["inside"]["state_dir"])
    ledger = _db_rows(
        state / "inside.db",
        "SELECT channel, state, count(*) FROM objects WHERE channel IN ('archive', 'messages')"
        " GROUP BY channel, state ORDER BY channel",
    )
    assert ledger == [("archive", "delivered", FILES), ("messages", "delivered", MESSAGES)]
    assert list((state / "rejected").iterdir()) == []

    # the consumers get every message (at least once: a crash may offer one again)
    got: set[str] = set()
    with Consumer.from_config(dep["consumers"]["client_config"]) as consumer:
        inside = start("inside")
        try:
            deadline = time.monotonic() + 60
            while len(got) < MESSAGES and time.monotonic() < deadline:
                batch = consumer.receive(timeout=0.5)
                got.update(json.loads(d.body)["application_id"] for d in batch)
                if batch:
                    consumer.ack([d.item for d in batch])
        finally:
            inside.stop()
    assert sorted(got) == want_ids

    # the auditor's view: the inside's log verifies, and reconciles with the outside's
    verified = ferry(
        "audit", "verify", dep["inside"]["audit_dir"],
        "--key", dep["inside"]["audit_public_key"], check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    out = ferry(
        "audit", "reconcile",
        "--outside", dep["outside"]["audit_dir"], "--inside", dep["inside"]["audit_dir"],
        "--outside-key", dep["outside"]["audit_public_key"],
        "--inside-key", dep["inside"]["audit_public_key"],
        "--grace", "0", "--json", check=False,
    )  # fmt: skip
    result = json.loads(out.stdout)
    states = {x["item"]: x["state"] for x in result["items"]}
    assert out.returncode == 0, [x for x in result["items"] if x["state"] != "delivered"][:5]
    assert len(states) == FILES + MESSAGES

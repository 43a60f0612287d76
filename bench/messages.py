"""Messages end to end: outer API -> outside -> UDP diode (loopback) -> inside -> consumer.

Starts a fresh ``ferry init`` deployment (both agents as subprocesses, as in
production), then from this process an API client (DEALER, CURVE) submits
citizen-application messages and an inner consumer (DEALER, CURVE) receives
and acknowledges them. Two measurements:

1. throughput: N messages pipelined as fast as the gateway accepts them;
   messages/s counted from the first submission to the last one received by
   the consumer;
2. latency at a fixed rate (default 1,000 messages/s for 10 s): for each
   message, the time from handing it to the client socket to its arrival at
   the consumer (same clock, same process); p50, p99 and max.

    .venv/bin/python bench/messages.py [--count 20000] [--rate 1000] [--seconds 10] [--no-folder]
        [--outside-on DIR] [--inside-on DIR]

``--inside-on /dev/shm`` (or ``--outside-on``) keeps that agent's whole deployment (spool,
ledger, audit log, delivery folder) on another filesystem: on tmpfs, what that side's
waits for the disk cost; on another disk, a two-host set-up where the agents do not share
one disk and one journal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import yaml
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ferry.client import Consumer  # noqa: E402
from ferry.config import load_client_config  # noqa: E402
from ferry.crypto.keys import load_public_key, load_secret_key  # noqa: E402
from ferry.zmqsec import curve_client  # noqa: E402

SCHEMA = ROOT / "schemas" / "messages" / "citizen-application.schema.json"


def _template() -> dict[str, Any]:
    return json.loads(SCHEMA.read_text())["examples"][0]  # type: ignore[no-any-return]


def _deploy(
    tmp: Path, repeat: int, folder: bool = True, on: dict[str, str | None] | None = None
) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "ferry.cli", "init", str(tmp / "d"), "--json"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    dep: dict[str, Any] = json.loads(out.stdout)
    for side, where in (on or {}).items():  # that side's files elsewhere, under the same path
        if where:
            moved = Path(tempfile.mkdtemp(prefix=f"ferry-bench-{side}-", dir=where)) / side
            shutil.move(tmp / "d" / side, moved)
            (tmp / "d" / side).symlink_to(moved)
    path = Path(dep["outside"]["config"])
    data = yaml.safe_load(path.read_text())
    for ch in data["channels"]:
        if ch.get("kind") == "messages":
            ch["repeat"] = {"count": repeat, "spread": 30}
    data["api"]["busy_items"] = 1_000_000
    path.write_text(yaml.safe_dump(data))
    if not folder:  # the consumers only: no .json file per message inside
        path = Path(dep["inside"]["config"])
        data = yaml.safe_load(path.read_text())
        for ch in data["channels"]:
            if ch.get("kind") == "messages":
                del ch["deliver"]
        path.write_text(yaml.safe_dump(data))
    entry = Path(dep["api"]["allowlist_entry"])
    entry.write_text(entry.read_text().replace("rate: 5000", "rate: 100000"))
    return dep


def _start(side: str, config: str, log: Path) -> subprocess.Popen[bytes]:
    fh = open(log, "wb")  # noqa: SIM115  # closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "ferry.cli", "--log-json", "--log-level", "warning", side, "run",
         "-c", config],
        stdout=fh, stderr=subprocess.STDOUT,
    )  # fmt: skip


class Collector(threading.Thread):
    """The inner consumer: receives, acknowledges, timestamps arrivals by application id."""

    def __init__(self, config: str) -> None:
        super().__init__(daemon=True)
        self.consumer = Consumer.from_config(config, credit=4096)
        self.arrived: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            batch = self.consumer.receive(timeout=0.2)
            now = time.perf_counter()
            for d in batch:
                at = d.body.index(b'"application_id":"') + 18  # canonical JSON, no spaces
                app_id = d.body[at : at + 36].decode()
                self.arrived.setdefault(app_id, now)
            if batch:
                self.consumer.ack([d.item for d in batch])
        self.consumer.close()


class Submitter:
    """A raw pipelined API client (the ferry.client protocol without per-call waits)."""

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
        template = _template()
        self.placeholder = str(uuid.UUID(int=0)).encode()
        template["application_id"] = self.placeholder.decode()
        self.encoded = json.dumps(template, ensure_ascii=False).encode()
        self.sent: dict[str, float] = {}
        self.acked: dict[str, float] = {}
        self.answers: dict[bytes, int] = {}

    def submit(self, n: int) -> None:
        # the load generator stays cheap (it shares the 2 cores with both agents): the
        # document is encoded once and only its application id changes
        app_id = str(uuid.UUID(int=n + 1))
        body = msgpack.packb({"id": f"bench-{n}", "channel": "messages",
                              "schema": "citizen-application"})  # fmt: skip
        data = self.encoded.replace(self.placeholder, app_id.encode())
        self.sent[app_id] = time.perf_counter()
        self.sock.send_multipart([b"FERRY/1", b"SUBMIT", body, data])

    def drain(self, timeout_ms: int = 0) -> int:
        got = 0
        while self.sock.poll(timeout_ms):
            frames = self.sock.recv_multipart()
            self.answers[frames[1]] = self.answers.get(frames[1], 0) + 1
            if frames[1] == b"ACCEPTED":
                n = int(msgpack.unpackb(frames[2])["id"].rsplit("-", 1)[1])
                self.acked.setdefault(str(uuid.UUID(int=n + 1)), time.perf_counter())
            got += 1
            timeout_ms = 0
        return got

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def _wait_all(collector: Collector, ids: set[str], timeout: float) -> float:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if ids <= collector.arrived.keys():
            return max(collector.arrived[i] for i in ids)
        time.sleep(0.01)
    missing = len(ids - collector.arrived.keys())
    raise SystemExit(f"{missing} of {len(ids)} messages did not reach the consumer")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(
    sub: Submitter, col: Collector, count: int, offset: int, pids: dict[str, int]
) -> dict[str, float]:
    window = 2000
    cpu0 = {side: _cpu_s(pid) for side, pid in pids.items()}
    self0 = time.process_time()
    t0 = time.perf_counter()
    answered = 0
    for n in range(offset, offset + count):
        sub.submit(n)
        if n - offset - answered >= window:
            answered += sub.drain(1000)
    while answered < count:
        got = sub.drain(2000)
        if not got:
            break
        answered += got
    t_acked = time.perf_counter()
    ids = {str(uuid.UUID(int=n + 1)) for n in range(offset, offset + count)}
    t_last = _wait_all(col, ids, 120)
    cpu = {side: _cpu_s(pid) - cpu0[side] for side, pid in pids.items()}
    cpu["bench"] = time.process_time() - self0
    return {
        **{f"cpu_us_per_msg_{side}": 1e6 * s / count for side, s in cpu.items()},
        "messages": count,
        "accepted_per_s": count / (t_acked - t0),
        "end_to_end_per_s": count / (t_last - t0),
        "seconds": t_last - t0,
    }


def latency(
    sub: Submitter, col: Collector, rate: float, seconds: float, offset: int
) -> dict[str, float]:
    count = int(rate * seconds)
    t0 = time.perf_counter()
    for i in range(count):
        due = t0 + i / rate
        # wait without spinning: the load generator must not take a core from the agents
        while (left := due - time.perf_counter()) > 0:
            if left >= 0.001:
                sub.drain(int(left * 1000))  # blocks in poll(2) until an answer or the time
            elif not sub.drain(0):
                time.sleep(left)
        sub.submit(offset + i)
    while sub.drain(500):
        pass
    ids = [str(uuid.UUID(int=offset + i + 1)) for i in range(count)]
    _wait_all(col, set(ids), 60)
    lat = sorted((col.arrived[i] - sub.sent[i]) * 1000 for i in ids)
    ack = sorted((sub.acked[i] - sub.sent[i]) * 1000 for i in ids if i in sub.acked)
    return {
        "ack_p50_ms": statistics.median(ack),
        "ack_p99_ms": ack[int(len(ack) * 0.99) - 1],
        "rate": rate,
        "messages": count,
        "p50_ms": statistics.median(lat),
        "p99_ms": lat[int(len(lat) * 0.99) - 1],
        "max_ms": lat[-1],
        "mean_ms": statistics.fmean(lat),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--count", type=int, default=20_000, help="messages in the throughput run")
    ap.add_argument("--rate", type=float, default=1000.0, help="messages/s in the latency run")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the latency run")
    ap.add_argument("--repeat", type=int, default=1, help="copies of each message (repeat.count)")
    ap.add_argument(
        "--no-folder",
        action="store_true",
        help="deliver to the inner consumers only (by default ferry init's messages channel "
        "also writes each message to a folder, durably, before the consumers get it)",
    )
    ap.add_argument("--outside-on", metavar="DIR", help="the outside's files on DIR's filesystem")
    ap.add_argument("--inside-on", metavar="DIR", help="the inside's files on DIR's filesystem")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sys.setswitchinterval(0.0005)  # the consumer thread timestamps arrivals without delay
    with tempfile.TemporaryDirectory(prefix="ferry-bench-msg-") as tmp_s:
        tmp = Path(tmp_s)
        on = {"outside": args.outside_on, "inside": args.inside_on}
        dep = _deploy(tmp, args.repeat, folder=not args.no_folder, on=on)
        procs = [
            _start("inside", dep["inside"]["config"], tmp / "inside.log"),
            _start("outside", dep["outside"]["config"], tmp / "outside.log"),
        ]
        try:
            time.sleep(3.0)  # agents up, self-tests done, API listening
            col = Collector(dep["consumers"]["client_config"])
            col.start()
            sub = Submitter(dep["api"]["client_config"])
            sub.submit(10_000_000)  # warm-up
            _wait_all(col, {str(uuid.UUID(int=10_000_001))}, 30)
            lat = latency(sub, col, args.rate, args.seconds, 0)
            pids = {"inside": procs[0].pid, "outside": procs[1].pid}
            thr = throughput(sub, col, args.count, 1_000_000, pids)
            col.stop.set()
            sub.close()
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(timeout=30)
            for side in on:  # (the temporary directory holds only the links)
                if (tmp / "d" / side).is_symlink():
                    shutil.rmtree((tmp / "d" / side).resolve().parent, ignore_errors=True)
        result = {"throughput": thr, "latency": lat, "folder": not args.no_folder, "answers": {
            k.decode(): v for k, v in sub.answers.items()}, "cpus": os.cpu_count()}  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"throughput: {thr['end_to_end_per_s']:.0f} messages/s end to end "
            f"({thr['messages']} messages in {thr['seconds']:.2f} s; "
            f"accepted at {thr['accepted_per_s']:.0f}/s)"
        )
        print(
            "CPU per message: "
            + ", ".join(f"{k[15:]} {v:.0f} µs" for k, v in thr.items() if k.startswith("cpu_us"))
        )
        print(
            f"latency at {lat['rate']:.0f} messages/s ({lat['messages']} messages): "
            f"p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms, max {lat['max_ms']:.1f} ms "
            f"(ACCEPTED after p50 {lat['ack_p50_ms']:.2f} ms, p99 {lat['ack_p99_ms']:.2f} ms)"
        )
        print(f"answers: {result['answers']}")
        where = "folder + consumers" if result["folder"] else "consumers only"
        print(f"inside delivery: {where}")
        for side in ("outside", "inside"):
            if on[side]:
                print(f"{side} files on {on[side]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Messages pre-empt bulk files: message latency with and without a large file on the link.

Issue 3 says: "a 1 GiB file in flight delays a message by no more than ~100 ms
plus its own transmission time". This measures it end to end on loopback with
both agents as subprocesses (a fresh ``ferry init`` deployment, set up by
bench/messages.py's helpers):

1. baseline: one message through the outer API every ``--interval`` seconds,
   timed from the hand-off to the API socket to its arrival at the inner
   consumer (same process, same clock);
2. the same while a ``--file-mib`` file dropped into the ``documents`` folder
   is on the link. Messages are counted from the moment the file's packets
   flow (the outside's ``bytes_sent`` has grown by 8 MiB) until the inside
   has delivered the file; they are split into those submitted while the
   outside was still sending the file ("on the link") and those submitted
   after its last packet, while the inside verified and delivered it.

The table gives p50, p99 and max for each phase, the delay added over the
baseline p50, and the message's own transmission time at the configured rate
(its FEC packets, headers included, at ``link.rate``). JSON goes to
bench/results/priority-<time>.json.

    .venv/bin/python bench/priority.py [--file-mib 1024] [--interval 0.2] [--rate 800M]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from messages import Collector, Submitter, _deploy, _wait_all  # noqa: E402

from ferry.config import load_outside_config  # noqa: E402
from ferry.wire.fec import block_count, block_layout  # noqa: E402
from ferry.wire.sender import symbol_size_for  # noqa: E402
from outside.agent import bundle_fec  # noqa: E402

RESULTS = ROOT / "bench" / "results"
FLOWING_BYTES = 8 * 1024 * 1024
"""The file counts as in flight once the outside sent this much more than before."""
IPV4_UDP_HEADERS = 28


def _start(side: str, config: str, log: Path) -> subprocess.Popen[bytes]:
    """Like messages._start, but with info-level logs: we read event times from them."""
    fh = open(log, "wb")  # noqa: SIM115  # closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "ferry.cli", "--log-json", side, "run", "-c", config],
        stdout=fh,
        stderr=subprocess.STDOUT,
    )


def _events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _find(log: Path, event: str, **match: object) -> dict[str, Any] | None:
    for ev in _events(log):
        if ev.get("event") == event and all(ev.get(k) == v for k, v in match.items()):
            return ev
    return None


def _wait_event(log: Path, event: str, timeout: float, **match: object) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = _find(log, event, **match)
        if ev is not None:
            return ev
        time.sleep(0.05)
    raise SystemExit(f"no {event} {match} in {log}:\n{log.read_text()[-2000:]}")


def _wall(ev: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp()


def _status(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return {}


def _pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(p * len(s)) - 1)]


def _summary(lat: list[float]) -> dict[str, float]:
    if not lat:
        return {"messages": 0}
    return {
        "messages": len(lat),
        "p50_ms": _pct(lat, 0.50),
        "p99_ms": _pct(lat, 0.99),
        "max_ms": max(lat),
    }


def _configure(dep: dict[str, Any], rate: str) -> None:
    path = Path(dep["outside"]["config"])
    data = yaml.safe_load(path.read_text())
    data["link"]["rate"] = rate
    data.setdefault("outside", {})["poll_interval"] = 0.01
    for ch in data["channels"]:
        if ch["name"] == "documents":
            ch["settle_seconds"] = 0
            ch["after_send"] = "delete"
            ch.pop("content", None)  # random bytes; content checks are not what is measured
    path.write_text(yaml.safe_dump(data))
    path = Path(dep["inside"]["config"])
    data = yaml.safe_load(path.read_text())
    data["link"]["rate"] = rate
    for ch in data["channels"]:
        if ch["name"] == "documents":
            ch["recheck"] = False  # the outside sends no content report for random bytes
    path.write_text(yaml.safe_dump(data))


def _write_random(path: Path, size: int) -> bytes:
    digest = hashlib.sha256()
    chunk = 16 * 1024 * 1024
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(chunk, left))
            digest.update(block)
            f.write(block)
            left -= len(block)
    return digest.digest()


def _paced(sub: Submitter, col: Collector, offset: int, interval: float, until: Any) -> list[int]:
    """Submit one message every ``interval`` s while ``until()`` is false; their numbers."""
    numbers = []
    t0 = time.perf_counter()
    i = 0
    while not until():
        due = t0 + i * interval
        while (now := time.perf_counter()) < due:
            sub.drain(0)
            time.sleep(min(due - now, 0.005))
        sub.submit(offset + i)
        numbers.append(offset + i)
        i += 1
    return numbers


def _message_airtime(dep: dict[str, Any]) -> dict[str, float]:
    """Packets and seconds one message takes on the link at the configured rate (a bundle
    of one: the member record, the bundle count and a trailer of about 400 bytes)."""
    cfg = load_outside_config(Path(dep["outside"]["config"]))
    db = Path(dep["outside"]["state_dir"]) / "outside.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        (length,) = con.execute("SELECT max(length) FROM items WHERE kind='message'").fetchone()
    finally:
        con.close()
    sym = symbol_size_for(cfg.link)
    length += 2 + 400  # bundle count + bundle trailer (manifest and signature)
    k, r = bundle_fec(-(-length // sym)) or (cfg.link.fec.source, cfg.link.fec.repair)
    packets = 0
    for b in range(block_count(length, k, sym)):
        _, _, k_b, r_b = block_layout(length, k, r, sym, b)
        packets += k_b + r_b
    wire = packets * (cfg.link.packet_size + IPV4_UDP_HEADERS)
    return {
        "object_bytes": length,
        "packets": packets,
        "wire_bytes": wire,
        "rate_bps": cfg.link.rate_bps,
        "airtime_ms": wire * 8 / cfg.link.rate_bps * 1000,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--file-mib", type=int, default=1024, help="size of the bulk file")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between messages")
    ap.add_argument("--baseline", type=float, default=10.0, help="seconds of the baseline run")
    ap.add_argument("--rate", default="800M", help="link.rate of both agents")
    ap.add_argument(
        "--tmp",
        default="/dev/shm" if os.access("/dev/shm", os.W_OK) else None,
        help="where the deployment lives (default: /dev/shm, a tmpfs, if writable)",
    )
    ap.add_argument("--json", action="store_true", help="print the JSON result instead")
    args = ap.parse_args()
    size = args.file_mib * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="ferry-bench-prio-", dir=args.tmp) as tmp_s:
        tmp = Path(tmp_s)
        dep = _deploy(tmp, 1)
        _configure(dep, args.rate)
        drop = Path(dep["channels"]["documents"]["drop"])
        deliver = Path(dep["channels"]["documents"]["deliver"])
        out_log, in_log = tmp / "outside.log", tmp / "inside.log"
        out_status = Path(dep["outside"]["state_dir"]) / "status.json"
        hidden = drop / ".bulk.bin"  # dotfiles are ignored until renamed
        sha = _write_random(hidden, size)
        procs = [
            _start("inside", dep["inside"]["config"], in_log),
            _start("outside", dep["outside"]["config"], out_log),
        ]
        try:
            _wait_event(out_log, "api_listening", 30)
            _wait_event(in_log, "session_started", 30)
            col = Collector(dep["consumers"]["client_config"])
            col.start()
            sub = Submitter(dep["api"]["client_config"])
            sub.submit(10_000_000)  # warm-up
            _wait_all(col, {str(uuid.UUID(int=10_000_001))}, 30)

            n_base = max(1, int(args.baseline / args.interval))
            base = _paced(sub, col, 0, args.interval, lambda: len(sub.sent) > n_base)
            _wait_all(col, {str(uuid.UUID(int=n + 1)) for n in base}, 60)

            before = int(_status(out_status).get("bytes_sent", 0))
            t_drop = time.perf_counter()
            os.rename(hidden, drop / "bulk.bin")
            while int(_status(out_status).get("bytes_sent", 0)) < before + FLOWING_BYTES:
                if time.perf_counter() - t_drop > 120:
                    raise SystemExit(
                        f"the file never started flowing: {_status(out_status)}\n"
                        + out_log.read_text()[-3000:]
                    )
                time.sleep(0.01)
            t_flow = time.perf_counter()
            clock = time.time() - time.perf_counter()  # wall = perf + clock
            delivered: list[dict[str, Any]] = []
            last_look = [0.0]

            def file_delivered() -> bool:
                now = time.perf_counter()
                if now - last_look[0] > 0.05:
                    last_look[0] = now
                    ev = _find(in_log, "delivered", name="bulk.bin")
                    if ev is not None:
                        delivered.append(ev)
                if now - t_flow > 600:
                    raise SystemExit("the file was not delivered within 10 minutes")
                return bool(delivered)

            during = _paced(sub, col, 100_000, args.interval, file_delivered)
            _wait_all(col, {str(uuid.UUID(int=n + 1)) for n in during}, 60)
            taken = _wait_event(out_log, "taken", 5, name="bulk.bin")
            sent = _wait_event(out_log, "sent", 5, object_id=taken["object_id"])
            t_sent = _wall(sent) - clock
            t_delivered = _wall(delivered[0]) - clock
            got = hashlib.sha256((deliver / "bulk.bin").read_bytes()).digest()
            if got != sha:
                raise SystemExit("FAIL: the delivered file differs from the one dropped")
            col.stop.set()
            sub.close()
            airtime = _message_airtime(dep)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(timeout=60)

    def lat(n: int) -> float:
        app = str(uuid.UUID(int=n + 1))
        return (col.arrived[app] - sub.sent[app]) * 1000

    on_link = [lat(n) for n in during if sub.sent[str(uuid.UUID(int=n + 1))] <= t_sent]
    verifying = [lat(n) for n in during if sub.sent[str(uuid.UUID(int=n + 1))] > t_sent]
    baseline = _summary([lat(n) for n in base])
    result = {
        "file_mib": args.file_mib,
        "interval_s": args.interval,
        "rate": args.rate,
        "cpus": os.cpu_count(),
        "tmp": args.tmp,
        "baseline": baseline,
        "file_on_link": _summary(on_link),
        "file_being_verified_inside": _summary(verifying),
        "file": {
            "intake_to_flowing_s": t_flow - t_drop,
            "flowing_to_last_packet_s": t_sent - t_flow,
            "last_packet_to_delivered_s": t_delivered - t_sent,
            "drop_to_delivered_s": t_delivered - t_drop,
            "goodput_mbps": size * 8 / (t_delivered - t_drop) / 1e6,
        },
        "message_airtime": airtime,
        "bound_ms": 100 + airtime["airtime_ms"],
        "answers": {k.decode(): v for k, v in sub.answers.items()},
        "samples": [  # (submitted, seconds after the file started flowing; latency in ms)
            (round(sub.sent[str(uuid.UUID(int=n + 1))] - t_flow, 3), round(lat(n), 2))
            for n in during
        ],
    }
    for phase in ("file_on_link", "file_being_verified_inside"):
        s = result[phase]
        if s["messages"]:
            s["added_p50_ms"] = s["p50_ms"] - baseline["p50_ms"]
            s["added_max_ms"] = s["max_ms"] - baseline["p50_ms"]
            s["within_bound"] = s["added_max_ms"] <= result["bound_ms"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"priority-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    f = result["file"]
    print(
        f"{args.file_mib} MiB file at link.rate {args.rate}: flowing {f['intake_to_flowing_s']:.2f}"
        f" s after the drop, last packet {f['flowing_to_last_packet_s']:.2f} s later, delivered"
        f" {f['last_packet_to_delivered_s']:.2f} s after that ({f['goodput_mbps']:.0f} Mb/s"
        " drop to delivery)"
    )
    a = airtime
    print(
        f"message: {a['object_bytes']} B object, {a['packets']} packets, {a['wire_bytes']} B on"
        f" the wire = {a['airtime_ms']:.3f} ms at {a['rate_bps'] / 1e6:.0f} Mb/s;"
        f" bound = 100 ms + that = {result['bound_ms']:.1f} ms added delay"
    )
    print(f"\n{'submit -> consumer':<34}{'n':>5}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
          f"{'+p50':>9}{'+max':>9}")  # fmt: skip
    rows = [
        ("no file in flight", baseline),
        ("file on the link", result["file_on_link"]),
        ("after its last packet (verifying)", result["file_being_verified_inside"]),
    ]
    for label, s in rows:
        if not s["messages"]:
            print(f"{label:<34}{0:>5}")
            continue
        added = f"{s['added_p50_ms']:>9.1f}{s['added_max_ms']:>9.1f}" if "added_p50_ms" in s else ""
        print(
            f"{label:<34}{s['messages']:>5}{s['p50_ms']:>9.1f}{s['p99_ms']:>9.1f}"
            f"{s['max_ms']:>9.1f}{added}"
        )
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

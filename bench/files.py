"""Small files end to end: a clerk's drop folder -> outside -> UDP diode (loopback) -> inside
-> delivery folder, on bulk channels (no content pipeline, no re-check: the transfer and the
delivery machinery alone).

Starts a fresh ``ferry init --bulk archive ...`` deployment (both agents as subprocesses,
as in production), writes N files into the drop folders (spread over ``--channels``
channels) and waits until every one is in its delivery folder with the same content.
Reports files/s from the first file written to the last delivered, and each agent's CPU
time per file.

    .venv/bin/python bench/files.py [--count 2000] [--size 4096] [--channels 1]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from messages import _cpu_s, _start  # noqa: E402


def _deploy(tmp: Path, channels: list[str]) -> dict[str, Any]:
    bulk = [a for ch in channels for a in ("--bulk", ch)]
    out = subprocess.run(
        [sys.executable, "-m", "ferry.cli", "init", str(tmp / "d"), "--json", *bulk],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    dep: dict[str, Any] = json.loads(out.stdout)
    path = Path(dep["outside"]["config"])
    data = yaml.safe_load(path.read_text())
    for ch in data["channels"]:
        if ch["name"] in channels:
            ch["settle_seconds"] = 0.2
    data.setdefault("outside", {})["poll_interval"] = 0.1
    path.write_text(yaml.safe_dump(data))
    return dep


def _wait_up(inside_state: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads((inside_state / "status.json").read_text())["link_state"] == "UP":
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise SystemExit("the link did not come UP")


def run(count: int, size: int, channels: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="ferry-bench-files-") as tmp_s:
        tmp = Path(tmp_s)
        dep = _deploy(tmp, channels)
        inside = _start("inside", dep["inside"]["config"], tmp / "inside.log")
        outside = _start("outside", dep["outside"]["config"], tmp / "outside.log")
        try:
            _wait_up(Path(dep["inside"]["state_dir"]))
            cpu0 = {p.pid: _cpu_s(p.pid) for p in (inside, outside)}
            want: dict[Path, bytes] = {}
            started = time.monotonic()
            for i in range(count):
                ch = dep["channels"][channels[i % len(channels)]]
                data = os.urandom(size)
                tmp_name = Path(ch["drop"]) / f".f{i:06d}.tmp"  # (ignored until renamed)
                tmp_name.write_bytes(data)
                tmp_name.rename(Path(ch["drop"]) / f"f{i:06d}.bin")
                want[Path(ch["deliver"]) / f"f{i:06d}.bin"] = data
            pending = set(want)
            deadline = time.monotonic() + 600
            while pending and time.monotonic() < deadline:
                for folder in {p.parent for p in pending}:
                    pending -= {folder / name for name in os.listdir(folder)}
                if pending:
                    time.sleep(0.05)
            elapsed = time.monotonic() - started
            if pending:
                raise SystemExit(f"{len(pending)} files not delivered in 600 s")
            bad = [p for p, data in want.items() if p.read_bytes() != data]
            if bad:
                raise SystemExit(f"{len(bad)} files delivered with other content")
            cpu = {p.pid: _cpu_s(p.pid) - cpu0[p.pid] for p in (inside, outside)}
        finally:
            for proc in (outside, inside):
                proc.send_signal(signal.SIGTERM)
            for proc in (outside, inside):
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return {
        "files_per_s": count / elapsed,
        "seconds": elapsed,
        "inside_cpu_us_per_file": cpu[inside.pid] / count * 1e6,
        "outside_cpu_us_per_file": cpu[outside.pid] / count * 1e6,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--size", type=int, default=4096, help="bytes per file")
    ap.add_argument("--channels", type=int, default=1, help="bulk channels the files spread on")
    args = ap.parse_args()
    channels = [f"bulk{i + 1}" for i in range(args.channels)]
    result = run(args.count, args.size, channels)
    print(
        f"{args.count} files of {args.size} bytes on {args.channels} channel(s): "
        f"{result['files_per_s']:,.0f} files/s ({result['seconds']:.2f} s); CPU per file: "
        f"inside {result['inside_cpu_us_per_file']:.0f} µs, "
        f"outside {result['outside_cpu_us_per_file']:.0f} µs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

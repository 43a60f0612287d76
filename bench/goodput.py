#!/usr/bin/env python3
"""Goodput of one large file over loopback UDP at 0 % and 5 % loss: ferry vs udpcast.

    sudo .venv/bin/python bench/goodput.py [--quick | --size-mib N] [--runs N] [--install]

Needs root, ``ip`` (iproute2), ``nft`` (nftables) and ``udp-sender``/``udp-receiver``
(udpcast). Everything runs in a private network namespace whose ``lo`` has a
1500-byte MTU; an nftables rule drops a random ``loss`` % of the UDP datagrams
to the receiver's port at input, identically for both tools. Files live on a
tmpfs mounted for the run. See bench/README.md for what is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
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
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
FERRY = ROOT / ".venv" / "bin" / "ferry"
RESULTS = ROOT / "bench" / "results"
NS = f"ferry-bench-{os.getpid()}"
UDPCAST_PORT = 9000  # portbase: data and hellos go to this port, the receiver answers on +1
RMEM_MAX = 134_217_728
RCVBUF = 64 * 1024 * 1024  # both receivers: ferry's default (forced), udp-receiver --rcvbuf
CLK = os.sysconf("SC_CLK_TCK")
NAME = "bench.bin"
Row = dict[str, Any]
# Defaults: FEC@rate. ferry FEC is ISA-L k+r/interleave, rate is link.rate (wire bits/s);
# udpcast is --fec interleave x redundancy / stripe size @ --max-bitrate.
# Same code shape for both tools: 64 data + 4 repair at 0 %, 32 data + 12 repair at 5 %.
FERRY_0, FERRY_L = "64+4/32@1G", "32+12/32@900M"
UDPCAST_0, UDPCAST_L = "16x4/64@2000m", "32x12/32@2000m"


def sh(*cmd: str, ns: bool = False, check: bool = True) -> str:
    full = ["ip", "netns", "exec", NS, *cmd] if ns else list(cmd)
    return subprocess.run(full, check=check, capture_output=True, text=True).stdout


# ----------------------------------------------------------------------------- set-up
def check_prereqs(install: bool) -> None:
    if os.geteuid() != 0:
        sys.exit("goodput: needs root (network namespace, nftables, tmpfs): run with sudo")
    if not FERRY.exists():
        sys.exit(f"goodput: {FERRY} missing: run `python3 tasks.py bench` to create the venv")
    missing = [c for c in ("ip", "nft", "udp-sender", "udp-receiver") if not shutil.which(c)]
    if missing and install:
        subprocess.run(["apt-get", "update"], check=True)
        subprocess.run(["apt-get", "install", "-y", "udpcast", "nftables", "iproute2"], check=True)
        missing = [c for c in missing if not shutil.which(c)]
    if missing:
        hint = "apt-get install udpcast nftables iproute2, or pass --install"
        sys.exit(f"goodput: missing {', '.join(missing)}: {hint}")


@contextlib.contextmanager
def environment(size: int) -> Iterator[Path]:
    """Namespace with lo up (MTU 1500), raised rmem_max, and a tmpfs work folder."""
    old_rmem = Path("/proc/sys/net/core/rmem_max").read_text().strip()
    work = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
    mounted = False
    try:
        sh("ip", "netns", "add", NS)
        sh("ip", "-n", NS, "link", "set", "lo", "mtu", "1500", "up")
        sh("sysctl", "-qw", f"net.core.rmem_max={RMEM_MAX}")
        sh("mount", "-t", "tmpfs", "-o", f"size={5 * size + (1 << 30)}", "tmpfs", str(work))
        mounted = True
        yield work
    finally:
        if mounted:
            sh("umount", str(work), check=False)
        shutil.rmtree(work, ignore_errors=True)
        sh("sysctl", "-qw", f"net.core.rmem_max={old_rmem}", check=False)
        sh("ip", "netns", "del", NS, check=False)


def set_loss(port: int, loss: int) -> None:
    sh("nft", "flush", "ruleset", ns=True)
    if loss:
        sh("nft", "add", "table", "ip", "t", ns=True)
        sh("nft", "add", "chain", "ip", "t", "c", "{ type filter hook input priority 0; }", ns=True)
        rule = f"udp dport {port} numgen random mod 100 < {loss} drop"
        sh("nft", "add", "rule", "ip", "t", "c", *rule.split(), ns=True)


def make_source(work: Path, size: int) -> tuple[Path, str]:
    path = work / "source.bin"
    with path.open("wb") as f:
        for off in range(0, size, 1 << 24):
            f.write(os.urandom(min(1 << 24, size - off)))
    return path, sha256_file(path) or ""


def sha256_file(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def rcvbuf_errors() -> int:
    """UDP RcvbufErrors in the namespace: datagrams the kernel dropped for a full socket."""
    lines = [ln.split() for ln in sh("cat", "/proc/net/snmp", ns=True).splitlines()]
    head, vals = [ln for ln in lines if ln[0] == "Udp:"][:2]
    return int(vals[head.index("RcvbufErrors")])


# --------------------------------------------------------------------- process helpers
class Proc:
    """A child in the namespace; stderr JSON lines are collected by a thread."""

    def __init__(self, *cmd: str) -> None:
        null, pipe = subprocess.DEVNULL, subprocess.PIPE
        self.p = subprocess.Popen(
            ["ip", "netns", "exec", NS, *cmd], stdin=null, stdout=null, stderr=pipe, text=True
        )
        self.events: list[dict[str, Any]] = []
        self.tail: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.p.stderr is not None
        for line in self.p.stderr:
            self.tail = [*self.tail[-20:], line.rstrip()]
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))

    def event(self, name: str) -> dict[str, Any] | None:
        return next((e for e in list(self.events) if e.get("event") == name), None)

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while (ev := self.event(name)) is None:
            if self.p.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"no {name!r} event; stderr tail:\n" + "\n".join(self.tail))
            time.sleep(0.01)
        return ev

    def cpu(self) -> dict[int, float]:
        """CPU seconds per thread id (ip netns exec execs, so the pid is the tool's)."""
        out: dict[int, float] = {}
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{self.p.pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    f = (task / "stat").read_text().rsplit(")", 1)[1].split()
                    out[int(task.name)] = (int(f[11]) + int(f[12])) / CLK
        return out

    def stop(self) -> None:
        self.p.send_signal(signal.SIGTERM)  # a no-op once the child was reaped
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.wait(15)
        self.p.kill()
        self.p.wait()
        self._t.join(5)


def cpu_report(before: dict[int, float], after: dict[int, float], wall: float) -> dict[str, float]:
    used = [after[tid] - before.get(tid, 0.0) for tid in after] or [0.0]
    return {"cpu_pct": 100 * sum(used) / wall, "busiest_thread_pct": 100 * max(used) / wall}


def merge_max(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    """Per-thread CPU, keeping the last good sample of threads that ended (zombies read 0)."""
    return {t: max(a.get(t, 0.0), b.get(t, 0.0)) for t in a.keys() | b.keys()}


def iso(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


# ----------------------------------------------------------------------------- ferry
def parse_fec(text: str) -> dict[str, Any]:
    """``64+16/32`` -> source 64, repair 16, interleave 32 (ISA-L)."""
    kr, _, depth = text.partition("/")
    k, _, r = kr.partition("+")
    return {"codec": "isal", "source": int(k), "repair": int(r), "interleave": int(depth or 32)}


def ferry_deploy(work: Path, rate: str, fec: dict[str, Any]) -> dict[str, Any]:
    dep = work / "ferry"
    shutil.rmtree(dep, ignore_errors=True)
    info: dict[str, Any] = json.loads(sh(str(FERRY), "init", str(dep), "--json"))
    for side in ("outside", "inside"):
        path = Path(info[side]["config"])
        cfg = yaml.safe_load(path.read_text())
        cfg["link"]["fec"] = fec
        if side == "outside":
            cfg["link"]["rate"] = rate
            cfg["outside"] = {"poll_interval": 0.01}
            cfg["channels"][0].update(settle_seconds=0, after_send="delete", max_size="64G")
            cfg["channels"][0].pop("content", None)  # random bytes: a bulk channel
        else:
            cfg["inside"] = {"object_timeout": 10}  # an undecodable object fails fast
            cfg["channels"][0]["recheck"] = False
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return info


def run_ferry(work: Path, src: Path, sha: str, loss: int, rate: str, fec: str) -> dict[str, Any]:
    info = ferry_deploy(work, rate, parse_fec(fec))
    set_loss(int(info["link"]["udp"]["port"]), loss)
    ch = info["channels"]["documents"]
    drop, target = Path(ch["drop"]), Path(ch["deliver"]) / NAME
    shutil.copyfile(src, drop / f".{NAME}")  # a dot name is never taken: the rename drops it
    size = src.stat().st_size
    log = [str(FERRY), "--log-json"]
    inside = Proc(*log, "inside", "run", "-c", info["inside"]["config"])
    outside = None
    res: dict[str, Any] = {"intact": False}
    try:
        inside.wait_event("inside_started", 30)
        outside = Proc(*log, "outside", "run", "-c", info["outside"]["config"])
        inside.wait_event("session_started", 30)
        drops0, link = rcvbuf_errors(), None
        t0 = time.time()
        os.rename(drop / f".{NAME}", drop / NAME)
        deadline = time.monotonic() + 60 + size * 8 / 20e6  # give up below ~20 Mb/s
        while not target.exists():
            if link is None and outside.event("taken"):  # CPU of the link phase only
                link = time.time(), outside.cpu(), inside.cpu()
            bad = inside.event("object_lost") or inside.event("object_rejected")
            exited = outside.p.poll() is not None or inside.p.poll() is not None
            if bad or exited or time.monotonic() > deadline:
                why = f"{bad['event']}: {bad.get('reason')}" if bad else "bench timeout"
                if exited:
                    why = f"agent exit: outside {outside.p.returncode} inside {inside.p.returncode}"
                res["error"] = f"{why}; kernel RcvbufErrors {rcvbuf_errors() - drops0}"
                return res
            time.sleep(0.002)
        end = time.time()
        res["seconds"] = end - t0
        res["rcvbuf_errors"] = rcvbuf_errors() - drops0
        if link is not None:
            res["sender"] = cpu_report(link[1], outside.cpu(), end - link[0])
            res["receiver"] = cpu_report(link[2], inside.cpu(), end - link[0])
        taken = iso(outside.wait_event("taken", 5)["timestamp"])
        res["intake_seconds"] = taken - t0
        res["send_seconds"] = iso(outside.wait_event("sent", 5)["timestamp"]) - taken
        res["link_seconds"] = iso(inside.wait_event("delivered", 5)["timestamp"]) - taken
        res["intact"] = sha256_file(target) == sha
        if not res["intact"]:
            res["error"] = "delivered file differs from the source (SHA-256)"
        return res
    except RuntimeError as exc:
        res["error"] = str(exc)
        return res
    finally:
        time.sleep(0.6)  # let the inside write a fresh status.json
        with contextlib.suppress(OSError, ValueError):
            st = json.loads((Path(info["inside"]["state_dir"]) / "status.json").read_text())
            keys = ("datagrams", "symbols", "blocks_decoded", "blocks_recovered", "overflow_drops")
            res["inside_status"] = {k: st.get(k) for k in keys}
            if "error" in res:
                res["error"] += f"; ferry queue overflow_drops {st.get('overflow_drops')}"
        if not res["intact"]:
            res["outside_log"] = outside.tail[-8:] if outside else []
            res["inside_log"] = [ln for ln in inside.tail if "packet_rejected" not in ln][-8:]
        for proc in (outside, inside):
            if proc is not None:
                proc.stop()
        target.unlink(missing_ok=True)


# --------------------------------------------------------------------------- udpcast
def run_udpcast(work: Path, src: Path, sha: str, loss: int, rate: str, fec: str) -> dict[str, Any]:
    set_loss(UDPCAST_PORT, loss)
    out = work / "udpcast.out"
    out.unlink(missing_ok=True)
    size = src.stat().st_size
    common = ["--portbase", str(UDPCAST_PORT), "--interface", "lo", "--nokbd"]
    rx = Proc(
        *["udp-receiver", *common, "--file", str(out), "--rcvbuf", str(RCVBUF)],
        *["--start-timeout", "20", "--receive-timeout", "10"],
    )
    time.sleep(0.3)  # let the receiver bind before the hellos start
    res: dict[str, Any] = {"intact": False}
    drops0 = rcvbuf_errors()
    t0 = time.time()
    tx = Proc(
        *["udp-sender", *common, "--file", str(src), "--async", "--fec", fec],
        *["--max-bitrate", rate, "--autostart", "2", "--rexmit-hello-interval", "50"],
    )
    cpu_t, cpu_r = tx.cpu(), rx.cpu()
    last_t, last_r = cpu_t, cpu_r
    deadline = time.monotonic() + 60 + size * 8 / 20e6
    try:
        while rx.p.poll() is None and time.monotonic() < deadline:
            last_t, last_r = merge_max(last_t, tx.cpu()), merge_max(last_r, rx.cpu())
            time.sleep(0.01)
        wall = time.time() - t0
        if rx.p.poll() is None:
            res["error"] = "timeout"
            return res
        res["seconds"] = wall
        res["rcvbuf_errors"] = rcvbuf_errors() - drops0
        res["sender"] = cpu_report(cpu_t, last_t, wall)
        res["receiver"] = cpu_report(cpu_r, last_r, wall)
        res["intact"] = sha256_file(out) == sha
        if not res["intact"]:
            got = out.stat().st_size if out.exists() else 0
            res["error"] = f"output differs from the source (SHA-256); {got} of {size} bytes"
        return res
    finally:
        tx.stop()
        rx.stop()
        out.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- report
def summarise(tool: str, loss: int, settings: str, runs: list[dict[str, Any]], size: int) -> Row:
    ok = [r for r in runs if r["intact"]]
    row: dict[str, Any] = {"tool": tool, "loss_pct": loss, "settings": settings, "runs": runs}
    row |= {"intact": f"{len(ok)}/{len(runs)}", "all_intact": len(ok) == len(runs)}
    for key in ("seconds", "link_seconds"):
        if values := [r[key] for r in ok if key in r]:
            row[key] = statistics.median(values)
            row[key.replace("seconds", "goodput_mbps")] = size * 8 / row[key] / 1e6
    return row


def print_table(rows: list[Row], size: int) -> None:
    print(f"\nfile {size / 2**20:.0f} MiB, 1500-byte packets, loopback in netns {NS}, tmpfs")
    print(
        f"{'tool':7} {'loss':>4} {'settings':34} {'seconds':>7} {'Mb/s':>7} {'link s':>7} "
        f"{'link Mb/s':>9}  intact  CPU% tx/rx (busiest thread)"
    )
    for r in rows:
        secs, link = f"{'FAIL':>7} {'FAIL':>7}", f"{'-':>7} {'-':>9}"
        if "seconds" in r:
            secs = f"{r['seconds']:7.2f} {r['goodput_mbps']:7.1f}"
        if "link_seconds" in r:
            link = f"{r['link_seconds']:7.2f} {r['link_goodput_mbps']:9.1f}"
        cpu = ""
        if last := next((x for x in reversed(r["runs"]) if "sender" in x), None):
            tx, rx = last["sender"], last["receiver"]
            cpu = f"{tx['cpu_pct']:.0f}/{rx['cpu_pct']:.0f} "
            cpu += f"({tx['busiest_thread_pct']:.0f}/{rx['busiest_thread_pct']:.0f})"
        intact = f"{'yes' if r['all_intact'] else 'NO'} {r['intact']}"
        print(
            f"{r['tool']:7} {r['loss_pct']:>3}% {r['settings']:34} {secs} {link}  {intact:7} {cpu}"
        )
        for x in r["runs"]:
            if "error" in x:
                print(f"    FAIL: {x['error'][:300]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="file size (default 1024)")
    ap.add_argument("--quick", action="store_true", help="256 MiB file")
    ap.add_argument("--runs", type=int, default=1, help="repeat each case, report the median")
    ap.add_argument("--loss", default="0,5", help="loss percentages (default 0,5)")
    ap.add_argument("--tools", default="ferry,udpcast", help="default ferry,udpcast")
    ap.add_argument("--install", action="store_true", help="apt-get install what is missing")
    ap.add_argument("--ferry-0", default=FERRY_0, help=f"ferry FEC@link.rate at 0%% ({FERRY_0})")
    ap.add_argument("--ferry-loss", default=FERRY_L, help=f"ferry with loss ({FERRY_L})")
    ap.add_argument("--udpcast-0", default=UDPCAST_0, help=f"--fec@--max-bitrate ({UDPCAST_0})")
    ap.add_argument("--udpcast-loss", default=UDPCAST_L, help=f"udpcast with loss ({UDPCAST_L})")
    args = ap.parse_args()
    size = (256 if args.quick else args.size_mib) * 2**20
    losses = [int(x) for x in args.loss.split(",")]
    tools = args.tools.split(",")
    check_prereqs(args.install)
    rows: list[dict[str, Any]] = []
    with environment(size) as work:
        src, sha = make_source(work, size)
        for tool in tools:
            for loss in losses:
                setting = getattr(args, f"{tool}_{'0' if loss == 0 else 'loss'}")
                fec, _, rate = setting.partition("@")
                if tool == "ferry":
                    label, func = f"isal {fec} rate {rate}", run_ferry
                else:
                    label, func = f"--fec {fec} --max-bitrate {rate}", run_udpcast
                runs = []
                for i in range(args.runs):
                    r = func(work, src, sha, loss, rate, fec)
                    ok = f"{size * 8 / r['seconds'] / 1e6:.1f} Mb/s" if r["intact"] else "FAIL"
                    print(f"{tool} {loss}% run {i + 1}: {ok}", file=sys.stderr, flush=True)
                    runs.append(r)
                rows.append(summarise(tool, loss, label, runs, size))
    print_table(rows, size)
    by = {(r["tool"], r["loss_pct"]): r for r in rows}
    for loss in losses:
        f, u = by.get(("ferry", loss), {}), by.get(("udpcast", loss), {})
        if "seconds" in f and "seconds" in u:
            note = "" if f["all_intact"] and u["all_intact"] else " (some runs FAILED)"
            print(f"ratio ferry/udpcast at {loss}%: {u['seconds'] / f['seconds']:.2f}{note}")
            if "link_seconds" in f:
                print(f"  (ferry link phase only: {u['seconds'] / f['link_seconds']:.2f})")
        else:
            print(f"ratio ferry/udpcast at {loss}%: n/a (a side failed or was not run)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"goodput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    meta = {"size_bytes": size, "filesystem": "tmpfs", "argv": sys.argv[1:], "cpus": os.cpu_count()}
    meta["kernel"] = os.uname().release
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    print(f"results: {out}")
    return 0 if all(r["all_intact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

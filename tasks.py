#!/usr/bin/env python3
"""Set-up and task runner that needs nothing but Python 3.11 and pip.

    python3 tasks.py demo [options]   # create .venv, install ferry, run the demo
    python3 tasks.py test [--slow]    # create .venv, install ferry[dev], lint, type-check, test
    python3 tasks.py bench [options]  # goodput benchmark (root; needs udpcast, nftables)

The virtual environment lives in ./.venv and is re-used while pyproject.toml
does not change.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"


def _run(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)


def ensure_venv(extras: str) -> None:
    stamp = VENV / f".ferry-installed-{extras or 'base'}"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return
    if not (BIN / "python").exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    spec = f".[{extras}]" if extras else "."
    _run(BIN / "python", "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    _run(BIN / "python", "-m", "pip", "install", "--quiet", "-e", spec)
    stamp.write_text(want)


def cmd_demo(args: list[str]) -> int:
    ensure_venv("")
    return subprocess.call([str(BIN / "ferry"), "demo", *args], cwd=ROOT)


DEBIAN_TOOLS = {
    # package: (commands that show it is there, the tests that need it)
    "chromium": (("chromium", "chromium-browser"), "the HTML report test"),
    "systemd": (("systemd-analyze",), "the systemd unit checks"),
    "bindfs": (("bindfs",), "the drop folder on a network share tests (FUSE)"),
    "exfat-fuse": (("mount.exfat-fuse",), "the delivery onto an exFAT volume tests"),
    "exfatprogs": (("mkfs.exfat",), "the same tests (mkfs.exfat)"),
}


def ensure_debian_tools() -> None:
    """Install the Debian packages a few tests use, when missing and root (as in CI).

    Without them those tests are skipped; nothing else needs them.
    """
    missing = {
        pkg: why
        for pkg, (commands, why) in DEBIAN_TOOLS.items()
        if not any(shutil.which(c) for c in commands)
    }
    if not missing:
        return
    names, whys = " ".join(missing), " and ".join(missing.values())
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        print(
            f"note: {names} not installed; {whys} will be skipped "
            f"(as root on Debian: apt-get install {names})",
            flush=True,
        )
        return
    print(f"installing {names} (apt-get) for {whys} ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            print(
                f"warning: {' '.join(cmd)} failed; {whys} will be skipped:",
                *tail,
                sep="\n  ",
                flush=True,
            )
            return


def cmd_test(args: list[str]) -> int:
    ensure_venv("dev")
    ensure_debian_tools()
    slow = "--slow" in args
    args = [a for a in args if a != "--slow"]
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    for step in (
        [BIN / "ruff", "check", "."],
        [BIN / "ruff", "format", "--check", "."],
        [BIN / "mypy"],
    ):
        print("+", " ".join(str(s) for s in step), flush=True)
        if subprocess.call([str(s) for s in step], cwd=ROOT, env=env) != 0:
            return 1
    marker = [] if slow else ["-m", "not slow"]
    pytest = [str(BIN / "python"), "-m", "pytest", *marker, *args]
    print("+", " ".join(pytest), flush=True)
    return subprocess.call(pytest, cwd=ROOT, env=env)


def cmd_bench(args: list[str]) -> int:
    ensure_venv("dev")
    return subprocess.call([str(BIN / "python"), "bench/goodput.py", *args], cwd=ROOT)


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in {"demo", "test", "bench"}:
        print(__doc__)
        return 2
    name, rest = sys.argv[1], sys.argv[2:]
    return {"demo": cmd_demo, "test": cmd_test, "bench": cmd_bench}[name](rest)


if __name__ == "__main__":
    sys.exit(main())

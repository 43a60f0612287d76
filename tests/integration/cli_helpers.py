"""Helpers that drive ferry through its CLI, as an operator would."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas" / "messages"


def application(n: int) -> bytes:
    """The schema's example citizen application, with application id ``n + 1``."""
    schema = json.loads((SCHEMAS / "citizen-application.schema.json").read_text())
    doc = schema["examples"][0]
    doc["application_id"] = str(uuid.UUID(int=n + 1))
    return json.dumps(doc, ensure_ascii=False).encode()


def ferry(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ferry.cli", *args], capture_output=True, text=True, check=check
    )


def init(root: Path, *extra: str) -> dict[str, Any]:
    out = ferry("init", str(root), "--json", *extra)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def edit_yaml(path: str | Path, change: Callable[[dict[str, Any]], None]) -> None:
    p = Path(path)
    data = yaml.safe_load(p.read_text())
    change(data)
    p.write_text(yaml.safe_dump(data, allow_unicode=True))


def client_config_like(src: str | Path, dest: str | Path, **changes: str) -> str:
    """A copy of the client config ``src`` at ``dest`` (anywhere: its key files named by
    absolute paths), with ``changes`` (``endpoint``, ``client_key``...) made; its path."""
    src = Path(src)
    data = yaml.safe_load(src.read_text())
    for key in ("server_public_key", "client_key"):
        if not str(data[key]).startswith("ferry-pk:"):
            data[key] = str(src.parent / data[key])
    data.update(changes)
    Path(dest).write_text(yaml.safe_dump(data))
    return str(dest)


def fast(data: dict[str, Any]) -> None:
    """Shorter settle and poll times so tests run quickly."""
    for ch in data["channels"]:
        if "drop" in ch:
            ch["settle_seconds"] = 0.2
    if data["role"] == "outside":
        data.setdefault("outside", {})["poll_interval"] = 0.1


def opaque(data: dict[str, Any]) -> None:
    """Make every files channel a bulk channel, as `ferry init --bulk` does: no content policy
    outside, no re-check inside. For tests of the transport that move random bytes; apply it
    to both configs."""
    for ch in data["channels"]:
        if data["role"] == "outside":
            ch.pop("content", None)
        elif ch.get("kind", "files") == "files":
            ch["recheck"] = False


def fast_bulk(data: dict[str, Any]) -> None:
    fast(data)
    opaque(data)


class Agent:
    def __init__(
        self, side: str, config: str, log: Path, *, umask: int = -1, clock_offset: float = 0.0
    ) -> None:
        """``clock_offset``: seconds the agent's wall clock is moved by (shifted_clock.py)."""
        self.log = log
        self._fh = open(log, "wb")  # noqa: SIM115
        cli = ["-m", "ferry.cli"]
        if clock_offset:
            cli = [str(Path(__file__).with_name("shifted_clock.py")), str(clock_offset)]
        self.proc = subprocess.Popen(
            [sys.executable, *cli, "--log-json", side, "run", "-c", config],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            umask=umask,  # (-1: this process's)
        )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()
        return self.proc.returncode

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_event(self, name: str, timeout: float = 30.0, **match: object) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events():
                if ev.get("event") == name and all(ev.get(k) == v for k, v in match.items()):
                    return ev
            assert self.proc.poll() is None, f"agent exited: {self.log.read_text()[-2000:]}"
            time.sleep(0.1)
        raise AssertionError(
            f"no {name} event {match} in {self.log}:\n{self.log.read_text()[-3000:]}"
        )


def drop_file(folder: str | Path, name: str, data: bytes) -> None:
    """Write as a clerk's tool does: a temp name first, then rename."""
    tmp = Path(folder) / (name + ".part")
    tmp.write_bytes(data)
    os.rename(tmp, Path(folder) / name)


def wait_files(folder: str | Path, names: set[str], timeout: float = 60.0) -> dict[str, bytes]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        present = {p.name for p in Path(folder).iterdir()}
        if names <= present:
            return {n: (Path(folder) / n).read_bytes() for n in names}
        time.sleep(0.1)
    raise AssertionError(f"missing {names - {p.name for p in Path(folder).iterdir()}}")


def empty_wal(db: Path) -> None:
    """Checkpoint a running agent's SQLite database and truncate its write-ahead log, so that
    its next commit needs new room on the disk (a log with free frames would take it)."""
    with sqlite3.connect(db, timeout=30) as conn:
        (busy, _, _) = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0, f"{db}: the checkpoint could not finish"


def fill_disk(folder: Path) -> Path:
    """Fill the file system holding ``folder`` with one new file there; return that file.
    (Unbuffered writes: a buffered file would raise ENOSPC again when closed.)"""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        block = b"\0" * 65536
        while True:
            try:
                os.write(fd, block)
            except OSError:
                try:  # the last few blocks of the file system
                    while os.write(fd, b"\0" * 512):
                        pass
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


@dataclass(frozen=True)
class Share:
    """A folder seen through a FUSE mount, as a clerk's share is: ``server`` is the file
    server's side (writes there are other machines' writes), ``mount`` the gateway's view."""

    server: Path
    mount: Path

    def daemon(self) -> int:
        """The FUSE daemon's process: SIGSTOP it and the share stops answering, as a file
        server that went away does (calls on the mount wait), SIGCONT and it is back."""
        out = subprocess.run(
            ["pgrep", "-f", f"^bindfs {self.server} {self.mount}$"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        (pid,) = out.stdout.split()
        return int(pid)

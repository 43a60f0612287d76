"""Fixtures for integration tests."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_helpers import Agent, Share


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[[str, str], Agent]]:
    started: list[Agent] = []

    def start(side: str, config: str) -> Agent:
        a = Agent(side, config, tmp_path / f"{side}-{len(started)}.log")
        started.append(a)
        return a

    yield start
    for a in started:
        a.stop()


@pytest.fixture
def small_audit_disk(tmp_path: Path):
    """Mount a 2 MiB tmpfs; yield a function that moves a folder onto it."""
    mounts: list[Path] = []

    def mount(folder: str | Path) -> Path:
        folder = Path(folder)
        saved = tmp_path / f"saved-{len(mounts)}"
        shutil.copytree(folder, saved)
        for p in folder.iterdir():
            p.unlink()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(folder)], check=True
        )
        mounts.append(folder)
        for p in saved.iterdir():
            shutil.copy2(p, folder / p.name)
        return folder

    yield mount
    for m in mounts:
        subprocess.run(["umount", "-l", str(m)], check=False)


@pytest.fixture
def network_share(tmp_path: Path) -> Iterator[Share]:
    """A real FUSE file system (bindfs) over a folder. Like an SMB or NFS share, inotify on
    the mount reports only what is written through it, not what the server side writes."""
    if shutil.which("bindfs") is None or not Path("/dev/fuse").exists():
        pytest.skip("bindfs (FUSE) is not installed")  # tasks.py installs it when root
    share = Share(tmp_path / "fileserver", tmp_path / "share")
    share.server.mkdir()
    share.mount.mkdir()
    subprocess.run(["bindfs", str(share.server), str(share.mount)], check=True)
    try:
        yield share
    finally:
        subprocess.run(["umount", "-l", str(share.mount)], check=False)
